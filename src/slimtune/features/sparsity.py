"""The ``sparsity`` recipe section: masks on the delta (SparseAdapter) or the backbone, one-shot,
gradual or iterative (the machinery: :mod:`slimtune.sparsity`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from slimtune.core.features import Feature, register_feature
from slimtune.errors import SlimtuneError
from slimtune.sparsity import criteria
from slimtune.sparsity.masks import dense_tensor
from slimtune.sparsity.schedules import SparsityHook, large_sparse_specs, select_targets


@register_feature
class SparsitySection(Feature):
    """Masks on the delta or the base, on a schedule (:mod:`slimtune.sparsity.schedules`)."""

    section = "sparsity"
    refuses_restructuring = "would discard or cut this section's masks (it merges and prunes the weights); use one of the two"

    target: Literal["delta", "base"] = Field("delta", description="what to prune: 'delta' (the weights the methods train: adapters, LoRA factors, ...) or 'base' (the backbone's linear weights)")
    include: list[str] | None = Field(None, description="optional tensor-name patterns (suffix or 're:') narrowing the target")
    criterion: str = Field("magnitude", description=f"score: {', '.join(criteria.CRITERIA)} (snip, grasp, movement, wanda need data)")
    scope: Literal["global", "local", "row"] = Field("global", description="rank all target tensors together (global), each tensor on its own (local), or within each output row of each tensor (row: Wanda's comparison group)")
    density: float | None = Field(None, description="fraction of entries KEPT at the end, in (0, 1]")
    sparsity: float | None = Field(None, description="alias: 1 - density (fraction removed)")
    schedule: Literal["one_shot", "gradual", "iterative"] = Field("one_shot", description="one_shot (once, at 'at'), gradual (Zhu & Gupta cubic), iterative (prune -> retrain rounds)")
    at: Literal["init"] | int = Field("init", description="one_shot: 'init' (before the first step) or a step number")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="gradual: sparsity s_i at start_step")
    start_step: int = Field(0, ge=0, description="gradual: first pruning step t0")
    end_step: int | None = Field(None, ge=1, description="gradual: last pruning step (default: 3/4 of training)")
    frequency: int = Field(10, ge=1, description="gradual: steps between pruning steps")
    rounds: int = Field(3, ge=1, description="iterative: prune -> retrain rounds")
    batches: int = Field(4, ge=1, description="batches of the training split scored by data criteria (snip, grasp, movement)")
    seed: int = Field(0, ge=0, description="seed of the random criterion and of the scoring batches")
    lock: bool = Field(False, description="pattern lock (Prune Once for All's sparse transfer): keep the zeros the loaded model has in every target "
                       "weight at zero and train the rest; no density, schedule or criterion (the model's zeros are the mask); target defaults to base")
    large_sparse: bool = Field(False, description="Large-Sparse (He et al. 2022): widen the adapter (houlsby, pfeiffer) or LoRA rank so that its non-zeros at this density equal the dense method's parameters (target: delta only). LoRA: r becomes r / density and alpha is kept, so the update scale alpha / r shrinks by the density (raise alpha to keep it); train_a: false (FFA-LoRA, A frozen and unpruned) is refused")

    @model_validator(mode="after")
    def _density(self) -> SparsitySection:
        if self.lock:
            # Compared with the defaults, not by being set: a saved recipe.yaml spells out every field.
            given = [f for f in ("density", "sparsity", "schedule", "at", "criterion", "scope", "initial_sparsity", "start_step",
                                 "end_step", "frequency", "rounds", "large_sparse") if getattr(self, f) != type(self).model_fields[f].default]
            if given:
                raise ValueError(f"sparsity.lock keeps the loaded model's zeros, so '{given[0]}' has no meaning with it; drop it "
                                 "(the density is the model's)")
            if "target" not in self.model_fields_set:
                object.__setattr__(self, "target", "base")
            return self
        if self.density is None and self.sparsity is None:
            raise ValueError("give sparsity.density (fraction kept, in (0, 1]) or sparsity.sparsity (= 1 - density)")
        if self.sparsity is not None:
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"sparsity.sparsity: {self.sparsity} is not in [0, 1) (it is 1 - density)")
            implied = 1 - self.sparsity
            if self.density is not None and abs(self.density - implied) > 1e-9:
                raise ValueError(f"density {self.density} and sparsity {self.sparsity} disagree (density = 1 - sparsity)")
            object.__setattr__(self, "density", implied)
        if not 0 < self.density <= 1:
            raise ValueError(f"density {self.density} is not in (0, 1]; density is the fraction KEPT")
        if self.criterion not in criteria.CRITERIA:
            raise ValueError(f"unknown criterion '{self.criterion}'; valid: {', '.join(criteria.CRITERIA)}")
        if self.large_sparse and self.target != "delta":
            raise ValueError(f"large_sparse widens the trained delta; it needs target: delta, not '{self.target}'")
        if self.large_sparse and self.include:
            raise ValueError("large_sparse keeps the dense budget only when every delta weight is pruned; drop include")
        if self.initial_sparsity > 1 - self.density:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity {1 - self.density:.4g}")
        return self

    def adjust_methods(self, specs: list[Any], model: nn.Module) -> list[Any]:
        """Called by the runner before the delta is built: Large-Sparse widens the methods."""
        if not self.large_sparse:
            return specs
        return large_sparse_specs(specs, int(model.config.hidden_size), self.density)[0]

    def first_prunes_before_training(self) -> bool:
        """Whether a pruning step falls at step 0, before any (noised) gradient exists."""
        if self.lock:
            return True
        if self.schedule == "one_shot":
            return self.at == "init" or self.at == 0
        if self.schedule == "gradual":
            return self.start_step == 0 and self.initial_sparsity > 0
        return True  # iterative: its first round prunes at step 0

    def build_hook(self, *, recipe, model, delta, task, models=None) -> SparsityHook:
        private = [f.section for f in getattr(recipe, "features", {}).values() if f.private_training_data]
        if private and self.criterion in criteria.DATA_CRITERIA and (self.criterion != "movement" or self.first_prunes_before_training()):
            why = ("scores batches of the training data without noise" if self.criterion != "movement"
                   else "has no noised gradients to score at step 0, so it would score raw training batches")
            raise SlimtuneError(
                f"sparsity.criterion: '{self.criterion}' {why}, which {private[0]} keeps private (the release would not be "
                "in ε); with privacy use magnitude, random or synflow, or movement after step 0 (it then scores the noised gradients)"
            )
        if self.criterion in criteria.DATA_CRITERIA:
            train = getattr(task, "splits", {}).get("train") if task is not None else None
            if train is None or len(train) == 0:
                raise SlimtuneError(f"sparsity.criterion: '{self.criterion}' needs training data, and the task has none; use random, magnitude or synflow")
        targets = select_targets(model, delta, self.target, self.include)
        if private and self.criterion == "movement":
            frozen = [n for n, (module, tensor) in targets.items() if not dense_tensor(module, tensor).requires_grad]
            if frozen:
                raise SlimtuneError(
                    f"sparsity.criterion: 'movement' on '{frozen[0]}', which does not train, would score raw training batches, "
                    f"which {private[0]} keeps private; with privacy prune it by magnitude, random or synflow"
                )
        if self.lock:
            zeros = sum(int((dense_tensor(m, t) == 0).sum()) for m, t in targets.values())
            if not zeros:
                total = sum(dense_tensor(m, t).numel() for m, t in targets.values())
                raise SlimtuneError(f"sparsity.lock: {recipe.model.name} has no zero in its {len(targets)} target weights ({total:,} entries), "
                                    "so there is no pattern to lock; load a sparse model (model.name: a sparse model directory) or prune "
                                    "with sparsity.density instead")
        hook = SparsityHook(self, model, delta, targets)
        hook.private = bool(private)
        if self.lock:
            # Masked when the run is built, not when it starts training: a run loaded back (eval,
            # export) has its lock too, so a delta on the locked weights acts and merges masked.
            hook.lock_pattern()
        if self.large_sparse:
            hook.large_sparse = large_sparse_specs(recipe.methods, int(model.config.hidden_size), self.density)[1]
        return hook
