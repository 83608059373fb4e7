"""Every method on the project's own ViT (vit-fmnist) transferred to mnist-5k and digits, in the
VTAB-1k protocol (800 train / 200 validation, full test set) and 4-shot (4 per class), 3 seeds:
test accuracy mean ± std and trainable parameters.

    python -m benchmarks --only vision          (or: python -m benchmarks.vision [--quick])

Lean on purpose (a 0.68 M-parameter ViT, 1 torch thread, a few epochs): the point is the
comparison between methods under one small budget, not state-of-the-art accuracy. Every run is
built by slimtune's runner (recipe -> zoo -> delta -> trainer), so the figures are what a user's
recipe gets. A run's seed fixes both the data sample (task.seed) and the initialisation/order
(train.seed). Finished runs are appended to ``benchmarks/results/vision-runs.jsonl`` so an
interrupted benchmark resumes where it stopped (delete the file to start over).

Budget: VTAB-1k 2 epochs at batch 32 (50 steps); 4-shot 20 epochs at batch 20 (40 steps).
Order: seed 0 of every cell, then seeds 1-2 of the claims' methods, then seeds 1-2 of the rest, so
that a run stopped early (a shared machine) still covers every cell; the table says n per cell.
Learning rates: see ``METHODS`` (one per method; the task head always trains at 1e-2). They were
set from each method's usual range (recipes/*.yaml) scaled for a tiny model and a short schedule;
``--tune`` picks, per method, the best of {lr/3, lr, 3 lr} on the 200-image validation split of
mnist-5k (VTAB-1k, seed 0) before the runs.

The seed papers' claims checked on the result: FacT-TT at a tiny rank (2) beats linear probing
and BitFit with fewer parameters than BitFit (Jie & Deng 2023); KAdaptation reaches LoRA's
accuracy with fewer parameters (He et al. 2022).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, write_result

MODEL = "vit-fmnist"
TASKS = ("mnist-5k", "digits")
PROTOCOLS = {"vtab-1k": {"protocol": "vtab-1k"}, "4-shot": {"shots": 4}}
BUDGET = {"vtab-1k": {"epochs": 2, "batch_size": 32}, "4-shot": {"epochs": 20, "batch_size": 20}}
#: The methods of the papers' claims: they get their 3 seeds first when the machine is short of time.
CLAIM_METHODS = ("linear-probe", "bitfit", "fact-tt", "lora", "kadaptation")
SEEDS = (0, 1, 2)
HEAD_LR = 1e-2

#: method -> (fields, learning rate). Shapes for d = 96 (hidden), 3 heads, MLP 384, 6 layers.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "linear-probe": ({}, 1e-2),
    "bitfit": ({}, 1e-2),
    "fact-tt": ({"rank": 2}, 1e-2),  # the "tiny rank" of the FacT claim
    "fact-tk": ({"rank": 4}, 1e-2),
    "lora": ({"r": 4, "alpha": 8}, 5e-3),  # q, v
    "kadaptation": ({}, 1e-3),  # official n = 32, r = 1, s = 160 (hence the smaller lr)
    "houlsby": ({}, 5e-3),  # reduction 16 -> bottleneck 6
    "pfeiffer": ({}, 5e-3),
    "compacter": ({"reduction_factor": 8}, 5e-3),  # bottleneck 12 (32 would give 3, not divisible by phm_dim 4)
    "compacter++": ({"reduction_factor": 8}, 5e-3),
    "ia3": ({}, 1e-2),
    "prompt": ({"num_tokens": 5}, 1e-2),  # VPT-shallow: 5 prompts after [CLS]
    "lst": ({"r": 4}, 5e-3),  # side width 24
    "full": ({}, 5e-4),
}
RUNS_FILE = RESULTS / "vision-runs.jsonl"


def recipe_for(method: str, task: str, protocol: str, seed: int, lr: float) -> dict[str, Any]:
    fields, _ = METHODS[method]
    budget = BUDGET[protocol]
    return {
        "model": {"name": MODEL},
        "task": {"name": task, **PROTOCOLS[protocol], "seed": seed},
        "method": {"name": method, **fields},
        "train": {"epochs": budget["epochs"], "batch_size": budget["batch_size"], "lr": lr, "head_lr": HEAD_LR,
                  "warmup_ratio": 0.1, "seed": seed, "eval_each_epoch": False},
        "measure": {"flops": False, "latency": False, "memory": False},
    }


def run_one(recipe_data: dict[str, Any], splits: tuple[str, ...] = ("test",)) -> dict[str, Any]:
    from slimtune.measure.params import param_counts
    from slimtune.recipe import validate_recipe
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    recipe = validate_recipe(json.loads(json.dumps(recipe_data)), source="benchmarks/vision.py")
    started = time.perf_counter()
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective=built.objective, run_dir=None, hooks=built.hooks, progress=False)
    result = trainer.fit()
    metrics = {split: trainer.evaluate(split)["accuracy"] for split in splits}
    counts = param_counts(built.model, trainer.trainable.keys(), base_total=built.base_params)
    head = sum(p.numel() for p in built.delta.head_parameters(built.model).values())
    return {
        **{f"{split}_accuracy": value for split, value in metrics.items()},
        "trainable": counts["trainable"],
        "method_params": counts["trainable"] - head,
        "head_params": head,
        "steps": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "n_train": len(built.task.splits["train"]),
        "n_test": len(built.task.splits["test"]),
    }


def load_runs() -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    if RUNS_FILE.is_file():
        for line in RUNS_FILE.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                runs[row["key"]] = row
    return runs


def append_run(row: dict[str, Any]) -> None:
    RUNS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with RUNS_FILE.open("a") as sink:
        sink.write(json.dumps(row) + "\n")


def tune(methods: list[str], runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per method: the best of {lr/3, lr, 3 lr} on mnist-5k VTAB-1k validation (seed 0)."""
    chosen = {}
    for method in methods:
        base = METHODS[method][1]
        scores = {}
        for lr in (base / 3, base, base * 3):
            key = f"tune|{method}|{lr:.3g}"
            if key not in runs:
                out = run_one(recipe_for(method, "mnist-5k", "vtab-1k", 0, lr), splits=("validation",))
                runs[key] = {"key": key, "method": method, "lr": lr, **out}
                append_run(runs[key])
            scores[lr] = runs[key]["validation_accuracy"]
            print(f"tune {method} lr {lr:.3g}: validation {scores[lr]:.3f}", flush=True)
        chosen[method] = max(scores, key=lambda lr: (scores[lr], lr == base))
    return chosen


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accuracies = [r["test_accuracy"] for r in runs]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "seeds": len(accuracies),
        "accuracies": accuracies,
        "trainable": runs[0]["trainable"],
        "method_params": runs[0]["method_params"],
        "seconds_mean": statistics.fmean(r["seconds"] for r in runs),
    }


