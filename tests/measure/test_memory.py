"""Tests for slimtune.measure.memory: reference checks of the accounting that can fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from slimtune.measure.memory import TrainingMemoryMeter, current_rss_bytes, peak_rss_bytes


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def bert_batch(b: int = 4, t: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (b, t), generator=g), "labels": torch.randint(0, 2, (b,), generator=g)}


def step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None = None) -> TrainingMemoryMeter:
    meter = TrainingMemoryMeter()
    with meter.track_forward():
        loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    meter.finish(model, optimizer)
    return meter


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_single_linear_saves_its_input_only() -> None:
    B, IN, OUT = 5, 16, 8
    lin = nn.Linear(IN, OUT)
    opt = torch.optim.Adam(lin.parameters())
    meter = TrainingMemoryMeter()
    with meter.track_forward():
        y = lin(torch.randn(B, IN))
    y.sum().backward()
    opt.step()
    comps = meter.finish(lin, opt)
    n_params = IN * OUT + OUT
    assert comps["activations"] == B * IN * 4
    assert comps["weights"] == n_params * 4
    assert comps["grads"] == n_params * 4
    assert comps["optimizer_state"] == 2 * n_params * 4 + 2 * 4  # exp_avg, exp_avg_sq, 2 float32 step counters
    assert meter.peak_bytes == sum(comps.values()) == comps["weights"] + comps["grads"] + comps["optimizer_state"] + B * IN * 4


def test_saved_weight_is_not_an_activation() -> None:
    # the input needs a gradient, so autograd also saves weight.t(): a view of a parameter
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    meter = TrainingMemoryMeter()
    with meter.track_forward():
        y = lin(x)
    y.sum().backward()
    assert meter.finish(lin)["activations"] == 5 * 16 * 4


def test_values_and_gradients_unchanged() -> None:
    model = tiny_bert()
    batch = bert_batch()
    loss_ref = model(**batch).loss
    loss_ref.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    meter = TrainingMemoryMeter()
    with meter.track_forward():
        loss = model(**batch).loss
    loss.backward()
    assert torch.equal(loss, loss_ref)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, ref[n]), n


def test_frozen_backbone_saves_far_fewer_activations() -> None:
    model = tiny_bert()
    batch = bert_batch()
    full = step(model, batch, torch.optim.AdamW(model.parameters()))
    model.zero_grad(set_to_none=True)

    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("bert."))
    head = [p for p in model.parameters() if p.requires_grad]
    probe = step(model, batch, torch.optim.AdamW(head))

    assert probe.components["activations"] * 50 < full.components["activations"]
    assert probe.components["weights"] == full.components["weights"]
    assert probe.components["grads"] == nbytes(head)
    assert probe.peak_bytes < full.peak_bytes

    # reference: exactly what the head alone saves when fed the (detached) pooled features
    with torch.no_grad():
        pooled = model.bert(input_ids=batch["input_ids"]).pooler_output
    ref = TrainingMemoryMeter()
    with ref.track_forward():
        loss = F.cross_entropy(model.classifier(model.dropout(pooled)), batch["labels"])
    loss.backward()
    assert probe.components["activations"] == ref.finish(model)["activations"]
    assert probe.components["activations"] >= pooled.numel() * 4


def test_no_grad_part_saves_nothing() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    b = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    model = nn.Sequential(a, b)
    x = torch.randn(8, 16)

    both = TrainingMemoryMeter()
    with both.track_forward():
        y = model(x).sum()
    y.backward()
    with_a = both.finish(model)["activations"]

    part = TrainingMemoryMeter()
    with part.track_forward():
        with torch.no_grad():
            h = a(x)
        y = b(h).sum()
    y.backward()
    only_b = part.finish(model)["activations"]

    # b saves: its input (8x16) and tanh's output (8x32), which is also the last Linear's input
    assert only_b == 8 * 16 * 4 + 8 * 32 * 4
    # a adds: x (8x16), GELU's input (8x64), GELU's output (8x64)
    assert with_a - only_b == 8 * 16 * 4 + 2 * 8 * 64 * 4


def test_dropped_graph_and_repeated_contexts() -> None:
    lin = nn.Linear(16, 8)
    meter = TrainingMemoryMeter()
    with meter.track_forward():
        dropped = lin(torch.randn(5, 16))
        del dropped  # graph freed before the next forward: its input is no longer held
        y = lin(torch.randn(5, 16))
    y.sum().backward()
    with meter.track_forward():  # a second micro-batch, twice as large
        y = lin(torch.randn(10, 16))
    y.sum().backward()
    assert meter.finish(lin)["activations"] == 10 * 16 * 4

    kept = TrainingMemoryMeter()
    with kept.track_forward():
        y1 = lin(torch.randn(5, 16))
        y2 = lin(torch.randn(5, 16))
    (y1.sum() + y2.sum()).backward()
    assert kept.finish(lin)["activations"] == 2 * 5 * 16 * 4


def test_tied_weights_counted_once_and_extras() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 100, (2, 8))
    meter = TrainingMemoryMeter()
    with meter.track_forward():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    teacher = nn.Linear(10, 10)
    meter.add("teacher", teacher)
    meter.add("cache", 1000)
    comps = meter.finish(model)
    unique = nbytes(model.parameters()) + nbytes(model.buffers())  # .parameters() yields a tied tensor once
    assert comps["weights"] == unique
    assert comps["grads"] == nbytes(model.parameters())
    assert comps["extra"] == 110 * 4 + 1000
    assert meter.extra_details == {"teacher": 440, "cache": 1000}
    assert comps["activations"] > 0


def test_finish_required_and_reset() -> None:
    meter = TrainingMemoryMeter()
    with pytest.raises(RuntimeError):
        _ = meter.peak_bytes
    lin = nn.Linear(2, 2)
    assert meter.finish(lin)["activations"] == 0
    meter.reset()
    with pytest.raises(RuntimeError):
        _ = meter.components


def test_rss() -> None:
    peak = peak_rss_bytes()
    assert peak > 10 * 2**20  # python + torch is well over 10 MiB
    assert current_rss_bytes() <= peak * 1.01
