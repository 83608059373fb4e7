"""What LoRA, KAdaptation and FacT share: a frozen ``nn.Linear`` plus a learned linear update
``ΔW``, computed cheaply while training and merged into the base weight for inference.

Merging keeps the exact pre-merge weight, so unmerging restores it bit for bit (no floating-point
round trip); ``keep_original=False`` merges for export without that copy.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from slimtune.methods.base import Method


class LinearUpdate(nn.Module, metaclass=ABCMeta):
    """Subclasses define ``update(x)`` (the unmerged branch, usually cheaper than forming ``ΔW``)
    and ``delta_weight()`` (``ΔW`` itself, out x in, for merging)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base  # kept, not copied
        self.merged_from: torch.Tensor | None = None  # the exact pre-merge weight, while merged

    @property
    def weight(self) -> torch.Tensor:  # modules that peek at `.weight` (e.g. dtype checks) still work
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def shared_modules(self) -> list[nn.Module]:
        """Modules whose parameters this layer reads without owning them (factors shared by every
        layer, registered once on the model): DP's per-sample rules differentiate them here."""
        return []

    @abstractmethod
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """What the method adds to the frozen layer's output for input ``x``."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The same update as a weight increment (merge/unmerge use it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged_from is not None:
            return out
        return out + self.update(x)

    def merge(self, keep_original: bool = True) -> None:
        if self.merged_from is not None:
            return
        with torch.no_grad():
            original = self.base.weight.detach().clone() if keep_original else torch.empty(0)
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged_from = original

    def unmerge(self) -> None:
        if self.merged_from is None:
            return
        with torch.no_grad():
            if self.merged_from.numel():
                self.base.weight.copy_(self.merged_from)
            else:
                self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged_from = None


class LinearUpdateMethod(Method):
    """A method whose layers are ``layer_class`` wrappers: merge/unmerge them all."""

    mergeable = True
    layer_class: ClassVar[type[LinearUpdate]] = LinearUpdate

    def _layers(self, model: nn.Module) -> list[LinearUpdate]:
        return [m for m in model.modules() if isinstance(m, self.layer_class)]

    def merge(self, model: nn.Module, keep_original: bool = True) -> None:
        for layer in self._layers(model):
            layer.merge(keep_original)

    def unmerge(self, model: nn.Module) -> None:
        for layer in self._layers(model):
            layer.unmerge()
