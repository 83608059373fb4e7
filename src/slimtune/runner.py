"""A run, end to end: recipe -> zoo -> methods -> trainer (+ hooks) -> measure -> run directory.

A run directory holds the resolved ``recipe.yaml``, the delta (``delta.safetensors`` +
``delta.json``), ``report.json`` and ``checkpoints/``. It is read back through one path:
:func:`read_run` (its files, no model) and :func:`load_run` (base + trained delta, checked
against the base it was trained on), used by ``eval``, ``export``, ``--lora-rank``, ``--peft``
and warm starts (``train.init_from``).
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
from slimtune.core.arch import Arch
from slimtune.core.features import AuxiliaryModel
from slimtune.methods.delta import Delta, base_fingerprint, check_fingerprint, read_delta
from slimtune.core.hooks import Hook
from slimtune.measure.evaluate import evaluate_split
from slimtune.recipe import Recipe, load_recipe
from slimtune.train.trainer import Trainer, TrainResult
from slimtune.zoo.heads import attach_task_heads, configure_pooling
from slimtune.zoo.images import is_image_task, load_image_processor
from slimtune.zoo.models import load_model, load_tokenizer
from slimtune.zoo.multitask import is_multitask
from slimtune.zoo.tasks import TaskData, load_task, relabel_task


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
    run_dir: Path | None = None  # the run whose trained delta is loaded (load_run), else None


@dataclass
class RunFiles:
    """A finished run's files, read without building a model."""

    dir: Path
    recipe: Recipe
    meta: dict[str, Any]  # delta.json
    state: dict[str, torch.Tensor]  # delta.safetensors


def recipe_task(recipe: Recipe, task_override: str | None = None) -> TaskData:
    """The recipe's task (or the zoo task ``task_override``) with the recipe's split and sizes;
    with several tasks (``task.tasks``) each with its own sizes (the section's by default),
    combined (:func:`slimtune.zoo.multitask.combine_tasks`)."""
    section = recipe.task
    if section.tasks is None or task_override is not None:
        spec = task_override or section.loader_spec()
        return load_task(spec, split_seed=section.split_seed, train_size=section.train_size, eval_size=section.eval_size, seed=section.split_seed)
    from slimtune.zoo.multitask import combine_tasks

    members = []
    for index, member in enumerate(section.tasks):
        try:
            data = load_task(member.loader_spec(), split_seed=member.split_seed, train_size=member.train_size or section.train_size,
                             eval_size=member.eval_size or section.eval_size, seed=member.split_seed)
        except SlimtuneError as error:
            raise SlimtuneError(f"task.tasks.{index}: {error}") from None
        data.name = member.member_name
        members.append(data)
    return combine_tasks(members, sampling=section.sampling, temperature=section.temperature)


