"""SparseAdapter: dense Houlsby adapter vs the same adapter pruned at initialisation by SNIP to
density 0.6 (40% sparsity) vs Large-Sparse (width chosen so that its non-zeros at density 0.6 equal
the dense adapter's budget), on minilm-l6 + movie-sentiment and trec-6.

The paper's claim (He et al. 2022): SNIP at 40% sparsity matches the dense adapter; Large-Sparse
does better at the same budget. Each run: the project's standard budget (2,000 training sentences,
2 epochs, batch 32, max_length 64, lr 1e-3, test on 1,000), 1 torch thread (accuracy only).

    python -m benchmarks.sparse_adapter [--quick] [--tasks movie-sentiment trec-6]

On a busy machine the tasks can run as two processes and be merged:

    python -m benchmarks.sparse_adapter --tasks trec-6 --partial /tmp/sa-trec.json   (and movie-sentiment)
    python -m benchmarks.sparse_adapter --merge /tmp/sa-movie.json /tmp/sa-trec.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import print_rows, write_result

DENSITY = 0.6
BASE = {
    "model": {"name": "minilm-l6"},
    "task": {"train_size": 2000, "eval_size": 1000},
    "method": {"name": "houlsby", "reduction_factor": 16, "non_linearity": "swish", "train_layer_norm": True},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1.0e-3, "max_length": 64, "eval_each_epoch": False},
    "measure": {"flops": False, "latency": False, "memory": False},
}


def variants(hidden: int = 384) -> dict[str, dict[str, Any]]:
    from slimtune.sparsity.schedules import large_sparse_width

    width = hidden // 16
    wide = large_sparse_width(hidden, width, DENSITY)
    snip = {"target": "delta", "criterion": "snip", "density": DENSITY, "at": "init", "scope": "global", "batches": 4}
    return {
        "dense adapter": {},
        "SparseAdapter snip 0.6": {"sparsity": snip},
        "Large-Sparse snip 0.6": {"method": {"reduction_factor": hidden / wide}, "sparsity": snip, "width": wide},
    }


def run_one(task: str, extra: dict[str, Any], quick: bool) -> dict[str, Any]:
    from slimtune.recipe import validate_recipe
    from slimtune.runner import train_run

    recipe = copy.deepcopy(BASE)
    recipe["task"]["name"] = task
    recipe["method"].update(extra.get("method", {}))
    if "sparsity" in extra:
        recipe["sparsity"] = extra["sparsity"]
    if quick:
        recipe["task"].update(train_size=128, eval_size=64)
        recipe["train"]["max_steps"] = 4
    with tempfile.TemporaryDirectory() as tmp:
        report = train_run(validate_recipe(recipe, source=f"sparse_adapter/{task}"), Path(tmp) / "run", progress=False)
    adapter_weights = report.get("sparsity", {})
    out = {
        "accuracy": report["metrics"].get("accuracy"),
        "trainable": report["params"]["trainable"],
        "stored_bytes": report["params"]["stored_bytes"],
        "train_seconds": report["train"]["seconds"],
    }
    if adapter_weights:
        out["delta_nonzero"] = adapter_weights["delta_nonzero"]
        out["delta_density"] = adapter_weights["delta_density"]
    else:
        out["delta_nonzero"] = report["params"]["trainable"] - report["params"]["head"]
        out["delta_density"] = 1.0
    if "width" in extra:
        out["width"] = extra["width"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few examples (a smoke run)")
    parser.add_argument("--tasks", nargs="+", default=["movie-sentiment", "trec-6"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", help="run only these variants (labels as in the table)")
    parser.add_argument("--partial", type=Path, help="write the results so far to this JSON file after each run (no results/ file)")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge --partial files into benchmarks/results/sparse_adapter.json; run nothing")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    if args.merge:
        for path in args.merge:
            for task, per in json.loads(path.read_text())["results"].items():
                results.setdefault(task, {}).update(per)
        args.tasks = list(results)
    for task in [] if args.merge else args.tasks:
        results[task] = {}
        for label, extra in variants().items():
            if args.variants and label not in args.variants:
                continue
            results[task][label] = run_one(task, extra, args.quick)
            r = results[task][label]
            print(f"{task:16s} {label:24s} acc {r['accuracy']:.4f}  adapter non-zeros {r['delta_nonzero']:,}", flush=True)
            if args.partial:
                args.partial.write_text(json.dumps({"results": results}, indent=2) + "\n")
    result = {
        "settings": {**{k: v for k, v in BASE.items() if k != "measure"}, "density": DENSITY, "tasks": args.tasks, "threads": args.threads, "quick": args.quick,
                     "note": "adapter non-zeros: non-zero entries of the adapters and trained layer norms (task head excluded)"},
        "results": results,
    }
    rows = [(f"{task}: {label}", f"acc {r['accuracy']:.4f}, non-zeros {r['delta_nonzero']:,}") for task, per in results.items() for label, r in per.items()]
    print_rows("SparseAdapter", rows)
    if not args.quick and not args.partial:
        write_result("sparse_adapter", result)
    return result


def render_markdown(result: dict[str, Any]) -> str:
    s = result.get("settings", {})
    train = s.get("train", {})
    lines = [
        f"Houlsby adapters on {s.get('model', {}).get('name')} (reduction 16, width 24), pruned at initialisation by SNIP "
        f"to density {s.get('density')} (SparseAdapter), and Large-Sparse (a wider adapter, same non-zero budget); "
        f"{s.get('task', {}).get('train_size')} training sentences, {train.get('epochs')} epochs, batch {train.get('batch_size')}, "
        f"max_length {train.get('max_length')}, lr {train.get('lr')}; test accuracy on {s.get('task', {}).get('eval_size')} sentences. "
        "Non-zeros: adapter weights, biases and trained layer norms (task head excluded).",
        "",
        "| task | variant | width | accuracy | adapter non-zeros | density | stored delta |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, per in result.get("results", {}).items():
        for label, r in per.items():
            lines.append(
                f"| {task} | {label} | {r.get('width', 24)} | {r['accuracy']:.3f} | {r['delta_nonzero']:,} | "
                f"{r['delta_density']:.2f} | {r['stored_bytes'] / 1024:.0f} KB |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
