"""Image-classification tasks -> fixed train/validation/test splits under an evaluation protocol.

The data comes from :mod:`slimtune.zoo.image_sources` (registered tasks: fashion-mnist, mnist-5k,
digits; user image folders); the image processor that turns splits into the ``pixel_values`` a
vision model was trained on is in :mod:`slimtune.zoo.image_processing`. Both modules' public names
are re-exported here, so ``from slimtune.zoo.images import ImageProcessor, IMAGE_TASKS`` works.

Protocols (task options, deterministic; the sample depends only on ``seed``, never on the
training seed):

* ``protocol: vtab-1k`` (Zhai et al. 2019): 1,000 training examples drawn stratified from the
  training pool (train + validation), split 800 train / 200 validation (the validation split is
  for choosing hyper-parameters); the test split is the task's full test set.
* ``shots: k`` (k-shot): k training examples per class and, disjoint from them, k validation
  examples per class, both from the training pool; the full test set.

Splits are held as :class:`ImageSplit` (uint8 arrays + int labels), not HF datasets: turning
60,000 images into Arrow rows and back would cost more than the training of a VTAB-1k run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.image_processing import ImageProcessor, ImageRows, load_image_processor
from slimtune.zoo.image_sources import (
    DIGIT_LABELS,
    FASHION_LABELS,
    FASHION_MNIST_DIR,
    IMAGE_SUFFIXES,
    IMAGE_TASKS,
    ImageSplit,
    ImageTaskSpec,
    is_image_task_installed,
    read_digits,
    read_fashion_mnist,
    read_folder,
    read_mnist_5k,
    registered_pool,
)
from slimtune.zoo.splits import held_out_size, stratified_split, stratified_subset
from slimtune.zoo.tasks import SPLITS, TaskData

__all__ = [
    "DIGIT_LABELS",
    "FASHION_LABELS",
    "FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES",
    "IMAGE_TASKS",
    "ImageProcessor",
    "ImageRows",
    "ImageSplit",
    "ImageTaskData",
    "ImageTaskSpec",
    "PROTOCOLS",
    "SHOTS",
    "is_image_spec",
    "is_image_task",
    "list_image_tasks",
    "load_image_processor",
    "load_image_task",
    "read_digits",
    "read_fashion_mnist",
    "read_mnist_5k",
]

PROTOCOLS = ("vtab-1k",)
SHOTS = (1, 2, 4, 8, 16)
VTAB_TRAIN, VTAB_VALIDATION = 800, 200


@dataclass
class ImageTaskData(TaskData):
    """A :class:`TaskData` whose splits are :class:`ImageSplit` (the trainer feeds ``pixel_values``)."""

    modality: str = field(default="image")


# ----------------------------------------------------------------------------- protocols


def _per_class_sample(labels: np.ndarray, per_class: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``per_class`` positions of each class (seeded), skipping ``exclude``; fails if a class has too few."""
    random = np.random.RandomState(seed)
    chosen = []
    excluded = set() if exclude is None else set(exclude.tolist())
    for label in np.unique(labels):
        rows = [r for r in random.permutation(np.flatnonzero(labels == label)) if r not in excluded]
        if len(rows) < per_class:
            raise SlimtuneError(f"task.shots: class {label} has only {len(rows)} examples left in the training pool; lower task.shots")
        chosen += rows[:per_class]
    return random.permutation(np.asarray(chosen, dtype=np.int64))


def _check_protocol(protocol: str | None, shots: int | None) -> None:
    if protocol is not None and protocol not in PROTOCOLS:
        raise SlimtuneError(f"task.protocol: unknown protocol '{protocol}'{did_you_mean(protocol, PROTOCOLS)} (valid: {', '.join(PROTOCOLS)})")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise SlimtuneError(f"task.shots: must be a positive integer (the usual: {', '.join(map(str, SHOTS))}), got {shots!r}")
    if protocol is not None and shots is not None:
        raise SlimtuneError("task: give either protocol (vtab-1k) or shots (k per class), not both")


