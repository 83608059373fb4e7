"""Checks every linear-update method shares: merge/unmerge, a few training steps on tiny BERT,
Llama and ViT, and the delta-only save/load round trip through the tiny pipeline."""

import torch

from slimtune.methods.base import get_method_class
from slimtune.core.arch import Arch
from slimtune.methods.delta import Delta
from slimtune.recipe import MethodSpec, validate_recipe
from slimtune.runner import evaluate_run, train_run
from tests.tiny import token_batch


def attach(model, name, **fields):
    cls = get_method_class(name)
    delta = Delta.from_specs([MethodSpec(name=name, config=cls.Config(**fields))])
    delta.attach(model, Arch.of(model))
    return delta


def randomize(model, delta, seed=1, std=0.2):
    """Give every method parameter a random non-zero value (zero-init factors hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in delta.methods[0].trainable_parameters(model).items():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def model_inputs(model, seed=0):
    if model.config.model_type == "vit":
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        return {"pixel_values": torch.randn(3, config.num_channels, config.image_size, config.image_size, generator=generator)}
    return token_batch(seed=seed)


def check_merge_and_unmerge(model, name, **fields):
    """Merged output == unmerged (1e-5); unmerge restores every base weight bit for bit."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = attach(model, name, **fields)
    randomize(model, delta)
    model.eval()
    inputs = model_inputs(model)
    unmerged = model(**inputs).logits
    delta.merge(model)
    merged = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in model.named_parameters() if n.replace(".base.", ".") in before and not torch.equal(p, before[n.replace(".base.", ".")])]
    assert changed, "merging changed no base weight"
    delta.unmerge(model)
    for n, p in model.named_parameters():
        original = n.replace(".base.", ".")
        if original in before:
            assert torch.equal(p, before[original]), n
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-6, rtol=1e-6)
    return delta


def check_trains(model, name, steps=4, lr=1e-2, **fields):
    """A few AdamW steps change the method's parameters and leave the base frozen."""
    delta = attach(model, name, **fields)
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
    tiny_recipe["method"] = method
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    result = evaluate_run(tmp_path / "run")
    assert result["metrics"] == report["metrics"]
    return report
