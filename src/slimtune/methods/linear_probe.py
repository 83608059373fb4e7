"""Linear probe: only the task head trains; the backbone is a frozen feature extractor."""

from __future__ import annotations

from torch import nn

from slimtune.methods.base import Method, MethodConfig, register
from slimtune.core.arch import Arch


@register
class LinearProbe(Method):
    name = "linear-probe"
    description = "train only the task head on frozen features (baseline)"
    paper = "Alain & Bengio 2016, linear classifier probes"
    Config = MethodConfig
    in_place = True
    alone_reason = "it trains only the task head, which every method trains anyway"

    def attach(self, model: nn.Module, arch: Arch) -> None:
        if arch.objective != "classification":
            from slimtune.errors import SlimtuneError

            raise SlimtuneError(f"method linear-probe needs a classification task (the {arch.objective} objective has no new head to train)")

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {}  # the head is trained for every classification run; nothing else
