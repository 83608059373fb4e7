"""Tests for slimtune.measure.latency: the protocol (modes, threads, counts), not the speed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from slimtune.errors import SlimtuneError
from slimtune.measure.latency import measure_latency, percentile


class Probe(nn.Module):
    """Records the conditions of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return self.lin(input_ids.float()[..., :4])


def test_protocol_and_restoration() -> None:
    model = Probe()
    model.train()
    model.lin.eval()  # a deliberately frozen submodule stays as it was
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = measure_latency(model, {"input_ids": torch.ones(3, 7, dtype=torch.long)}, threads=2, warmup=2, repeats=5)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
    assert len(model.calls) == 7
    assert all(call == (False, True, 2) for call in model.calls)
    assert model.training and not model.lin.training
    assert out["batch_size"] == 3 and out["seq_len"] == 7
    assert out["threads"] == 2 and out["repeats"] == 5 and out["warmup"] == 2
    assert 0 < out["latency_ms_min"] <= out["latency_ms_median"] <= out["latency_ms_p90"]


def test_tiny_bert_and_tensor_inputs() -> None:
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    model = BertModel(cfg)
    ids = torch.randint(0, 100, (2, 16))
    out = measure_latency(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, warmup=1, repeats=3)
    assert (out["batch_size"], out["seq_len"]) == (2, 16)
    assert model.training  # restored
    img = measure_latency(nn.Conv2d(3, 4, 3), torch.randn(5, 3, 8, 8), warmup=0, repeats=2)
    assert img["batch_size"] == 5 and img["seq_len"] is None


def test_percentile_matches_linear_interpolation() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile([7.0], 90) == 7.0
    assert percentile(list(map(float, range(11))), 90) == pytest.approx(9.0)


@pytest.mark.parametrize("kw", [{"threads": 0}, {"repeats": 0}, {"warmup": -1}])
def test_bad_arguments(kw) -> None:
    with pytest.raises(SlimtuneError):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), **kw)
