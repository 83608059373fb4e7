"""Structured sparsity: physical removal of attention heads and FFN neurons, and their importance.

Masks make nothing faster; this module deletes the pruned structure from the weight matrices:

- ``remove_heads(model, {layer: [head, ...]})``: per layer, the rows of the query/key/value
  projections that belong to those heads and the matching columns of the attention output
  projection. A layer that loses all of its heads keeps only the output projection's bias.
- ``remove_ffn_neurons(model, {layer: [neuron, ...]})``: the rows of the FFN input projection(s)
  (BERT ``intermediate.dense``; Llama ``gate_proj`` and ``up_proj``) and the columns of the FFN
  output projection (``output.dense``; ``down_proj``).

Indices always name the *original* heads/neurons of the dense model (as importance scores
computed on it do), so removals compose: removing head 3 and later head 5 of the same layer is
the same as removing both at once. Removing a head that is already gone is an error.

Both return the model's shape record (``shape_record(model)``): a JSON-ready dict that lists, per
layer, the kept original head and neuron indices. ``apply_shape_record(dense_model, record)``
shrinks a freshly built dense model of the same config to those shapes, which is how
``slimtune.load_exported`` rebuilds a model whose per-layer widths its config cannot express.

Which units to remove (importance scores, global/local selection, rounding, LoRA rank pruning)
is ``slimtune.sparsity.importance``; its public names are also reachable from this module.

The remaining computation is unchanged: a slimmed model's outputs equal those of the dense model
whose removed heads/neurons are masked to zero (tests check this within 1e-5).

Families: BERT-like encoders (``bert``, ``roberta``, ``xlm-roberta``, ``electra``), MPNet (its
relative-position bias, shared by all layers, is sliced to each layer's kept heads), and Llama-like
decoders with grouped-query attention (``llama``, ``mistral``, ``qwen2``): query heads are removed
consistently, i.e. every kept KV group keeps the same number of query heads, and a KV group whose
query heads are all removed is removed with them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtune.core.arch import LayerParts, layer_parts, model_family
from slimtune.errors import SlimtuneError

SHAPE_RECORD_FORMAT = "slimtune-shapes/1"


def head_dim_of(model: nn.Module) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def kv_heads_of(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


# --------------------------------------------------------------------------------------------
# Kept indices: stored on each layer module, starting from the config's full widths.
# --------------------------------------------------------------------------------------------

_KEPT = "slimtune_kept"


def _kept(model: nn.Module, parts: LayerParts) -> dict[str, list[int]]:
    layer = model.get_submodule(parts.layer)
    if not hasattr(layer, _KEPT):
        config = model.config
        setattr(layer, _KEPT, {
            "heads": list(range(config.num_attention_heads)),
            "kv_heads": list(range(kv_heads_of(model))),
            "neurons": list(range(config.intermediate_size)),
        })
    return getattr(layer, _KEPT)


def _get_linear(model: nn.Module, path: str) -> nn.Linear:
    module = model.get_submodule(path)
    if type(module) is not nn.Linear:
        raise SlimtuneError(
            f"'{path}' is a {type(module).__name__}, not a plain Linear; merge the delta into the base "
            "(export --merge) before removing structure"
        )
    return module


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``linear``'s weight restricted to ``rows`` (outputs) / ``cols`` (inputs)."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    # skip_init: no random init of weights that are overwritten next; a zero-width Linear (all
    # heads/neurons gone) is legitimate, so torch's warning about initialising it is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        new = torch.nn.utils.skip_init(
            nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _units(positions: Sequence[int], width: int) -> torch.Tensor:
    """Row/column indices of the units at ``positions`` (each ``width`` wide)."""
    if not positions:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(p * width, (p + 1) * width) for p in positions])


def _normalise_request(request: Mapping[Any, Sequence[int]], num_layers: int, what: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, indices in request.items():
        try:
            layer_index = int(layer)
        except (TypeError, ValueError):
            raise SlimtuneError(f"{what}: layer '{layer}' is not an integer") from None
        if not 0 <= layer_index < num_layers:
            raise SlimtuneError(f"{what}: layer {layer_index} out of range; the model has layers 0..{num_layers - 1}")
        out[layer_index] = sorted({int(i) for i in indices})
    return out


# --------------------------------------------------------------------------------------------
# Modules that stand in for an attention block that lost every head.
# --------------------------------------------------------------------------------------------


class HeadlessSelfAttention(nn.Module):
    """BERT's self-attention with no heads left: a zero-width context (the output projection,
    now ``Linear(0, hidden)``, then contributes only its bias)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class HeadlessAttention(nn.Module):
    """MPNet/Llama attention with no heads left: only the output projection's bias remains."""

    def __init__(self, o_name: str, o: nn.Linear, returns_pair: bool):
        super().__init__()
        self.o_name = o_name
        self.add_module(o_name, o)
        self.returns_pair = returns_pair
        self.num_heads = 0

    def forward(self, hidden_states, *args, **kwargs):
        out = getattr(self, self.o_name)(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))
        return (out, None) if self.returns_pair else (out,)


