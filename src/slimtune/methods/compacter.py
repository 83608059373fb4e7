"""Compacter (Karimi Mahabadi et al., 2021): bottleneck adapters whose projections are
parameterised hypercomplex multiplication (PHM) layers,

    W = sum_{i=1..n} A_i (x) B_i        (Kronecker products; W is in x out, y = x W + b)

with "slow" rule matrices A_i (n x n) shared by *all* adapter layers of the model (one container,
``<tag>_shared.phm_rule`` of shape n x n x n, attached once at the model's top) and "fast"
per-layer B_i (in/n x out/n) factorised as rank-``phm_rank`` products B_i = s_i t_i^T.

Placement as Houlsby adapters (after attention and after FFN; see :mod:`slimtune.methods.adapter`).
Defaults are the paper's/AdapterHub's ``CompacterConfig``: n = 4, reduction factor 32, gelu,
shared rule initialised Normal(0, 1e-4) (``phm_init_range``), B factors Glorot-uniform, bias
zero, rank 1. Parameter counts equal AdapterHub's on the same model (MiniLM-L6: 14,320; measured
with ``adapters`` 1.3 and asserted in the tests), and so do outputs with the same weights. AdapterHub's ``init_W`` tests the truthiness of
``hypercomplex_nonlinearity`` before comparing it, so it actually draws Glorot-*normal*; the
official Compacter code and AdapterHub's config both say Glorot-uniform, which is the default here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.adapter import AdapterMethod, AdapterPlacementConfig, NonLinearity, activation
from slimtune.methods.base import register
from slimtune.core.arch import Arch


class PHMRules(nn.Module):
    """The slow rule matrices A_1..A_n, shared by every PHM layer of one method."""

    def __init__(self, n: int, init_range: float, dtype=None):
        super().__init__()
        self.phm_rule = nn.Parameter(torch.empty(n, n, n, dtype=dtype))
        nn.init.normal_(self.phm_rule, mean=0.0, std=init_range)


def kronecker_sum(rules: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """sum_i kron(rules[i], fast[i]) for rules (n, n, n) and fast (n, p, q) -> (n p, n q); with
    fast (T, n, p, q), one per task -> (T, n p, n q)."""
    *tasks, n, p, q = fast.shape
    # (i, a, b) x (i, c, d) -> (a, c, b, d): entry (a p + c, b q + d) of each Kronecker product
    return torch.einsum("iab,...icd->...acbd", rules, fast).reshape(*tasks, n * p, n * q)


class PHMLinear(nn.Module):
    """y = x W + b with W = sum_i A_i (x) B_i; B_i = left_i @ right_i when factorised."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int, factorized: bool, bias: bool,
                 init: str, shared_rules: PHMRules | None, init_range: float, dtype=None, router=None):
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        p, q = in_features // n, out_features // n
        self.factorized = factorized
        # A multi-task run's per-task Compacter: fast weights and bias per task, rules shared by all.
        self.router = router
        tasks = (len(router.names),) if router is not None else ()
        if factorized:
            self.W_left = nn.Parameter(torch.empty(*tasks, n, p, rank, dtype=dtype))
            self.W_right = nn.Parameter(torch.empty(*tasks, n, rank, q, dtype=dtype))
            fast = [self.W_left, self.W_right]
        else:
            self.W = nn.Parameter(torch.empty(*tasks, n, p, q, dtype=dtype))
            fast = [self.W]
        for tensor in fast:
            for factor in tensor.data.view(-1, *tensor.shape[-2:]):  # per Kronecker factor (and task), as in the official code
                if init == "glorot-uniform":
                    nn.init.xavier_uniform_(factor)
                elif init == "glorot-normal":
                    nn.init.xavier_normal_(factor)
                else:
                    nn.init.normal_(factor, std=init_range)
        self.phm_bias = nn.Parameter(torch.zeros(*tasks, out_features, dtype=dtype)) if bias else None
        # The shared container is referenced, not registered: it is owned once, by the model.
        self._shared = [shared_rules] if shared_rules is not None else []
        if shared_rules is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n, dtype=dtype))
            nn.init.normal_(self.phm_rule, std=0.01)  # AdapterHub's per-layer rule init

    def shared_modules(self) -> list[nn.Module]:
        """The shared rule container, read here, owned by the model (for DP's per-sample rules)."""
        return list(self._shared)

    def rules(self) -> torch.Tensor:
        return self._shared[0].phm_rule if self._shared else self.phm_rule

    def fast_weights(self) -> torch.Tensor:
        return torch.matmul(self.W_left, self.W_right) if self.factorized else self.W

    def weight_in_out(self) -> torch.Tensor:
        return kronecker_sum(self.rules(), self.fast_weights())

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.router is None:
            return F.linear(x, self.weight_in_out().T, self.phm_bias)
        weights = self.weight_in_out()  # (T, in, out)
        if self.router.single is not None:  # one task per batch (the sampler's): one matmul
            t = self.router.single
            return F.linear(x, weights[t].T, self.phm_bias[t] if self.phm_bias is not None else None)
        ids = task_ids if task_ids is not None else self.router.current("compacter")
        out = torch.einsum("b...i,bio->b...o", x, weights[ids])
        return out if self.phm_bias is None else out + self.phm_bias[ids].view(len(ids), *(1,) * (x.dim() - 2), -1)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, n={self.n}, shared_rule={bool(self._shared)}"


