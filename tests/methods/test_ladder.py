"""Ladder Side-Tuning against a plain re-computation of its formula, its isolation from the backbone
(no gradient, no saved activation), pruned initialisation, layer dropping, the hidden-state cache,
the closed-form parameter count, and a whole run through the pipeline."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimtune.errors import SlimtuneError
from slimtune.methods.base import get_method_class
from slimtune.recipe import validate_recipe
from slimtune.runner import evaluate_run, train_run
from tests.fixtures import attach, disable_dropout, engine_per_sample, loop_reference, make_batch, tiny_bert, tiny_llama, token_batch


def lst_delta(model, objective="classification", **fields):
    delta = attach(model, ("lst", fields), objective=objective)
    return delta, delta.methods[0]


def llama_lm():
    return tiny_llama(lm=True)


# (factory, objective, fields): Llama's head dim 8 needs r <= 4 for an even side head dim.
CASES = [
    (tiny_bert, "classification", {}),
    (tiny_llama, "classification", {"r": 4}),
    (llama_lm, "lm", {"r": 4}),
]
IDS = ["bert-cls", "llama-cls", "llama-lm"]


def with_labels(batch, objective):
    batch = dict(batch)
    if objective == "lm":
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([0, 1, 1])
    return batch


def backbone_layers(model):
    return model.bert.encoder.layer if hasattr(model, "bert") else model.model.layers


# ------------------------------------------------------------------------------ the formula


def test_gates_at_init_are_sigmoid_of_zero_over_T():
    model = tiny_bert()
    _, method = lst_delta(model)
    assert len(model.lst.gates) == 2
    for j in range(2):
        assert float(model.lst.gates[j].detach()) == 0.0
        assert float(model.lst.gate(j).detach()) == 0.5
    model = tiny_bert()
    lst_delta(model, gate_alpha=0.2, gate_T=0.1)
    assert float(model.lst.gate(0).detach()) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))


@pytest.mark.parametrize("factory,objective,fields", CASES, ids=IDS)
def test_output_equals_a_plain_recomputation(factory, objective, fields):
    """out = up(norm(s_L)), s_j = block_j(g_j s_{j-1} + (1 - g_j) down_j(h_{l_j})), s_0 = down_0(e),
    recomputed from an untouched copy of the backbone's layer outputs (unpadded batch)."""
    model = factory()
    plain = copy.deepcopy(model)
    _, method = lst_delta(model, objective, **fields)
    torch.manual_seed(3)
    with torch.no_grad():
        for gate in model.lst.gates:
            gate.normal_(std=0.3)
    batch = token_batch(batch=2, seq=6)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    model.eval()
    with torch.no_grad():
        actual = model(**batch).logits

    captured = {}
    layers = backbone_layers(plain)
    layers[0].register_forward_pre_hook(lambda m, a, k: captured.__setitem__("e", a[0]), with_kwargs=True)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
    side = model.lst
    with torch.no_grad():
        plain(**batch)
        s = side.first_down(captured["e"])
        positions = torch.arange(6)[None]
        for j, layer_index in enumerate(method.ladder):
            g = torch.sigmoid(side.gates[j] / 0.1)
            s = g * s + (1 - g) * side.downs[j](captured[layer_index])
            if side.rotary is None:
                s = side.blocks[j](s, None)
            else:
                s = side.blocks[j](s, attention_mask=None, position_ids=positions, position_embeddings=side.rotary(s, positions))
        if side.final_norm is not None:
            s = side.final_norm(s)
        out = side.up(s)
        if hasattr(model, "bert"):
            expected = model.classifier(model.bert.pooler(out))
        elif objective == "lm":
            expected = model.lm_head(out)
        else:
            expected = model.score(out)[:, -1]  # no padding: the last token
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory,objective,fields", CASES, ids=IDS)
def test_output_shape_and_loss(factory, objective, fields):
    model = factory()
    lst_delta(model, objective, **fields)
    batch = with_labels(token_batch(), objective)
    model.eval()
    out = model(**batch)
    if objective == "lm":
        assert out.logits.shape == (3, 7, 100)
        expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    else:
        assert out.logits.shape == (3, 2)
        expected = F.cross_entropy(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss, expected)


# ------------------------------------------------------------------------------ isolation


