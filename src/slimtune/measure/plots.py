"""Trade-off plots: the task metric against each cost, with the Pareto front highlighted.

One PNG per cost axis (trainable parameters, stored bytes, inference FLOPs, training peak memory,
and ε when some run is private), one panel per task. A point is a method (mean over seeds, with
± std error bars); the Pareto front — the points that no other point beats on both the metric
and the cost — is drawn as a step line, since between two front points the better metric is only
reached at the higher cost. Matplotlib runs on the Agg backend (files only, no display).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from slimtune.measure.compare import PERCENT_METRICS, Summary


@dataclass(frozen=True)
class Axis:
    cost: str  # a Summary cost name
    title: str  # axis label
    filename: str
    scale: float = 1.0  # divide the cost by this for display
    log: bool | None = True  # None: log if the values span more than LOG_SPAN


LOG_SPAN = 20.0

AXES = (
    Axis("trainable", "trainable parameters", "tradeoff_trainable_params.png"),
    Axis("stored_bytes", "stored bytes of the delta (MB)", "tradeoff_stored_bytes.png", scale=1024**2),
    Axis("flops", "inference GFLOPs per example", "tradeoff_inference_flops.png", scale=1e9, log=None),
    Axis("peak_memory", "training peak memory (MB)", "tradeoff_train_memory.png", scale=1024**2, log=None),
    Axis("epsilon", "privacy ε (lower is more private)", "tradeoff_epsilon.png", log=None),
)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points (lower cost x, better metric y), in order of cost.

    A point is dominated when another has cost <= and metric >= (one of them strictly)."""
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        y = sign * points[i][1]
        if y > best:
            front.append(i)
            best = y
    return front


def _merge_labels(xs: list[float], ys: list[float], labels: list[str], log_x: bool) -> list[tuple[float, float, str]]:
    """Points that would print on top of each other get one joined label."""
    def nx(x: float) -> float:
        return math.log10(x) if log_x and x > 0 else x

    span_x = (max(map(nx, xs)) - min(map(nx, xs))) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    placed: list[list] = []
    for x, y, label in zip(xs, ys, labels):
        for spot in placed:
            if abs(nx(spot[0]) - nx(x)) / span_x < 0.04 and abs(spot[1] - y) / span_y < 0.06:
                spot[2] += f", {label}"
                break
        else:
            placed.append([x, y, label])
    return [tuple(p) for p in placed]


def plot_tradeoffs(summaries: dict[str, list[Summary]], out_dir: str | Path, y: str | None = None) -> list[Path]:
    """Write one PNG per cost axis that has data; return their paths. The y-axis is the task
    metric, or with ``y`` (an attack key, e.g. ``pgd:radius=0.1``) the accuracy under that attack
    (groups not measured under it are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written: list[Path] = []
    tasks = [t for t, groups in summaries.items() if groups]
    if not tasks:
        for axis in AXES:
            (out_dir / axis.filename).unlink(missing_ok=True)
        return written
    labels = sorted({s.label for t in tasks for s in summaries[t]})
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    colour = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    for axis in AXES:
        panels = {t: [s for s in summaries[t] if s.cost(axis.cost) is not None and s.values(y)] for t in tasks}
        panels = {t: groups for t, groups in panels.items() if groups}
        if not panels:
            (out_dir / axis.filename).unlink(missing_ok=True)  # one drawn for another y or other runs must not linger
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
        for ax, (task, groups) in zip(axes[0], panels.items()):
            _panel(ax, task, groups, axis, colour, y)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / axis.filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _panel(ax, task: str, groups: list[Summary], axis: Axis, colour: dict, y_key: str | None = None) -> None:
    metric = groups[0].metric
    percent = 100.0 if y_key is not None or metric in PERCENT_METRICS else 1.0
    xs = [groups[i].cost(axis.cost) / axis.scale for i in range(len(groups))]
    values = [g.values(y_key) for g in groups]
    ys = [statistics.fmean(v) * percent for v in values]
    errs = [(statistics.stdev(v) if len(v) > 1 else 0.0) * percent for v in values]
    positive = all(x > 0 for x in xs)
    log_x = positive and (axis.log is True or (axis.log is None and max(xs) / min(xs) > LOG_SPAN))
    for g, x, y, e in zip(groups, xs, ys, errs):
        ax.errorbar([x], [y], yerr=[e] if e else None, fmt="o", color=colour[g.label], markersize=6, capsize=3, zorder=3)
    front = pareto_front(list(zip(xs, ys)), y_key is not None or groups[0].higher_is_better)
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    ax.step(fx, fy, where="post", color="black", linewidth=1.4, alpha=0.8, zorder=2, label="Pareto front")
    ax.scatter(fx, fy, s=130, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)
    for x, y, label in _merge_labels(xs, ys, [g.label for g in groups], log_x):
        ax.annotate(label, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    # Room for the labels on the right.
    lo, hi = ax.get_xlim()
    if log_x:
        ax.set_xlim(lo, hi * 3)
    else:
        ax.set_xlim(lo, hi + (hi - lo) * 0.25)
    # The best metric of the front stays attainable at any higher cost: run the step to the edge.
    ax.plot([fx[-1], ax.get_xlim()[1]], [fy[-1], fy[-1]], color="black", linewidth=1.4, alpha=0.8, zorder=2)
    ax.set_xlabel(axis.title)
    ax.set_ylabel(f"test accuracy under {y_key} (%)" if y_key is not None else f"test {metric}{' (%)' if percent != 1.0 else ''}")
    ax.set_title(task)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
