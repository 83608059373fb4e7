"""`slimtune bench`: a suite of runs (recipes x a grid of overrides), one run directory per cell,
then a comparison report (tables + Pareto plots) over all of them.

A suite is a YAML file::

    recipe: recipes/lora.yaml          # the base recipe: a path (relative to the suite file or
                                       # the working directory) or an inline recipe mapping
    grid:                              # the cartesian product of these --set paths
      method: [lora, bitfit, linear-probe]   # `method` replaces the whole method section
      task.name: [movie-sentiment]
      train.seed: [0, 1]
    set: {model.name: minilm-l2}       # applied to every cell
    per_method:                        # applied to cells whose method label matches
      full: {train.lr: 5.0e-5}

or, instead of ``recipe:``, a list of recipes ``runs: [recipes/lora.yaml, {recipe: recipes/bitfit.yaml,
set: {...}, id: my-bitfit}]`` (crossed with ``grid:`` if one is given). Overrides apply in this
order: recipe file -> suite ``set`` -> the run's ``set`` -> grid values -> ``per_method`` -> ``--set``
from the command line.

Layout of ``--out DIR``::

    DIR/runs/<cell-id>/   one run directory per cell (recipe.yaml, delta, report.json, ...)
    DIR/results.jsonl     one line per cell: id, status (ok / failed / pending), overrides, report
    DIR/report.md         tables: per task, per method, mean ± std over seeds
    DIR/report.html       the same tables and the plots (PNGs in DIR/plots/)

Resuming: a cell whose directory holds ``report.json`` is finished and skipped (if its recipe.yaml
differs from the suite's current recipe for it, the cell is reported as failed rather than silently
mixing settings). A cell directory without ``report.json`` was interrupted or failed: if it holds
an intact checkpoint written with the same recipe, training resumes from it (``resume=True``);
otherwise the directory is cleared and the cell starts over. Failed cells are therefore retried on
every invocation (cheap when the failure is a validation error, e.g. a method not registered yet).
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import itertools
import json
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.io import atomic_write_text, read_json, write_json
from slimtune.recipe import Recipe, load_recipe, read_yaml, set_field, validate_recipe

SUITE_KEYS = {"name", "description", "recipe", "runs", "grid", "set", "per_method"}
RUN_KEYS = {"recipe", "set", "id"}


@dataclass
class Cell:
    """One run of the suite: a base recipe plus ordered overrides."""

    id: str
    group: str  # the variant this cell is a seed/task of: its id without the task and seed parts
    base: str | dict[str, Any]  # a recipe path (resolved) or an inline recipe mapping
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    source: str = "suite"

    def overrides_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.overrides}

    def recipe_data(self) -> dict[str, Any]:
        data = read_yaml(self.base) if isinstance(self.base, str) else copy.deepcopy(self.base)
        _normalise(data)
        for key, value in self.overrides:
            set_field(data, key, copy.deepcopy(value))
            _normalise(data)
        return data

    def recipe(self) -> Recipe:
        """Resolve and validate this cell's recipe (raises SlimtuneError naming the cell)."""
        return validate_recipe(self.recipe_data(), source=f"cell {self.id}")


@dataclass
class Suite:
    path: Path
    name: str
    cells: list[Cell]
    description: str = ""


def _normalise(data: dict[str, Any]) -> None:
    for section in ("task", "model"):
        if isinstance(data.get(section), str):
            data[section] = {"name": data[section]}


# --------------------------------------------------------------------------------------------
# Reading and validating a suite.
# --------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Keep characters that are safe in a directory name and readable in a table."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "-", str(text))


def _slug(text: str) -> str:
    return _clean(text).strip("-") or "x"


def method_slug(value: Any) -> str:
    """A readable id for a method value: ``lora``, ``lora-r16``, ``lora+bitfit``."""
    if isinstance(value, list):
        return "+".join(method_slug(v) for v in value)
    if isinstance(value, dict):
        extra = "-".join(f"{k}{_scalar_slug(v)}" for k, v in value.items() if k != "name")
        return _slug(f"{value.get('name', 'method')}{'-' + extra if extra else ''}")
    return _slug(str(value))


