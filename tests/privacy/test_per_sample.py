"""Per-sample gradients (every rule) against a loop of one-sample backward passes, in float64."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from slimtune.privacy.losses import per_sample_losses
from slimtune.privacy.per_sample import PerSampleClipper
from tests.fixtures import attach, engine_per_sample, loop_reference, make_batch, randomize, randomize_lora_b, tiny_bert, tiny_llama


def check(model, delta, batch, objective="classification", expect_rules=None, **kwargs):
    model.double()
    params = delta.trainable_parameters(model)
    expected = loop_reference(model, params, batch, objective)
    got, clipper = engine_per_sample(model, params, batch, objective, **kwargs)
    for name in params:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    if expect_rules:
        described = clipper.describe()
        for name_part, kind in expect_rules.items():
            found = {described[n] for n in params if name_part in n}
            assert found == {kind}, (name_part, found)
    return clipper


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_lora_and_head(ghost):
    model = tiny_bert().train()
    for m in model.modules():  # exact comparison needs the same function in both passes
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    delta = attach(model, ("lora", {"r": 3}))
    randomize_lora_b(model, std=0.5)
    check(model, delta, make_batch(4, 9), ghost=ghost, expect_rules={"lora_A": "lora", "lora_B": "lora", "classifier.weight": "linear"})


def test_lora_with_a_frozen_a_takes_per_sample_gradients_of_b_only():
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 3, "train_a": False}))
    randomize_lora_b(model, std=0.5)
    clipper = check(model, delta, make_batch(4, 9), expect_rules={"lora_B": "lora", "classifier.weight": "linear"})
    assert not any("lora_A" in n for n in clipper.describe())


def test_bitfit_with_lora_on_the_same_layers():
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 2}), ("bitfit", {}))
    randomize_lora_b(model, std=0.5)
    check(model, delta, make_batch(3, 7), expect_rules={"lora_A": "lora", "LayerNorm.bias": "layernorm"})


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_full_fine_tuning_linear_layernorm_embeddings(ghost):
    model = tiny_bert().eval()
    delta = attach(model, ("full", {}))
    clipper = check(model, delta, make_batch(3, 6), ghost=ghost,
                    expect_rules={"word_embeddings": "embedding", "LayerNorm.weight": "layernorm", "attention.self.query.weight": "linear"})
    assert "batched-backward" not in clipper.describe().values()


def test_llama_lm_full_fine_tuning_uses_the_generic_rules():
    model = tiny_llama(lm=True).eval()
    delta = attach(model, ("full", {}), objective="lm")
    clipper = check(model, delta, make_batch(2, 6, objective="lm"), objective="lm", expect_rules={"input_layernorm": "module-vmap"})
    assert set(clipper.describe().values()) >= {"linear", "embedding", "module-vmap"}


@pytest.mark.parametrize("batch", [1, 3])
def test_llama_lm_lora_q_v_uses_the_lora_rule(batch):
    # The causal-LM DP-LoRA path (smollm2-135m): LoRA on q_proj/v_proj, per-row mean token loss.
    model = tiny_llama(lm=True).eval()
    delta = attach(model, ("lora", {"r": 2}), objective="lm")
    randomize_lora_b(model, std=0.5)
    clipper = check(model, delta, make_batch(batch, 7, objective="lm"), objective="lm", expect_rules={"q_proj.lora_A": "lora", "v_proj.lora_B": "lora"})
    assert set(clipper.describe().values()) == {"lora"}


class HiddenScale(nn.Module):
    """A toy method's parameter: a learned per-channel scale applied to a layer's output."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


def test_toy_method_with_an_arbitrary_parameter_module_rule():
    model = tiny_bert().eval()
    layer = model.bert.encoder.layer[0].output
    layer.scaler = HiddenScale(32)
    original = layer.forward
    layer.forward = lambda h, i: layer.scaler(original(h, i))
    model.requires_grad_(False)
    with torch.no_grad():
        layer.scaler.scale.uniform_(0.5, 1.5)
    layer.scaler.scale.requires_grad_(True)
    params = {"scale": layer.scaler.scale, "classifier.weight": model.classifier.weight}
    model.classifier.weight.requires_grad_(True)
    model.double()
    batch = make_batch(3, 5)
    expected = loop_reference(model, params, batch, "classification")
    got, clipper = engine_per_sample(model, params, batch, "classification")
    assert clipper.describe()["scale"] == "module-vmap"
    for name in params:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-11)