@pytest.mark.parametrize("factory,objective,fields", CASES, ids=IDS)
def test_no_gradient_reaches_the_backbone_even_if_it_asks_for_one(factory, objective, fields):
    model = factory()
    delta, _ = lst_delta(model, objective, **fields)
    trainable = set(delta.trainable_parameters(model))
    backbone = {n: p for n, p in model.named_parameters() if n not in trainable}
    model.train()
    model(**with_labels(token_batch(), objective)).loss.backward()
    assert all(p.grad is None for p in backbone.values())
    # Even a backbone that asks for gradients gets none: its layers run under no_grad and the
    # side network reads detached embeddings. (The frozen LM head reads the side output by design.)
    model.zero_grad(set_to_none=True)
    for name, p in backbone.items():
        p.requires_grad_(not name.startswith("lm_head"))
    model(**with_labels(token_batch(), objective)).loss.backward()
    assert [n for n, p in backbone.items() if p.grad is not None] == []
    side = {n: p for n, p in model.named_parameters() if n.startswith("lst.")}
    assert all(p.grad is not None for p in side.values())


@pytest.mark.parametrize("factory,objective,fields", CASES, ids=IDS)
def test_no_backbone_activation_is_saved_for_backward(factory, objective, fields):
    """No tensor is saved for backward while any backbone module runs; the only backbone tensors
    autograd keeps are the ladder inputs (the layer outputs each down-projection reads)."""
    model = factory()
    lst_delta(model, objective, **fields)
    inside = []
    # The modules inside each backbone layer (not the layer itself: its wrapped forward also
    # advances the side stream, which must save its own activations).
    inner = [m for layer in backbone_layers(model) for child in layer.children() for m in child.modules()]
    for module in inner:
        module.register_forward_pre_hook(lambda *a: inside.append(1) and None)
        module.register_forward_hook(lambda *a: inside.pop() and None)
    saved_inside = []

    def pack(t):
        if inside:
            saved_inside.append(tuple(t.shape))
        return t

    model.train()
    batch = with_labels(token_batch(), objective)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    assert saved_inside == []


def test_lst_saves_far_fewer_activation_bytes_than_lora():
    from slimtune.measure.memory import TrainingMemoryMeter

    def activations(method, **fields):
        torch.manual_seed(0)
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, max_position_embeddings=64, attn_implementation="sdpa")
        model = BertForSequenceClassification(config)
        attach(model, (method, fields))
        model.train()
        meter = TrainingMemoryMeter()
        batch = with_labels(token_batch(seq=48), "classification")
        with meter.track_forward():
            loss = model(**batch).loss
        loss.backward()
        meter.finish(model)
        return meter.components["activations"]

    # (tiny widths make the ladder inputs weigh a lot; on MiniLM-L6 see benchmarks/memory.py)
    assert activations("lst", r=4) < 0.5 * activations("lora", r=4)


def test_backbone_stays_in_eval_mode_while_the_side_network_trains():
    model = tiny_bert()
    lst_delta(model)
    model.train()
    model(**token_batch())
    assert not model.bert.embeddings.dropout.training
    assert not model.bert.encoder.layer[0].attention.self.training
    assert model.lst.blocks[0].output.dropout.training
    assert model.dropout.training and model.bert.pooler.training


# ------------------------------------------------------------------------------ initialisation


