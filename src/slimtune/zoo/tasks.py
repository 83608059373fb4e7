"""Named real text-classification tasks -> fixed train/validation/test splits and a metric.

The registered tasks, their files and cleaning are in :mod:`slimtune.zoo.text_sources`; the
seeded stratified splitting in :mod:`slimtune.zoo.splits` (both modules' public names are
re-exported here). This module turns cleaned rows into a :class:`TaskData` and scores
predictions; user files (``zoo.files``) and image tasks (``zoo.images``) end in the same type.

Splits are fixed: they depend only on ``split_seed`` (0 by default), never on the training
seed. With an official test split, validation is a stratified 10% of the official train split;
otherwise the rows are split 80/10/10, stratified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.splits import (
    HELD_OUT_FRACTION,
    OFFICIAL_TEST_POLICY,
    POOL_POLICY,
    carve_validation,
    held_out_size,
    split_pool,
    stratified_split,
    stratified_subset,
)
from slimtune.zoo.text_sources import METRICS, TASKS, Metric, TaskSpec, clean_source, is_task_installed

if TYPE_CHECKING:  # datasets is imported lazily: listing tasks must stay cheap
    from datasets import Dataset, DatasetDict

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "HELD_OUT_FRACTION",
    "METRICS",
    "Metric",
    "OFFICIAL_TEST_POLICY",
    "POOL_POLICY",
    "SPLITS",
    "TASKS",
    "SplitFrames",
    "TaskData",
    "TaskSpec",
    "carve_validation",
    "check_task_name",
    "compute_metrics",
    "finish_task",
    "held_out_size",
    "list_tasks",
    "load_task",
    "relabel_task",
    "split_pool",
    "stratified_split",
    "stratified_subset",
]

SPLITS: tuple[str, str, str] = ("train", "validation", "test")
DEFAULT_SPLIT_SEED = 0


@dataclass
class TaskData:
    """A task ready to train on: three splits, label names and how they were made."""

    name: str
    splits: DatasetDict  # "train", "validation", "test"; text [, text_pair], label (ClassLabel)
    label_names: list[str]
    metric: str  # the primary metric: "accuracy" or "macro_f1"
    source: str  # where the data came from
    split_policy: str  # how the splits were made
    filtering: str = ""  # what was dropped from the source, with counts

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class SplitFrames:
    """Cleaned, split rows before subsetting: each frame has text [, text_pair], label (int id)."""

    name: str
    frames: dict[str, pd.DataFrame]
    label_names: list[str]
    metric: str
    source: str
    split_policy: str
    filtering: str = ""


# ----------------------------------------------------------------------------- loading


def _check_size(value: int | None, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimtuneError(f"{what} must be a positive integer or None, got {value!r}")


def _registered_split_frames(name: str, split_seed: int) -> SplitFrames:
    spec = TASKS[name]
    frames, filtering = clean_source(name)
    if "all" in frames:
        splits = split_pool(frames["all"], split_seed)
        policy = POOL_POLICY.format(seed=split_seed)
    else:
        splits = carve_validation(frames["train"], frames["test"], split_seed)
        policy = OFFICIAL_TEST_POLICY.format(seed=split_seed)
    return SplitFrames(
        name=name,
        frames=splits,
        label_names=list(spec.label_names),
        metric=spec.metric,
        source=spec.source,
        split_policy=policy,
        filtering=filtering,
    )


def _to_dataset(frame: pd.DataFrame, label_names: Sequence[str]) -> Dataset:
    from datasets import ClassLabel, Dataset, Features, Value

    columns = ["text", "text_pair", "label"] if "text_pair" in frame else ["text", "label"]
    features = Features(
        {
            column: ClassLabel(names=list(label_names)) if column == "label" else Value("string")
            for column in columns
        }
    )
    data = {column: frame[column].tolist() for column in columns}
    return Dataset.from_dict(data, features=features)


def finish_task(
    prepared: SplitFrames,
    *,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Subset split frames (seeded, stratified) and turn them into a :class:`TaskData`."""
    from datasets import DatasetDict

    _check_size(train_size, "train_size")
    _check_size(eval_size, "eval_size")
    frames = dict(prepared.frames)
    policy = prepared.split_policy
    limits = {"train": train_size, "validation": eval_size, "test": eval_size}
    for split, limit in limits.items():
        if limit is not None and limit < len(frames[split]):
            chosen = stratified_subset(frames[split]["label"].to_numpy(), limit, seed)
            frames[split] = frames[split].iloc[chosen].reset_index(drop=True)
    if train_size is not None or eval_size is not None:
        policy += (
            f"; then a stratified subset by seed={seed}: train_size={train_size}, "
            f"eval_size={eval_size} (sizes above a split's rows keep the whole split)"
        )
    splits = DatasetDict(
        {split: _to_dataset(frames[split], prepared.label_names) for split in SPLITS}
    )
    return TaskData(
        name=prepared.name,
        splits=splits,
        label_names=list(prepared.label_names),
        metric=prepared.metric,
        source=prepared.source,
        split_policy=policy,
        filtering=prepared.filtering,
    )


