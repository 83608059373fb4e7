"""The ``privacy`` recipe section: DP-SGD for any method (the machinery: :mod:`slimtune.privacy`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimtune.core.features import Feature, register_feature
from slimtune.errors import SlimtuneError
from slimtune.privacy.engine import PrivacyHook
from slimtune.privacy.linear_probe import LinearProbeSection, probe_target


@register_feature
class PrivacySection(Feature):
    """DP-SGD on the trainable parameters of any method (:mod:`slimtune.privacy.engine`)."""

    section = "privacy"
    private_training_data = True
    # The per-sample clipper is built once on the modules present at the start, and data-driven
    # pruning scores would read raw, un-noised gradients the accounting ignores.
    refuses_restructuring = ("DP-SGD cannot follow (per-sample clipping is set up on the starting modules; pruning scores "
                             "would read un-noised gradients); use it without privacy")

    epsilon: float | None = Field(8.0, gt=0, description="privacy budget ε: the noise is calibrated to spend at most this over the planned steps; training stops rather than exceed it (null: no budget, give noise_multiplier)")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of (ε, δ)-DP; keep it well below 1 / (training examples)")
    max_grad_norm: float = Field(1.0, gt=0, description="clip each example's gradient (all trainable parameters together) to this L2 norm")
    noise_multiplier: float | None = Field(None, ge=0, description="σ: noise std = σ * max_grad_norm; default: calibrated to epsilon for the planned steps")
    accountant: Literal["prv", "rdp"] = Field("prv", description="privacy accountant (Opacus): prv (tight, default) or rdp")
    poisson: bool = Field(True, description="Poisson sampling (each example joins a step's batch with rate batch_size/N), as the accounting assumes; false: the trainer's shuffled fixed-size batches (ε then only approximate)")
    physical_batch_size: int = Field(32, ge=1, description="examples per forward/backward pass on each process (virtual batches: train.batch_size is the logical, expected batch)")
    ghost: Literal["auto", "always", "never"] = Field("auto", description="ghost norms for linear weights (norms without per-sample gradients): auto picks the cheaper per layer")
    seed: int | None = Field(None, description="seed of Poisson sampling and noise; null: a fresh secret seed per run (kept in checkpoints)")
    linear_probe: LinearProbeSection = Field(
        default_factory=LinearProbeSection,
        description="DP-LP-FT (Ke et al. 2024): first fit the task head privately on the frozen starting model's features, then DP fine-tune; e.g. {steps: 30, epsilon: 0.5}",
    )

    @model_validator(mode="after")
    def _budget_or_noise(self) -> PrivacySection:
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("give privacy.epsilon (a budget) or privacy.noise_multiplier (or both)")
        return self

    def build_hook(self, *, recipe, model, delta, task, models=None) -> PrivacyHook:
        if self.linear_probe.steps:
            probe_target(model, delta.head_names)  # fails now, with one line, when there is no head
            if self.epsilon is not None and self.linear_probe.epsilon >= self.epsilon:
                raise SlimtuneError(f"privacy.linear_probe.epsilon: {self.linear_probe.epsilon} must be below privacy.epsilon ({self.epsilon}), which also pays for fine-tuning")
        return PrivacyHook(self)
