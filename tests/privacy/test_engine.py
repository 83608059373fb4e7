"""The DP-SGD hook and its accounting: golden ε values, calibration, equivalence with a plain step,
noise statistics, budget stop, resume, report card, recipe errors."""

import json
import math

import pytest
import torch

from tests.fixtures import crash_run, make_trainer
from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors
from slimtune.privacy import accounting
from slimtune.privacy.engine import PrivacyHook
from slimtune.recipe import validate_recipe
from slimtune.runner import build, evaluate_run, train_run
from slimtune.core.hooks import Hook


# -- accounting ---------------------------------------------------------------------------------
def test_golden_epsilon_prv_and_rdp():
    assert accounting.epsilon_for("prv", 1.5, 0.04, 2250, 1e-5) == pytest.approx(6.78, abs=0.01)
    assert accounting.epsilon_for("rdp", 1.5, 0.04, 2250, 1e-5) == pytest.approx(7.33, abs=0.01)


@pytest.mark.parametrize("kind,epsilon,q,steps", [("rdp", 8.0, 0.01, 500), ("rdp", 3.0, 0.05, 120), ("prv", 8.0, 0.03, 300)])
def test_calibrated_noise_never_overshoots_and_is_tight(kind, epsilon, q, steps):
    sigma = accounting.calibrate_noise(kind, epsilon, 1e-5, q, steps)
    spent = accounting.epsilon_for(kind, sigma, q, steps, 1e-5)
    assert spent <= epsilon
    assert spent >= epsilon - 0.1  # within Opacus' search tolerance, not wastefully noisy


def test_steps_within_budget():
    sigma, q = 1.0, 0.02
    allowed = accounting.max_steps_within("rdp", [], sigma, q, 1e-5, 4.0, limit=5000)
    assert accounting.epsilon_for("rdp", sigma, q, allowed, 1e-5) <= 4.0 < accounting.epsilon_for("rdp", sigma, q, allowed + 1, 1e-5)
    history = [(sigma, q, 100)]
    more = accounting.max_steps_within("rdp", history, sigma, q, 1e-5, 4.0, limit=5000)
    assert more == allowed - 100


# -- the hook in the trainer ----------------------------------------------------------------------
class GradRecorder(Hook):
    name = "grads"

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer):
        self.grads.append({n: p.grad.detach().clone() for n, p in trainer.trainable.items()})


def dp_trainer(recipe_dict, hooks=()):
    """A trainer on the recipe with its sections' hooks (the privacy hook) and ``hooks``, dropout off."""
    return make_trainer(recipe_dict, hooks=hooks, recipe_hooks=True, no_dropout=True)


def test_noise_zero_and_huge_clip_is_the_non_private_step(tiny_recipe):
    tiny_recipe["train"].update(max_steps=2, batch_size=16, max_grad_norm=None)
    tiny_recipe["measure"]["memory"] = False
    plain = GradRecorder()
    dp_trainer(tiny_recipe, [plain]).fit()
    private = GradRecorder()
    dp = dict(tiny_recipe, privacy={"epsilon": None, "noise_multiplier": 0.0, "max_grad_norm": 1e6, "poisson": False, "physical_batch_size": 5})
    trainer = dp_trainer(dp, [private])
    trainer.fit()
    assert len(plain.grads) == len(private.grads) == 2
    for step in range(2):
        for name, grad in plain.grads[step].items():
            torch.testing.assert_close(private.grads[step][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_noise_has_the_expected_scale_when_gradients_are_zero(tiny_recipe):
    sigma, clip, batch = 2.0, 0.5, 16
    tiny_recipe["train"].update(max_steps=1, batch_size=batch)
    tiny_recipe["measure"]["memory"] = False
    tiny_recipe["privacy"] = {"epsilon": None, "noise_multiplier": sigma, "max_grad_norm": clip, "seed": 3}
    recorder = GradRecorder()
    trainer = dp_trainer(tiny_recipe, [recorder])
    hook = next(h for h in trainer.hooks if isinstance(h, PrivacyHook))
    hook.on_train_begin(trainer)
    hook.clipper.clipped_sum = lambda forward, n, c, into: (torch.zeros(n), torch.zeros(n))  # every gradient is 0
    trainer.fit()
    noise = torch.cat([g.flatten() for g in recorder.grads[0].values()])
    assert noise.numel() > 1000
    expected_std = sigma * clip / batch  # the parameter change under SGD is lr times this
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * expected_std / math.sqrt(noise.numel()))
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.08)


