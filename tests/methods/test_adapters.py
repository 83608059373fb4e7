"""Houlsby / Pfeiffer bottleneck adapters and Compacter / Compacter++ against plain
re-computations of their formulas, closed-form and AdapterHub parameter counts, placement on
BERT / Llama / ViT, save/load, composition."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from slimtune.errors import SlimtuneError
from slimtune.methods.compacter import PHMLinear
from tests.fixtures import attach, randomize, round_trip
from tests.fixtures import tiny_bert, tiny_llama, tiny_vit, token_batch

ALL = ["houlsby", "pfeiffer", "compacter", "compacter++"]
# Tiny models have hidden 32: Compacter's default reduction 32 gives width 1, not divisible by n=4.
TINY_FIELDS = {"houlsby": {}, "pfeiffer": {}, "compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4}}


def minilm_l6_shaped():
    """all-MiniLM-L6-v2's shape (hidden 384, 6 layers, FFN 1536) on the meta device: counts only."""
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2)
    with torch.device("meta"):
        return BertForSequenceClassification(config)


def test_adapter_output_equals_the_formula():
    model = tiny_bert()
    delta = attach(model, ("houlsby", {"non_linearity": "swish"}))
    randomize(delta, model)
    layer = model.bert.encoder.layer[0]
    adapter = layer.output.dense.houlsby
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    residual = torch.randn(2, 5, 32, dtype=torch.float64)
    model.double()
    h = x @ layer.output.dense.weight.T + layer.output.dense.bias
    f = F.silu(h @ adapter.down_weight.T + adapter.down_bias) @ adapter.up_weight.T + adapter.up_bias
    expected = F.layer_norm(h + f + residual, (32,), layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, eps=layer.output.LayerNorm.eps)
    torch.testing.assert_close(layer.output(x, residual), expected, rtol=0, atol=1e-12)


def test_adapter_gradients_equal_the_formula():
    model = tiny_bert().double()
    delta = attach(model, "pfeiffer")
    randomize(delta, model)
    dense = model.bert.encoder.layer[1].output.dense
    adapter = dense.pfeiffer
    x = torch.randn(3, 64, dtype=torch.float64)
    dense(x).sum().backward()
    h = dense.weight.detach() @ x.T + dense.bias.detach()[:, None]  # (32, 3)
    pre = adapter.down_weight.detach() @ h + adapter.down_bias.detach()[:, None]
    act = torch.relu(pre)
    ones = torch.ones(32, 3, dtype=torch.float64)
    torch.testing.assert_close(adapter.up_weight.grad, ones @ act.T)
    torch.testing.assert_close(adapter.up_bias.grad, ones.sum(1))
    back = (adapter.up_weight.detach().T @ ones) * (pre > 0)
    torch.testing.assert_close(adapter.down_weight.grad, back @ h.T)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_near_identity_at_init(factory, name):
    model = factory()
    batch = token_batch()
    before = model(**batch).logits
    attach(model, (name, TINY_FIELDS[name]))
    torch.testing.assert_close(model(**batch).logits, before, atol=2e-3, rtol=0)


def test_zero_up_init_is_exactly_the_identity():
    model = tiny_bert()
    batch = token_batch()
    before = model(**batch).logits
    attach(model, ("houlsby", {"zero_up_init": True}))
    assert torch.equal(model(**batch).logits, before)


@pytest.mark.parametrize(
    ("factory", "name", "sites"),
    [
        (tiny_bert, "houlsby", ["attention.output.dense", "0.output.dense"]),
        (tiny_bert, "pfeiffer", ["layer.0.output.dense", "layer.1.output.dense"]),
        (tiny_llama, "houlsby", ["self_attn.o_proj", "mlp.down_proj"]),
        (tiny_llama, "compacter++", ["0.mlp.down_proj", "1.mlp.down_proj"]),
        (tiny_vit, "houlsby", ["attention.o_proj", "mlp.fc2"]),
        (tiny_vit, "pfeiffer", ["0.mlp.fc2", "1.mlp.fc2"]),
    ],
)
def test_default_sites_per_family(factory, name, sites):
    model = factory()
    method = attach(model, (name, TINY_FIELDS[name])).methods[0]
    found = method.sites_found
    assert len(found) == (4 if name in ("houlsby", "compacter") else 2)
    for site in sites:
        assert any(f.endswith(site) for f in found), (site, found)
    if name in ("pfeiffer", "compacter++"):
        assert not any("attention" in f or "attn" in f for f in found)


def test_parameter_counts_closed_form_on_tiny_bert():
    # d = 32, m = 32 // 16 = 2: 2 d m + m + d = 162 per adapter
    model = tiny_bert()
    houlsby = attach(model, ("houlsby", {"train_layer_norm": False})).methods[0]
    assert houlsby.param_count(model) == houlsby.expected_param_count(model) == 4 * 162
    model = tiny_bert()
    with_norms = attach(model, "houlsby").methods[0]  # + embeddings LN + 2 LNs per layer, 64 each
    assert with_norms.param_count(model) == 4 * 162 + 5 * 64
    model = tiny_bert()
    pfeiffer = attach(model, "pfeiffer").methods[0]
    assert pfeiffer.param_count(model) == pfeiffer.expected_param_count(model) == 2 * 162


