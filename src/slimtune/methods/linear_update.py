"""What LoRA, KAdaptation and FacT share: a frozen ``nn.Linear`` plus a learned linear update
``ΔW``, computed cheaply while training and merged into the base weight for inference.

Merging keeps the exact pre-merge weight, so unmerging restores it bit for bit (no floating-point
round trip); ``keep_original=False`` merges for export without that copy.

On a masked base weight (a pruned backbone, or a sparse model under ``sparsity: {lock: true}``)
the update acts as ``ΔW ⊙ mask``, in training and in the merge, so the sparsity survives merging:
the merged model has exactly the base's zeros and the unmerged model's outputs (users of
unmasked merges report a 40%-sparse model falling to 33%, wanda#83; "the LoRA branch is dense",
Pruner-Zero#4). This costs forming ``ΔW`` in each forward.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.methods.base import Method
from slimtune.sparsity.masks import dense_tensor, get_mask


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

    def base_kept(self) -> torch.Tensor | None:
        """The kept entries of the base weight when it is masked, else None."""
        mask = get_mask(self.base, "weight")
        return mask.kept if mask is not None else None

    def effective_delta_weight(self) -> torch.Tensor:
        """``ΔW`` as it acts on the model: restricted to the kept entries of a masked base weight."""
        update, kept = self.delta_weight(), self.base_kept()
        return update if kept is None else update * kept.to(update.dtype)

    def masked_update(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The update on a masked base weight: ``x (ΔW ⊙ kept)ᵀ``."""
        update = self.delta_weight()
        return F.linear(x, update * kept.to(update.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged_from is not None:
            return out
        kept = self.base_kept()
        return out + (self.update(x) if kept is None else self.masked_update(x, kept))

    # Into the stored tensor (under a mask's parametrisation, if any), ΔW ⊙ mask: the dense value
    # of a masked entry is left as it was.
    def merge(self, keep_original: bool = True) -> None:
        if self.merged_from is not None:
            return
        weight = dense_tensor(self.base, "weight")
        with torch.no_grad():
            original = weight.detach().clone() if keep_original else torch.empty(0)
            weight.add_(self.effective_delta_weight().to(weight.dtype))
        self.merged_from = original

    def unmerge(self) -> None:
        if self.merged_from is None:
            return
        weight = dense_tensor(self.base, "weight")
        with torch.no_grad():
            if self.merged_from.numel():
                weight.copy_(self.merged_from)
            else:
                weight.sub_(self.effective_delta_weight().to(weight.dtype))
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