def build(recipe: Recipe, task_override: str | None = None, *, task: TaskData | None = None) -> Built:
    """Load data and model, attach the delta (seeded, so the same recipe builds the same delta);
    ``task``: already loaded data to use instead."""
    set_seed(recipe.train.seed)
    task = task if task is not None else recipe_task(recipe, task_override)
    objective = recipe.objective
    structured = None
    if recipe.model.structure is not None or recipe.model.init != "inherited":
        # A pruned architecture (a slim export) and/or re-initialised weights: Liu et al. 2019's baselines.
        from slimtune.compress.structure import build_on_structure

        structured = build_on_structure(recipe.model.name, recipe.model.structure, recipe.model.init, objective=objective,
                                        labels=list(task.label_names), seed=recipe.train.seed, seq_len=recipe.train.max_length)
        model = structured.model
    else:
        model = load_model(recipe.model.name, objective=objective, num_labels=len(task.label_names))
    # An image task is fed by the model's image processor where a text task has its tokenizer.
    tokenizer = load_image_processor(recipe.model.name) if is_image_task(task) else load_tokenizer(recipe.model.name)
    fingerprint = base_fingerprint(recipe.model.name, model)
    base_params = param_counts(model)["total"]
    pooling = configure_pooling(model, recipe.head.pooling, objective)
    if is_multitask(task):  # one head per task, each batch routed by its task_ids
        attach_task_heads(model, [m.name for m in task.members], [m.num_labels for m in task.members])
    if structured is not None:
        structured.check_pooling(pooling)
    arch = Arch.of(model, objective)
    set_seed(recipe.train.seed)  # the delta's initialisation does not depend on how loading used the RNG
    specs = recipe.methods
    for feature in recipe.features.values():  # a feature may reshape the methods (e.g. Large-Sparse widens them)
        specs = feature.adjust_methods(specs, model)
    delta = Delta.from_specs(specs, train_pooler=recipe.head.train_pooler and pooling == "cls")
    delta.attach(model, arch)
    hooks = delta.hooks()
    if structured is not None:
        structured.check_delta(model, delta)
        hooks.append(structured.hook(recipe.train.budget, recipe.train.budget_cap))
    for feature in sorted(recipe.features.values(), key=lambda f: f.section):  # the same refusal whatever the import order
        feature.check_methods(delta)
    for feature in recipe.features.values():
        models = {name: load_auxiliary(source, tokenizer, objective, len(task.label_names), where=f"{feature.section}.{name}")
                  for name, source in feature.auxiliary_models().items()}
        hook = feature.build_hook(recipe=recipe, model=model, delta=delta, task=task, models=models)
        if hook is not None:
            hooks.append(hook)
    return Built(recipe, model, tokenizer, task, delta, arch, objective, fingerprint, hooks, base_params, pooling)


def load_auxiliary(source: str, tokenizer: Any, objective: str, num_labels: int, *, where: str) -> AuxiliaryModel:
    """A model a feature runs beside the trained one (``Feature.auxiliary_models``), frozen in eval
    mode: a run directory (its trained delta attached), a ``slimtune export`` directory, or a zoo
    model name / model directory (no trained task head). Refused (one line, prefixed ``where``)
    when its tokenizer is not the run's: the two models must read the same token ids. The global
    random state is left as it was, so a run builds the same with or without it."""
    import random

    import numpy as np

    from slimtune.compress.loader import load_exported

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    path = Path(source)
    valid = ""
    try:
        if (path / "slimtune_export.json").is_file():
            model, kind = load_exported(path), "export"
            labels, its_tokenizer = model.slimtune_export.get("labels"), load_tokenizer(path)
        elif (path / "recipe.yaml").is_file():
            built = load_run(path)
            model, kind, labels, its_tokenizer = built.model, "run", _run_labels(read_run(path)), built.tokenizer
        else:
            valid = " (a run directory, a `slimtune export` directory, a zoo model name or a model directory)"
            model, kind, labels = load_model(source, objective=objective, num_labels=num_labels), "model", None
            its_tokenizer = load_tokenizer(source)
    except SlimtuneError as error:
        raise SlimtuneError(f"{where} {source}: {error}{valid}") from None
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    if its_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SlimtuneError(f"{where} {source}: its tokenizer is not the run's ({len(its_tokenizer)} vs {len(tokenizer)} tokens, "
                            "or the same size with other ids); both models must read the same token ids")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return AuxiliaryModel(model.eval(), kind, [str(x) for x in labels] if labels is not None else None)


def read_run(run_dir: str | Path, *, what: str | None = None) -> RunFiles:
    """A run directory's recipe and delta; one-line errors name ``what`` (default: the directory)."""
    run_dir = Path(run_dir)
    where = what or str(run_dir)
    if not run_dir.is_dir():
        raise SlimtuneError(f"{where}: run directory does not exist")
    if not (run_dir / "delta.json").is_file():
        raise SlimtuneError(f"{where}: no delta.json there; name the directory of a finished run")
    meta, state = read_delta(run_dir)
    return RunFiles(run_dir, load_recipe(run_dir / "recipe.yaml"), meta, state)


