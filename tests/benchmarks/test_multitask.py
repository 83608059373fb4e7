"""benchmarks/multitask.py: its tables from rows, and the single-task step budgets."""

import argparse

from benchmarks import multitask


def test_the_tables_show_every_variant_and_the_ensemble_side_by_side():
    per_task = {"a": 0.8, "b": 0.6}
    result = {
        "table": {"rows": [{"variant": v, "seed": s, "per_task": per_task, "trainable": 10, "stored": 20}
                           for v in ("adapter shared", "adapters per task") for s in (0, 1)]},
        "prune": {"rows": [{"strategy": "rank", "density": 0.5, "kind": k, "seed": 0, "per_task": per_task, "kept": 0.5}
                           for k in ("multi-task", "ensemble")]},
    }
    text = multitask.render(result)
    assert "| adapter shared | 0.800 ± 0.000 | 0.600 ± 0.000 | 0.700 ± 0.000 | 10 | 20 | 2 |" in text
    assert "| rank | 0.50 | ensemble | 0.800 | 0.600 | 0.700 | 0.500 | 1 |" in text


def test_a_single_task_run_trains_for_the_batches_its_task_gets_in_the_multitask_run():
    args = argparse.Namespace(
        model="minilm-l2", tasks="movie-sentiment,trec-6", low_resource="tweet-sentiment:100", train_size=300, eval_size=50, quick=False)
    shares = multitask.sampling_shares(args)
    assert list(shares) == ["movie-sentiment", "trec-6", "tweet-sentiment"]
    assert abs(sum(shares.values()) - 1) < 1e-9 and shares["tweet-sentiment"] < shares["trec-6"]
