"""Tensors a criterion cannot rank (every score equal, e.g. LoRA's zero-initialised B) are not
pruned: the other targets are ranked to the density, the report says which were left dense and
the density over the ranked tensors and over all targets; when no target can be ranked (snip at
init on LoRA: B = 0 zeroes A's gradient too) it is a one-line error."""

import copy

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.recipe import validate_recipe
from slimtune.runner import load_run, train_run
from slimtune.sparsity.masks import dense_tensor, get_mask
from slimtune.sparsity.schedules import SparsityHook, prune, select_targets
from tests.fixtures import attach, make_batch, randomize_lora_b, text_logits, tiny_bert


def lora_model():
    torch.manual_seed(0)
    model = tiny_bert()
    delta = attach(model, ("lora", {"r": 4}))
    return model, delta, select_targets(model, delta, "delta")


def density(module, tensor_name):
    mask = get_mask(module, tensor_name)
    return 1.0 if mask is None else float(mask.kept.float().mean())


@pytest.mark.parametrize("scope", ["global", "local"])
def test_magnitude_at_init_leaves_zero_lora_b_dense_and_ranks_a(scope):
    model, _, targets = lora_model()
    kept = prune(model, targets, criterion="magnitude", density=0.5, scope=scope)
    a = {n: t for n, t in targets.items() if n.endswith("lora_A")}
    b = {n: t for n, t in targets.items() if n.endswith("lora_B")}
    assert len(a) == len(b) == 4 and set(kept) == set(a)
    assert all(get_mask(m, t) is None for m, t in b.values())  # B is not masked at all: it can train
    kept_a = sum(int(get_mask(m, t).kept.sum()) for m, t in a.values())
    assert kept_a == sum(dense_tensor(m, t).numel() for m, t in a.values()) // 2  # A alone at density 0.5
    if scope == "local":
        assert all(density(m, t) == 0.5 for m, t in a.values())


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("criterion", ["snip", "synflow"])
def test_no_rankable_target_at_init_is_one_line_error(scope, criterion):
    model, _, targets = lora_model()
    batches = [make_batch(4, 8, seed=s) for s in range(2)]
    with pytest.raises(SlimtuneError, match=rf"'{criterion}' cannot rank any of the 8 target tensors.*sparsity.at: <step>") as err:
        prune(model, targets, criterion=criterion, density=0.5, scope=scope, batches=batches)
    assert "\n" not in str(err.value)
    assert all(get_mask(m, t) is None for m, t in targets.values())  # nothing was masked


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("criterion", ["magnitude", "snip"])
def test_once_b_has_moved_every_target_is_ranked(scope, criterion):
    """At a later step (B no longer zero) both factors are ranked, as before."""
    model, _, targets = lora_model()
    randomize_lora_b(model, std=0.02)
    kept = prune(model, targets, criterion=criterion, density=0.5, scope=scope, batches=[make_batch(4, 8)])
    assert set(kept) == set(targets) and all(get_mask(m, t) is not None for m, t in targets.values())
    total = sum(k.numel() for k in kept.values())
    assert sum(int(k.sum()) for k in kept.values()) == total // 2


def sparse_lora_recipe(tiny_recipe, **sparsity):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["sparsity"] = {"target": "delta", "criterion": "magnitude", "density": 0.5, "at": "init", "batches": 1, **sparsity}
    return recipe


def test_lora_magnitude_at_init_trains_a_delta_that_changes_the_outputs(tmp_path, tiny_recipe, capsys):
    report = train_run(validate_recipe(sparse_lora_recipe(tiny_recipe)), tmp_path / "run", progress=False)
    # The trained update moves the model: zeroing B (head kept) changes its logits.
    built = load_run(tmp_path / "run")
    built.model.eval()
    with_delta = text_logits(built.model, built.tokenizer)
    with torch.no_grad():
        for name, (module, tensor_name) in select_targets(built.model, built.delta, "delta").items():
            if name.endswith("lora_B"):
                dense_tensor(module, tensor_name).zero_()
    assert (with_delta - text_logits(built.model, built.tokenizer)).abs().max() > 1e-4
    assert "magnitude cannot rank 4 of 8 target tensors at initialisation (step 0)" in capsys.readouterr().out
    s = report["sparsity"]
    assert len(s["left_dense"]) == 4 and all(n.endswith("lora_B") for n in s["left_dense"])
    assert s["ranked_tensors"] == 4 and s["ranked_density"] == pytest.approx(0.5)
    assert s["target_density"] == pytest.approx(0.75)  # A and B have the same size here
    assert s["delta_density"] == pytest.approx(0.75)  # B trained away from zero, all of it non-zero
    assert s["history"][0]["left_dense"] == s["left_dense"]
    rows = dict(SparsityHook.report_rows(s))
    assert rows["sparsity"].startswith("delta density 0.750")
    assert rows["sparsity: left dense"] == "4 x lora_B (magnitude could not rank them); the 4 ranked tensors at density 0.500, all 8 targets at 0.750"