def _scalar_slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_scalar_slug(v) for v in value)
    return _clean(json.dumps(value) if isinstance(value, (dict, bool)) or value is None else str(value))


def id_part(key: str, value: Any) -> str:
    """The piece of a cell id contributed by one override: ``seed0``, ``movie-sentiment``, ``r16``."""
    if key == "method":
        return method_slug(value)
    if key in ("task.name", "model.name"):
        return _slug(Path(str(value)).name)
    if key == "task.file":
        return _slug(Path(str(value)).stem)
    last = key.split(".")[-1]
    return _slug(f"{last}{_scalar_slug(value)}")


def grid_id_parts(key: str, values: list[Any]) -> list[str]:
    """Id parts of a grid axis. Methods are named by their name alone when that is unambiguous
    (``lora``, not ``lora-r8-alpha16``), else by name and fields."""
    if key == "method":
        short = [method_slug(v["name"] if isinstance(v, dict) and "name" in v else v) for v in values]
        if len(set(short)) == len(short):
            return short
    return [id_part(key, v) for v in values]


def _is_identity_neutral(key: str) -> bool:
    """Keys whose values do not make a different variant: seeds and tasks (grouped over/by)."""
    return key == "train.seed" or key.startswith("task.")


def _parse_set(raw: Any, where: str) -> list[tuple[str, Any]]:
    """``set:`` as a mapping {path: value} or a list of "path=value" strings."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = []
        for item in raw:
            if not isinstance(item, str) or "=" not in item:
                raise SlimtuneError(f"{where}: expected 'section.field=value' strings, got {item!r}")
            key, _, text = item.partition("=")
            try:  # the value is YAML, as with --set
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                value = text
            pairs.append((key.strip(), value))
    else:
        raise SlimtuneError(f"{where}: expected a mapping of section.field: value, got {raw!r}")
    for key, _ in pairs:
        _check_key(str(key), where)
    return [(str(k), v) for k, v in pairs]


def _check_key(key: str, where: str) -> None:
    parts = key.split(".")
    if not all(parts) or (len(parts) < 2 and key not in ("method", "model", "task")):
        raise SlimtuneError(f"{where}: '{key}' is not a recipe path; use section.field (e.g. train.lr) or 'method'")


def _resolve_recipe_path(raw: str, suite_path: Path, where: str) -> str:
    candidates = [suite_path.parent / raw, Path(raw), suite_path.parent.parent / raw]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise SlimtuneError(f"{where}: recipe file '{raw}' not found (looked next to the suite, in the working directory and the suite's parent)")


def _base_id(raw: Any, resolved: str | dict[str, Any]) -> str:
    if isinstance(resolved, str):
        return _slug(Path(resolved).stem)
    method = resolved.get("method", "recipe")
    items = method if isinstance(method, list) else [method]
    return method_slug([m.get("name", "method") if isinstance(m, dict) else m for m in items])


def load_suite(path: str | Path, extra_overrides: list[str] | None = None) -> Suite:
    """Read a suite file into its cells; structural problems raise one-line SlimtuneErrors."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: suite file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SlimtuneError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: a suite is a mapping with 'recipe' (+ 'grid') or 'runs'; see `slimtune bench --help`")
    for key in data:
        if key not in SUITE_KEYS:
            raise SlimtuneError(f"{path}: unknown key '{key}'{did_you_mean(str(key), SUITE_KEYS)}")
    if ("recipe" in data) == ("runs" in data):
        raise SlimtuneError(f"{path}: give exactly one of 'recipe' (a base recipe, with a grid) or 'runs' (a list of recipes)")

    # Bases: (id, recipe path or inline mapping, the run's own overrides).
    # Bases: (id, variant id without seed/task parts, recipe path or inline mapping, the run's overrides).
    bases: list[tuple[str, str, str | dict[str, Any], list[tuple[str, Any]]]] = []
    if "recipe" in data:
        bases.append(("", "", _load_base(data["recipe"], path, f"{path}: recipe"), []))
    else:
        runs = data["runs"]
        if not isinstance(runs, list) or not runs:
            raise SlimtuneError(f"{path}: runs: expected a non-empty list of recipe paths or {{recipe, set, id}} mappings")
        for i, item in enumerate(runs):
            where = f"{path}: runs.{i}"
            if isinstance(item, str):
                item = {"recipe": item}
            if not isinstance(item, dict) or "recipe" not in item:
                raise SlimtuneError(f"{where}: expected a recipe path or a mapping with 'recipe', got {item!r}")
            for key in item:
                if key not in RUN_KEYS:
                    raise SlimtuneError(f"{where}: unknown key '{key}'{did_you_mean(str(key), RUN_KEYS)}")
            base = _load_base(item["recipe"], path, f"{where}.recipe")
            run_set = _parse_set(item.get("set"), f"{where}.set")
            run_id = item.get("id")
            if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
                raise SlimtuneError(f"{where}.id: expected a non-empty string, got {run_id!r}")
            stem = _base_id(item["recipe"], base)
            variant = "__".join([stem, *(id_part(k, v) for k, v in run_set if not _is_identity_neutral(k))])
            if run_id is None:
                run_id = "__".join([stem, *(id_part(k, v) for k, v in run_set)])
            else:
                variant = run_id if not any(_is_identity_neutral(k) for k, _ in run_set) else variant
            bases.append((_slug(run_id), _slug(variant), base, run_set))

    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise SlimtuneError(f"{path}: grid: expected a mapping of section.field: [values], got {grid!r}")
    for key, values in grid.items():
        _check_key(str(key), f"{path}: grid")
        if not isinstance(values, list) or not values:
            raise SlimtuneError(f"{path}: grid.{key}: expected a non-empty list of values, got {values!r}")
    if "recipe" in data and not grid:
        raise SlimtuneError(f"{path}: a base 'recipe' needs a 'grid' (e.g. grid: {{train.seed: [0, 1]}}); for a list of recipes use 'runs'")

    common = _parse_set(data.get("set"), f"{path}: set")
    per_method_raw = data.get("per_method") or {}
    if not isinstance(per_method_raw, dict):
        raise SlimtuneError(f"{path}: per_method: expected a mapping of method label -> {{section.field: value}}")
    per_method = {str(label): _parse_set(sets, f"{path}: per_method.{label}") for label, sets in per_method_raw.items()}
    cli = _parse_set(list(extra_overrides or []), "--set")

    cells: list[Cell] = []
    used_labels: set[str] = set()
    keys = [str(k) for k in grid]
    labels = {k: grid_id_parts(k, grid[k]) for k in keys}
    for base_id, base_variant, base, run_set in bases:
        for indices in itertools.product(*(range(len(grid[k])) for k in keys)):
            point = [(k, grid[k][i]) for k, i in zip(keys, indices)]
            parts = ([(None, base_id)] if base_id else []) + [(k, labels[k][i]) for k, i in zip(keys, indices)]
            cell_id = "__".join(p for _, p in parts)
            overrides = common + run_set + point
            label = _method_label(base, overrides)
            variant_parts = ([base_variant] if base_variant else []) + [p for k, p in parts if k is not None and not _is_identity_neutral(k)]
            group = "__".join(variant_parts) or _slug(label or "recipe")
            used_labels.add(label)
            overrides += per_method.get(label, []) + cli
            cells.append(Cell(id=cell_id, group=group, base=base, overrides=overrides, source=str(path)))
    for label in per_method:
        if label not in used_labels:
            raise SlimtuneError(f"{path}: per_method.{label}: no cell uses this method{did_you_mean(label, used_labels)}")
    seen: dict[str, int] = {}
    for i, cell in enumerate(cells):
        if cell.id in seen:
            raise SlimtuneError(f"{path}: two cells get the id '{cell.id}'; give the runs distinct 'id's or distinct grid values")
        seen[cell.id] = i
    name = str(data.get("name") or path.stem)
    return Suite(path=path, name=name, cells=cells, description=str(data.get("description") or ""))


