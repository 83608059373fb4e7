"""The ``tickets`` recipe section: lottery tickets by iterative magnitude pruning with rewinding
(``mode: imp``, Chen et al. 2020; :mod:`slimtune.sparsity.tickets`) or searched by hard-concrete
gates, with an adversarial loss (``mode: robust``, Zheng et al. 2022) or without it (``mode:
plain``, the control); :mod:`slimtune.train.ticket_search`."""

from __future__ import annotations

from typing import Literal

import math

from pydantic import Field, field_validator, model_validator

from slimtune.core.features import Feature, Section, register_feature
from slimtune.errors import SlimtuneError
from slimtune.sparsity.schedules import iterative_densities, select_targets
from slimtune.sparsity.tickets import TicketsHook, parse_rewind
from slimtune.train.ticket_search import TicketSearchHook


class SearchSettings(Section):
    """The gate search (official ``search_ticket.py`` defaults; ``l0`` 0.5 as its scripts)."""

    lr: float = Field(0.1, gt=0, description="AdamW learning rate of the gates' log-alpha")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay of the gates")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warm-up of the search's schedule, fraction of the search steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gates' task-loss gradient to this norm before the L0 term (null: no clipping)")
    l0: float = Field(0.5, description="weight of the expected-L0 penalty after its warm-up (official lambda_amp x lambda_final; >= 0)")
    l0_start: float = Field(0.1, ge=0, le=1, description="fraction of the search steps with no L0 penalty")
    l0_warmup: float = Field(0.3, ge=0, le=1, description="fraction of the search steps over which the penalty ramps linearly to l0")
    granularity: Literal["weight", "row", "column"] = Field("weight", description="one gate per weight (official), per output row or per input column")
    keep_prob: float = Field(0.9, gt=0, lt=1, description="the gates' test-time value at initialisation (official mask_p)")
    beta: float = Field(2 / 3, gt=0, description="hard-concrete temperature")

    @field_validator("l0")
    @classmethod
    def _l0(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"tickets.search.l0: {value} is negative; the L0 weight must be >= 0 (official 0.5)")
        return value


class AdversarySettings(Section):
    """FreeLB on the word embeddings during the search (``mode: robust``)."""

    steps: int = Field(5, ge=1, description="forward/backward passes per batch (official adv_steps: 5 in the paper's scripts)")
    step_size: float = Field(0.03, gt=0, description="L2 ascent step (official adv_lr)")
    init_radius: float = Field(0.05, ge=0, description="size of the random start (official adv_init_mag)")
    max_norm: float = Field(0.0, ge=0, description="L2 bound of the perturbation per example; 0 = unbounded (official)")


_SEARCH_ONLY = ("phases", "search", "adversary", "from_scores")
_IMP_ONLY = ("rounds", "rate")


