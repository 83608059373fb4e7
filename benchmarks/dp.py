"""DP-SGD on minilm-l6 + movie-sentiment: step time vs non-private and vs Opacus, accuracy at
ε=3 and ε=8 vs non-private, and DP-LoRA on a causal LM (smollm2-135m, perplexity).

Speed (part ``speed``): one physical batch of 32 real movie-sentiment sentences padded to 64
tokens; a step is forward, backward, per-sample clipping, noise and the AdamW step (noise
multiplier 1, clip 1). Timed as interleaved medians in one run (A/B/C/A/B/C...), so machine noise
hits every contender alike.

  DP-LoRA (r=8, alpha 16 on query/value + classifier): ours / non-private LoRA    goal <= 1.05
                                                       ours / Opacus (peft LoRA + make_private, hooks mode)  goal <= 0.95
  DP full fine-tuning (every parameter private):       ours / Opacus hooks mode   goal <= 0.6

Composed (part ``composed``, the same batch and step): DP-LoRA with a 50% SNIP mask on its
factors (scored after 3 non-private steps, so that B is not zero; it times the mask only — a DP
run refuses SNIP, which reads raw training data, and would mask by magnitude or movement at the
same cost) and DP-LoRA under QAT
(int8 fake quantisation of every Linear, per-example activation ranges), each / plain DP-LoRA,
interleaved in one run                                                        goal <= 1.15

Accuracy (part ``accuracy``): `recipes/dp-lora.yaml` at ε=8 and at ε=3, and non-private LoRA
(`recipes/lora.yaml` on the same full training split, 2 epochs, max_length 64), and the DP recipe
with its fine-tuning noise switched off (σ=0: what its clipping and schedule alone cost), each
trained and tested on the same 1,000 test sentences. With public data: a non-private LoRA run on
amazon-sentiment (`recipes/public-amazon-lora.yaml`) is the start (`train.init_from`) of
`recipes/dp-lora-public.yaml` at ε=8 and of non-private LoRA beside it; the public run alone is
tested on movie-sentiment too. Causal LM (part ``lm``): `recipes/dp-lora-lm.yaml`, test
perplexity before and after. Runs go to ``--runs`` (one directory per run); a finished run whose
recipe.yaml trains the same as planned (the ``measure`` section aside) is reused, not retrained.
Parts not run keep their previous figures from benchmarks/results/dp.json. Probe (part ``probe``):
the recipe's DP linear probe alone (no fine-tuning) at 3 noise seeds, test and validation accuracy.

Schedule (part ``schedule``, no training): for logical batches x epochs on the full split, the noise
σ the accountant calibrates for ε=8 and the scale sqrt(steps) x batch / σ of the accumulated
signal-to-noise, i.e. what a batch/epoch choice can buy at fixed ε and N.

    python -m benchmarks.dp [--quick] [--parts speed,composed,accuracy,probe,lm,schedule] [--repeats 5] [--threads 2] [--runs runs/bench-dp]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

from benchmarks.common import RESULTS, interleaved_medians, print_rows, write_result

BATCH, SEQ, SIGMA, CLIP = 32, 64, 1.0, 1.0
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("speed", "speed-full", "composed", "accuracy", "probe", "lm", "schedule")
#: Part "schedule": logical batches x epochs whose noise the accountant calibrates for ε=8.
SCHEDULE_BATCHES, SCHEDULE_EPOCHS = (256, 1024, 4226), (2, 6, 8, 32)

ACCURACY_TASK = "movie-sentiment"
NON_PRIVATE = ["task.train_size=100000", "train.epochs=2", "train.max_length=64"]
#: The accuracy comparison: label -> (recipe, overrides). The non-private baseline trains the same
#: LoRA on the same full training split for the same 2 epochs, with the usual non-private
#: settings (batch 32, lr 1e-3, warm-up 6%); train_size larger than the split = the whole split.
#: "dp-noise-free" is the DP recipe with the fine-tuning noise switched off (σ=0; same probe,
#: clipping, Poisson batches and schedule): it splits the gap into what the DP schedule costs and
#: what the noise costs. "{runs}" in an override is the --runs directory.
ACCURACY_RUNS = {
    "non-private": ("recipes/lora.yaml", NON_PRIVATE),
    "dp-eps8": ("recipes/dp-lora.yaml", []),
    "dp-eps3": ("recipes/dp-lora.yaml", ["privacy.epsilon=3"]),
    "dp-noise-free": ("recipes/dp-lora.yaml", ["privacy.epsilon=null", "privacy.noise_multiplier=0"]),
    # With public data: both sides start from the same non-private run on amazon-sentiment.
    "public-stage": ("recipes/public-amazon-lora.yaml", []),
    "non-private-public": ("recipes/lora.yaml", NON_PRIVATE + ["train.init_from={runs}/public-stage"]),
    "dp-eps8-public": ("recipes/dp-lora-public.yaml", ["train.init_from={runs}/public-stage"]),
}
LM_RUN = ("lm-dp-eps8", "recipes/dp-lora-lm.yaml", [])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the speed part, 3 repeats, DP-LoRA only")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run: speed (DP-LoRA), speed-full (DP full fine-tuning), composed (DP-LoRA with a SNIP mask, with QAT), accuracy, probe (the recipe's DP linear probe alone, 3 noise seeds), lm, schedule (σ and signal-to-noise scale per batch x epochs; no training) (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opacus-ghost", action="store_true", help="speed: also time Opacus' ghost-clipping mode on DP-LoRA")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-dp", help="directory of the accuracy/LM run directories")
    parser.add_argument("--partial", action="append", default=[], metavar="LABEL",
                        help="accuracy: take this run (e.g. non-private) from its latest checkpoint if it did not finish, marked partial")
    args = parser.parse_args(argv)
    parts = ["speed"] if args.quick else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts {unknown[0]}: unknown part; known: {', '.join(PARTS)}")
    if args.quick:
        args.repeats = 3

    previous_path = RESULTS / "dp.json"
    result = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    for key in ("benchmark", "date", "machine"):
        result.pop(key, None)
    if "speed" in parts:
        result["speed"] = speed(args, full_fine_tuning=False)
    if "speed-full" in parts:
        result["speed_full"] = speed(args, full_fine_tuning=True)
    if "composed" in parts:
        result["composed"] = composed(args)
    if "accuracy" in parts:
        result["accuracy"] = accuracy(args.runs, args.threads, tuple(args.partial))
    if "probe" in parts:
        result["probe"] = probe_only(args.threads)
    if "lm" in parts:
        result["lm"] = causal_lm(args.runs, args.threads)
    if "schedule" in parts:
        result["schedule"] = schedule()
    print_rows("DP-SGD (minilm-l6, movie-sentiment)", summary_rows(result))
    write_result("dp", result)
    return result


# -- speed ------------------------------------------------------------------------------------------
def speed(args, full_fine_tuning: bool) -> dict:
    """DP-LoRA (ours, non-private, Opacus) or DP full fine-tuning (ours, non-private, Opacus),
    the three contenders interleaved in one run."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    batch, labels, base = _speed_inputs()
    contenders = {}
    if not full_fine_tuning:
        contenders["lora non-private"] = plain_step(ours_lora(base), batch, labels)
        contenders["lora DP ours"] = ours_dp_step(ours_lora(base), batch, labels)
        contenders["lora DP opacus"] = opacus_step(peft_lora(base), batch, labels, "hooks")
        if args.opacus_ghost:
            contenders["lora DP opacus ghost"] = opacus_step(peft_lora(base), batch, labels, "ghost")
    else:
        contenders["full non-private"] = plain_step(full(base), batch, labels)
        contenders["full DP ours"] = ours_dp_step(full(base), batch, labels)
        contenders["full DP opacus"] = opacus_step(full(base), batch, labels, "hooks")
    times = interleaved_medians(contenders, repeats=args.repeats, warmup=1)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {"model": "minilm-l6", "task": "movie-sentiment", "physical_batch": BATCH, "seq_len": SEQ, "noise_multiplier": SIGMA, "max_grad_norm": CLIP,
                     "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]}, "threads": args.threads, "repeats": args.repeats,
                     "load_average": _load_average()},
        "step_seconds": times,
    }
    if not full_fine_tuning:
        out["lora_dp_vs_non_private"] = times["lora DP ours"] / times["lora non-private"]
        out["lora_dp_vs_opacus"] = times["lora DP ours"] / times["lora DP opacus"]
        out["opacus_lora_vs_non_private"] = times["lora DP opacus"] / times["lora non-private"]
        if args.opacus_ghost:
            out["opacus_ghost_lora_vs_non_private"] = times["lora DP opacus ghost"] / times["lora non-private"]
    else:
        out["full_dp_vs_opacus"] = times["full DP ours"] / times["full DP opacus"]
        out["full_dp_vs_non_private"] = times["full DP ours"] / times["full non-private"]
        out["opacus_full_vs_non_private"] = times["full DP opacus"] / times["full non-private"]
        out["per_sample_rules"] = clipper_rules(base)
    return out


