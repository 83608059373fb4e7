"""Comparison tables over many runs: per task, per method, mean ± std over seeds.

Input: the rows of a bench's ``results.jsonl`` (each an ``ok`` cell carries its ``report.json``).
Cells are grouped by (task, variant) — the variant is the cell id without its task and seed parts,
so ``lora__movie-sentiment__seed0`` and ``..._seed1`` form one group. Means are arithmetic; the
± is the sample standard deviation over seeds (n − 1 in the denominator; none shown for one seed).
Costs that do not depend on the seed (parameters, bytes, FLOPs) are the same for every seed; the
table shows their mean all the same.
"""

from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.io import atomic_write_text
from slimtune.measure.report import fmt_bytes, fmt_count
from slimtune.measure.robustness import attacked_accuracies

#: Metrics in [0, 1] shown as percentages.
PERCENT_METRICS = {"accuracy", "macro_f1", "micro_f1", "f1", "matthews", "auc"}
#: Metrics where lower is better (the Pareto front flips).
LOWER_IS_BETTER = {"perplexity", "loss", "distill_loss"}

#: The cost columns: (field of Summary, column title, formatter name).
COST_FIELDS = ("trainable", "trainable_pct", "stored_bytes", "flops", "peak_memory", "step_seconds", "latency_ms", "epsilon")


