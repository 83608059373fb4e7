"""A linear update (LoRA, KAdaptation, FacT, DSEE) on a masked base weight acts as ``ΔW ⊙ mask``
(methods/linear_update.py): its output is the formula, merging keeps exactly the base's zeros
and the unmerged outputs, and DP-SGD's and QAT's per-sample gradients stay exact (against a loop
of one-sample backward passes)."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.methods.linear_update import LinearUpdate
from slimtune.sparsity.masks import apply_mask, bake_all, get_mask
from tests.compress.test_qat import _check_under_qat
from tests.fixtures import attach, disable_dropout, make_batch, randomize, tiny_bert
from tests.privacy.test_per_sample import check

METHODS = [("lora", {"r": 3}), ("kadaptation", {}), ("fact-tt", {}), ("dsee", {"r": 2, "num_sparse": 4})]


def masked_model(method, seed=0):
    """The tiny BERT with ``method`` attached, moved off its init, and every wrapped base weight
    masked at 60% kept."""
    model = tiny_bert().eval()
    delta = attach(model, method)
    randomize(delta, model, seed=1, scale=0.2)
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, LinearUpdate)]
    for layer in layers:
        apply_mask(layer.base, "weight", torch.rand(layer.base.weight.shape, generator=generator) < 0.6)
    return model, delta, layers


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_the_update_on_a_masked_base_is_the_masked_formula(method):
    model, _, layers = masked_model(method)
    model.double()
    for layer in layers:
        x = torch.randn(2, 5, layer.base.in_features, dtype=torch.float64)
        kept = get_mask(layer.base, "weight").kept
        dense = layer.base.parametrizations.weight.original
        expected = F.linear(x, dense * kept + layer.delta_weight() * kept, layer.base.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_merging_keeps_the_bases_zeros_and_the_outputs(method):
    model, delta, layers = masked_model(method)
    batch = make_batch(3, 6)
    batch.pop("labels")
    with torch.no_grad():
        unmerged = model(**batch).logits
    kept = {id(layer): get_mask(layer.base, "weight").kept.clone() for layer in layers}
    delta.merge(model)
    bake_all(model)  # what an export does: the masks written into the weights
    with torch.no_grad():
        merged = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for layer in layers:
        weight = layer.base.weight
        assert torch.equal(weight != 0, kept[id(layer)]), "the merged weight's zeros are not the base's"


def test_unmerging_restores_the_stored_weight_exactly():
    model, delta, layers = masked_model(METHODS[0])
    before = [layer.base.parametrizations.weight.original.clone() for layer in layers]
    delta.merge(model)
    delta.unmerge(model)
    assert all(torch.equal(b, layer.base.parametrizations.weight.original) for b, layer in zip(before, layers))


def test_dp_per_sample_gradients_of_lora_on_a_masked_base_are_exact():
    model, delta, _ = masked_model(METHODS[0])
    disable_dropout(model)
    clipper = check(model, delta, make_batch(3, 6), expect_rules={"lora_A": "module-vmap", "lora_B": "module-vmap"})
    assert not clipper.slow


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_qat_per_sample_gradients_on_a_masked_base_are_exact(method):
    model, delta, _ = masked_model(method)
    disable_dropout(model)
    part = {"lora": "lora_A", "kadaptation": "kadapt_u", "fact-tt": "fact_core", "dsee": "sparse_values"}[method[0]]
    _check_under_qat(model, delta, make_batch(3, 6), {part: "qat-linear-update"})
