"""The ``robustness`` recipe section: attack the trained model on the test split at the end of the
run, as ``slimtune eval RUN --attack`` does, and put the results in report.json and on the report
card (the attacks: :mod:`slimtune.measure.attacks`; the section and its hook:
:mod:`slimtune.measure.robustness`).

::

    robustness:
      attacks: [pgd, {name: pgd, radius: 0.1}, {name: substitution, max_change: 0.2}]
      examples: 200     # the first 200 test examples (default: all)
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_serializer, model_validator

from slimtune.core.features import Feature, Section, register_feature
from slimtune.errors import SlimtuneError
from slimtune.measure.attacks import ATTACK_FIELDS, ATTACKS, AttackConfig, check_attackable, check_inputs_embeds
from slimtune.measure.robustness import RobustnessHook

_DEFAULTS = AttackConfig("pgd")


class AttackSpec(Section):
    """One attack: its name (``pgd`` or ``substitution``, alone or as ``{name: ..., settings}``)
    and the settings that apply to it, with the defaults of ``slimtune eval --attack``."""

    name: str = Field(..., description=f"the attack: {', '.join(ATTACKS)}")
    radius: float = Field(_DEFAULTS.radius, description="pgd: L2 budget per example (--attack-radius)")
    steps: int = Field(_DEFAULTS.steps, description="pgd: updates (--attack-steps)")
    step_size: float = Field(_DEFAULTS.step_size, description="pgd: step size of each update (--attack-step-size)")
    init_radius: float = Field(_DEFAULTS.init_radius, description="pgd: scale of the random start (--attack-init-radius; the official adv_init_mag)")
    max_change: float = Field(_DEFAULTS.max_change, description="substitution: fraction of the words that may change (--attack-max-change)")
    candidates: int = Field(_DEFAULTS.candidates, description="substitution: nearest neighbours tried per word (--attack-candidates)")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> AttackSpec:
        if self.name not in ATTACKS:
            raise ValueError(f"name: unknown attack '{self.name}'; valid: {', '.join(ATTACKS)}")
        own = ATTACK_FIELDS[self.name]
        other = sorted(f for f in self.model_fields_set if f != "name" and f not in own)
        if other:
            raise ValueError(f"{other[0]}: not a {self.name} setting; {self.name} takes {', '.join(f for f in own if f != 'seed')}")
        try:
            self.config().check(flag=lambda field: field)
        except SlimtuneError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_serializer(mode="wrap")
    def _own_settings(self, handler) -> dict[str, Any]:
        """recipe.yaml lists the settings of this attack only (the others would be refused on reading)."""
        return {k: v for k, v in handler(self).items() if k == "name" or k in ATTACK_FIELDS.get(self.name, ())}

    def config(self, examples: int | None = None, seed: int = 0) -> AttackConfig:
        return AttackConfig(self.name, radius=self.radius, steps=self.steps, step_size=self.step_size, init_radius=self.init_radius,
                            max_change=self.max_change, candidates=self.candidates, examples=examples, seed=seed)


@register_feature
class RobustnessSection(Feature):
    """Accuracy under attack of the trained model (:mod:`slimtune.measure.attacks`), at the end of the run."""

    section = "robustness"

    attacks: list[AttackSpec] = Field(..., description="the attacks, each a name (pgd, substitution) or {name: ..., settings}: "
                                      "pgd radius, steps, step_size, init_radius; substitution max_change, candidates; the defaults of `slimtune eval --attack`")
    examples: int | None = Field(None, ge=1, description="attack only the first N test examples (default: all; attacks are slow on CPU)")
    seed: int = Field(0, description="seed of the pgd start")

    @field_validator("attacks")
    @classmethod
    def _some(cls, value: list[AttackSpec]) -> list[AttackSpec]:
        if not value:
            raise ValueError("give at least one attack, e.g. attacks: [pgd]")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> RobustnessSection:
        keys = [c.key for c in self.configs()]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise ValueError(f"attacks.{i} repeats attacks.{keys.index(key)} ({key})")
        return self

    def configs(self) -> list[AttackConfig]:
        return [spec.config(self.examples, self.seed) for spec in self.attacks]

    def build_hook(self, *, recipe, model, delta, task, models=None) -> RobustnessHook:
        # Refused now, not after training: what cannot be attacked.
        check_attackable(recipe.objective, task, where="robustness")
        if any(c.name == "pgd" for c in self.configs()):
            check_inputs_embeds(model, where="robustness: pgd")
        return RobustnessHook(self.configs())
