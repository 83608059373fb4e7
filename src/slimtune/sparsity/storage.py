"""Sparse storage of a delta: a masked tensor is saved as the flat positions of its kept entries
plus their values (safetensors), so a delta at density 0.6 costs what it holds, not its dense
shape.

For a tensor ``name`` the file holds ``name::sparse_indices`` (int16 when the tensor has fewer
than 32,768 entries, else int32), ``name::sparse_values`` and ``name::sparse_shape`` (int64).
When a bitmap (1 bit per entry) is smaller than the index list — at density above 1/16 for
int16 indices, 1/32 for int32 — ``name::sparse_bitmap`` (packed uint8) replaces the indices;
and when neither beats the dense tensor (values alone cost ``density`` of it), the tensor stays
dense. Reading restores the dense tensor (zeros where masked) and the mask itself. A masked
tensor of the model that the delta does not hold (a pruned frozen base weight) is saved as its
mask alone, ``name::sparse_mask`` (a bitmap) and ``name::sparse_shape``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.sparsity.masks import apply_mask, clean_name, masked_tensors

SEP = "::sparse_"


def _packbits(kept: torch.Tensor) -> torch.Tensor:
    flat = kept.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat * weights).sum(1).to(torch.uint8)


def _unpackbits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.flatten()[:n].to(torch.bool)


def encode(name: str, value: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The smallest of: indices + values, bitmap + values, dense."""
    n = value.numel()
    flat_kept = kept.flatten()
    values = value.detach().flatten()[flat_kept].contiguous()
    index_dtype = torch.int16 if n < 2**15 else torch.int32
    index_bytes = values.numel() * (2 if index_dtype == torch.int16 else 4)
    bitmap_bytes = math.ceil(n / 8)
    value_bytes = values.numel() * value.element_size()
    dense_bytes = n * value.element_size()
    shape = torch.tensor(list(value.shape), dtype=torch.int64)
    if min(index_bytes, bitmap_bytes) + value_bytes + shape.numel() * 8 >= dense_bytes:
        return {name: (value.detach() * kept.to(value.dtype)).contiguous()}
    out = {f"{name}{SEP}values": values, f"{name}{SEP}shape": shape}
    if index_bytes <= bitmap_bytes:
        out[f"{name}{SEP}indices"] = torch.nonzero(flat_kept).flatten().to(index_dtype)
    else:
        out[f"{name}{SEP}bitmap"] = _packbits(flat_kept)
    return out


def encode_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every masked tensor of ``state`` (clean names) by its sparse form, and add the mask
    alone (a bitmap, ``name::sparse_mask``) of every masked tensor of the model that ``state``
    does not hold: a pruned base weight under a method that does not train it (BitFit, LoRA),
    whose values the base model has, so that the run loads back pruned."""
    masks = {name: mask.kept for name, _, _, mask in masked_tensors(model)}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        kept = masks.get(clean_name(name))
        if kept is not None and kept.shape == value.shape:
            out.update(encode(name, value, kept))
        else:
            out[name] = value
    held = {clean_name(name) for name in state}
    for name, kept in masks.items():
        if name not in held:
            out[f"{name}{SEP}mask"] = _packbits(kept.flatten())
            out[f"{name}{SEP}shape"] = torch.tensor(list(kept.shape), dtype=torch.int64)
    return out


def decode_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dense tensors (zeros where masked) and the masks, from a possibly sparse state."""
    dense: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if SEP in key:
            name, _, part = key.rpartition(SEP)
            groups.setdefault(name, {})[part] = value
        else:
            dense[key] = value
    for name, parts in groups.items():
        if "mask" in parts and "shape" in parts:  # a mask alone: the values are the base model's
            shape = [int(v) for v in parts["shape"].tolist()]
            kept[name] = _unpackbits(parts["mask"], math.prod(shape)).view(shape)
            continue
        if "values" not in parts or "shape" not in parts or not ({"indices", "bitmap"} & parts.keys()):
            raise SlimtuneError(f"delta: sparse tensor '{name}' lacks its values, shape or positions")
        shape = [int(s) for s in parts["shape"].tolist()]
        n = math.prod(shape)
        if "indices" in parts:
            flat_kept = torch.zeros(n, dtype=torch.bool)
            indices = parts["indices"].to(torch.int64)
            if indices.numel() and (indices.min() < 0 or indices.max() >= n):
                raise SlimtuneError(f"delta: sparse tensor '{name}' has positions outside its shape {shape}")
            flat_kept[indices] = True
        else:
            flat_kept = _unpackbits(parts["bitmap"], n)
        values = parts["values"]
        if int(flat_kept.sum()) != values.numel():
            raise SlimtuneError(f"delta: sparse tensor '{name}' has {values.numel()} values for {int(flat_kept.sum())} positions")
        flat = torch.zeros(n, dtype=values.dtype)
        flat[flat_kept] = values
        dense[name] = flat.view(shape)
        kept[name] = flat_kept.view(shape)
    return dense, kept


def restore_masks(model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Mask the model's tensors as saved (so training can continue with the same support)."""
    modules = dict(model.named_modules())
    for name, mask in kept.items():
        module_name, _, tensor_name = name.rpartition(".")
        module = modules.get(module_name)
        if module is not None and hasattr(module, tensor_name):
            apply_mask(module, tensor_name, mask)
