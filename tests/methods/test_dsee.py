"""DSEE: the decomposition that picks S's support, the layer against its formula, the closed-form
parameter count, and stage 2 (merge, prune, re-tune) end to end on the tiny model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimtune.errors import SlimtuneError
from slimtune.core.arch import Arch
from slimtune.methods.dsee import DSEE, DSEELinear, godec, sparse_support
from slimtune.recipe import validate_recipe
from slimtune.runner import evaluate_run, train_run
from tests.fixtures import tiny_bert, token_batch


def synthetic(seed=0, rows=64, cols=48, rank=3, nnz=40):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    sparse = torch.zeros(rows * cols)
    support = torch.randperm(rows * cols, generator=g)[:nnz]
    sparse[support] = torch.randn(nnz, generator=g).sign() * 5
    return low, sparse.view(rows, cols), support


def test_decomposition_reconstructs_low_rank_plus_sparse():
    low, sparse, support = synthetic()
    L, S = godec(low + sparse, rank=3, cardinality=40, iterations=30)
    assert torch.allclose(L + S, low + sparse, atol=1e-4)
    assert torch.allclose(L, low, atol=1e-4) and torch.allclose(S, sparse, atol=1e-4)
    chosen = sparse_support(low + sparse, 40, "decomposition", rank=3, iterations=30)
    assert set(chosen.tolist()) == set(support.tolist())
    # Magnitude picks |W|'s largest entries instead: the low-rank part's big entries compete.
    assert sparse_support(low + sparse, 40, "magnitude").numel() == 40


def test_layer_forward_equals_formula_and_merge_is_exact():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    indices = torch.tensor([0, 5, 17, 63, 119])
    layer = DSEELinear(base, r=4, alpha=8.0, indices=indices)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.sparse_values.normal_()
    S = torch.zeros(10 * 12)
    S[indices] = layer.sparse_values.detach()
    S = S.view(10, 12)
    x = torch.randn(3, 12)
    expected = F.linear(x, base.weight + 2.0 * (layer.lora_B @ layer.lora_A + S), base.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    before = base.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, before)


def test_param_count_closed_form():
    model = tiny_bert()
    method = DSEE({"r": 4, "num_sparse": 10, "decomposition_rank": 4})
    method.attach(model, Arch.of(model))
    # query and value of 2 layers, 32 x 32: r (32 + 32) + N each.
    assert method.param_count(model) == method.expected_param_count(model) == 4 * (4 * 64 + 10)
    out = model(**token_batch()).logits
    assert torch.isfinite(out).all()


def dsee_recipe(tiny_recipe, **fields):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "dsee", "r": 4, "num_sparse": 16, "decomposition_rank": 4, **fields}
    return recipe


@pytest.mark.parametrize("prune", ["heads", "unstructured"])
def test_stage2_prunes_retunes_and_reloads(tmp_path, tiny_recipe, prune):
    recipe = dsee_recipe(tiny_recipe, prune=prune, heads_per_layer=2, prune_ratio=0.5)
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    info = report["dsee"]
    assert info["stage"] == 2 and info["stage2_step"] == 4
    if prune == "heads":
        assert info["flops_saved"] > 0.1  # 2 of 4 heads gone in both layers
        assert all(len(h) == 2 for h in info["removed_heads"].values())
        assert report["inference"]["flops_per_example"] == info["flops_per_example_after"]
    else:
        assert abs(info["weight_density"] - 0.5) < 1e-3
        assert info["flops_saved"] == 0  # masked zeros still cost dense FLOPs
        assert info["final_weight_density"] <= 0.5 + 1e-3  # the re-tuned update keeps the zeros
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == report["metrics"]


def test_too_many_heads_is_one_line_error(tmp_path, tiny_recipe):
    recipe = dsee_recipe(tiny_recipe, prune="heads", heads_per_layer=4)
    with pytest.raises(SlimtuneError, match="heads_per_layer"):
        train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
