"""The report card: what a run achieved and what it cost, as ``report.json`` and a terminal table.

Inference is measured on the model as it would be deployed: linear deltas merged into the base
(so LoRA costs nothing at inference), other methods as they run. FLOPs are counted with eager
attention (``FlopCounterMode`` cannot see the CPU SDPA kernel); latency is the median of timed
repeats after warm-up at a fixed thread count, batch size and sequence length, all recorded.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from slimtune.measure.flops import flops_per_example
from slimtune.measure.latency import measure_latency
from slimtune.measure.memory import peak_rss_bytes
from slimtune.measure.params import param_counts
from slimtune.core.hooks import HOOK_CLASSES
from slimtune.zoo.multitask import is_multitask

if TYPE_CHECKING:
    from slimtune.runner import Built
    from slimtune.train.trainer import Trainer, TrainResult

VERSIONED_PACKAGES = ("slimtune", "torch", "transformers", "accelerate", "datasets", "safetensors", "peft", "opacus")


#: The primary metric where the objective, not the task, decides it (classification: the task's).
PRIMARY_METRIC_OF_OBJECTIVE = {"lm": "perplexity", "mlm": "perplexity", "features": "distill_loss"}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def measure_inference(built: Built, trainer: Trainer) -> dict[str, Any]:
    cfg = built.recipe.measure
    seq_len = cfg.seq_len or built.recipe.train.max_length
    out: dict[str, Any] = {"merged": False}
    if not (cfg.flops or cfg.latency):
        return out
    model, delta = built.model, built.delta
    merge = delta.can_merge and any(m.mergeable for m in delta.methods)
    if merge:
        delta.merge(model)
        out["merged"] = True
    try:
        if cfg.flops:
            one = trainer.inference_batch(1, seq_len)
            out["flops_per_example"] = flops_per_example(model, one)
            out["flops_seq_len"] = None if "pixel_values" in one else seq_len
        if cfg.latency:
            batch = trainer.inference_batch(cfg.batch_size, seq_len)
            timing = measure_latency(model, batch, threads=cfg.threads, repeats=cfg.repeats)
            out.update({k: timing[k] for k in ("latency_ms_median", "latency_ms_p90", "batch_size", "seq_len", "threads", "repeats")})
    finally:
        if merge:
            delta.unmerge(model)
    return out


def build_report(
    built: Built,
    trainer: Trainer,
    result: TrainResult,
    test_metrics: dict[str, float],
    validation_metrics: dict[str, float],
    stored_bytes: int,
    wall_seconds: float,
) -> dict[str, Any]:
    recipe, task = built.recipe, built.task
    # Current names: a masked tensor is listed as `.parametrizations.<t>.original` once pruned.
    counts = param_counts(built.model, built.delta.trainable_parameters(built.model).keys(), base_total=built.base_params)
    report: dict[str, Any] = {
        "model": {"name": recipe.model.name, "params_total": built.base_params, "type": built.arch.model_type},
        "task": {
            "name": task.name,
            "n_train": len(task.splits["train"]),
            "n_validation": len(task.splits["validation"]),
            "n_test": len(task.splits["test"]),
            "labels": task.label_names,
            "primary_metric": PRIMARY_METRIC_OF_OBJECTIVE.get(built.objective, task.metric),
            "objective": built.objective,
            "pooling": built.pooling,
            **({"tasks": task.summary(), "sampling": task.sampling, "temperature": task.temperature} if is_multitask(task) else {}),
        },
        "method": {"name": built.delta.label, "config": built.delta.config()},
        "metrics": test_metrics,
        "metrics_validation": validation_metrics,
        "params": {
            "trainable": counts["trainable"],
            "trainable_pct": counts["trainable_pct"],
            "head": sum(p.numel() for p in built.delta.head_parameters(built.model).values()),
            "stored_bytes": stored_bytes,
        },
        "train": {
            "steps": result.steps,
            "epochs_completed": trainer.epoch,
            "seconds": result.seconds,
            "step_seconds_median": result.step_seconds_median,
            "peak_memory_bytes": result.memory.get("peak"),
            "memory_components_bytes": {k: v for k, v in result.memory.items() if k != "peak"},
            "peak_rss_bytes": peak_rss_bytes(),
            "processes": trainer.world_size,
            "batch_size": recipe.train.batch_size,
            "precision": recipe.train.precision,
            "stop_reason": result.stop_reason,
            "skipped_nonfinite_steps": len(result.skipped_steps),
            "skipped_steps": result.skipped_steps,
            "resumed_from_step": result.resumed_from_step,
            "init_from": recipe.train.init_from,
            "keep": recipe.train.keep,
            "kept": result.kept,
            **({"best_epoch_per_task": best_epochs(result.history, task)} if is_multitask(task) else {}),
            "history": result.history,
        },
        "inference": measure_inference(built, trainer),
        "seconds_total": wall_seconds,
        "versions": versions(),
    }
    for hook in trainer.hooks:
        section = hook.report()
        if section:
            report[hook.name] = section
    return report


def best_epochs(history: list[dict[str, Any]], task) -> dict[str, int | None]:
    """Each task's best epoch by its own validation primary metric (a multi-task run)."""
    out: dict[str, int | None] = {}
    for member in task.members:
        key = f"{member.name}/{member.metric}"
        scored = [(entry["validation"][key], entry["epoch"]) for entry in history if key in entry.get("validation", {})]
        out[member.name] = max(scored, key=lambda pair: (pair[0], -pair[1]))[1] if scored else None
    return out


