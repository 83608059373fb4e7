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
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
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


class TaskLoRABranch(nn.Module):
    """The factors of a per-task LoRA layer, called with each example's task (so that DP's
    per-sample re-run of this module slices the task ids with the inputs)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float, per_task: tuple[str, ...],
                 router, dtype) -> None:
        super().__init__()
        self.router, self.scaling = router, scaling
        tasks = len(router.names)
        a = torch.empty(*((tasks,) if "A" in per_task else ()), r, in_features, dtype=dtype)
        for factor in a.view(-1, r, in_features):  # each task's A its own Kaiming draw
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(*((tasks,) if "B" in per_task else ()), out_features, r, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _project(self, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2:
            return F.linear(x, weight)
        if self.router.single is not None:  # one task per batch: one matmul
            return F.linear(x, weight[self.router.single])
        return torch.einsum("b...i,boi->b...o", x, weight[ids])

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self._project(self._project(self.dropout(x), self.lora_A, task_ids), self.lora_B, task_ids) * self.scaling


class TaskLoRALinear(LoRALinear):
    """LoRA in a multi-task run with a factor per task (``per_task``: ``"A"`` and/or ``"B"``):
    that factor gets a leading task axis and each example uses its task's (``router``,
    :class:`slimtune.zoo.heads.TaskRouter`). One base serves every task, so there is no single
    ``ΔW`` to merge."""

    pure_low_rank_update = False

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, per_task: tuple[str, ...], router) -> None:
        LinearUpdate.__init__(self, base)  # not LoRALinear's: the factors live in the branch
        self.r, self.scaling, self.router = r, alpha / r, router
        self.branch = TaskLoRABranch(base.in_features, base.out_features, r, self.scaling, dropout, per_task, router, base.weight.dtype)

    @property
    def lora_A(self) -> nn.Parameter:
        return self.branch.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.branch.lora_B

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x, self.router.current("lora"))

    def delta_weight(self) -> torch.Tensor:
        raise SlimtuneError("method lora: a per-task update has one ΔW per task; it cannot be merged into the shared base")

    def masked_update(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        raise SlimtuneError("method lora: per-task LoRA on a masked base is not supported; use sharing: shared")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.update(x)

    def extra_repr(self) -> str:
        per_task = [n for n in ("A", "B") if getattr(self, f"lora_{n}").dim() == 3]
        return super().extra_repr() + f", per task: {' and '.join(per_task)}"


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
    sharing: Literal["shared", "per-task", "half-shared"] = Field(
        "shared", description="multi-task runs: 'shared', one update for all tasks (mergeable); 'per-task', A and B per task; "
        "'half-shared', A shared and B per task (VL-Adapter's half-sharing, down projection shared)")


@register
class LoRA(LinearUpdateMethod):
    name = "lora"
    description = "low-rank update W + (alpha/r) B A on target linears (mergeable)"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
    Config = LoRAConfig
    layer_class = LoRALinear
    owned_marker = ".lora_"

    def attach(self, model: nn.Module, arch: Arch) -> None:
        c = self.config
        patterns = c.targets or arch.default_targets("attention_qv")
        per_task = {"shared": (), "per-task": ("A", "B"), "half-shared": ("B",)}[c.sharing]
        router = getattr(model, "slimtune_task_router", None)
        if per_task and router is None:
            raise SlimtuneError(f"method lora: sharing '{c.sharing}' gives each task its own factors, which needs a multi-task run "
                                "(task.tasks: a list of tasks)")
        if per_task:
            self.mergeable = False  # one base for every task: no single update to fold in
        self.wrapped = []
        for name, linear in find_targets(model, patterns, kind=nn.Linear):
            layer = TaskLoRALinear(linear, c.r, c.alpha, c.dropout, per_task, router) if per_task else LoRALinear(linear, c.r, c.alpha, c.dropout)
            replace_module(model, name, layer)
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
        """r (in + out) per wrapped linear; r * out with a frozen A (FFA-LoRA); in a multi-task
        run of T tasks, T copies of each per-task factor: per-task T r (in + out), half-shared
        r in + T r out."""
        c = self.config
        total = 0
        for m in self._layers(model):
            copies_a = m.lora_A.shape[0] if m.lora_A.dim() == 3 else 1
            copies_b = m.lora_B.shape[0] if m.lora_B.dim() == 3 else 1
            total += c.r * ((copies_a * m.base.in_features if c.train_a else 0) + copies_b * m.base.out_features)
        return total
