"""DSEE's structured stage 2 and its extensions: FFN neurons removed with the heads, head and
neuron scores (the paper's update rule and the data criteria), replay from the saved delta, and
checkpoint/resume around the prune step. Tiny random BERT (4 heads, 64 FFN neurons, 2 layers)."""

import copy

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors
from slimtune.core.arch import Arch
from slimtune.methods.dsee import DSEE, DSEELinear
from slimtune.methods.dsee.stage2 import run_stage2
from slimtune.recipe import validate_recipe
from slimtune.runner import build, evaluate_run, train_run
from slimtune.sparsity.structured import head_dim_of, layer_parts
from slimtune.sparsity.importance import unit_importance
from tests.fixtures import tiny_bert, token_batch


def attached(**fields):
    model = tiny_bert()
    method = DSEE({"r": 4, "num_sparse": 10, "decomposition_rank": 4, "prune": "heads", **fields})
    method.attach(model, Arch.of(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DSEELinear):
                module.lora_B.normal_(std=0.2)
                module.sparse_values.normal_(std=0.2)
    return model, method


def masked_reference(model, heads, neurons):
    """The merged dense model with the removed heads' and neurons' contributions zeroed (their
    columns of the attention output / FFN output projections): what the slimmed model must equal."""
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        if isinstance(module, DSEELinear):
            module.merge(keep_original=False)
    head_dim = head_dim_of(reference)
    with torch.no_grad():
        for i, parts in enumerate(layer_parts(reference)):
            o = reference.get_submodule(parts.o)
            for h in heads.get(i, []):
                o.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            ffn_out = reference.get_submodule(parts.ffn_out)
            for n in neurons.get(i, []):
                ffn_out.weight[:, n] = 0
    return reference


def test_heads_and_ffn_removal_keep_the_remaining_computation():
    model, method = attached(heads_per_layer=1, ffn_fraction=0.25)
    heads, neurons = {0: [2], 1: [0]}, {0: list(range(0, 64, 4)), 1: list(range(1, 64, 4))}
    reference = masked_reference(model, heads, neurons)
    batch = token_batch(seq=9, vocab=100)
    with torch.no_grad():
        expected = reference(**batch).logits
    run_stage2(method, model, heads=heads, neurons=neurons, replay=True)
    parts = layer_parts(model)
    assert model.get_submodule(parts[0].ffn_in[0]).out_features == 48
    assert model.get_submodule(parts[1].ffn_out).in_features == 48
    # Stage 2's fresh update starts at B = 0, S = 0: the function is the pruned stage-1 model.
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)
    state = method.delta_state_dict(model)
    assert state["dsee_removed_neurons.layer.0"].tolist() == neurons[0]
    assert state["dsee_removed_heads.layer.1"].tolist() == [0]


def test_update_score_is_the_papers_l1_of_the_stage1_update():
    model, method = attached(heads_per_layer=1)
    head_dim = head_dim_of(model)
    expected = {}
    for i, parts in enumerate(layer_parts(model)):
        total = sum(model.get_submodule(p).delta_weight().detach().abs().sum(1).view(-1, head_dim).sum(1) for p in (parts.q, parts.v))
        expected[i] = [int(total.argmin())]
    info = run_stage2(method, model)
    assert info["removed_heads"] == expected
    assert info["removed_neurons_per_layer"] == {}


@pytest.mark.parametrize("criterion", ["taylor", "magnitude"])
def test_data_and_magnitude_scores_rank_on_the_merged_model(criterion):
    model, method = attached(heads_per_layer=2, head_score=criterion, ffn_fraction=0.5, ffn_score=criterion)
    batches = [{**token_batch(seed=s), "labels": torch.tensor([0, 1, 1])} for s in range(2)]
    merged = masked_reference(model, {}, {})
    heads, neurons = unit_importance(merged, criterion, batches=batches if criterion == "taylor" else None)
    info = run_stage2(method, model, batches=batches)
    for layer in (0, 1):
        want_heads = sorted(sorted(heads[layer], key=heads[layer].get)[:2])
        want_neurons = sorted(sorted(neurons[layer], key=neurons[layer].get)[:32])
        assert info["removed_heads"][layer] == want_heads
        assert method.removed_neurons[layer] == want_neurons
    assert info["removed_neurons_per_layer"] == {0: 32, 1: 32}


def test_global_scope_ranks_units_across_layers():
    model, method = attached(heads_per_layer=1, head_score="magnitude", ffn_fraction=0.25, ffn_score="magnitude", structured_scope="global")
    heads, neurons = unit_importance(masked_reference(model, {}, {}), "magnitude")
    info = run_stage2(method, model)
    flat_heads = sorted((s, layer, h) for layer, units in heads.items() for h, s in units.items())[:2]
    flat_neurons = sorted((s, layer, n) for layer, units in neurons.items() for n, s in units.items())[:32]
    assert sum(len(v) for v in info["removed_heads"].values()) == 2
    assert {(layer, h) for _, layer, h in flat_heads} == {(layer, h) for layer, hs in info["removed_heads"].items() for h in hs}
    assert {(layer, n) for _, layer, n in flat_neurons} == {(layer, n) for layer, ns in method.removed_neurons.items() for n in ns}


