"""(IA)^3 against a plain re-computation, against peft (same outputs with the same vectors, same
parameter count on MiniLM-L6's shape), merge/unmerge exactness, save/load, composition."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from slimtune.errors import SlimtuneError
from tests.fixtures import attach, randomize, round_trip
from tests.fixtures import tiny_bert, tiny_llama, tiny_vit, token_batch


def test_scaling_equals_the_formula():
    model = tiny_bert().double()
    delta = attach(model, "ia3")
    randomize(delta, model)
    attention = model.bert.encoder.layer[0].attention.self
    ffn_out = model.bert.encoder.layer[0].output.dense
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    torch.testing.assert_close(attention.value(x), (x @ attention.value.weight.T + attention.value.bias) * attention.value.ia3_l, rtol=0, atol=1e-12)
    a = torch.randn(2, 4, 64, dtype=torch.float64)
    torch.testing.assert_close(ffn_out(a), (a * ffn_out.ia3_l) @ ffn_out.weight.T + ffn_out.bias, rtol=0, atol=1e-12)


def test_vectors_start_at_one_and_sizes_follow_peft():
    model = tiny_bert()
    batch = token_batch()
    before = model(**batch).logits
    delta = attach(model, "ia3")
    assert torch.equal(model(**batch).logits, before)
    shapes = {n.split("layer.0.")[-1]: tuple(p.shape) for n, p in delta.trainable_parameters(model).items() if "layer.0." in n}
    assert shapes == {
        "attention.self.key.ia3_l": (32,), "attention.self.value.ia3_l": (32,),
        "attention.output.dense.ia3_l": (32,), "output.dense.ia3_l": (64,),
    }
    assert all(torch.equal(p, torch.ones_like(p)) for p in delta.methods[0].trainable_parameters(model).values())


def test_outputs_equal_peft_with_the_same_vectors():
    from peft import IA3Config, get_peft_model

    ours = tiny_bert()
    method = attach(ours, "ia3").methods[0]
    with torch.no_grad():
        for param in method.trainable_parameters(ours).values():
            param.uniform_(0.5, 1.5)
    theirs = get_peft_model(tiny_bert(), IA3Config(task_type="SEQ_CLS"))
    vectors = {n.replace(".ia3_l", ""): p for n, p in method.trainable_parameters(ours).items()}
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "ia3_l" in name:
                module = name.removeprefix("base_model.model.").split(".ia3_l")[0]
                param.copy_(vectors.pop(module).reshape(param.shape))
    assert not vectors
    batch = token_batch()
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=1e-6)


def test_parameter_count_equals_peft_on_minilm_l6_shape():
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2)
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    method = attach(model, "ia3").methods[0]
    # peft 0.21 IA3Config(task_type="SEQ_CLS") on all-MiniLM-L6-v2 reports 16,128 ia3_l entries
    assert method.param_count(model) == method.expected_param_count(model) == 6 * (384 + 384 + 384 + 1536) == 16_128


def test_paper_targets_exclude_the_attention_output():
    model = tiny_bert()
    ff = r"re:.*layer\.\d+\.output\.dense"
    method = attach(model, ("ia3", {"targets": ["key", "value", ff], "feedforward": [ff]})).methods[0]
    assert method.param_count(model) == 2 * (32 + 32 + 64)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_merge_equals_unmerged_and_unmerge_restores_exactly(factory):
    model = factory()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = attach(model, "ia3")
    randomize(delta, model)
    batch = token_batch()
    unmerged = model(**batch).logits
    delta.merge(model)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)
    delta.unmerge(model)
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
    torch.testing.assert_close(model(**batch).logits, unmerged, atol=0, rtol=0)


def check_scales_the_forward(factory, inputs):
    """At init (vectors of ones) the adapted model is the base model; moved off one, the vectors
    change the last hidden states, and merging them into the weights gives the same outputs."""
    def last_hidden(model):
        return model(**inputs, output_hidden_states=True).hidden_states[-1]

    base = last_hidden(factory())
    model = factory()
    delta = attach(model, "ia3")
    assert torch.equal(last_hidden(model), base)
    randomize(delta, model)
    scaled = last_hidden(model)
    assert (scaled - base).abs().max() > 1e-3  # exactly 0 if the vectors were not applied
    delta.merge(model)
    torch.testing.assert_close(last_hidden(model), scaled, atol=1e-5, rtol=1e-5)


def test_vit_defaults():
    model = tiny_vit()
    method = attach(model, "ia3").methods[0]
    assert method.param_count(model) == 2 * (32 + 32 + 64)
    check_scales_the_forward(tiny_vit, {"pixel_values": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))})


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_delta_alone_round_trips(factory, tmp_path):
    round_trip(factory, ["ia3"], token_batch(), tmp_path)


def test_composes_with_lora_on_other_linears_and_conflicts_on_the_same():
    model = tiny_bert()
    delta = attach(model, ("lora", {"targets": ["query"]}), "ia3")
    randomize(delta, model)
    unmerged = model(**token_batch()).logits
    delta.merge(model)
    torch.testing.assert_close(model(**token_batch()).logits, unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimtuneError, match="'ia3' and 'lora' both change '.*value'"):
        attach(tiny_bert(), "lora", "ia3")
    with pytest.raises(SlimtuneError, match="'lora' and 'ia3' both change '.*value'"):
        attach(tiny_bert(), "ia3", "lora")


def test_feedforward_must_be_a_target():
    with pytest.raises(SlimtuneError, match="method.feedforward: 'fc9' is not among method.targets"):
        attach(tiny_bert(), ("ia3", {"targets": ["key"], "feedforward": ["fc9"]}))


def test_mpnet_defaults():
    from tests.fixtures import tiny_mpnet

    model = tiny_mpnet()
    method = attach(model, "ia3").methods[0]
    assert method.param_count(model) == 2 * (32 + 32 + 64)
    check_scales_the_forward(tiny_mpnet, token_batch())
