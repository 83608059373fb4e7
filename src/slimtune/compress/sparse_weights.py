"""``slimtune export --sparse``: Linear weights with zeros stored as the positions of their
non-zeros plus their values (float32, or int8 with their dense per-channel scales), in the delta's
sparse format (:mod:`slimtune.sparsity.storage`; ``load_exported`` decodes it), and the encoder
compression that Prune Once for All reports."""

from __future__ import annotations

import re
from typing import Any

import torch

from slimtune.compress.quantize import is_int8_linear
from slimtune.sparsity.storage import SEP, encode

#: The sparse weights of ``export --sparse`` (``slimtune_model.safetensors``): every Linear weight
#: with zeros (float32, or int8 values with their dense per-channel scales) as the positions of
#: its non-zeros (int16/int32 indices or a bitmap, whichever is smaller) + their values, in the
#: delta's sparse format (``slimtune.sparsity.storage``); a tensor that would not get smaller stays dense.
SPARSE_FORMAT = "slimtune-sparse/1"
#: Tensors of the transformer layers, what "encoder compression" counts (embeddings and head excluded).
LAYER_TENSOR = re.compile(r"(^|\.)(layer|layers|h)\.\d+\.")


def sparse_weights(model, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every Linear weight that has zeros in the sparse format (see SPARSE_FORMAT)."""
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_int8_linear(m)}
    out: dict[str, Any] = {}
    for name, value in state.items():
        if name in linear and value.dim() == 2 and bool((value == 0).any()):
            out.update(encode(name, value, value != 0))
        else:
            out[name] = value
    return out


def compression(state: dict[str, Any], dense_model) -> dict[str, Any]:
    """Encoder compression (Prune Once for All's measure): the transformer layers' float32 bytes
    in ``dense_model`` / their bytes as stored in ``state``; and the weight sparsity of its Linears."""
    def in_layers(name: str) -> bool:
        return bool(LAYER_TENSOR.search(name.partition(SEP)[0]))

    dense = sum(p.numel() * 4 for n, p in dense_model.state_dict().items() if in_layers(n) and p.is_floating_point())
    stored = sum(t.numel() * t.element_size() for n, t in state.items() if in_layers(n))
    weights = [m.weight for m in dense_model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"encoder_dense_fp32_bytes": dense, "encoder_stored_bytes": stored, "encoder_compression": dense / stored if stored else None,
            "linear_weight_sparsity": zeros / sum(w.numel() for w in weights) if weights else 0.0}
