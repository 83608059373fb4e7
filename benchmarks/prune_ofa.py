"""Prune Once for All (Zafrir et al. 2021) at small scale, side by side in one run; issue 21's benchmark.

Parts (``--parts``, default both):

* ``pretrain``: per sparsity (``--sparsities``, the paper's 85% and 90%), the sparse pre-training
  stage (``recipes/prune-ofa-pretrain.yaml``): the unlabelled ``corpus`` task, objective
  ``features`` (MiniLM has no MLM head), full fine-tuning with gradual magnitude pruning of every
  Linear of the encoder (the same share in each, the official ``init_strategy: uniform``; cubic
  from 0 at step 0 to the target at half the steps, as the official config ends its policy at
  50k of 100k steps) while the hidden states and attention distributions of the dense model are
  distilled into it; then ``slimtune export --merge``: the sparse pre-trained model directory.
* ``transfer``: per task and seed, the same fine-tuning budget (``--steps``, full fine-tuning,
  mean pooling) for: the dense model; per sparsity, the sparse pre-trained model with the pattern
  locked (``sparsity: {lock: true}``), the same with task KD from the dense run (alpha_ce =
  alpha_kd = 0.5, T = 2), and the one-shot baselines a llm-compressor user would try: magnitude
  and Wanda (on 4 training batches) pruning of the pre-trained model at the same sparsity before
  fine-tuning (masks then fixed); and at the first sparsity, lock + KD + QAT exported as sparse +
  int8. Every model is exported (``--sparse``; ``--int8`` for the QAT one) and measured: test
  accuracy of the export, Linear sparsity, encoder bytes stored, compression (dense fp32 encoder
  bytes / stored), latency against the same model dense fp32 (batch 32 x 128 tokens).

* ``lm``: the causal-LM counterpart on ``smollm2-135m`` cut to its first ``--lm-layers`` real
  layers (all 30 are too slow to train on 2 cores). As the official pipeline does, the dense
  model is first trained on the pre-training data (teacher preparation, ``--lm-steps`` of the
  causal-LM loss; the cut model needs it to be a language model again); then its perplexity on
  the corpus's test split against the same model at ``--lm-sparsity`` by sparse pre-training
  (``--lm-steps`` of causal-LM loss + token-level KD from the dense teacher, alpha 0.5 / 0.5,
  T = 2, gradual magnitude pruning of every Linear but ``lm_head``) and by one-shot magnitude
  and Wanda pruning (8 calibration batches of 16 corpus training sentences) without retraining,
  as llm-compressor's one-shot recipes do.

Goals (issue 21): >= 10x encoder compression (85% sparse + int8) within 2 points of dense on
average over the three tasks; Prune-OFA (GMP + KD) ahead of one-shot pruning at 90%. Settings are
fixed up front, never tuned on test. Seeds: mean +- std over ``--seeds``; a rerun replaces the rows
of its (task, seed) pairs, so seeds can be run one invocation at a time.

    python -m benchmarks.prune_ofa --model minilm-l2 --seeds 0      # the quick variant
    python -m benchmarks.prune_ofa --model minilm-l6 --seeds 0,1,2
    python -m benchmarks.prune_ofa --quick                          # a smoke run (a few steps)
    python -m benchmarks.prune_ofa --render-only --model minilm-l2
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import mean_std, merge_part_and_write, print_saved
from benchmarks.tickets import train

NAME = "prune_ofa"
PARTS = ("pretrain", "transfer", "lm")
TASKS = "movie-sentiment,trec-6,sms-spam"


def pretrain_recipe(args, sparsity: float) -> dict[str, Any]:
    steps = args.pretrain_steps
    return {
        "model": {"name": args.model},
        "task": {"name": "corpus", "objective": "features", "train_size": 64 if args.quick else None, "eval_size": 32 if args.quick else 500},
        "method": {"name": "full"},
        "train": {"max_steps": steps, "batch_size": 32, "lr": args.pretrain_lr, "max_length": 64, "weight_decay": 0.01,
                  "warmup_ratio": 0.01, "seed": 0, "eval_each_epoch": False},
        "sparsity": {"target": "base", "sparsity": sparsity, "schedule": "gradual", "scope": "local", "start_step": 0,
                     "end_step": max(1, steps // 2), "frequency": max(1, steps // 100)},
        "distill": {"teacher": args.model, "hidden": 1.0, "attention": 1.0},
        "measure": {"flops": False, "latency": False, "memory": False},
    }


def transfer_recipe(args, model: str, task: str, seed: int) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "task": {"name": task, "train_size": 64 if args.quick else 2000, "eval_size": 64 if args.quick else 1000},
        "method": {"name": "full"},
        "train": {"max_steps": args.steps, "batch_size": 32, "lr": 1.0e-4, "max_length": 64, "weight_decay": 0.01,
                  "warmup_ratio": 0.06, "seed": seed, "eval_each_epoch": False},
        "measure": {"flops": False, "latency": False, "memory": False},
    }


def sparse_model_dir(runs: Path, sparsity: float) -> Path:
    return runs / "pretrain" / f"sparse-{sparsity:g}" / "model"


def pretrain_part(args, runs: Path) -> list[dict[str, Any]]:
    from slimtune.runner import export_run

    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        where = sparse_model_dir(runs, sparsity).parent
        report = train(pretrain_recipe(args, sparsity), where / "run", args.reuse)
        if not (args.reuse and sparse_model_dir(runs, sparsity).is_dir()):
            _clear(sparse_model_dir(runs, sparsity))
            export_run(where / "run", sparse_model_dir(runs, sparsity), merge=True, measure=False)
        rows.append({"sparsity": sparsity, "weight_density": report["sparsity"]["weight_density"], "steps": report["train"]["steps"],
                     "seconds": report["train"]["seconds"], "test": report["metrics"], "corpus_sentences": report["task"]["n_train"],
                     "teacher_seconds": report["distill"]["teacher_seconds"]})
        print(rows[-1], flush=True)
    return rows


def transfer_part(args, runs: Path) -> list[dict[str, Any]]:
    sparsities = [float(s) for s in args.sparsities.split(",")]
    missing = [s for s in sparsities if not sparse_model_dir(runs, s).is_dir()]
    if missing:
        raise SystemExit(f"--parts transfer: no sparse pre-trained model at {sparse_model_dir(runs, missing[0])}; run --parts pretrain first")
    rows = []
    for task in args.tasks.split(","):
        for seed in [int(x) for x in args.seeds.split(",")]:
            where = runs / task / f"seed{seed}"
            variants: list[tuple[str, float, dict[str, Any], bool]] = [("dense", 0.0, transfer_recipe(args, args.model, task, seed), False)]
            for sparsity in sparsities:
                locked = transfer_recipe(args, str(sparse_model_dir(runs, sparsity)), task, seed)
                locked["sparsity"] = {"lock": True}
                kd = {**locked, "distill": {"teacher": str(variant_dir(where, "dense", 0.0) / "run"), "alpha_ce": 0.5, "alpha_kd": 0.5, "temperature": 2.0}}
                variants += [("prune-ofa lock", sparsity, locked, False), ("prune-ofa lock + KD", sparsity, kd, False)]
                if sparsity == sparsities[0]:
                    variants.append(("prune-ofa lock + KD + QAT int8", sparsity, {**kd, "compress": {"qat": {}}}, True))
                for criterion, scope in (("magnitude", "local"), ("wanda", "row")):
                    one_shot = transfer_recipe(args, args.model, task, seed)
                    one_shot["sparsity"] = {"target": "base", "criterion": criterion, "scope": scope, "sparsity": sparsity, "schedule": "one_shot", "at": "init"}
                    variants.append((f"one-shot {criterion}", sparsity, one_shot, False))
            for kind, sparsity, recipe, int8 in variants:
                out = variant_dir(where, kind, sparsity)
                report = train(recipe, out / "run", args.reuse)
                exported = _export(args, out, int8=int8)
                packed = exported["export"]["sparse"]
                rows.append({
                    "task": task, "seed": seed, "kind": kind, "sparsity": sparsity, "metric": report["task"]["primary_metric"],
                    "run_test": report["metrics"][report["task"]["primary_metric"]],
                    "test": exported["exported"]["metrics"][report["task"]["primary_metric"]],
                    "linear_weight_sparsity": packed["linear_weight_sparsity"],
                    "encoder_stored_bytes": packed["encoder_stored_bytes"], "encoder_compression": packed["encoder_compression"],
                    "latency_ratio": exported["ratios"]["latency_ms_median"], "seconds": report["train"]["seconds"],
                })
                print(rows[-1], flush=True)
    return rows


def variant_dir(where: Path, kind: str, sparsity: float) -> Path:
    return where / f"{kind.replace(' + ', '-').replace(' ', '-')}-{sparsity:g}"


def truncated_lm(runs: Path, layers: int) -> Path:
    """``smollm2-135m``'s first ``layers`` layers (embeddings and tied ``lm_head`` kept) as a model directory."""
    out = runs / "lm" / f"smollm2-135m-l{layers}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from slimtune.zoo.models import load_config, load_tokenizer, model_dir

    config = load_config("smollm2-135m")
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(model_dir("smollm2-135m"), config=config, use_safetensors=True)
    model.save_pretrained(out)
    load_tokenizer("smollm2-135m").save_pretrained(out)
    return out


