"""LoRA against a plain re-computation of its formula: y = W x + b + (alpha / r) * B A x."""

import pytest
import torch
from torch import nn

from slimtune.methods.lora import LoRALinear
from tests.fixtures import attach, randomize_lora_b, tiny_bert, tiny_llama, token_batch


def test_layer_output_equals_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, r=3, alpha=12.0, dropout=0.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    expected = x @ base.weight.T + base.bias + (12.0 / 3) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_gradients_equal_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double().requires_grad_(False)
    layer = LoRALinear(base, r=2, alpha=4.0, dropout=0.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    layer(x).sum().backward()
    ones = torch.ones(3, 5, dtype=torch.float64)
    # d/dB sum(s B A x) = s * ones^T (A x);  d/dA = s * B^T ones^T x
    torch.testing.assert_close(layer.lora_B.grad, 2.0 * ones.T @ (x @ layer.lora_A.T))
    torch.testing.assert_close(layer.lora_A.grad, 2.0 * layer.lora_B.T @ ones.T @ x)


def test_starts_from_the_pretrained_function_and_b_is_zero():
    model = tiny_bert()
    batch = token_batch()
    before = model(**batch).logits
    attach(model, "lora")
    torch.testing.assert_close(model(**batch).logits, before)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_merge_equals_unmerged_and_unmerge_restores_base_exactly(factory):
    model = factory()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = attach(model, ("lora", dict(r=4)))
    randomize_lora_b(model)
    batch = token_batch()
    unmerged = model(**batch).logits
    delta.merge(model)
    merged = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(p, base_weights[n.replace(".base", "")]) for n, p in model.named_parameters() if n.endswith("query.base.weight") or n.endswith("q_proj.base.weight"))
    delta.unmerge(model)
    for name, param in model.named_parameters():
        original = name.replace(".base.", ".")
        if original in base_weights:
            assert torch.equal(param, base_weights[original]), name


def test_parameter_count_equals_r_times_in_plus_out():
    model = tiny_bert()
    delta = attach(model, ("lora", dict(r=4)))
    method = delta.methods[0]
    # 2 layers x (query + value), each 32 -> 32: r (in + out) = 4 * 64
    assert method.param_count(model) == method.expected_param_count(model) == 2 * 2 * 4 * 64


def test_targets_by_pattern_and_regex():
    model = tiny_bert()
    delta = attach(model, ("lora", dict(targets=["re:.*layer\\.1\\.attention\\.self\\.(key|value)"])))
    wrapped = sorted(delta.methods[0].wrapped)
    assert wrapped == ["bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"]


def test_delta_state_holds_only_lora_and_head():
    model = tiny_bert()
    delta = attach(model, "lora")
    state = delta.state_dict(model)
    assert all(".lora_" in k or k.startswith(("classifier", "bert.pooler")) for k in state)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in delta.trainable_parameters(model).values())


def test_frozen_a_trains_only_b_but_saves_and_restores_a():
    """FFA-LoRA (train_a: false): B alone is trainable (r * out per layer), A stays at its init
    through a training step, and the delta still carries A so that a fresh model replays it."""
    model = tiny_bert()
    delta = attach(model, ("lora", dict(r=4, train_a=False)))
    method = delta.methods[0]
    trainable = delta.trainable_parameters(model)
    assert not any(".lora_A" in n for n in trainable)
    assert method.param_count(model) == method.expected_param_count(model) == 2 * 2 * 4 * 32
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A" in n}
    assert a_before and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A" in n)
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(**token_batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in a_before:
            assert torch.equal(p, a_before[name]), name
    state = delta.state_dict(model)
    assert set(a_before) <= set(state)
    fresh = tiny_bert()
    torch.manual_seed(123)  # another A init: loading must overwrite it
    fresh_delta = attach(fresh, ("lora", dict(r=4, train_a=False)))
    assert not all(torch.equal(p, a_before[n]) for n, p in fresh.named_parameters() if n in a_before)
    fresh_delta.load_state_dict(fresh, state)
    batch = token_batch()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)
