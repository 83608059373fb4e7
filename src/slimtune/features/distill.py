"""The ``distill`` recipe section: train the run's model against a frozen teacher (logits KD with
temperature, hidden-state and attention distillation; the machinery: :mod:`slimtune.compress.distill`).

```yaml
distill: {teacher: runs/dense-teacher, alpha_ce: 0.5, alpha_kd: 0.5, temperature: 2}
```

With ``task.objective: lm`` or ``mlm`` the KD is token-level (the teacher a causal or masked LM of
the same tokenizer; a masked LM's over its masked positions);
with ``task.objective: features`` (a bare encoder, no head) the loss is hidden/attention
distillation alone: alpha_ce and alpha_kd default to 0 there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimtune.compress.distill import DistillHook
from slimtune.core.features import AuxiliaryModel, Feature, register_feature
from slimtune.errors import SlimtuneError


@register_feature
class DistillSection(Feature):
    """Knowledge distillation from ``teacher`` (defaults: Prune Once for All's, alpha_ce =
    alpha_kd = 0.5, T = 2)."""

    section = "distill"

    teacher: str = Field(description="the teacher: a run directory or a `slimtune export` directory of the same task (logits KD), "
                         "or a zoo model name / model directory (no task head: hidden/attention distillation only)")
    alpha_ce: float | None = Field(None, ge=0, description="weight of the student's own task loss (cross-entropy with the labels); "
                                   "default 0.5, and 0 with task.objective features")
    alpha_kd: float | None = Field(None, ge=0, description="weight of the logits KD loss T^2 KL(teacher || student) at temperature T; "
                                   "default 0.5, and 0 with task.objective features")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the logits KD loss")
    hidden: float = Field(0.0, ge=0, description="weight of the hidden-state MSE (embeddings + mapped layers; equal widths)")
    attention: float = Field(0.0, ge=0, description="weight of the attention-distribution KL of the mapped layers (same heads; runs eager attention)")
    layers: Literal["uniform"] | list[int] = Field(
        "uniform", description="student layer -> teacher layer for hidden/attention: 'uniform' (m -> m N/M) or one teacher layer (1-based) per student layer")

    def model_post_init(self, context) -> None:
        if self.alpha_ce == 0 and self.alpha_kd == 0 and not (self.hidden or self.attention):
            raise SlimtuneError("distill: every loss weight (alpha_ce, alpha_kd, hidden, attention) is 0; give at least one")

    def check_methods(self, delta) -> None:
        """Hidden/attention distillation pairs tensors by shape, which a method that prunes heads
        or neurons mid-run (DSEE's stage 2) would change; logits KD works with it."""
        if self.hidden or self.attention:
            for method in delta.methods:
                if reason := method.restructuring_reason:
                    raise SlimtuneError(f"distill: method '{method.name}' restructures the model during training ({reason}), which would "
                                        "change the shapes hidden/attention distillation compares; use logits KD alone (hidden: 0, attention: 0)")

    def auxiliary_models(self) -> dict[str, str]:
        return {"teacher": self.teacher}

    def build_hook(self, *, recipe, model, delta, task, models=None) -> DistillHook:
        alpha_ce, alpha_kd = (0.5 if weight is None else weight for weight in (self.alpha_ce, self.alpha_kd))
        if recipe.objective == "features":
            given = [f"{k} {getattr(self, k):g}" for k in ("alpha_ce", "alpha_kd") if getattr(self, k)]
            if given:
                raise SlimtuneError(f"distill: {given[0]} with task.objective features, whose model has no head (no task loss, no logits); "
                                    "set it to 0 and distil hidden states/attention")
            if not (self.hidden or self.attention):
                raise SlimtuneError("distill: task.objective features trains on hidden/attention distillation alone; give hidden or attention > 0")
            alpha_ce = alpha_kd = 0.0
        for other, why in (("privacy", "DP-SGD computes per-example gradients of the task loss alone"),
                           ("tickets", "a ticket search computes its own loss")):
            if other in recipe.features and (other != "tickets" or recipe.features[other].mode != "imp"):
                raise SlimtuneError(f"distill: cannot be combined with {other} ({why}); use one of the two")
        teacher: AuxiliaryModel = models["teacher"]
        if alpha_kd and recipe.objective == "classification":
            if teacher.labels is None:
                raise SlimtuneError(f"distill.teacher {self.teacher}: a {teacher.kind} has no task head, so logits KD has no teacher "
                                    "logits; give a run or export of this task, or set alpha_kd: 0 and distil hidden states/attention")
            labels = list(task.label_names)
            if teacher.labels != labels:
                raise SlimtuneError(f"distill.teacher {self.teacher}: its labels ({', '.join(teacher.labels)}) are not the task's "
                                    f"({', '.join(labels)}); logits KD needs a teacher of the same task")
        return DistillHook(teacher.model, source=self.teacher, kind=teacher.kind, alpha_ce=alpha_ce, alpha_kd=alpha_kd,
                           temperature=self.temperature, hidden=self.hidden, attention=self.attention, layers=self.layers, student=model,
                           objective=recipe.objective)
