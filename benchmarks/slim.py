"""Shipping slim: physical head/neuron removal, int8 and bf16 on CPU, side by side in one run.

One LoRA run of the main job (movie-sentiment, 2,000 training sentences, 2 epochs, batch 32,
max_length 64) is merged into its base. From it, in this one process:

- **slimmed** models with 25 / 50 / 75 % of the attention heads *and* of the FFN neurons removed
  (first-order Taylor importance on 8 training batches of 16, ranked globally), each re-tuned with
  the same LoRA recipe on the slimmed model, then merged;
- **int8** (torch.ao dynamic, per-channel weights) and **bf16** (bf16 weights; and bf16 autocast
  over fp32 weights) versions of the dense and of each slimmed model;
- **QAT**: the same run trained with ``compress: {qat: {}}`` (fake-quant), then int8.

Latency: one batch of 32 real test sentences x 128 tokens, ``torch.set_num_threads(2)``,
inference mode, all variants timed round-robin (interleaved medians, 2 warm-up rounds), so machine
noise hits all alike. FLOPs: ``FlopCounterMode`` with eager attention; an int8 model counts as its
float twin. "FLOP saving realised" = (1 - latency ratio) / (1 - FLOP ratio); goal >= 0.95 at
every level. Goals for int8: latency <= 0.5 x fp32 at 2 threads, accuracy change <= 0.5 point.

    python -m benchmarks.slim [--model minilm-l6] [--quick] [--threads 2] [--repeats 5]

``--quick``: latency and FLOPs only, on the untuned model (no training, no accuracy).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, interleaved_medians, print_rows, write_result

LEVELS = (0.25, 0.5, 0.75)
ACCURACY_TOLERANCE = 0.005  # "keeps accuracy": within half a point of the dense fp32 model


#: Overrides of the data budget (only for smoke runs: --train-size/--eval-size/--epochs).
BUDGET: dict = {}


def base_recipe(model_name: str, qat: bool = False):
    from slimtune.recipe import DEFAULT_RECIPE, validate_recipe

    data = copy.deepcopy(DEFAULT_RECIPE)  # movie-sentiment, 2,000 train, 1,000 test, 2 epochs, b32, len 64
    data["model"] = {"name": model_name}
    data["task"].update({k: v for k, v in BUDGET.items() if k in ("train_size", "eval_size")})
    data["train"].update({k: v for k, v in BUDGET.items() if k == "epochs"})
    data["measure"] = {"latency": False, "flops": False, "memory": False}
    if qat:
        data["compress"] = {"qat": {}}
    return validate_recipe(data, source="benchmarks/slim.py")


class Source:
    """Fresh merged copies of one run (a deepcopy would share the mean pooler's mask hook)."""

    def __init__(self, run_dir: Path | None, model_name: str):
        from slimtune.recipe import load_recipe

        self.run_dir = run_dir
        self.recipe = load_recipe(run_dir / "recipe.yaml") if run_dir else base_recipe(model_name)

    def merged(self):
        from slimtune.compress.export import plain_merged
        from slimtune.methods.delta import read_delta
        from slimtune.runner import build

        built = build(self.recipe)
        if self.run_dir:
            built.delta.load_state_dict(built.model, read_delta(self.run_dir)[1])
        plain_merged(built.model, built.delta)
        return built.model.eval(), built


def slim(model, heads: dict, neurons: dict):
    from slimtune.sparsity.structured import remove_ffn_neurons, remove_heads

    remove_heads(model, heads)
    remove_ffn_neurons(model, neurons)
    return model


def wait_for_quiet(max_wait: float, threshold: float = 4.0) -> list[float]:
    """Wait (up to ``max_wait`` s) for the 1-minute load average to drop below ``threshold``; the
    shared machine's load at timing is recorded with the result."""
    import os

    deadline = time.time() + max_wait
    while os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(15)
    return [round(x, 2) for x in os.getloadavg()]


def bf16_autocast(model):
    import torch

    def call(**batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch)

    return call


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--quick", action="store_true", help="latency/FLOPs only, untuned model, no accuracy runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-qat", action="store_true", help="skip the QAT training run")
    parser.add_argument("--all-accuracies", action="store_true", help="also evaluate bf16 autocast (bf16 weights are always evaluated)")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a 1-minute load < 4 before timing")
    parser.add_argument("--train-size", type=int, help="smoke runs only: fewer training sentences than 2,000")
    parser.add_argument("--eval-size", type=int, help="smoke runs only: fewer test sentences than 1,000")
    parser.add_argument("--epochs", type=float, help="smoke runs only: fewer epochs than 2")
    args = parser.parse_args(argv)
    BUDGET.clear()
    BUDGET.update({k: v for k, v in (("train_size", args.train_size), ("eval_size", args.eval_size), ("epochs", args.epochs)) if v})

    import torch

    from slimtune.compress.export import evaluate_model, fixed_length_batch, plain_merged, task_batches
    from slimtune.compress.quantize import quantize_int8
    from slimtune.measure.flops import flops_per_example
    from slimtune.methods.base import Arch
    from slimtune.methods.delta import Delta
    from slimtune.runner import train_run
    from slimtune.sparsity import structured
    from slimtune.train.data import tokenize_split
    from slimtune.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-"))
    result: dict = {"settings": {
        "model": args.model, "threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "repeats": args.repeats, "levels": list(LEVELS), "criterion": "taylor", "scope": "global", "quick": args.quick,
        "recipe": "LoRA r=8 alpha=16 q/v, movie-sentiment 2,000 train / 1,000 test, 2 epochs, b32, len 64, lr 1e-3",
        "budget_overrides": dict(BUDGET),
    }}

    # 1. The tuned dense model.
    run_dir = None
    if not args.quick:
        run_dir = tmp / "run"
        report = train_run(base_recipe(args.model), run_dir, progress=False)
        print(f"tuned: accuracy {report['metrics']['accuracy']:.4f} ({report['train']['seconds']:.0f} s)", flush=True)
    source = Source(run_dir, args.model)
    dense, built = source.merged()
    pad = built.tokenizer.pad_token_id
    max_length = source.recipe.train.max_length
    rows = {s: tokenize_split(built.task.splits[s], built.tokenizer, max_length, "classification").to_list() for s in ("train", "test")}
    timing_rows = tokenize_split(built.task.splits["test"], built.tokenizer, args.seq_len, "classification").to_list()
    batch = fixed_length_batch(timing_rows, pad, args.batch_size, args.seq_len)
    one = fixed_length_batch(timing_rows, pad, 1, args.seq_len)

    # 2. Which heads/neurons go at each level (Taylor importance of the tuned model).
    batches = task_batches(rows["train"], pad, "classification", 16, 8, 0)
    head_scores, neuron_scores = structured.unit_importance(dense, "taylor", batches=batches)
    plans = {
        level: (structured.select_heads(dense, head_scores, level, "global"), structured.select_lowest(neuron_scores, level, "global"))
        for level in LEVELS
    }

    # 3. Latency and FLOPs of every variant, side by side.
    result["load_before_timing"] = wait_for_quiet(args.max_wait)
    print(f"timing at load {result['load_before_timing']}", flush=True)
    variants: dict[str, object] = {"fp32": dense}
    callables = {}
    twins = {}
    for level in LEVELS:
        name = f"slim{int(level * 100)}"
        variants[name] = slim(source.merged()[0], *plans[level])
    for name in [n for n in list(variants)]:
        model = variants[name]
        bf = source.merged()[0] if name == "fp32" else slim(source.merged()[0], *plans[int(name[4:]) / 100])
        variants[f"{name}-bf16"] = bf.to(torch.bfloat16)
        q = source.merged()[0] if name == "fp32" else slim(source.merged()[0], *plans[int(name[4:]) / 100])
        variants[f"{name}-int8"] = quantize_int8(q)
        twins[f"{name}-int8"] = model
    for name, model in variants.items():
        callables[name] = (lambda m=model: m(**batch))
    callables["fp32-bf16-autocast"] = lambda f=bf16_autocast(dense): f(**batch)
    with torch.inference_mode():
        seconds = interleaved_medians(callables, repeats=args.repeats, warmup=2)
    flops = {name: flops_per_example(twins.get(name, model), one) for name, model in variants.items()}
    flops["fp32-bf16-autocast"] = flops["fp32"]
    latency = {}
    for name in callables:
        base_name = name.split("-")[0]
        latency[name] = {
            "latency_ms": seconds[name] * 1e3,
            "latency_ratio": seconds[name] / seconds["fp32"],
            "flops_per_example": flops[name],
            "flop_ratio": flops[name] / flops["fp32"],
            "params": sum(p.numel() for p in variants[base_name].parameters()) if base_name in variants else None,
        }
        if name.startswith("slim") and "-" not in name:
            saving = 1 - latency[name]["flop_ratio"]
            latency[name]["flop_saving_realised"] = (1 - latency[name]["latency_ratio"]) / saving if saving else None
    result["latency"] = latency
    result["plans"] = {
        f"slim{int(level * 100)}": {
            "heads_removed": sum(map(len, heads.values())), "neurons_removed": sum(map(len, neurons.values())),
            "heads_kept_per_layer": [built.model.config.num_attention_heads - len(heads.get(i, [])) for i in range(len(heads))],
        }
        for level, (heads, neurons) in plans.items()
    }
    for name, row in latency.items():
        print(f"{name:22s} {row['latency_ms']:9.1f} ms  latency x{row['latency_ratio']:.3f}  FLOPs x{row['flop_ratio']:.3f}"
              + (f"  realised {row['flop_saving_realised']:.2f}" if row.get("flop_saving_realised") is not None else ""), flush=True)
    write_result("slim", result)
    del variants, callables

    acc: dict = {}
    if not args.quick:
        # 4. Accuracy: dense, then each slimmed model before and after re-tuning; each in fp32, bf16, int8.
        n_labels = len(built.task.label_names)

        def accuracy(model, autocast=False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return evaluate_model(model, rows["test"], pad, "classification", n_labels)["accuracy"]

        def three_ways(model) -> dict:
            saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
            out = {"fp32": accuracy(model)}
            if args.all_accuracies:
                out["bf16-autocast"] = accuracy(model, autocast=True)
            model.to(torch.bfloat16)
            out["bf16"] = accuracy(model)
            model.to(torch.float32)
            model.load_state_dict(saved)
            out["int8"] = accuracy(quantize_int8(model))
            return out

        acc = {"fp32": three_ways(source.merged()[0])}
        print(f"dense accuracy: {acc['fp32']}", flush=True)
        for level in LEVELS:
            name = f"slim{int(level * 100)}"
            model, built_level = source.merged()
            slim(model, *plans[level])
            before = accuracy(model)
            tuned_at = time.perf_counter()
            delta = Delta.from_specs(source.recipe.methods)
            delta.attach(model, Arch.of(model))
            trainer = Trainer(model=model, tokenizer=built_level.tokenizer, task=built_level.task, delta=delta, recipe=source.recipe,
                              objective="classification", run_dir=None, hooks=[], progress=False)
            trainer.fit()
            plain_merged(model, delta)
            model.eval()
            acc[name] = {"before_retune": before, **three_ways(model), "retune_seconds": time.perf_counter() - tuned_at}
            print(f"{name} accuracy: {acc[name]}", flush=True)
            result["accuracy"] = acc
            write_result("slim", result)

        # 5. QAT: the same run with fake-quant, then int8.
        if not args.no_qat:
            qat_dir = tmp / "qat"
            report = train_run(base_recipe(args.model, qat=True), qat_dir, progress=False)
            qat_model = Source(qat_dir, args.model).merged()[0]
            acc["qat"] = {"fp32": accuracy(qat_model), "int8": accuracy(quantize_int8(qat_model)),
                          "train_seconds": report["train"]["seconds"]}
            print(f"qat accuracy: {acc['qat']}", flush=True)

    result["accuracy"] = acc
    result["recommendation"] = recommend(result)
    result["seconds_total"] = time.perf_counter() - started
    print_rows("slim: recommendation", [(k, v) for k, v in result["recommendation"].items()])
    write_result("slim", result)
    return result


def _accuracy_of(variant: str, acc: dict) -> float | None:
    """Variant name (``fp32``, ``slim50-int8``, ``fp32-bf16-autocast``) -> its accuracy (re-tuned for slims)."""
    model, _, kind = variant.partition("-")
    return acc.get(model, {}).get(kind or "fp32")


def recommend(result: dict) -> dict:
    """The fastest variant whose accuracy is within half a point of the dense fp32 model's."""
    acc = result.get("accuracy", {})
    reference = _accuracy_of("fp32", acc)
    rows = []
    for name, row in result["latency"].items():
        a = _accuracy_of(name, acc)
        if a is not None and reference is not None:
            rows.append((row["latency_ratio"], name, a))
    keeping = sorted(r for r in rows if r[2] >= reference - ACCURACY_TOLERANCE)
    fastest = sorted(rows)
    out = {"reference_accuracy": reference}
    if keeping:
        out.update({"recommended": keeping[0][1], "latency_ratio": keeping[0][0], "accuracy": keeping[0][2]})
    if fastest:
        out.update({"fastest": fastest[0][1], "fastest_latency_ratio": fastest[0][0], "fastest_accuracy": fastest[0][2]})
    return out


def render_markdown(result: dict) -> str:
    s = result.get("settings", {})
    lines = [
        f"**Shipping slim** ({s.get('model')}, batch {s.get('batch_size')} x {s.get('seq_len')} tokens, "
        f"{s.get('threads')} threads; all variants timed side by side in one process, interleaved medians of "
        f"{s.get('repeats')}). Heads+FFN neurons removed by {s.get('criterion')} importance ({s.get('scope')} ranking), "
        f"then re-tuned ({s.get('recipe')}"
        + (f"; budget for this run: {', '.join(f'{k}={v}' for k, v in s['budget_overrides'].items())}" if s.get("budget_overrides") else "")
        + f"). Accuracy = test accuracy on movie-sentiment ({(s.get('budget_overrides') or {}).get('eval_size', 1000):,} sentences).",
        "",
        "| variant | latency ms | latency / fp32 | FLOPs / fp32 | FLOP saving realised | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    acc = result.get("accuracy", {})
    for name, row in result.get("latency", {}).items():
        a = _accuracy_of(name, acc)
        realised = row.get("flop_saving_realised")
        lines.append(
            f"| {name} | {row['latency_ms']:.0f} | {row['latency_ratio']:.2f} | {row['flop_ratio']:.2f} | "
            f"{f'{realised:.2f}' if realised is not None else ''} | {f'{a:.3f}' if a is not None else ''} |"
        )
    lat = result.get("latency", {})
    if lat:
        realised = [row["flop_saving_realised"] for name, row in lat.items() if row.get("flop_saving_realised") is not None]
        goals = [f"FLOP saving realised {min(realised):.2f}..{max(realised):.2f} (goal >= 0.95: {'met' if min(realised) >= 0.95 else 'not met'})"]
        if "fp32-int8" in lat:
            goals.append(f"int8 / fp32 latency {lat['fp32-int8']['latency_ratio']:.2f} (goal <= 0.5: {'met' if lat['fp32-int8']['latency_ratio'] <= 0.5 else 'not met'})")
        if acc.get("fp32", {}).get("int8") is not None:
            change = 100 * (acc["fp32"]["int8"] - acc["fp32"]["fp32"])
            goals.append(f"int8 accuracy change {change:+.1f} points (goal within 0.5: {'met' if abs(change) <= 0.5 else 'not met'})")
        lines += ["", "Goals: " + "; ".join(goals) + "."]
        if result.get("load_before_timing"):
            lines.append(f"The shared 2-core machine's load average when timing began: {result['load_before_timing'][0]:.1f} "
                         "(other jobs running), which inflates fixed per-call overheads; ratios come from interleaved timing.")
    before = [(k, v) for k, v in acc.items() if k.startswith("slim")]
    if before:
        lines += ["", "Slimmed accuracy before -> after re-tuning: " + ", ".join(
            f"{k} {v['before_retune']:.3f} -> {v['fp32']:.3f}" for k, v in before)
            + " (a re-tuned model has had the base run plus one re-tuning run, so it may beat the dense reference)."]
    if "qat" in acc:
        q = acc["qat"]
        lines.append(f"QAT (fake-quant while tuning): fp32 {q['fp32']:.3f}, int8 {q['int8']:.3f} "
                     f"(post-training int8 of the plain run: {acc['fp32']['int8']:.3f}, its fp32 {acc['fp32']['fp32']:.3f})"
                     + (f"; {q['note']}" if q.get("note") else "") + ".")
    rec = result.get("recommendation", {})
    if rec.get("recommended"):
        lines.append(f"**Recommended export** (fastest within 0.5 point of dense fp32 accuracy {rec['reference_accuracy']:.3f}): "
                     f"`{rec['recommended']}`, {rec['latency_ratio']:.2f}x fp32 latency, accuracy {rec['accuracy']:.3f}.")
    if result.get("date"):
        lines += ["", f"_Measured {result['date']}; `python -m benchmarks --only slim`._"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
