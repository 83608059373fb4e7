"""LoRA (Hu et al., 2021): a low-rank update ``W + (alpha/r) * B A`` parallel to frozen linears.

``A`` (r x in) starts Kaiming-uniform and ``B`` (out x r) at zero, so training starts from the
pre-trained function. Rank ``r``, ``alpha``, dropout and targets follow the paper/peft defaults.

``train_a: false`` is FFA-LoRA (Sun et al., ICLR 2024, "Improving LoRA in privacy-preserving
federated learning"): ``A`` keeps its random init and only ``B`` trains. Under DP-SGD this drops
A's r·in parameters from those that receive noise, and ``A`` (whose gradient is zero while ``B``
is, so that it would only random-walk on noise early on) stays put. ``A`` is still saved with the
delta.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.methods.base import MethodConfig, register
from slimtune.core.arch import Arch, find_targets, replace_module
from slimtune.methods.linear_update import LinearUpdate, LinearUpdateMethod


class LoRALinear(LinearUpdate):
    """A frozen ``nn.Linear`` plus a trainable low-rank branch. The base layer is kept, not copied."""

    #: The update is exactly ``scaling * lora_B @ lora_A`` (rank pruning by SVD relies on it).
    pure_low_rank_update = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        # Scale the tiny B (out x r) rather than the large output.
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B * self.scaling)

    def masked_update(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return super().masked_update(self.dropout(x), kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged_from is not None:
            return out
        kept = self.base_kept()
        if kept is not None:  # a masked base: the update is (s B A) ⊙ mask (linear_update.py)
            return out + self.masked_update(x, kept)
        # Add in place: F.linear does not save its output for backward, so this is safe for
        # autograd and spares one activation-sized allocation per wrapped layer.
        return out.add_(self.update(x))

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
    train_a: bool = Field(
        True, description="false: FFA-LoRA (Sun et al. 2024): A stays at its random init, only B trains (half the trainable parameters; for DP-SGD)"
    )


@register
class LoRA(LinearUpdateMethod):
    name = "lora"
    description = "low-rank update W + (alpha/r) B A on target linears (mergeable)"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
    Config = LoRAConfig
    layer_class = LoRALinear
    owned_marker = ".lora_"

    def attach(self, model: nn.Module, arch: Arch) -> None:
        patterns = self.config.targets or arch.default_targets("attention_qv")
        self.wrapped = []
        for name, linear in find_targets(model, patterns, kind=nn.Linear):
            replace_module(model, name, LoRALinear(linear, self.config.r, self.config.alpha, self.config.dropout))
            self.wrapped.append(name)

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.wrapped)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = super().trainable_parameters(model)
        if self.config.train_a:
            return params
        return {n: p for n, p in params.items() if ".lora_A" not in n}

    def stored_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        # Every factor, also a frozen A: the update B A needs it.
        return super().trainable_parameters(model)

    def expected_param_count(self, model: nn.Module) -> int:
        """r (in + out) per wrapped linear; r * out with a frozen A (FFA-LoRA)."""
        return sum(self.config.r * ((m.base.in_features if self.config.train_a else 0) + m.base.out_features) for m in self._layers(model))
