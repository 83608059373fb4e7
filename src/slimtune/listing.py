"""``slimtune list models|tasks|methods|recipes``: what slimtune has, for people and for scripts.

Three renderings of the same rows: a rich table on a terminal (long words fold, nothing is cut
off), plain aligned text when stdout is a pipe or a file (grep-able, never truncated to 80
columns), and ``--json`` (a list of objects; see :func:`rows`). Nothing heavy is loaded: models
and tasks are described from their registries (no weights, no data), so task sizes are not shown.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
import sys
from typing import IO, Any

TITLES = {
    "models": "models (any local HF model directory works too: model.name: /path/to/dir)",
    "tasks": "tasks (or your own data: task: {file: data.csv, text: COL, label: COL} or {images: DIR}; "
    "image tasks take protocol: vtab-1k or shots: K, seed: S; several tasks in one run: task: [NAME, NAME, ...])",
    "methods": "methods (recipe: method: {name: NAME, FIELD: VALUE}; a list composes methods)",
    "recipes": "recipes",
}


# -- the rows ---------------------------------------------------------------------------------
def rows(what: str) -> list[dict[str, Any]]:
    """What ``--json`` prints: one JSON-ready dict per model, task, method or recipe."""
    return {"models": model_rows, "tasks": task_rows, "methods": method_rows, "recipes": recipe_rows}[what]()


def model_rows() -> list[dict[str, Any]]:
    from slimtune.zoo.model_registry import MODELS, installed_dir, is_installed

    out = []
    for spec in MODELS.values():
        found = installed_dir(spec.name)  # None until a model that needs converting is first used
        out.append({
            "name": spec.name, "family": spec.family, "params": spec.params, "description": spec.description,
            "installed": is_installed(spec.name), "dir": str(found) if found else None,
            "package": spec.package, "license": spec.license,
        })  # fmt: skip
    return out


def task_rows() -> list[dict[str, Any]]:
    from slimtune.zoo.image_sources import IMAGE_TASKS
    from slimtune.zoo.images import is_image_task_installed
    from slimtune.zoo.tasks import TASKS, is_task_installed

    from slimtune.zoo.corpus import CORPUS_TASK

    text = [("text", spec, is_task_installed(spec)) for spec in TASKS.values()]
    images = [("image", spec, is_image_task_installed(spec.name)) for spec in IMAGE_TASKS.values()]
    corpus = {
        "name": CORPUS_TASK, "kind": "unlabelled text", "n_labels": 0, "labels": [], "metric": "loss",
        "installed": any(installed for _, _, installed in text),
        "description": "the training sentences of every installed text task, never a validation/test one "
                       "(task.objective lm, mlm or features: sparse pre-training)",
        "source": "the text tasks above", "package": None, "license": "the text tasks'",
    }  # fmt: skip
    return [
        {
            "name": spec.name, "kind": kind, "n_labels": spec.n_labels, "labels": list(spec.label_names),
            "metric": spec.metric, "installed": installed, "description": spec.description,
            "source": spec.source, "package": spec.package, "license": spec.license,
        }  # fmt: skip
        for kind, spec, installed in text + images
    ] + [corpus]


def method_rows() -> list[dict[str, Any]]:
    from slimtune.methods.base import all_methods

    return [
        {
            "name": name, "description": cls.description, "paper": cls.paper or None,
            "mergeable": bool(cls.mergeable),
            "fields": [_field(field, info) for field, info in cls.Config.model_fields.items()],
        }
        for name, cls in all_methods().items()
    ]


def _field(name: str, info) -> dict[str, Any]:
    from pydantic import BaseModel

    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump()
    return {"name": name, "type": type_name(info.annotation), "default": default, "required": required,
            "description": info.description or ""}


def type_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``Literal['all', 'query-ffn']``, ``HiddenStateCacheConfig | None``."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*)", "", text)  # typing.Literal -> Literal, a.b.C -> C


def recipe_rows() -> list[dict[str, Any]]:
    from slimtune.recipe import read_yaml

    out = []
    for path in find_recipes():
        data = read_yaml(path)
        method = data.get("method")
        if isinstance(method, str):
            label = method
        elif isinstance(method, dict):
            label = method.get("name")
        else:
            label = "+".join(m if isinstance(m, str) else m.get("name", "?") for m in method or [])
        model = (data.get("model") or {}).get("name", "minilm-l6") if isinstance(data.get("model"), dict) else data.get("model")
        task = data.get("task")
        task = (task or {}).get("name", (task or {}).get("file")) if isinstance(task, dict) else task
        out.append({"path": str(path), "method": label, "model": model, "task": task})
    return out


# -- rendering --------------------------------------------------------------------------------
def _yes(value: bool) -> str:
    return "yes" if value else "no"


def table(what: str, data: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column names and string cells (methods: one row per field, the method named on its first)."""
    if what == "models":
        return ["name", "family", "params", "installed", "description"], [
            [r["name"], r["family"], r["params"], _yes(r["installed"]), r["description"]] for r in data
        ]
    if what == "tasks":
        return ["name", "labels", "metric", "installed", "description"], [
            [r["name"], str(r["n_labels"]), r["metric"], _yes(r["installed"]), r["description"]] for r in data
        ]
    if what == "recipes":
        return ["recipe", "method", "model / task"], [[r["path"], str(r["method"]), f"{r['model']} / {r['task']}"] for r in data]
    cells = []
    for r in data:
        fields = r["fields"] or [None]
        for i, f in enumerate(fields):
            head = [r["name"], r["description"]] if i == 0 else ["", ""]
            cells.append(head + (["-", "", ""] if f is None else [f["name"], _default(f), f["description"]]))
    return ["method", "what it does", "field", "default", "meaning"], cells


