"""Image tasks: counts and label sets, protocols (VTAB-1k, k-shot), user folders, the processor."""

import json

import numpy as np
import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.recipe import load_recipe
from slimtune.zoo.images import IMAGE_TASKS, ImageProcessor, ImageSplit, _per_class_sample, load_image_task
from slimtune.zoo.images import list_image_tasks
from slimtune.zoo.tasks import load_task
from tests.fixtures import write_folder

DIGITS = [str(d) for d in range(10)]


@pytest.mark.parametrize(
    "name,sizes,labels",
    [
        ("fashion-mnist", (54000, 6000, 10000), IMAGE_TASKS["fashion-mnist"].label_names),
        ("mnist-5k", (3600, 400, 1000), DIGITS),
        ("digits", (900, 100, 797), DIGITS),
    ],
)
def test_registered_tasks_have_their_published_counts_and_labels(name, sizes, labels):
    task = load_task(name)
    assert tuple(len(task.splits[s]) for s in ("train", "validation", "test")) == sizes
    assert task.label_names == list(labels) and task.metric == "accuracy"
    for split in task.splits.values():
        assert set(np.unique(split.labels)) == set(range(10))
        assert split.images.dtype == np.uint8
    total = sum(sizes)
    assert total == {"fashion-mnist": 70000, "mnist-5k": 5000, "digits": 1797}[name]
    if name == "fashion-mnist":
        assert np.bincount(task.splits["test"].labels).tolist() == [1000] * 10  # the official test set
    if name == "mnist-5k":
        assert np.bincount(task.splits["test"].labels).tolist() == [100] * 10


def test_vtab_1k_is_800_train_200_validation_and_the_full_test_set():
    task = load_task({"name": "mnist-5k", "protocol": "vtab-1k"})
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [800, 200, 1000]
    assert np.bincount(task.splits["train"].labels).tolist() == [80] * 10
    again = load_task({"name": "mnist-5k", "protocol": "vtab-1k", "seed": 0})
    assert np.array_equal(task.splits["train"].images, again.splits["train"].images)  # deterministic
    other = load_task({"name": "mnist-5k", "protocol": "vtab-1k", "seed": 1})
    assert not np.array_equal(task.splits["train"].images, other.splits["train"].images)
    digits = load_task({"name": "digits", "protocol": "vtab-1k"})  # the pool is exactly 1,000
    assert [len(digits.splits[s]) for s in ("train", "validation", "test")] == [800, 200, 797]


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_k_shot_has_k_per_class_and_disjoint_validation(shots):
    task = load_task({"name": "digits", "shots": shots, "seed": 3})
    assert np.bincount(task.splits["train"].labels).tolist() == [shots] * 10
    assert np.bincount(task.splits["validation"].labels).tolist() == [shots] * 10
    labels = load_task("digits").splits["train"].labels
    train = _per_class_sample(labels, shots, 3)
    validation = _per_class_sample(labels, shots, 4, exclude=train)
    assert not set(train.tolist()) & set(validation.tolist())
    assert len(task.splits["test"]) == 797


def test_protocol_errors_are_one_line():
    with pytest.raises(SlimtuneError, match="unknown protocol 'vtab-2k'"):
        load_task({"name": "digits", "protocol": "vtab-2k"})
    with pytest.raises(SlimtuneError, match="either protocol"):
        load_task({"name": "digits", "protocol": "vtab-1k", "shots": 2})
    with pytest.raises(SlimtuneError, match="only .* examples left"):
        load_task({"name": "digits", "shots": 60})
    with pytest.raises(SlimtuneError, match="unknown image task"):
        load_image_task({"name": "cifar"})


def test_recipe_task_options_reach_the_loader(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: vit-fmnist}\ntask: {name: mnist-5k, shots: 4, seed: 2}\nmethod: lora\n")
    recipe = load_recipe(path)
    assert recipe.task.loader_spec() == {"name": "mnist-5k", "protocol": None, "shots": 4, "seed": 2}
    assert load_recipe(path).to_dict()["task"]["shots"] == 4
    path.write_text("task: {name: mnist-5k, shots: 4, protocol: vtab-1k}\nmethod: lora\n")
    with pytest.raises(SlimtuneError, match="either task.protocol"):
        load_recipe(path)


def test_listed_and_installed():
    rows = {row["name"]: row for row in list_image_tasks()}
    assert set(rows) == {"fashion-mnist", "mnist-5k", "digits"} and all(r["installed"] for r in rows.values())


def test_user_image_folder_loads_stratified(tmp_path):
    root = write_folder(tmp_path / "pets")
    task = load_task({"images": str(root)})
    assert task.label_names == ["cat", "dog", "owl"]
    assert sum(len(s) for s in task.splits.values()) == 30
    assert set(task.splits["train"].labels.tolist()) == {0, 1, 2}
    processor = ImageProcessor(height=8, width=8, channels=1, mean=(0.5,), std=(0.5,))
    rows = processor.encode_split(task.splits["train"])
    assert rows.pixel_values.shape == (len(task.splits["train"]), 1, 8, 8)
    shots = load_task({"images": str(root), "shots": 2})
    assert len(shots.splits["train"]) == 6


def test_user_image_folder_errors(tmp_path):
    with pytest.raises(SlimtuneError, match="is not a directory"):
        load_task({"images": str(tmp_path / "missing")})
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(SlimtuneError, match="1 class sub-folders"):
        load_task({"images": str(tmp_path / "one")})
    root = write_folder(tmp_path / "empty", per_class=3)
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("no images here")
    with pytest.raises(SlimtuneError, match=r"class folder .*zebra has no images"):
        load_task({"images": str(root)})
    root = write_folder(tmp_path / "broken", per_class=3)
    (root / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SlimtuneError, match=r"cannot read image .*bad.png"):
        load_task({"images": str(root)})


def test_processor_resizes_converts_and_normalises(tmp_path):
    processor = ImageProcessor(height=28, width=28, channels=1, mean=(0.25,), std=(0.5,))
    eight = np.full((2, 8, 8), 255, np.uint8)
    out = processor(eight)
    assert out.shape == (2, 1, 28, 28)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.25) / 0.5))
    rgb = np.zeros((1, 28, 28, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> luma 0.299
    assert torch.allclose(processor(rgb), torch.full((1, 1, 28, 28), (0.299 - 0.25) / 0.5), atol=1e-5)
    three = ImageProcessor(height=28, width=28, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert three(np.zeros((1, 28, 28), np.uint8)).shape == (1, 3, 28, 28)
    # From a model directory: the HF ViTImageProcessor keys.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "num_channels": 1, "image_size": 28}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 28, "width": 28}, "image_mean": [0.286], "image_std": [0.353]}))
    loaded = ImageProcessor.from_model_dir(tmp_path)
    assert (loaded.height, loaded.channels, loaded.mean, loaded.std) == (28, 1, (0.286,), (0.353,))
    split = ImageSplit(np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 2]))
    assert loaded.encode_split(split).pixel_values.shape == (3, 1, 28, 28)
