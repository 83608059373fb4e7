"""The sparsity section end to end on the tiny model: SparseAdapter (adapters pruned at
initialisation), sparse storage of the delta, report.json's sparsity section, reload."""

import copy

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.io import read_json, read_safetensors
from slimtune.recipe import validate_recipe
from slimtune.runner import evaluate_run, train_run


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
