"""Shared pytest fixtures (helpers they build on: ``tests/fixtures.py``). Tests run offline and
single-threaded per worker (pytest -n 2 uses both cores).

A tiny local model directory (random BERT with MiniLM's real tokenizer) and a tiny user data
file, so the whole pipeline (recipe -> run dir -> eval) runs in seconds."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.fixtures import tiny_bert, tiny_llama, tiny_vit, write_tiny_bert_dir, write_tiny_reviews

torch.set_num_threads(1)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory):
    return write_tiny_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture
def tiny_recipe(tiny_model_dir, tiny_data_file):
    """A recipe dict for the tiny model and data: LoRA, 8 steps, no latency timing."""
    return {
        "model": {"name": str(tiny_model_dir)},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 8, "batch_size": 16, "lr": 5e-3, "max_length": 16, "warmup_ratio": 0.0},
        "measure": {"latency": False},
    }


@pytest.fixture
def trained_run(tiny_recipe, tmp_path):
    """A finished tiny run (2 steps, a checkpoint after each): its directory."""
    from slimtune.recipe import validate_recipe
    from slimtune.runner import train_run

    tiny_recipe["train"].update(max_steps=2, checkpoint_every=1)
    train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    return tmp_path / "run"
