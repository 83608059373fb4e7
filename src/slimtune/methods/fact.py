"""FacT (Jie & Deng, AAAI 2023): the weight increments of all chosen linears, cut into d x d
slices and stacked into one 3-D tensor, are factorised with factors shared by the whole model.

Every slice i gets ``dW_i = s * V Sigma_i U`` with ``U`` (r x d) and ``V`` (d x r) shared by all
layers (``V`` starts at zero, so training starts from the pre-trained function):

* ``fact-tt`` (tensor train): each slice has its own r x r core ``Sigma_i``;
* ``fact-tk`` (Tucker): ``Sigma_i = C x_3 P_i`` (``Sigma_i[p, q] = sum_k C[p, q, k] P[i, k]``),
  with one core ``C`` (r x r x r) and one row ``P_i`` of ``P`` (slices x r) per slice.

**Slices.** A target linear of shape out x in is covered by ``ceil(out/d) x ceil(in/d)`` blocks of
d x d (d = the model's hidden size), each block one slice; blocks that overhang are truncated
to the real shape. So the ViT/BERT FFN matrices (4d x d and d x 4d) are 4 slices each, which is
exactly the official code's r x 4r cores for fc1/fc2 (a 4r x r core feeds four output blocks; a
r x 4r core reads four input blocks). On Llama, ``gate_proj`` and ``up_proj`` (ffn x d) are
``ceil(ffn/d)`` row blocks each and ``down_proj`` (d x ffn) is ``ceil(ffn/d)`` column blocks; GQA
``k_proj``/``v_proj`` (kv_dim x d, kv_dim < d) are one slice whose increment keeps the first
kv_dim rows of ``V Sigma_i U``. For a ViT-B-shaped model (q, k, v, o, fc1, fc2 of 12 layers:
12 slices per layer) the trainable counts are 1536r + 144r^2 (TT) and 1536r + r^3 + 144r (TK).

**Defaults from the official code** (JieShibo/PETL-ViT, FacT/fact_tt.py, fact_tk.py): ``U`` and
the TT cores take ``nn.Linear``'s default initialisation (Kaiming-uniform, a=sqrt(5)), ``V`` is
zero, the TK core ``C`` and factor ``P`` are Xavier-uniform; dropout 0.1 between the core and
``V``; the scale ``s`` defaults to 1 (``set_FacT(..., s=1)``; the per-dataset configs search
s in {0.01, 0.1, 1, 10, 100}) and the rank to 8 (configs: TT 8-16, TK 16-32). The official
TK code maps the 8 FFN slices onto the fc1/fc2 blocks through a reshape that interleaves slice
and row indices; here block j of an FFN matrix is simply slice j (the paper's formulation; same
parameters, same count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import MethodConfig, register
from slimtune.core.arch import Arch, find_targets, replace_module
from slimtune.methods.linear_update import LinearUpdate, LinearUpdateMethod

SHARED_NAME = "fact_shared"


class FacTShared(nn.Module):
    """The factors every FacT layer uses: ``U`` (r x d), ``V`` (d x r) and, for Tucker, the core
    ``C`` (r x r x r) and the slice factor ``P`` (slices x r). Attached once to the model."""

    def __init__(self, d: int, rank: int, kind: str, num_slices: int, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.d, self.rank, self.kind = d, rank, kind
        self.fact_U = nn.Parameter(torch.empty(rank, d, dtype=dtype, device=device))
        self.fact_V = nn.Parameter(torch.zeros(d, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.fact_U, a=math.sqrt(5))  # nn.Linear(d, r)'s default
        if kind == "tk":
            self.fact_C = nn.Parameter(torch.empty(rank, rank, rank, dtype=dtype, device=device))
            self.fact_P = nn.Parameter(torch.empty(num_slices, rank, dtype=dtype, device=device))
            nn.init.xavier_uniform_(self.fact_C)
            nn.init.xavier_uniform_(self.fact_P)

    def tucker_cores(self, slices: slice) -> torch.Tensor:
        """``Sigma_i = C x_3 P_i`` for the given rows of ``P``: (n, r, r)."""
        return torch.einsum("pqk,ik->ipq", self.fact_C, self.fact_P[slices])


class FacTLinear(LinearUpdate):
    """A frozen linear plus ``s * blocks(V Sigma U)``; ``Sigma`` is a (bo r) x (bi r) block core."""

    def __init__(self, base: nn.Linear, shared: FacTShared, *, scale: float, dropout: float, first_slice: int):
        super().__init__(base)
        d, r = shared.d, shared.rank
        self.blocks_out = -(-base.out_features // d)
        self.blocks_in = -(-base.in_features // d)
        self.scale = scale
        self.kind = shared.kind
        self.first_slice = first_slice
        # A plain attribute, not a submodule: the shared factors are registered once, on the model.
        object.__setattr__(self, "shared", shared)
        if self.kind == "tt":
            core = torch.empty(self.blocks_out * r, self.blocks_in * r, dtype=base.weight.dtype, device=base.weight.device)
            # nn.Linear(bi*r, bo*r)'s default init, as the official per-matrix cores.
            nn.init.kaiming_uniform_(core, a=math.sqrt(5))
            self.fact_core = nn.Parameter(core)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def shared_modules(self) -> list[nn.Module]:
        return [self.shared]

    @property
    def num_slices(self) -> int:
        return self.blocks_out * self.blocks_in

    def core(self) -> torch.Tensor:
        """The block core Sigma: (bo r) x (bi r); block (a, b) belongs to slice a * bi + b."""
        if self.kind == "tt":
            return self.fact_core
        r = self.shared.rank
        cores = self.shared.tucker_cores(slice(self.first_slice, self.first_slice + self.num_slices))
        return cores.view(self.blocks_out, self.blocks_in, r, r).permute(0, 2, 1, 3).reshape(self.blocks_out * r, self.blocks_in * r)

    def delta_weight(self) -> torch.Tensor:
        d, r = self.shared.d, self.shared.rank
        sigma = self.core().view(self.blocks_out, r, self.blocks_in, r)
        full = torch.einsum("dp,apbq,qe->adbe", self.shared.fact_V, sigma, self.shared.fact_U)
        full = full.reshape(self.blocks_out * d, self.blocks_in * d)
        return full[: self.base.out_features, : self.base.in_features] * self.scale

    def update(self, x: torch.Tensor) -> torch.Tensor:
        d, r = self.shared.d, self.shared.rank
        pad_in = self.blocks_in * d - x.shape[-1]
        h = F.pad(x, (0, pad_in)) if pad_in else x
        h = h.reshape(*x.shape[:-1], self.blocks_in, d) @ self.shared.fact_U.T  # (..., bi, r)
        h = self.dropout(h.reshape(*x.shape[:-1], self.blocks_in * r) @ self.core().T)  # (..., bo r)
        h = h.reshape(*x.shape[:-1], self.blocks_out, r) @ self.shared.fact_V.T  # (..., bo, d)
        h = h.reshape(*x.shape[:-1], self.blocks_out * d)[..., : self.base.out_features]
        return h * self.scale

    def extra_repr(self) -> str:
        return f"{self.kind}, blocks={self.blocks_out}x{self.blocks_in}, scale={self.scale:g}"


class FacTConfig(MethodConfig):
    rank: int = Field(8, ge=1, description="rank r of the shared factors U (r x d), V (d x r) and of the cores")
    scale: float = Field(1.0, gt=0, description="scale s of every increment s * V Sigma U (official default 1; its configs search 0.01..100)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout between the core and V (official: 0.1)")
    targets: list[str] | None = Field(
        None,
        description="module name patterns of the linears to adapt; default: q, k, v, o and the FFN linears "
        "of every layer (BERT: query/key/value/attention.output.dense/intermediate.dense/output.dense; "
        "ViT: q/k/v/o_proj, mlp.fc1/fc2; Llama: q/k/v/o_proj, gate/up/down_proj)",
    )


class _FacT(LinearUpdateMethod):
    kind: str = ""
    Config = FacTConfig
    layer_class = FacTLinear
    owned_marker = "fact_"

    def attach(self, model: nn.Module, arch: Arch) -> None:
        if arch.hidden_size <= 0:
            raise SlimtuneError(f"method {self.name}: the model config has no hidden_size; FacT slices weights into d x d blocks")
        if hasattr(model, SHARED_NAME):
            raise SlimtuneError(f"method {self.name}: the model already has FacT factors; use one FacT method per model")
        patterns = self.config.targets or arch.default_targets("attention_qkvo") + arch.default_targets("ffn")
        found = find_targets(model, patterns, kind=nn.Linear)
        d, r = arch.hidden_size, self.config.rank
        num_slices = sum(-(-m.out_features // d) * -(-m.in_features // d) for _, m in found)
        reference = found[0][1].weight
        shared = FacTShared(d, r, self.kind, num_slices, dtype=reference.dtype, device=reference.device)
        model.add_module(SHARED_NAME, shared)
        self.wrapped = []
        first = 0
        for name, linear in found:
            layer = FacTLinear(linear, shared, scale=self.config.scale, dropout=self.config.dropout, first_slice=first)
            first += layer.num_slices
            replace_module(model, name, layer)
            self.wrapped.append(name)

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.wrapped) | {SHARED_NAME}  # the shared factors train too

    def num_slices(self, model: nn.Module) -> int:
        return sum(layer.num_slices for layer in self._layers(model))


@register
class FacTTT(_FacT):
    name = "fact-tt"
    kind = "tt"
    description = "FacT-TT: all weight increments as one tensor, shared U/V + an r x r core per d x d slice (mergeable)"
    paper = "Jie & Deng 2023, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer"

    def expected_param_count(self, model: nn.Module) -> int:
        """2 d r (U, V) + r^2 per slice; ViT-B: 1536 r + 144 r^2."""
        shared = getattr(model, SHARED_NAME)
        return 2 * shared.d * shared.rank + shared.rank**2 * self.num_slices(model)


@register
class FacTTK(_FacT):
    name = "fact-tk"
    kind = "tk"
    description = "FacT-TK: all weight increments as one tensor, Tucker factors U/V, core C (r^3) and P (slices x r) (mergeable)"
    paper = "Jie & Deng 2023, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer"

    def expected_param_count(self, model: nn.Module) -> int:
        """2 d r (U, V) + r^3 (C) + r per slice (P); ViT-B: 1536 r + r^3 + 144 r."""
        shared = getattr(model, SHARED_NAME)
        return 2 * shared.d * shared.rank + shared.rank**3 + shared.rank * self.num_slices(model)
