"""Shipping slim: physical head/neuron removal, int8 and bf16 on CPU, side by side in one run.

One LoRA run of the main job (movie-sentiment, 2,000 training sentences, 2 epochs, batch 32,
max_length 64) is merged into its base. From it, in this one process:

- **slimmed** models with 25 / 50 / 75 % of the attention heads *and* of the FFN neurons removed
  (first-order Taylor importance on 8 training batches of 16), each re-tuned with the same LoRA
  recipe on the slimmed model, then merged. Three layouts of the removed units are timed side by
  side: ``global`` (ranked across layers: uneven, odd widths), ``local`` (the same share in every
  layer) and ``local-r32`` (local, kept FFN neurons rounded to a multiple of 32; at 25/50/75 % on
  MiniLM's 1536-wide FFN this equals ``local``, so an extra 30 % level probes the rounding). The
  slimXX variants (accuracy, bf16, int8) use ``DEFAULT_LAYOUT``, also the export default;
- **int8** (torch.ao dynamic, per-channel weights) and **bf16** (bf16 weights; and bf16 autocast
  over fp32 weights) versions of the dense and of each slimmed model;
- **QAT**: the same run trained with ``compress: {qat: {}}`` (fake-quant), then int8.

Latency: one batch of 32 real test sentences x 128 tokens, ``torch.set_num_threads(2)``,
inference mode, all variants timed round-robin (interleaved medians, 2 warm-up rounds), so machine
noise hits all alike. FLOPs: ``FlopCounterMode`` with eager attention; an int8 model counts as its
float twin. "FLOP saving realised" = (1 - latency ratio) / (1 - FLOP ratio); goal >= 0.95 at
every level. Goals for int8: latency <= 0.5 x fp32 at 2 threads, accuracy change <= 0.5 point.

Why not all of the saving: after timing, the dense and each slim model are profiled
(``torch.profiler``, op self times grouped by input shapes). Ops that appear in the slim model on
the same input shapes (as often) as in the dense one do not shrink (residual adds, LayerNorm,
embedding look-ups, masks, the pooler, bias copies into hidden-width outputs); matrix products
always count as shrinking. Their time bounds what is realisable: if every other op took time in
proportion to its FLOPs, latency would be fixed + (dense - dense fixed) x FLOP ratio; the
"realisable (bound)" column is the FLOP saving realised at that latency.

Timing runs with 2 threads once the 1-minute load is < 3 (waits up to --max-wait s; the load
is recorded); training and evaluation run with 1 thread. ``--part timing`` / ``--part accuracy``
run them as separate processes (each keeps the other's figures in results/slim.json; reuse one
tuned run with ``--run-dir``).

    python -m benchmarks.slim [--model minilm-l6] [--quick] [--part all|timing|accuracy] [--run-dir DIR]

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


def wait_for_quiet(max_wait: float, threshold: float = 3.0) -> list[float]:
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


#: Layouts of the removed units compared side by side: (scope, multiple of kept FFN neurons).
LAYOUTS = {"global": ("global", 1), "local": ("local", 1), "local-r32": ("local", 32)}
#: The layout of the slimXX variants (accuracy, bf16, int8) and of `slimtune export --slim`'s default.
DEFAULT_LAYOUT = "local-r32"
#: An extra level timed for local vs local-r32 only: at 25/50/75% MiniLM's 1536-wide FFN keeps
#: 1152/768/384 neurons, multiples of 32 already, so rounding changes nothing there; at 30% it
#: keeps 1075 vs 1088.
ROUNDING_PROBE = 0.3


def plan(structured, dense, head_scores, neuron_scores, level: float, layout: str):
    from slimtune.sparsity import importance

    scope, multiple = LAYOUTS[layout]
    return (importance.select_heads(dense, head_scores, level, scope),
            importance.select_lowest(neuron_scores, level, scope, "ffn", multiple))


def widths(model_config, heads: dict, neurons: dict) -> tuple[list[int], list[int]]:
    layers = model_config.num_hidden_layers
    return ([model_config.num_attention_heads - len(heads.get(i, [])) for i in range(layers)],
            [model_config.intermediate_size - len(neurons.get(i, [])) for i in range(layers)])


#: Ops whose FLOPs are counted (matrix products, attention): they shrink with heads/neurons by
#: construction, even where a slimmed layer's product happens to have a dense one's shapes.
COUNTED_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
               "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def op_profile(model, batch: dict, calls: int = 3) -> dict[tuple[str, str], tuple[float, float]]:
    """(ms per call, occurrences per call) of every (op, input shapes) group's self time in
    ``calls`` profiled forwards."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(**batch)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                model(**batch)
    return {(e.key, str(e.input_shapes)): (e.self_cpu_time_total / calls / 1e3, e.count / calls)
            for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0}