def check_claims(table: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The seed papers' claims, per task/protocol cell where the runs exist."""
    claims = []
    for cell, rows in table.items():
        def acc(method: str) -> float | None:
            return rows[method]["accuracy_mean"] if method in rows else None

        def params(method: str) -> int | None:
            return rows[method]["trainable"] if method in rows else None

        if all(m in rows for m in ("fact-tt", "linear-probe", "bitfit")):
            claims.append({
                "cell": cell,
                "claim": "FacT-TT (rank 2) beats linear probe and BitFit, with fewer parameters than BitFit",
                "holds": acc("fact-tt") > acc("linear-probe") and acc("fact-tt") > acc("bitfit") and params("fact-tt") < params("bitfit"),
                "fact-tt": [acc("fact-tt"), params("fact-tt")], "linear-probe": [acc("linear-probe"), params("linear-probe")],
                "bitfit": [acc("bitfit"), params("bitfit")],
            })
        if all(m in rows for m in ("kadaptation", "lora")):
            within = acc("kadaptation") >= acc("lora") - max(rows["lora"]["accuracy_std"], 0.005)
            claims.append({
                "cell": cell,
                "claim": "KAdaptation reaches LoRA's accuracy (within LoRA's seed std) with fewer parameters",
                "holds": within and params("kadaptation") < params("lora"),
                "kadaptation": [acc("kadaptation"), params("kadaptation")], "lora": [acc("lora"), params("lora")],
            })
    return claims


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only, 4-shot only")
    parser.add_argument("--tune", action="store_true", help="choose each method's lr on mnist-5k VTAB-1k validation first")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--protocols", nargs="*", default=list(PROTOCOLS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aggregate-only", action="store_true", help="run nothing; summarise the runs already in vision-runs.jsonl")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.protocols = [0], ["4-shot"]

    import torch

    torch.set_num_threads(args.threads)
    runs = load_runs()
    lrs = {m: METHODS[m][1] for m in args.methods}
    if args.tune:
        lrs.update(tune(args.methods, runs))
    first, rest = args.seeds[:1], args.seeds[1:]
    phases = [(first, args.methods), (rest, [m for m in args.methods if m in CLAIM_METHODS]),
              (rest, [m for m in args.methods if m not in CLAIM_METHODS])]
    plan = [(seed, protocol, task, method) for seeds, methods in phases for seed in seeds
            for protocol in args.protocols for task in args.tasks for method in methods]
    for seed, protocol, task, method in ([] if args.aggregate_only else plan):
        key = f"{method}|{task}|{protocol}|{seed}|{lrs[method]:.3g}"
        if key in runs:
            continue
        runs.update(load_runs())  # another process may have done it meanwhile (parallel by task)
        if key in runs:
            continue
        out = run_one(recipe_for(method, task, protocol, seed, lrs[method]))
        runs[key] = {"key": key, "method": method, "task": task, "protocol": protocol, "seed": seed, "lr": lrs[method], **out}
        append_run(runs[key])
        print(f"{task} {protocol} seed {seed} {method}: test {out['test_accuracy']:.3f} "
              f"({out['trainable']:,} trainable, {out['seconds']:.0f} s)", flush=True)
    runs = load_runs() if args.aggregate_only else runs

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol in args.protocols:
        for task in args.tasks:
            cell = f"{task} / {protocol}"
            table[cell] = {}
            for method in args.methods:
                done = [r for r in runs.values() if r.get("task") == task and r.get("protocol") == protocol
                        and r.get("method") == method and r.get("seed") in args.seeds and abs(r["lr"] - lrs[method]) < 1e-12]
                if done:
                    table[cell][method] = {**summarise(done), "lr": lrs[method]}
    pretrain = json.loads((Path(__file__).resolve().parent.parent / "src/slimtune/zoo/weights/vit-fmnist/pretrain.json").read_text())
    result = {
        "settings": {"model": MODEL, "pretrain_test_accuracy": pretrain["test_accuracy"], "budget": BUDGET, "head_lr": HEAD_LR,
                     "methods": {m: {"fields": METHODS[m][0], "lr": lrs[m]} for m in args.methods}, "seeds": args.seeds,
                     "threads": args.threads, "tuned": args.tune},
        "table": table,
        "claims": check_claims(table),
    }
    write_result("vision", result)
    print(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    settings, table = result["settings"], result["table"]
    cells = list(table)
    methods = list(settings["methods"])
    lines = [
        "Every method on the project's ViT, VTAB-1k and 4-shot: "
        f"`vit-fmnist` (0.68 M parameters, pre-trained here on Fashion-MNIST to {settings['pretrain_test_accuracy']:.1%} test accuracy) "
        "transferred to mnist-5k and digits. Test accuracy, mean ± std over seeds (each seed draws its own sample and "
        "initialisation); trainable parameters include the 970-parameter task head. "
        f"Budget: VTAB-1k {settings['budget']['vtab-1k']['epochs']} epochs, 4-shot {settings['budget']['4-shot']['epochs']} epochs; "
        f"{settings['threads']} torch thread. Script: `benchmarks/vision.py`.",
        "",
        "| method | trainable | lr | " + " | ".join(cells) + " |",
        "|---|---:|---:|" + "---:|" * len(cells),
    ]
    for method in methods:
        present = [table[c].get(method) for c in cells]
        first = next((p for p in present if p), None)
        if first is None:
            continue
        accs = [f"{p['accuracy_mean']:.3f} ± {p['accuracy_std']:.3f}" + ("" if p["seeds"] >= 3 else f" (n={p['seeds']})") if p else "–" for p in present]
        lines.append(f"| {method} | {first['trainable']:,} | {settings['methods'][method]['lr']:g} | " + " | ".join(accs) + " |")
    claims = result.get("claims") or []
    if claims:
        lines += ["", "Seed papers' claims on these runs (comparing means; where the gap is smaller than a seed std "
                  "it is not conclusive; learning rates were set once per method, " + ("tuned" if settings.get("tuned") else "not tuned")
                  + " on the validation split):", ""]
        for claim in claims:
            lines.append(f"- {claim['cell']}: {claim['claim']}: **{'holds' if claim['holds'] else 'does not hold'}**")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
