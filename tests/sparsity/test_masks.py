"""Masks (slimtune.sparsity.masks) on tiny models, against hand computations: masked entries stay zero through AdamW, top-k masks local and global."""

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.sparsity.masks import apply_mask, check_density, density_report, kept_from_scores, pin_to_optimizer, remove_mask


def test_masked_entries_stay_zero_through_adamw_with_weight_decay():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    weight = layer.weight
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.5)
    # A few unmasked steps first, so Adam has moments for entries that get masked later.
    for _ in range(3):
        layer(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    kept = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    apply_mask(layer, "weight", kept)
    assert layer.parametrizations.weight.original is weight  # same Parameter: the optimizer still holds it
    pin_to_optimizer(layer, opt)
    dense_before = weight.detach().clone()
    for _ in range(5):
        layer(torch.randn(4, 6)).pow(2).sum().backward()
        assert torch.all(weight.grad[~kept] == 0)
        opt.step()
        opt.zero_grad()
        assert torch.all(layer.weight[~kept] == 0)
    assert torch.equal(weight.detach()[~kept], dense_before[~kept])  # dense value never changed
    assert torch.all(weight.detach()[kept] != dense_before[kept])  # kept entries trained
    assert torch.all(opt.state[weight]["exp_avg"][~kept] == 0) and torch.all(opt.state[weight]["exp_avg_sq"][~kept] == 0)
    assert density_report(layer)["density"] == pytest.approx(kept.float().mean().item())
    trained = weight.detach().clone()
    remove_mask(layer, "weight", bake=False)  # restore: the dense tensor as it is
    assert type(layer) is nn.Linear and torch.equal(layer.weight, trained)
    apply_mask(layer, "weight", kept)
    remove_mask(layer, "weight", bake=True)  # bake: zeros for good
    assert torch.all(layer.weight[~kept] == 0) and layer.weight is weight


def test_top_k_masks_local_and_global():
    scores = {"a": torch.tensor([[1.0, 5.0], [3.0, 0.5]]), "b": torch.tensor([4.0, 2.0, 0.1, 6.0])}
    local = kept_from_scores(scores, 0.5, "local")
    assert local["a"].tolist() == [[False, True], [True, False]] and local["b"].tolist() == [True, False, False, True]
    glob = kept_from_scores(scores, 0.5, "global")  # top 4 of 8: 6, 5, 4, 3
    assert glob["a"].tolist() == [[False, True], [True, False]] and glob["b"].tolist() == [True, False, False, True]
    glob = kept_from_scores(scores, 0.25, "global")  # top 2: 6, 5
    assert glob["a"].sum() == 1 and glob["b"].tolist() == [False, False, False, True]
    for bad in (0, -0.1, 1.01, float("nan"), True):
        with pytest.raises(SlimtuneError, match="fraction KEPT"):
            check_density(bad)