def load_delta_into(built: Built, files: RunFiles, *, force: bool = False, where: str | None = None, remedy: str | None = None,
                    same_methods: str = "recipe.yaml was edited after training", check_shapes: bool = False) -> None:
    """Load a run's trained delta (and head) into ``built``: refused (one line) when it was trained
    on another base model (unless ``force``) or with other methods; ``check_shapes``: also when a
    tensor's shape differs (a warm start; a run's own delta may reshape the model as it loads,
    e.g. DSEE's stage 2 replayed)."""
    where = where or str(files.dir / "delta.json")
    check_fingerprint(files.meta, built.fingerprint, files.dir / "delta.json", force=force, **({"remedy": remedy} if remedy else {}))
    if not built.delta.trained_with(files.meta.get("methods")):
        raise SlimtuneError(f"{where}: trained methods {files.meta.get('methods')}, this recipe has {built.delta.config()}; {same_methods}")
    for name, tensor in (built.delta.state_dict(built.model) if check_shapes else {}).items():
        if name in files.state and files.state[name].shape != tensor.shape:
            raise SlimtuneError(
                f"{where}: '{name}' has shape {tuple(files.state[name].shape)} there, this recipe needs {tuple(tensor.shape)} (another label count?)"
            )
    built.delta.load_state_dict(built.model, files.state)


def _run_labels(files: RunFiles) -> list[str]:
    """The label names the run was trained on: report.json's, else its recipe's task reloaded."""
    report_path = files.dir / "report.json"
    labels = (read_json(report_path).get("task") or {}).get("labels") if report_path.is_file() else None
    if isinstance(labels, list):
        return [str(label) for label in labels]
    return list(recipe_task(files.recipe).label_names)


def _shown(labels: list[str], limit: int = 10) -> str:
    return ", ".join(labels[:limit]) + (f", ... ({len(labels)} in all)" if len(labels) > limit else "")


def match_labels(data: TaskData, files: RunFiles, task: str | None, label_map: dict[str, str] | None) -> TaskData:
    """``data`` in the run's label ids, or refused (one line) when its labels are not the run's:
    another count, or other names unless ``label_map`` (task label -> run label) says which is
    which; the same names in another order are renumbered to the run's order."""
    if files.recipe.objective != "classification":
        return data  # a causal LM is scored by next-token loss; labels play no part
    run_labels, labels = _run_labels(files), list(data.label_names)
    which = f"--task {task}" if task else f"the run's task ({data.name})"
    if len(labels) != len(run_labels):
        raise SlimtuneError(
            f"{which} has {len(labels)} labels ({_shown(labels)}), the run {files.dir} was trained on "
            f"{len(run_labels)} ({_shown(run_labels)}); evaluate on a task with the same labels"
        )
    mapping = {name: name for name in labels if name in run_labels}
    for name, target in (label_map or {}).items():
        if name not in labels:
            raise SlimtuneError(f"--label-map {name}={target}: '{name}' is not a label of {which}; its labels: {_shown(labels)}")
        if target not in run_labels:
            raise SlimtuneError(f"--label-map {name}={target}: '{target}' is not a label of the run; its labels: {_shown(run_labels)}")
        mapping[name] = target
    unmapped = [name for name in labels if name not in mapping]
    if unmapped:
        pairs = ",".join(f"{name}=RUN_LABEL" for name in unmapped)
        raise SlimtuneError(
            f"{which} has labels {_shown(labels)}, the run {files.dir} was trained on {_shown(run_labels)}; "
            f"the scores would mean nothing: if they correspond, say how with --label-map {pairs}"
        )
    targets = [mapping[name] for name in labels]
    if len(set(targets)) != len(targets):
        twice = next(target for target in targets if targets.count(target) > 1)
        sources = [name for name in labels if mapping[name] == twice]
        raise SlimtuneError(f"--label-map: labels {', '.join(sources)} all map to the run's '{twice}'; each run label takes one")
    if labels != run_labels or targets != labels:
        return relabel_task(data, run_labels, mapping)
    return data