def _speed_inputs():
    """The speed parts' batch (32 real sentences padded to 64 tokens), labels and base model."""
    import torch

    from slimtune.zoo.models import load_model, load_tokenizer
    from slimtune.zoo.tasks import load_task

    tokenizer = load_tokenizer("minilm-l6")
    task = load_task("movie-sentiment", split_seed=0, train_size=BATCH, eval_size=10, seed=0)
    rows = task.splits["train"]
    batch = dict(tokenizer(list(rows["text"]), padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt"))
    # Explicit per-row position ids: Opacus cannot take per-sample gradients of an embedding whose
    # input (1, T) is shared by the batch (ours can); the same inputs for every contender.
    batch["position_ids"] = torch.arange(SEQ).expand(BATCH, SEQ).contiguous()
    labels = torch.tensor(list(rows["label"]))
    torch.manual_seed(0)
    base = load_model("minilm-l6", num_labels=2)
    base.train()
    return batch, labels, base


def composed(args) -> dict:
    """DP-LoRA alone, with a 50% SNIP mask on its factors, and under QAT: step times interleaved."""
    import torch

    from slimtune.compress.qat import enable_fake_quant
    from slimtune.sparsity.masks import density_report
    from slimtune.sparsity.schedules import prune, select_targets

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    batch, labels, base = _speed_inputs()
    masked, delta = ours_lora(base, with_delta=True)
    warm = plain_step(masked, batch, labels)
    for _ in range(3):  # B leaves zero, so SNIP has something to rank
        warm()

    def loss_fn(b):
        return masked(**b).loss

    prune(masked, select_targets(masked, delta, "delta"), criterion="snip", density=0.5, batches=[{**batch, "labels": labels}], loss_fn=loss_fn)
    def quantised(activations: bool, per_sample: bool):
        model = ours_lora(base)
        enable_fake_quant(model, activations=activations, per_sample=per_sample)
        return model

    contenders = {
        "lora DP": ours_dp_step(ours_lora(base), batch, labels),
        "lora DP + SNIP mask 50%": ours_dp_step(masked, batch, labels),
        "lora DP + QAT": ours_dp_step(quantised(True, True), batch, labels),
        # What QAT itself costs, and DP + QAT without activation fake quantisation:
        "lora non-private": plain_step(ours_lora(base), batch, labels),
        "lora non-private + QAT": plain_step(quantised(True, False), batch, labels),
        "lora DP + QAT weights only": ours_dp_step(quantised(False, True), batch, labels),
    }
    times = interleaved_medians(contenders, repeats=args.repeats, warmup=1)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {"model": "minilm-l6", "physical_batch": BATCH, "seq_len": SEQ, "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]},
                     "mask": {"criterion": "snip", "density": density_report(masked)["density"], "on": "LoRA factors"},
                     "qat": {"weights": "int8 per channel", "activations": "8-bit per example"},
                     "threads": args.threads, "repeats": args.repeats, "load_average": _load_average()},
        "step_seconds": times,
        "rules": {name: sorted(set(_rules_of(step).values())) for name, step in contenders.items() if hasattr(step, "clipper")},
        "mask_vs_dp_lora": times["lora DP + SNIP mask 50%"] / times["lora DP"],
        "qat_vs_dp_lora": times["lora DP + QAT"] / times["lora DP"],
        "qat_vs_non_private": times["lora non-private + QAT"] / times["lora non-private"],
        "qat_weights_only_vs_dp_lora": times["lora DP + QAT weights only"] / times["lora DP"],
    }


def _rules_of(step) -> dict:
    return step.clipper.describe()


def clipper_rules(base) -> dict:
    """How our engine takes per-sample gradients in full fine-tuning at this sequence length:
    rules per parameter, and the linear layers that use ghost norms vs instantiated gradients."""
    from slimtune.privacy.per_sample import PerSampleClipper
    from slimtune.privacy.rules import LinearRule

    model = full(base)
    clipper = PerSampleClipper(model, {n: p for n, p in model.named_parameters() if p.requires_grad}, check=False)
    kinds: dict[str, int] = {}
    for kind in clipper.describe().values():
        kinds[kind] = kinds.get(kind, 0) + 1
    linears = [rule for rule in clipper.rules if isinstance(rule, LinearRule) and rule.module.weight.requires_grad]
    ghost = sorted({f"{r.module.in_features}->{r.module.out_features}" for r in linears if r.use_ghost(SEQ)})
    dense = sorted({f"{r.module.in_features}->{r.module.out_features}" for r in linears if not r.use_ghost(SEQ)})
    clipper.remove()
    return {"parameters_by_rule": kinds, "ghost_norm_linear_shapes": ghost, "instantiated_linear_shapes": dense,
            "ghost_norm_linears": sum(r.use_ghost(SEQ) for r in linears), "instantiated_linears": sum(not r.use_ghost(SEQ) for r in linears)}


def _load_average() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- accuracy and the causal LM ---------------------------------------------------------------------
def _training_view(recipe) -> dict:
    """What decides the trained model: the recipe without its measurement settings."""
    data = recipe.to_dict()
    data.pop("measure", None)
    return data


def run_or_reuse(runs: Path, label: str, recipe_path: str, overrides: list[str], threads: int) -> dict:
    """Train ``recipe_path`` + ``overrides`` into ``runs/label`` (or reuse that finished run when
    its recipe.yaml trains the same); return its report."""
    import torch

    from slimtune.errors import SlimtuneError
    from slimtune.recipe import load_recipe
    from slimtune.runner import train_run

    recipe = load_recipe(ROOT / recipe_path, overrides)
    out = runs / label
    if (out / "report.json").is_file() and (out / "recipe.yaml").is_file():
        if _training_view(load_recipe(out / "recipe.yaml")) == _training_view(recipe):
            print(f"{label}: reusing the finished run {out}", flush=True)
            return json.loads((out / "report.json").read_text())
        raise SlimtuneError(f"{out}: a finished run with another recipe than {recipe_path} {' '.join(overrides)}; move it away or pass another --runs")
    torch.set_num_threads(threads)
    print(f"{label}: training {recipe_path} {' '.join(overrides)} -> {out}", flush=True)
    return train_run(recipe, out, progress=False)


def checkpoint_report(runs: Path, label: str, recipe_path: str, overrides: list[str], threads: int) -> dict | None:
    """For a run stopped before its end (the shared machine was too slow to finish it in time):
    the test metrics of its latest epoch-end checkpoint, in the shape of a report, marked partial."""
    import torch

    from slimtune.recipe import load_recipe
    from slimtune.runner import build
    from slimtune.train import checkpoint as ckpt
    from slimtune.train.trainer import Trainer

    out = runs / label
    found = ckpt.latest_good_checkpoint(out) if (out / "checkpoints").is_dir() else None
    if found is None:
        return None
    path, state, tensors = found
    cached = out / f"partial-report-{path.name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    torch.set_num_threads(threads)
    recipe = load_recipe(ROOT / recipe_path, overrides)
    if _training_view(load_recipe(out / "recipe.yaml")) != _training_view(recipe):
        from slimtune.errors import SlimtuneError

        raise SlimtuneError(f"{out}: its recipe.yaml trains otherwise than {recipe_path} {' '.join(overrides)}")
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective=built.objective, run_dir=None, hooks=[], progress=False)
    with torch.no_grad():
        for name, param in trainer.trainable.items():
            param.copy_(tensors[f"param.{name}"])
    print(f"{label}: not finished; evaluating its checkpoint {path}", flush=True)
    report = {"metrics": trainer.evaluate("test"), "task": {"n_train": len(built.task.splits["train"]), "n_test": len(built.task.splits["test"])},
            "train": {"steps": int(state["step"]), "seconds": None, "stop_reason": f"partial: stopped for time; checkpoint after {state['position']['epoch']} of "
                      f"{recipe.train.epochs:g} epochs (step {state['step']} of {trainer.total_steps})"}}
    privacy_state = (state.get("hooks") or {}).get("privacy")
    if privacy_state:
        from slimtune.privacy import accounting

        cfg = recipe.features["privacy"]
        history = privacy_state["history"]
        report["privacy"] = {"epsilon": accounting.epsilon_of(cfg.accountant, history, cfg.delta), "epsilon_budget": cfg.epsilon, "delta": cfg.delta,
                             "accountant": cfg.accountant, "noise_multiplier": privacy_state["noise_multiplier"], "max_grad_norm": cfg.max_grad_norm,
                             "sample_rate": history[-1][1] if history else None, "expected_batch_size": recipe.train.batch_size,
                             "physical_batch_size": cfg.physical_batch_size, "steps": int(sum(h[2] for h in history))}
    cached.write_text(json.dumps(report, indent=2))
    return report


