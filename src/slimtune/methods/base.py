"""The Method protocol and the registry (architecture facts and target addressing: :mod:`slimtune.core.arch`).

A *method* decides what trains. Methods differ in shape (per-layer wrappers, inserted modules,
shared parameter groups, side networks, input-level prompts, selectors of base parameters), yet
every one answers the same questions, so the trainer never needs to know a method by name:

- ``attach(model, arch)``: change the model in place (wrap, insert, register shared containers,
  or only pick base parameters). Base weights are frozen and never copied.
- ``trainable_parameters(model)``: ``{name: Parameter}`` with names as in ``model.named_parameters()``.
- ``stored_parameters(model)``: what the delta file holds — the trainable parameters plus any
  frozen tensor the update needs that the base model lacks (e.g. FFA-LoRA's fixed A).
- ``delta_state_dict(model)`` / ``load_delta_state_dict(model, state)``: all that is saved.
- ``merge(model)`` / ``unmerge(model)`` for linear updates (``mergeable = True``); unmerge is exact.
- ``param_count(model)`` and, where the paper gives one, ``expected_param_count(model)``.
- ``claims(model)``: the module/parameter names it wraps or trains, so that two methods in one
  recipe can be checked for conflicts.
- ``hooks()``: trainer hooks the method needs (e.g. a pruning phase), usually none.
- ``alone_reason``: why the method means nothing beside another (the linear probe), or None.
- ``restructuring_reason``: why the method changes the model's structure mid-training (DSEE's
  stage 2), or None; features that fix modules or gradients at the start refuse such a method.

Registration is one decorator line: ``@register`` on the class, whose ``name`` is the recipe key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from slimtune.core.arch import Arch
from slimtune.core.features import add_to_registry, import_all
from slimtune.errors import SlimtuneError, did_you_mean

# --------------------------------------------------------------------------------------------
# The protocol.
# --------------------------------------------------------------------------------------------


class MethodConfig(BaseModel):
    """Base of every method's fields. Unknown fields are errors; each field has a description
    that ``slimtune list methods`` prints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf/nan never mean anything here


class Method(ABC):
    """A way to decide what trains. Subclasses set ``name``, ``description``, ``paper`` and
    ``Config``, implement ``attach`` and (if they add no parameters of their own) override
    ``trainable_parameters``."""

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    #: Trains base parameters themselves (selectors such as BitFit): the model is "merged" already.
    in_place: ClassVar[bool] = False

    #: Why the method means nothing beside another one (linear probe: every method trains the
    #: head already), or None; composing it is refused with this reason.
    alone_reason: ClassVar[str | None] = None

    #: Prefix of modules/parameters the method adds; its parameters are found by it.
    owned_marker: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | dict[str, Any] | None = None):
        if config is None:
            config = {}
        self.config = config if isinstance(config, MethodConfig) else self.Config(**config)
        self.merged = False

    # -- lifecycle --------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module, arch: Arch) -> None:
        """Change the model in place (wrap, insert, register shared parameters, or just pick base
        parameters). Every method implements it."""

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Default: every parameter whose name contains this method's ``owned_marker``."""
        if not self.owned_marker:
            raise TypeError(f"method class '{self.name}' sets no owned_marker: it must override trainable_parameters")
        return {n: p for n, p in model.named_parameters() if self.owned_marker in n}

    def claims(self, model: nn.Module) -> set[str]:
        """Names of base modules/parameters this method wraps or trains (for conflict checks)."""
        return set(self.trainable_parameters(model))

    def hooks(self) -> list[Any]:
        return []

    def learning_rate_factors(self, model: nn.Module) -> dict[str, float]:
        """Trainable parameters that learn at ``train.lr`` times a factor (e.g. FLOP's gates at
        3x, ``prune_lr``), by name; default none."""
        return {}

    @property
    def restructuring_reason(self) -> str | None:
        """Why this method merges, prunes or replaces modules during training (e.g. DSEE's stage
        2), or None: features built on the model as it is at the start (masks, DP-SGD's per-sample
        clipping) refuse such a method."""
        return None

    # -- the delta ----------------------------------------------------------------------------
    def stored_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What the delta file holds: the trainable parameters, plus any frozen tensor the update
        needs that the base model does not have (e.g. FFA-LoRA's fixed random A)."""
        return self.trainable_parameters(model)

    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.stored_parameters(model).items()}

    def load_delta_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = self.stored_parameters(model)
        missing = sorted(set(params) - set(state))
        if missing:
            raise SlimtuneError(f"{self.name}: delta lacks {len(missing)} tensors, e.g. '{missing[0]}'")
        with torch.no_grad():
            for name, param in params.items():
                if state[name].shape != param.shape:
                    raise SlimtuneError(
                        f"{self.name}: delta tensor '{name}' has shape {tuple(state[name].shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                param.copy_(state[name])

    # -- merging ------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        raise SlimtuneError(f"method '{self.name}' is not a linear update and cannot be merged")

    def unmerge(self, model: nn.Module) -> None:
        raise SlimtuneError(f"method '{self.name}' is not a linear update and cannot be unmerged")

    # -- accounting ---------------------------------------------------------------------------
    def param_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.trainable_parameters(model).values())

    def expected_param_count(self, model: nn.Module) -> int | None:
        """The paper's closed form for this model's shape, where the paper gives one."""
        return None

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config.model_dump().items())
        return f"{self.name}({fields})"


# --------------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------------

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to recipes under ``cls.name``."""
    return add_to_registry(METHODS, cls.name, cls, "method name")


def get_method_class(name: str) -> type[Method]:
    _load_all()
    if name not in METHODS:
        raise SlimtuneError(f"method.name: unknown method '{name}'{did_you_mean(name, METHODS)}")
    return METHODS[name]


def all_methods() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(METHODS.items()))


def _load_all() -> None:
    """Import every module of ``slimtune.methods`` once, so that each registers itself."""
    import_all("slimtune.methods")