def _slice_position_bias(module, args, kwargs):
    """MPNet computes one relative-position bias for all heads once per forward; each layer that
    lost heads keeps only its own heads' rows of it."""
    kept = getattr(module, "slimtune_kept_heads", None)
    if kept is None:
        return None
    index = torch.tensor(kept, dtype=torch.long)
    args = list(args)
    if len(args) >= 3 and args[2] is not None:
        args[2] = args[2].index_select(1, index.to(args[2].device))
    elif kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = kwargs["position_bias"].index_select(1, index.to(kwargs["position_bias"].device))
    return tuple(args), kwargs


# --------------------------------------------------------------------------------------------
# Removal.
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def remove_heads(model: nn.Module, heads: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """Delete attention heads in place: ``heads`` maps a layer index to original head indices.

    Q/K/V lose the heads' rows, the output projection loses the matching columns. For Llama-like
    GQA models the kept query heads must stay evenly spread over the kept KV groups (a KV group
    whose query heads are all removed is removed too). Returns the shape record."""
    family = model_family(model)
    parts_of = layer_parts(model)
    request = _normalise_request(heads, len(parts_of), "heads")
    head_dim = head_dim_of(model)
    for layer_index, remove in request.items():
        if not remove:
            continue
        parts = parts_of[layer_index]
        kept = _kept(model, parts)
        gone = [h for h in remove if h not in kept["heads"]]
        if gone:
            raise SlimtuneError(
                f"heads: layer {layer_index} has no head {gone[0]} (kept heads: {kept['heads']})"
            )
        new_heads = [h for h in kept["heads"] if h not in remove]
        positions = [kept["heads"].index(h) for h in new_heads]
        new_kv = kept["kv_heads"]
        kv_positions = list(range(len(new_kv)))
        if family == "llama":
            new_kv, kv_positions = _consistent_kv(model, layer_index, kept, new_heads)
        _shrink_attention(model, family, parts, positions, kv_positions, head_dim, len(new_heads), len(new_kv))
        kept["heads"], kept["kv_heads"] = new_heads, new_kv
        if family == "mpnet":
            attention = model.get_submodule(parts.attention)
            attention.slimtune_kept_heads = list(new_heads)
            if not getattr(attention, "slimtune_bias_hook", False) and not isinstance(attention, HeadlessAttention):
                attention.register_forward_pre_hook(_slice_position_bias, with_kwargs=True)
                attention.slimtune_bias_hook = True
    return shape_record(model)


def _consistent_kv(model: nn.Module, layer_index: int, kept: dict, new_heads: list[int]) -> tuple[list[int], list[int]]:
    """GQA: original query head h reads KV head h // group_size. Returns the kept KV heads and
    their current positions, or fails when the kept query heads are unevenly spread."""
    config = model.config
    group_size = config.num_attention_heads // kv_heads_of(model)
    per_group: dict[int, int] = {}
    for h in new_heads:
        per_group[h // group_size] = per_group.get(h // group_size, 0) + 1
    if len(set(per_group.values())) > 1:
        raise SlimtuneError(
            f"heads: layer {layer_index} would keep {dict(sorted(per_group.items()))} query heads per KV group; "
            "grouped-query attention needs the same number in every kept group (or remove whole groups)"
        )
    new_kv = sorted(per_group)
    return new_kv, [kept["kv_heads"].index(g) for g in new_kv]


def _shrink_attention(model, family, parts: LayerParts, positions, kv_positions, head_dim, n_heads, n_kv) -> None:
    q_rows = _units(positions, head_dim)
    kv_rows = _units(kv_positions, head_dim) if family == "llama" else q_rows
    attention = model.get_submodule(parts.attention)
    o = _sliced_linear(_get_linear(model, parts.o), cols=q_rows)
    if n_heads == 0:
        if family == "bert":
            _replace(model, parts.attention, HeadlessSelfAttention())
            _replace(model, parts.o, o)
        else:
            _replace(model, parts.attention, HeadlessAttention(parts.o.rpartition(".")[2], o, returns_pair=family == "llama"))
        return
    _replace(model, parts.q, _sliced_linear(_get_linear(model, parts.q), rows=q_rows))
    _replace(model, parts.k, _sliced_linear(_get_linear(model, parts.k), rows=kv_rows))
    _replace(model, parts.v, _sliced_linear(_get_linear(model, parts.v), rows=kv_rows))
    _replace(model, parts.o, o)
    if family == "llama":
        attention.num_key_value_groups = n_heads // n_kv
    else:
        attention.num_attention_heads = n_heads
        attention.all_head_size = n_heads * head_dim


@torch.no_grad()
def remove_ffn_neurons(model: nn.Module, neurons: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """Delete FFN neurons in place: ``neurons`` maps a layer index to original neuron indices.

    The FFN input projection(s) lose the neurons' rows, the output projection their columns.
    Returns the shape record."""
    parts_of = layer_parts(model)
    request = _normalise_request(neurons, len(parts_of), "neurons")
    for layer_index, remove in request.items():
        if not remove:
            continue
        parts = parts_of[layer_index]
        kept = _kept(model, parts)
        kept_set = set(kept["neurons"])
        gone = [n for n in remove if n not in kept_set]
        if gone:
            raise SlimtuneError(f"neurons: layer {layer_index} has no neuron {gone[0]} (it has {len(kept_set)} left)")
        remove_set = set(remove)
        positions = [i for i, n in enumerate(kept["neurons"]) if n not in remove_set]
        index = torch.tensor(positions, dtype=torch.long)
        for path in parts.ffn_in:
            _replace(model, path, _sliced_linear(_get_linear(model, path), rows=index))
        _replace(model, parts.ffn_out, _sliced_linear(_get_linear(model, parts.ffn_out), cols=index))
        kept["neurons"] = [n for n in kept["neurons"] if n not in remove_set]
    return shape_record(model)


# --------------------------------------------------------------------------------------------
# The shape record.
# --------------------------------------------------------------------------------------------


def shape_record(model: nn.Module) -> dict[str, Any]:
    """The model's per-layer widths as a JSON-ready dict::

        {"format": "slimtune-shapes/1", "model_type": "bert", "head_dim": 32,
         "num_attention_heads": 12, "num_key_value_heads": 12, "intermediate_size": 1536,
         "layers": [{"heads": [0, 2, ...], "kv_heads": [...], "neurons": [5, 9, ...]}, ...]}

    ``heads``/``kv_heads``/``neurons`` are the kept original indices of each layer (``kv_heads``
    differs from ``heads`` only for GQA models). The top-level counts are the dense config's."""
    config = model.config
    layers = []
    for parts in layer_parts(model):
        kept = _kept(model, parts)
        layers.append({"heads": list(kept["heads"]), "kv_heads": list(kept["kv_heads"]), "neurons": list(kept["neurons"])})
    return {
        "format": SHAPE_RECORD_FORMAT,
        "model_type": config.model_type,
        "head_dim": head_dim_of(model),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": kv_heads_of(model),
        "intermediate_size": config.intermediate_size,
        "layers": layers,
    }


def is_dense(record: Mapping[str, Any]) -> bool:
    return all(
        len(layer["heads"]) == record["num_attention_heads"] and len(layer["neurons"]) == record["intermediate_size"]
        for layer in record["layers"]
    )


def check_shape_record(record: Any, model: nn.Module, source: str = "shapes.json") -> None:
    """Fail with one line when ``record`` does not describe a slimming of ``model``'s dense config."""
    if not isinstance(record, Mapping) or record.get("format") != SHAPE_RECORD_FORMAT:
        raise SlimtuneError(f"{source}: not a slimtune shape record (expected format '{SHAPE_RECORD_FORMAT}')")
    config = model.config
    expected = {
        "model_type": config.model_type, "head_dim": head_dim_of(model),
        "num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
    }
    for key, value in expected.items():
        if record.get(key) != value:
            raise SlimtuneError(f"{source}: {key} is {record.get(key)!r}, the model config says {value!r}")
    layers = record.get("layers")
    if not isinstance(layers, list) or len(layers) != config.num_hidden_layers:
        raise SlimtuneError(f"{source}: 'layers' must list {config.num_hidden_layers} layers")
    for i, layer in enumerate(layers):
        for key, limit in (("heads", config.num_attention_heads), ("kv_heads", kv_heads_of(model)), ("neurons", config.intermediate_size)):
            values = layer.get(key) if isinstance(layer, Mapping) else None
            if not isinstance(values, list) or not all(isinstance(v, int) and 0 <= v < limit for v in values) \
                    or len(set(values)) != len(values):
                raise SlimtuneError(f"{source}: layers[{i}].{key} must be distinct integers in 0..{limit - 1}")


def apply_shape_record(model: nn.Module, record: Mapping[str, Any], source: str = "shapes.json") -> nn.Module:
    """Shrink a dense model (built from the same config) to the widths in ``record``, in place.

    Weights are sliced along the way; a loader then overwrites them with the saved ones."""
    check_shape_record(record, model, source)
    config = model.config
    heads = {i: [h for h in range(config.num_attention_heads) if h not in set(layer["heads"])]
             for i, layer in enumerate(record["layers"])}
    neurons = {i: sorted(set(range(config.intermediate_size)) - set(layer["neurons"]))
               for i, layer in enumerate(record["layers"])}
    remove_heads(model, heads)
    remove_ffn_neurons(model, neurons)
    got = shape_record(model)
    for i, (want, have) in enumerate(zip(record["layers"], got["layers"], strict=True)):
        if sorted(want["kv_heads"]) != have["kv_heads"] and model_family(model) == "llama":
            raise SlimtuneError(f"{source}: layers[{i}].kv_heads {want['kv_heads']} do not match its heads {want['heads']}")
    return model
