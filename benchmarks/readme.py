"""Render the benchmark results page, docs/benchmarks.md, from benchmarks/results/*.json.

The results live between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in docs/benchmarks.md
and are rewritten whole; everything outside the markers (the page's title, summary and notes on how
the figures were measured) is left as it is. The README only links to that page. A benchmark script
can own its rendering by defining ``render_markdown(result: dict) -> str`` in its module; otherwise a
renderer here is used (``RENDERERS``), or, failing that, a generic table of the result's scalar
values. (The module keeps its historical name, ``readme``.)
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"

#: Keys that describe the run rather than measure anything (not shown by the generic renderer).
META_KEYS = {"benchmark", "date", "machine", "settings"}


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{digits}f}".rstrip("0").rstrip(".")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(result: dict[str, Any]) -> str:
    machine = result.get("machine") or {}
    bits = [f"{machine['cpus']} CPUs" if "cpus" in machine else "", f"{machine['torch_threads']} torch threads" if "torch_threads" in machine else "", f"torch {machine['torch']}" if "torch" in machine else ""]
    bits = [b for b in bits if b]
    when = result.get("date")
    return f"_Measured {when}" + (f" on {', '.join(bits)}" if bits else "") + "._" if when or bits else ""


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as (dotted.key, value); lists of scalars joined."""
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(data, list):
        if all(not isinstance(v, (dict, list)) for v in data):
            return [(prefix, ", ".join(_num(v) for v in data))]
        return []  # long structured lists (histories) are for the JSON, not the page
    return [(prefix, data)]


def render_generic(name: str, result: dict[str, Any]) -> str:
    rows = [[key, _num(value)] for key, value in flatten({k: v for k, v in result.items() if k not in META_KEYS})]
    return _table(["measure", "value"], rows[:40]) if rows else "_no measurements_"


def render_lora_vs_peft(result: dict[str, Any]) -> str:
    s = result.get("settings", {})
    rows = [
        ["train step time, slimtune / peft", _num(result.get("step_ratio")), "<= 0.95"],
        ["LoRA injection time, slimtune / peft", _num(result.get("inject_ratio")), "<= 0.5"],
        ["max abs logit difference, same LoRA weights", _num(result.get("max_abs_logit_diff")), "~ 0"],
        ["merged-model latency / base-model latency", _num(result.get("merged_latency_ratio")), "1.00"],
    ]
    for label, value in (result.get("accuracy") or {}).items():
        rows.append([f"test accuracy: {label}", _num(value), ""])
    intro = f"LoRA r={s.get('r')} alpha={s.get('alpha')} on {'/'.join(s.get('targets', []))} of {s.get('model')}, batch {s.get('batch_size')} x {s.get('seq_len')} tokens."
    return intro + "\n\n" + _table(["measure", "value", "goal"], rows)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {"lora_vs_peft": render_lora_vs_peft}

TITLES = {
    "lora_vs_peft": "slimtune LoRA vs peft LoRA",
    "methods_table": "Methods side by side",
    "dp": "DP-SGD vs Opacus",
    "memory": "Training memory",
    "slim": "Slim models (pruning, distillation, int8)",
    "sparse_adapter": "SparseAdapter",
    "dsee": "DSEE",
    "vision": "Vision",
    "tickets": "Lottery tickets: robust vs plain, and the rethinking controls",
    "sparse_kernels": "Sparse kernels on this CPU",
    "prune_ofa": "Prune Once for All",
    "multitask": "Multi-task: shared adapters and one pruned encoder for several tasks",
}


def script_of(name: str) -> str | None:
    """The script that wrote ``results/<name>.json``: the name itself or its longest ``-`` prefix
    (``memory-minilm-l6`` comes from ``memory.py``); None for hand-written result files."""
    parts = name.split("-")
    for end in range(len(parts), 0, -1):
        candidate = "-".join(parts[:end])
        if (Path(__file__).parent / f"{candidate}.py").is_file():
            return candidate
    return None


def _renderer(name: str) -> Callable[[dict[str, Any]], str]:
    script = script_of(name)
    try:
        module = importlib.import_module(f"benchmarks.{script}") if script else None
    except ImportError:
        module = None
    own = getattr(module, "render_markdown", None)
    if callable(own):
        return own
    return RENDERERS.get(name) or (lambda result: render_generic(name, result))


def load_results(results_dir: Path, order: list[str]) -> dict[str, dict[str, Any]]:
    """The JSON results present, in the known order first, then any others by name."""
    found = {p.stem: p for p in Path(results_dir).glob("*.json")}

    def rank(name: str) -> tuple[int, int, str]:  # the scripts' order, a script's main file before its variants
        script = script_of(name) or name
        return (order.index(script) if script in order else len(order), len(name), name)

    names = sorted(found, key=rank)
    return {name: json.loads(found[name].read_text(encoding="utf-8")) for name in names}


def render_section(results: dict[str, dict[str, Any]]) -> str:
    """The markdown between the markers: one subsection per benchmark result."""
    if not results:
        return "_No benchmark results yet: run `make bench`._"
    parts = ["_Generated by `python -m benchmarks` from `benchmarks/results/*.json`; do not edit by hand._"]
    for name, result in results.items():
        script = script_of(name)
        variant = name[len(script) + 1 :] if script and name != script else ""
        title = TITLES.get(script or name, (script or name).replace("_", " "))
        parts.append(f"### {title}" + (f" ({variant})" if variant else ""))
        try:
            body = _renderer(name)(result)
        except Exception as exc:  # a renderer bug must not lose the other sections
            body = f"_could not render {name}.json: {type(exc).__name__}: {exc}_"
        parts.append(body)
        machine = _machine_line(result)
        if machine:
            parts.append(machine)
        parts.append(f"Source: `benchmarks/{script}.py` -> `benchmarks/results/{name}.json`." if script else f"Source: `benchmarks/results/{name}.json`.")
    return "\n\n".join(parts)


def replace_section(text: str, section: str) -> str:
    """Put ``section`` between the markers of ``text``; ValueError if the markers are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"markers {START} ... {END} not found (in this order)")
    return text[: start + len(START)] + "\n" + section.strip() + "\n" + text[end:]


def update_page(page: Path, section: str) -> bool:
    """Rewrite the marked section of ``page`` (docs/benchmarks.md); False (and nothing written)
    without the markers."""
    text = page.read_text(encoding="utf-8")
    try:
        new = replace_section(text, section)
    except ValueError:
        return False
    if new != text:
        page.write_text(new, encoding="utf-8")
    return True
