"""Contributions: one rule's per-sample gradient of one parameter (see
:mod:`slimtune.privacy.rules`), dense or as a ghost (its factors, so that norms and the clipped sum
need no per-sample weights), and masked (a sparsity mask or a straight-through quantiser)."""

from __future__ import annotations

import torch


class Dense:
    """Instantiated per-sample gradients ``(B, *param.shape)``."""

    def __init__(self, grads: torch.Tensor):
        self.grads = grads

    def dense(self) -> torch.Tensor:
        return self.grads

    def sq_norms(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.grads.flatten(1), dim=1).square()

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(weights.to(self.grads.dtype), self.grads, dims=1)


class GhostLinear:
    """Per-sample ``Σ_t b_t a_tᵀ`` kept as its factors ``a (B,T,in)``, ``b (B,T,out)``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b

    def dense(self) -> torch.Tensor:
        return torch.bmm(self.b.transpose(1, 2), self.a)

    def sq_norms(self) -> torch.Tensor:
        if self.a.shape[1] == 1:
            return self.a.pow(2).sum((1, 2)) * self.b.pow(2).sum((1, 2))
        return (torch.bmm(self.a, self.a.transpose(1, 2)) * torch.bmm(self.b, self.b.transpose(1, 2))).sum((1, 2))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        scaled = self.b * weights.to(self.b.dtype)[:, None, None]
        return scaled.flatten(0, 1).t() @ self.a.flatten(0, 1)


class GhostEmbedding:
    """Per-sample embedding gradients: rows ``ids`` receive ``b``; never a (B, vocab, dim) tensor."""

    def __init__(self, ids: torch.Tensor, b: torch.Tensor, num_embeddings: int, padding_idx: int | None):
        if padding_idx is not None:  # PyTorch gives the padding row no gradient
            b = b * (ids != padding_idx).unsqueeze(-1).to(b.dtype)
        self.ids, self.b, self.num_embeddings = ids, b, num_embeddings

    def dense(self) -> torch.Tensor:
        batch, dim = self.b.shape[0], self.b.shape[-1]
        out = self.b.new_zeros(batch, self.num_embeddings, dim)
        return out.scatter_add_(1, self.ids.unsqueeze(-1).expand(-1, -1, dim), self.b)

    def sq_norms(self) -> torch.Tensor:
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.b.dtype)
        return (same * torch.bmm(self.b, self.b.transpose(1, 2))).sum((1, 2))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        scaled = self.b * weights.to(self.b.dtype)[:, None, None]
        out = self.b.new_zeros(self.num_embeddings, self.b.shape[-1])
        return out.index_add_(0, self.ids.reshape(-1), scaled.reshape(-1, self.b.shape[-1]))


class Masked:
    """``inner ⊙ kept`` per sample (``kept`` boolean, the parameter's shape): the per-sample
    gradient of ``original`` when the forward reads ``original * kept`` (a sparsity mask) or
    through a straight-through fake quantiser, whose gradient is the upstream one where the value
    was not clipped. A ghost linear stays a ghost when few entries are dropped (QAT clips only
    each row's extreme): ``‖G ⊙ M‖² = ‖G‖² − Σ_dropped G_oc²``, each dropped ``G_oc`` a dot
    product over the sequence; otherwise the masked gradients are instantiated once."""

    #: Drop at most this many entries per output row and a ghost is kept.
    GHOST_DROPPED_PER_ROW = 4

    def __init__(self, inner, kept: torch.Tensor):
        self.inner, self.kept = inner, kept.to(torch.bool)
        self._dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            dense = self.inner.dense()
            self._dense = dense * self.kept.to(dense.dtype)
        return self._dense

    def _dropped(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not isinstance(self.inner, GhostLinear) or self._dense is not None:
            return None
        rows, cols = torch.nonzero(~self.kept, as_tuple=True)
        return (rows, cols) if rows.numel() <= self.GHOST_DROPPED_PER_ROW * self.kept.shape[0] else None

    def sq_norms(self) -> torch.Tensor:
        dropped = self._dropped()
        if dropped is not None:
            rows, cols = dropped
            g = self.inner
            values = (g.b[:, :, rows] * g.a[:, :, cols]).sum(1)  # (B, dropped): G_oc per sample
            return g.sq_norms() - values.square().sum(1)
        if isinstance(self.inner, GhostEmbedding):
            g = self.inner
            same = (g.ids.unsqueeze(2) == g.ids.unsqueeze(1)).to(g.b.dtype)
            masked_rows = g.b * self.kept[g.ids].to(g.b.dtype)  # a row's mask is the same wherever its id recurs
            return (same * torch.bmm(masked_rows, g.b.transpose(1, 2))).sum((1, 2))
        return torch.linalg.vector_norm(self.dense().flatten(1), dim=1).square()

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return torch.tensordot(weights.to(self._dense.dtype), self._dense, dims=1)
        total = self.inner.weighted_sum(weights)
        return total * self.kept.to(total.dtype)


def as_sequence(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d), T = the product of the middle dims (1 for (B, d))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])
