"""DP linear probing before DP fine-tuning (DP-LP-FT): the closed-form clipped gradients against a
one-example autograd loop, the probe against plain gradient descent, its noise scale, composition
with fine-tuning in one ε, resume, and the recipe errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures import crash_run, make_trainer
from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors
from slimtune.privacy import accounting, engine, linear_probe
from slimtune.privacy.linear_probe import LinearProbeSection, clipped_gradient_sum, probe_target, run_probe, training_features
from slimtune.recipe import validate_recipe
from slimtune.runner import build, train_run


def one_example_loop(weight, bias, x, y, clip):
    """The slow, obvious way: autograd on each example's loss, clip, sum."""
    sum_w, sum_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for i in range(len(y)):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        F.cross_entropy(F.linear(x[i : i + 1], w, b), y[i : i + 1]).backward()
        norm = torch.sqrt(w.grad.pow(2).sum() + b.grad.pow(2).sum())
        factor = min(1.0, clip / float(norm))
        sum_w += w.grad * factor
        sum_b += b.grad * factor
    return sum_w, sum_b


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), features=st.integers(1, 6), classes=st.integers(2, 4), clip=st.sampled_from([1e-3, 0.3, 1e3]), seed=st.integers(0, 10_000))
def test_clipped_gradient_sum_equals_a_one_example_loop(n, features, classes, clip, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    weight = torch.randn(classes, features, generator=g, dtype=torch.float64)
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    got_w, got_b = clipped_gradient_sum(weight, bias, x, y, clip)
    want_w, want_b = one_example_loop(weight, bias, x, y, clip)
    torch.testing.assert_close(got_w, want_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_b, want_b, rtol=1e-9, atol=1e-12)


def probe_trainer(tiny_recipe):
    tiny_recipe["measure"]["memory"] = False
    return make_trainer(tiny_recipe, recipe_hooks=True, no_dropout=True)


def test_noiseless_probe_is_full_batch_gradient_descent_from_zero(tiny_recipe):
    trainer = probe_trainer(tiny_recipe)
    layer = probe_target(trainer.model, trainer.delta.head_names)
    assert layer is trainer.model.classifier
    trainer.model.train()
    x, y = training_features(trainer, layer, batch_size=7)
    assert trainer.model.training  # features are read in eval mode, and the mode restored
    assert x.shape == (len(trainer.rows["train"]), layer.in_features)
    cfg = LinearProbeSection(steps=4, max_grad_norm=0.05, lr=2.0)
    run_probe(trainer, layer, cfg, 0.0, lambda step: torch.Generator().manual_seed(step), batch_size=7)
    weight, bias = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    for _ in range(4):
        grad_w, grad_b = one_example_loop(weight, bias, x, y, 0.05)
        weight, bias = weight - 2.0 * grad_w / len(y), bias - 2.0 * grad_b / len(y)
    torch.testing.assert_close(layer.weight, weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.bias, bias, rtol=1e-4, atol=1e-6)


def test_probe_noise_has_the_expected_scale(tiny_recipe, monkeypatch):
    trainer = probe_trainer(tiny_recipe)
    layer = probe_target(trainer.model, trainer.delta.head_names)
    monkeypatch.setattr(linear_probe, "clipped_gradient_sum", lambda w, b, x, y, c: (torch.zeros_like(w), torch.zeros_like(b)))
    sigma, clip, lr = 3.0, 0.5, 0.7
    run_probe(trainer, layer, LinearProbeSection(steps=1, max_grad_norm=clip, lr=lr), sigma, lambda step: torch.Generator().manual_seed(9), batch_size=16)
    change = torch.cat([layer.weight.flatten(), layer.bias]).detach()
    expected = lr * sigma * clip / len(trainer.rows["train"])
    assert float(change.std()) == pytest.approx(expected, rel=0.2)  # 66 values
    assert float(change.mean()) == pytest.approx(0.0, abs=4 * expected / math.sqrt(change.numel()))


def test_calibration_after_a_prior_history_composes_within_the_target():
    probe = [(accounting.calibrate_noise("prv", 0.5, 1e-5, 1.0, 30), 1.0, 30)]
    assert accounting.epsilon_of("prv", probe, 1e-5) <= 0.5
    alone = accounting.calibrate_noise("prv", 8.0, 1e-5, 0.12, 72)
    after = accounting.calibrate_noise("prv", 8.0, 1e-5, 0.12, 72, prior=probe)
    composed = accounting.epsilon_of("prv", [*probe, (after, 0.12, 72)], 1e-5)
    assert after > alone and 7.9 <= composed <= 8.0
    with pytest.raises(SlimtuneError, match="linear probe"):
        accounting.calibrate_noise("rdp", 0.4, 1e-5, 0.12, 72, prior=probe)


def test_probe_then_fine_tuning_spend_one_budget(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=4, batch_size=16)
    tiny_recipe["measure"].update(memory=False, flops=False)
    tiny_recipe["privacy"] = {"epsilon": 8.0, "accountant": "rdp", "physical_batch_size": 7, "linear_probe": {"steps": 5, "epsilon": 1.0}}
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    privacy = report["privacy"]
    probe = privacy["linear_probe"]
    assert probe["steps"] == 5 and probe["examples"] == report["task"]["n_train"]
    assert probe["epsilon_alone"] <= 1.0 and privacy["steps"] == 4
    fine_tuning_alone = accounting.epsilon_for("rdp", privacy["noise_multiplier"], privacy["sample_rate"], 4, 1e-5)
    assert fine_tuning_alone < privacy["epsilon"] <= 8.0  # the probe's cost is in the reported ε
    assert privacy["noise_multiplier"] > accounting.calibrate_noise("rdp", 8.0, 1e-5, privacy["sample_rate"], 4)
    head = read_safetensors(tmp_path / "run/delta.safetensors")
    assert all(torch.isfinite(t).all() for t in head.values())


def test_resume_does_not_probe_again(tiny_recipe, tmp_path, monkeypatch):
    tiny_recipe["train"].update(max_steps=4, checkpoint_every=2, batch_size=16, eval_each_epoch=False)
    tiny_recipe["measure"].update(memory=False, flops=False)
    tiny_recipe["privacy"] = {"epsilon": 30.0, "noise_multiplier": 1.0, "accountant": "rdp", "seed": 4, "linear_probe": {"steps": 3, "epsilon": 2.0}}
    recipe = validate_recipe(tiny_recipe)
    whole = train_run(recipe, tmp_path / "whole", progress=False)
    run = tmp_path / "crashed"
    crash_run(recipe, run, 3)
    probes = []
    monkeypatch.setattr(engine, "run_probe", lambda *args, **kwargs: probes.append(args))
    resumed = train_run(recipe, run, resume=True, progress=False)
    assert probes == []
    assert resumed["privacy"]["epsilon"] == pytest.approx(whole["privacy"]["epsilon"])
    assert resumed["privacy"]["linear_probe"]["steps"] == 3
    a, b = read_safetensors(tmp_path / "whole/delta.safetensors"), read_safetensors(run / "delta.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_probe_recipe_errors_are_one_line(tiny_recipe, tiny_data_file):
    tiny_recipe["privacy"] = {"epsilon": 1.0, "linear_probe": {"steps": 5, "epsilon": 1.0}}
    with pytest.raises(SlimtuneError, match=r"linear_probe.epsilon.*below privacy.epsilon"):
        build(validate_recipe(tiny_recipe))
    tiny_recipe["privacy"] = {"linear_probe": {"steps": -1}}
    with pytest.raises(SlimtuneError, match="linear_probe"):
        validate_recipe(tiny_recipe)
    # A causal LM has no task head (no head parameter names): refused at build time.
    with pytest.raises(SlimtuneError, match="no linear task head"):
        probe_target(torch.nn.Sequential(torch.nn.Linear(2, 2)), [])

