"""Choose DSEE's structured stage-2 settings on the VALIDATION split (never on test).

Stage 1 is the same for every candidate (same recipe up to the prune step), so it is trained once
with checkpoints; each candidate resumes from the checkpoint just before its prune step and runs
its own stage 2 (prune, re-tune) to the end. A resumed run replays the uninterrupted one (data
order, RNG, optimizer and schedule are restored), so each candidate costs only its stage 2.

    python -m benchmarks.dsee_select stage1                  # trains to step 62, checkpoints 31 and 62
    python -m benchmarks.dsee_select run '{"heads_per_layer": 4, "ffn_fraction": 0.25}' [--prune-at 0.5]
    python -m benchmarks.dsee_select reference               # LoRA r=16 whole: its validation accuracy

Each candidate appends one JSON line (validation and test accuracy, FLOPs saved) to
benchmarks/results/dsee-select.jsonl; the validation accuracy picks the setting, the test accuracy is
only reported. Budget and base recipe: those of benchmarks/dsee.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from benchmarks.dsee import BASE

WORK = Path("/tmp/dsee-select")
DSEE = {"name": "dsee", "r": 16, "alpha": 32, "num_sparse": 64, "sparse_init": "decomposition"}
# Checkpoints every 31 steps: the fork points of prune_at 0.25 (stage 2 at step 32) and 0.5 (63).
EVERY = 31


def recipe_for(method: dict[str, Any], checkpoint_every: int | None = None):
    from slimtune.recipe import validate_recipe

    recipe = copy.deepcopy(BASE)
    recipe["method"] = method
    if checkpoint_every:
        recipe["train"]["checkpoint_every"] = checkpoint_every
    return validate_recipe(recipe, source="benchmarks/dsee_select")


def make_trainer(recipe, run_dir: Path, extra_hooks=()):
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective=built.objective, run_dir=run_dir, hooks=[*built.hooks, *extra_hooks], progress=False)
    trainer.base_fingerprint = built.fingerprint
    return built, trainer


def stage1() -> None:
    from slimtune.core.hooks import Hook

    class Stop(Hook):
        name = "stop_at"

        def stop_reason(self, trainer):
            return "stage 1 checkpoints written" if trainer.step >= 2 * EVERY else None

    run_dir = WORK / "stage1"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # prune_at only matters at the prune step, after the last checkpoint written here.
    _, trainer = make_trainer(recipe_for({**DSEE, "prune": "heads"}, EVERY), run_dir, [Stop()])
    started = time.perf_counter()
    trainer.fit()
    print(f"stage 1: {trainer.step} steps in {time.perf_counter() - started:.0f} s; checkpoints in {run_dir / 'checkpoints'}")


def run(candidate: dict[str, Any], prune_at: float) -> dict[str, Any]:
    from slimtune.measure.flops import flops_per_example

    method = {**DSEE, "prune": "heads", "prune_at": prune_at, **candidate}
    recipe = recipe_for(method, None)
    run_dir = WORK / f"run-{int(time.time())}"
    (run_dir / "checkpoints").mkdir(parents=True)
    built, trainer = make_trainer(recipe, run_dir)
    # The prune step as DSEE computes it, from the budget's total steps (2 epochs of 2,000: 126).
    at = max(1, round(prune_at * trainer.total_steps))
    fork = at - 1
    source = WORK / "stage1" / "checkpoints" / f"step-{fork:08d}"
    if not source.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        raise SystemExit(f"no stage-1 checkpoint at step {fork} (prune_at {prune_at}); run 'stage1' first or use 0.25/0.5")
    shutil.copytree(source, run_dir / "checkpoints" / source.name)
    started = time.perf_counter()
    trainer.fit(resume=True)
    seconds = time.perf_counter() - started
    validation = trainer.evaluate("validation")
    test = trainer.evaluate("test")
    built.delta.merge(built.model)
    flops = flops_per_example(built.model, trainer.inference_batch(1, 64))
    built.delta.unmerge(built.model)
    info = next((h.report() for h in trainer.hooks if h.name == "dsee"), {})
    row = {
        "method": method, "validation_accuracy": validation["accuracy"], "test_accuracy": test["accuracy"],
        "flops_per_example": flops, "flops_saved": info.get("flops_saved"), "stage2_step": info.get("stage2_step"),
        "stage2_seconds": seconds, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "dsee-select.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def reference() -> dict[str, Any]:
    """LoRA r=16 (the benchmark's reference row) trained whole: its validation accuracy is what a
    candidate's is compared with; its test accuracy must reproduce benchmarks/dsee.py's."""
    from benchmarks.dsee import train

    started = time.perf_counter()
    _, _, test, _ = train({"name": "lora", "r": 16, "alpha": 32}, quick=False)
    row = {"method": {"name": "lora", "r": 16, "alpha": 32}, "validation_accuracy": test["validation_accuracy"],
           "test_accuracy": test["accuracy"], "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(RESULTS / "dsee-select.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["stage1", "run", "reference"])
    parser.add_argument("candidate", nargs="?", default="{}", help="JSON: DSEE fields of the candidate's stage 2")
    parser.add_argument("--prune-at", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.what == "stage1":
        stage1()
    elif args.what == "reference":
        reference()
    else:
        run(json.loads(args.candidate), args.prune_at)


if __name__ == "__main__":
    main()
