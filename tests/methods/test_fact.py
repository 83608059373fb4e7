"""FacT-TT / FacT-TK against a plain re-computation of dW = s * V Sigma_i U per d x d slice."""

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from slimtune.core.arch import Arch
from slimtune.methods.fact import FacTLinear, FacTShared
from tests.fixtures import attach, check_merge_and_unmerge, check_round_trip, check_trains
from tests.fixtures import tiny_bert, tiny_llama, tiny_vit


def reference_delta(shared, layer, out_features, in_features):
    """Block by block, the obvious way: block (a, b) = V Sigma_(a,b) U, then truncate."""
    d, r = shared.d, shared.rank
    bo, bi = -(-out_features // d), -(-in_features // d)
    full = torch.zeros(bo * d, bi * d, dtype=torch.float64)
    for a in range(bo):
        for b in range(bi):
            if shared.kind == "tt":
                sigma = layer.fact_core[a * r:(a + 1) * r, b * r:(b + 1) * r]
            else:
                p_row = shared.fact_P[layer.first_slice + a * bi + b]
                sigma = torch.zeros(r, r, dtype=torch.float64)
                for p in range(r):
                    for q in range(r):
                        sigma[p, q] = sum(shared.fact_C[p, q, k] * p_row[k] for k in range(r))
            full[a * d:(a + 1) * d, b * d:(b + 1) * d] = shared.fact_V @ sigma @ shared.fact_U
    return full[:out_features, :in_features]


@pytest.mark.parametrize("kind", ["tt", "tk"])
@pytest.mark.parametrize("out_features,in_features", [(4, 4), (16, 4), (4, 16), (10, 8), (3, 4)])
def test_layer_output_equals_the_formula(kind, out_features, in_features):
    torch.manual_seed(0)
    d, r, s = 4, 3, 2.5
    shared = FacTShared(d, r, kind, num_slices=20, dtype=torch.float64, device=torch.device("cpu"))
    base = nn.Linear(in_features, out_features).double()
    layer = FacTLinear(base, shared, scale=s, dropout=0.0, first_slice=5)
    with torch.no_grad():
        for p in [*shared.parameters(), *[q for n, q in layer.named_parameters() if "fact_" in n]]:
            p.normal_()
    x = torch.randn(2, 3, in_features, dtype=torch.float64)
    delta = reference_delta(shared, layer, out_features, in_features)
    expected = x @ base.weight.T + base.bias + s * (x @ delta.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), s * delta, rtol=0, atol=1e-10)


def test_ffn_cores_are_the_official_r_by_4r_shapes():
    # a 4d FFN, as ViT-B
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    attach(model, ("fact-tt", dict(rank=3)))
    layer = model.vit.layers[0]
    assert layer.mlp.fc1.fact_core.shape == (4 * 3, 3) and layer.mlp.fc2.fact_core.shape == (3, 4 * 3)
    assert layer.attention.q_proj.fact_core.shape == (3, 3)


@pytest.mark.parametrize("r", [1, 4, 8, 16])
def test_vit_b_trainable_counts_equal_the_paper(r):
    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=10)
    for name, expected in [("fact-tt", 1536 * r + 144 * r * r), ("fact-tk", 1536 * r + r**3 + 144 * r)]:
        with torch.device("meta"):
            model = ViTForImageClassification(config)
        delta = attach(model, (name, dict(rank=r)))
        method = delta.methods[0]
        assert method.param_count(model) == method.expected_param_count(model) == expected, name
        assert method.num_slices(model) == 144
    if r == 4:
        assert 1536 * 4 + 144 * 16 == 8_448


@pytest.mark.parametrize("factory", [tiny_bert, tiny_vit, tiny_llama])
def test_counts_on_tiny_models_and_llama_ffn_and_gqa_slicing(factory):
    # Tiny configs: hidden 32, FFN 64 = 2 slices per FFN matrix; Llama has 3 FFN matrices.
    model = factory()
    delta = attach(model, ("fact-tt", dict(rank=2)))
    method = delta.methods[0]
    expected_slices = {tiny_bert: 2 * (4 + 2 + 2), tiny_vit: 2 * (4 + 2 + 2), tiny_llama: 2 * (4 + 2 + 2 + 2)}[factory]
    assert method.num_slices(model) == expected_slices
    assert method.param_count(model) == method.expected_param_count(model) == 2 * 32 * 2 + 4 * expected_slices
    if factory is tiny_llama:
        k_proj = model.model.layers[0].self_attn.k_proj  # GQA: 16 x 32, one truncated slice
        assert k_proj.delta_weight().shape == (16, 32) and k_proj.num_slices == 1


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
def test_starts_from_the_pretrained_function(name):
    model = tiny_bert()
    from tests.fixtures import token_batch

    before = model(**token_batch()).logits
    attach(model, (name, dict(rank=2)))
    model.eval()
    torch.testing.assert_close(model(**token_batch()).logits, before)


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama, tiny_vit])
def test_merge_equals_unmerged_and_unmerge_restores_base_exactly(name, factory):
    check_merge_and_unmerge(factory(), name, rank=3)


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama, tiny_vit])
def test_trains_a_few_steps(name, factory):
    check_trains(factory(), name, rank=4, scale=10.0)


def test_shared_factors_are_registered_once_and_used_by_every_layer():
    model = tiny_bert()
    delta = attach(model, ("fact-tk", dict(rank=2)))
    names = list(delta.methods[0].trainable_parameters(model))
    assert sorted(n for n in names if "fact_shared" in n) == ["fact_shared.fact_C", "fact_shared.fact_P", "fact_shared.fact_U", "fact_shared.fact_V"]
    assert len(names) == 4  # TK has no per-layer parameters
    layers = [m for m in model.modules() if isinstance(m, FacTLinear)]
    assert len(layers) == 12 and all(m.shared is model.fact_shared for m in layers)


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
def test_delta_round_trip_reproduces_metrics(tiny_recipe, tmp_path, name):
    check_round_trip(tiny_recipe, tmp_path, {"name": name, "rank": 4})


def test_composes_with_bitfit_and_conflicts_with_lora_on_the_same_linears():
    import pytest as _pytest

    from slimtune.errors import SlimtuneError
    from slimtune.methods.base import get_method_class
    from slimtune.methods.delta import Delta
    from slimtune.recipe import MethodSpec

    def spec(name, **fields):
        return MethodSpec(name=name, config=get_method_class(name).Config(**fields))

    model = tiny_bert()
    delta = Delta.from_specs([spec("fact-tt", rank=2), spec("bitfit")])
    delta.attach(model, Arch.of(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("fact_core" in n for n in trainable) and any(n.endswith("base.bias") for n in trainable)
    with _pytest.raises(SlimtuneError, match="query' is already changed by another method"):
        Delta.from_specs([spec("fact-tk", rank=2), spec("lora")]).attach(tiny_bert(), Arch.of(model))
    with _pytest.raises(SlimtuneError, match="already changed by another method"):
        Delta.from_specs([spec("kadaptation", n=4), spec("fact-tt", rank=2)]).attach(tiny_bert(), Arch.of(model))
    model = tiny_bert()  # KAdaptation on Q/V + FacT on the FFN: different linears, both train
    delta = Delta.from_specs([spec("kadaptation", n=4), spec("fact-tt", rank=2, targets=["intermediate.dense", "output.dense"])])
    delta.attach(model, Arch.of(model))
    assert {m.name for m in delta.methods} == {"kadaptation", "fact-tt"}
