"""LoRA (Hu et al., 2021): a low-rank update ``W + (alpha/r) * B A`` parallel to frozen linears.

``A`` (r x in) starts Kaiming-uniform and ``B`` (out x r) at zero, so training starts from the
pre-trained function. Rank ``r``, ``alpha``, dropout and targets follow the paper/peft defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.methods.base import Arch, Method, MethodConfig, find_targets, register, replace_module


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank branch. The base layer is kept, not copied."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_from: torch.Tensor | None = None  # the exact pre-merge weight, while merged

    @property
    def weight(self) -> torch.Tensor:  # modules that peek at `.weight` (e.g. dtype checks) still work
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged_from is not None:
            return out
        # Scale the tiny B (out x r) rather than the large output; add in place (the base
        # output is not saved for backward by F.linear, so this is safe for autograd).
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B * self.scaling)
        return out.add_(low_rank)

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
                self.base.weight.copy_(self.merged_from)  # exact: no floating-point round trip
            else:
                self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged_from = None

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class LoRAConfig(MethodConfig):
    r: int = Field(8, ge=1, description="rank of the update B A")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    targets: list[str] | None = Field(
        None,
        description="module name patterns to wrap (suffix match, or 're:' regex); "
        "default: query/value (BERT, ViT), q/v (MPNet), q_proj/v_proj (Llama)",
    )


@register
class LoRA(Method):
    name = "lora"
    description = "low-rank update W + (alpha/r) B A on target linears (mergeable)"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
    Config = LoRAConfig
    mergeable = True
    owned_marker = ".lora_"

    def attach(self, model: nn.Module, arch: Arch) -> None:
        patterns = self.config.targets or arch.default_targets("attention_qv")
        self.wrapped = []
        for name, linear in find_targets(model, patterns, kind=nn.Linear):
            replace_module(model, name, LoRALinear(linear, self.config.r, self.config.alpha, self.config.dropout))
            self.wrapped.append(name)

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.wrapped)

    def _layers(self, model: nn.Module) -> list[LoRALinear]:
        return [m for m in model.modules() if isinstance(m, LoRALinear)]

    def merge(self, model: nn.Module, keep_original: bool = True) -> None:
        for layer in self._layers(model):
            layer.merge(keep_original)

    def unmerge(self, model: nn.Module) -> None:
        for layer in self._layers(model):
            layer.unmerge()

    def expected_param_count(self, model: nn.Module) -> int:
        """r (in + out) per wrapped linear."""
        return sum(self.config.r * (m.base.in_features + m.base.out_features) for m in self._layers(model))
