"""vit-fmnist: the ViT slimtune pre-trains and ships; its accuracy is what pretrain.json says."""

import json

import pytest
import torch

from slimtune.zoo.images import ImageProcessor, load_image_task
from slimtune.zoo.models import BUNDLED_WEIGHTS, is_installed, list_models, load_model, model_dir

WEIGHTS = BUNDLED_WEIGHTS / "vit-fmnist"


def test_registered_and_shipped_inside_the_package():
    assert is_installed("vit-fmnist") and model_dir("vit-fmnist") == WEIGHTS
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "pretrain.json", "pretrain.log"} <= {p.name for p in WEIGHTS.iterdir()}
    assert any(row["name"] == "vit-fmnist" and row["installed"] for row in list_models())
    config = json.loads((WEIGHTS / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["num_channels"], config["hidden_size"],
            config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"]) == (28, 7, 1, 96, 6, 3, 384)
    assert (WEIGHTS / "model.safetensors").stat().st_size < 5_000_000  # "a few MB"


def test_a_new_task_gets_a_new_head():
    kept = load_model("vit-fmnist", num_labels=10, keep_head=True)
    fresh = load_model("vit-fmnist", num_labels=10)
    three = load_model("vit-fmnist", num_labels=3)
    assert not torch.equal(kept.classifier.weight, fresh.classifier.weight)
    assert three.classifier.out_features == 3
    torch.testing.assert_close(kept.vit.layers[0].attention.q_proj.weight, three.vit.layers[0].attention.q_proj.weight)


@pytest.mark.integration
def test_fashion_mnist_accuracy_equals_the_recorded_one():
    """The first 1,000 official test images (seconds on the tiny ViT), through slimtune's own
    loader, processor and task: the count recorded by scripts/pretrain_vit.py --evaluate-only."""
    record = json.loads((WEIGHTS / "pretrain.json").read_text())
    recorded = record["slimtune_eval"]
    assert abs(recorded["test_accuracy"] - record["test_accuracy"]) <= 0.002  # the script's own eval agrees
    model = load_model("vit-fmnist", num_labels=10, keep_head=True, attn_implementation="eager").eval()
    processor = ImageProcessor.from_model_dir(WEIGHTS)
    test = load_image_task("fashion-mnist").splits["test"]
    rows = processor.encode_split(test.take(range(1000)))
    with torch.no_grad():
        predictions = torch.cat([model(pixel_values=rows.pixel_values[i:i + 500]).logits.argmax(-1) for i in (0, 500)])
    assert int((predictions == rows.labels).sum()) == recorded["first_1000_correct"]