class PHMAdapter(nn.Module):
    """f(h) = PHM_up(act(PHM_down(h))); the caller adds the skip h + f(h)."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, **phm):
        super().__init__()
        self.non_linearity = non_linearity
        self.act = activation(non_linearity)
        self.router = phm.get("router")  # per task: the skip hook hands each example's task in
        self.down = PHMLinear(hidden, bottleneck, **phm)
        self.up = PHMLinear(bottleneck, hidden, **phm)

    def forward(self, h: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(self.act(self.down(h, task_ids)), task_ids)


class CompacterConfig(AdapterPlacementConfig):
    reduction_factor: float = Field(32, gt=0, description="bottleneck width = hidden // reduction_factor (Compacter: 32)")
    non_linearity: NonLinearity = Field("gelu", description="activation inside the bottleneck (Compacter: gelu)")
    phm_dim: int = Field(4, ge=1, description="n: number of Kronecker products; hidden and bottleneck must be divisible by n")
    phm_rank: int = Field(1, ge=1, description="rank of the factorised fast weights B_i = s_i t_i^T (Compacter: 1)")
    phm_init_range: float = Field(1e-4, gt=0, description="std of the Normal init of the shared rule matrices A_i")
    phm_init: Literal["glorot-uniform", "glorot-normal", "normal"] = Field(
        "glorot-uniform", description="init of the fast weights B_i ('normal' uses std phm_init_range)"
    )
    shared_phm_rule: bool = Field(True, description="share the rule matrices A_i across all adapter layers (Compacter: yes)")
    factorized_phm: bool = Field(True, description="factorise the fast weights B_i into rank-phm_rank products (Compacter: yes; PHM-Adapter: no)")
    phm_bias: bool = Field(True, description="bias in each PHM layer")
    train_layer_norm: bool = Field(False, description="also train the backbone's layer norms (AdapterHub: no)")
    sharing: Literal["shared", "per-task"] = Field(
        "shared", description="multi-task runs: 'shared', one Compacter for all tasks; 'per-task', fast weights and biases per task "
        "with the rule matrices shared by every layer and task (VL-Adapter's Compacter)")


@register
class Compacter(AdapterMethod):
    name = "compacter"
    description = "PHM (Kronecker-sum) adapters after attention and FFN; rule matrices shared by all layers"
    paper = "Karimi Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
    Config = CompacterConfig
    sites = ("attention", "ffn")
    tag = "compacter"

    def attach_shared(self, model: nn.Module, arch: Arch) -> None:
        c = self.config
        self.shared_name = f"{self.tag}_shared"
        self.shared = None
        if c.shared_phm_rule:
            if hasattr(model, self.shared_name):
                raise SlimtuneError(f"method {self.name}: the model already holds '{self.shared_name}'")
            dtype = next(model.parameters()).dtype
            self.shared = PHMRules(c.phm_dim, c.phm_init_range, dtype)
            model.add_module(self.shared_name, self.shared)

    def make_adapter(self, hidden: int, dtype, site: str = "") -> nn.Module:
        c = self.config
        bottleneck = self.bottleneck_width(hidden)
        for size, what in ((hidden, "the hidden size"), (bottleneck, f"the bottleneck width (hidden {hidden} // reduction_factor {c.reduction_factor:g})")):
            if size % c.phm_dim:
                raise SlimtuneError(
                    f"method.phm_dim: {c.phm_dim} does not divide {what} = {size}; choose phm_dim or reduction_factor so that it does"
                )
        return PHMAdapter(
            hidden, bottleneck, c.non_linearity, n=c.phm_dim, rank=c.phm_rank, factorized=c.factorized_phm,
            bias=c.phm_bias, init=c.phm_init, shared_rules=self.shared, init_range=c.phm_init_range, dtype=dtype,
            router=self.router if c.sharing == "per-task" else None,
        )

    def shared_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        if self.shared is None:
            return {}
        return {f"{self.shared_name}.{n}": p for n, p in self.shared.named_parameters()}

    def claims(self, model: nn.Module) -> set[str]:
        return super().claims(model) | set(self.shared_parameters(model))

    def expected_param_count(self, model: nn.Module) -> int:
        """n^3 shared rules + per PHM layer: rank (in + out) fast weights (in out / n unfactorised),
        out bias, and n^3 if the rule is not shared; plus trained norms. Per task (T tasks): the
        fast weights and biases T times, the rules once."""
        c, n = self.config, self.config.phm_dim
        tasks = len(self.router.names) if c.sharing == "per-task" and self.router is not None else 1
        total = n**3 if c.shared_phm_rule else 0
        for adapter in self.adapters.values():
            for layer in (adapter.down, adapter.up):
                i, o = layer.in_features, layer.out_features
                total += tasks * (c.phm_rank * (i + o) if c.factorized_phm else i * o // n)
                total += tasks * o if c.phm_bias else 0
                total += 0 if c.shared_phm_rule else n**3
        return total + sum(p.numel() for p in self.norms.values())
