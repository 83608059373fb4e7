"""Full fine-tuning: every base parameter trains (the accuracy baseline; stores a whole model)."""

from __future__ import annotations

from torch import nn

from slimtune.methods.base import Method, MethodConfig, register
from slimtune.core.arch import Arch


@register
class FullFineTuning(Method):
    name = "full"
    description = "train every parameter of the model (baseline)"
    paper = "Devlin et al. 2019, BERT (fine-tuning all weights)"
    Config = MethodConfig
    in_place = True

    def attach(self, model: nn.Module, arch: Arch) -> None:
        pass  # a selector: nothing to insert

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())