@dataclass
class Summary:
    """One (task, variant) group: its metric over seeds and its costs."""

    task: str
    label: str  # the variant shown in tables and plots, e.g. "lora" or "lora__r16"
    method: str  # the method label of the runs, e.g. "lora+bitfit"
    metric: str
    scores: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    costs: dict[str, list[float]] = field(default_factory=dict)
    #: Accuracy under each attack (report.json's ``robustness``), by attack key, one per seed that measured it.
    attacks: dict[str, list[float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def score_mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else math.nan

    @property
    def score_std(self) -> float | None:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else None

    def cost(self, name: str) -> float | None:
        values = [v for v in self.costs.get(name, []) if v is not None]
        return statistics.fmean(values) if values else None

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def values(self, y: str | None = None) -> list[float]:
        """The per-seed values of ``y``: the task metric (None) or the accuracy under an attack (its key)."""
        return self.scores if y is None else self.attacks.get(y, [])


def _costs_of(report: dict[str, Any]) -> dict[str, float | None]:
    params, train, inference = report.get("params", {}), report.get("train", {}), report.get("inference", {})
    privacy = report.get("privacy") or {}
    return {
        "trainable": params.get("trainable"),
        "trainable_pct": params.get("trainable_pct"),
        "stored_bytes": params.get("stored_bytes"),
        "flops": inference.get("flops_per_example"),
        "peak_memory": train.get("peak_memory_bytes"),
        "step_seconds": train.get("step_seconds_median"),
        "latency_ms": inference.get("latency_ms_median"),
        "epsilon": privacy.get("epsilon"),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, list[Summary]]:
    """Group the ok cells by task, then by variant, in first-appearance order."""
    by_task: dict[str, dict[str, Summary]] = {}
    for row in rows:
        report = row.get("report")
        if row.get("status") != "ok" or not report:
            continue
        task = report["task"]["name"]
        metric = report["task"]["primary_metric"]
        label = row.get("group") or report["method"]["name"]
        group = by_task.setdefault(task, {}).setdefault(label, Summary(task=task, label=label, method=report["method"]["name"], metric=metric))
        value = report.get("metrics", {}).get(metric)
        if value is None:
            continue
        group.scores.append(float(value))
        seed = (row.get("overrides") or {}).get("train.seed")
        group.seeds.append(seed if seed is not None else len(group.seeds))
        for name, cost in _costs_of(report).items():
            group.costs.setdefault(name, []).append(cost)
        for key, value in attacked_accuracies(report).items():
            group.attacks.setdefault(key, []).append(value)
    return {task: list(groups.values()) for task, groups in by_task.items()}


# --------------------------------------------------------------------------------------------
# Formatting.
# --------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def fmt_score(summary: Summary, y: str | None = None) -> str:
    """Mean ± std over seeds of the task metric (``y`` None) or of an accuracy under attack, in %."""
    values = summary.values(y)
    if not values:
        return "–"
    scale, digits = (100.0, 1) if y is not None or summary.metric in PERCENT_METRICS else (1.0, 3)
    mean = f"{statistics.fmean(values) * scale:.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values) * scale:.{digits}f}"


def attack_keys(summaries: list[Summary]) -> list[str]:
    """The attacks some of ``summaries`` were measured under, in first-appearance order."""
    return list(dict.fromkeys(key for s in summaries for key in s.attacks))


def attack_title(key: str) -> str:
    return f"under {key} (%)"


def metric_title(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT_METRICS else metric


def table(summaries: list[Summary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one task's table (accuracy under each attack some run was measured
    under, "–" for the others; ε only when some run is private, ∞ for the others)."""
    metric = summaries[0].metric
    private = any(s.cost("epsilon") is not None for s in summaries)
    attacks = attack_keys(summaries)
    header = ["method", "seeds", f"{metric_title(metric)}, mean ± std", *map(attack_title, attacks), "trainable params", "trainable %", "stored", "inference FLOPs/example", "train peak memory", "step time", "latency (batch)"]
    if private:
        header.append("ε")
    rows = []
    for s in summaries:
        pct = s.cost("trainable_pct")
        trainable = s.cost("trainable")
        step = s.cost("step_seconds")
        latency = s.cost("latency_ms")
        row = [
            s.label,
            str(s.n),
            fmt_score(s),
            *(fmt_score(s, key) + (f" ({len(s.values(key))} of {s.n} seeds)" if 0 < len(s.values(key)) < s.n else "") for key in attacks),
            f"{trainable:,.0f}" if trainable is not None else "–",
            f"{pct:.3f}%" if pct is not None else "–",
            fmt_bytes(s.cost("stored_bytes")),
            fmt_count(s.cost("flops")),
            fmt_bytes(s.cost("peak_memory")),
            _seconds(step),
            f"{latency:.1f} ms" if latency is not None else "–",
        ]
        if private:
            eps = s.cost("epsilon")
            row.append(f"{eps:.2f}" if eps is not None else "∞")
        rows.append(row)
    return header, rows


def _failed(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Failed cells, and finished cells whose ``bench --attack`` failed."""
    return [(r["cell"], r.get("error", "")) if r.get("status") == "failed" else (r["cell"], f"attack: {r['attack_error']}")
            for r in rows if r.get("status") == "failed" or r.get("attack_error")]


def _pending(rows: list[dict[str, Any]]) -> list[str]:
    return [r["cell"] for r in rows if r.get("status") == "pending"]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _setting_note(rows: list[dict[str, Any]]) -> str:
    """One line on how the costs were measured (model, batch, sequence length, threads)."""
    for row in rows:
        report = row.get("report")
        if row.get("status") == "ok" and report:
            inf, train = report.get("inference", {}), report.get("train", {})
            parts = [f"model {report['model']['name']}", f"train batch {train.get('batch_size')}"]
            if "flops_seq_len" in inf:
                parts.append(f"FLOPs per example at {inf['flops_seq_len']} tokens" + " (deltas with a linear update merged into the base)")
            if "latency_ms_median" in inf:
                parts.append(f"latency: median per batch of {inf.get('batch_size')} x {inf.get('seq_len')} tokens, {inf.get('threads')} threads")
            parts.append("train peak memory: tensor memory of one training step (weights, activations, gradients, optimizer state)")
            return "; ".join(parts) + "."
    return ""


def _plots_note(plot_y: str | None) -> str:
    y = f"Y-axis: test accuracy under {plot_y} (bench --plot-y). " if plot_y else ""
    return y + "Pareto front (no other run is both better and cheaper) drawn as a step line; points are labelled by method."


def markdown_report(rows: list[dict[str, Any]], plots: list[Path], title: str, description: str = "", base: Path | None = None,
                    plot_y: str | None = None) -> str:
    summaries = summarize(rows)
    out = [f"# {title}", ""]
    if description:
        out += [description, ""]
    ok = sum(1 for r in rows if r.get("status") == "ok")
    out += [f"{ok} of {len(rows)} cells finished; mean ± std over seeds (sample std).", ""]
    note = _setting_note(rows)
    if note:
        out += [note, ""]
    for task, groups in summaries.items():
        out += [f"## {task}", "", markdown_table(*table(groups)), ""]
    if plots:
        out += ["## Trade-offs", "", _plots_note(plot_y), ""]
        for plot in plots:
            rel = plot.relative_to(base) if base else plot
            out += [f"![{plot.stem}]({rel.as_posix()})", ""]
    failed = _failed(rows)
    if failed:
        out += ["## Failed cells", "", markdown_table(["cell", "error"], [[c, e] for c, e in failed]), ""]
    pending = _pending(rows)
    if pending:
        out += [f"Not run yet: {', '.join(pending)}.", ""]
    return "\n".join(out).rstrip() + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0 1.5em; border: 1px solid #eee; }
.error { color: #a00; text-align: left; font-family: monospace; }
"""


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=' + repr(cls) if cls and i else ''}>{html.escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(rows: list[dict[str, Any]], plots: list[Path], title: str, description: str = "", base: Path | None = None,
                plot_y: str | None = None) -> str:
    summaries = summarize(rows)
    ok = sum(1 for r in rows if r.get("status") == "ok")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    if description:
        parts.append(f"<p>{html.escape(description)}</p>")
    parts.append(f"<p>{ok} of {len(rows)} cells finished; mean ± std over seeds (sample std).</p>")
    note = _setting_note(rows)
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    for task, groups in summaries.items():
        parts.append(f"<h2>{html.escape(task)}</h2>")
        parts.append(html_table(*table(groups)))
    if plots:
        parts.append(f"<h2>Trade-offs</h2><p>{html.escape(_plots_note(plot_y))}</p>")
        for plot in plots:
            rel = plot.relative_to(base) if base else plot
            parts.append(f"<img src='{html.escape(rel.as_posix())}' alt='{html.escape(plot.stem)}'>")
    failed = _failed(rows)
    if failed:
        parts.append("<h2>Failed cells</h2>" + html_table(["cell", "error"], [[c, e] for c, e in failed], cls="error"))
    pending = _pending(rows)
    if pending:
        parts.append(f"<p>Not run yet: {html.escape(', '.join(pending))}.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_reports(out: str | Path, rows: list[dict[str, Any]], title: str = "slimtune bench", description: str = "",
                  plot_y: str | None = None) -> dict[str, Any]:
    """Write DIR/report.md, DIR/report.html and DIR/plots/*.png (y-axis: the task metric, or with
    ``plot_y`` the accuracy under that attack); return their paths."""
    from slimtune.measure.plots import plot_tradeoffs

    out = Path(out)
    plots = plot_tradeoffs(summarize(rows), out / "plots", y=plot_y)
    md = out / "report.md"
    page = out / "report.html"
    atomic_write_text(md, markdown_report(rows, plots, title, description, base=out, plot_y=plot_y))
    atomic_write_text(page, html_report(rows, plots, title, description, base=out, plot_y=plot_y))
    return {"markdown": md, "html": page, "plots": plots}