def fixed_ops(dense_profile: dict, slim_profile: dict) -> dict:
    """The slimmed model's ops that do not shrink: the same op on the same input shapes as in the
    dense model, as many times per forward as there (residual adds, LayerNorm, embeddings, masks,
    the pooler, bias copies into hidden-width outputs); matrix products always count as
    shrinking. Returns their share of each profile and their time by op name."""
    by_name: dict[str, float] = {}
    slim_fixed = dense_fixed = 0.0
    for key, (ms, count) in slim_profile.items():
        if key[0] in COUNTED_OPS or key not in dense_profile:
            continue
        dense_ms, dense_count = dense_profile[key]
        shared = min(count, dense_count)
        slim_fixed += ms * shared / count
        dense_fixed += dense_ms * shared / dense_count
        by_name[key[0]] = by_name.get(key[0], 0.0) + ms * shared / count
    slim_total = sum(ms for ms, _ in slim_profile.values())
    return {
        "share": slim_fixed / slim_total,
        "dense_share": dense_fixed / sum(ms for ms, _ in dense_profile.values()),
        "profiled_ms": slim_total,
        "ops_ms": {name: round(ms, 1) for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1]) if ms >= 0.5},
    }


def realisable_bound(dense_ms: float, slim_ms: float, flop_ratio: float, fixed: dict) -> float | None:
    """The FLOP saving realisable if every op that does shrink took time in proportion to its
    FLOPs: latency >= fixed (measured, this model) + shrinking part of dense x FLOP ratio."""
    if flop_ratio >= 1:
        return None
    ideal = fixed["share"] * slim_ms + (1 - fixed["dense_share"]) * dense_ms * flop_ratio
    return (1 - ideal / dense_ms) / (1 - flop_ratio)


