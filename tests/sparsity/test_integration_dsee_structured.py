"""The structured-DSEE and Large-Sparse recipes on the real MiniLM (2-layer truncation), a few
steps: heads and FFN neurons really go (FLOPs drop), Large-Sparse widens, runs reload."""

import pytest

from slimtune.recipe import load_recipe
from slimtune.runner import evaluate_run, train_run

pytestmark = pytest.mark.integration

FEW = ["model.name=minilm-l2", "task.train_size=64", "task.eval_size=32", "train.max_steps=4", "train.batch_size=16",
       "train.max_length=32", "measure.latency=false", "measure.memory=false", "train.eval_each_epoch=false"]


def test_structured_dsee_recipe_removes_heads_and_ffn_neurons(tmp_path):
    recipe = load_recipe("recipes/dsee-structured.yaml", FEW + ["method.decomposition_rank=16", "method.decomposition_iterations=3", "method.score_batches=1"])
    report = train_run(recipe, tmp_path / "run", progress=False)
    info = report["dsee"]
    assert info["stage"] == 2
    assert sum(info["removed_neurons_per_layer"].values()) == round(0.4 * 1536) * 2  # global: the total is fixed
    assert info["flops_saved"] > 0.25
    assert evaluate_run(tmp_path / "run")["metrics"] == report["metrics"]


def test_large_sparse_recipe_widens_the_adapter(tmp_path):
    report = train_run(load_recipe("recipes/large-sparse-adapter.yaml", FEW + ["sparsity.batches=1"]), tmp_path / "run", progress=False)
    assert report["sparsity"]["large_sparse"]["houlsby"]["width"] == [24, 40]
    assert abs(report["sparsity"]["history"][0]["measured"] - 0.6) < 1e-3
    assert evaluate_run(tmp_path / "run")["metrics"] == report["metrics"]
