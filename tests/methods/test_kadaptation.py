"""KAdaptation against a plain re-computation of dW = s * sum_i kron(A_i, u_i v_i)."""

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from slimtune.errors import SlimtuneError
from slimtune.methods.kadaptation import KAdaptSlow, KronLinear
from tests.fixtures import attach, check_merge_and_unmerge, check_round_trip, check_trains
from tests.fixtures import tiny_bert, tiny_llama, tiny_vit, token_batch


def kron(a, b):
    """The Kronecker product by its definition, entry by entry."""
    out = torch.zeros(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0]:(i + 1) * b.shape[0], j * b.shape[1]:(j + 1) * b.shape[1]] = a[i, j] * b
    return out


@pytest.mark.parametrize("slow_rank", [1, 2, None])
@pytest.mark.parametrize("out_features,in_features", [(8, 8), (12, 8), (4, 16)])
def test_layer_output_equals_the_formula(slow_rank, out_features, in_features):
    torch.manual_seed(0)
    n, r, s = 4, 2, 3.0
    slow = KAdaptSlow(["q"], n, slow_rank, dtype=torch.float64, device=torch.device("cpu"))
    base = nn.Linear(in_features, out_features).double()
    layer = KronLinear(base, slow, "q", rank=r, scaling=s, dropout=0.0)
    with torch.no_grad():
        for p in [*slow.parameters(), layer.kadapt_u, layer.kadapt_v]:
            p.normal_()
    x = torch.randn(2, 3, in_features, dtype=torch.float64)
    delta = torch.zeros(out_features, in_features, dtype=torch.float64)
    for i in range(n):
        a_i = slow.kadapt_full["q"][i] if slow_rank is None else slow.kadapt_left["q"][i] @ slow.kadapt_right["q"][i]
        b_i = layer.kadapt_u[i] @ layer.kadapt_v[i]
        delta += kron(a_i, b_i)
    expected = x @ base.weight.T + base.bias + s * (x @ delta.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(kron(a, b), torch.kron(a, b))  # the helper is the textbook product


def test_slow_weights_are_shared_by_layers_and_v_uses_its_own_fast_weights():
    model = tiny_bert()
    delta = attach(model, ("kadaptation", dict(n=4)))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, KronLinear)}
    assert len(layers) == 4 and all(m.slow is model.kadapt_slow for m in layers.values())
    kinds = {m.kind for m in layers.values()}
    assert kinds == {"bert_encoder_layer_attention_self_query", "bert_encoder_layer_attention_self_value"}
    q = layers["bert.encoder.layer.0.attention.self.query"]
    v = layers["bert.encoder.layer.0.attention.self.value"]
    assert q.kadapt_u is not v.kadapt_u and q.kadapt_v is not v.kadapt_v
    # Changing V's fast weights changes only V's update.
    with torch.no_grad():
        for p in model.kadapt_slow.parameters():
            p.normal_()
        q_before = q.delta_weight().clone()
        v.kadapt_u.normal_()
    assert torch.equal(q.delta_weight(), q_before) and v.delta_weight().abs().sum() > 0
    names = list(delta.methods[0].trainable_parameters(model))
    assert sum("kadapt_slow" in n for n in names) == 4  # left/right for the two kinds, once


def test_parameter_count_equals_the_closed_form():
    model = tiny_bert()
    delta = attach(model, ("kadaptation", dict(n=4, rank=2)))
    method = delta.methods[0]
    # slow: 2 kinds x n * 2n; fast: 4 targets x r (32 + 32)
    assert method.param_count(model) == method.expected_param_count(model) == 2 * 4 * 8 + 4 * 2 * 64


def test_vit_b_count_with_official_defaults():
    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    delta = attach(model, "kadaptation")
    method = delta.methods[0]
    # n = 32, r = 1, rank-1 slow weights: 2 kinds x 2 * 32^2 + 24 targets x (768 + 768)
    assert method.param_count(model) == method.expected_param_count(model) == 2 * 2048 + 24 * 1536


def test_starts_from_the_pretrained_function():
    model = tiny_bert()
    before = model(**token_batch()).logits
    attach(model, ("kadaptation", dict(n=4)))
    model.eval()
    torch.testing.assert_close(model(**token_batch()).logits, before)


def test_n_that_does_not_divide_a_target_is_one_clear_line():
    with pytest.raises(SlimtuneError, match=r"method.n: 5 does not divide the shape 32 x 32"):
        attach(tiny_bert(), ("kadaptation", dict(n=5)))


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama, tiny_vit])
def test_merge_equals_unmerged_and_unmerge_restores_base_exactly(factory):
    check_merge_and_unmerge(factory(), "kadaptation", n=4, rank=2)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama, tiny_vit])
def test_trains_a_few_steps(factory):
    check_trains(factory(), "kadaptation", n=4, rank=1)


def test_targets_from_a_list(tiny_recipe):
    model = tiny_bert()
    delta = attach(model, ("kadaptation", dict(n=4, targets=["bert.encoder.layer.1.attention.self.key", "intermediate.dense"])))
    assert sorted(delta.methods[0].wrapped) == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.intermediate.dense"]


def test_delta_round_trip_reproduces_metrics(tiny_recipe, tmp_path):
    check_round_trip(tiny_recipe, tmp_path, {"name": "kadaptation", "n": 4, "rank": 2})