def _previous(name: str = "slim") -> dict:
    import json

    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--quick", action="store_true", help="latency/FLOPs only, untuned model, no accuracy runs")
    parser.add_argument("--part", choices=("all", "timing", "accuracy"), default="all",
                        help="timing (2 threads) and accuracy (1 thread) can run as separate processes; each keeps "
                             "the other's figures in results/slim.json")
    parser.add_argument("--run-dir", type=Path, help="the tuned dense run: reused if it holds a delta, else trained into it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-threads", type=int, default=1, help="torch threads for training/evaluation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-qat", action="store_true", help="skip the QAT training run")
    parser.add_argument("--all-accuracies", action="store_true", help="also evaluate bf16 autocast (bf16 weights are always evaluated)")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a 1-minute load < --max-load before timing")
    parser.add_argument("--max-load", type=float, default=3.0)
    parser.add_argument("--train-size", type=int, help="smoke runs only: fewer training sentences than 2,000")
    parser.add_argument("--eval-size", type=int, help="smoke runs only: fewer test sentences than 1,000")
    parser.add_argument("--epochs", type=float, help="smoke runs only: fewer epochs than 2")
    args = parser.parse_args(argv)
    BUDGET.clear()
    BUDGET.update({k: v for k, v in (("train_size", args.train_size), ("eval_size", args.eval_size), ("epochs", args.epochs)) if v})
    timing, accuracy_part = args.part in ("all", "timing"), args.part in ("all", "accuracy") and not args.quick

    import torch

    from slimtune.compress.export import plain_merged
    from slimtune.measure.evaluate import evaluate_rows as evaluate_model
    from slimtune.zoo.batches import fixed_length_batch, shuffled_batches as task_batches
    from slimtune.compress.quantize import quantize_int8
    from slimtune.measure.flops import flops_per_example
    from slimtune.core.arch import Arch
    from slimtune.methods.delta import Delta
    from slimtune.runner import train_run
    from slimtune.sparsity import structured
    from slimtune.sparsity import importance
    from slimtune.zoo.batches import tokenize_split
    from slimtune.train.trainer import Trainer

    torch.set_num_threads(args.threads if timing else args.accuracy_threads)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-"))
    settings = {
        "model": args.model, "threads": args.threads, "accuracy_threads": args.accuracy_threads,
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "repeats": args.repeats, "levels": list(LEVELS), "criterion": "taylor", "layout": DEFAULT_LAYOUT,
        "scope": LAYOUTS[DEFAULT_LAYOUT][0], "multiple": LAYOUTS[DEFAULT_LAYOUT][1], "quick": args.quick,
        "recipe": "LoRA r=8 alpha=16 q/v, movie-sentiment 2,000 train / 1,000 test, 2 epochs, b32, len 64, lr 1e-3",
        "budget_overrides": dict(BUDGET),
    }
    # A part run keeps the other part's figures (same file); a full run starts afresh.
    keep = {} if args.part == "all" else _previous()
    result: dict = {k: v for k, v in keep.items() if k not in ("benchmark", "date", "machine")}
    result["settings"] = {**result.get("settings", {}), **settings}

    # 1. The tuned dense model.
    run_dir = None
    if not args.quick:
        run_dir = args.run_dir or tmp / "run"
        if (run_dir / "delta.safetensors").is_file():
            print(f"reusing the tuned run {run_dir}", flush=True)
        else:
            torch.set_num_threads(args.accuracy_threads)
            report = train_run(base_recipe(args.model), run_dir, progress=False)
            print(f"tuned: accuracy {report['metrics']['accuracy']:.4f} ({report['train']['seconds']:.0f} s)", flush=True)
    source = Source(run_dir, args.model)
    dense, built = source.merged()
    config = built.model.config
    pad = built.tokenizer.pad_token_id
    max_length = source.recipe.train.max_length
    rows = {s: tokenize_split(built.task.splits[s], built.tokenizer, max_length, "classification").to_list() for s in ("train", "test")}
    timing_rows = tokenize_split(built.task.splits["test"], built.tokenizer, args.seq_len, "classification").to_list()
    batch = fixed_length_batch(timing_rows, pad, args.batch_size, args.seq_len)
    one = fixed_length_batch(timing_rows, pad, 1, args.seq_len)

    # 2. Which heads/neurons go at each level and layout (Taylor importance of the tuned model).
    batches = task_batches(rows["train"], pad, "classification", 16, 8, 0)
    head_scores, neuron_scores = importance.unit_importance(dense, "taylor", batches=batches)
    plans = {(layout, level): plan(structured, dense, head_scores, neuron_scores, level, layout)
             for layout in LAYOUTS for level in LEVELS}
    for layout in ("local", "local-r32"):
        plans[(layout, ROUNDING_PROBE)] = plan(structured, dense, head_scores, neuron_scores, ROUNDING_PROBE, layout)
    default_plans = {level: plans[(DEFAULT_LAYOUT, level)] for level in LEVELS}

    if timing:
        torch.set_num_threads(args.threads)
        result.update(time_variants(args, source, dense, batch, one, plans, default_plans, config,
                                    structured, quantize_int8, flops_per_example))
        result["timing_run"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
                                "load": result["load_before_timing"], "layout": DEFAULT_LAYOUT,
                                "tuned": run_dir is not None}
        result["plans"] = {
            f"slim{int(level * 100)}": {
                "heads_removed": sum(map(len, h.values())), "neurons_removed": sum(map(len, n.values())),
                "heads_kept_per_layer": widths(config, h, n)[0], "neurons_kept_per_layer": widths(config, h, n)[1],
            }
            for level, (h, n) in default_plans.items()
        }
        write_result("slim", result)

    if accuracy_part:
        torch.set_num_threads(args.accuracy_threads)
        result["accuracy_run"] = {"started": time.strftime("%Y-%m-%d %H:%M"), "threads": args.accuracy_threads,
                                  "layout": DEFAULT_LAYOUT, "budget_overrides": dict(BUDGET),
                                  "load_at_start": [round(x, 2) for x in __import__("os").getloadavg()]}
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

        acc: dict = {"fp32": three_ways(source.merged()[0])}
        result["accuracy"] = acc
        print(f"dense accuracy: {acc['fp32']}", flush=True)
        for level in LEVELS:
            name = f"slim{int(level * 100)}"
            model, built_level = source.merged()
            slim(model, *default_plans[level])
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
            write_result("slim", result)

        # 5. QAT: the same run with fake-quant, then int8.
        if not args.no_qat:
            qat_dir = tmp / "qat"
            report = train_run(base_recipe(args.model, qat=True), qat_dir, progress=False)
            qat_model = Source(qat_dir, args.model).merged()[0]
            acc["qat"] = {"fp32": accuracy(qat_model), "int8": accuracy(quantize_int8(qat_model)),
                          "train_seconds": report["train"]["seconds"]}
            print(f"qat accuracy: {acc['qat']}", flush=True)
        result["accuracy_run"]["seconds"] = time.perf_counter() - started

    result.setdefault("accuracy", {})
    result["recommendation"] = recommend(result)
    result["seconds_total"] = time.perf_counter() - started
    print_rows("slim: recommendation", [(k, v) for k, v in result["recommendation"].items()])
    write_result("slim", result)
    return result