def _load_base(raw: Any, suite_path: Path, where: str) -> str | dict[str, Any]:
    if isinstance(raw, str):
        return _resolve_recipe_path(raw, suite_path, where)
    if isinstance(raw, dict):
        return copy.deepcopy(raw)
    raise SlimtuneError(f"{where}: expected a recipe file path or an inline recipe mapping, got {raw!r}")


def _method_label(base: str | dict[str, Any], overrides: list[tuple[str, Any]]) -> str:
    """The method label ('lora', 'lora+bitfit') a cell ends up with, for per_method lookups."""
    method: Any = None
    try:
        data = read_yaml(base) if isinstance(base, str) else copy.deepcopy(base)
        method = data.get("method")
    except SlimtuneError:
        pass
    for key, value in overrides:
        if key == "method":
            method = value
        elif key in ("method.name", "method.0.name") and not isinstance(method, list):
            method = value
    items = method if isinstance(method, list) else [method]
    names = [(m.get("name") if isinstance(m, dict) else m) for m in items]
    return "+".join(str(n) for n in names if n is not None)


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.id


def _same_recipe(run_dir: Path, recipe: Recipe) -> bool:
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return False
    try:
        return load_recipe(saved).to_dict() == recipe.to_dict()
    except SlimtuneError:
        return False