def test_parameter_read_by_another_module_falls_back_to_the_exact_batched_backward():
    """A container's parameter read directly by other modules (as shared Kronecker factors are):
    its own forward never runs, the first-batch check notices, the fallback is exact."""
    model = tiny_bert().eval()
    container = nn.Module()
    container.gain = nn.Parameter(torch.linspace(0.5, 1.5, 32))
    model.shared = container
    for block in model.bert.encoder.layer:
        out = block.output
        out.forward = (lambda o: (lambda h, i: o.LayerNorm(o.dense(h) * container.gain + i)))(out)
    model.requires_grad_(False)
    container.gain.requires_grad_(True)
    model.double()
    params = {"shared.gain": container.gain}
    batch = make_batch(3, 5)
    expected = loop_reference(model, params, batch, "classification")
    clipper = PerSampleClipper(model, params)

    def forward():
        return per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification")

    _, contributions = clipper.per_sample(forward, batch["input_ids"].shape[0])
    assert clipper.describe()["shared.gain"] == "batched-backward"
    torch.testing.assert_close(contributions["shared.gain"][0].dense(), expected["shared.gain"], rtol=1e-9, atol=1e-11)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 5), seq=st.integers(2, 9), r=st.integers(1, 4), seed=st.integers(0, 10_000), ghost=st.sampled_from(["auto", "always", "never"]))
def test_random_shapes_lora_head_bitfit(batch, seq, r, seed, ghost):
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": r}), ("bitfit", {}))
    randomize_lora_b(model, std=0.5)
    check(model, delta, make_batch(batch, seq, seed=seed), ghost=ghost)


def test_clipping_bounds_every_sample_and_sums():
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 2}))
    randomize_lora_b(model, std=0.5)
    model.double()
    params = delta.trainable_parameters(model)
    batch = make_batch(5, 6)
    expected = loop_reference(model, params, batch, "classification")
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in expected.values()))
    clip = float(norms.median())
    clipper = PerSampleClipper(model, params)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}

    def forward():
        return per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification")

    _, got_norms = clipper.clipped_sum(forward, 5, clip, sums)
    torch.testing.assert_close(got_norms, norms, rtol=1e-9, atol=1e-12)
    factors = (clip / (norms + 1e-6)).clamp(max=1)
    for name in params:
        torch.testing.assert_close(sums[name], torch.einsum("b,b...->...", factors, expected[name]), rtol=1e-9, atol=1e-12)


def test_lora_dropout_branch_passes_the_first_batch_check():
    """With dropout on (train mode), per-sample LoRA gradients come from the dropped branch input:
    their sum equals autograd's batch gradient on the same graph (no rule is demoted)."""
    model = tiny_bert().train()
    delta = attach(model, ("lora", {"r": 2, "dropout": 0.3}))
    randomize_lora_b(model, std=0.5)
    model.double()
    params = delta.trainable_parameters(model)
    batch = make_batch(4, 6)
    clipper = PerSampleClipper(model, params)

    def forward():
        return per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper.per_sample(forward, 4)
    assert "batched-backward" not in clipper.describe().values()


# -- masked tensors (sparsity masks as parametrisations) keep their layer's exact rule ---------


def _mask_half(model, params, seed=0):
    from slimtune.sparsity.masks import apply_mask

    generator = torch.Generator().manual_seed(seed)
    for name, param in params.items():
        if param.dim() == 2 and "classifier" not in name:
            module_name, _, tensor = name.rpartition(".")
            apply_mask(model.get_submodule(module_name), tensor, torch.rand(param.shape, generator=generator) > 0.5)