def test_pruned_bert_blocks_equal_the_kept_rows_and_columns():
    model = tiny_bert()
    layers = [copy.deepcopy(layer) for layer in model.bert.encoder.layer]
    _, method = lst_delta(model, r=2)
    assert torch.equal(method.selection[0]["hidden"], method.selection[1]["hidden"])
    for j, (block, layer, keep) in enumerate(zip(model.lst.blocks, layers, method.selection)):
        h, qk, vo, ffn = keep["hidden"], keep["qk"], keep["vo"], keep["ffn"]
        assert len(h) == 16 and len(qk) == 16 and len(ffn) == 32
        assert all(len(set((qk[k * 4:(k + 1) * 4] // 8).tolist())) == 1 for k in range(4))  # 4 dims of each of the 4 heads
        pairs = [
            (block.attention.self.query, layer.attention.self.query, qk, h),
            (block.attention.self.key, layer.attention.self.key, qk, h),
            (block.attention.self.value, layer.attention.self.value, vo, h),
            (block.attention.output.dense, layer.attention.output.dense, h, vo),
            (block.intermediate.dense, layer.intermediate.dense, ffn, h),
            (block.output.dense, layer.output.dense, h, ffn),
        ]
        for side, base, rows, cols in pairs:
            assert torch.equal(side.weight, base.weight[rows][:, cols])
            assert torch.equal(side.bias, base.bias[rows])
        assert torch.equal(block.output.LayerNorm.weight, layer.output.LayerNorm.weight[h])
        assert torch.equal(block.attention.output.LayerNorm.bias, layer.attention.output.LayerNorm.bias[h])
        # the kept FFN neurons are the most important by magnitude
        score = layer.intermediate.dense.weight.abs().sum(1) + layer.output.dense.weight.abs().sum(0)
        assert score[ffn].min() >= score[[i for i in range(64) if i not in set(ffn.tolist())]].max()


def test_pruned_llama_blocks_equal_the_kept_rows_and_columns_with_rotary_pairs():
    model = tiny_llama(lm=True)
    layers = [copy.deepcopy(layer) for layer in model.model.layers]
    base_inv_freq = model.model.rotary_emb.inv_freq.clone()
    _, method = lst_delta(model, "lm", r=2)
    for block, layer, keep in zip(model.lst.blocks, layers, method.selection):
        h, q, k, v, o, ffn = (keep[x] for x in ("hidden", "q", "k", "v", "o", "ffn"))
        pairs = keep["rope_pairs"]
        assert len(pairs) == 2 and len(q) == 4 * 4 and len(k) == 2 * 4
        assert torch.equal(q[:4], torch.cat([pairs, pairs + 4]))  # rotary pairs (i, i + head_dim/2) kept together
        checks = [
            (block.self_attn.q_proj, layer.self_attn.q_proj, q, h),
            (block.self_attn.k_proj, layer.self_attn.k_proj, k, h),
            (block.self_attn.v_proj, layer.self_attn.v_proj, v, h),
            (block.self_attn.o_proj, layer.self_attn.o_proj, h, o),
            (block.mlp.gate_proj, layer.mlp.gate_proj, ffn, h),
            (block.mlp.up_proj, layer.mlp.up_proj, ffn, h),
            (block.mlp.down_proj, layer.mlp.down_proj, h, ffn),
        ]
        for side, base, rows, cols in checks:
            assert torch.equal(side.weight, base.weight[rows][:, cols])
        assert torch.equal(block.input_layernorm.weight, layer.input_layernorm.weight[h])
        # value dims of each query head follow its key/value head (GQA groups of 2)
        assert torch.equal(o[:4] % 8, v[:4] % 8) and torch.equal(o[4:8] % 8, v[:4] % 8)
    assert torch.equal(model.lst.rotary.inv_freq, base_inv_freq[method.selection[0]["rope_pairs"]])


def test_random_init_is_not_the_pruned_copy():
    pruned, random = tiny_bert(), tiny_bert()
    lst_delta(pruned, r=2)
    lst_delta(random, r=2, init="random")
    assert not torch.equal(pruned.lst.blocks[0].attention.self.query.weight, random.lst.blocks[0].attention.self.query.weight)


# ------------------------------------------------------------------------------ layers, counts


@pytest.mark.parametrize(
    "fields,ladder",
    [({}, [0, 1]), ({"drop_every": 2}, [0]), ({"ladder_layers": [1]}, [1])],
)
def test_layer_dropping_selects_the_ladders(fields, ladder):
    model = tiny_bert()
    _, method = lst_delta(model, **fields)
    assert method.ladder == ladder
    assert len(model.lst.blocks) == len(model.lst.downs) == len(model.lst.gates) == len(ladder)
    logits = model(**token_batch()).logits
    assert logits.shape == (3, 2)
    logits.sum().backward()
    # every ladder feeds the output: each side block, down-projection and gate gets a gradient
    for part in (model.lst.blocks, model.lst.downs, model.lst.gates):
        for j, module in enumerate(part):
            params = [module] if isinstance(module, torch.nn.Parameter) else list(module.parameters())
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (j, type(module).__name__)


def test_bad_layer_choices_are_one_line_errors():
    with pytest.raises(SlimtuneError, match="ladder_layers: layer 5 does not exist"):
        lst_delta(tiny_bert(), ladder_layers=[5])
    with pytest.raises(SlimtuneError, match="must be even"):
        lst_delta(tiny_llama(), r=8)
    with pytest.raises(Exception, match="either ladder_layers or drop_every"):
        get_method_class("lst").Config(ladder_layers=[0], drop_every=2)


@pytest.mark.parametrize(
    "factory,objective,fields",
    CASES + [(tiny_bert, "classification", {"drop_every": 2, "bias": False}), (llama_lm, "lm", {"r": 2, "ladder_layers": [1]})],
)
def test_trainable_count_equals_the_closed_form(factory, objective, fields):
    model = factory()
    delta, method = lst_delta(model, objective, **fields)
    assert method.param_count(model) == method.expected_param_count(model)
    if factory is tiny_bert and not fields:
        # d=32, r=8: d_s=4, f_s=8, L=2: ladders 3*(32*4+4) + gates 2 + up 4*32+32, blocks 2*(4*(16+4)+2*32+8+4+16)
        assert method.param_count(model) == 3 * 132 + 2 + 160 + 2 * (80 + 64 + 28)


# ------------------------------------------------------------------------------ the cache


def test_cache_replays_hidden_states_and_skips_the_backbone():
    model = tiny_bert()
    _, method = lst_delta(model, cache_hidden_states={"max_bytes": 10**7})
    disable_dropout(model)
    calls = []
    model.bert.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
    batch = token_batch()
    model.train()
    first = model(**batch).logits
    assert len(calls) == 1 and method.cache.hits == 0 and len(method.cache.entries) == 3
    second = model(**batch).logits
    assert len(calls) == 1 and method.cache.hits == 1  # the backbone layers did not run
    torch.testing.assert_close(second, first)
    # the same examples padded to another length still hit (keys are the unpadded tokens)
    padded = {k: torch.cat([v, torch.zeros(3, 2, dtype=v.dtype)], 1) for k, v in batch.items()}
    third = model(**padded).logits
    assert len(calls) == 1 and method.cache.hits == 2
    torch.testing.assert_close(third, first, atol=1e-5, rtol=1e-5)
    third.sum().backward()
    assert model.lst.up.weight.grad is not None


def test_cache_bound_is_respected_and_beyond_it_states_are_computed():
    model = tiny_bert()
    # one example of 7 tokens x 32 dims x 4 bytes x 2 layers = 1792 bytes: room for exactly one
    _, method = lst_delta(model, cache_hidden_states={"max_bytes": 2000})
    model.train()
    batch = token_batch()
    model(**batch)
    assert len(method.cache.entries) == 1 and method.cache.bytes <= 2000
    model(**batch)
    assert method.cache.hits == 0 and method.cache.misses == 2
    model.eval()
    other = token_batch(seed=5)
    model(**other)
    assert len(method.cache.entries) == 1  # nothing is stored outside training


def test_no_kv_cache_decoding():
    model = llama_lm()
    lst_delta(model, "lm", r=4)
    model.eval()
    out = model(**token_batch(), use_cache=True)
    with pytest.raises(SlimtuneError, match="KV cache"):
        model(input_ids=torch.tensor([[5], [6], [7]]), cache=out.past_key_values)


# ------------------------------------------------------------------------------ DP-SGD


@pytest.mark.parametrize("factory,objective,fields", CASES[:2], ids=IDS[:2])
def test_dp_per_sample_gradients_of_the_gates_need_no_fallback(factory, objective, fields):
    """The gate logits have an exact per-sample rule (their merge is a module's forward): no
    demotion to the batched-backward fallback, which warned in every DP run of lst."""
    model = factory()
    delta, _ = lst_delta(model, objective, **fields)
    disable_dropout(model)
    with torch.no_grad():
        for gate in model.lst.gates:
            gate.normal_(std=0.3)
    model.double()
    params = delta.trainable_parameters(model)
    batch = make_batch(3, 6)
    expected = loop_reference(model, params, batch, objective)
    got, clipper = engine_per_sample(model, params, batch, objective)  # a demotion (a warning) fails
    assert not clipper.fallback
    assert {clipper.describe()[n] for n in params if ".gates." in n} == {"module-vmap"}
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    assert any(bool(got[n].abs().sum()) for n in params if ".gates." in n)


# ------------------------------------------------------------------------------ pipeline


def test_trains_and_the_delta_round_trips_through_evaluate_run(tiny_recipe, tmp_path):
    tiny_recipe["method"] = {"name": "lst", "r": 4, "cache_hidden_states": {"max_bytes": 10**8}}
    tiny_recipe["train"]["max_steps"] = 12
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    assert report["params"]["trainable"] > 0
    assert report["train"]["peak_memory_bytes"] > 0
    assert report["lst_cache"]["entries"] > 0 and report["lst_cache"]["hit_batches"] > 0  # 12 steps > 1 epoch of 8 batches
    result = evaluate_run(tmp_path / "run")
    assert result["metrics"] == report["metrics"]
