"""Physical removal of heads and FFN neurons: the slimmed model computes what the masked dense
model computes (the removed units' contributions zeroed), within 1e-5."""

import copy

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.sparsity.structured import (
    apply_shape_record,
    head_dim_of,
    layer_parts,
    remove_ffn_neurons,
    remove_heads,
    shape_record,
)
from tests.fixtures import tiny_bert, tiny_llama, token_batch
from tests.fixtures import tiny_mpnet as _tiny_mpnet


def tiny_mpnet():
    return _tiny_mpnet(max_position_embeddings=64)


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


# --------------------------------------------------------------------------------------------
# Importance scores: recomputed the slow, obvious way.
# --------------------------------------------------------------------------------------------

from slimtune.sparsity.importance import (  # noqa: E402
    lora_rank_importance,
    prune_lora_ranks,
    select_heads,
    select_lowest,
    unit_importance,
)


def labelled_batches(n=2):
    batches = []
    for seed in range(n):
        batch = token_batch(seed=seed)
        batch["labels"] = torch.tensor([0, 1, 1])
        batches.append(batch)
    return batches


def explicit_gate_gradients(model, batches):
    """dL/dg for a gate g = 1 multiplying each head's context and each neuron's activation,
    by autograd through explicit gates (the definition, not the w.g shortcut)."""
    head_dim = head_dim_of(model)
    parts = layer_parts(model)
    head_gates = [torch.ones(model.config.num_attention_heads, requires_grad=True) for _ in parts]
    neuron_gates = [torch.ones(model.config.intermediate_size, requires_grad=True) for _ in parts]
    for i, p in enumerate(parts):
        model.get_submodule(p.o).register_forward_pre_hook(
            lambda m, args, g=head_gates[i]: (args[0] * g.repeat_interleave(head_dim),))
        model.get_submodule(p.ffn_out).register_forward_pre_hook(lambda m, args, g=neuron_gates[i]: (args[0] * g,))
    per_batch = []
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, head_gates + neuron_gates)
        per_batch.append(grads)
    return per_batch, len(parts)


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_gate_scores_match_explicit_gates(criterion):
    batches = labelled_batches()
    heads, neurons = unit_importance(tiny_bert(), criterion, batches=batches)
    per_batch, n_layers = explicit_gate_gradients(tiny_bert(), batches)
    reduce = (lambda g: g.abs()) if criterion == "taylor" else (lambda g: g.pow(2))
    for i in range(n_layers):
        want_heads = sum(reduce(grads[i]) for grads in per_batch) / len(per_batch)
        want_neurons = sum(reduce(grads[n_layers + i]) for grads in per_batch) / len(per_batch)
        assert torch.allclose(torch.tensor([heads[i][h] for h in range(4)]), want_heads, rtol=1e-4, atol=1e-8)
        assert torch.allclose(torch.tensor([neurons[i][n] for n in range(64)]), want_neurons, rtol=1e-4, atol=1e-8)


def test_magnitude_and_delta_scores():
    model = tiny_bert()
    heads, neurons = unit_importance(model, "magnitude")
    layer = model.bert.encoder.layer[1]
    h = 2
    rows = slice(h * 8, (h + 1) * 8)
    want = torch.sqrt(sum(w.weight[rows].pow(2).sum() for w in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value))
                      + layer.attention.output.dense.weight[:, rows].pow(2).sum())
    assert heads[1][h] == pytest.approx(float(want), rel=1e-5)
    want = torch.sqrt(layer.intermediate.dense.weight[7].pow(2).sum() + layer.output.dense.weight[:, 7].pow(2).sum())
    assert neurons[1][7] == pytest.approx(float(want), rel=1e-5)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        layer.output.dense.weight[:, 7] += 3.0
    _, moved = unit_importance(model, "delta", reference=reference)
    assert moved[1][7] == pytest.approx(3.0 * 32 ** 0.5, rel=1e-5)
    assert max(v for k, v in moved[1].items() if k != 7) == 0
    with pytest.raises(SlimtuneError, match="needs batches"):
        unit_importance(model, "taylor")