def _has_intact_checkpoint(run_dir: Path) -> bool:
    from slimtune.train import checkpoint as ckpt

    return ckpt.latest_good_checkpoint(run_dir, warn=lambda _msg: None) is not None


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, SlimtuneError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _row(cell: Cell, out: Path, status: str, **extra: Any) -> dict[str, Any]:
    return {"cell": cell.id, "group": cell.group, "status": status, "overrides": cell.overrides_dict(), "run_dir": str(cell_dir(out, cell).relative_to(out)), **extra}


def run_cell(cell: Cell, out: Path, train: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run one cell (or skip/resume it); never raises for the cell's own failures."""
    from slimtune import runner

    train = train or runner.train_run
    run_dir = cell_dir(out, cell)
    started = time.perf_counter()
    try:
        recipe = cell.recipe()
        if (run_dir / "report.json").is_file():
            if not _same_recipe(run_dir, recipe):
                raise SlimtuneError(f"{run_dir}: finished with a different recipe than the suite now gives; delete it (or use a new --out) to rerun this cell")
            return _row(cell, out, "ok", reused=True, seconds=0.0, report=read_json(run_dir / "report.json"))
        resume = run_dir.is_dir() and _same_recipe(run_dir, recipe) and _has_intact_checkpoint(run_dir)
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # interrupted or failed before: start the cell over, cleanly
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        report = train(recipe, run_dir, resume=resume, progress=False)
        return _row(cell, out, "ok", reused=False, resumed=resume, seconds=time.perf_counter() - started, report=report)
    except Exception as exc:  # one cell's failure (any kind) is recorded; the suite goes on
        message = _error_message(exc)
        if run_dir.is_dir() or not isinstance(exc, SlimtuneError):
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "error.json", {"error": message, "traceback": traceback.format_exc()})
        return _row(cell, out, "failed", reused=False, seconds=time.perf_counter() - started, error=message)
    finally:
        gc.collect()


def finished(out: Path, cell: Cell) -> bool:
    return (cell_dir(out, cell) / "report.json").is_file()


