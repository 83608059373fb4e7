"""The feature protocol: recipe sections beyond model/task/method/head/train/measure.

A *feature* (``privacy``, ``sparsity``, ``compress``, and the sections to come) is a validated
recipe section class that declares what it may do to a run; the runner calls these in this
order and names no feature:

1. ``adjust_methods(specs, model)``: rewrite the method specs before the delta is built
   (e.g. Large-Sparse widens an adapter); default: unchanged.
2. ``check_methods(delta)``: refuse methods the feature cannot work with; by default those that
   restructure the model mid-run (``Method.restructuring_reason``) when the feature sets
   ``refuses_restructuring`` (its reason), with one shared message.
3. ``auxiliary_models()``: other models the feature runs beside the trained one (a
   distillation teacher), by name; the runner loads each, frozen in eval mode, as an
   :class:`AuxiliaryModel` (refusing one whose tokenizer is not the run's); default none.
4. ``build_hook(recipe=, model=, delta=, task=, models=)``: the trainer hook that does the work,
   or None (``models``: the loaded auxiliary models); other refusals of incompatible
   combinations happen here, as one-line ``SlimtuneError``s.
5. The hook's ``report()`` becomes the report section of the same name, and the hook class's
   ``report_rows`` its lines on the report card (:mod:`slimtune.core.hooks`).

Registration is one decorator line, ``@register_feature`` on the class (whose ``section`` is
the recipe key), in one module of :mod:`slimtune.features`; features are discovered the way
methods are, by importing every module of that package (:func:`load_plugins`).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from slimtune.errors import SlimtuneError

if TYPE_CHECKING:
    from torch import nn

    from slimtune.core.hooks import Hook


@dataclass
class AuxiliaryModel:
    """A model a feature runs beside the trained one, as the runner loaded it."""

    model: nn.Module  # frozen, in eval mode
    kind: str  # "run", "export" or "model" (a zoo model / model directory: no trained task head)
    labels: list[str] | None  # its task's label names; None without a trained task head


class Section(BaseModel):
    """A validated block of recipe fields: unknown fields are errors."""

    # inf/nan are never meaningful recipe values (epochs: .inf would train forever).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Feature(Section):
    """A recipe section that plugs into a run (see the module docstring)."""

    #: The recipe key of this section.
    section: ClassVar[str]
    #: Why this feature cannot follow a model restructured mid-run (DSEE's stage 2), or None.
    refuses_restructuring: ClassVar[str | None] = None
    #: The training data is private with this feature on (DP-SGD): other features may read it only
    #: through what this feature releases (its noised gradients), never directly.
    private_training_data: ClassVar[bool] = False

    def adjust_methods(self, specs: list[Any], model: nn.Module) -> list[Any]:
        return specs

    def auxiliary_models(self) -> dict[str, str]:
        """Models to load beside the trained one: name -> a run directory, a ``slimtune export``
        directory, a zoo model name or a model directory."""
        return {}

    def build_hook(self, *, recipe: Any, model: nn.Module, delta: Any, task: Any,
                   models: dict[str, AuxiliaryModel] | None = None) -> Hook | None:
        return None

    def check_methods(self, delta: Any) -> None:
        """Refuse the delta's methods this feature cannot work with (one line); called before
        ``build_hook``."""
        if self.refuses_restructuring is None:
            return
        for method in delta.methods:
            if reason := method.restructuring_reason:
                raise SlimtuneError(
                    f"{self.section}: method '{method.name}' restructures the model during training ({reason}), "
                    f"which {self.refuses_restructuring}"
                )


#: Feature classes by recipe section name.
FEATURES: dict[str, type[Feature]] = {}


def add_to_registry(registry: dict[str, Any], key: str, cls: Any, what: str) -> Any:
    """``registry[key] = cls``; a second, different class under the same key is a bug."""
    if key in registry and registry[key] is not cls:
        raise ValueError(f"{what} '{key}' registered twice")
    registry[key] = cls
    return cls


def register_feature(cls: type[Feature]) -> type[Feature]:
    """Class decorator: make ``cls.section`` a valid recipe section validated by ``cls``."""
    return add_to_registry(FEATURES, cls.section, cls, "recipe section")


def import_all(package_name: str) -> None:
    """Import every module of a package once (each registers what it defines)."""
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


def all_features() -> dict[str, type[Feature]]:
    """Every feature, after importing each module of :mod:`slimtune.features` once."""
    import_all("slimtune.features")
    return dict(FEATURES)


def load_plugins() -> None:
    """Import every method and feature module (each registers itself and its hooks)."""
    import_all("slimtune.methods")
    import_all("slimtune.features")