def test_masked_lora_factors_keep_the_lora_rule():
    model = tiny_bert().eval()
    delta = attach(model, ("lora", {"r": 3}))
    randomize_lora_b(model, std=0.5)
    _mask_half(model, delta.trainable_parameters(model))
    clipper = check(model, delta, make_batch(4, 7), expect_rules={"lora_A": "lora", "lora_B": "lora"})
    assert not clipper.slow


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_masked_full_fine_tuning_keeps_linear_embedding_and_ghost_rules(ghost):
    model = tiny_bert().eval()
    delta = attach(model, ("full", {}))
    _mask_half(model, delta.trainable_parameters(model))
    check(model, delta, make_batch(3, 6), ghost=ghost,
          expect_rules={"word_embeddings": "embedding", "attention.self.query": "linear", "LayerNorm.weight": "layernorm"})


def test_a_masked_tensor_under_the_vmap_rule_is_differentiated_through_its_mask():
    model = tiny_bert().eval()
    delta = attach(model, ("compacter", {"reduction_factor": 4}))
    with torch.no_grad():
        for p in delta.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    _mask_half(model, delta.trainable_parameters(model))  # the shared PHM rule (3-D) too
    check(model, delta, make_batch(3, 6), expect_rules={"W_left": "module-vmap", "phm_rule": "module-vmap"})


@pytest.mark.parametrize("method", [("compacter", {"reduction_factor": 4}), ("fact-tt", {}), ("fact-tk", {}), ("kadaptation", {})])
def test_factors_shared_by_every_layer_are_differentiated_by_their_readers(method):
    """Compacter's rules, FacT's U/V, KAdaptation's slow weights: owned once by the model, read
    by every layer (``shared_modules()``); each reader adds its share (before: the slow path)."""
    model = tiny_bert().eval()
    delta = attach(model, method)
    randomize(delta, model, replace=True)
    clipper = check(model, delta, make_batch(3, 6))
    assert not clipper.slow


