"""DP-SGD under quantisation-aware training: the fake-quantised layers' per-sample rules against a
one-example loop, and a DP + QAT run end to end (it used to crash in the LoRA rule)."""

import pytest
import torch

from slimtune.compress.qat import enable_fake_quant, fake_quant_activation, passed_by_quantiser
from slimtune.recipe import validate_recipe
from slimtune.runner import train_run
from tests.fixtures import attach, engine_per_sample, loop_reference, make_batch, randomize, randomize_lora_b, tiny_bert
from tests.privacy.test_per_sample import _mask_half


def _check_under_qat(model, delta, batch, rules, **kwargs):
    model.double()
    enable_fake_quant(model, activations=True, per_sample=True)
    params = delta.trainable_parameters(model)
    expected = loop_reference(model, params, batch, "classification")
    got, clipper = engine_per_sample(model, params, batch, "classification", **kwargs)
    for name in params:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    described = clipper.describe()
    for part, kind in rules.items():
        assert {described[n] for n in params if part in n} == {kind}, part
    return clipper


def test_per_sample_activation_ranges_make_each_example_independent_of_the_batch():
    x = torch.randn(3, 5, 8)
    x[2] *= 50  # one example with a wide range must not coarsen the others' grid
    alone = torch.cat([fake_quant_activation(x[i : i + 1], per_sample=True) for i in range(3)])
    torch.testing.assert_close(fake_quant_activation(x, per_sample=True), alone)
    assert not torch.allclose(fake_quant_activation(x), alone)


def test_the_weight_pass_mask_is_what_autograd_passes():
    weight = torch.randn(6, 10)
    passed = passed_by_quantiser(weight)
    assert passed.sum() >= weight.numel() - weight.shape[0] and not passed.all()  # each row's +max is clipped


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_lora_under_qat(ghost):
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 3}))
    randomize_lora_b(model, std=0.5)
    _check_under_qat(model, delta, make_batch(4, 7), {"lora_A": "qat-lora", "lora_B": "qat-lora", "classifier.weight": "qat-linear"}, ghost=ghost)


def test_masked_lora_under_qat():
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 3}))
    randomize_lora_b(model, std=0.5)
    _mask_half(model, delta.trainable_parameters(model))
    _check_under_qat(model, delta, make_batch(4, 7), {"lora_A": "qat-lora", "lora_B": "qat-lora"})


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_full_fine_tuning_under_qat(ghost):
    model = tiny_bert().eval()
    delta = attach(model, ("full", {}))
    _check_under_qat(model, delta, make_batch(3, 6), {"attention.self.query.weight": "qat-linear", "word_embeddings": "embedding"}, ghost=ghost)


@pytest.mark.parametrize("method", [("kadaptation", {}), ("fact-tt", {}), ("dsee", {"r": 2, "num_sparse": 4})])
def test_other_linear_updates_under_qat(method):
    model = tiny_bert().eval()
    delta = attach(model, method)
    randomize(delta, model, replace=True)
    clipper = _check_under_qat(model, delta, make_batch(3, 6), {}, demotions_fail=False)
    wrapped = {n for n, kind in clipper.describe().items() if kind == "qat-linear-update"}
    assert wrapped and not (set(clipper.slow) & wrapped)


def test_dp_lora_with_qat_trains_and_reports_both(tiny_recipe, tmp_path, capsys):
    """The issue's reproduction: method lora + privacy + compress.qat crashed with 'branch
    inputs and calls do not pair up'."""
    from slimtune.measure.report import report_rows

    tiny_recipe["train"].update(max_steps=3)
    tiny_recipe["measure"].update(memory=False, flops=False)
    tiny_recipe["privacy"] = {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "physical_batch_size": 8}
    tiny_recipe["compress"] = {"qat": {}}
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    assert report["privacy"]["steps"] == 3 and "batched-backward" not in report["privacy"]["per_sample_rules"]
    assert report["privacy"]["per_sample_rules"]["qat-lora"] == 8 and report["privacy"]["slow_path"] is None
    assert report["qat"]["activations"] == "8-bit per-example dynamic (DP)"
    rows = dict(report_rows(report))
    assert rows["QAT"].startswith("int8 fake quantisation on") and "privacy" in rows
    assert "slow exact" not in capsys.readouterr().out


@pytest.mark.parametrize("method", [{"name": "houlsby"}, {"name": "prompt", "num_tokens": 2}])
def test_qat_with_a_method_int8_export_cannot_merge_is_refused_before_training(tiny_recipe, tmp_path, method):
    from slimtune.errors import SlimtuneError
    from slimtune.runner import build

    tiny_recipe["method"] = method
    tiny_recipe["compress"] = {"qat": {}}
    with pytest.raises(SlimtuneError, match=rf"compress.qat: method '{method['name']}' cannot be merged into plain Linears") as caught:
        build(validate_recipe(tiny_recipe))
    assert "lora" in str(caught.value) and "\n" not in str(caught.value)


def test_a_base_bias_beside_lora_under_qat_is_covered_by_the_layers_rule():
    """Under QAT a LoRA layer never calls its base Linear: BitFit's base bias had no captured call
    and took the slow path; the fake-quantised layer's rule now covers it."""
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 2}), ("bitfit", {}))
    randomize_lora_b(model, std=0.5)
    _check_under_qat(model, delta, make_batch(3, 6), {"query.base.bias": "qat-lora", "lora_A": "qat-lora"})


def test_bf16_autocast_under_qat_keeps_the_fast_rules():
    """The rule takes the weight the forward quantised (a bf16 product under autocast), not an
    fp32 recomputation whose clipped entries differ (every factor used to be demoted)."""
    from slimtune.privacy.losses import per_sample_losses
    from slimtune.privacy.per_sample import PerSampleClipper

    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 2}))
    randomize_lora_b(model, std=0.5)
    enable_fake_quant(model, per_sample=True)
    params = delta.trainable_parameters(model)
    batch = make_batch(4, 7)
    clipper = PerSampleClipper(model, params)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(**{k: v for k, v in batch.items() if k != "labels"})
        return per_sample_losses(output, batch, "classification")

    clipper.per_sample(forward, 4)
    assert not clipper.slow, clipper.slow_notice()
