"""A run, end to end: recipe -> zoo -> methods -> trainer (+ hooks) -> measure -> run directory.

A run directory holds the resolved ``recipe.yaml``, the delta (``delta.safetensors`` +
``delta.json``), ``report.json`` and ``checkpoints/``. ``evaluate_run`` rebuilds base + delta from
it and re-evaluates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from slimtune.errors import SlimtuneError
from slimtune.measure.params import param_counts
from slimtune.io import atomic_write_text, read_json, write_json
from slimtune.methods.base import Arch
from slimtune.methods.delta import Delta, base_fingerprint, check_fingerprint, read_delta
from slimtune.recipe import Recipe, load_recipe
from slimtune.train.hooks import Hook
from slimtune.train.trainer import Trainer, TrainResult
from slimtune.zoo.heads import configure_pooling
from slimtune.zoo.images import is_image_task, load_image_processor
from slimtune.zoo.models import load_model, load_tokenizer
from slimtune.zoo.tasks import TaskData, load_task


@dataclass
class Built:
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    task: TaskData
    delta: Delta
    arch: Arch
    objective: str
    fingerprint: dict[str, str]
    hooks: list[Hook]
    base_params: int  # parameters of the model before the delta was attached (task head included)
    pooling: str  # what feeds the task head: "mean", "cls" or "none" (causal LM)


def resolve_objective(recipe: Recipe) -> str:
    return "classification" if recipe.task.objective == "auto" else recipe.task.objective


def build(recipe: Recipe, task_override: str | None = None) -> Built:
    """Load data and model, attach the delta (seeded, so the same recipe builds the same delta)."""
    set_seed(recipe.train.seed)
    spec = task_override or recipe.task.loader_spec()
    task = load_task(spec, split_seed=recipe.task.split_seed, train_size=recipe.task.train_size, eval_size=recipe.task.eval_size, seed=recipe.task.split_seed)
    objective = resolve_objective(recipe)
    model = load_model(recipe.model.name, objective=objective, num_labels=len(task.label_names))
    # An image task is fed by the model's image processor where a text task has its tokenizer.
    tokenizer = load_image_processor(recipe.model.name) if is_image_task(task) else load_tokenizer(recipe.model.name)
    fingerprint = base_fingerprint(recipe.model.name, model)
    base_params = param_counts(model)["total"]
    pooling = configure_pooling(model, recipe.head.pooling, objective)
    arch = Arch.of(model, objective)
    set_seed(recipe.train.seed)  # the delta's initialisation does not depend on how loading used the RNG
    specs = recipe.methods
    for section in recipe.features.values():  # a feature may reshape the methods (e.g. Large-Sparse widens them)
        adjust = getattr(section, "adjust_methods", None)
        specs = adjust(specs, model) if adjust is not None else specs
    delta = Delta.from_specs(specs, train_pooler=recipe.head.train_pooler and pooling == "cls")
    delta.attach(model, arch)
    hooks = delta.hooks()
    for section in recipe.features.values():
        build_hook = getattr(section, "build_hook", None)
        if build_hook is not None:
            hooks.append(build_hook(recipe=recipe, model=model, delta=delta, task=task))
    return Built(recipe, model, tokenizer, task, delta, arch, objective, fingerprint, hooks, base_params, pooling)


def warm_start(built: Built, run_dir: Path) -> None:
    """Load a finished run's delta and head into ``built`` (``train.init_from``); a checkpoint of a
    resumed run overrides it later."""
    where = f"train.init_from {run_dir}"
    if not (run_dir / "delta.json").is_file():
        raise SlimtuneError(f"{where}: no delta.json there; name the directory of a finished run")
    meta, state = read_delta(run_dir)
    check_fingerprint(meta, built.fingerprint, run_dir / "delta.json", remedy=f"{where} needs a run on the same base model")
    if meta.get("methods") != built.delta.config():
        raise SlimtuneError(f"{where}: trained methods {meta.get('methods')}, this recipe has {built.delta.config()}; a warm start needs the same methods")
    for name, tensor in built.delta.state_dict(built.model).items():
        if name in state and state[name].shape != tensor.shape:
            raise SlimtuneError(
                f"{where}: '{name}' has shape {tuple(state[name].shape)} there, this recipe needs {tuple(tensor.shape)} (another label count?)"
            )
    built.delta.load_state_dict(built.model, state)


def prepare_run_dir(out: Path, resume: bool) -> Path:
    if resume:
        if not out.is_dir():
            raise SlimtuneError(f"--resume {out}: run directory does not exist")
        return out
    if out.exists() and any(out.iterdir()):
        raise SlimtuneError(f"--out {out}: directory exists and is not empty; choose a new one or --resume it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train_run(recipe: Recipe, out: Path, *, resume: bool = False, progress: bool = True, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train, evaluate, measure; write the run directory; return the report."""
    from slimtune.measure.report import build_report

    accelerator = accelerator or Accelerator(cpu=True)
    out = Path(out)
    if accelerator.is_main_process:
        prepare_run_dir(out, resume)
        if resume and not (out / "recipe.yaml").is_file() and any(out.iterdir()):
            raise SlimtuneError(f"--resume {out}: not a slimtune run directory (no recipe.yaml)")
        if resume and (out / "recipe.yaml").is_file():
            saved = load_recipe(out / "recipe.yaml")
            if saved.to_dict() != recipe.to_dict():
                raise SlimtuneError(f"--resume {out}: the recipe differs from the run's recipe.yaml; resume with the same recipe")
        else:
            atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    built = build(recipe)
    if recipe.train.init_from is not None:
        warm_start(built, Path(recipe.train.init_from))
    trainer = Trainer(
        model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
        objective=built.objective, run_dir=out, hooks=built.hooks, accelerator=accelerator, progress=progress,
    )
    trainer.base_fingerprint = built.fingerprint
    result: TrainResult = trainer.fit(resume=resume)
    test_metrics = trainer.evaluate("test")
    validation_metrics = trainer.evaluate("validation") if len(built.task.splits["validation"]) else {}
    report: dict[str, Any] = {}
    if accelerator.is_main_process:
        stored_bytes = built.delta.save(out, built.model, built.fingerprint)
        report = build_report(built, trainer, result, test_metrics, validation_metrics, stored_bytes, wall_seconds=time.perf_counter() - started)
        write_json(out / "report.json", report)
    accelerator.wait_for_everyone()
    return report


def evaluate_run(run_dir: Path, *, task: str | None = None, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Rebuild base + delta from a run directory and evaluate on the test split."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlimtuneError(f"{run_dir}: run directory does not exist")
    recipe = load_recipe(run_dir / "recipe.yaml")
    meta, state = read_delta(run_dir)
    built = build(recipe, task_override=task)
    check_fingerprint(meta, built.fingerprint, run_dir / "delta.json", force=force)
    if meta.get("methods") != built.delta.config():
        raise SlimtuneError(f"{run_dir / 'delta.json'}: its methods differ from recipe.yaml's; the run directory was edited")
    built.delta.load_state_dict(built.model, state)
    trainer = Trainer(
        model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
        objective=built.objective, run_dir=None, hooks=[], progress=progress,
    )
    metrics = trainer.evaluate("test")
    report_path = run_dir / "report.json"
    saved = read_json(report_path) if report_path.is_file() else {}
    return {"run_dir": str(run_dir), "task": built.task.name, "n_test": len(built.task.splits["test"]), "metrics": metrics, "report_metrics": saved.get("metrics")}