def _default(field: dict[str, Any]) -> str:
    return "required" if field["required"] else repr(field["default"])


def plain_lines(what: str, data: list[dict[str, Any]]) -> list[str]:
    """Aligned plain text, no width limit: one line per row (methods: a block per method)."""
    lines = [TITLES[what], ""]
    if what == "methods":
        for r in data:
            lines.append(f"{r['name']}: {r['description']}" + (f"  [{r['paper']}]" if r["paper"] else ""))
            fields = [[f["name"], _default(f), f["type"], f["description"]] for f in r["fields"]]
            lines += ["  " + line for line in _aligned(fields, cap=28)] if fields else ["  (no fields)"]
            lines.append("")
        return lines[:-1]
    columns, cells = table(what, data)
    return lines + _aligned([columns, *cells])


def _aligned(cells: list[list[str]], cap: int | None = None) -> list[str]:
    """Columns padded to their widest cell; with ``cap``, a longer cell only shifts its own line."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))] if cells else []
    widths = [min(w, cap) for w in widths] if cap else widths
    return ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] if len(row) > 1 else row[0]
            for row in cells]


def print_listing(what: str, *, as_json: bool = False, file: IO[str] | None = None) -> None:
    stream = file if file is not None else sys.stdout
    data = rows(what)
    if as_json:
        print(json.dumps(data, indent=2, default=str), file=stream)
        return
    if not _is_terminal(stream):
        print("\n".join(line.rstrip() for line in plain_lines(what, data)), file=stream)
        return
    from rich.console import Console
    from rich.table import Table

    columns, cells = table(what, data)
    rich_table = Table(title=TITLES[what], title_justify="left", show_lines=what == "methods")
    for column in columns:
        rich_table.add_column(column, overflow="fold")  # a narrow terminal folds long names, never cuts them
    for row in cells:
        rich_table.add_row(*row)
    Console(file=stream).print(rich_table)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def find_recipes() -> list[Path]:
    """Recipes in ./recipes and in the source checkout's recipes/ (editable installs)."""
    roots = [Path("recipes"), Path(__file__).resolve().parents[2] / "recipes"]
    seen, found = set(), []
    for root in roots:
        if root.is_dir():
            for path in sorted(root.glob("*.yaml")):
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    found.append(path)
    return found
