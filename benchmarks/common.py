"""Helpers shared by the benchmark scripts: offline setup, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin so that machine
    noise (a shared 2-core box) hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_saved(name: str, render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """``--render-only``: print ``render`` of ``results/<name>.json`` and return the result."""
    result = json.loads((RESULTS / f"{name}.json").read_text())
    print(render(result))
    return result


def merge_part_and_write(name: str, parts: tuple[str, ...], part: str, entry: dict[str, Any], args, by_task_seed: bool = True) -> dict[str, Any]:
    """Write ``results/<name>.json`` with ``entry`` as its part ``part``, keeping the other parts
    of the file. With ``by_task_seed`` the part's rows of (task, seed) pairs this run did not redo
    (``args.tasks`` x ``args.seeds``) are kept too, with their own settings, so that the seeds of
    a long benchmark can be run one invocation at a time."""
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    merged = {key: previous[key] for key in parts if key in previous}
    old = merged.get(part)
    if by_task_seed and "rows" in entry and old and "rows" in old:
        redone = {(task, int(seed)) for task in args.tasks.split(",") for seed in args.seeds.split(",")}
        kept = [r for r in old["rows"] if (r["task"], r["seed"]) not in redone]
        if kept:
            entry = {**entry, "rows": kept + entry["rows"], "settings_of_kept_rows": old.get("settings_of_kept_rows") or old["settings"]}
    merged[part] = entry
    write_result(name, merged)
    return merged


def write_result(name: str, data: dict[str, Any]) -> Path:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


def train_peft(peft_config: Any, overrides: list[str]) -> dict[str, Any]:
    """Train a peft-wrapped minilm-l6 through slimtune's own trainer (same tokenised data, batch
    order, schedule and evaluation as a slimtune run of the same recipe) and return its test
    metrics and trainable-parameter count. The head is the HF [CLS]+pooler classifier with the
    pooler frozen, which is what peft's SEQ_CLS task trains (``modules_to_save``)."""
    from peft import get_peft_model

    from slimtune.recipe import load_recipe
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    recipe = load_recipe(None, [*overrides, "method=linear-probe", "head.pooling=cls", "head.train_pooler=false"])
    built = build(recipe)
    peft_model = get_peft_model(built.model, peft_config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    # The trainer asks the delta what to train and which parameters are the head (head_lr).
    built.delta.trainable_parameters = lambda model: trainable
    built.delta.head_names = [n for n in trainable if "modules_to_save" in n]
    trainer = Trainer(model=peft_model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", run_dir=None, hooks=[], progress=False)
    trainer.fit()
    return {"metrics": trainer.evaluate("test"), "trainable": sum(p.numel() for p in trainable.values()),
            "step_seconds_median": trainer.result.step_seconds_median}


def print_rows(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def mean_std(values: list[float | None], scale: float = 1.0) -> str:
    """``mean ± std`` over seeds (3 decimals; one value alone; "-" for none), values times ``scale``."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