def _run_entry(report: dict, recipe_path: str, overrides: list[str]) -> dict:
    train = report.get("train", {})
    entry = {
        "recipe": recipe_path + "".join(f" --set {o}" for o in overrides),
        "metrics": report.get("metrics"),
        "n_train": report.get("task", {}).get("n_train"),
        "n_test": report.get("task", {}).get("n_test"),
        "steps": train.get("steps"),
        "train_seconds": train.get("seconds"),
        "stop_reason": train.get("stop_reason"),
        "trainable_params": report.get("params", {}).get("trainable"),
    }
    if "privacy" in report:
        entry["privacy"] = {k: report["privacy"].get(k) for k in ("epsilon", "epsilon_budget", "delta", "accountant", "noise_multiplier", "max_grad_norm",
                                                                    "sample_rate", "expected_batch_size", "physical_batch_size", "steps", "linear_probe")}
    return entry


def _settings(recipe_path: str, overrides: list[str]) -> dict:
    from slimtune.recipe import load_recipe

    data = load_recipe(ROOT / recipe_path, overrides).to_dict()
    keep = {"train": ("epochs", "max_steps", "batch_size", "lr", "head_lr", "warmup_ratio", "scheduler", "max_length"), "method": ("name", "r", "alpha", "targets"),
            "head": ("pooling",)}
    out = {section: {k: data[section].get(k) for k in keys if data[section].get(k) is not None} for section, keys in keep.items()}
    if "privacy" in data:
        out["privacy"] = {k: data["privacy"][k] for k in ("epsilon", "delta", "max_grad_norm", "accountant", "poisson", "physical_batch_size", "linear_probe")}
    return out


