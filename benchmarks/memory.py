"""Training memory and step time of full fine-tuning, LoRA, bottleneck adapters and Ladder
Side-Tuning side by side on one backbone, plus their accuracy on movie-sentiment.

Memory is the report card's ``train.peak_memory_bytes``: :class:`TrainingMemoryMeter` around one
training step (weights + optimizer state + gradients + tensors saved for backward), measured on
the second step as the trainer does. Step time: interleaved medians (forward + backward + AdamW).
Batch 32 x 128 tokens of real movie-review text (every row a full 128 tokens, no padding).
Methods not in the registry (e.g. Houlsby adapters before that plug-in lands) are skipped.

Goals (issue 7): LST peak memory <= 0.35 x full FT and <= 0.6 x LoRA; accuracy within 3 points
of LoRA (2,000 training sentences, 2 epochs, max_length 64, 1,000 test sentences).

    python -m benchmarks.memory [--model minilm-l6] [--quick | --accuracy-only] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy

from benchmarks.common import interleaved_medians, print_rows, write_result

#: (label, recipe method section) in the order they are reported.
METHODS = [
    ("full", {"name": "full"}),
    ("lora", {"name": "lora", "r": 8, "alpha": 16}),
    ("houlsby", {"name": "houlsby"}),
    ("lst", {"name": "lst", "r": 8}),
]
#: Learning rates of the accuracy runs (full FT needs a small one).
LR = {"full": 5e-5, "lora": 1e-3, "houlsby": 1e-3, "lst": 3e-3}


def available(methods):
    from slimtune.methods.base import all_methods

    registry = all_methods()
    return [(label, spec) for label, spec in methods if spec["name"] in registry]


def text_batch(tokenizer, batch_size: int, seq_len: int):
    """Rows of real review text, each exactly ``seq_len`` tokens (consecutive sentences joined)."""
    import torch

    from slimtune.zoo.tasks import load_task

    task = load_task("movie-sentiment", split_seed=0, train_size=2000, eval_size=100, seed=0)
    texts = list(task.splits["train"]["text"])
    ids = tokenizer(" ".join(texts[: 40 * batch_size]), add_special_tokens=False)["input_ids"]
    body = seq_len - 2
    rows = [[tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id] for i in range(batch_size)]
    input_ids = torch.tensor(rows)
    labels = torch.tensor(task.splits["train"]["label"][:batch_size])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": torch.zeros_like(input_ids), "labels": labels}


def measure(model_name: str, batch_size: int, seq_len: int, repeats: int) -> dict:
    import torch

    from slimtune.measure.memory import TrainingMemoryMeter
    from slimtune.methods.base import get_method_class
    from slimtune.core.arch import Arch
    from slimtune.methods.delta import Delta
    from slimtune.recipe import MethodSpec
    from slimtune.zoo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    batch = text_batch(tokenizer, batch_size, seq_len)
    torch.manual_seed(0)
    base = load_model(model_name, num_labels=2)
    results, steppers = {}, {}
    for label, spec in available(METHODS):
        model = copy.deepcopy(base)
        cls = get_method_class(spec["name"])
        fields = {k: v for k, v in spec.items() if k != "name"}
        delta = Delta.from_specs([MethodSpec(name=spec["name"], config=cls.Config(**fields))])
        delta.attach(model, Arch.of(model))
        params = list(delta.trainable_parameters(model).values())
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step(model=model, optimizer=optimizer, meter=None):
            if meter is not None:
                with meter.track_forward():
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            if meter is not None:
                meter.finish(model, optimizer)
            optimizer.zero_grad(set_to_none=True)

        step()  # the trainer measures the second step (optimizer state exists)
        meter = TrainingMemoryMeter()
        step(meter=meter)
        results[label] = {
            "trainable_params": sum(p.numel() for p in params),
            "peak_memory_bytes": meter.peak_bytes,
            "memory": meter.components,
        }
        steppers[label] = step
        print(f"{label}: peak {meter.peak_bytes / 2**20:.1f} MiB {meter.components}", flush=True)
    times = interleaved_medians(steppers, repeats=repeats, warmup=1)
    for label, seconds in times.items():
        results[label]["step_seconds"] = seconds
    return results


def accuracy(model_name: str, threads: int) -> dict[str, float]:
    """Train each method through the pipeline on the same data and schedule; test accuracy."""
    import tempfile

    import torch

    from slimtune.recipe import DEFAULT_RECIPE, validate_recipe
    from slimtune.runner import train_run

    torch.set_num_threads(threads)
    out = {}
    for label, spec in available(METHODS):
        if label == "full":
            continue  # the memory baseline; its accuracy is not part of the goals (and it is slow)
        data = copy.deepcopy(DEFAULT_RECIPE)  # movie-sentiment, 2,000 train, 2 epochs, batch 32, max_length 64
        data["model"] = {"name": model_name}
        data["method"] = dict(spec)
        data["train"]["lr"] = LR[label]
        data["measure"] = {"latency": False, "flops": False, "memory": False}
        recipe = validate_recipe(data, source="benchmarks/memory.py")
        with tempfile.TemporaryDirectory() as tmp:
            report = train_run(recipe, f"{tmp}/run", progress=False)
        out[label] = report["metrics"]["accuracy"]
        print(f"{label}: test accuracy {out[label]:.4f} ({report['train']['seconds']:.0f} s)", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--quick", action="store_true", help="memory and step time only (no accuracy runs)")
    parser.add_argument("--accuracy-only", action="store_true", help="only the accuracy runs (written to memory-<model>-accuracy.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.accuracy_only:
        acc = accuracy(args.model, args.threads)
        print_rows(f"test accuracy on movie-sentiment ({args.model})", list(acc.items()))
        write_result(f"memory-{args.model}-accuracy", {"settings": {"model": args.model, "threads": args.threads, "lr": LR}, "accuracy": acc})
        return acc
    results = measure(args.model, args.batch_size, args.seq_len, args.repeats)
    ratios = {}
    if "lst" in results:
        lst = results["lst"]["peak_memory_bytes"]
        ratios = {f"lst / {k} peak memory": lst / v["peak_memory_bytes"] for k, v in results.items() if k != "lst"}
        ratios.update({f"lst / {k} step time": results["lst"]["step_seconds"] / v["step_seconds"] for k, v in results.items() if k != "lst"})
    data = {"settings": {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads}, "methods": results, "ratios": ratios}
    if not args.quick:
        data["accuracy"] = accuracy(args.model, args.threads)
    rows = [(f"{k} peak memory MiB", v["peak_memory_bytes"] / 2**20) for k, v in results.items()]
    rows += [(f"{k} step s", v["step_seconds"]) for k, v in results.items()]
    rows += list(ratios.items())
    rows += [(f"{k} test accuracy", v) for k, v in data.get("accuracy", {}).items()]
    print_rows(f"training memory and step time ({args.model}, batch {args.batch_size} x {args.seq_len})", rows)
    write_result(f"memory-{args.model}", data)
    return data


def render_markdown(result: dict) -> str:
    """Both result files: ``memory-<model>`` (memory and step time) and ``memory-<model>-accuracy``."""
    from slimtune.measure.report import fmt_bytes, fmt_count

    s = result.get("settings", {})
    accuracy = result.get("accuracy", {})
    if "methods" not in result:  # the accuracy-only file
        note = f" {result['note']}" if result.get("note") else ""
        rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in accuracy.items())
        return f"Test accuracy on movie-sentiment ({s.get('model')}, 2,000 training sentences, 2 epochs, max_length 64).{note}\n\n| method | test acc. |\n|---|---|\n{rows}"
    header = "| method | trainable | peak memory | weights | grads | optimizer | activations | step (s) |" + (" test acc. |" if accuracy else "")
    lines = [header, "|" + "---|" * header.count(" |")]
    for label, m in result["methods"].items():
        parts = m.get("memory", {})
        cells = [label, fmt_count(m["trainable_params"]), fmt_bytes(m["peak_memory_bytes"]), *(fmt_bytes(parts.get(k)) for k in ("weights", "grads", "optimizer_state", "activations")), f"{m['step_seconds']:.2f}"]
        if accuracy:
            cells.append(f"{accuracy[label]:.3f}" if label in accuracy else "")
        lines.append("| " + " | ".join(cells) + " |")
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in result.get("ratios", {}).items())
    intro = (f"{s.get('model')}, one training step on batch {s.get('batch_size')} x {s.get('seq_len')} tokens (peak by tensor accounting). "
             "Trainable counts every tensor that trains, BERT's pooler and the task head included (as the report card does).")
    return intro + "\n\n" + "\n".join(lines) + (f"\n\nRatios: {ratios}." if ratios else "")


if __name__ == "__main__":
    main()
