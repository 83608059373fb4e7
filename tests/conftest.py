"""Shared fixtures. Tests run offline and single-threaded per worker (pytest -n 2 uses both cores)."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.conftest_tiny import tiny_data_file, tiny_model_dir, tiny_recipe  # noqa: F401 (fixtures)
from tests.tiny import tiny_bert, tiny_llama, tiny_vit

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