def accuracy(runs: Path, threads: int, partial: tuple[str, ...] = ()) -> dict:
    """Train (or reuse) the runs of ACCURACY_RUNS; those named in ``partial`` are taken from their
    latest checkpoint if they did not finish."""
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}, "settings": {}}
    for label, (recipe_path, overrides) in ACCURACY_RUNS.items():
        planned = [o.format(runs=runs) for o in overrides]  # a warm start names its public run
        report = None
        if label in partial and not (runs / label / "report.json").is_file():
            report = checkpoint_report(runs, label, recipe_path, planned, threads)
        if report is None:
            report = run_or_reuse(runs, label, recipe_path, planned, threads)
        out["runs"][label] = _run_entry(report, recipe_path, overrides)
        out["settings"][label] = _settings(recipe_path, overrides)
    acc = {label: run["metrics"]["accuracy"] for label, run in out["runs"].items()}
    out["gap_eps8_points"] = 100 * (acc["non-private"] - acc["dp-eps8"])
    out["gap_eps3_points"] = 100 * (acc["non-private"] - acc["dp-eps3"])
    out["gap_schedule_points"] = 100 * (acc["non-private"] - acc["dp-noise-free"])
    out["gap_noise_eps8_points"] = 100 * (acc["dp-noise-free"] - acc["dp-eps8"])
    from slimtune.runner import evaluate_run  # the public stage alone, on the private task's test split

    out["public_stage_on_target"] = evaluate_run(runs / "public-stage", task=ACCURACY_TASK)["metrics"]
    out["gap_public_eps8_points"] = 100 * (acc["non-private-public"] - acc["dp-eps8-public"])
    out["gap_public_vs_plain_eps8_points"] = 100 * (acc["non-private"] - acc["dp-eps8-public"])
    return out