def load_run(run_dir: str | Path, *, task: str | None = None, force: bool = False,
             label_map: dict[str, str] | None = None) -> Built:
    """Rebuild a finished run: its recipe's base model and delta, with the trained delta loaded
    (attached, not merged). ``task`` evaluates on another zoo task (refused unless its labels are
    the run's, or ``label_map`` maps its label names to the run's); ``force`` loads a delta
    whose base model's weights differ from the ones here."""
    files = read_run(run_dir)
    data = None
    if files.recipe.task.tasks is not None and (task is not None or label_map):
        raise SlimtuneError(f"{files.dir}: a multi-task run is evaluated on its own tasks "
                            f"({', '.join(m.member_name for m in files.recipe.task.tasks)}); drop --task / --label-map")
    if task is not None or label_map:  # checked before the model is built with the task's label count
        data = match_labels(recipe_task(files.recipe, task), files, task, label_map)
    built = build(files.recipe, task_override=task, task=data)
    load_delta_into(built, files, force=force)
    built.run_dir = files.dir
    return built


def warm_start(built: Built, run_dir: Path) -> None:
    """Load a finished run's delta and head into ``built`` (``train.init_from``); a checkpoint of a
    resumed run overrides it later."""
    where = f"train.init_from {run_dir}"
    files = read_run(run_dir, what=where)
    load_delta_into(built, files, where=where, remedy=f"{where} needs a run on the same base model",
                    same_methods="a warm start needs the same methods", check_shapes=True)


def prepare_run_dir(out: Path, resume: bool) -> list[Path]:
    """Check (and create) the run directory; return the directories created here, deepest first."""
    if resume:
        if not out.is_dir():
            raise SlimtuneError(f"--resume {out}: run directory does not exist")
        return []
    if out.exists() and any(out.iterdir()):
        raise SlimtuneError(f"--out {out}: directory exists and is not empty; choose a new one or --resume it")
    created = []
    missing = out
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def _remove_refused_run_dir(out: Path, created: list[Path]) -> None:
    """A new run that failed before it wrote anything but its recipe.yaml (a refused method and
    feature combination, a bad target, a NaN on the first step) leaves nothing behind: the
    recipe.yaml goes, and so do the directories it created, if empty. Anything else found there
    is kept; a directory that existed before stays."""
    try:
        if [p.name for p in out.iterdir()] != ["recipe.yaml"]:
            return
        (out / "recipe.yaml").unlink()
        for directory in created:
            directory.rmdir()  # only ever removes an empty directory
    except OSError:
        pass


