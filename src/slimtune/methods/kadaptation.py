"""KAdaptation (He et al. 2022, "Parameter-efficient Model Adaptation for Vision Transformers").

The update of each target linear (Q and V by default) is a sum of Kronecker products, added in
parallel to the frozen weight like LoRA:

    dW = s * sum_{i=1..n} A_i (x) B_i,     A_i: n x n ("slow"),  B_i = u_i v_i: (out/n) x (in/n) ("fast")

The slow weights ``A_i`` are shared by all layers (one set per kind of target, e.g. one for all
queries and one for all values, as the official code's ``phm_rule1``/``phm_rule2``), held in one
container attached once to the model. The fast weights are per layer and low-rank: ``u_i``
(out/n x r), ``v_i`` (r x in/n). Every target has its own fast weights (the V branch uses V's).

**Defaults from the official code** (eric-ai-lab/PEViT, vision_benchmark/evaluation/model.py):
n = 32 (``phm_dim``), fast rank r = 1 (``phm_rank``), slow weights factorised to rank 1
(``A_i = a_i b_i``, ``factorized_phm_rule``) initialised uniform(-0.01, 0.01), scale
s = lora_attn_alpha / lora_attn_dim * 5 = 128 / 4 * 5 = 160, dropout 0.5 on the Kronecker sum
(the weight increment, a DropConnect; off in evaluation). Deviations, documented:

* the official "glorot-uniform" branch sets *both* fast factors to zero, which makes every
  gradient of the update zero (a product of two zero factors); here ``v_i`` starts Kaiming-uniform
  and ``u_i`` at zero, as LoRA, so the update starts at zero and trains;
* the official code also trains a zero-initialised bias shared by the q and v branches of a
  layer and adds the q increment after the 1/sqrt(d_head) query scaling; here the increment is
  the paper's pure weight update on the projection output (compose with ``bitfit`` for biases).

Both ``in`` and ``out`` of every target must be divisible by n.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import MethodConfig, register
from slimtune.core.arch import Arch, find_targets, replace_module
from slimtune.methods.linear_update import LinearUpdate, LinearUpdateMethod

SLOW_NAME = "kadapt_slow"


def target_kind(module_name: str) -> str:
    """The kind of a target: its name with layer indices removed (all layers' queries share one)."""
    return re.sub(r"\.\d+(?=\.|$)", "", module_name).replace(".", "_")


class KAdaptSlow(nn.Module):
    """Slow weights ``A_i`` (n x n), one set per target kind, shared by every layer of that kind."""

    def __init__(self, kinds: list[str], n: int, slow_rank: int | None, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.n, self.slow_rank = n, slow_rank
        self.kadapt_left = nn.ParameterDict()
        self.kadapt_right = nn.ParameterDict()
        self.kadapt_full = nn.ParameterDict()
        for kind in kinds:
            if slow_rank is None:
                self.kadapt_full[kind] = nn.Parameter(torch.empty(n, n, n, dtype=dtype, device=device).uniform_(-0.01, 0.01))
            else:
                self.kadapt_left[kind] = nn.Parameter(torch.empty(n, n, slow_rank, dtype=dtype, device=device).uniform_(-0.01, 0.01))
                self.kadapt_right[kind] = nn.Parameter(torch.empty(n, slow_rank, n, dtype=dtype, device=device).uniform_(-0.01, 0.01))

    def rules(self, kind: str) -> torch.Tensor:
        """The n slow weights of one kind: (n, n, n), ``A_i = rules[i]``."""
        if self.slow_rank is None:
            return self.kadapt_full[kind]
        return torch.bmm(self.kadapt_left[kind], self.kadapt_right[kind])


class KronLinear(LinearUpdate):
    """A frozen linear plus ``s * sum_i A_i (x) (u_i v_i)`` with shared ``A_i``."""

    def __init__(self, base: nn.Linear, slow: KAdaptSlow, kind: str, *, rank: int, scaling: float, dropout: float):
        super().__init__(base)
        n = slow.n
        self.kind = kind
        self.scaling = scaling
        object.__setattr__(self, "slow", slow)  # registered once on the model, not per layer
        weight = base.weight
        self.kadapt_u = nn.Parameter(torch.zeros(n, base.out_features // n, rank, dtype=weight.dtype, device=weight.device))
        self.kadapt_v = nn.Parameter(torch.empty(n, rank, base.in_features // n, dtype=weight.dtype, device=weight.device))
        for i in range(n):
            nn.init.kaiming_uniform_(self.kadapt_v[i], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def shared_modules(self) -> list[nn.Module]:
        return [self.slow]

    def delta_weight(self) -> torch.Tensor:
        """``s * sum_i kron(A_i, u_i v_i)``: (out x in)."""
        rules = self.slow.rules(self.kind)  # (n, n, n)
        fast = torch.bmm(self.kadapt_u, self.kadapt_v)  # (n, out/n, in/n)
        n, p, q = fast.shape
        # kron(A_i, B_i)[a p + c, b q + d] = A_i[a, b] B_i[c, d]; the sum over i is one matmul.
        summed = (rules.reshape(n, n * n).T @ fast.reshape(n, p * q)).view(n, n, p, q)
        return summed.permute(0, 2, 1, 3).reshape(n * p, n * q) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dropout(self.delta_weight()))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, scaling={self.scaling:g}"


class KAdaptationConfig(MethodConfig):
    n: int = Field(32, ge=1, description="number of Kronecker products; slow weights A_i are n x n (official: 32); must divide in/out of every target")
    rank: int = Field(1, ge=1, description="rank r of the fast weights B_i = u_i v_i (official: 1)")
    slow_rank: int | None = Field(1, ge=1, description="rank of each slow weight A_i = a_i b_i (official: 1); null: full n x n matrices")
    scaling: float = Field(160.0, gt=0, description="scale s of the update (official: lora_attn_alpha / lora_attn_dim * 5 = 160)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout on the weight increment during training (official: 0.5)")
    targets: list[str] | None = Field(
        None,
        description="module name patterns to adapt (e.g. the list from slimtune.search.intrinsic_dim); "
        "default: query/value (BERT), q_proj/v_proj (ViT, Llama), q/v (MPNet)",
    )


@register
class KAdaptation(LinearUpdateMethod):
    name = "kadaptation"
    description = "sum of Kronecker products A_i (x) u_i v_i on Q/V, slow A_i shared by all layers (mergeable)"
    paper = "He et al. 2022, Parameter-efficient Model Adaptation for Vision Transformers"
    Config = KAdaptationConfig
    layer_class = KronLinear
    owned_marker = "kadapt_"

    def attach(self, model: nn.Module, arch: Arch) -> None:
        if hasattr(model, SLOW_NAME):
            raise SlimtuneError("method kadaptation: the model already has KAdaptation slow weights")
        n = self.config.n
        patterns = self.config.targets or arch.default_targets("attention_qv")
        found = find_targets(model, patterns, kind=nn.Linear)
        for name, linear in found:
            if linear.in_features % n or linear.out_features % n:
                raise SlimtuneError(
                    f"method.n: {n} does not divide the shape {linear.out_features} x {linear.in_features} of '{name}'; "
                    f"choose n dividing both (e.g. {math.gcd(math.gcd(linear.in_features, linear.out_features), n)})"
                )
        kinds = sorted({target_kind(name) for name, _ in found})
        reference = found[0][1].weight
        slow = KAdaptSlow(kinds, n, self.config.slow_rank, dtype=reference.dtype, device=reference.device)
        model.add_module(SLOW_NAME, slow)
        self.wrapped = []
        for name, linear in found:
            layer = KronLinear(linear, slow, target_kind(name), rank=self.config.rank, scaling=self.config.scaling, dropout=self.config.dropout)
            replace_module(model, name, layer)
            self.wrapped.append(name)

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.wrapped) | {SLOW_NAME}  # the shared slow weights train too

    def expected_param_count(self, model: nn.Module) -> int:
        """Slow: per kind n * 2 n * slow_rank (or n^3 when full); fast: r (in + out) per target."""
        n, slow_rank = self.config.n, self.config.slow_rank
        kinds = {layer.kind for layer in self._layers(model)}
        slow = len(kinds) * (n**3 if slow_rank is None else 2 * n * n * slow_rank)
        fast = sum(self.config.rank * (m.base.in_features + m.base.out_features) for m in self._layers(model))
        return slow + fast