def probe_only(threads: int, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """What the DP linear probe of `recipes/dp-lora.yaml` reaches alone (no fine-tuning), per noise seed."""
    import torch

    from slimtune.privacy import accounting
    from slimtune.privacy.linear_probe import probe_target, run_probe
    from slimtune.recipe import load_recipe
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    torch.set_num_threads(threads)
    recipe = load_recipe(ROOT / "recipes/dp-lora.yaml")
    cfg = recipe.features["privacy"]
    probe = cfg.linear_probe
    sigma = accounting.calibrate_noise(cfg.accountant, probe.epsilon, cfg.delta, 1.0, probe.steps)
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective=built.objective, hooks=[], progress=False)
    layer = probe_target(built.model, built.delta.head_names)
    rows = []
    for seed in seeds:
        run_probe(trainer, layer, probe, sigma, lambda step, seed=seed: torch.Generator().manual_seed(1000 * seed + step), cfg.physical_batch_size)
        rows.append({"seed": seed, "test": trainer.evaluate("test")["accuracy"], "validation": trainer.evaluate("validation")["accuracy"]})
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": probe.steps, "epsilon_alone": accounting.epsilon_of(cfg.accountant, [(sigma, 1.0, probe.steps)], cfg.delta),
            "noise_multiplier": sigma, "rows": rows, "test_mean": sum(r["test"] for r in rows) / len(rows),
            "validation_mean": sum(r["validation"] for r in rows) / len(rows)}


def causal_lm(runs: Path, threads: int) -> dict:
    """DP-LoRA on smollm2-135m; test perplexity of the base model (LoRA B = 0) and after training."""
    import torch

    from slimtune.recipe import load_recipe
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    label, recipe_path, overrides = LM_RUN
    report = run_or_reuse(runs, label, recipe_path, overrides, threads)
    torch.set_num_threads(threads)
    recipe = load_recipe(ROOT / recipe_path, overrides)
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective=built.objective, run_dir=None, hooks=[], progress=False)
    before = trainer.evaluate("test")
    entry = _run_entry(report, recipe_path, overrides)
    entry["perplexity_before"] = before["perplexity"]
    entry["perplexity_after"] = report["metrics"]["perplexity"]
    entry["settings"] = _settings(recipe_path, overrides)
    entry["date"] = time.strftime("%Y-%m-%d %H:%M")
    return entry


def schedule(epsilon: float = 8.0, delta: float = 1e-5, accountant: str = "prv") -> dict:
    """How far the signal can stand above the noise, per batch/epoch choice, on the full split.

    With every example clipped to C, a step's summed signal grows with the batch B and its noise is
    σC, so over T steps the accumulated signal-to-noise scales as sqrt(T) B / σ (T = epochs N / B).
    σ is the accountant's calibration for ε over those T steps: this is what batch and epochs can
    buy at a fixed ε and N (no training)."""
    from slimtune.privacy.accounting import calibrate_noise
    from slimtune.recipe import load_recipe
    from slimtune.zoo.tasks import load_task

    recipe = load_recipe(ROOT / "recipes/dp-lora.yaml")
    task = load_task(recipe.task.name, split_seed=recipe.task.split_seed, train_size=None, eval_size=recipe.task.eval_size, seed=recipe.train.seed)
    n = len(task.splits["train"])
    rows = []
    for batch in SCHEDULE_BATCHES:
        for epochs in SCHEDULE_EPOCHS:
            steps = epochs * math.ceil(n / batch)  # as the trainer plans them: whole batches per epoch
            sigma = calibrate_noise(accountant, epsilon, delta, batch / n, steps)
            rows.append({"batch": batch, "epochs": epochs, "steps": steps, "noise_multiplier": sigma, "signal_to_noise_scale": steps**0.5 * batch / sigma})
            print(f"schedule: batch {batch} x {epochs} epochs: {steps} steps, σ={sigma:.3f}, sqrt(T)B/σ={rows[-1]['signal_to_noise_scale']:.0f}", flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "n_train": n, "epsilon": epsilon, "delta": delta, "accountant": accountant,
            "recipe": {"batch": recipe.train.batch_size, "epochs": recipe.train.epochs}, "rows": rows}


