"""The ``tickets`` recipe section: lottery tickets by iterative magnitude pruning with rewinding
(Chen et al. 2020; the machinery: :mod:`slimtune.sparsity.tickets`)."""

from __future__ import annotations

from typing import Literal

import math

from pydantic import Field, field_validator, model_validator

from slimtune.core.features import Feature, register_feature
from slimtune.errors import SlimtuneError
from slimtune.sparsity.schedules import iterative_densities, select_targets
from slimtune.sparsity.tickets import TicketsHook, parse_rewind


@register_feature
class TicketsSection(Feature):
    """IMP: train -> prune by magnitude -> rewind -> retrain, ``rounds`` times, then train the ticket."""

    section = "tickets"
    refuses_restructuring = "would discard or cut the ticket's masks (it merges and prunes the weights); use one of the two"

    mode: Literal["imp"] = Field("imp", description="imp: iterative magnitude pruning with rewinding (Chen et al. 2020)")
    density: float = Field(..., description="fraction of the target weights KEPT in the final ticket, in (0, 1]")
    rounds: int = Field(3, description="prune -> rewind -> retrain rounds (>= 1); round k prunes to density^(k / rounds)")
    rate: float | None = Field(None, description="instead of rounds: the fraction of the remaining target weights each round removes, in (0, 1); rounds = ceil(log density / log(1 - rate)), the last round pruning to density")
    scope: Literal["global", "local"] = Field("global", description="rank all target tensors together (global, as the official code) or each on its own (local)")
    rewind: str = Field("pretrained", description="rewinding point: 'pretrained' (the values before training) or 'step:K' (their values after step K)")
    target: Literal["base", "delta"] = Field("base", description="what to prune: 'base' (the backbone's linear weights) or 'delta' (the methods' weight tensors)")

    @field_validator("density")
    @classmethod
    def _density(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"tickets.density: {value} is not in (0, 1]; density is the fraction KEPT")
        return value

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"tickets.rounds: {value} is not a number of rounds; give an integer >= 1")
        return value

    @field_validator("rewind")
    @classmethod
    def _rewind(cls, value: str) -> str:
        try:
            parse_rewind(value)
        except SlimtuneError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _rate(self) -> TicketsSection:
        if self.rate is None:
            return self
        if not 0 < self.rate < 1:
            raise ValueError(f"tickets.rate: {self.rate} is not in (0, 1); it is the fraction of the remaining weights each round removes")
        if "rounds" in self.model_fields_set:
            raise ValueError("tickets: give rounds or rate, not both (rate sets the number of rounds)")
        rounds = max(1, math.ceil(math.log(self.density) / math.log(1 - self.rate) - 1e-9)) if self.density < 1 else 1
        object.__setattr__(self, "rounds", rounds)
        return self

    def densities(self) -> list[float]:
        """The density after each round: density^(k / rounds), or with ``rate`` (1 - rate)^k,
        the last round at density."""
        if self.rate is None:
            return iterative_densities(self.density, self.rounds)
        return [max(self.density, (1 - self.rate) ** k) for k in range(1, self.rounds)] + [self.density]

    def build_hook(self, *, recipe, model, delta, task) -> TicketsHook:
        features = getattr(recipe, "features", {}) or {}
        if "sparsity" in features:
            raise SlimtuneError("tickets: the sparsity section masks the same weights on its own schedule; use tickets or sparsity, not both")
        return TicketsHook(self, model, delta, select_targets(model, delta, self.target))
