"""Physical removal of heads and FFN neurons: the slimmed model computes what the masked dense
model computes (the removed units' contributions zeroed), within 1e-5."""

import copy

import pytest
import torch
from transformers import MPNetConfig, MPNetForSequenceClassification

from slimtune.errors import SlimtuneError
from slimtune.sparsity.structured import (
    apply_shape_record,
    head_dim_of,
    layer_parts,
    remove_ffn_neurons,
    remove_heads,
    shape_record,
)
from tests.tiny import tiny_bert, tiny_llama, token_batch


def tiny_mpnet():
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return MPNetForSequenceClassification(config).eval()


def masked_dense(model, heads, neurons):
    """The dense model with a 0/1 mask on each removed head's context (the output projection's
    input) and on each removed neuron's activation (the FFN output projection's input)."""
    model = copy.deepcopy(model)
    head_dim = head_dim_of(model)
    for i, parts in enumerate(layer_parts(model)):
        o = model.get_submodule(parts.o)
        head_mask = torch.ones(o.in_features)
        for h in heads.get(i, []):
            head_mask[h * head_dim:(h + 1) * head_dim] = 0
        o.register_forward_pre_hook(lambda m, args, mask=head_mask: (args[0] * mask,))
        ffn_out = model.get_submodule(parts.ffn_out)
        neuron_mask = torch.ones(ffn_out.in_features)
        neuron_mask[list(neurons.get(i, []))] = 0
        ffn_out.register_forward_pre_hook(lambda m, args, mask=neuron_mask: (args[0] * mask,))
    return model


def outputs(model, batch):
    with torch.no_grad():
        return model(**batch).logits


HEADS = {0: [1, 3], 1: [0]}
NEURONS = {0: list(range(0, 64, 3)), 1: [5, 6, 7, 40]}


@pytest.mark.parametrize("factory", [tiny_bert, tiny_mpnet], ids=["bert", "mpnet"])
def test_slimmed_equals_masked_dense(factory):
    model = factory()
    batch = token_batch()
    expected = outputs(masked_dense(model, HEADS, NEURONS), batch)
    slim = copy.deepcopy(model)
    remove_heads(slim, HEADS)
    record = remove_ffn_neurons(slim, NEURONS)
    assert torch.allclose(outputs(slim, batch), expected, atol=1e-5)
    assert [len(layer["heads"]) for layer in record["layers"]] == [2, 3]
    assert [len(layer["neurons"]) for layer in record["layers"]] == [64 - 22, 60]
    first = slim.get_submodule(layer_parts(slim)[0].q)
    assert tuple(first.weight.shape) == (2 * 8, 32)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_removals_compose_and_all_heads_can_go():
    model = tiny_bert()
    batch = token_batch()
    heads = {0: [0, 1, 2, 3], 1: [2]}
    expected = outputs(masked_dense(model, heads, {1: list(range(64))}), batch)
    slim = copy.deepcopy(model)
    remove_heads(slim, {0: [0, 1]})
    remove_heads(slim, {0: [2, 3], 1: [2]})
    remove_ffn_neurons(slim, {1: list(range(64))})
    assert torch.allclose(outputs(slim, batch), expected, atol=1e-5)
    with pytest.raises(SlimtuneError, match="layer 1 has no head 2"):
        remove_heads(slim, {1: [2]})


def test_llama_gqa_removes_query_heads_consistently():
    model = tiny_llama()  # 4 query heads, 2 KV groups of 2
    batch = token_batch()
    heads = {0: [1, 3], 1: [2, 3]}  # layer 0: one query head per group; layer 1: the whole group 1
    neurons = {0: [1, 2, 3]}
    expected = outputs(masked_dense(model, heads, neurons), batch)
    slim = copy.deepcopy(model)
    remove_heads(slim, heads)
    record = remove_ffn_neurons(slim, neurons)
    assert torch.allclose(outputs(slim, batch), expected, atol=1e-5)
    assert record["layers"][0]["kv_heads"] == [0, 1] and record["layers"][1]["kv_heads"] == [0]
    with pytest.raises(SlimtuneError, match="same number in every kept group"):
        remove_heads(copy.deepcopy(model), {0: [0]})


def test_shape_record_rebuilds_the_slimmed_shapes():
    model = tiny_bert()
    slim = copy.deepcopy(model)
    remove_heads(slim, HEADS)
    record = remove_ffn_neurons(slim, NEURONS)
    rebuilt = apply_shape_record(tiny_bert(), record)
    rebuilt.load_state_dict(slim.state_dict())
    assert shape_record(rebuilt) == record
    batch = token_batch()
    assert torch.equal(outputs(rebuilt, batch), outputs(slim, batch))


def test_bad_requests():
    model = tiny_bert()
    with pytest.raises(SlimtuneError, match="layer 5 out of range"):
        remove_heads(model, {5: [0]})
    with pytest.raises(SlimtuneError, match="has no neuron 64"):
        remove_ffn_neurons(model, {0: [64]})
