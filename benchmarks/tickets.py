"""Robust vs plain tickets (Zheng et al. 2022) and the rethinking-pruning controls (Liu et al.
2019), side by side in one run; issue 20's benchmark.

Parts (``--parts``, default all; ``structured`` is the structured half of rethinking):

* ``robust``: per task and seed, full fine-tuning with ``tickets: {mode: robust}`` and ``{mode:
  plain}`` (the same gate search without the adversarial term): fine-tune F steps, search S steps,
  draw the ticket at the first density and retrain R steps; the other densities are drawn from
  the same search's saved scores (``from_scores``) and retrained R steps each, as the official
  draws several sparsities from one search. The dense control is full fine-tuning for F + R steps.
  Every model: clean test accuracy, PGD accuracy (L2 ``--pgd-radius``, 5 steps of 0.03 from a
  0.05 start) and word-substitution attacked accuracy (20 neighbours, at most 20% of the words)
  on the first ``--attack-examples`` test examples. Goal (issue 20): at density 0.6 the robust
  ticket's attacked accuracy >= plain + 5 points with clean accuracy within 2 points.
* ``cost``: one robust search step / one plain search step on the same batches, interleaved in
  this process (goal: <= 1 + adversary steps).
* ``rethinking``: IMP tickets with rewinding vs the same masks with random re-initialisation
  (``init: random``) at densities 0.5 and 0.2; and for structured pruning, per removed share of
  heads+FFN neurons (``--removed``, Taylor scores of the dense run, ``slimtune export --slim``),
  the pruned architecture trained three ways (``slimtune.structure_variants``): inherited weights
  fine-tuned, Scratch-E (re-initialised, the dense run's steps) and Scratch-B (re-initialised,
  steps x FLOPs_dense / FLOPs_pruned). The dense run is full fine-tuning for F + R steps, and
  every variant's recipe is the dense run's (the inherited model is fine-tuned as long as the
  dense one; the official fine-tunes for fewer epochs than it trains from scratch).

Settings are fixed up front, never tuned on test. Seeds: mean +- std over ``--seeds``.

    python -m benchmarks.tickets --model minilm-l2 --tasks movie-sentiment --seeds 0,1,2
    python -m benchmarks.tickets --quick            # a smoke run (a few steps)
    python -m benchmarks.tickets --render-only      # print the tables from the JSON
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmarks.common import mean_std, interleaved_medians, merge_part_and_write, print_saved

NAME = "tickets"
PARTS = ("cost", "robust", "rethinking", "structured")


def base_recipe(model: str, task: str, seed: int, steps: int, quick: bool) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "task": {"name": task, "train_size": 64 if quick else 2000, "eval_size": 64 if quick else 1000},
        "method": {"name": "full"},
        "train": {"max_steps": steps, "batch_size": 32, "lr": 1.0e-4, "max_length": 64, "weight_decay": 0.01,
                  "warmup_ratio": 0.06, "seed": seed, "eval_each_epoch": False},
        "measure": {"flops": False, "latency": False, "memory": False},
    }


def train(recipe, out: Path, reuse: bool) -> dict[str, Any]:
    """Train ``recipe`` (a dict or a Recipe) into ``out``; with ``reuse`` a finished run is read back."""
    from slimtune.io import read_json
    from slimtune.recipe import Recipe, validate_recipe
    from slimtune.runner import train_run

    if reuse and (out / "report.json").is_file():
        return read_json(out / "report.json")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    return train_run(recipe if isinstance(recipe, Recipe) else validate_recipe(recipe), out, progress=False)


def attacked(run: Path, args) -> dict[str, Any]:
    """Clean / PGD / substitution accuracy of a run on the first ``--attack-examples`` test examples."""
    from slimtune.measure.attacks import AttackConfig
    from slimtune.runner import evaluate_run

    out = {}
    for attack in (AttackConfig("pgd", radius=args.pgd_radius, examples=args.attack_examples),
                   AttackConfig("substitution", examples=args.substitution_examples)):
        found = evaluate_run(run, attack=attack)
        out["test_accuracy"] = found["metrics"]["accuracy"]
        out[attack.name] = {k: v for k, v in found["attack"].items() if k != "config"}
    return out


def robust_part(args, runs: Path) -> list[dict[str, Any]]:
    rows = []
    densities = [float(d) for d in args.densities.split(",")]
    f, s, r = args.finetune_steps, args.search_steps, args.retrain_steps
    total = f + s + r
    for task in args.tasks.split(","):
        for seed in [int(x) for x in args.seeds.split(",")]:
            where = runs / task / f"seed{seed}"
            dense = train(base_recipe(args.model, task, seed, f + r, args.quick), where / "dense", args.reuse)
            rows.append({"task": task, "seed": seed, "kind": "dense", "density": 1.0,
                         "seconds": dense["train"]["seconds"], **attacked(where / "dense", args)})
            print(rows[-1], flush=True)
            for mode in ("robust", "plain"):
                recipe = base_recipe(args.model, task, seed, total, args.quick)
                recipe["tickets"] = {"mode": mode, "density": densities[0], "phases": [f / total, s / total, r / total]}
                search = where / f"{mode}-{densities[0]}"
                report = train(recipe, search, args.reuse)
                rows.append({"task": task, "seed": seed, "kind": mode, "density": densities[0], "seconds": report["train"]["seconds"],
                             "step_seconds": report["tickets"].get("step_seconds_median", {}), **attacked(search, args)})
                print(rows[-1], flush=True)
                for density in densities[1:]:
                    recipe = base_recipe(args.model, task, seed, r, args.quick)
                    recipe["tickets"] = {"mode": mode, "density": density, "from_scores": str(search)}
                    out = where / f"{mode}-{density}"
                    report = train(recipe, out, args.reuse)
                    rows.append({"task": task, "seed": seed, "kind": mode, "density": density, "seconds": report["train"]["seconds"], **attacked(out, args)})
                    print(rows[-1], flush=True)
    return rows


def cost_part(args, runs: Path) -> dict[str, Any]:
    """Seconds per search step, robust vs plain, on the same batches, interleaved."""
    import torch

    from slimtune.recipe import validate_recipe
    from slimtune.runner import build
    from slimtune.sparsity.hard_concrete import apply_gate, gate_parameters
    from slimtune.sparsity.schedules import select_targets
    from slimtune.train.adversarial import FreeLB, freelb_backward
    from slimtune.train.trainer import Trainer

    recipe = validate_recipe(base_recipe(args.model, args.tasks.split(",")[0], 0, 10, args.quick))
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", hooks=[], progress=False)
    model = built.model
    for p in model.parameters():
        p.requires_grad_(False)
    for module, tensor_name in select_targets(model, built.delta, "base").values():
        apply_gate(module, tensor_name)
    gates = gate_parameters(model)
    optimizer = torch.optim.AdamW(gates, lr=0.1, weight_decay=1e-6)
    model.train()
    batch = trainer.batch("train", list(range(32)))
    adversary = FreeLB()

    def step(adversarial: bool):
        if adversarial:
            freelb_backward(model, batch, adversary)
        else:
            model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(gates, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    medians = interleaved_medians({"robust": lambda: step(True), "plain": lambda: step(False)}, repeats=args.repeats)
    return {"seconds_per_step": medians, "ratio": medians["robust"] / medians["plain"], "adversary_steps": adversary.steps,
            "goal": f"<= {1 + adversary.steps}", "load_average": os.getloadavg()}


def rethinking_part(args, runs: Path) -> list[dict[str, Any]]:
    rows = []
    for task in args.tasks.split(","):
        for seed in [int(x) for x in args.seeds.split(",")]:
            for density in (0.5, 0.2):
                for init in ("rewind", "random"):
                    recipe = base_recipe(args.model, task, seed, args.imp_steps, args.quick)
                    recipe["tickets"] = {"mode": "imp", "density": density, "rounds": 3, "init": init}
                    out = runs / task / f"seed{seed}" / f"imp-{density}-{init}"
                    report = train(recipe, out, args.reuse)
                    rows.append({"task": task, "seed": seed, "density": density, "init": init,
                                 "test_accuracy": report["metrics"]["accuracy"], "seconds": report["train"]["seconds"]})
                    print(rows[-1], flush=True)
    return rows


def structured_part(args, runs: Path) -> list[dict[str, Any]]:
    """Inherited vs Scratch-E vs Scratch-B on the architectures left by removing a share of every
    layer's heads and FFN neurons from a dense fine-tuned run."""
    import slimtune
    from slimtune.runner import export_run

    rows = []
    steps = args.finetune_steps + args.retrain_steps
    for task in args.tasks.split(","):
        for seed in [int(x) for x in args.seeds.split(",")]:
            where = runs / task / f"seed{seed}"
            recipe = base_recipe(args.model, task, seed, steps, args.quick)
            dense = train(recipe, where / "dense", args.reuse)
            rows.append({"task": task, "seed": seed, "removed": 0.0, "variant": "dense", "test_accuracy": dense["metrics"]["accuracy"],
                         "steps": steps, "seconds": dense["train"]["seconds"]})
            print(rows[-1], flush=True)
            for removed in [float(x) for x in args.removed.split(",")]:
                slim = where / f"slim-{removed}"
                if not (args.reuse and (slim / "slimtune_export.json").is_file()):
                    if slim.exists():
                        import shutil

                        shutil.rmtree(slim)
                    export_run(where / "dense", slim, slim=f"heads={removed},ffn={removed}", measure=False)
                for variant, variant_recipe in slimtune.structure_variants(slim, recipe).items():
                    report = train(variant_recipe, where / f"structure-{removed}-{variant}", args.reuse)
                    rows.append({"task": task, "seed": seed, "removed": removed, "variant": variant,
                                 "test_accuracy": report["metrics"]["accuracy"], "steps": report["structure"]["steps"],
                                 "flops_ratio": report["structure"]["flops_ratio"], "seconds": report["train"]["seconds"]})
                    print(rows[-1], flush=True)
    return rows