def lm_recipe(args, model_dir: Path, sizes: dict[str, int], *, sparse: bool) -> dict[str, Any]:
    recipe = {
        "model": {"name": str(model_dir)},
        "task": {"name": "corpus", "objective": "lm", **sizes},
        "method": {"name": "full"},
        "train": {"max_steps": args.lm_steps, "batch_size": 16, "lr": 1.0e-4, "max_length": 64, "weight_decay": 0.01,
                  "warmup_ratio": 0.01, "seed": 0, "eval_each_epoch": False},
        "measure": {"flops": False, "latency": False, "memory": False},
    }
    if sparse:
        recipe["sparsity"] = {"target": "base", "sparsity": args.lm_sparsity, "schedule": "gradual", "scope": "local", "start_step": 0,
                              "end_step": max(1, args.lm_steps // 2), "frequency": max(1, args.lm_steps // 100)}
        recipe["distill"] = {"teacher": str(model_dir), "alpha_ce": 0.5, "alpha_kd": 0.5, "temperature": 2.0}
    return recipe


def lm_part(args, runs: Path) -> list[dict[str, Any]]:
    """Teacher preparation (the official first step; here it also turns the cut model back into a
    language model: its first layers alone feed ``lm_head`` states it was not trained on), then
    the dense teacher against its sparse versions."""
    from slimtune.measure.evaluate import evaluate_rows
    from slimtune.runner import export_run
    from slimtune.sparsity.schedules import prune, select_targets
    from slimtune.zoo.batches import pad_id_of, shuffled_batches, split_rows
    from slimtune.zoo.models import load_model, load_tokenizer
    from slimtune.zoo.tasks import load_task

    cut = truncated_lm(runs, args.lm_layers)
    sizes = {"train_size": 64 if args.quick else 8000, "eval_size": 32 if args.quick else 300}
    where = runs / "lm"
    prepared = train(lm_recipe(args, cut, sizes, sparse=False), where / "teacher" / "run", args.reuse)
    teacher = where / "teacher" / "model"
    if not (args.reuse and teacher.is_dir()):
        _clear(teacher)
        export_run(where / "teacher" / "run", teacher, merge=True, measure=False)
    report = train(lm_recipe(args, teacher, sizes, sparse=True), where / f"gmp-kd-{args.lm_sparsity:g}" / "run", args.reuse)
    tokenizer = load_tokenizer(teacher)
    pad = pad_id_of(tokenizer)
    task = load_task("corpus", **sizes)
    test, train_rows = (split_rows(task, tokenizer, split, 64, "lm") for split in ("test", "train"))
    rows = [{"kind": "cut, before teacher preparation", "sparsity": 0.0,
             "perplexity": evaluate_rows(load_model(cut, objective="lm"), test, pad, "lm", 0)["perplexity"]},
            {"kind": "dense teacher", "sparsity": 0.0, "perplexity": prepared["metrics"]["perplexity"], "steps": prepared["train"]["steps"]}]
    for criterion, scope in (("magnitude", "local"), ("wanda", "row")):
        model = load_model(teacher, objective="lm")
        batches = shuffled_batches(train_rows, pad, "lm", 16, 8, seed=0)
        prune(model, select_targets(model, None, "base"), criterion=criterion, density=1 - args.lm_sparsity, scope=scope, batches=batches)
        rows.append({"kind": f"one-shot {criterion}", "sparsity": args.lm_sparsity,
                     "perplexity": evaluate_rows(model, test, pad, "lm", 0)["perplexity"]})
    rows.append({"kind": "sparse pre-training (GMP + KD)", "sparsity": args.lm_sparsity, "perplexity": report["metrics"]["perplexity"],
                 "steps": report["train"]["steps"], "seconds": report["train"]["seconds"],
                 "weight_density": report["sparsity"]["weight_density"]})
    for row in rows:
        print(row, flush=True)
    return [{**row, "layers": args.lm_layers} for row in rows]


def _export(args, out: Path, *, int8: bool) -> dict[str, Any]:
    """``slimtune export --merge --sparse [--int8]`` of the run in ``out`` (a dense model stays dense:
    only tensors with zeros are stored sparse), measured against the same model dense fp32."""
    from slimtune.io import read_json
    from slimtune.runner import export_run

    target = out / "export"
    if args.reuse and (target / "export_report.json").is_file():
        return read_json(target / "export_report.json")
    _clear(target)
    return export_run(out / "run", target, merge=True, sparse=True, int8=int8, threads=args.threads, repeats=3 if args.quick else 10)


def _clear(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)




ORDER = ("dense", "prune-ofa lock", "prune-ofa lock + KD", "prune-ofa lock + KD + QAT int8", "one-shot magnitude", "one-shot wanda")


def render(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if rows := result.get("pretrain", {}).get("rows"):
        lines += ["| sparse pre-training | Linear density | steps | corpus sentences | test hidden MSE | test attention KL | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['sparsity']:.0%} | {r['weight_density']:.3f} | {r['steps']} | {r['corpus_sentences']:,} | "
                         f"{r['test'].get('hidden_mse', float('nan')):.4f} | {r['test'].get('attention_kl', float('nan')):.4f} | {r['seconds']:.0f} |")
    if rows := result.get("transfer", {}).get("rows"):
        tasks = sorted({r["task"] for r in rows})
        metric = {t: next(r["metric"] for r in rows if r["task"] == t) for t in tasks}
        lines += ["" if lines else "", "| model | sparsity | " + " | ".join(f"{t} ({metric[t]})" for t in tasks)
                  + " | mean over tasks | Δ vs dense | encoder stored MB | compression | latency (dense fp32 = 1.00) | seeds |",
                  "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|"]
        keys = sorted({(r["kind"], r["sparsity"]) for r in rows}, key=lambda k: (k[1], ORDER.index(k[0]) if k[0] in ORDER else 99))
        dense_mean = _task_mean(rows, "dense", 0.0, tasks)
        for kind, sparsity in keys:
            group = [r for r in rows if (r["kind"], r["sparsity"]) == (kind, sparsity)]
            per_task = [mean_std([r["test"] for r in group if r["task"] == t]) for t in tasks]
            mean = _task_mean(rows, kind, sparsity, tasks)
            delta = f"{(mean - dense_mean) * 100:+.1f}" if mean is not None and dense_mean is not None else "-"
            stored = [r["encoder_stored_bytes"] for r in group if r["encoder_stored_bytes"]]
            lines.append(f"| {kind} | {sparsity:.0%} | " + " | ".join(per_task) + f" | {mean:.3f} | {delta} | "
                         f"{statistics.mean(stored) / 1e6 if stored else float('nan'):.2f} | "
                         f"{statistics.mean(r['encoder_compression'] for r in group):.1f}x | "
                         f"{statistics.mean(r['latency_ratio'] for r in group):.2f} | {len({r['seed'] for r in group})} |")
    if rows := result.get("lm", {}).get("rows"):
        lines += ["", f"| smollm2-135m, first {rows[0]['layers']} layers | sparsity | corpus test perplexity |", "|---|---|---|"]
        lines += [f"| {r['kind']} | {r['sparsity']:.0%} | {r['perplexity']:.1f} |" for r in rows]
    return "\n".join(lines)


def _task_mean(rows, kind: str, sparsity: float, tasks: list[str]) -> float | None:
    """The mean over tasks of each task's mean over seeds."""
    per_task = [[r["test"] for r in rows if (r["kind"], r["sparsity"], r["task"]) == (kind, sparsity, t)] for t in tasks]
    if not all(per_task):
        return None
    return statistics.mean(statistics.mean(v) for v in per_task)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l2", help="minilm-l2 (the quick variant) or minilm-l6")
    parser.add_argument("--tasks", default=TASKS, help="comma-separated zoo tasks for the transfer part")
    parser.add_argument("--seeds", default="0,1,2", help="transfer part: fine-tuning seeds")
    parser.add_argument("--sparsities", default="0.85,0.9", help="the first also gets the QAT int8 variant")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (transfer needs pretrain's models)")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="sparse pre-training steps (batch 32 x 64 tokens of the corpus)")
    parser.add_argument("--pretrain-lr", type=float, default=1.0e-4)
    parser.add_argument("--steps", type=int, default=120, help="transfer: fine-tuning steps of every model (batch 32, 2,000 training examples)")
    parser.add_argument("--lm-layers", type=int, default=4, help="lm part: smollm2-135m's first N layers")
    parser.add_argument("--lm-sparsity", type=float, default=0.5)
    parser.add_argument("--lm-steps", type=int, default=200, help="lm part: sparse pre-training steps (batch 16 x 64 tokens)")
    parser.add_argument("--runs", default="runs/bench-prune-ofa", help="where the run directories go")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs and exports")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and latency")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps on 64 examples, one seed")
    parser.add_argument("--render-only", action="store_true", help="print the tables of benchmarks/results/prune_ofa-MODEL.json")
    args = parser.parse_args(argv)
    if args.render_only:
        return print_saved(result_name(args.model), render)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.pretrain_steps, args.steps, args.lm_steps, args.seeds = 4, 2, 2, "0"
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part '{unknown[0]}'; valid: {', '.join(PARTS)}")
    runs = Path(args.runs) / args.model
    settings = {k: v for k, v in vars(args).items() if k != "render_only"}
    result: dict[str, Any] = {}
    for part in parts:
        start = os.getloadavg()
        rows = PART_FUNCTIONS[part](args, runs)
        entry = {"settings": settings, "load_average": [start, os.getloadavg()], "rows": rows}
        # One file per model: a rerun replaces the pretrain or lm rows, or the transfer rows of its (task, seed) pairs.
        result = {**result, part: entry} if args.quick else merge_part_and_write(
            result_name(args.model), PARTS, part, entry, args, by_task_seed=part == "transfer")
    print(render(result))
    return result


def result_name(model: str) -> str:
    return f"{NAME}-{model}"


PART_FUNCTIONS = {"pretrain": pretrain_part, "transfer": transfer_part, "lm": lm_part}

#: docs/benchmarks.md's section (benchmarks/readme.py).
render_markdown = render


if __name__ == "__main__":
    main()
