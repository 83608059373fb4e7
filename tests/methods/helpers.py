"""Shared helpers for method tests: attach a recipe's methods to a model, randomise a delta."""

import torch

from slimtune.methods.base import get_method_class
from slimtune.core.arch import Arch
from slimtune.methods.delta import Delta
from slimtune.recipe import MethodSpec


def attach(model, *methods, objective="classification"):
    """attach(model, ("houlsby", {...}), "pfeiffer", ...) -> Delta."""
    specs = []
    for item in methods:
        name, fields = (item, {}) if isinstance(item, str) else item
        specs.append(MethodSpec(name=name, config=get_method_class(name).Config(**fields)))
    delta = Delta.from_specs(specs)
    delta.attach(model, Arch.of(model, objective))
    return delta


def randomize(delta, model, seed=1, scale=0.3, head=False):
    """Move every tensor the methods train (and the head, if asked) away from its init."""
    generator = torch.Generator().manual_seed(seed)
    params = {n: p for m in delta.methods for n, p in m.trainable_parameters(model).items()}
    if head:
        params.update(delta.head_parameters(model))
    with torch.no_grad():
        for param in params.values():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def round_trip(factory, methods, batch, tmp_path, objective="classification"):
    """Train-like change, save the delta alone, load it onto a fresh base: same outputs."""
    from slimtune.methods.delta import read_delta

    model = factory()
    delta = attach(model, *methods, objective=objective)
    randomize(delta, model, head=True)
    expected = model(**batch).logits
    delta.save(tmp_path, model, {"model": "tiny"})
    meta, state = read_delta(tmp_path)
    assert set(state) == set(delta.state_dict(model))
    fresh = factory()
    fresh_delta = attach(fresh, *methods, objective=objective)
    fresh_delta.load_state_dict(fresh, state)
    torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
    return model, delta


def tiny_mpnet(num_labels: int = 2):
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=80, num_labels=num_labels)
    return MPNetForSequenceClassification(config).eval()