def test_global_and_local_budgets():
    scores = {0: {0: 0.1, 1: 0.2, 2: 5.0, 3: 6.0}, 1: {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}}
    assert select_lowest(scores, 0.5, "global") == {0: [0, 1], 1: [0, 1]}
    assert select_lowest(scores, 0.25, "global") == {0: [0, 1], 1: []}
    assert select_lowest(scores, 0.25, "local") == {0: [0], 1: [0]}
    with pytest.raises(SlimtuneError, match=r"in \[0, 1\)"):
        select_lowest(scores, 1.0)


def test_gqa_selection_removes_whole_kv_groups():
    model = tiny_llama()  # 4 query heads in 2 KV groups
    scores = {0: {0: 9.0, 1: 9.0, 2: 0.1, 3: 0.2}, 1: {0: 0.1, 1: 9.0, 2: 5.0, 3: 5.0}}
    chosen = select_heads(model, scores, 0.5, "global")
    assert chosen == {0: [2, 3], 1: [0, 1]}  # group sums: (18, 0.3), (9.1, 10): the two lowest go
    batch = token_batch()
    expected = outputs(masked_dense(model, chosen, {}), batch)
    remove_heads(model, chosen)
    assert [model.get_submodule(p.o).in_features for p in layer_parts(model)] == [16, 16]  # 2 of 4 heads of dim 8 left
    torch.testing.assert_close(outputs(model, batch), expected, atol=1e-5, rtol=1e-5)


def tiny_lora_model(r=4):
    from slimtune.core.arch import Arch
    from slimtune.methods.delta import Delta
    from slimtune.recipe import MethodSpec
    from slimtune.methods.lora import LoRAConfig

    model = tiny_bert()
    delta = Delta.from_specs([MethodSpec(name="lora", config=LoRAConfig(r=r))])
    delta.attach(model, Arch.of(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_lora_rank_pruning_keeps_the_top_singular_directions():
    model = tiny_lora_model()
    layer = model.bert.encoder.layer[0].attention.self.query
    before = layer.delta_weight().clone()
    u, s, vh = torch.linalg.svd(before)
    assert lora_rank_importance(model)["bert.encoder.layer.0.attention.self.query"] == pytest.approx(s[:4].tolist(), rel=1e-5)
    kept = prune_lora_ranks(model, 0.5, scope="local")
    assert set(kept.values()) == {2} and layer.lora_A.shape == (2, 32) and layer.lora_B.shape == (32, 2)
    best_rank_2 = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young
    assert torch.allclose(layer.delta_weight(), best_rank_2, atol=1e-5)
    # Pruning nothing re-factorises exactly.
    model = tiny_lora_model()
    batch = token_batch()
    with torch.no_grad():
        want = model(**batch).logits
        prune_lora_ranks(model, 0.0)
        assert torch.allclose(model(**batch).logits, want, atol=1e-5)


def test_lora_rank_taylor_matches_explicit_gates():
    model = tiny_lora_model()
    batches = labelled_batches(1)
    scores = lora_rank_importance(model, "taylor", batches=batches)
    name = "bert.encoder.layer.1.attention.self.value"
    layer = model.get_submodule(name)
    u, s, vh = torch.linalg.svd(layer.delta_weight().detach(), full_matrices=False)
    u, s, vh = u[:, :4], s[:4], vh[:4]
    gate = torch.ones(4, requires_grad=True)
    base_weight = layer.base.weight.detach()  # unmerged: the update is added on top
    handle = layer.register_forward_hook(
        lambda m, args, out: torch.nn.functional.linear(args[0], base_weight + (u * (s * gate)) @ vh, m.base.bias))
    (grad,) = torch.autograd.grad(model(**batches[0]).loss, [gate])
    handle.remove()
    assert torch.allclose(torch.tensor(scores[name]), grad.abs(), rtol=1e-3, atol=1e-7)