def _split_pool(pool: ImageSplit, test: ImageSplit, *, protocol: str | None, shots: int | None, seed: int, split_seed: int) -> tuple[dict[str, ImageSplit], str]:
    if protocol == "vtab-1k":
        chosen = stratified_subset(pool.labels, VTAB_TRAIN + VTAB_VALIDATION, seed)
        if len(chosen) < VTAB_TRAIN + VTAB_VALIDATION:
            raise SlimtuneError(f"task.protocol: vtab-1k needs 1,000 training examples; this task's pool has {len(pool)}")
        subset = pool.take(chosen)
        train, (validation,) = stratified_split(subset.labels, [VTAB_VALIDATION], seed)
        policy = f"VTAB-1k: 1,000 stratified examples of the training pool (seed {seed}), 800 train / 200 validation; full test set"
        return {"train": subset.take(train), "validation": subset.take(validation), "test": test}, policy
    if shots is not None:
        train = _per_class_sample(pool.labels, shots, seed)
        validation = _per_class_sample(pool.labels, shots, seed + 1_000_003, exclude=train)
        policy = f"{shots}-shot: {shots} train and {shots} disjoint validation examples per class from the training pool (seed {seed}); full test set"
        return {"train": pool.take(train), "validation": pool.take(validation), "test": test}, policy
    kept, (validation,) = stratified_split(pool.labels, [held_out_size(len(pool))], split_seed)
    policy = f"validation = stratified 10% of the training pool (split_seed={split_seed})"
    return {"train": pool.take(kept), "validation": pool.take(validation), "test": test}, policy


# ----------------------------------------------------------------------------- loading


def is_image_task(task: Any) -> bool:
    """Whether loaded task data holds images (its batches are ``pixel_values``)."""
    return getattr(task, "modality", "text") == "image"


def is_image_spec(spec: Any) -> bool:
    """Whether a task spec (a name or a dict) names an image task."""
    if isinstance(spec, str):
        return spec in IMAGE_TASKS
    if isinstance(spec, Mapping):
        return "images" in spec or spec.get("name") in IMAGE_TASKS
    return False


def load_image_task(
    spec: str | Mapping[str, Any],
    *,
    split_seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
) -> ImageTaskData:
    """Load an image task: a registered name, or ``{name|images, protocol?, shots?, seed?}``.

    ``train_size``/``eval_size`` take stratified subsets (seeded by ``split_seed``) after the
    protocol, as for text tasks.
    """
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    unknown = set(options) - {"name", "images", "protocol", "shots", "seed"}
    if unknown:
        raise SlimtuneError(f"task: unknown image-task option(s) {sorted(unknown)} (valid: name or images, protocol, shots, seed)")
    protocol, shots, seed = options.get("protocol"), options.get("shots"), options.get("seed") or 0
    _check_protocol(protocol, shots)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SlimtuneError(f"task.seed: must be a non-negative integer, got {seed!r}")
    if options.get("images") is not None:
        everything, label_names = read_folder(str(options["images"]))
        name, metric = f"images:{Path(str(options['images'])).name}", "accuracy"
        source, license_ = f"user image folder {Path(str(options['images'])).expanduser().resolve()}", "user data"
        pool_positions, (test_positions,) = stratified_split(everything.labels, [held_out_size(len(everything))], split_seed)
        pool, test = everything.take(pool_positions), everything.take(test_positions)
        base_policy = f"stratified 10% of the images as the test set (split_seed={split_seed})"
    else:
        name = options.get("name")
        if name not in IMAGE_TASKS:
            raise SlimtuneError(f"unknown image task '{name}'{did_you_mean(str(name), IMAGE_TASKS)}")
        task_spec = IMAGE_TASKS[name]
        label_names, metric, source, license_ = list(task_spec.label_names), task_spec.metric, task_spec.source, task_spec.license
        pool, test, base_policy = registered_pool(name)
    splits, policy = _split_pool(pool, test, protocol=protocol, shots=shots, seed=seed, split_seed=split_seed)
    for split, limit in (("train", train_size), ("validation", eval_size), ("test", eval_size)):
        if limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].take(stratified_subset(splits[split].labels, limit, split_seed))
    if train_size is not None or eval_size is not None:
        policy += f"; then stratified subsets (seed {split_seed}): train_size={train_size}, eval_size={eval_size}"
    if protocol:
        name = f"{name}/{protocol}"
    elif shots:
        name = f"{name}/{shots}-shot"
    return ImageTaskData(
        name=name,
        splits={split: splits[split] for split in SPLITS},  # type: ignore[arg-type]
        label_names=list(label_names),
        metric=metric,
        source=source,
        split_policy=f"{base_policy}; {policy}",
        filtering=f"license: {license_}",
    )


def list_image_tasks() -> list[dict[str, Any]]:
    return [
        {"name": s.name, "n_labels": s.n_labels, "metric": s.metric, "installed": is_image_task_installed(s.name), "description": s.description}
        for s in IMAGE_TASKS.values()
    ]