# -- output -----------------------------------------------------------------------------------------
def summary_rows(result: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    s = {**(result.get("speed") or {}), **(result.get("speed_full") or {})}
    s["step_seconds"] = {**(result.get("speed") or {}).get("step_seconds", {}), **(result.get("speed_full") or {}).get("step_seconds", {})}
    for key, label in (("lora_dp_vs_non_private", "DP-LoRA ours / non-private LoRA (goal <= 1.05)"), ("lora_dp_vs_opacus", "DP-LoRA ours / Opacus hooks (goal <= 0.95)"),
                       ("opacus_lora_vs_non_private", "DP-LoRA Opacus hooks / non-private"), ("opacus_ghost_lora_vs_non_private", "DP-LoRA Opacus ghost / non-private"),
                       ("full_dp_vs_opacus", "DP full FT ours / Opacus hooks (goal <= 0.6)"), ("full_dp_vs_non_private", "DP full FT ours / non-private full FT"),
                       ("opacus_full_vs_non_private", "DP full FT Opacus hooks / non-private")):
        if key in s:
            rows.append((label, s[key]))
    rows += [(f"step seconds: {k}", v) for k, v in (s.get("step_seconds") or {}).items()]
    c = result.get("composed") or {}
    for key, label in (("mask_vs_dp_lora", "DP-LoRA + 50% SNIP mask / DP-LoRA (goal <= 1.15)"), ("qat_vs_dp_lora", "DP-LoRA + QAT / DP-LoRA (goal <= 1.15)"),
                       ("qat_vs_non_private", "LoRA + QAT / LoRA, non-private (QAT's own cost)"), ("qat_weights_only_vs_dp_lora", "DP-LoRA + QAT weights only / DP-LoRA")):
        if key in c:
            rows.append((label, c[key]))
    for label, run in ((result.get("accuracy") or {}).get("runs") or {}).items():
        eps = (run.get("privacy") or {}).get("epsilon")
        rows.append((f"test accuracy {label}" + (f" (ε spent {eps:.2f})" if eps else ""), run["metrics"]["accuracy"]))
    lm = result.get("lm")
    if lm:
        rows.append(("LM perplexity before / after DP-LoRA", f"{lm['perplexity_before']:.2f} / {lm['perplexity_after']:.2f}"))
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: dict) -> str:
    """The docs/benchmarks.md part: step-time ratios, accuracy at ε=3/8 vs non-private, the causal LM, settings."""
    parts: list[str] = []
    speed_parts = [part for part in (result.get("speed"), result.get("speed_full")) if part]
    if speed_parts:
        rows = []
        for part in speed_parts:
            for key, label, goal in (
                ("lora_dp_vs_non_private", "DP-LoRA step, ours / non-private LoRA step", "<= 1.05"),
                ("lora_dp_vs_opacus", "DP-LoRA step, ours / Opacus (peft LoRA + make_private, hooks)", "<= 0.95"),
                ("opacus_lora_vs_non_private", "DP-LoRA step, Opacus hooks / non-private", ""),
                ("opacus_ghost_lora_vs_non_private", "DP-LoRA step, Opacus ghost / non-private", ""),
                ("full_dp_vs_opacus", "DP full fine-tuning step, ours / Opacus hooks", "<= 0.6"),
                ("full_dp_vs_non_private", "DP full fine-tuning step, ours / non-private", ""),
                ("opacus_full_vs_non_private", "DP full fine-tuning step, Opacus hooks / non-private", ""),
            ):
                if key in part:
                    st = part.get("settings", {})
                    load = f", load {st['load_average']}" if st.get("load_average") is not None else ""
                    rows.append(f"| {label} | {part[key]:.2f}x | {goal} | {part.get('date', '?')}, {st.get('threads')} threads, {st.get('repeats')} repeats{load} |")
        st = speed_parts[0].get("settings", {})
        seconds = "; ".join(f"{k} {v:.2f} s" for part in speed_parts for k, v in (part.get("step_seconds") or {}).items())
        full_rules = (result.get("speed_full") or {}).get("per_sample_rules")
        rules = ""
        if full_rules:
            rules = (f" In full fine-tuning our engine picks per layer: ghost norms for {full_rules['ghost_norm_linears']} linear layers "
                     f"({', '.join(full_rules['ghost_norm_linear_shapes'])}), instantiated per-sample gradients for {full_rules['instantiated_linears']} "
                     f"({', '.join(full_rules['instantiated_linear_shapes'])}); embeddings by ghost norm over equal token ids, LayerNorms by their closed form.")
        parts.append(
            f"Step time on {st.get('model')}, one physical batch of {st.get('physical_batch')} x {st.get('seq_len')} tokens (forward, backward, "
            f"per-sample clipping, noise σ={st.get('noise_multiplier')}, AdamW), LoRA r={st.get('lora', {}).get('r')} on query/value + classifier; "
            "each comparison is one run with the contenders interleaved (A/B/C/A/B/C...), medians of the repeats, on the shared 2-core machine "
            "(the 1-minute load average at the start is given)." + rules + "\n\n"
            "| measure | ratio | goal | measured |\n|---|---|---|---|\n" + "\n".join(rows) + (f"\n\nMedian step seconds: {seconds}." if seconds else "")
        )
    c = result.get("composed")
    if c:
        st = c.get("settings", {})
        load = f", load {st['load_average']}" if st.get("load_average") is not None else ""
        rows = [f"| {label} | {c[key]:.2f}x | {goal} | {c.get('date', '?')}, {st.get('threads')} threads, {st.get('repeats')} repeats{load} |"
                for key, label, goal in (("mask_vs_dp_lora", "DP-LoRA with a 50% SNIP mask on its factors / DP-LoRA", "<= 1.15"),
                                         ("qat_vs_dp_lora", "DP-LoRA under QAT (int8 fake quantisation of weights and activations) / DP-LoRA", "<= 1.15"),
                                         ("qat_vs_non_private", "non-private LoRA under QAT / non-private LoRA: what QAT itself costs", ""),
                                         ("qat_weights_only_vs_dp_lora", "DP-LoRA under QAT with `activations: false` / DP-LoRA", ""))
                if key in c]
        rules = "; ".join(f"{k}: {', '.join(v)}" for k, v in (c.get("rules") or {}).items())
        parts.append(
            "DP-LoRA composed with a sparsity mask and with QAT, the same batch and step, the contenders interleaved in one run "
            f"(per-sample rules used: {rules}). The mask is free; QAT's own forward (torch's fake-quantise op over every "
            "Linear's input costs about as much as the matmul on this CPU) is most of what DP + QAT adds, the exact per-sample "
            "rules of the fake-quantised LoRA layers (about 11 ms per layer and step) the rest:"
            f"\n\n| measure | ratio | goal | measured |\n|---|---|---|---|\n" + "\n".join(rows)
        )
    a = result.get("accuracy")
    if a:
        rows = []
        names = {"non-private": "non-private LoRA", "dp-eps8": "DP-LoRA, ε=8", "dp-eps3": "DP-LoRA, ε=3",
                 "dp-noise-free": "the DP recipe without its fine-tuning noise (σ=0)",
                 "public-stage": "public stage: non-private LoRA on amazon-sentiment (tested on its own split)",
                 "non-private-public": "non-private LoRA from the public stage", "dp-eps8-public": "DP-LoRA, ε=8, from the public stage"}
        for label, run in a["runs"].items():
            p = run.get("privacy") or {}
            m = run["metrics"]
            name = names.get(label, label)
            if str(run.get("stop_reason") or "").startswith("partial"):
                name += f" ({run['stop_reason']})"
            rows.append(
                f"| {name} | {_fmt(m.get('accuracy'))} | {_fmt(m.get('macro_f1'))} | {_fmt(p['epsilon'], 2) if p.get('epsilon') is not None else '∞'} | "
                f"{_fmt(p.get('noise_multiplier'), 2) if p else '0'} | {run.get('steps')} | {_fmt(run['train_seconds'] / 60, 1) if run.get('train_seconds') else '-'} |"
            )
        dp = a["settings"].get("dp-eps8", {})
        npv = a["settings"].get("non-private", {})
        t, pr = dp.get("train", {}), dp.get("privacy", {})
        tn = npv.get("train", {})
        parts.append(
            f"Test accuracy on movie-sentiment ({a['runs']['dp-eps8'].get('n_test')} test sentences; the movie-sentiment runs train on its full split of "
            f"{a['runs']['dp-eps8'].get('n_train')} sentences), minilm-l6, LoRA r=8 on query/value + a mean-pooling classifier (trained privately too); measured {a.get('date', '?')}. "
            f"Gap to non-private: {a['gap_eps8_points']:.1f} points at ε=8 (goal <= 4), {a['gap_eps3_points']:.1f} points at ε=3"
            + (f"; at ε=8, {a['gap_schedule_points']:.1f} points of it come with the DP schedule itself (per-example clipping, {a['runs']['dp-eps8'].get('steps')} large "
               f"Poisson batches, the probed head: the recipe run with σ=0) and {a['gap_noise_eps8_points']:.1f} with the noise" if "gap_schedule_points" in a else "")
            + ".\n\n"
            "| run | accuracy | macro F1 | ε spent (δ=1e-5) | noise σ | steps | train minutes (wall, shared machine) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"DP settings (`recipes/dp-lora.yaml`): {t.get('epochs'):g} epochs, logical batch {t.get('batch_size')} (Poisson sampling, physical batches of "
            f"{pr.get('physical_batch_size')}), lr {t.get('lr')} (LoRA{'' if t.get('head_lr') else ' and head'}; linear decay, no warm-up)"
            + (f", head lr {t.get('head_lr')}" if t.get("head_lr") else "") + f", max_length {t.get('max_length')}, "
            f"clip {pr.get('max_grad_norm')}, {str(pr.get('accountant', '')).upper()} accountant, noise calibrated to the target ε for the planned steps"
            + (_probe_text(pr.get("linear_probe") or {}, a["runs"]["dp-eps8"].get("privacy") or {}) if (pr.get("linear_probe") or {}).get("steps") else "") + ". "
            f"Non-private: {tn.get('epochs'):g} epochs, batch {tn.get('batch_size')}, lr {tn.get('lr')}, warm-up {tn.get('warmup_ratio')}, max_length {tn.get('max_length')}."
        )
        if "gap_public_eps8_points" in a:
            parts.append(
                "With public data of a related task: `recipes/public-amazon-lora.yaml` (non-private LoRA on amazon-sentiment, "
                f"{a['runs']['public-stage'].get('n_train')} product-review sentences) is the start (`train.init_from`) of both "
                f"`recipes/dp-lora-public.yaml` and the non-private run beside it. The public stage alone reaches {_fmt(a['public_stage_on_target']['accuracy'])} "
                f"on movie-sentiment's test split; from it, DP-LoRA at ε=8 reaches {_fmt(a['runs']['dp-eps8-public']['metrics']['accuracy'])} against "
                f"{_fmt(a['runs']['non-private-public']['metrics']['accuracy'])} non-private: gap {a['gap_public_eps8_points']:.1f} points (goal <= 4), "
                f"and {a['gap_public_vs_plain_eps8_points']:.1f} points below the non-private LoRA that had no public data."
            )
    probe = result.get("probe")
    if probe:
        parts.append(
            f"The recipe's DP linear probe alone (ε {_fmt(probe['epsilon_alone'], 2)}, {probe['steps']} full-batch steps, σ={_fmt(probe['noise_multiplier'], 1)}, no fine-tuning; "
            f"part `probe`, {len(probe['rows'])} noise seeds, {probe.get('date', '?')}): test accuracy {', '.join(_fmt(r['test']) for r in probe['rows'])} "
            f"(mean {_fmt(probe['test_mean'])}; validation mean {_fmt(probe['validation_mean'])})."
        )
    sched = result.get("schedule")
    if sched:
        mine = next((r for r in sched["rows"] if r["batch"] == sched["recipe"]["batch"] and r["epochs"] == sched["recipe"]["epochs"]), None)
        rows = [f"| {r['batch']} | {r['epochs']} | {r['steps']} | {r['noise_multiplier']:.2f} | {r['signal_to_noise_scale']:.0f}"
                + (f" ({r['signal_to_noise_scale'] / mine['signal_to_noise_scale']:.2f}x the recipe)" if mine else "") + " |" for r in sched["rows"]]
        parts.append(
            f"What batch and epochs can buy at ε={sched['epsilon']:g} on the {sched['n_train']} training sentences (part `schedule`, "
            f"{sched['accountant'].upper()} calibration, no training): with every example clipped to C, the signal summed over T steps "
            "grows as T B and the noise as sqrt(T) σC, so sqrt(T) B / σ is the scale of the accumulated signal-to-noise.\n\n"
            "| logical batch | epochs | steps | σ | sqrt(T) B / σ |\n|---|---|---|---|---|\n" + "\n".join(rows)
        )
    lm = result.get("lm")
    if lm:
        p = lm.get("privacy") or {}
        lt = (lm.get("settings") or {}).get("train", {})
        parts.append(
            f"Causal LM (`recipes/dp-lora-lm.yaml`): DP-LoRA r=8 on q_proj/v_proj of smollm2-135m, next-token loss on movie-review sentences, "
            f"{lm.get('steps')} steps of an expected {lt.get('batch_size')} sentences, lr {lt.get('lr')}, ε spent {_fmt(p.get('epsilon'), 2)} (σ={_fmt(p.get('noise_multiplier'), 2)}): "
            f"test perplexity {lm['perplexity_before']:.2f} before -> {lm['perplexity_after']:.2f} after ({lm.get('n_test')} test sentences)."
        )
    return "\n\n".join(parts) if parts else "_no measurements_"


def _probe_text(planned: dict, spent: dict) -> str:
    probe = spent.get("linear_probe") or {}
    return (f"; first a DP linear probe (DP-LP-FT, `privacy.linear_probe`): the head fitted on the frozen model's features by {planned.get('steps')} "
            f"full-batch DP gradient-descent steps (clip {planned.get('max_grad_norm')}, step size {planned.get('lr')}, σ={_fmt(probe.get('noise_multiplier'), 1)}, "
            f"ε {_fmt(probe.get('epsilon_alone'), 2)} alone), composed with fine-tuning into the one ε above")


# -- models ---------------------------------------------------------------------------------------
def ours_lora(base, with_delta: bool = False):
    from slimtune.methods.base import get_method_class
    from slimtune.core.arch import Arch
    from slimtune.methods.delta import Delta
    from slimtune.recipe import MethodSpec

    model = copy.deepcopy(base)
    spec = MethodSpec(name="lora", config=get_method_class("lora").Config(r=8, alpha=16))
    delta = Delta.from_specs([spec], train_pooler=False)
    delta.attach(model, Arch.of(model))
    return (model, delta) if with_delta else model


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    return get_peft_model(copy.deepcopy(base), config)


def full(base):
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    return model


# -- steps ----------------------------------------------------------------------------------------
def plain_step(model, batch, labels):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ours_dp_step(model, batch, labels):
    import torch

    from slimtune.privacy.losses import per_sample_losses
    from slimtune.privacy.per_sample import PerSampleClipper

    from slimtune.sparsity.masks import pin_to_optimizer

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    pin_to_optimizer(model, optimizer)  # as a run with masks does (a no-op without them)
    clipper = PerSampleClipper(model, params)
    target = {**batch, "labels": labels}
    generator = torch.Generator().manual_seed(0)

    def forward():
        return per_sample_losses(model(**batch), target, "classification")

    def step():
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        clipper.clipped_sum(forward, BATCH, CLIP, sums)
        for name, p in params.items():
            p.grad = (sums[name] + torch.normal(0.0, SIGMA * CLIP, size=p.shape, generator=generator)) / BATCH
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.clipper = clipper
    return step


def opacus_step(model, batch, labels, mode):
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model.train()  # before make_private, or Opacus finds no activations
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loader = DataLoader(TensorDataset(batch["input_ids"]), batch_size=BATCH)
    engine = PrivacyEngine(accountant="prv")
    criterion = torch.nn.CrossEntropyLoss()
    if mode == "ghost":
        module, optimizer, criterion, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                                              noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode="ghost")
    else:
        module, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
                                                   max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode)

    def step():
        logits = module(**batch).logits
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    main()
