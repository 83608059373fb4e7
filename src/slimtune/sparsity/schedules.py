"""Pruning schedules as trainer hooks, configured by the recipe's ``sparsity`` section.

``density`` is the fraction of entries KEPT, everywhere (``sparsity = 1 - density`` is accepted
as an alias). What is pruned (``target``):

* ``delta`` — the weight tensors the recipe's methods train (adapter projections, LoRA factors,
  Compacter factors, ...; not biases, norms or the task head): SparseAdapter (He et al. 2022)
  is ``{target: delta, criterion: snip, density: 0.6, at: init}`` on top of any adapter method;
* ``base`` — the backbone's linear weights (also those another method wraps, e.g. LoRA's frozen
  base): magnitude / gradual pruning of the model itself.

Schedules:

* ``one_shot`` — prune once, at initialisation (``at: init``, before the first step) or after
  step ``at``;
* ``gradual`` — Zhu & Gupta (2017): every ``frequency`` steps from ``start_step`` to
  ``end_step``, sparsity ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (end - t0))^3``;
* ``iterative`` — ``rounds`` prune -> retrain rounds spread evenly over training, the density of
  round k being ``density^(k / rounds)`` (so each round removes the same fraction of what is left).

Masks only tighten: an entry pruned once stays pruned. A tensor the criterion cannot rank (all
its scores equal, e.g. LoRA's zero-initialised B at init) is not pruned at that step; the others
are ranked to the density among themselves and the report lists it as ``left_dense``; if no
target can be ranked it is a one-line error. Criteria that need data (snip, grasp,
movement) score on ``batches`` seeded batches of the training split; ``movement`` on trainable
tensors uses the gradients seen in training since the last pruning step instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.progress import write
from slimtune.core.arch import OUTPUT_HEAD_NAMES, pattern_matches
from slimtune.sparsity import criteria
from slimtune.sparsity.masks import (
    apply_mask,
    check_density,
    clean_name,
    dense_tensor,
    get_mask,
    kept_from_scores,
    masked_tensors,
    pin_to_optimizer,
)
from slimtune.core.hooks import Hook

if TYPE_CHECKING:
    from slimtune.features.sparsity import SparsitySection

Targets = dict[str, tuple[nn.Module, str]]


# --------------------------------------------------------------------------------------------
# Formulas.
# --------------------------------------------------------------------------------------------


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int, frequency: int) -> float:
    """Zhu & Gupta's cubic schedule, held constant between pruning steps: the sparsity in force
    after ``step``."""
    if step < start:
        return 0.0
    if end <= start:
        return final
    t = min(start + ((step - start) // frequency) * frequency, end)
    if step >= end:
        t = end
    return final + (initial - final) * (1 - (t - start) / (end - start)) ** 3


def iterative_densities(density: float, rounds: int) -> list[float]:
    return [density ** ((k + 1) / rounds) for k in range(rounds)]


def large_sparse_width(hidden: int, width: int, density: float, bias: bool = True) -> int:
    """Large-Sparse (He et al. 2022): the bottleneck width m' whose non-zero parameters at
    ``density`` equal the dense adapter's (width m). Weights (2 d m') are pruned, biases
    (m' + d) stay dense: density * 2 d m' + m' + d = 2 d m + m + d, so
    m' = m (2 d + 1) / (2 d density + 1); without biases m' = m / density."""
    density = check_density(density)
    if bias:
        return max(1, round(width * (2 * hidden + 1) / (2 * hidden * density + 1)))
    return max(1, round(width / density))


#: Methods whose width Large-Sparse can widen, and the field that sets it.
LARGE_SPARSE_FIELDS = {"houlsby": "reduction_factor", "pfeiffer": "reduction_factor", "lora": "r"}


def large_sparse_specs(specs: list[Any], hidden: int, density: float) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """The recipe's method specs widened for Large-Sparse at ``density``: adapters get the width
    of :func:`large_sparse_width` (weights pruned, biases dense), LoRA the rank ``r / density``
    (rounded; A and B are both pruned, and alpha stays as given, as if the recipe said that r:
    the update scale alpha / r shrinks by the density). FFA-LoRA (``train_a: false``) is refused:
    its A is frozen and not pruned, so widening it would add dense parameters.
    Returns the new specs and ``{method: {field: [before, after], width: [before, after]}}``.
    A method without a width to widen is a one-line error."""
    density = check_density(density)
    widened, changes = [], {}
    for spec in specs:
        field = LARGE_SPARSE_FIELDS.get(spec.name)
        if field is None:
            raise SlimtuneError(
                f"sparsity.large_sparse: method '{spec.name}' has no width to widen; Large-Sparse applies to "
                f"{', '.join(LARGE_SPARSE_FIELDS)} (drop large_sparse or the method)"
            )
        config = spec.config
        if field == "r" and not getattr(config, "train_a", True):
            raise SlimtuneError(
                f"sparsity.large_sparse: method '{spec.name}' has train_a: false (FFA-LoRA), whose frozen A is not pruned, "
                "so rank r / density would add dense parameters; use train_a: true or drop large_sparse"
            )
        if field == "r":
            before, after = config.r, max(1, round(config.r / density))
            new_config = config.model_copy(update={"r": after})
            changes[spec.name] = {"r": [before, after]}
        else:
            width = max(1, int(hidden // config.reduction_factor))
            wide = large_sparse_width(hidden, width, density)
            # hidden / (m' + 1/2) floors back to exactly m' (hidden / m' may land just below it).
            factor = hidden / (wide + 0.5)
            new_config = config.model_copy(update={"reduction_factor": factor})
            changes[spec.name] = {"reduction_factor": [config.reduction_factor, factor], "width": [width, wide]}
        widened.append(spec.model_copy(update={"config": new_config}))
    return widened, changes


# --------------------------------------------------------------------------------------------
# Which tensors.
# --------------------------------------------------------------------------------------------


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, tensor_name = clean_name(name).rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), tensor_name


def select_targets(model: nn.Module, delta: Any, target: str, include: list[str] | None = None) -> Targets:
    """Tensors to prune, by clean name. ``include``: name patterns (suffix or 're:') on tensor
    names that narrow the choice."""
    chosen: Targets = {}
    if target == "delta":
        if delta is None:
            raise SlimtuneError("sparsity.target: 'delta' needs the recipe's methods (a delta); none is attached")
        head = set(delta.head_names)
        for name, param in delta.trainable_parameters(model).items():
            name = clean_name(name)
            if name in head or param.dim() < 2:
                continue
            chosen[name] = _resolve(model, name)
    elif target == "base":
        for module_name, module in model.named_modules():
            if getattr(module, "merged_from", None) is not None:  # a method wrapper (LoRA, ...) with its update merged
                raise SlimtuneError(f"sparsity.target: '{module_name}' has its update merged into the weight; prune before merging or unmerge first")
            if not isinstance(module, nn.Linear) or module_name.split(".")[0] in OUTPUT_HEAD_NAMES or module_name.split(".")[-1] in OUTPUT_HEAD_NAMES:
                continue
            chosen[f"{module_name}.weight"] = (module, "weight")
    else:
        raise SlimtuneError(f"sparsity.target: '{target}' is not a target; valid: delta, base")
    if include:
        narrowed = {n: v for n, v in chosen.items() if any(pattern_matches(p, n) for p in include)}
        for pattern in include:
            if not any(pattern_matches(pattern, n) for n in narrowed):
                frozen = [n for n, _ in model.named_parameters() if pattern_matches(pattern, clean_name(n))]
                if frozen and target == "delta":
                    raise SlimtuneError(f"sparsity.include: '{pattern}' names '{clean_name(frozen[0])}', which no method of this recipe trains (it is frozen); prune it with target: base")
                raise SlimtuneError(f"sparsity.include: pattern '{pattern}' matches no {target} tensor; e.g. {', '.join(list(chosen)[:3])}")
        chosen = narrowed
    if not chosen:
        raise SlimtuneError(f"sparsity.target: no {target} weight tensors to prune")
    return chosen


# --------------------------------------------------------------------------------------------
# Pruning.
# --------------------------------------------------------------------------------------------


def unrankable(scores: dict[str, torch.Tensor], targets: Targets) -> list[str]:
    """Target tensors the criterion cannot rank: more than one entry still kept and all their
    (finite) scores equal, e.g. every score 0 for LoRA's zero-initialised B under every criterion
    but random (and A's too under snip, movement and synflow: B = 0 zeroes A's gradient). A
    top-k over them would only pick entries in the tie-break order."""
    out = []
    for name, (module, tensor_name) in targets.items():
        mask = get_mask(module, tensor_name)
        live = scores[name][mask.kept] if mask is not None else scores[name].flatten()
        finite = live[torch.isfinite(live)]
        if live.numel() > 1 and (finite.numel() == 0 or bool(finite.max() == finite.min())):
            out.append(name)
    return out


def prune(
    model: nn.Module,
    targets: Targets,
    *,
    criterion: str,
    density: float,
    scope: str = "global",
    batches: list[dict[str, torch.Tensor]] | None = None,
    loss_fn=None,
    seed: int = 0,
    scores: dict[str, torch.Tensor] | None = None,
    when: str = "here",
) -> dict[str, torch.Tensor]:
    """Score ``targets`` and mask them to ``density`` (kept fraction) — entries already masked
    stay masked. Tensors the criterion cannot rank (:func:`unrankable`) are left as they are and
    the others are ranked to ``density`` among themselves; when none can be ranked it is a
    one-line error (``when`` names the moment in it). Returns the masks of the ranked tensors
    (True = kept)."""
    density = check_density(density)
    if scores is None:
        scores = criteria.score(criterion, model, targets, batches=batches, loss_fn=loss_fn, seed=seed)
    scores = {n: s.detach().float().clone() for n, s in scores.items()}
    left = set(unrankable(scores, targets)) if density < 1 else set()
    if left and len(left) == len(targets):
        example = next(iter(targets))
        value = scores[example].flatten()[0].item()
        raise SlimtuneError(
            f"sparsity.criterion: '{criterion}' cannot rank any of the {len(targets)} target tensors {when}: each one's scores are all "
            f"equal (e.g. '{example}': all {value:g}; LoRA's B starts at zero, and under snip, movement or synflow that zeroes A's "
            "scores too), so any mask would be arbitrary; prune after some training "
            "(sparsity.at: <step>, or schedule: gradual or iterative)"
            + (", or use criterion: magnitude or random" if criterion in criteria.DATA_CRITERIA or criterion == "synflow" else ", or use criterion: random")
        )
    ranked = {name: target for name, target in targets.items() if name not in left}
    for name, (module, tensor_name) in ranked.items():
        mask = get_mask(module, tensor_name)
        if mask is not None:
            scores[name][~mask.kept] = float("-inf")
    kept = kept_from_scores({name: scores[name] for name in ranked}, density, scope)
    for name, (module, tensor_name) in ranked.items():
        apply_mask(module, tensor_name, kept[name])
    return kept


# --------------------------------------------------------------------------------------------
# The hook (the recipe section is slimtune.features.sparsity).
# --------------------------------------------------------------------------------------------


class SparsityHook(Hook):
    name = "sparsity"

    def __init__(self, config: SparsitySection, model: nn.Module, delta: Any, targets: Targets):
        self.config = config
        self.model = model
        self.delta = delta
        self.targets = targets
        self.history: list[dict[str, Any]] = []
        self.pin = None
        self.movement: dict[str, torch.Tensor] = {}
        self.total_steps = 0
        self.large_sparse: dict[str, Any] | None = None
        #: The training data is private (DP): data criteria may score only the noised gradients.
        self.private = False
        #: Targets ranked (and masked) at some pruning step, and those the criterion could not
        #: rank at some step: ``left_dense`` in the report is the second minus the first.
        self.ranked: set[str] = set()
        self.unranked: set[str] = set()

    # -- when ---------------------------------------------------------------------------------
    def density_at(self, step: int) -> float | None:
        """The density to prune to after ``step`` (0 = before training), or None."""
        c = self.config
        if c.lock:
            return None  # the mask is the loaded zeros, set once (lock_pattern)
        if c.schedule == "one_shot":
            at = 0 if c.at == "init" else int(c.at)
            return c.density if step == at else None
        if c.schedule == "gradual":
            end = c.end_step or max(c.start_step + 1, int(0.75 * self.total_steps))
            if step < c.start_step or step > end:
                return None
            if (step - c.start_step) % c.frequency and step != end:
                return None
            return 1 - cubic_sparsity(step, c.initial_sparsity, 1 - c.density, c.start_step, end, c.frequency)
        steps = [round(k * self.total_steps / c.rounds) for k in range(c.rounds)]
        densities = iterative_densities(c.density, c.rounds)
        return densities[steps.index(step)] if step in steps else None

    # -- events -------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer
        self.total_steps = trainer.total_steps
        if self.pin is None:
            self.pin = pin_to_optimizer(self.model, trainer.optimizer)
        if not self.history:  # a resumed run has its masks back already (a lock: since it was built)
            self._maybe_prune(0)

    def on_before_optimizer_step(self, trainer) -> None:
        if self.config.criterion != "movement":
            return
        for name, (module, tensor_name) in self.targets.items():
            dense = dense_tensor(module, tensor_name)
            if dense.grad is not None:
                contribution = -(dense.grad.detach() * getattr(module, tensor_name).detach())
                self.movement[name] = self.movement.get(name, 0) + contribution

    def on_step_end(self, trainer) -> None:
        self._maybe_prune(trainer.step)

    def _maybe_prune(self, step: int) -> None:
        density = self.density_at(step)
        if density is None:
            return
        c = self.config
        scores = None
        if c.criterion == "movement" and self.movement and set(self.movement) == set(self.targets):
            scores = self.movement
        if c.criterion in criteria.DATA_CRITERIA and scores is None and self.private:
            # No noised gradients to score since the last step (a skipped non-finite step, or
            # none yet): scoring raw batches would release training data outside ε.
            self.history.append({"step": step, "density": density, "skipped": "no noised gradients to score"})
            write(f"sparsity: step {step}: {c.criterion} has no noised gradients to score (the training data is private); this pruning step is skipped")
            return
        batches = self._batches() if c.criterion in criteria.DATA_CRITERIA and scores is None else None
        was_training = self.model.training
        self.model.eval()  # scoring without dropout
        when = "at initialisation (step 0)" if step == 0 else f"at step {step}"
        try:
            if self.large_sparse is not None and density < 1:
                scores = self._all_rankable(scores, batches, step, when)
            kept = prune(self.model, self.targets, criterion=c.criterion, density=density, scope=c.scope, batches=batches, seed=c.seed + step, scores=scores, when=when)
        finally:
            self.model.train(was_training)
        self.movement = {}
        entry = {"step": step, "density": density, "measured": self.measured_density()}
        if density < 1:
            self.ranked |= set(kept)
        left = [name for name in self.targets if name not in kept]
        if left:
            self.unranked |= set(left)
            entry["left_dense"] = left
            entry["ranked_density"] = self.measured_density(kept)
            if getattr(getattr(self.trainer, "accelerator", None), "is_main_process", True):
                write(f"sparsity: {c.criterion} cannot rank {len(left)} of {len(self.targets)} target tensors {when}, all their scores being equal "
                      f"({_by_leaf(left)}); this step leaves them unpruned and prunes the other {len(kept)} to density {density:.3g}")
        # A global ranking can empty a whole tensor (a barely trained factor of a product delta,
        # FacT's V or LoRA's B early on): that factor then zeroes its whole update. Said, not hidden.
        emptied = [name for name, mask in kept.items() if not bool(mask.any())]
        if emptied:
            entry["emptied"] = emptied
            if getattr(getattr(self.trainer, "accelerator", None), "is_main_process", True):
                write(f"sparsity: {c.scope} {c.criterion} pruning {when} removed every entry of {len(emptied)} tensor(s) ({_by_leaf(emptied)}), "
                      "so the updates they factor are now zero; scope: local keeps part of each tensor")
        self.history.append(entry)

    def lock_pattern(self) -> None:
        """Pattern lock (IntelLabs/Model-Compression-Research-Package
        ``pruning/methods/pattern_lock.py``: the mask is ``weight != 0`` of the loaded model, set
        once, when the run is built): every target's zeros are masked, so they stay zero through
        the optimizer, and a linear update on them acts (and merges) masked."""
        for module, tensor_name in self.targets.values():
            apply_mask(module, tensor_name, dense_tensor(module, tensor_name).detach() != 0)
        self.history.append({"step": 0, "locked": True, "measured": self.measured_density()})

    def _all_rankable(self, scores, batches, step: int, when: str) -> dict[str, torch.Tensor]:
        """The scores, when the criterion can rank every target; Large-Sparse needs that, since
        its widened delta meets the dense budget only if every target is pruned to the density."""
        c = self.config
        if scores is None:
            scores = criteria.score(c.criterion, self.model, self.targets, batches=batches, seed=c.seed + step)
        left = unrankable(scores, self.targets)
        if left:
            raise SlimtuneError(
                f"sparsity.large_sparse: '{c.criterion}' cannot rank {_by_leaf(left)} {when}, all their scores being equal, so the widened delta "
                "would keep them dense and exceed the dense method's non-zero budget; prune after some training (sparsity.at: <step>, "
                "or schedule: gradual or iterative) or use criterion: random"
            )
        return scores

    def _batches(self) -> list[dict[str, torch.Tensor]]:
        trainer = self.trainer
        n_rows = len(trainer.rows["train"])
        if n_rows == 0:
            raise SlimtuneError(f"sparsity.criterion: '{self.config.criterion}' needs training data, and the task has none")
        gen = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(n_rows, generator=gen).tolist()
        size = trainer.cfg.batch_size
        out = []
        for b in range(self.config.batches):
            indices = order[b * size: (b + 1) * size]
            if not indices:
                break
            out.append(trainer.batch("train", indices))
        return out

    # -- what it did --------------------------------------------------------------------------
    def measured_density(self, names: Any = None) -> float:
        """Kept fraction over the target tensors (or those of ``names``); unmasked ones count as kept."""
        kept = total = 0
        for name, (module, tensor_name) in self.targets.items():
            if names is not None and name not in names:
                continue
            mask = get_mask(module, tensor_name)
            n = getattr(module, tensor_name).numel()
            kept += int(mask.kept.sum()) if mask is not None else n
            total += n
        return kept / total if total else 1.0

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        rows = [("sparsity", f"delta density {section.get('delta_density', 1.0):.3f}, weight density {section.get('weight_density', 1.0):.3f}")]
        left = section.get("left_dense")
        if left:
            criterion = section.get("config", {}).get("criterion", "the criterion")
            rows.append(("sparsity: left dense", f"{_by_leaf(left)} ({criterion} could not rank them); the {section.get('ranked_tensors', 0)} ranked "
                                                 f"tensors at density {section.get('ranked_density', 1.0):.3f}, all {section.get('target_tensors', 0)} targets at {section.get('target_density', 1.0):.3f}"))
        return rows

    def report(self) -> dict[str, Any]:
        out = sparsity_report(self.model, self.delta, config=self.config.model_dump(), history=self.history)
        left = sorted(self.unranked - self.ranked)
        if left:
            # The density asked for holds over the ranked tensors only; say so, and over all targets.
            out["left_dense"] = left
            out["ranked_tensors"] = len(self.targets) - len(left)
            out["ranked_density"] = self.measured_density(set(self.targets) - set(left))
            out["target_tensors"] = len(self.targets)
            out["target_density"] = self.measured_density()
        if self.large_sparse is not None:
            out["large_sparse"] = self.large_sparse
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "ranked": sorted(self.ranked), "unranked": sorted(self.unranked)}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {name: mask.kept for name, _, _, mask in masked_tensors(self.model) if name in self.targets}

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        from slimtune.sparsity.storage import restore_masks

        self.history = list(state.get("history", []))
        self.ranked = set(state.get("ranked", []))
        self.unranked = set(state.get("unranked", []))
        restore_masks(self.model, {k: v.to(torch.bool) for k, v in tensors.items()})


def _by_leaf(names: list[str]) -> str:
    """``4 x lora_B, 2 x up_weight``: tensor names grouped by their last component."""
    counts: dict[str, int] = {}
    for name in names:
        leaf = name.rpartition(".")[2]
        counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{n} x {leaf}" for leaf, n in counts.items())


def _nonzero(t: torch.Tensor) -> int:
    return int((t.detach() != 0).sum())


def sparsity_report(model: nn.Module, delta: Any, config: dict[str, Any] | None = None, history: list | None = None) -> dict[str, Any]:
    """report.json's ``sparsity`` section: density of the delta (non-zero trainable entries /
    all), of the backbone's linear weights, and per masked tensor."""
    out: dict[str, Any] = {}
    if config is not None:
        out["config"] = config
    if delta is not None:
        head = set(delta.head_names)
        params = {clean_name(n): p for n, p in delta.trainable_parameters(model).items() if clean_name(n) not in head}
        nnz = total = 0
        for name in params:
            module, tensor_name = _resolve(model, name)
            value = getattr(module, tensor_name)
            nnz += _nonzero(value)
            total += value.numel()
        out["delta_density"] = nnz / total if total else 1.0
        out["delta_nonzero"] = nnz
        out["delta_total"] = total
    w_nnz = w_total = 0
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module_name.split(".")[-1] not in OUTPUT_HEAD_NAMES and not module_name.startswith(OUTPUT_HEAD_NAMES):
            w = module.weight
            w_nnz += _nonzero(w)
            w_total += w.numel()
    out["weight_density"] = w_nnz / w_total if w_total else 1.0
    per_layer: dict[str, float] = {}
    for name, _, _, mask in masked_tensors(model):
        per_layer[name] = float(mask.kept.float().mean())
    out["per_layer"] = per_layer
    if history is not None:
        out["history"] = history
    return out