def train_run(recipe: Recipe, out: Path, *, resume: bool = False, progress: bool = True, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train, evaluate, measure; write the run directory; return the report."""
    from slimtune.measure.report import build_report

    accelerator = accelerator or Accelerator(cpu=True)
    out = Path(out)
    created: list[Path] = []
    if accelerator.is_main_process:
        created = prepare_run_dir(out, resume)
        if resume and not (out / "recipe.yaml").is_file() and any(out.iterdir()):
            raise SlimtuneError(f"--resume {out}: not a slimtune run directory (no recipe.yaml)")
        if resume and (out / "recipe.yaml").is_file():
            saved = load_recipe(out / "recipe.yaml")
            if saved.to_dict() != recipe.to_dict():
                raise SlimtuneError(f"--resume {out}: the recipe differs from the run's recipe.yaml; resume with the same recipe")
        else:
            atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    accelerator.wait_for_everyone()
    try:
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
    except Exception:  # not KeyboardInterrupt: an interrupted run keeps its directory to --resume
        if accelerator.is_main_process and not resume:
            _remove_refused_run_dir(out, created)
        raise
    accelerator.wait_for_everyone()
    return report


def evaluate_run(run_dir: Path, *, task: str | None = None, force: bool = False, progress: bool = False,
                 label_map: dict[str, str] | None = None, attack: Any = None, save: bool = True) -> dict[str, Any]:
    """Rebuild base + delta from a run directory and evaluate on the test split (of ``task``, a zoo
    task with the run's labels or mapped onto them by ``label_map``); with ``attack`` (a
    :class:`slimtune.measure.attacks.AttackConfig`) also its clean and attacked accuracy, which
    (``save``) is merged into the run's report.json (section ``robustness``) when it was measured
    on the run's own task and base model; ``saved`` says where, or why not."""
    if attack is not None:
        attack.check()
    built = load_run(run_dir, task=task, force=force, label_map=label_map)
    metrics = evaluate_split(built, "test")
    report_path = Path(run_dir) / "report.json"
    saved = read_json(report_path) if report_path.is_file() else {}
    extra: dict[str, Any] = {}
    if attack is not None:
        extra["attack"] = attack_built(built, attack)
        if save:
            extra["saved"] = _save_attacks(report_path, [extra["attack"]], why_not=(
                "--task evaluates another task" if task is not None else "--label-map relabels the task" if label_map
                else "--force loaded the delta on another base model" if force else None))
    return {"run_dir": str(run_dir), "task": built.task.name, "n_test": len(built.task.splits["test"]), "metrics": metrics,
            "report_metrics": saved.get("metrics"), **({"label_map": label_map} if label_map else {}), **extra}


def _save_attacks(report_path: Path, entries: list[dict[str, Any]], why_not: str | None = None) -> str:
    """Merge attack results into a run's report.json (:func:`slimtune.measure.robustness.merge_attacks`);
    returns what was done, for the user."""
    from slimtune.measure.robustness import merge_attacks

    if why_not is None and not report_path.is_file():
        why_not = "the run has no report.json"
    if why_not is not None:
        return f"not saved to {report_path}: {why_not}"
    report = read_json(report_path)
    report["robustness"] = merge_attacks(report.get("robustness"), entries)
    write_json(report_path, report)
    return f"saved to {report_path} (robustness)"


def attack_built(built: Built, attack: Any) -> dict[str, Any]:
    """:func:`slimtune.measure.attacks.attack_task` on the test split of a built run."""
    from slimtune.measure.attacks import attack_task

    recipe = built.recipe
    return attack_task(built.model, built.tokenizer, built.task, attack.check(), objective=built.objective,
                       max_length=recipe.train.max_length, batch_size=recipe.train.eval_batch_size)


def attack_run(run_dir: str | Path, attacks: list[Any]) -> dict[str, Any]:
    """The attacks (:class:`slimtune.measure.attacks.AttackConfig`) a finished run's report.json
    does not hold yet, run on its test split and merged into it; returns the report (as on
    disk). Used by ``slimtune bench --attack``."""
    report_path = Path(run_dir) / "report.json"
    if not report_path.is_file():
        raise SlimtuneError(f"{run_dir}: no report.json there; the run has not finished")
    from slimtune.measure.robustness import attacked_accuracies

    done = attacked_accuracies(read_json(report_path))
    todo = [a.check() for a in attacks if a.key not in done]
    if todo:
        built = load_run(run_dir)
        _save_attacks(report_path, [attack_built(built, a) for a in todo])
    return read_json(report_path)


def export_run(run_dir: str | Path, out: str | Path, *, force: bool = False, **options: Any) -> dict[str, Any]:
    """``slimtune export RUN --out DIR ...``: :func:`slimtune.compress.export.export_model` of the
    loaded run (options checked before the run is loaded); returns the export report."""
    from slimtune.compress.export import check_export_request, export_model

    options = check_export_request(Path(out), **options)
    return export_model(load_run(run_dir, force=force), Path(out), **options)


def export_lora_rank(run_dir: str | Path, out: str | Path, rank: int | float, *, measure: bool = True, force: bool = False) -> dict[str, Any]:
    """``slimtune export RUN --out DIR --lora-rank K``: a run directory with the LoRA delta truncated."""
    from slimtune.compress.export import check_out
    from slimtune.compress.lora_rank import truncate_run_lora

    check_out(Path(out))
    return truncate_run_lora(load_run(run_dir, force=force), Path(out), rank, measure=measure)


def export_peft(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """``slimtune export RUN --peft OUT``: the run's LoRA delta as a peft adapter."""
    from slimtune.compress.peft_export import check_peft_out, peft_adapter

    check_peft_out(Path(out))
    return peft_adapter(read_run(run_dir), Path(out))
