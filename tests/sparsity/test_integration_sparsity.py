"""SparseAdapter and DSEE on the real MiniLM (2-layer truncation) with a few steps: the recipes
run end to end, the delta is stored sparse, head pruning really lowers FLOPs, runs reload."""

import pytest

from slimtune.recipe import load_recipe
from slimtune.runner import evaluate_run, train_run

pytestmark = pytest.mark.integration

FEW = ["model.name=minilm-l2", "task.train_size=64", "task.eval_size=32", "train.max_steps=4", "train.batch_size=16",
       "train.max_length=32", "measure.latency=false", "measure.memory=false", "train.eval_each_epoch=false"]


def test_sparse_adapter_recipe_on_minilm(tmp_path):
    report = train_run(load_recipe("recipes/sparse-adapter.yaml", FEW + ["sparsity.batches=1"]), tmp_path / "run", progress=False)
    s = report["sparsity"]
    assert abs(s["history"][0]["measured"] - 0.6) < 1e-3
    assert report["params"]["stored_bytes"] < 4 * report["params"]["trainable"]
    assert evaluate_run(tmp_path / "run")["metrics"] == report["metrics"]


def test_dsee_recipe_on_minilm_removes_heads(tmp_path):
    report = train_run(load_recipe("recipes/dsee.yaml", FEW + ["method.decomposition_rank=16", "method.decomposition_iterations=3"]), tmp_path / "run", progress=False)
    info = report["dsee"]
    assert info["stage"] == 2 and all(len(h) == 9 for h in info["removed_heads"].values())
    assert info["flops_saved"] > 0.2
    assert evaluate_run(tmp_path / "run")["metrics"] == report["metrics"]
