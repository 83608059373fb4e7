"""What tests share, in one place: tiny random models of each family (hidden 32, 2 layers),
batches, attaching a recipe's methods and randomising them, the per-method checks (merge/unmerge,
a few training steps, delta round trips, per-sample gradients against a loop), and trainer
helpers (a simulated crash, a trainer on a recipe, one-line CLI errors, a pickle trap).

pytest fixtures built on these (the tiny model directory, data file and recipe, a finished tiny
run) live in ``tests/conftest.py``."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from slimtune.core.arch import Arch
from slimtune.methods.base import get_method_class
from slimtune.methods.delta import Delta
from slimtune.recipe import MethodSpec
from slimtune.core.hooks import Hook

# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------


def tiny_bert(num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama(lm: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2,
    )
    return (LlamaForCausalLM(config) if lm else LlamaForSequenceClassification(config)).eval()


def tiny_vit(num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def tiny_mpnet(num_labels: int = 2, max_position_embeddings: int = 80):
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=max_position_embeddings, num_labels=num_labels)
    return MPNetForSequenceClassification(config).eval()


POSITIVE = ["good", "great", "lovely", "superb", "wonderful", "fine"]
NEGATIVE = ["bad", "awful", "dull", "poor", "terrible", "boring"]


def write_tiny_bert_dir(path):
    """A tiny random BERT (hidden 32, 2 layers) with MiniLM's real tokenizer, saved at ``path``."""
    from slimtune.zoo.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_reviews(path):
    """160 two-class review sentences as a csv (text,label with labels neg/pos)."""
    import random

    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(160):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append(f"the film was {word} and {rng.choice(['long', 'short', 'new', 'old'])},{'pos' if label else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def token_batch(batch: int = 3, seq: int = 7, vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def model_inputs(model, seed=0):
    """A batch of 3 for ``model``: pixels for a ViT, tokens (one padded row) otherwise."""
    if model.config.model_type == "vit":
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        return {"pixel_values": torch.randn(3, config.num_channels, config.image_size, config.image_size, generator=generator)}
    return token_batch(seed=seed)


def make_batch(batch, seq, seed=0, vocab=100, objective="classification"):
    """Ragged, right-padded token rows with labels (class ids, or the tokens for a causal LM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):  # ragged rows, right-padded
        mask[i, n:] = 0
        ids[i, n:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if objective == "classification":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
        out["labels"] = labels
    return out


def write_folder(root, classes=("cat", "dog", "owl"), per_class=10, size=12):
    """An image folder (one sub-directory per class) of small grey PNGs, one RGB per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.rand(size, size) * 60 + 60 * c).astype(np.uint8)
            mode_image = Image.fromarray(pixels, "L")
            if i == 0:  # one colour image per class: converted to the model's channels
                mode_image = mode_image.convert("RGB")
            mode_image.save(root / name / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------------
# Methods: attach, randomise
# --------------------------------------------------------------------------------------------


def method_spec(name, **fields) -> MethodSpec:
    return MethodSpec(name=name, config=get_method_class(name).Config(**fields))


def attach(model, *methods, objective="classification") -> Delta:
    """attach(model, ("houlsby", {...}), "pfeiffer", ...) -> the Delta, attached (base frozen)."""
    specs = []
    for item in methods:
        name, fields = (item, {}) if isinstance(item, str) else item
        specs.append(method_spec(name, **fields))
    delta = Delta.from_specs(specs)
    delta.attach(model, Arch.of(model, objective))
    return delta


def randomize(delta, model, seed=1, scale=0.3, head=False, replace=False):
    """Move every tensor the methods train (and the head, if asked) away from its init: add
    ``scale`` * N(0, 1), or with ``replace`` set it to that (zero-init factors hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    params = {n: p for m in delta.methods for n, p in m.trainable_parameters(model).items()}
    if head:
        params.update(delta.head_parameters(model))
    with torch.no_grad():
        for param in params.values():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale
            param.copy_(noise) if replace else param.add_(noise)


def randomize_lora_b(model, std=1.0):
    """LoRA's B starts at zero; give every LoRA layer's B N(0, std^2) entries (seed 1)."""
    from slimtune.methods.lora import LoRALinear

    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(std=std)


def disable_dropout(model):
    """Dropout off in every module (the same function in every pass, even in train mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


# --------------------------------------------------------------------------------------------
# Per-method checks
# --------------------------------------------------------------------------------------------


def round_trip(factory, methods, batch, tmp_path, objective="classification", eval_mode=False):
    """Train-like change, save the delta alone, load it onto a fresh base: same outputs (with
    ``eval_mode``, both models are put in eval mode after attaching: dropout off)."""
    from slimtune.methods.delta import read_delta

    model = factory()
    delta = attach(model, *methods, objective=objective)
    if eval_mode:
        model.eval()
    randomize(delta, model, head=True)
    expected = model(**batch).logits
    delta.save(tmp_path, model, {"model": "tiny"})
    meta, state = read_delta(tmp_path)
    assert set(state) == set(delta.state_dict(model))
    fresh = factory()
    fresh_delta = attach(fresh, *methods, objective=objective)
    if eval_mode:
        fresh.eval()
    fresh_delta.load_state_dict(fresh, state)
    torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
    return model, delta


def base_name(name: str) -> str:
    """A parameter's name in the plain base model (wrappers keep the layer at ``<name>.base``)."""
    return name.replace(".base.", ".")


def check_merge_and_unmerge(model, name, **fields):
    """Merged output == unmerged (1e-5); unmerge restores every base weight bit for bit."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = attach(model, (name, fields))
    randomize(delta, model, scale=0.2, replace=True)
    model.eval()
    inputs = model_inputs(model)
    unmerged = model(**inputs).logits
    delta.merge(model)
    merged = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in model.named_parameters() if base_name(n) in before and not torch.equal(p, before[base_name(n)])]
    assert changed, "merging changed no base weight"
    delta.unmerge(model)
    for n, p in model.named_parameters():
        original = base_name(n)
        if original in before:
            assert torch.equal(p, before[original]), n
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-6, rtol=1e-6)
    return delta


def check_trains(model, name, steps=4, lr=1e-2, **fields):
    """A few AdamW steps change the method's parameters and leave the base frozen."""
    delta = attach(model, (name, fields))
    trainable = delta.trainable_parameters(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    start = {n: p.detach().clone() for n, p in delta.methods[0].trainable_parameters(model).items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    model.train()
    inputs = model_inputs(model)
    if model.config.model_type == "vit":
        inputs["labels"] = torch.tensor([0, 1, 2])
    elif getattr(model.config, "is_decoder", False) or model.config.model_type == "llama" and not hasattr(model, "score"):
        inputs["labels"] = inputs["input_ids"]
    else:
        inputs["labels"] = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in delta.methods[0].trainable_parameters(model).items() if not torch.equal(p, start[n])]
    assert moved, "no method parameter moved"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen base parameter {n} changed"
    return losses


def check_round_trip(tiny_recipe, tmp_path, method):
    """A few tiny-pipeline steps, then `evaluate_run` on the saved delta reproduces the metrics."""
    from slimtune.recipe import validate_recipe
    from slimtune.runner import evaluate_run, train_run

    tiny_recipe["method"] = method
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    result = evaluate_run(tmp_path / "run")
    assert result["metrics"] == report["metrics"]
    return report


# --------------------------------------------------------------------------------------------
# Per-sample gradients: the DP engine's against one backward pass per example
# --------------------------------------------------------------------------------------------


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def loop_reference(model, params, batch, objective):
    """Per-sample gradients by one backward pass per example (the obvious way)."""
    from slimtune.privacy.losses import per_sample_losses

    out = {n: [] for n in params}
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = per_sample_losses(model(**_inputs(one)), one, objective).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            out[name].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def engine_per_sample(model, params, batch, objective, demotions_fail=True, **kwargs):
    """Per-sample gradients from the DP engine's clipper (``PerSampleClipper.per_sample``), dense.
    A module rule the engine demotes to its exact batched-backward fallback (``clipper.slow``)
    fails the test unless ``demotions_fail`` is False."""
    from slimtune.privacy.losses import per_sample_losses
    from slimtune.privacy.per_sample import PerSampleClipper

    clipper = PerSampleClipper(model, params, **kwargs)

    def forward():
        return per_sample_losses(model(**_inputs(batch)), batch, objective)

    _, contributions = clipper.per_sample(forward, batch["labels"].shape[0])
    clipper.remove()
    if demotions_fail:
        assert not clipper.slow, clipper.slow_notice()
    dense = {}
    for name, items in contributions.items():
        dense[name] = sum(item.dense() for item in items).reshape(-1, *params[name].shape)
    return dense, clipper


# --------------------------------------------------------------------------------------------
# Trainer and CLI helpers
# --------------------------------------------------------------------------------------------


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


def assert_same_delta(a, b):
    """Two run directories saved bit-identical deltas (a resumed run against an uninterrupted one)."""
    from slimtune.io import read_safetensors

    first, second = read_safetensors(a / "delta.safetensors"), read_safetensors(b / "delta.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def make_trainer(recipe, run_dir=None, hooks=(), *, recipe_hooks=False, no_dropout=False):
    """A classification Trainer on ``recipe`` (a dict is validated first) with ``hooks``; with
    ``recipe_hooks`` the hooks the recipe's sections build come first; ``no_dropout`` turns
    dropout off (the same function in every pass)."""
    from slimtune.recipe import validate_recipe
    from slimtune.runner import build
    from slimtune.train.trainer import Trainer

    if isinstance(recipe, dict):
        recipe = validate_recipe(recipe)
    built = build(recipe)
    if no_dropout:
        disable_dropout(built.model)
    return Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                   objective="classification", run_dir=run_dir, hooks=[*(built.hooks if recipe_hooks else []), *hooks],
                   progress=False)


class Trap:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_line_error(argv, capsys):
    """Run the CLI on ``argv``: exit 2 and one ``error: ...`` line on stderr, which is returned."""
    from slimtune.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


TEXTS = ["the film was great and new", "the film was awful", "dull and long, very long indeed"]


def train_tiny_lora(run, model_dir, data_file, head=None, **method):
    """A finished 8-step LoRA run on the tiny model and data (``method`` adds LoRA fields, ``head``
    is the recipe's head section): ``run``."""
    from slimtune.recipe import validate_recipe
    from slimtune.runner import train_run

    recipe = {
        "model": {"name": str(model_dir)},
        "task": {"file": str(data_file), "text": "text", "label": "label"},
        "method": {"name": "lora", "r": 4, **method},
        "train": {"max_steps": 8, "batch_size": 16, "lr": 5e-3, "max_length": 16, "warmup_ratio": 0.0},
        "measure": {"latency": False},
        **({"head": head} if head else {}),
    }
    train_run(validate_recipe(recipe), run, progress=False)
    return run


def text_logits(model, tokenizer, texts=TEXTS):
    """The model's float logits on ``texts``, padded as one batch."""
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.float()
