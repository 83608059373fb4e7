"""Every method side by side on minilm-l6 + movie-sentiment, on one data budget.

Each row trains a recipe from recipes/ (2,000 training sentences, 2 epochs, batch 32, max_length 64,
the learning rate written in the recipe) through `slimtune train` and reads its report card:
test accuracy, trainable parameters (and % of the base model), stored bytes of the delta, median
train-step time, training peak memory (tensor accounting) and inference FLOPs per example. The
methods that peft also has (LoRA, IA3, prompt tuning) are trained a second time with peft through
the same trainer, on the same batches, for the side-by-side accuracy.

Targets (issue 3): at least one method with <= 1% trainable parameters within 1 point of full
fine-tuning; each method that peft has reaches at least peft's accuracy on the same budget.

    python -m benchmarks.methods_table [--quick] [--only lora --only ia3] [--threads 1]

Rows are written to benchmarks/results/methods_table.json as they finish; ``--only`` re-runs the
named rows and keeps the others, so one method can be re-tuned without re-running the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, print_rows, train_peft, write_result

ROOT = Path(__file__).resolve().parent.parent
#: Row label -> recipe under recipes/ (rows for recipes that do not exist yet are skipped).
METHODS = {
    "full fine-tuning": "full",
    "linear probe (head only)": "linear-probe",
    "BitFit": "bitfit",
    "LoRA": "lora",
    "Houlsby adapters": "houlsby",
    "Pfeiffer adapters": "pfeiffer",
    "Compacter": "compacter",
    "Compacter++": "compacter++",
    "IA3": "ia3",
    "prompt tuning": "prompt",
    "KAdaptation": "kadaptation",
    "FacT-TT": "fact-tt",
    "FacT-TK": "fact-tk",
    "Ladder Side-Tuning": "lst",
}
# SparseAdapter and DSEE have their own tables (benchmarks/sparse_adapter.py, dsee.py); compositions
# (recipes/lora+bitfit.yaml, prompt+pfeiffer.yaml) run with `--only`.
EXTRA = {"LoRA + BitFit": "lora+bitfit", "prompt + Pfeiffer": "prompt+pfeiffer", "SparseAdapter": "sparse-adapter", "DSEE": "dsee"}
#: Rows trained with peft too: recipe -> (peft config factory, extra overrides matching the recipe).
PEFT_TWINS = ("lora", "ia3", "prompt")


def peft_config(recipe_name: str, method: dict[str, Any]) -> Any:
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit

    if recipe_name == "lora":
        return LoraConfig(r=method["r"], lora_alpha=method["alpha"], target_modules=["query", "value"], lora_dropout=method.get("dropout", 0.0), task_type="SEQ_CLS")
    if recipe_name == "ia3":  # peft's BERT defaults: keys, values and the FFN output (its input is rescaled)
        return IA3Config(task_type="SEQ_CLS")
    if recipe_name == "prompt":
        return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=method["num_tokens"], prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    raise KeyError(recipe_name)


def run_row(recipe_name: str, threads: int, extra: list[str]) -> dict[str, Any]:
    from slimtune.recipe import load_recipe
    from slimtune.runner import train_run

    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", [f"measure.threads={threads}", *extra])
    with tempfile.TemporaryDirectory() as out:
        report = train_run(recipe, Path(out) / "run", progress=False)
    train, params, inference = report["train"], report["params"], report.get("inference", {})
    return {
        "recipe": f"recipes/{recipe_name}.yaml",
        "lr": recipe.train.lr,
        "head_lr": recipe.train.head_lr,
        "accuracy": report["metrics"]["accuracy"],
        "validation_accuracy": report["metrics_validation"]["accuracy"],
        "trainable": params["trainable"],
        "trainable_pct": params["trainable_pct"],
        "stored_bytes": params["stored_bytes"],
        "step_seconds": train["step_seconds_median"],
        "peak_memory_bytes": train.get("peak_memory_bytes"),
        "flops_per_example": inference.get("flops_per_example"),
        "train_seconds": train["seconds"],
    }


def run_peft_twin(recipe_name: str, extra: list[str]) -> dict[str, Any]:
    from slimtune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", extra)
    method = recipe.methods[0].config
    method = method.model_dump() if hasattr(method, "model_dump") else dict(method)
    train = recipe.train
    overrides = [f"train.lr={train.lr}", f"train.epochs={train.epochs}", f"train.batch_size={train.batch_size}",
                 f"train.max_length={train.max_length}", f"task.train_size={recipe.task.train_size}", f"task.eval_size={recipe.task.eval_size}", *extra]
    if train.head_lr:
        overrides.append(f"train.head_lr={train.head_lr}")
    out = train_peft(peft_config(recipe_name, method), overrides)
    return {"accuracy": out["metrics"]["accuracy"], "trainable": out["trainable"], "step_seconds": out["step_seconds_median"]}


def majority_baseline() -> float:
    from slimtune.recipe import load_recipe
    from slimtune.zoo.tasks import load_task

    recipe = load_recipe(ROOT / "recipes" / "lora.yaml")
    task = load_task(recipe.task.loader_spec(), split_seed=recipe.task.split_seed, train_size=recipe.task.train_size, eval_size=recipe.task.eval_size, seed=recipe.task.split_seed)
    train_labels = list(task.splits["train"]["label"])
    majority = max(set(train_labels), key=train_labels.count)
    test_labels = list(task.splits["test"]["label"])
    return test_labels.count(majority) / len(test_labels)


def checks(rows: dict[str, dict[str, Any]], peft: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = rows.get("full fine-tuning")
    if full:
        small = {k: r for k, r in rows.items() if r["trainable_pct"] <= 1.0}
        if small:
            best = max(small, key=lambda k: small[k]["accuracy"])
            gap = full["accuracy"] - small[best]["accuracy"]
            out["best_under_1pct"] = {"method": best, "accuracy": small[best]["accuracy"], "trainable_pct": small[best]["trainable_pct"], "gap_to_full_points": 100 * gap, "within_1_point": gap <= 0.01}
    by_recipe = {r["recipe"]: (label, r) for label, r in rows.items()}
    for name, twin in peft.items():
        label, ours = by_recipe.get(f"recipes/{name}.yaml", (None, None))
        if ours:
            out[f"{name}_vs_peft_points"] = 100 * (ours["accuracy"] - twin["accuracy"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 methods, 200 sentences, 1 epoch: a smoke run, not the table")
    parser.add_argument("--only", action="append", metavar="RECIPE", help="re-run only these rows (recipe names, e.g. lora, ia3); keep the others")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: the machine is shared; every row alike)")
    parser.add_argument("--no-peft", action="store_true", help="skip the peft twins")
    parser.add_argument("--name", default="methods_table", help="results file name under benchmarks/results/ (a second process can fill a part of the table in another file)")
    parser.add_argument("--merge-from", action="append", default=[], metavar="NAME", help="take the rows of benchmarks/results/NAME.json into this table and delete that file; without --only nothing is re-run")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, Any]] = {}
    peft: dict[str, dict[str, Any]] = {}
    for name in ([] if args.quick else [args.name, *args.merge_from]):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            rows.update(previous.get("rows", {}))
            peft.update(previous.get("peft", {}))
    extra = ["task.train_size=200", "train.epochs=1", "task.eval_size=200"] if args.quick else []
    every = {**METHODS, **EXTRA}
    wanted = {label: name for label, name in METHODS.items() if (ROOT / "recipes" / f"{name}.yaml").is_file()}
    if args.quick:
        wanted = {k: v for k, v in wanted.items() if v in ("linear-probe", "lora", "ia3")}
    if args.only:
        unknown = [n for n in args.only if n not in every.values()]
        if unknown:
            parser.error(f"--only {unknown[0]}: not a row; rows: {', '.join(every.values())}")
        wanted = {k: v for k, v in every.items() if v in args.only}
    elif args.merge_from:
        wanted = {}

    def save(complete: bool) -> dict[str, Any]:
        result = {
            "settings": {"model": "minilm-l6", "task": "movie-sentiment", "train_size": 200 if args.quick else 2000, "epochs": 1 if args.quick else 2,
                         "batch_size": 32, "max_length": 64, "threads": args.threads, "quick": args.quick},
            "majority_baseline": majority,
            "rows": {k: rows[k] for k in every if k in rows},
            "peft": peft,
            "checks": checks(rows, peft),
            "complete": complete,
        }
        if not args.quick:  # a smoke run must not replace the table's figures
            write_result(args.name, result)
        return result

    majority = majority_baseline()
    for label, name in wanted.items():
        print(f"-- {label} ({name})", flush=True)
        rows[label] = run_row(name, args.threads, extra)
        print(f"   accuracy {rows[label]['accuracy']:.4f}, trainable {rows[label]['trainable']:,}", flush=True)
        if name in PEFT_TWINS and not args.no_peft:
            peft[name] = run_peft_twin(name, extra)
            print(f"   peft {name}: accuracy {peft[name]['accuracy']:.4f}, trainable {peft[name]['trainable']:,}", flush=True)
        save(complete=False)
    available = [label for label, name in METHODS.items() if (ROOT / "recipes" / f"{name}.yaml").is_file()]
    result = save(complete=args.quick or all(label in rows for label in available))
    for name in args.merge_from:  # its rows are in this table now
        (RESULTS / f"{name}.json").unlink(missing_ok=True)
    print_rows("methods on minilm-l6 + movie-sentiment", [(label, r["accuracy"]) for label, r in result["rows"].items()] + [(f"peft {k}", v["accuracy"]) for k, v in peft.items()])
    return result


def render_markdown(result: dict[str, Any]) -> str:
    from slimtune.measure.report import fmt_bytes, fmt_count

    s = result["settings"]
    peft = result.get("peft", {})
    header = ["method", "test acc.", "peft, same budget", "trainable", "% of base", "stored", "step (s)", "train peak mem.", "inference FLOPs/ex.", "lr"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, r in result["rows"].items():
        name = Path(r["recipe"]).stem
        twin = peft.get(name)
        lr = f"{r['lr']:g}" + (f" (head {r['head_lr']:g})" if r.get("head_lr") else "")
        cells = [label, f"{r['accuracy']:.3f}", f"{twin['accuracy']:.3f} ({fmt_count(twin['trainable'])})" if twin else "",
                 fmt_count(r["trainable"]), f"{r['trainable_pct']:.2f}", fmt_bytes(r["stored_bytes"]), f"{r['step_seconds']:.3f}",
                 fmt_bytes(r["peak_memory_bytes"]) if r.get("peak_memory_bytes") else "", fmt_count(r["flops_per_example"]) if r.get("flops_per_example") else "", lr]
        lines.append("| " + " | ".join(cells) + " |")
    intro = (f"{s['model']} on {s['task']}: {s['train_size']:,} training sentences, {s['epochs']} epochs, batch {s['batch_size']}, "
             f"max_length {s['max_length']}, 1,000 test sentences; one seed; the recipe under `recipes/` of each row is the run "
             f"(`slimtune train recipes/<name>.yaml`). Majority-class baseline: {result['majority_baseline']:.3f}. "
             f"The peft twins train through the same trainer on the same batches with peft's own SEQ_CLS head ([CLS] + frozen pooler), "
             f"the slimtune rows with the default mean-pooling head (for LoRA with the [CLS] head too, see the LoRA vs peft table). "
             f"Step time at {s['threads']} torch thread per run on a shared machine whose load varied from ~2 to ~18 between rows: "
             f"compare step times only between neighbouring rows, memory and FLOPs anywhere. FLOPs are of the merged model where the method merges.")
    notes = []
    c = result.get("checks", {})
    if "best_under_1pct" in c:
        b = c["best_under_1pct"]
        notes.append(f"Best method with <= 1% trainable parameters: {b['method']} ({b['trainable_pct']:.2f}%), {b['accuracy']:.3f}, "
                     f"{b['gap_to_full_points']:.1f} points below full fine-tuning (target: within 1 point) — {'met' if b['within_1_point'] else 'not met'}.")
    for name in PEFT_TWINS:
        if f"{name}_vs_peft_points" in c:
            notes.append(f"{name}: slimtune {c[f'{name}_vs_peft_points']:+.1f} points vs peft on the same batches.")
    return intro + "\n\n" + "\n".join(lines) + ("\n\n" + " ".join(notes) if notes else "")


if __name__ == "__main__":
    main()