@register_feature
class TicketsSection(Feature):
    """IMP: train -> prune by magnitude -> rewind -> retrain, ``rounds`` times, then train the
    ticket; or robust/plain: fine-tune -> search gates -> draw the ticket -> rewind and retrain."""

    section = "tickets"
    refuses_restructuring = "would discard or cut the ticket's masks (it merges and prunes the weights); use one of the two"

    mode: Literal["imp", "robust", "plain"] = Field("imp", description="imp: iterative magnitude pruning with rewinding (Chen et al. 2020); robust: hard-concrete gate search on adversarial examples (Zheng et al. 2022); plain: the same search on clean inputs (the control)")
    density: float = Field(..., description="fraction of the target weights KEPT in the final ticket, in (0, 1]")
    rounds: int = Field(3, description="prune -> rewind -> retrain rounds (>= 1); round k prunes to density^(k / rounds)")
    rate: float | None = Field(None, description="instead of rounds: the fraction of the remaining target weights each round removes, in (0, 1); rounds = ceil(log density / log(1 - rate)), the last round pruning to density")
    scope: Literal["global", "local"] = Field("global", description="rank all target tensors together (global, as the official code) or each on its own (local)")
    rewind: str = Field("pretrained", description="rewinding point: 'pretrained' (the values before training) or 'step:K' (their values after step K)")
    target: Literal["base", "delta"] = Field("base", description="what to prune: 'base' (the backbone's linear weights) or 'delta' (the methods' weight tensors)")
    init: Literal["rewind", "random"] = Field("rewind", description="the ticket's target weights before its training: rewound (to `rewind`), or randomly re-initialised with the model's initializer (the rethinking-pruning control; target base only)")
    phases: list[float] = Field([0.1, 0.6, 0.3], description="robust/plain: fractions of the training steps for fine-tuning, the gate search and retraining the ticket (sum 1; official 3 : 20 : 10 epochs)")
    search: SearchSettings = Field(default_factory=SearchSettings, description="robust/plain: the gate search")
    adversary: AdversarySettings | None = Field(None, description="robust: FreeLB during the search (defaults when omitted)")
    from_scores: str | None = Field(None, description="robust/plain: a finished search run's directory; draw the ticket from its saved gate scores and retrain for the whole run")

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

    @field_validator("phases")
    @classmethod
    def _phases(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or any(not 0 <= v <= 1 for v in value) or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"tickets.phases: {value} is not three fractions in [0, 1] summing to 1 (fine-tune, search, retrain)")
        return value

    @model_validator(mode="after")
    def _mode_fields(self) -> TicketsSection:
        # Set away from its default (a saved recipe.yaml holds every field, defaults included).
        given = {f for f in self.model_fields_set if getattr(self, f) != self.model_fields[f].get_default(call_default_factory=True)}
        if self.mode == "imp":
            wrong = [f for f in _SEARCH_ONLY if f in given]
            if wrong:
                raise ValueError(f"tickets.{wrong[0]}: only for mode robust or plain (this section is mode imp)")
        else:
            wrong = [f for f in _IMP_ONLY if f in given]
            if wrong:
                raise ValueError(f"tickets.{wrong[0]}: only for mode imp (a {self.mode} search draws its ticket once)")
            if self.mode == "plain" and self.adversary is not None:
                raise ValueError("tickets.adversary: mode plain is the search without the adversarial term; use mode robust")
            if self.mode == "robust" and self.adversary is None:
                object.__setattr__(self, "adversary", AdversarySettings())
        if self.init == "random" and self.target != "base":
            raise ValueError("tickets.init: random re-initialises base weights; with target delta, rewind: pretrained already restores the methods' initialisation")
        return self

    @model_validator(mode="after")
    def _rate(self) -> TicketsSection:
        if self.rate is None:
            return self
        if not 0 < self.rate < 1:
            raise ValueError(f"tickets.rate: {self.rate} is not in (0, 1); it is the fraction of the remaining weights each round removes")
        rounds = max(1, math.ceil(math.log(self.density) / math.log(1 - self.rate) - 1e-9)) if self.density < 1 else 1
        # A saved recipe.yaml holds the rounds that rate set; any other number is a conflict.
        if "rounds" in self.model_fields_set and self.rounds != rounds:
            raise ValueError("tickets: give rounds or rate, not both (rate sets the number of rounds)")
        object.__setattr__(self, "rounds", rounds)
        return self

    def densities(self) -> list[float]:
        """The density after each round: density^(k / rounds), or with ``rate`` (1 - rate)^k,
        the last round at density."""
        if self.mode != "imp":
            return [self.density]
        if self.rate is None:
            return iterative_densities(self.density, self.rounds)
        return [max(self.density, (1 - self.rate) ** k) for k in range(1, self.rounds)] + [self.density]

    def build_hook(self, *, recipe, model, delta, task, models=None) -> TicketsHook:
        features = getattr(recipe, "features", {}) or {}
        if "sparsity" in features:
            raise SlimtuneError("tickets: the sparsity section masks the same weights on its own schedule; use tickets or sparsity, not both")
        targets = select_targets(model, delta, self.target)
        if self.mode == "imp":
            return TicketsHook(self, model, delta, targets)
        if "privacy" in features:
            raise SlimtuneError(f"tickets.mode: a {self.mode} search trains hard-concrete gates by its own backward pass, outside DP-SGD's per-sample clipping; use mode imp with privacy")
        return TicketSearchHook(self, model, delta, targets)