def check_task_name(spec: Any) -> None:
    """Fail on a task name that is neither a registered text task nor an image task (cheap: the
    CLI calls it before importing the trainer; dicts and files are checked when read)."""
    from slimtune.zoo.corpus import CORPUS_TASK

    if isinstance(spec, str) and spec not in TASKS and spec != CORPUS_TASK:
        from slimtune.zoo.images import is_image_spec

        if not is_image_spec(spec):
            raise SlimtuneError(
                f"unknown task '{spec}'{did_you_mean(spec, TASKS)} (or give a dict with "
                "file/text/label for your own data)"
            )


def load_task(
    spec: str | Mapping[str, Any],
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a registered task by name, or user files given as a dict (see ``zoo.files``).

    ``split_seed`` fixes the train/validation/test split (keep the default 0 to compare runs);
    ``train_size`` keeps a stratified subset of that many training rows and ``eval_size`` caps
    validation and test at that many rows each, both drawn with ``seed``. Sizes larger than a
    split keep the whole split.
    """
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise SlimtuneError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    from slimtune.zoo.images import is_image_spec, load_image_task

    if is_image_spec(spec):  # image tasks and folders: see zoo.images
        return load_image_task(spec, split_seed=split_seed, train_size=train_size, eval_size=eval_size)
    from slimtune.zoo.corpus import CORPUS_TASK, load_corpus_task

    if spec == CORPUS_TASK:  # unlabelled text of every installed task (its own fixed split)
        _check_size(train_size, "train_size")
        _check_size(eval_size, "eval_size")
        return load_corpus_task(train_size=train_size, eval_size=eval_size, seed=seed)
    if isinstance(spec, Mapping):
        from slimtune.zoo.files import read_user_splits

        prepared = read_user_splits(spec, split_seed=split_seed)
    elif isinstance(spec, str):
        check_task_name(spec)
        prepared = _registered_split_frames(spec, split_seed)
    else:
        raise SlimtuneError(
            f"a task is a registered name or a dict describing a file, got {type(spec).__name__}"
        )
    return finish_task(prepared, train_size=train_size, eval_size=eval_size, seed=seed)


def relabel_task(task: TaskData, label_names: Sequence[str], mapping: Mapping[str, str]) -> TaskData:
    """``task`` with its labels renamed by ``mapping`` (each of its label names -> one of
    ``label_names``, a bijection the caller has checked) and renumbered in ``label_names``' order,
    so a model trained on ``label_names`` is scored on it by id."""
    from datasets import ClassLabel

    new_id = [list(label_names).index(mapping[name]) for name in task.label_names]
    features = task.splits["train"].features.copy()
    features["label"] = ClassLabel(names=list(label_names))
    splits = task.splits.map(  # reads the label column only (image columns stay undecoded)
        lambda labels: {"label": [new_id[label] for label in labels]},
        input_columns="label",
        batched=True,
        features=features,
    )
    renamed = ", ".join(f"{old}={new}" for old, new in mapping.items() if old != new)
    return TaskData(
        name=task.name,
        splits=splits,
        label_names=list(label_names),
        metric=task.metric,
        source=task.source,
        split_policy=task.split_policy + (f"; labels mapped {renamed}" if renamed else ""),
        filtering=task.filtering,
    )


# ----------------------------------------------------------------------------- scoring


def compute_metrics(predictions: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 of predicted class ids (or logits, argmax-ed) against labels.

    Macro F1 averages over the classes present in the labels or the predictions, so a small
    evaluation subset that lacks a class is not penalised for it.
    """
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.asarray(predictions)
    if predicted.ndim == 2:
        predicted = predicted.argmax(axis=-1)
    predicted = predicted.reshape(-1).astype(np.int64)
    expected = np.asarray(labels).reshape(-1).astype(np.int64)
    if predicted.shape != expected.shape:
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} labels")
    if expected.size == 0:
        raise ValueError("no labels to score")
    for what, values in (("predictions", predicted), ("labels", expected)):
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(f"{what} must be class ids in 0..{num_labels - 1}")
    return {
        "accuracy": float(accuracy_score(expected, predicted)),
        "macro_f1": float(f1_score(expected, predicted, average="macro", zero_division=0)),
    }


# ----------------------------------------------------------------------------- listing


def list_tasks() -> list[dict[str, Any]]:
    """One row per registered task: name, n_labels, metric, installed, description."""
    return [
        {
            "name": spec.name,
            "n_labels": spec.n_labels,
            "metric": spec.metric,
            "installed": is_task_installed(spec),
            "description": spec.description,
        }
        for spec in TASKS.values()
    ]
