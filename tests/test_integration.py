"""Integration: the real MiniLM (2-layer truncation) on a small subset of real data, and the
real SmolLM2 as a causal LM. Marked `integration` (make test-fast skips them)."""

import pytest

from slimtune.recipe import load_recipe
from slimtune.runner import evaluate_run, train_run

pytestmark = pytest.mark.integration


def test_lora_on_real_minilm_learns_movie_sentiment_and_eval_reproduces_it(tmp_path):
    recipe = load_recipe(None, [
        "model.name=minilm-l2", "task.train_size=800", "task.eval_size=300", "train.epochs=2",
        "train.lr=2e-3", "train.max_length=48", "measure.repeats=2", "measure.batch_size=8",
    ])
    report = train_run(recipe, tmp_path / "run", progress=False)
    labels = report["task"]["n_test"]
    assert report["model"]["params_total"] > 15e6 and report["task"]["name"] == "movie-sentiment"
    # clearly above the majority baseline (the test split is balanced within a few points)
    assert report["metrics"]["accuracy"] >= 0.62, report["metrics"]
    assert report["params"]["trainable_pct"] < 1.5
    assert report["inference"]["merged"] and report["inference"]["flops_per_example"] > 0
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == report["metrics"] and again["n_test"] == labels


def test_causal_lm_lora_on_smollm2_reports_perplexity(tmp_path):
    recipe = load_recipe(None, [
        "model.name=smollm2-135m", "task.objective=lm", "task.train_size=64", "task.eval_size=16",
        "train.max_steps=3", "train.batch_size=8", "train.max_length=32", "train.lr=1e-3",
        "measure.latency=false", "measure.memory=false",
    ])
    report = train_run(recipe, tmp_path / "run", progress=False)
    assert report["task"]["objective"] == "lm" and report["task"]["primary_metric"] == "perplexity"
    assert 1.0 < report["metrics"]["perplexity"] < 1e4
    assert report["method"]["config"][0]["targets"] is None  # defaults resolved per architecture: q_proj/v_proj
    assert report["params"]["trainable"] == 30 * 8 * ((576 + 576) + (576 + 192))  # q: 576->576, v: 576->192 (GQA)