#: Measured with AdapterHub `adapters` 1.3.0 (transformers 4.57, separate venv) on
#: all-MiniLM-L6-v2: DoubleSeqBnConfig, SeqBnConfig, CompacterConfig, CompacterPlusPlusConfig
#: after `train_adapter` (adapter parameters only, head excluded).
ADAPTERHUB_COUNTS_MINILM_L6 = {"houlsby": 226_080, "pfeiffer": 113_040, "compacter": 14_320, "compacter++": 7_192}


@pytest.mark.parametrize("name", ALL)
def test_parameter_counts_equal_adapterhub_on_minilm_l6(name):
    model = minilm_l6_shaped()
    method = attach(model, (name, {"train_layer_norm": False})).methods[0]
    assert method.param_count(model) == method.expected_param_count(model) == ADAPTERHUB_COUNTS_MINILM_L6[name]


def test_compacter_closed_form():
    # d = 384, m = 12, n = 4, rank 1: down rank(d + m) + m, up rank(m + d) + d; rules n^3 once
    per_adapter = (384 + 12 + 12) + (12 + 384 + 384)
    assert 12 * per_adapter + 4**3 == ADAPTERHUB_COUNTS_MINILM_L6["compacter"]
    assert 6 * per_adapter + 4**3 == ADAPTERHUB_COUNTS_MINILM_L6["compacter++"]
    model = minilm_l6_shaped()
    method = attach(model, ("compacter", {"shared_phm_rule": False, "factorized_phm": False})).methods[0]
    unshared = 12 * ((384 * 12 // 4 + 12 + 64) + (12 * 384 // 4 + 384 + 64))
    assert method.param_count(model) == method.expected_param_count(model) == unshared


def test_phm_layer_equals_the_sum_of_kronecker_products():
    torch.manual_seed(0)
    from slimtune.methods.compacter import PHMRules

    rules = PHMRules(4, 1.0, dtype=torch.float64)
    layer = PHMLinear(8, 12, n=4, rank=2, factorized=True, bias=True, init="glorot-uniform", shared_rules=rules, init_range=1e-4, dtype=torch.float64)
    with torch.no_grad():
        layer.phm_bias.normal_()
    weight = sum(torch.kron(rules.phm_rule[i], layer.W_left[i] @ layer.W_right[i]) for i in range(4))  # (in, out)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ weight + layer.phm_bias, rtol=0, atol=1e-12)


def test_rule_matrices_are_one_tensor_shared_by_all_layers():
    model = tiny_bert()
    delta = attach(model, ("compacter", {"reduction_factor": 4}))
    method = delta.methods[0]
    layers = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(layers) == 8
    assert all(layer.rules() is model.compacter_shared.phm_rule for layer in layers)
    names = [n for n in delta.trainable_parameters(model) if "phm_rule" in n]
    assert names == ["compacter_shared.phm_rule"]
    # the shared rule receives gradient from every layer
    model(**token_batch(), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert model.compacter_shared.phm_rule.grad.abs().sum() > 0
    assert method.param_count(model) == method.expected_param_count(model)


def test_phm_dim_must_divide_the_bottleneck():
    with pytest.raises(SlimtuneError, match=r"method.phm_dim: 4 does not divide the bottleneck width \(hidden 32 // reduction_factor 32\) = 1"):
        attach(tiny_bert(), "compacter")  # hidden 32 // 32 = 1


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_delta_alone_round_trips(factory, name, tmp_path):
    model, delta = round_trip(factory, [(name, TINY_FIELDS[name])], token_batch(), tmp_path)
    assert all(k.startswith(("classifier", "score", "bert.pooler")) or f".{delta.methods[0].tag}" in k
               or "_shared." in k or "Norm" in k or "norm" in k for k in delta.state_dict(model))


def test_vit_round_trip(tmp_path):
    pixels = torch.randn(2, 1, 8, 8)
    model = tiny_vit()
    delta = attach(model, "houlsby")
    randomize(delta, model)
    expected = model(pixel_values=pixels).logits
    fresh = tiny_vit()
    attach(fresh, "houlsby").load_state_dict(fresh, delta.state_dict(model))
    torch.testing.assert_close(fresh(pixel_values=pixels).logits, expected, rtol=0, atol=0)


def test_adapters_are_not_mergeable():
    model = tiny_bert()
    delta = attach(model, "pfeiffer")
    with pytest.raises(SlimtuneError, match="not a linear update"):
        delta.merge(model)


def test_composes_with_lora_and_bitfit():
    model = tiny_bert()
    delta = attach(model, ("lora", {"r": 2}), "houlsby")
    names = set(delta.trainable_parameters(model))
    assert any(".lora_" in n for n in names) and any(".houlsby." in n for n in names)
    randomize(delta, model)
    model(**token_batch())
    # BitFit trains base biases; the adapters' own biases are not base biases, so no conflict
    model = tiny_bert()
    delta = attach(model, "pfeiffer", "bitfit")
    assert not any(".pfeiffer." in n for n in delta.methods[1].trainable_parameters(model))


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["houlsby", "pfeiffer"], "'pfeiffer' and 'houlsby' both change 'bert.encoder.layer.\\d.output.dense'"),
        ([("lora", {"targets": ["attention.output.dense"]}), "houlsby"], "'houlsby' and 'lora' both change"),
        (["houlsby", ("lora", {"targets": ["attention.output.dense"]})], "'lora' and 'houlsby' both change"),
        (["houlsby", "bitfit"], "'bitfit' and 'houlsby' both change .*LayerNorm.bias"),
    ],
)
def test_conflicting_compositions_fail_clearly(methods, message):
    with pytest.raises(SlimtuneError, match=message):
        attach(tiny_bert(), *methods)


