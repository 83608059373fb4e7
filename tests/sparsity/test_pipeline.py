"""The sparsity section end to end on the tiny model: SparseAdapter (adapters pruned at
initialisation), sparse storage of the delta, report.json's sparsity section, reload."""

import copy

import pytest

from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors
from slimtune.recipe import validate_recipe
from slimtune.runner import evaluate_run, train_run
from tests.fixtures import assert_same_delta


def sparse_adapter_recipe(tiny_recipe, **sparsity):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "houlsby", "reduction_factor": 4}
    recipe["train"]["weight_decay"] = 0.1
    recipe["sparsity"] = {"target": "delta", "criterion": "snip", "density": 0.6, "at": "init", "batches": 2, **sparsity}
    return recipe


def test_sparse_adapter_run_saves_sparse_delta_and_reloads(tmp_path, tiny_recipe):
    report = train_run(validate_recipe(sparse_adapter_recipe(tiny_recipe)), tmp_path / "run", progress=False)
    section = report["sparsity"]
    # Adapter weights at density 0.6 overall (global scope: per layer it varies); biases and
    # layer norms stay dense, so the whole delta is a bit denser.
    assert abs(section["history"][0]["measured"] - 0.6) < 1e-3
    assert len(section["per_layer"]) == 8
    assert section["history"][0]["step"] == 0
    assert 0.6 < section["delta_density"] < 0.75
    state = read_safetensors(tmp_path / "run" / "delta.safetensors")
    sparse = [k for k in state if "::sparse_values" in k]
    assert sparse, "masked adapter weights are stored sparse"
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert report["params"]["stored_bytes"] == stored
    dense_bytes = report["params"]["trainable"] * 4
    assert stored < dense_bytes
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == report["metrics"]


def test_density_alias_and_bad_input(tiny_recipe):
    recipe = validate_recipe(sparse_adapter_recipe(tiny_recipe, density=None, sparsity=0.4))
    assert abs(recipe.features["sparsity"].density - 0.6) < 1e-12
    for bad in ({"density": 0.0}, {"density": 1.5}, {"density": 0.5, "sparsity": 0.4}, {"criterion": "sniper"}):
        with pytest.raises(SlimtuneError) as err:
            validate_recipe(sparse_adapter_recipe(tiny_recipe, **bad))
        assert "\n" not in str(err.value) and "sparsity" in str(err.value)


@pytest.mark.parametrize("method,criterion", [
    ({"name": "lora", "r": 4}, "grasp"),
    ({"name": "compacter", "reduction_factor": 4, "phm_dim": 2}, "synflow"),
    ({"name": "pfeiffer", "reduction_factor": 4}, "random"),
])
def test_any_delta_pruned_at_init(tmp_path, tiny_recipe, method, criterion):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = method
    recipe["sparsity"] = {"target": "delta", "criterion": criterion, "density": 0.5, "scope": "local", "batches": 1}
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert all(abs(d - 0.5) < 0.05 for d in report["sparsity"]["per_layer"].values())
    assert evaluate_run(tmp_path / "run")["metrics"] == report["metrics"]


def test_gradual_magnitude_pruning_of_base_weights(tmp_path, tiny_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "bitfit"}
    recipe["sparsity"] = {"target": "base", "criterion": "magnitude", "sparsity": 0.8, "schedule": "gradual", "start_step": 2, "end_step": 6, "frequency": 2}
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    history = report["sparsity"]["history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    assert [round(h["measured"], 3) for h in history] == [1.0, round(1 - (0.8 - 0.8 * 0.5**3), 3), 0.2]
    assert abs(report["sparsity"]["weight_density"] - 0.2) < 1e-3


def test_data_criterion_without_data_is_one_line_error(tiny_recipe):
    from slimtune.features.sparsity import SparsitySection

    section = SparsitySection(criterion="snip", density=0.5)
    with pytest.raises(SlimtuneError, match="needs training data"):
        section.build_hook(recipe=None, model=None, delta=None, task=None)


def test_pruned_run_resumes_to_the_same_delta(tmp_path, tiny_recipe):
    from tests.fixtures import crash_run

    recipe = sparse_adapter_recipe(tiny_recipe, schedule="iterative", rounds=2, criterion="magnitude")
    recipe["train"].update(max_steps=8, checkpoint_every=3, batch_size=32)
    recipe = validate_recipe(recipe)
    train_run(recipe, tmp_path / "whole", progress=False)
    run = tmp_path / "crashed"
    crash_run(recipe, run, 5)  # pruned at steps 0 and 4, checkpointed at 3
    train_run(recipe, run, resume=True, progress=False)
    assert_same_delta(tmp_path / "whole", run)


def test_one_shot_wanda_by_rows_of_the_base_weights(tmp_path, tiny_recipe):
    """llm-compressor's one-shot baseline: Wanda scores on training batches, every output row of
    every backbone Linear pruned to the density."""
    import torch

    from slimtune.runner import load_run

    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "bitfit"}
    recipe["sparsity"] = {"target": "base", "criterion": "wanda", "scope": "row", "density": 0.5, "batches": 2}
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert abs(report["sparsity"]["weight_density"] - 0.5) < 1e-6
    model = load_run(tmp_path / "run").model
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n]
    assert linears and all(((m.weight != 0).sum(1) == m.in_features // 2).all() for m in linears)
