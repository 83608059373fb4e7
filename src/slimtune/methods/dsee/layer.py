"""DSEE's layer: the GoDec decomposition that picks the sparse support, the layer
``W x + (B A + S) x`` and the names of the tensors DSEE saves (see :mod:`slimtune.methods.dsee`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.linear_update import LinearUpdate

# --------------------------------------------------------------------------------------------
# The decomposition that picks S's support.
# --------------------------------------------------------------------------------------------


def godec(W: torch.Tensor, rank: int, cardinality: int, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank + sparse decomposition ``W ≈ L + S`` (GoDec, Zhou & Tao 2011): alternate
    ``L = best rank-r approximation of (W - S)`` and ``S = the `cardinality` largest entries of
    W - L`` (the rest zero)."""
    W = W.detach().float()
    S = torch.zeros_like(W)
    L = torch.zeros_like(W)
    rank = min(rank, min(W.shape))
    for _ in range(iterations):
        U, sigma, Vh = torch.linalg.svd(W - S, full_matrices=False)
        L = (U[:, :rank] * sigma[:rank]) @ Vh[:rank]
        residual = (W - L).flatten()
        S = torch.zeros_like(residual)
        if cardinality > 0:
            top = torch.topk(residual.abs(), min(cardinality, residual.numel())).indices
            S[top] = residual[top]
        S = S.view_as(W)
    return L, S


def sparse_support(W: torch.Tensor, n: int, how: str, *, rank: int = 100, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Flat positions (sorted) of S's ``n`` non-zeros for weight ``W``."""
    n = min(n, W.numel())
    if how == "decomposition":
        _, S = godec(W, rank, n, iterations)
        scores = S.abs() + (S != 0)  # the support of S first, by |S|
    elif how == "magnitude":
        scores = W.detach().float().abs()
    elif how == "random":
        scores = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed))
    else:
        raise SlimtuneError(f"method.sparse_init: '{how}' is not a support rule; valid: decomposition, magnitude, random")
    return torch.sort(torch.topk(scores.flatten(), n).indices).values


# --------------------------------------------------------------------------------------------
# The layer.
# --------------------------------------------------------------------------------------------


class DSEELinear(LinearUpdate):
    """``base(x) + (alpha/r) (x Aᵀ Bᵀ + x Sᵀ)``; S lives as ``sparse_values`` on the fixed flat
    positions ``sparse_indices``. When the base weight is masked (unstructured stage 2) the
    update is masked alike, so the final weight ``mask ⊙ (W + ΔW)`` stays sparse."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, indices: torch.Tensor, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / r
        dtype = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype))
        self.register_buffer("sparse_indices", indices.to(torch.int64).clone())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sparse_matrix(self) -> torch.Tensor:
        out, inp = self.base.out_features, self.base.in_features
        flat = self.sparse_values.new_zeros(out * inp).index_add(0, self.sparse_indices, self.sparse_values)
        return flat.view(out, inp)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A + self.sparse_matrix()) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        low_rank = F.linear(F.linear(x, self.lora_A), self.lora_B * self.scaling)
        return low_rank + F.linear(x, self.sparse_matrix() * self.scaling)

    # Forward, merge and unmerge are LinearUpdate's: on a masked base weight (stage 2's pruned
    # heads, or a locked sparse model) the update acts as ΔW ⊙ mask.
    def masked_update(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return super().masked_update(self.dropout(x), kept)

    def extra_repr(self) -> str:
        return f"r={self.r}, sparse={self.sparse_indices.numel()}, scaling={self.scaling:g}"


STAGE1 = "dsee_stage1."
HEADS_KEY = "dsee_removed_heads.layer"
NEURONS_KEY = "dsee_removed_neurons.layer"