def write_results(out: Path, rows: list[dict[str, Any]]) -> Path:
    path = out / "results.jsonl"
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))
    return path


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    only: list[str] | None = None,
    progress: bool = True,
    train: Callable[..., dict[str, Any]] | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    report: bool = True,
    attack: Any = None,
    plot_y: str | None = None,
) -> list[dict[str, Any]]:
    """Run every cell (skipping finished ones), keep results.jsonl current after each cell, and
    write report.md/report.html/plots at the end (also after an interruption). ``attack`` (an
    :class:`slimtune.measure.attacks.AttackConfig`): also attack each finished cell that was not
    yet measured under it (``slimtune bench --attack``; merged into its report.json, no retraining);
    ``plot_y``: the y-axis of the plots (:func:`slimtune.measure.compare.write_reports`)."""
    from slimtune.progress import progress as progress_bar
    from slimtune.progress import write

    out = Path(out)
    selected = [c for c in suite.cells if not only or any(fnmatch.fnmatchcase(c.id, pattern) for pattern in only)]
    if only and not selected:
        raise SlimtuneError(f"--only {' '.join(only)}: matches no cell; cells: {', '.join(c.id for c in suite.cells)}")
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for cell in suite.cells:  # what is already there (finished cells), the rest pending
        if finished(out, cell):
            rows[cell.id] = _row(cell, out, "ok", reused=True, seconds=0.0, report=read_json(cell_dir(out, cell) / "report.json"))
        else:
            rows[cell.id] = _row(cell, out, "pending")
    ordered = lambda: [rows[c.id] for c in suite.cells]  # noqa: E731
    write_results(out, ordered())
    bar = progress_bar(selected, desc=f"bench {suite.name}", unit="cell", disable=not progress)
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    try:
        for cell in bar:
            bar.set_postfix_str(cell.id)
            row = run_cell(cell, out, train=train)
            if attack is not None and row["status"] == "ok":
                row = attack_cell(row, cell, out, attack)
            rows[cell.id] = row
            write_results(out, ordered())
            counts["skipped" if row.get("reused") else row["status"]] += 1
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], skipped=counts["skipped"])
            if progress and (not row.get("reused") or attack is not None):
                write(_describe(row))
            if on_cell is not None:
                on_cell(row)
    finally:
        bar.close()
        if report:
            from slimtune.measure.compare import write_reports

            write_reports(out, ordered(), title=f"slimtune bench: {suite.name}", description=suite.description, plot_y=plot_y)
    return ordered()


def attack_cell(row: dict[str, Any], cell: Cell, out: Path, attack: Any) -> dict[str, Any]:
    """A finished cell's row after :func:`slimtune.runner.attack_run` (a no-op when its report
    already holds this attack); a failing attack is recorded in ``attack_error``, the cell stays ok."""
    from slimtune import runner

    try:
        return {**row, "report": runner.attack_run(cell_dir(out, cell), [attack])}
    except Exception as exc:  # e.g. a soft-prompt run refuses PGD: the other cells go on
        return {**row, "attack_error": _error_message(exc)}
    finally:
        gc.collect()


def expected_attack_keys(suite: Suite, out: Path, attack: Any = None) -> set[str]:
    """The attack keys a bench will have results for: those its cells' recipes measure, ``attack``'s
    (``--attack``) and those already in DIR/results.jsonl (for checking ``--plot-y`` up front)."""
    from slimtune.measure.robustness import attacked_accuracies, recipe_attack_keys

    keys = {attack.key} if attack is not None else set()
    for cell in suite.cells:
        try:
            keys.update(recipe_attack_keys(cell.recipe()))
        except SlimtuneError:  # the cell will fail with this message when it runs
            pass
    if (Path(out) / "results.jsonl").is_file():
        for row in read_results(out):
            keys.update(attacked_accuracies(row.get("report") or {}))
    return keys


def _describe(row: dict[str, Any]) -> str:
    if row["status"] == "failed":
        return f"{row['cell']}: FAILED: {row['error']}"
    rep = row["report"]
    metric = rep["task"]["primary_metric"]
    value = rep["metrics"].get(metric)
    shown = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else "no metric"
    from slimtune.measure.robustness import attacked_accuracies

    shown += "".join(f", under {key} {acc:.4f}" for key, acc in attacked_accuracies(rep).items())
    if row.get("attack_error"):
        shown += f", attack FAILED: {row['attack_error']}"
    return f"{row['cell']}: {shown} ({row['seconds']:.0f} s{', resumed' if row.get('resumed') else ''})"


def describe_cells(suite: Suite) -> list[str]:
    """One line per cell: id and overrides (for --dry-run)."""
    return [f"{c.id}: " + " ".join(f"{k}={json.dumps(v)}" for k, v in c.overrides) for c in suite.cells]


def read_results(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / "results.jsonl"
    if not path.is_file():
        raise SlimtuneError(f"{path}: not found; run `slimtune bench SUITE --out {out}` first")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SlimtuneError(f"{path}: line {i} is not JSON") from None
    return rows
