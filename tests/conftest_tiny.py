"""A tiny local model directory (random BERT with MiniLM's real tokenizer) and a tiny user data
file, so the whole pipeline (recipe -> run dir -> eval) runs in seconds."""

import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from slimtune.core.hooks import Hook
from slimtune.zoo.models import load_tokenizer

POSITIVE = ["good", "great", "lovely", "superb", "wonderful", "fine"]
NEGATIVE = ["bad", "awful", "dull", "poor", "terrible", "boring"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory):
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(160):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append(f"the film was {word} and {rng.choice(['long', 'short', 'new', 'old'])},{'pos' if label else 'neg'}")
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


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


class CrashAt(Hook):
    """Simulates a crash (KeyboardInterrupt) at the start of the given step."""

    name = "crash"

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, trainer, batch):
        if trainer.step == self.step:
            raise KeyboardInterrupt


def crash_run(recipe, run, step):
    """Train ``recipe`` into the new directory ``run`` and crash at the start of ``step``, leaving
    the checkpoints written so far for ``train_run(recipe, run, resume=True)``."""
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    built = build(recipe)
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", run_dir=run, hooks=[*built.hooks, CrashAt(step)], progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
