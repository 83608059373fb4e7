"""The Python API, for notebooks and scripts: what the CLI does, as functions.

    import slimtune
    delta = slimtune.attach(model, "lora", r=8)          # any registered method, on any HF model
    report = slimtune.fit({"model": "minilm-l2", "task": {"name": "movie-sentiment", "train_size": 200},
                             "method": "lora", "train": {"max_steps": 10}}, out="runs/demo")
    run = slimtune.load_run("runs/demo")                  # base + trained delta (run.model, run.delta, ...)
    slimtune.evaluate(run)                                # {"accuracy": ..., "macro_f1": ...}
    slimtune.export("runs/demo", "exports/demo", merge=True)
    model = slimtune.load_exported("exports/demo")

Heavy libraries are imported when a function runs, so ``import slimtune`` stays instant.
docs/api.md has a runnable walk-through (executed by a test).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from slimtune.methods.delta import Delta
    from slimtune.recipe import Recipe
    from slimtune.runner import Built


def attach(model: nn.Module, method: str | dict[str, Any] | list[Any], *, objective: str = "classification",
           train_pooler: bool = False, **fields: Any) -> Delta:
    """Attach a method (a registered name with its fields, a ``{name, ...}`` mapping, or a list of
    them to compose) to ``model`` in place; returns the :class:`~slimtune.methods.delta.Delta`:
    ``delta.trainable_parameters(model)`` is what to optimise, ``delta.state_dict(model)`` what to
    save, ``delta.merge(model)`` folds a linear update into the weights. Fields are validated as in
    a recipe (one-line errors); ``slimtune list methods`` lists them."""
    from slimtune.core.arch import Arch
    from slimtune.errors import SlimtuneError
    from slimtune.methods.delta import Delta
    from slimtune.recipe import parse_methods

    if fields and not isinstance(method, str):
        raise SlimtuneError("slimtune.attach: give fields either as keywords with a method name, or inside the method mapping")
    spec = {"name": method, **fields} if isinstance(method, str) else method
    delta = Delta.from_specs(parse_methods(spec, "slimtune.attach"), train_pooler=train_pooler)
    delta.attach(model, Arch.of(model, objective))
    return delta


def load_recipe(source: str | Path | dict[str, Any] | Recipe | None = None, overrides: list[str] | None = None) -> Recipe:
    """A validated recipe from a YAML path, a dict (the YAML's structure), a Recipe, or None (the
    default main job); ``overrides`` are ``--set`` assignments (``"train.lr=1e-4"``)."""
    from slimtune.recipe import Recipe, recipe_from_data
    from slimtune.recipe import load_recipe as load_recipe_file

    if isinstance(source, Recipe):
        source = source.to_dict()
    if isinstance(source, dict):
        return recipe_from_data(source, overrides, source="recipe dict")
    return load_recipe_file(source, overrides)


def fit(source: str | Path | dict[str, Any] | Recipe | None, out: str | Path, *, overrides: list[str] | None = None,
          resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a recipe into the run directory ``out`` (as ``slimtune train``); returns the report card
    (also written to ``out/report.json``)."""
    from slimtune.runner import train_run

    return train_run(load_recipe(source, overrides), Path(out), resume=resume, progress=progress)


def load_run(run_dir: str | Path, *, task: str | None = None, force: bool = False) -> Built:
    """A finished run rebuilt: ``.model`` (base + trained delta, attached), ``.delta``, ``.tokenizer``,
    ``.task``, ``.recipe``. ``force`` loads a delta trained on other base weights."""
    from slimtune.runner import load_run as _load_run

    return _load_run(run_dir, task=task, force=force)


def evaluate(run: str | Path | Built, split: str = "test") -> dict[str, float]:
    """Task metrics of a run (a run directory or a :func:`load_run` result) on one split."""
    from slimtune.measure.evaluate import evaluate_split

    return evaluate_split(load_run(run) if isinstance(run, (str, Path)) else run, split)


def export(run_dir: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """``slimtune export RUN --out OUT`` with options ``merge``, ``slim`` (e.g. ``"heads=0.5,ffn=0.5"``),
    ``int8``, ``bf16``, ``lora_rank``, ``measure``, ``threads``, ``force``; returns the export report."""
    from slimtune.runner import export_run

    return export_run(run_dir, out, **options)


def load_exported(directory: str | Path) -> nn.Module:
    """Load a ``slimtune export`` directory (merged, slimmed, int8 or bf16), in eval mode, ready for
    inference (its tokenizer: ``transformers.AutoTokenizer.from_pretrained(directory)``)."""
    from slimtune.compress.loader import load_exported as _load_exported

    return _load_exported(directory)


#: Liu et al. 2019's three trainings of one pruned structure: (model.init, train.budget).
STRUCTURE_VARIANTS = {"inherited": ("inherited", "steps"), "scratch-e": ("scratch", "steps"), "scratch-b": ("scratch", "scratch-b")}


def structure_variants(structure: str | Path, recipe: str | Path | dict[str, Any] | Recipe | None = None, *,
                       variants: tuple[str, ...] = tuple(STRUCTURE_VARIANTS), overrides: list[str] | None = None) -> dict[str, Recipe]:
    """The recipes that train the pruned architecture of the slim export ``structure`` three ways
    (Liu et al. 2019, docs/rethinking.md): ``inherited`` (its weights, fine-tuned: the control),
    ``scratch-e`` (re-initialised, the recipe's steps) and ``scratch-b`` (re-initialised, steps x
    FLOPs_dense / FLOPs_pruned). ``recipe``: the training recipe (path, dict or Recipe; default: the
    recipe of the run the export came from); its method should train every weight (``full``) for
    the scratch variants. Run each with :func:`fit`; report.json's ``structure`` section says what
    each did."""
    from slimtune.errors import SlimtuneError
    from slimtune.io import read_json

    unknown = [v for v in variants if v not in STRUCTURE_VARIANTS]
    if unknown:
        raise SlimtuneError(f"structure_variants: unknown variant '{unknown[0]}'; valid: {', '.join(STRUCTURE_VARIANTS)}")
    if recipe is None:
        record = Path(structure) / "slimtune_export.json"
        run_dir = (read_json(record).get("source") or {}).get("run_dir") if record.is_file() else None
        if not run_dir or not (Path(run_dir) / "recipe.yaml").is_file():
            raise SlimtuneError(f"structure_variants: {structure} names no run recipe to start from; pass recipe=")
        recipe = Path(run_dir) / "recipe.yaml"
    base = load_recipe(recipe).to_dict()
    out = {}
    for name in variants:
        init, budget = STRUCTURE_VARIANTS[name]
        data = {**base, "model": {**base["model"], "structure": str(structure), "init": init},
                "train": {**base["train"], "budget": budget, **({} if budget == "scratch-b" else {"budget_cap": None})}}
        out[name] = load_recipe(data, overrides)
    return out