def test_lora_snip_at_init_run_is_refused_in_one_line(tmp_path, tiny_recipe):
    with pytest.raises(SlimtuneError, match="'snip' cannot rank any of the 8 target tensors at initialisation") as err:
        train_run(validate_recipe(sparse_lora_recipe(tiny_recipe, criterion="snip", scope="local")), tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("schedule", [
    {"schedule": "iterative", "rounds": 2},
    {"schedule": "gradual", "initial_sparsity": 0.25, "start_step": 0, "end_step": 4, "frequency": 2},
])
def test_schedules_rank_b_once_it_has_trained(tmp_path, tiny_recipe, schedule):
    """Step 0 leaves the zero B dense; a later pruning step (B trained) ranks it with A."""
    report = train_run(validate_recipe(sparse_lora_recipe(tiny_recipe, **schedule)), tmp_path / "run", progress=False)
    s = report["sparsity"]
    history = s["history"]
    assert [n.rpartition(".")[2] for n in history[0]["left_dense"]] == ["lora_B"] * 4
    assert all("left_dense" not in h for h in history[1:])
    assert "left_dense" not in s and len(s["per_layer"]) == 8
    assert history[-1]["measured"] == pytest.approx(0.5, abs=1e-3)


def test_resumed_run_reports_the_tensors_left_dense(tmp_path, tiny_recipe):
    from tests.fixtures import crash_run

    recipe = sparse_lora_recipe(tiny_recipe)
    recipe["train"].update(checkpoint_every=3)
    recipe = validate_recipe(recipe)
    whole = train_run(recipe, tmp_path / "whole", progress=False)
    crash_run(recipe, tmp_path / "crashed", 5)
    resumed = train_run(recipe, tmp_path / "crashed", resume=True, progress=False)
    assert resumed["sparsity"]["left_dense"] == whole["sparsity"]["left_dense"] and len(whole["sparsity"]["left_dense"]) == 4


# -- with DP-SGD the training data is private: a criterion may not score it directly ------------


@pytest.mark.parametrize("sparsity, allowed", [
    ({"criterion": "snip", "schedule": "one_shot", "at": 2}, False),
    ({"criterion": "grasp", "schedule": "gradual", "start_step": 1, "end_step": 2, "frequency": 1}, False),
    ({"criterion": "movement", "schedule": "one_shot", "at": "init"}, False),
    ({"criterion": "movement", "schedule": "iterative", "rounds": 2}, False),
    ({"criterion": "movement", "target": "base", "schedule": "one_shot", "at": 2}, False),
    ({"criterion": "movement", "schedule": "one_shot", "at": 2}, True),
    ({"criterion": "magnitude", "schedule": "gradual", "start_step": 1, "end_step": 2, "frequency": 1}, True),
    ({"criterion": "synflow", "schedule": "one_shot", "at": 2}, True),
])
def test_under_privacy_only_criteria_that_do_not_read_the_raw_training_data_are_allowed(tiny_recipe, sparsity, allowed):
    """snip/grasp score un-noised training batches, movement does at step 0 or on weights that do
    not train: outside ε, so refused with privacy on (found by a review of the DP x sparsity cells)."""
    from slimtune.errors import SlimtuneError
    from slimtune.recipe import validate_recipe
    from slimtune.runner import build

    tiny_recipe["sparsity"] = {"target": "delta", "density": 0.5, **sparsity}
    tiny_recipe["privacy"] = {"epsilon": 8.0}
    recipe = validate_recipe(tiny_recipe)
    if allowed:
        build(recipe)
        return
    with pytest.raises(SlimtuneError, match=r"keeps private") as caught:
        build(recipe)
    assert "\n" not in str(caught.value)


def test_a_global_ranking_that_empties_a_factor_says_so(tiny_recipe, tmp_path, capsys):
    """FacT's V starts at zero: one step later global magnitude ranks all of it below U and the
    cores, and the whole update is zero; the run says so in one line and in the report."""
    tiny_recipe["method"] = {"name": "fact-tt"}
    tiny_recipe["train"].update(max_steps=3, batch_size=8)
    tiny_recipe["sparsity"] = {"target": "delta", "criterion": "magnitude", "density": 0.5, "schedule": "gradual",
                               "start_step": 1, "end_step": 2, "frequency": 1, "scope": "global"}
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    emptied = [entry.get("emptied") for entry in report["sparsity"]["history"] if entry.get("emptied")]
    assert emptied and any("fact_V" in name for name in emptied[0])
    out = capsys.readouterr().out
    assert "removed every entry of" in out and "scope: local" in out


def test_under_privacy_movement_without_noised_gradients_skips_the_step_rather_than_read_data(tiny_recipe, capsys):
    """A pruning step with nothing accumulated since the last one (a skipped non-finite step)
    used to score raw training batches; under privacy it is skipped, said in one line."""
    from slimtune.runner import build
    from tests.fixtures import make_trainer

    tiny_recipe["sparsity"] = {"target": "delta", "criterion": "movement", "density": 0.5, "schedule": "one_shot", "at": 2}
    tiny_recipe["privacy"] = {"epsilon": 8.0}
    built = build(validate_recipe(tiny_recipe))
    hook = next(h for h in built.hooks if isinstance(h, SparsityHook))
    assert hook.private
    hook.trainer = make_trainer(tiny_recipe)
    hook.total_steps = 8
    hook._batches = lambda: pytest.fail("raw training batches were scored")
    hook._maybe_prune(2)  # nothing accumulated
    assert hook.history[-1]["skipped"] and "skipped" in capsys.readouterr().out