def registered_hooks() -> dict[str, type]:
    """Every hook class, by report section name (methods and features are imported, so that a
    report read from disk prints the same rows as at the end of its run)."""
    from slimtune.core.features import load_plugins

    load_plugins()
    return HOOK_CLASSES


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes (1024-based); "–" when unknown."""
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_count(n: float | None) -> str:
    """Human-readable count (K/M/G, 1000-based); "–" when unknown."""
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    metrics = report.get("metrics", {})
    train, inference, params = report.get("train", {}), report.get("inference", {}), report.get("params", {})
    rows = [
        ("model", f"{report['model']['name']} ({fmt_count(report['model']['params_total'])} params)"),
        ("task", f"{report['task']['name']} (train {report['task']['n_train']}, test {report['task']['n_test']})"),
        ("method", report["method"]["name"]),
    ]
    rows += [(f"test {k}", f"{v:.4f}") for k, v in metrics.items()]
    rows += [
        ("trainable params", f"{params.get('trainable', 0):,} ({params.get('trainable_pct', 0):.3f}%)"),
        ("stored (delta)", fmt_bytes(params.get("stored_bytes"))),
        ("train steps / time", f"{train.get('steps')} / {train.get('seconds', 0):.1f} s ({train.get('step_seconds_median', 0) * 1000:.0f} ms/step)"),
        ("train peak memory", f"{fmt_bytes(train.get('peak_memory_bytes'))} (RSS {fmt_bytes(train.get('peak_rss_bytes'))})"),
    ]
    if "flops_per_example" in inference:
        rows.append(("inference FLOPs/example", fmt_count(inference['flops_per_example']) + (f" (seq {inference['flops_seq_len']})" if inference.get('flops_seq_len') else "")))
    if "latency_ms_median" in inference:
        merged = ", merged" if inference.get("merged") else ""
        rows.append(("inference latency", f"{inference['latency_ms_median']:.1f} ms (batch {inference['batch_size']} x {inference['seq_len']}, {inference['threads']} threads{merged})"))
    # Sections that hooks (features, method phases) added: each hook class prints its own.
    hook_classes = registered_hooks()
    for key, section in report.items():
        if key in hook_classes and isinstance(section, dict):
            rows += hook_classes[key].report_rows(section)
    if (kept := train.get("kept")) and kept.get("epoch") is not None:
        restored = f"epoch {kept['epoch']} of {train.get('epochs_completed')} (validation {kept['metric']} {kept['value']:.4f})"
        rows.append(("kept (train.keep: best)", restored if kept.get("restored") else f"the last step: {kept.get('why')}"))
    if train.get("stop_reason"):
        rows.append(("stopped early", str(train["stop_reason"])))
    return rows


def print_report(report: dict[str, Any], console: Console | None = None, title: str = "slimtune report card") -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in report_rows(report):
        table.add_row(key, value)
    (console or Console()).print(table)