def test_bad_stage2_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="ffn_fraction 0.3 needs prune: heads"):
        DSEE({"prune": "unstructured", "ffn_fraction": 0.3})
    with pytest.raises(ValueError, match="would remove nothing"):
        DSEE({"prune": "heads", "heads_per_layer": 0})
    model, method = attached(heads_per_layer=1, head_score="fisher")
    with pytest.raises(SlimtuneError, match="'fisher' needs training batches"):
        run_stage2(method, model)


def stage2_recipe(tiny_recipe, **fields):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "dsee", "r": 4, "num_sparse": 16, "decomposition_rank": 4, "prune": "heads",
                        "heads_per_layer": 1, "ffn_fraction": 0.25, "ffn_score": "taylor", "head_score": "taylor",
                        "score_batches": 2, **fields}
    return recipe


def test_heads_plus_ffn_run_saves_more_flops_and_the_delta_replays(tmp_path, tiny_recipe):
    report = train_run(validate_recipe(stage2_recipe(tiny_recipe)), tmp_path / "run", progress=False)
    info = report["dsee"]
    assert info["stage"] == 2 and sorted(info["removed_neurons_per_layer"].values()) == [16, 16]
    heads_only = train_run(validate_recipe(stage2_recipe(tiny_recipe, ffn_fraction=0.0)), tmp_path / "heads", progress=False)
    assert info["flops_saved"] > heads_only["dsee"]["flops_saved"] > 0
    assert report["inference"]["flops_per_example"] == info["flops_per_example_after"]
    # The saved delta (stage-1 update, removed heads and neurons, stage-2 update) rebuilds the model.
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == report["metrics"]


def test_resume_around_the_prune_step_gives_the_same_delta(tmp_path, tiny_recipe):
    from tests.fixtures import crash_run

    recipe = stage2_recipe(tiny_recipe)
    recipe["train"].update(max_steps=12, checkpoint_every=3)
    recipe = validate_recipe(recipe)
    whole_report = train_run(recipe, tmp_path / "whole", progress=False)

    whole = read_safetensors(tmp_path / "whole/delta.safetensors")
    # Stage 2 runs at step 6. Crashed before it (checkpoint 3), right after it (checkpoints 3 and
    # 6) or with only post-prune checkpoints left (6 and 9; KEEP_LAST = 2): a post-prune checkpoint
    # replays stage 2 from its saved stage-1 update and removed units, then loads its parameters.
    for name, step, resumed_from in (("early", 5, 3), ("at", 7, 6), ("late", 10, 9)):
        crash_run(recipe, tmp_path / name, step)
        report = train_run(recipe, tmp_path / name, resume=True, progress=False)
        assert report["train"]["resumed_from_step"] == resumed_from
        assert not [p for p in (tmp_path / name / "checkpoints").iterdir() if p.name.startswith("corrupt")]
        resumed = read_safetensors(tmp_path / name / "delta.safetensors")
        assert whole.keys() == resumed.keys()
        for key in whole:
            assert torch.allclose(whole[key].float(), resumed[key].float(), atol=1e-6), (name, key)
        assert report["dsee"]["flops_saved"] == whole_report["dsee"]["flops_saved"]


def test_stage2_misfits_are_refused_when_the_run_is_built(tiny_recipe):
    recipe = stage2_recipe(tiny_recipe)
    recipe["method"] = [recipe["method"], {"name": "bitfit"}]
    with pytest.raises(SlimtuneError, match=r"method: 'dsee' restructures the model during training \(its stage 2, prune: heads\), which 'bitfit'"):
        build(validate_recipe(recipe))
    with pytest.raises(SlimtuneError, match="method.heads_per_layer: 4 would remove every head of a layer"):
        build(validate_recipe(stage2_recipe(tiny_recipe, heads_per_layer=4)))
    model, method = attached(heads_per_layer=1, ffn_fraction=0.25, ffn_score="fisher", head_score="update")
    with pytest.raises(SlimtuneError, match=r"method.ffn_score: 'fisher' needs training batches, and the task has none; use magnitude$"):
        run_stage2(method, model)


def test_llama_grouped_query_heads_are_removed_by_whole_groups():
    from tests.fixtures import tiny_llama

    model = tiny_llama()
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert n_kv < n_heads
    group = n_heads // n_kv
    method = DSEE({"r": 2, "num_sparse": 4, "decomposition_rank": 2, "prune": "heads", "heads_per_layer": group, "head_score": "magnitude"})
    method.attach(model, Arch.of(model))
    dense = copy.deepcopy(model)
    info = run_stage2(method, model)
    for heads in info["removed_heads"].values():
        assert len(heads) == group and heads == list(range(heads[0], heads[0] + group)) and heads[0] % group == 0
    # the slimmed model computes the merged dense one with those heads' contexts zeroed
    removed = {int(layer): heads for layer, heads in info["removed_heads"].items()}
    assert removed
    reference = masked_reference(dense, removed, {})
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