def test_dp_run_reports_privacy_stays_in_budget_and_evaluates(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=6, batch_size=16)
    tiny_recipe["privacy"] = {"epsilon": 8.0, "accountant": "rdp", "physical_batch_size": 7}
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    privacy = report["privacy"]
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps"):
        assert privacy[key] is not None, key
    assert privacy["steps"] == 6 and 0 < privacy["epsilon"] <= 8.0 and privacy["noise_multiplier"] > 0
    assert privacy["sample_rate"] == pytest.approx(16 / report["task"]["n_train"])
    saved = json.loads((tmp_path / "run/report.json").read_text())
    assert saved["privacy"]["epsilon"] == privacy["epsilon"]
    tensors = read_safetensors(tmp_path / "run/delta.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)  # trained
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == pytest.approx(report["metrics"])
    assert 0.0 <= again["metrics"]["accuracy"] <= 1.0


def test_training_stops_rather_than_exceed_the_budget(tiny_recipe):
    tiny_recipe["train"].update(max_steps=50, batch_size=16)
    tiny_recipe["measure"]["memory"] = False
    tiny_recipe["privacy"] = {"epsilon": 2.0, "noise_multiplier": 0.8, "accountant": "rdp"}
    trainer = dp_trainer(tiny_recipe)
    result = trainer.fit()
    hook = next(h for h in trainer.hooks if isinstance(h, PrivacyHook))
    assert result.steps < 50 and "privacy budget" in result.stop_reason
    assert hook.epsilon() <= 2.0
    assert accounting.epsilon_for("rdp", 0.8, hook.sample_rate, result.steps + 1, 1e-5) > 2.0


def test_resume_continues_sampling_noise_and_accounting(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=4, checkpoint_every=2, batch_size=16, eval_each_epoch=False)
    tiny_recipe["measure"].update(memory=False, flops=False)
    tiny_recipe["privacy"] = {"epsilon": 30.0, "noise_multiplier": 1.0, "accountant": "rdp", "seed": 11}
    recipe = validate_recipe(tiny_recipe)
    whole = train_run(recipe, tmp_path / "whole", progress=False)
    run = tmp_path / "crashed"
    crash_run(recipe, run, 3)
    resumed = train_run(recipe, run, resume=True, progress=False)
    assert resumed["privacy"]["steps"] == whole["privacy"]["steps"] == 4
    assert resumed["privacy"]["epsilon"] == pytest.approx(whole["privacy"]["epsilon"])
    a, b = read_safetensors(tmp_path / "whole/delta.safetensors"), read_safetensors(run / "delta.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_recipe_errors_are_one_line(tiny_recipe):
    tiny_recipe["privacy"] = {"epsilon": None}
    with pytest.raises(SlimtuneError, match="privacy.*epsilon.*noise_multiplier"):
        validate_recipe(tiny_recipe)
    tiny_recipe["privacy"] = {"accountant": "gdp"}
    with pytest.raises(SlimtuneError, match="privacy.accountant"):
        validate_recipe(tiny_recipe)
    tiny_recipe["privacy"] = {"epsilon": 8, "max_grad_norm": 0}
    with pytest.raises(SlimtuneError, match="privacy.max_grad_norm"):
        validate_recipe(tiny_recipe)


def test_bf16_autocast_keeps_the_fast_rules(tiny_recipe):
    tiny_recipe["train"].update(max_steps=1, batch_size=16, precision="bf16")
    tiny_recipe["measure"]["memory"] = False
    tiny_recipe["privacy"] = {"epsilon": None, "noise_multiplier": 1.0}
    trainer = dp_trainer(tiny_recipe)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.fit()
    hook = next(h for h in trainer.hooks if isinstance(h, PrivacyHook))
    assert "batched-backward" not in hook.report()["per_sample_rules"]
    assert all(torch.isfinite(p).all() for p in trainer.trainable.values())


def test_causal_lm_dp_lora_reports_perplexity(tiny_data_file, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.zoo.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    recipe = {
        "model": {"name": str(tmp_path / "tiny-llama")},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label", "objective": "lm"},
        "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 5e-3, "max_length": 16, "eval_each_epoch": False},
        "measure": {"latency": False, "memory": False, "flops": False},
        "privacy": {"epsilon": 8.0, "accountant": "rdp", "physical_batch_size": 8},
    }
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert report["privacy"]["steps"] == 3 and report["privacy"]["epsilon"] <= 8.0
    assert math.isfinite(report["metrics"]["perplexity"])


def test_a_method_that_restructures_mid_run_is_refused(tiny_recipe):
    tiny_recipe["method"] = {"name": "dsee", "r": 2, "num_sparse": 4, "decomposition_rank": 2, "prune": "heads", "heads_per_layer": 1}
    tiny_recipe["privacy"] = {"epsilon": 8.0}
    with pytest.raises(SlimtuneError, match=r"privacy: method 'dsee' restructures the model during training \(its stage 2, prune: heads\)") as caught:
        build(validate_recipe(tiny_recipe))
    assert "\n" not in str(caught.value)