def time_variants(args, source, dense, batch, one, plans, default_plans, config, structured, quantize_int8,
                  flops_per_example) -> dict:
    """Latency, FLOPs and op profiles of every variant, side by side in this process."""
    import torch

    out: dict = {"load_before_timing": wait_for_quiet(args.max_wait, args.max_load)}
    print(f"timing at load {out['load_before_timing']}", flush=True)
    variants: dict[str, object] = {"fp32": dense}
    twins = {}
    for level, p in default_plans.items():
        variants[f"slim{int(level * 100)}"] = slim(source.merged()[0], *p)
    # The other layouts, unless their per-layer widths equal an already timed layout's.
    timed_shapes = {(DEFAULT_LAYOUT, level): widths(config, *default_plans[level]) for level in LEVELS}
    same_as: dict[str, str] = {}
    for (layout, level), p in plans.items():
        if layout == DEFAULT_LAYOUT and level in LEVELS:
            continue
        shape = widths(config, *p)
        twin = next((f"{lay}@{int(lev * 100)}" for (lay, lev), s in timed_shapes.items() if s == shape and lev == level), None)
        if twin:
            same_as[f"{layout}@{int(level * 100)}"] = twin
            continue
        timed_shapes[(layout, level)] = shape
        variants[f"{layout}@{int(level * 100)}"] = slim(source.merged()[0], *p)
    for name in ["fp32"] + [f"slim{int(level * 100)}" for level in LEVELS]:
        float_model = variants[name]
        fresh = lambda: source.merged()[0] if name == "fp32" else slim(source.merged()[0], *default_plans[int(name[4:]) / 100])  # noqa: E731
        variants[f"{name}-bf16"] = fresh().to(torch.bfloat16)
        variants[f"{name}-int8"] = quantize_int8(fresh())
        twins[f"{name}-int8"] = float_model
    callables = {name: (lambda m=model: m(**batch)) for name, model in variants.items()}
    callables["fp32-bf16-autocast"] = lambda f=bf16_autocast(dense): f(**batch)
    with torch.inference_mode():
        seconds = interleaved_medians(callables, repeats=args.repeats, warmup=2)
    out["load_after_timing"] = [round(x, 2) for x in __import__("os").getloadavg()]
    flops = {name: flops_per_example(twins.get(name, model), one) for name, model in variants.items()}
    flops["fp32-bf16-autocast"] = flops["fp32"]

    def row(name: str) -> dict:
        base_name = name if "@" in name else name.split("-")[0]
        r = {
            "latency_ms": seconds[name] * 1e3, "latency_ratio": seconds[name] / seconds["fp32"],
            "flops_per_example": flops[name], "flop_ratio": flops[name] / flops["fp32"],
            "params": sum(p.numel() for p in variants[base_name].parameters()) if base_name in variants else None,
        }
        saving = 1 - r["flop_ratio"]
        if ("@" in name or "-" not in name) and name != "fp32" and saving:
            r["flop_saving_realised"] = (1 - r["latency_ratio"]) / saving
        return r

    latency = {name: row(name) for name in callables if "@" not in name}

    # Which ops do not shrink, and the saving they leave realisable (profiled after the timing).
    profiles = {"fp32": op_profile(dense, batch)}
    limits = {}
    for level in LEVELS:
        name = f"slim{int(level * 100)}"
        profiles[name] = op_profile(variants[name], batch)
        fixed = fixed_ops(profiles["fp32"], profiles[name])
        fixed["realisable_bound"] = realisable_bound(latency["fp32"]["latency_ms"], latency[name]["latency_ms"],
                                                     latency[name]["flop_ratio"], fixed)
        fixed["fixed_ms"] = fixed["share"] * latency[name]["latency_ms"]
        latency[name]["realisable_bound"] = fixed["realisable_bound"]
        limits[name] = fixed
    out["fixed_ops"] = limits

    layouts: dict = {}
    for layout, level in plans:
        key = f"{layout}@{int(level * 100)}"
        name = f"slim{int(level * 100)}" if layout == DEFAULT_LAYOUT and level in LEVELS else same_as.get(key, key)
        if name.startswith(DEFAULT_LAYOUT + "@") and level in LEVELS:
            name = f"slim{name.split('@')[1]}"
        heads_kept, neurons_kept = widths(config, *plans[(layout, level)])
        r = latency[name] if name in latency else row(name)
        layouts.setdefault(layout, {})[f"slim{int(level * 100)}"] = {
            "latency_ms": r["latency_ms"], "latency_ratio": r["latency_ratio"], "flop_ratio": r["flop_ratio"],
            "flop_saving_realised": r.get("flop_saving_realised"),
            "heads_kept_per_layer": heads_kept, "neurons_kept_per_layer": neurons_kept,
            **({"same_shapes_as": name} if name != key else {}),
        }
    out["layouts"] = layouts
    worst = {layout: min(v["flop_saving_realised"] for k, v in rows.items() if k in {f"slim{int(x * 100)}" for x in LEVELS})
             for layout, rows in layouts.items()}
    out["best_layout"] = max(worst, key=worst.get)
    out["worst_realised_by_layout"] = worst
    out["latency"] = latency
    for name, r in latency.items():
        print(f"{name:22s} {r['latency_ms']:9.1f} ms  latency x{r['latency_ratio']:.3f}  FLOPs x{r['flop_ratio']:.3f}"
              + (f"  realised {r['flop_saving_realised']:.2f} (bound {r['realisable_bound']:.2f})" if r.get("flop_saving_realised") is not None else ""),
              flush=True)
    for layout, rows in layouts.items():
        print(f"layout {layout:10s} " + "  ".join(f"{k} {v['flop_saving_realised']:.2f}" for k, v in rows.items()), flush=True)
    for name, f in limits.items():
        print(f"{name}: non-shrinking ops {100 * f['share']:.0f}% of the profile ({f['fixed_ms']:.0f} ms): "
              + ", ".join(f"{k} {v}" for k, v in list(f["ops_ms"].items())[:6]), flush=True)
    return out


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