@pytest.mark.parametrize("name", ALL)
def test_mpnet_sites(name):
    from tests.fixtures import tiny_mpnet

    model = tiny_mpnet()
    method = attach(model, (name, TINY_FIELDS[name])).methods[0]
    expected = {"layer.0.output.dense", "layer.1.output.dense"}
    if name in ("houlsby", "compacter"):
        expected |= {"layer.0.attention.attn.o", "layer.1.attention.attn.o"}
    assert {s.split("encoder.")[-1] for s in method.sites_found} == expected
    batch = token_batch()  # near-identity at init, as on BERT and Llama (test_near_identity_at_init)
    torch.testing.assert_close(model(**batch).logits, tiny_mpnet()(**batch).logits, atol=2e-3, rtol=0)


ADAPTERHUB_FIXTURE = __import__("pathlib").Path(__file__).parent / "data" / "adapterhub_minilm_l6.safetensors"
#: AdapterHub name pieces -> slimtune's, per method (site "attention.output" / "output" -> its ".dense").
ADAPTERHUB_NAMES = {
    "compacter": {".adapters.task.adapter_down.0.b": ".dense.compacter.down.phm_bias", ".adapters.task.adapter_up.b": ".dense.compacter.up.phm_bias",
                  ".adapters.task.adapter_down.0.": ".dense.compacter.down.", ".adapters.task.adapter_up.": ".dense.compacter.up."},
    "houlsby": {".adapters.task.adapter_down.0.weight": ".dense.houlsby.down_weight", ".adapters.task.adapter_down.0.bias": ".dense.houlsby.down_bias",
                ".adapters.task.adapter_up.weight": ".dense.houlsby.up_weight", ".adapters.task.adapter_up.bias": ".dense.houlsby.up_bias"},
}


@pytest.mark.integration
@pytest.mark.parametrize(("name", "fields"), [("compacter", {}), ("houlsby", {"reduction_factor": 96, "train_layer_norm": False})])
def test_outputs_equal_adapterhub_with_the_same_weights(name, fields):
    """AdapterHub 1.3 (own venv; benchmarks/adapterhub_counts.py --fixture) computed the encoder
    output of all-MiniLM-L6-v2 with randomised adapter weights; the same weights here give the same output."""
    from slimtune.io import read_safetensors
    from slimtune.zoo.models import load_model

    fixture = read_safetensors(ADAPTERHUB_FIXTURE)
    model = load_model("minilm-l6").eval()
    delta = attach(model, (name, fields))
    ours = delta.methods[0].trainable_parameters(model)
    loaded = 0
    with torch.no_grad():
        for key, tensor in fixture.items():
            if not key.startswith(f"{name}/") or key.endswith("last_hidden_state"):
                continue
            target = "bert." + key.split("/", 1)[1]
            if "shared_parameters.task." in target:
                target = f"{name}_shared.phm_rule"
            for theirs, mine in ADAPTERHUB_NAMES[name].items():
                target = target.replace(theirs, mine)
            ours[target].copy_(tensor)
            loaded += 1
    assert loaded == len(ours)
    hidden = model.bert(input_ids=fixture["input_ids"], attention_mask=fixture["attention_mask"]).last_hidden_state
    real = fixture["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], fixture[f"{name}/last_hidden_state"][real], atol=1e-5, rtol=1e-4)


def test_targets_must_be_linear_layers():
    with pytest.raises(SlimtuneError, match="method.targets: 'bert.encoder.layer.0.attention.output' is a BertSelfOutput, not a linear layer"):
        attach(tiny_bert(), ("houlsby", {"targets": ["re:.*layer\\.0\\.attention\\.output"]}))
    with pytest.raises(SlimtuneError, match="method.targets: pattern 'nothing' matches no module"):
        attach(tiny_bert(), ("pfeiffer", {"targets": ["nothing"]}))
