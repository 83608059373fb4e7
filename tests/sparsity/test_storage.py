"""Sparse storage of a delta (slimtune.sparsity.storage): bytes and round trip."""

import torch
from torch import nn

from slimtune.sparsity.masks import apply_mask
from slimtune.sparsity.storage import decode_state, encode, encode_state


def test_sparse_storage_bytes_and_round_trip():
    torch.manual_seed(0)
    value = torch.randn(64, 64)
    for density, key in ((0.02, "indices"), (0.6, "bitmap")):
        kept = torch.rand(64, 64) < density
        parts = encode("w", value, kept)
        assert f"w::sparse_{key}" in parts
        stored = sum(t.numel() * t.element_size() for t in parts.values())
        n_kept = int(kept.sum())
        expected = n_kept * 4 + 16 + (n_kept * 2 if key == "indices" else 64 * 64 // 8)
        assert stored == expected < 64 * 64 * 4
        dense, masks = decode_state(parts)
        assert torch.equal(dense["w"], value * kept) and torch.equal(masks["w"], kept)
    # A mask too dense to pay off stays a dense tensor.
    assert set(encode("w", value, torch.rand(64, 64) < 0.99)) == {"w"}
    layer = nn.Linear(64, 64)
    apply_mask(layer, "weight", torch.rand(64, 64) < 0.1)
    state = encode_state(layer, {"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    assert "weight::sparse_values" in state and "bias" in state