LAYOUT_WORDS = {
    "global": "ranked across all layers (uneven widths)",
    "local": "the same share in every layer",
    "local-r32": "the same share in every layer, kept FFN neurons rounded to a multiple of 32",
}


def _f(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render_markdown(result: dict) -> str:
    s = result.get("settings", {})
    layout = s.get("layout", s.get("scope"))
    timing_run, accuracy_run = result.get("timing_run", {}), result.get("accuracy_run", {})
    overrides = accuracy_run.get("budget_overrides", s.get("budget_overrides")) or {}
    lines = [
        f"**Shipping slim** ({s.get('model')}, batch {s.get('batch_size')} x {s.get('seq_len')} tokens, "
        f"{s.get('threads')} threads; all variants timed side by side in one process, interleaved medians of "
        f"{s.get('repeats')}). Heads+FFN neurons removed by {s.get('criterion')} importance, layout `{layout}` "
        f"({LAYOUT_WORDS.get(layout, layout)}{'; the default of `slimtune export --slim`' if layout == DEFAULT_LAYOUT else ''}), then re-tuned "
        f"({s.get('recipe')}" + (f"; budget for this run: {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else "")
        + f"). Accuracy = test accuracy on movie-sentiment ({overrides.get('eval_size', 1000):,} sentences), "
        f"trained and evaluated with {accuracy_run.get('threads', 1)} thread(s).",
        "",
        "| variant | latency ms | latency / fp32 | FLOPs / fp32 | FLOP saving realised | realisable (bound) | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    acc = result.get("accuracy", {})
    for name, row in result.get("latency", {}).items():
        a = _accuracy_of(name, acc)
        lines.append(
            f"| {name} | {row['latency_ms']:.0f} | {row['latency_ratio']:.2f} | {row['flop_ratio']:.2f} | "
            f"{_f(row.get('flop_saving_realised'))} | {_f(row.get('realisable_bound'))} | {_f(a, 3)} |"
        )
    lat = result.get("latency", {})
    layouts = result.get("layouts", {})
    if layouts:
        levels = sorted({k for rows in layouts.values() for k in rows}, key=lambda k: int(k[4:]))
        lines += ["", "FLOP saving realised (latency / fp32) by layout of the removed units, same run:", "",
                  "| layout | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
        for name, rows in layouts.items():
            cells = []
            for level in levels:
                r = rows.get(level)
                cells.append("" if r is None else f"{r['flop_saving_realised']:.2f} ({r['latency_ratio']:.2f})"
                             + (" =" if r.get("same_shapes_as") else ""))
            lines.append(f"| {name}: {LAYOUT_WORDS.get(name, name)} | " + " | ".join(cells) + " |")
        probe = [f"{name} {rows[lv]['neurons_kept_per_layer'][0]}" for name, rows in layouts.items() for lv in levels
                 if lv not in {"slim25", "slim50", "slim75"} and lv in rows]
        lines += ["", f"`=`: the same per-layer widths as the default layout's (timed once). Best layout by its worst level: "
                  f"`{result.get('best_layout')}`"
                  + (f"; the extra level probes rounding (FFN neurons kept per layer: {', '.join(probe)})" if probe else "") + "."]
    fixed = result.get("fixed_ops", {})
    if fixed:
        lines += ["", "Why not all of the FLOP saving: ops that do not shrink with heads/neurons (same op on the same "
                  "input shapes as in the dense model; profiled with `torch.profiler`), their share of the slim model's "
                  "time, and the saving realisable if everything else scaled with FLOPs:", "",
                  "| variant | non-shrinking share | ms (of latency) | realisable (bound) | realised | largest non-shrinking ops (ms) |",
                  "|---|---|---|---|---|---|"]
        for name, f in fixed.items():
            ops = ", ".join(f"{k.replace('aten::', '')} {v:.0f}" for k, v in list(f["ops_ms"].items())[:5])
            lines.append(f"| {name} | {100 * f['share']:.0f}% | {f['fixed_ms']:.0f} | {_f(f.get('realisable_bound'))} | "
                         f"{_f(lat.get(name, {}).get('flop_saving_realised'))} | {ops} |")
    if lat:
        realised = [row["flop_saving_realised"] for name, row in lat.items() if row.get("flop_saving_realised") is not None]
        goals = [f"FLOP saving realised {min(realised):.2f}..{max(realised):.2f} (goal >= 0.95 at every level: "
                 f"{'met' if min(realised) >= 0.95 else 'not met'})"]
        bounds = [row["realisable_bound"] for row in lat.values() if row.get("realisable_bound") is not None]
        if bounds:
            goals[0] += f"; realisable bound {min(bounds):.2f}..{max(bounds):.2f}"
        if "fp32-int8" in lat:
            goals.append(f"int8 / fp32 latency {lat['fp32-int8']['latency_ratio']:.2f} (goal <= 0.5: {'met' if lat['fp32-int8']['latency_ratio'] <= 0.5 else 'not met'})")
        if acc.get("fp32", {}).get("int8") is not None:
            change = 100 * (acc["fp32"]["int8"] - acc["fp32"]["fp32"])
            goals.append(f"int8 accuracy change {change:+.1f} points (goal within 0.5: {'met' if abs(change) <= 0.5 else 'not met'})")
        if acc.get("qat", {}).get("int8") is not None and acc.get("fp32", {}).get("fp32") is not None:
            change = 100 * (acc["qat"]["int8"] - acc["fp32"]["fp32"])
            goals.append(f"with QAT, int8 vs the plain fp32 run {change:+.1f} points ({'met' if abs(change) <= 0.5 else 'not met'})")
        lines += ["", "Goals: " + "; ".join(goals) + "."]
        if result.get("load_before_timing"):
            lines.append(f"Load average of the shared 2-core machine when timing began: {result['load_before_timing'][0]:.1f}"
                         + (f", after: {result['load_after_timing'][0]:.1f}" if result.get("load_after_timing") else "")
                         + (" (other jobs running)" if result["load_before_timing"][0] >= 2 else " (no other job)")
                         + "; ratios come from interleaved timing.")
    others = result.get("other_timing_runs") or []
    if others:
        def realised(run: dict, layout: str) -> str:
            rows = run.get("realised_by_layout", {}).get(layout, {})
            return "/".join(f"{rows[k]:.2f}" for k in ("slim25", "slim50", "slim75") if k in rows)

        lines.append("Other timing runs of the same models, to show the spread on this shared machine (FLOP saving "
                     "realised at 25/50/75%, default layout; global layout; int8 / fp32 latency): " + "; ".join(
                         f"{run['date']} at load {run['load_before_timing'][0]:.1f}: {realised(run, layout)}; "
                         f"global {realised(run, 'global')}; int8 {run['int8_latency_ratio']:.2f}" for run in others) + ".")
    if timing_run.get("layout") and accuracy_run.get("layout") and timing_run["layout"] != accuracy_run["layout"]:
        lines.append(f"**Note:** timing used layout `{timing_run['layout']}`, the accuracy run `{accuracy_run['layout']}`.")
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
    dates = [f"timing {timing_run['date']}" if timing_run.get("date") else None,
             f"accuracy {accuracy_run['started']}" if accuracy_run.get("started") else None]
    if result.get("date"):
        lines += ["", f"_Measured {'; '.join(d for d in dates if d) or result['date']}; `python -m benchmarks --only slim` "
                  "(or `python -m benchmarks.slim --part timing|accuracy`)._"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