def render(result: dict[str, Any]) -> str:
    lines = []
    if rows := result.get("robust", {}).get("rows"):
        lines += ["| task | model | density | clean | PGD | substitution | seeds |", "|---|---|---|---|---|---|---|"]
        keys = sorted({(r["task"], r["kind"], r["density"]) for r in rows}, key=lambda k: (k[0], -k[2], k[1]))
        for task, kind, density in keys:
            group = [r for r in rows if (r["task"], r["kind"], r["density"]) == (task, kind, density)]
            lines.append(f"| {task} | {kind} | {density} | {mean_std([r['pgd']['clean_accuracy'] for r in group])} | "
                         f"{mean_std([r['pgd']['attacked_accuracy'] for r in group])} | "
                         f"{mean_std([r['substitution']['attacked_accuracy'] for r in group])} | {len(group)} |")
    if cost := result.get("cost", {}).get("result"):
        s = cost["seconds_per_step"]
        lines += ["", f"Search step: robust {s['robust']:.3f} s, plain {s['plain']:.3f} s, ratio {cost['ratio']:.2f} "
                      f"(goal {cost['goal']}; load average {cost['load_average'][0]:.2f})."]
    if rows := result.get("rethinking", {}).get("rows"):
        lines += ["", "| task | density | IMP rewind | IMP random re-init | seeds |", "|---|---|---|---|---|"]
        for task, density in sorted({(r["task"], r["density"]) for r in rows}, key=lambda k: (k[0], -k[1])):
            acc = {init: [r["test_accuracy"] for r in rows if (r["task"], r["density"], r["init"]) == (task, density, init)] for init in ("rewind", "random")}
            lines.append(f"| {task} | {density} | {mean_std(acc['rewind'])} | {mean_std(acc['random'])} | {len(acc['rewind'])} |")
    if rows := result.get("structured", {}).get("rows"):
        variants = ("inherited", "scratch-e", "scratch-b")
        lines += ["", "| task | heads+FFN removed | FLOPs dense/pruned | dense | inherited + fine-tuned | Scratch-E | Scratch-B (steps) | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for task, removed in sorted({(r["task"], r["removed"]) for r in rows if r["variant"] != "dense"}):
            group = [r for r in rows if (r["task"], r["removed"]) == (task, removed)]
            acc = {v: [r["test_accuracy"] for r in group if r["variant"] == v] for v in variants}
            dense = [r["test_accuracy"] for r in rows if r["task"] == task and r["variant"] == "dense"]
            b_steps = sorted({r["steps"] for r in group if r["variant"] == "scratch-b"})
            lines.append(f"| {task} | {removed:.0%} | {group[0]['flops_ratio']:.2f} | {mean_std(dense)} | {mean_std(acc['inherited'])} | "
                         f"{mean_std(acc['scratch-e'])} | {mean_std(acc['scratch-b'])} ({'/'.join(map(str, b_steps))}) | {len(acc['inherited'])} |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l2", help="minilm-l2 (the quick variant) or minilm-l6")
    parser.add_argument("--tasks", default="movie-sentiment", help="comma-separated zoo tasks")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--densities", default="0.6,0.8,0.4", help="the first is drawn by the search run itself, the others from its scores")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--search-steps", type=int, default=60)
    parser.add_argument("--retrain-steps", type=int, default=120)
    parser.add_argument("--removed", default="0.25,0.5,0.75", help="structured part: shares of heads and FFN neurons removed")
    parser.add_argument("--imp-steps", type=int, default=240, help="IMP runs: total steps (3 rounds + the ticket's training)")
    parser.add_argument("--pgd-radius", type=float, default=0.1)
    parser.add_argument("--attack-examples", type=int, default=200, help="PGD: first N test examples")
    parser.add_argument("--substitution-examples", type=int, default=100, help="substitution: first N test examples")
    parser.add_argument("--repeats", type=int, default=10, help="cost part: interleaved repeats")
    parser.add_argument("--runs", default="runs/bench-tickets", help="where the run directories go")
    parser.add_argument("--reuse", action="store_true", help="reuse finished run directories (report.json present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps on 64 examples")
    parser.add_argument("--render-only", action="store_true", help="print the tables of benchmarks/results/tickets-MODEL.json")
    args = parser.parse_args(argv)
    if args.render_only:
        return print_saved(result_name(args.model), render)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.finetune_steps, args.search_steps, args.retrain_steps, args.imp_steps = 2, 2, 2, 4
        args.attack_examples = args.substitution_examples = 8
        args.seeds, args.repeats = "0", 2
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part '{unknown[0]}'; valid: {', '.join(PARTS)}")
    runs = Path(args.runs) / args.model
    settings = {k: v for k, v in vars(args).items() if k not in ("render_only",)}
    result: dict[str, Any] = {}
    for part in parts:
        start = os.getloadavg()
        found = PART_FUNCTIONS[part](args, runs)
        entry = {"settings": settings, "load_average": [start, os.getloadavg()],
                 **({"rows": found} if isinstance(found, list) else {"result": found})}
        # Written after every part: a long run that breaks keeps what it finished.
        # Parts, tasks and seeds run separately land in one file per model.
        result = {**result, part: entry} if args.quick else merge_part_and_write(result_name(args.model), PARTS, part, entry, args)
    print(render(result))
    return result


def result_name(model: str) -> str:
    return f"{NAME}-{model}"


PART_FUNCTIONS = {"cost": cost_part, "robust": robust_part, "rethinking": rethinking_part, "structured": structured_part}


#: docs/benchmarks.md's section (benchmarks/readme.py).
render_markdown = render


if __name__ == "__main__":
    main()
