"""The public Python API: the docs' walk-through runs as written, attach validates like a recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.errors import SlimtuneError
from tests.fixtures import tiny_bert

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.integration
def test_the_documented_walk_through_runs():
    block = re.search(r"## A run from a notebook.*?```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["report"]["train"]["steps"] == 10
    assert namespace["model"].slimtune_export["kinds"] == ["merged"]


def test_attach_trains_only_the_delta_and_merges_exactly():
    model = tiny_bert()
    x = torch.randint(0, 100, (2, 8))
    before = model(input_ids=x).logits
    delta = slimtune.attach(model, "lora", r=2)
    trainable = delta.trainable_parameters(model)
    assert trainable and all(("lora_" in n) or n.startswith("classifier") for n in trainable)
    with torch.no_grad():
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_()
    adapted = model(input_ids=x).logits
    assert not torch.allclose(adapted, before)
    delta.merge(model)
    assert torch.allclose(model(input_ids=x).logits, adapted, atol=1e-5)


def test_attach_composes_and_refuses_bad_fields_in_one_line():
    model = tiny_bert()
    delta = slimtune.attach(model, [{"name": "lora", "r": 2}, "bitfit"])
    assert delta.label == "lora+bitfit"
    with pytest.raises(SlimtuneError, match=r"slimtune.attach: method.r: .*"):
        slimtune.attach(tiny_bert(), "lora", r=0)
    with pytest.raises(SlimtuneError, match="unknown method 'lorax'"):
        slimtune.attach(tiny_bert(), "lorax")


def test_recipe_from_a_dict_takes_the_yaml_shorthands_and_overrides():
    r = slimtune.load_recipe({"model": "minilm-l2", "task": "movie-sentiment", "method": "lora"}, overrides=["train.lr=1e-4"])
    assert r.model.name == "minilm-l2" and r.task.name == "movie-sentiment" and r.train.lr == 1e-4