def test_a_mask_added_after_the_first_batch_rebuilds_the_rules():
    """A pruning schedule masks mid-training: the next batch must see the new mask (before, the
    LoRA rule lost track of the factor and its gradient went missing)."""
    model = tiny_bert().eval().double()
    delta = attach(model, ("lora", {"r": 3}))
    randomize_lora_b(model, std=0.5)
    params = delta.trainable_parameters(model)
    batch = make_batch(4, 7)
    clipper = PerSampleClipper(model, params)

    def forward():
        return per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification")

    clipper.per_sample(forward, 4)
    _mask_half(model, params)
    expected = loop_reference(model, params, batch, "classification")
    _, contributions = clipper.per_sample(forward, 4)
    for name in params:
        got = sum(item.dense() for item in contributions[name]).reshape(expected[name].shape)
        torch.testing.assert_close(got, expected[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    assert not clipper.slow and "batched-backward" not in clipper.describe().values()


def test_the_slow_path_is_named_in_one_line():
    model = tiny_bert().eval()
    container = nn.Module()
    container.gain = nn.Parameter(torch.ones(32))
    model.shared = container
    out = model.bert.encoder.layer[0].output
    out.forward = lambda h, i: out.LayerNorm(out.dense(h) * container.gain + i)
    model.requires_grad_(False)
    container.gain.requires_grad_(True)
    batch = make_batch(3, 5)
    clipper = PerSampleClipper(model, {"shared.gain": container.gain})
    assert clipper.slow_notice() is None
    clipper.per_sample(lambda: per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification"), 3)
    assert list(clipper.slow) == ["shared.gain"]
    notice = clipper.slow_notice()
    assert notice.startswith("DP: 1 parameter(s) take the slow exact per-sample path") and "shared.gain" in notice and "\n" not in notice


def _exact_per_sample(model, params, batch, seed):
    """Per-sample gradients by the exact batched backward, for the dropout masks of ``seed``."""
    clipper = PerSampleClipper(model, params, check=False)
    clipper.fallback, clipper.rules = dict(params), []
    torch.manual_seed(seed)
    _, contributions = clipper.per_sample(lambda: per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification"), batch["labels"].shape[0])
    clipper.remove()
    return {n: items[0].dense() for n, items in contributions.items()}


@pytest.mark.parametrize("method, randomised", [
    (("fact-tt", {}), True), (("kadaptation", {}), True), (("dsee", {"r": 2, "num_sparse": 4, "dropout": 0.3}), True),
    (("prompt", {"num_tokens": 2}), True), (("lst", {}), True),
    (("kadaptation", {}), False),  # its zero-init u: the dropped weight is zero, the mask still matters
])
def test_dropout_inside_a_vmap_rule_is_replayed_not_redrawn(method, randomised):
    """In training mode the re-run under vmap multiplies by the masks the batch drew (FacT's
    activation dropout, KAdaptation's dropout on the weight), so the per-sample gradients are
    those of the batch's own forward (before: redrawn masks, the first-batch check failed and
    every parameter took the slow path)."""
    model = tiny_bert().train().double()
    delta = attach(model, method)
    if randomised:
        randomize(delta, model, replace=True)
    params = delta.trainable_parameters(model)
    batch = make_batch(4, 6)
    torch.manual_seed(3)
    got, clipper = engine_per_sample(model, params, batch, "classification")
    expected = _exact_per_sample(model, params, batch, seed=3)
    for name in params:
        torch.testing.assert_close(got[name], expected[name].reshape(got[name].shape), rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    assert "batched-backward" not in clipper.describe().values()


def test_other_hooks_on_a_layer_are_replayed_once_and_do_not_leak_into_exact_rules():
    """IA3 scales a Linear's input by a pre-hook and its output by a hook; Houlsby adds its skip
    by a hook on the projection. The vmap rule must re-run them once (it applied the input scale
    twice: exact only while l = 1), and a Linear's own rule must read its output before the skip
    (BitFit's bias beside Houlsby was off by the adapter's Jacobian). Checked after the vectors
    and adapters have moved from their init, where both bugs hid."""
    model = tiny_bert().eval()
    delta = attach(model, ("ia3", {}))
    randomize(delta, model, scale=0.5)
    check(model, delta, make_batch(3, 6), expect_rules={"ia3_l": "module-vmap"})
    model = tiny_bert().eval()
    delta = attach(model, ("houlsby", {"train_layer_norm": False}), ("bitfit", {}))
    randomize(delta, model, scale=0.5)
    check(model, delta, make_batch(3, 6), expect_rules={"attention.output.dense.bias": "linear"})


def test_a_rule_wrong_only_away_from_init_is_caught_by_the_second_check():
    """A rule that ignores a gain starting at 1 agrees with autograd at init; the check after
    ``recheck_after`` batches sees the moved gain and demotes it (exact fallback from then on)."""
    from slimtune.privacy.contributions import Dense
    from slimtune.privacy.rules import RULES, Rule, register_rule

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(64, 32)  # BERT's FFN output layer (intermediate 64 -> hidden 32)
            self.gain = nn.Parameter(torch.ones(32))

        def forward(self, x):
            return self.inner(x) * self.gain

    @register_rule(Gain)
    class WrongAwayFromInit(Rule):  # d/d(gain) of inner(x) * gain, but with gain taken as 1
        kind = "wrong"

        def contributions(self, dtype):
            (name,) = self.params
            return {name: [Dense((b * self.module.inner(call.args[0]).detach()).sum(1) / self.module.gain.detach()) for call, b in self.backprops(dtype)]}

    try:
        model = tiny_bert().eval().double()
        model.requires_grad_(False)
        gain = Gain().double()
        gain.inner.requires_grad_(False)
        model.bert.encoder.layer[0].output.dense = gain
        params = {"gain": gain.gain}
        batch = make_batch(3, 5)

        def forward():
            return per_sample_losses(model(**{k: v for k, v in batch.items() if k != "labels"}), batch, "classification")

        clipper = PerSampleClipper(model, params, recheck_after=2)
        clipper.per_sample(forward, 3)
        assert not clipper.slow
        with torch.no_grad():
            gain.gain.mul_(2.0)
        clipper.per_sample(forward, 3)
        assert not clipper.slow  # not checked on batch 2
        _, contributions = clipper.per_sample(forward, 3)
        assert list(clipper.slow) == ["gain"]
        expected = loop_reference(model, params, batch, "classification")["gain"]
        torch.testing.assert_close(contributions["gain"][0].dense(), expected, rtol=1e-9, atol=1e-11)
    finally:
        RULES.pop(Gain, None)
