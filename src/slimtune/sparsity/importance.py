"""Importance of attention heads, FFN neurons and LoRA ranks, and the selection of what to remove.

Scores are ``{layer: {original unit index: score}}`` over the units a model still has (see
``slimtune.sparsity.structured`` for the removal itself and the shape record). Selection turns
scores into removal requests: a share of units ranked ``global``ly or per layer (``local``),
optionally with each layer's kept FFN width rounded to a multiple of N; heads of grouped-query
attention go by whole KV groups. LoRA ranks are the singular directions of each update; pruning
keeps the top ones.

These names are also reachable as ``slimtune.sparsity.structured.<name>``, where they lived first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.sparsity.structured import _get_linear, _kept, head_dim_of, kv_heads_of, layer_parts, model_family

# --------------------------------------------------------------------------------------------
# Importance of heads and FFN neurons.
#
# Every criterion scores a unit (a head, a neuron) by a group of weights:
#   magnitude  the L2 norm of the unit's weights: Q/K/V rows + output-projection columns of a
#              head (Llama: query rows + output columns, K/V being shared by a group); the FFN
#              input row(s) + output column of a neuron.
#   delta      the same norm of (weights - reference weights): how much fine-tuning moved the unit.
#   taylor     |dL/dg| for a gate g = 1 that scales the unit's output (Michel et al. 2019, "Are
#              sixteen heads really better than one?"): first order Taylor estimate of the loss
#              change when the unit is removed, averaged over batches. Because the unit feeds the
#              next projection only through its columns, dL/dg = sum over those columns of W * dL/dW
#              (w.g summed over the group), so one backward pass per batch scores every unit.
#   fisher     the mean over batches of (dL/dg)^2: the empirical Fisher information of the gate
#              (Kwon et al. 2022, "A fast post-training pruning framework for transformers").
# Gradients are taken of the task loss (``model(**batch).loss``) on the batches given.
# --------------------------------------------------------------------------------------------

CRITERIA = ("magnitude", "delta", "taylor", "fisher")
SCOPES = ("global", "local")

Scores = dict[int, dict[int, float]]  # layer -> {original unit index: importance}


def _check_criterion(criterion: str, batches, reference) -> None:
    if criterion not in CRITERIA:
        from slimtune.errors import did_you_mean

        raise SlimtuneError(f"criterion '{criterion}' is not known{did_you_mean(criterion, CRITERIA)}")
    if criterion in ("taylor", "fisher") and not batches:
        raise SlimtuneError(f"criterion '{criterion}' needs batches of task data (with labels)")
    if criterion == "delta" and reference is None:
        raise SlimtuneError("criterion 'delta' needs the reference (pre-fine-tuning) weights")


def _weight(model: nn.Module, path: str, reference: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    weight = model.get_submodule(path).weight.detach().float()
    if reference is not None:
        ref = reference[f"{path}.weight"].float()
        if ref.shape != weight.shape:
            raise SlimtuneError(f"criterion 'delta': reference '{path}.weight' has shape {tuple(ref.shape)}, the model {tuple(weight.shape)}")
        weight = weight - ref
    return weight


def _magnitudes(model: nn.Module, reference: Mapping[str, torch.Tensor] | None) -> tuple[Scores, Scores]:
    family, head_dim = model_family(model), head_dim_of(model)
    heads, neurons = {}, {}
    for i, parts in enumerate(layer_parts(model)):
        kept = _kept(model, parts)
        o = _weight(model, parts.o, reference)
        squares = o.pow(2).sum(0)  # per input column of the output projection
        rows = [parts.q] if family == "llama" else [parts.q, parts.k, parts.v]
        if kept["heads"]:
            for path in rows:
                squares = squares + _weight(model, path, reference).pow(2).sum(1)
        per_head = squares.view(-1, head_dim).sum(1).sqrt() if kept["heads"] else torch.zeros(0)
        heads[i] = dict(zip(kept["heads"], per_head.tolist(), strict=True))
        squares = _weight(model, parts.ffn_out, reference).pow(2).sum(0)
        for path in parts.ffn_in:
            squares = squares + _weight(model, path, reference).pow(2).sum(1)
        neurons[i] = dict(zip(kept["neurons"], squares.sqrt().tolist(), strict=True))
    return heads, neurons


def _gate_gradients(model: nn.Module, batches, criterion: str) -> tuple[Scores, Scores]:
    """Taylor (mean |dL/dg|) or Fisher (mean (dL/dg)^2) of every head and neuron gate."""
    head_dim = head_dim_of(model)
    parts_of = layer_parts(model)
    targets = []
    for parts in parts_of:
        targets += [_get_linear(model, parts.o).weight, _get_linear(model, parts.ffn_out).weight]
    flags = [t.requires_grad for t in targets]
    head_sums = [torch.zeros(len(_kept(model, p)["heads"])) for p in parts_of]
    neuron_sums = [torch.zeros(len(_kept(model, p)["neurons"])) for p in parts_of]
    was_training = model.training
    model.eval()  # no dropout: the score is of the function that will be shipped
    count = 0
    try:
        for t in targets:
            t.requires_grad_(True)
        for batch in batches:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, targets)
            for i in range(len(parts_of)):
                for sums, weight, grad, width in (
                    (head_sums[i], targets[2 * i], grads[2 * i], head_dim),
                    (neuron_sums[i], targets[2 * i + 1], grads[2 * i + 1], 1),
                ):
                    if not sums.numel():
                        continue
                    gate = (weight.detach() * grad).sum(0).view(-1, width).sum(1).float()
                    sums += gate.abs() if criterion == "taylor" else gate.pow(2)
            count += 1
    finally:
        for t, flag in zip(targets, flags, strict=True):
            t.requires_grad_(flag)
        model.train(was_training)
    if not count:
        raise SlimtuneError(f"criterion '{criterion}' got no batches")
    heads = {i: dict(zip(_kept(model, p)["heads"], (head_sums[i] / count).tolist(), strict=True)) for i, p in enumerate(parts_of)}
    neurons = {i: dict(zip(_kept(model, p)["neurons"], (neuron_sums[i] / count).tolist(), strict=True)) for i, p in enumerate(parts_of)}
    return heads, neurons


def unit_importance(
    model: nn.Module,
    criterion: str = "taylor",
    *,
    batches=None,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Scores, Scores]:
    """Importance of every kept head and FFN neuron: ``(heads, neurons)``, each
    ``{layer: {original index: score}}`` (higher = more important).

    ``criterion``: ``magnitude``, ``delta`` (needs ``reference``, a state dict of the weights
    before fine-tuning, same shapes), ``taylor`` or ``fisher`` (need ``batches``: an iterable of
    model inputs with labels, e.g. a few training batches). See the section comment above."""
    _check_criterion(criterion, batches, reference)
    if criterion in ("magnitude", "delta"):
        return _magnitudes(model, reference if criterion == "delta" else None)
    return _gate_gradients(model, batches, criterion)


def _rounded_keep(keep: int, total: int, multiple: int) -> int:
    """``keep`` units of ``total`` rounded to the nearest multiple of ``multiple`` (ties: keep
    more), never below one multiple when the layer keeps anything, never above ``total``."""
    if multiple <= 1 or keep == 0 or keep == total:
        return keep
    rounded = max(multiple, multiple * ((keep + multiple // 2) // multiple))
    return min(rounded, total)


def select_lowest(
    scores: Scores, fraction: float, scope: str = "global", what: str = "units", multiple: int = 1
) -> dict[int, list[int]]:
    """The units to remove: the ``fraction`` with the lowest scores, ``global``ly (ranked across
    all layers: "remove 50% of heads overall") or ``local``ly (the same fraction in every layer).
    Counts round to the nearest unit; ties break by layer then index (deterministic).

    ``multiple`` > 1 rounds every layer's *kept* count to the nearest multiple of it (a layer that
    keeps anything keeps at least one multiple; one that keeps all stays whole), then removes that
    layer's lowest-scored units: matrix widths that CPU GEMM kernels tile well. The overall removed
    share then differs slightly from ``fraction``."""
    if not 0 <= fraction < 1:
        raise SlimtuneError(f"{what}: fraction {fraction} must be in [0, 1)")
    if scope not in SCOPES:
        raise SlimtuneError(f"scope '{scope}' must be 'global' or 'local'")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise SlimtuneError(f"{what}: multiple {multiple!r} must be a positive integer")
    chosen: dict[int, list[int]] = {layer: [] for layer in scores}
    if scope == "global":
        ranked = sorted((s, layer, unit) for layer, units in scores.items() for unit, s in units.items())
        for _, layer, unit in ranked[: round(fraction * len(ranked))]:
            chosen[layer].append(unit)
    else:
        for layer, units in scores.items():
            ranked = sorted((s, unit) for unit, s in units.items())
            chosen[layer] = [unit for _, unit in ranked[: round(fraction * len(ranked))]]
    if multiple > 1:
        for layer, units in scores.items():
            keep = _rounded_keep(len(units) - len(chosen[layer]), len(units), multiple)
            ranked = sorted((s, unit) for unit, s in units.items())
            chosen[layer] = [unit for _, unit in ranked[: len(units) - keep]]
    return {layer: sorted(units) for layer, units in chosen.items()}


def select_heads(model: nn.Module, scores: Scores, fraction: float, scope: str = "global") -> dict[int, list[int]]:
    """Like ``select_lowest`` for heads; for grouped-query attention whole KV groups are ranked
    (a group scores the sum of its query heads) and removed, so the result stays consistent."""
    if model_family(model) != "llama" or kv_heads_of(model) == model.config.num_attention_heads:
        return select_lowest(scores, fraction, scope, "heads")
    group_size = model.config.num_attention_heads // kv_heads_of(model)
    groups: Scores = {}
    for layer, units in scores.items():
        groups[layer] = {}
        for head, score in units.items():
            groups[layer][head // group_size] = groups[layer].get(head // group_size, 0.0) + score
    chosen = select_lowest(groups, fraction, scope, "heads")
    return {layer: [h for g in gs for h in range(g * group_size, (g + 1) * group_size)] for layer, gs in chosen.items()}


# --------------------------------------------------------------------------------------------
# LoRA ranks: importance of the update's singular directions, and rank pruning.
#
# A LoRA update dW = s B A (s = alpha / r) is rewritten by SVD as sum_i sigma_i u_i v_i^T. A rank
# is one direction; with a gate g_i on it, dL/dg_i = sigma_i u_i^T G v_i (G = dL/dW, the gradient
# of the wrapped weight, which the LoRA branch shares). Criteria: magnitude/delta = sigma_i (the
# update *is* the delta), taylor = mean |dL/dg_i|, fisher = mean (dL/dg_i)^2. Pruning keeps the top
# directions: B' = U_k diag(sigma_k) / s, A' = V_k^T, which is the best rank-k approximation of dW
# when ranked by magnitude (Eckart-Young).
# --------------------------------------------------------------------------------------------


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    # Modules that declare their update is exactly scaling * B @ A (slimtune.methods.lora.LoRALinear;
    # DSEE's layer also has lora_A/lora_B but adds a sparse part): sparsity names no method.
    layers = {name: m for name, m in model.named_modules() if getattr(m, "pure_low_rank_update", False)}
    if not layers:
        raise SlimtuneError("the model holds no LoRA layers")
    return layers


@torch.no_grad()
def _lora_svd(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if layer.merged_from is not None:
        raise SlimtuneError("LoRA layers are merged; unmerge before scoring or pruning ranks")
    u, s, vh = torch.linalg.svd(layer.delta_weight().float(), full_matrices=False)
    r = layer.lora_A.shape[0]
    return u[:, :r], s[:r], vh[:r]


def lora_rank_importance(model: nn.Module, criterion: str = "magnitude", *, batches=None) -> dict[str, list[float]]:
    """Per LoRA layer, the importance of each singular direction of its update, in order of
    decreasing singular value. See the section comment for the criteria."""
    _check_criterion(criterion, batches, reference={} if criterion == "delta" else None)
    layers = _lora_layers(model)
    svds = {name: _lora_svd(layer) for name, layer in layers.items()}
    if criterion in ("magnitude", "delta"):
        return {name: s.tolist() for name, (_, s, _) in svds.items()}
    weights = [layer.base.weight for layer in layers.values()]
    flags = [w.requires_grad for w in weights]
    sums = {name: torch.zeros_like(s) for name, (_, s, _) in svds.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(model(**batch).loss, weights)
            for (name, (u, s, vh)), grad in zip(svds.items(), grads, strict=True):
                gate = s * torch.einsum("or,oi,ri->r", u, grad.float(), vh)
                sums[name] += gate.abs() if criterion == "taylor" else gate.pow(2)
            count += 1
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    return {name: (total / max(count, 1)).tolist() for name, total in sums.items()}


@torch.no_grad()
def prune_lora_ranks(
    model: nn.Module,
    fraction: float,
    *,
    criterion: str = "magnitude",
    scope: str = "global",
    batches=None,
) -> dict[str, int]:
    """Remove the ``fraction`` least important rank directions of the LoRA updates in place
    (``global``: ranked across all layers; ``local``: the same fraction per layer). Each layer's
    ``lora_A``/``lora_B`` are replaced by the kept directions (``r`` shrinks; ``scaling`` stays).
    Returns ``{layer: kept rank}``."""
    layers = _lora_layers(model)
    scores = lora_rank_importance(model, criterion, batches=batches)
    as_units = {i: dict(enumerate(scores[name])) for i, name in enumerate(layers)}
    removed = select_lowest(as_units, fraction, scope, "ranks")
    kept_ranks = {}
    for i, (name, layer) in enumerate(layers.items()):
        u, s, vh = _lora_svd(layer)
        keep = [d for d in range(len(s)) if d not in set(removed[i])]
        index = torch.tensor(keep, dtype=torch.long)
        dtype = layer.lora_A.dtype
        new_b = (u[:, index] * s[index]) / layer.scaling
        new_a = vh[index]
        layer.lora_B = nn.Parameter(new_b.to(dtype), requires_grad=layer.lora_B.requires_grad)
        layer.lora_A = nn.Parameter(new_a.to(dtype), requires_grad=layer.lora_A.requires_grad)
        layer.r = len(keep)
        kept_ranks[name] = len(keep)
    return kept_ranks
