"""DSEE vs LoRA at the same rank on minilm-l6 + movie-sentiment: trainable %, test accuracy,
inference FLOPs saved and the measured latency ratio after physical head pruning.

Contenders (same budget: 2,000 training sentences, 2 epochs, batch 32, max_length 64, lr 1e-3,
test on 1,000; trained with 1 torch thread):

* LoRA r=16, alpha=32 on query/value (DSEE's rank and scaling);
* DSEE stage 1 only: (alpha/r)(B A + S), r=16, N=64 (support from the decomposition);
* DSEE + heads: stage 2 after half the steps removes ``--heads`` of 12 heads per layer (ranked
  by their stage-1 update), then re-tunes; the goal is >= 25% inference FLOPs saved and at most
  1 point below LoRA;
* DSEE + unstructured (optional, ``--unstructured``): global L1 at 50% on the merged weights.

FLOPs per example are counted at seq 64 (eager attention). Latency: the merged LoRA model and the
merged head-pruned DSEE model, batch 32 x 64 tokens, ``--latency-threads`` threads, interleaved
medians in this process (goal: the FLOP saving shows up as speed).

    python -m benchmarks.dsee [--quick] [--heads 9] [--unstructured]
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from benchmarks.common import interleaved_medians, print_rows, write_result

BASE = {
    "model": {"name": "minilm-l6"},
    "task": {"name": "movie-sentiment", "train_size": 2000, "eval_size": 1000},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1.0e-3, "max_length": 64, "eval_each_epoch": False},
    "measure": {"flops": False, "latency": False, "memory": False},
}


def train(method: dict[str, Any], quick: bool):
    """Train one contender in this process; returns (built, trainer, metrics)."""
    from slimtune.recipe import validate_recipe
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    recipe = copy.deepcopy(BASE)
    recipe["method"] = method
    if quick:
        recipe["task"].update(train_size=128, eval_size=64)
        recipe["train"]["max_steps"] = 4
    recipe = validate_recipe(recipe, source="benchmarks/dsee")
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective=built.objective, run_dir=None, hooks=built.hooks, progress=False)
    result = trainer.fit()
    metrics = trainer.evaluate("test")
    return built, trainer, metrics, result


def summary(built, trainer, metrics, result) -> dict[str, Any]:
    from slimtune.measure.flops import flops_per_example
    from slimtune.measure.params import param_counts
    from slimtune.measure.report import inference_inputs

    counts = param_counts(built.model, built.delta.trainable_parameters(built.model).keys(), base_total=built.base_params)
    head = sum(p.numel() for p in built.delta.head_parameters(built.model).values())
    built.delta.merge(built.model)
    flops = flops_per_example(built.model, inference_inputs(trainer, 1, 64))
    built.delta.unmerge(built.model)
    out = {
        "accuracy": metrics["accuracy"],
        "trainable": counts["trainable"],
        "trainable_without_head": counts["trainable"] - head,
        "trainable_pct": counts["trainable_pct"],
        "trainable_pct_without_head": 100 * (counts["trainable"] - head) / built.base_params,
        "flops_per_example": flops,
        "train_seconds": result.seconds,
    }
    for hook in trainer.hooks:
        if hook.name == "dsee":
            info = hook.report()
            out["stage2"] = {k: v for k, v in info.items() if k != "removed_heads"}
            if "removed_heads" in info:
                out["stage2"]["removed_heads"] = {str(k): v for k, v in info["removed_heads"].items()}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few examples (a smoke run)")
    parser.add_argument("--heads", type=int, default=9, help="heads removed per layer (of 12) in the structured run")
    parser.add_argument("--unstructured", action="store_true", help="also run DSEE + unstructured pruning (50%%)")
    parser.add_argument("--skip-stage1", action="store_true", help="skip the stage-1-only DSEE run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--latency-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import torch

    from slimtune.measure.report import inference_inputs

    torch.set_num_threads(args.threads)
    dsee = {"name": "dsee", "r": 16, "alpha": 32, "num_sparse": 64, "sparse_init": "decomposition"}
    contenders = {"LoRA r=16": {"name": "lora", "r": 16, "alpha": 32}}
    if not args.skip_stage1:
        contenders["DSEE stage 1"] = dsee
    contenders[f"DSEE + {args.heads} heads/layer removed"] = {**dsee, "prune": "heads", "heads_per_layer": args.heads}
    if args.unstructured:
        contenders["DSEE + unstructured 50%"] = {**dsee, "prune": "unstructured", "prune_ratio": 0.5}

    results: dict[str, Any] = {}
    kept_models = {}
    for label, method in contenders.items():
        built, trainer, metrics, result = train(method, args.quick)
        results[label] = summary(built, trainer, metrics, result)
        print(f"{label:32s} acc {results[label]['accuracy']:.4f}  trainable {results[label]['trainable_pct_without_head']:.3f}%  "
              f"FLOPs/example {results[label]['flops_per_example']:,}", flush=True)
        if label.startswith("LoRA") or "heads" in label:
            kept_models[label] = (built, trainer)

    lora_label = "LoRA r=16"
    heads_label = f"DSEE + {args.heads} heads/layer removed"
    lora_built, lora_trainer = kept_models[lora_label]
    heads_built, _ = kept_models[heads_label]
    batch = inference_inputs(lora_trainer, 32, 64)
    for built in (lora_built, heads_built):
        built.delta.merge(built.model)
        built.model.eval()
    torch.set_num_threads(args.latency_threads)

    def call(model):
        def run():
            with torch.inference_mode():
                model(**batch)
        return run

    times = interleaved_medians({"lora": call(lora_built.model), "dsee_heads": call(heads_built.model)}, repeats=args.repeats, warmup=3)
    flops_saved = 1 - results[heads_label]["flops_per_example"] / results[lora_label]["flops_per_example"]
    result = {
        "settings": {**{k: v for k, v in BASE.items() if k != "measure"}, "dsee": dsee, "heads_removed_per_layer": args.heads, "of_heads": 12,
                     "train_threads": args.threads, "latency": {"batch_size": 32, "seq_len": 64, "threads": args.latency_threads, "repeats": args.repeats},
                     "quick": args.quick},
        "results": results,
        "flops_saved_vs_lora": flops_saved,
        "latency_ms": {k: v * 1000 for k, v in times.items()},
        "latency_ratio_dsee_heads_vs_lora": times["dsee_heads"] / times["lora"],
        "accuracy_gap_points": 100 * (results[heads_label]["accuracy"] - results[lora_label]["accuracy"]),
        "goals": {"flops_saved": ">= 0.25", "accuracy_gap_points": ">= -1"},
    }
    print_rows("DSEE vs LoRA", [
        ("FLOPs saved (heads) vs LoRA merged", flops_saved),
        ("latency ratio DSEE heads / LoRA", result["latency_ratio_dsee_heads_vs_lora"]),
        ("accuracy gap (points)", result["accuracy_gap_points"]),
    ])
    if not args.quick:
        write_result("dsee", result)
    return result


def render_markdown(result: dict[str, Any]) -> str:
    s = result.get("settings", {})
    train = s.get("train", {})
    lat = s.get("latency", {})
    lines = [
        f"DSEE (r=16, N=64, alpha 32, S's support from a low-rank + sparse decomposition) vs LoRA at the same rank on "
        f"{s.get('model', {}).get('name')} + {s.get('task', {}).get('name')}: {s.get('task', {}).get('train_size')} training sentences, "
        f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, max_length {train.get('max_length')}, lr {train.get('lr')}. "
        f"Stage 2 after half the steps: merge, remove {s.get('heads_removed_per_layer')} of {s.get('of_heads')} heads per layer "
        "(physically), re-tune. Trainable % (of the base model's parameters) excludes the task head; for a two-stage run, stage 1 "
        "then stage 2 (smaller: Q/V lost heads). FLOPs per example at seq 64, merged models; masked zeros count as dense.",
        "",
        "| contender | accuracy | trainable % | FLOPs / example | weight density |",
        "|---|---|---|---|---|",
    ]
    for label, r in result.get("results", {}).items():
        stage2 = r.get("stage2", {})
        density = stage2.get("final_weight_density")
        trainable = f"{r['trainable_pct_without_head']:.3f}"
        if stage2.get("stage1_trainable") and r.get("trainable_without_head"):
            base = r["trainable_without_head"] * 100 / r["trainable_pct_without_head"]
            trainable = f"{100 * stage2['stage1_trainable'] / base:.3f} then {trainable}"
        lines.append(f"| {label} | {r['accuracy']:.3f} | {trainable} | {r['flops_per_example'] / 1e6:.1f} M | "
                     f"{'' if density is None else f'{density:.2f}'} |")
    lines += [
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| inference FLOPs saved, DSEE heads vs LoRA | {result['flops_saved_vs_lora']:.1%} | >= 25% |",
        f"| accuracy, DSEE heads - LoRA | {result['accuracy_gap_points']:+.1f} points | >= -1 point |",
        f"| latency, DSEE heads / LoRA (batch {lat.get('batch_size')} x {lat.get('seq_len')}, {lat.get('threads')} threads) | "
        f"{result['latency_ratio_dsee_heads_vs_lora']:.2f} | ~ 1 - FLOPs saved |",
    ]
    rerun = result.get("latency_rerun")
    if rerun:
        lines.append(f"| latency re-timed on a quieter machine, same shapes ({rerun['repeats']} repeats) | {rerun['ratio']:.2f} "
                     f"(FLOP ratio {rerun['flops_ratio']:.2f}) | ~ FLOP ratio |")
    if result.get("extra_note"):
        lines += ["", f"_{result['extra_note']}._"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
