"""Tests for slimtune.measure.params: counts, tied tensors, stored bytes."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.measure.params import file_bytes, param_counts, tensor_bytes, unique_tensor_bytes


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    return BertModel(cfg)


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def test_linear_counts_by_hand() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    counts = param_counts(model)
    assert counts["total"] == 10 * 5 + 5 + 5 * 3 + 3
    assert counts["trainable"] == 5 + 5 * 3 + 3
    assert counts["trainable_pct"] == pytest.approx(100 * 23 / 73)
    assert counts["base_total"] == 73


def test_named_trainable_and_base_total() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3))
    counts = param_counts(model, ["1.weight", "1.bias"], base_total=1000)
    assert counts["trainable"] == 18
    assert counts["total"] == 73
    assert counts["trainable_pct"] == pytest.approx(1.8)
    with pytest.raises(SlimtuneError, match="unknown parameter"):
        param_counts(model, ["1.wieght"])


def test_bert_total_matches_plain_sum() -> None:
    model = tiny_bert()
    assert param_counts(model)["total"] == sum(p.numel() for p in model.parameters())


def test_tied_embeddings_counted_once() -> None:
    tied, untied = tiny_llama(True), tiny_llama(False)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert param_counts(untied)["total"] - param_counts(tied)["total"] == 100 * 32
    # the alias name selects the same tensor: counted once
    both = param_counts(tied, ["lm_head.weight", "model.embed_tokens.weight"])
    assert both["trainable"] == 100 * 32
    sd = tied.state_dict()
    assert tensor_bytes(sd) == param_counts(tied)["total"] * 4


def test_parameters_sharing_one_storage_counted_once() -> None:
    base = torch.zeros(10)
    module = nn.Module()
    module.a = nn.Parameter(base[:6])
    module.b = nn.Parameter(base[4:])  # overlaps a on elements 4, 5
    assert param_counts(module)["total"] == 10
    assert unique_tensor_bytes([base[:6], base[4:]]) == (10, 40)
    assert unique_tensor_bytes([base[:3], base[5:7]]) == (5, 20)


def test_tensor_bytes_dtypes_and_nesting() -> None:
    sd = {"a": torch.zeros(3, 4), "b": torch.zeros(8, dtype=torch.float16), "n": (torch.zeros(2, dtype=torch.int64), 1.5)}
    assert tensor_bytes(sd) == 48 + 16 + 16
    assert tensor_bytes([torch.zeros(5)]) == 20


def test_quantized_model_counts_like_float_twin() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert param_counts(qmodel)["total"] == param_counts(model)["total"]
    assert param_counts(qmodel)["trainable"] == 0
    qsd = qmodel.state_dict()
    weights = [v for k, v in qsd.items() if k.endswith("_packed_params._packed_params")]
    int8_bytes = sum(w.numel() for w, _ in weights)  # 1 byte per qint8 element
    bias_bytes = sum(b.numel() * 4 for _, b in weights)
    assert int8_bytes == 16 * 8 + 8 * 4
    assert tensor_bytes(qsd) >= int8_bytes + bias_bytes
    assert tensor_bytes(qsd) < tensor_bytes(model.state_dict())


def test_file_bytes(tmp_path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.json").write_bytes(b"y" * 23)
    assert file_bytes(tmp_path / "a.bin") == 100
    assert file_bytes(tmp_path) == 123
    with pytest.raises(SlimtuneError):
        file_bytes(tmp_path / "missing")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 64)), min_size=1, max_size=6))
def test_unique_bytes_is_the_union_of_views(ranges: list[tuple[int, int]]) -> None:
    base = torch.zeros(64)
    views = [base[s : s + n] for s, n in ranges]
    covered = set()
    for s, n in ranges:
        covered |= set(range(s, min(64, s + n)))
    numel, nbytes = unique_tensor_bytes(views)
    assert nbytes == 4 * len(covered)
    assert numel == len(covered)
