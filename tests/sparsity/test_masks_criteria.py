"""Masks, criteria, schedules and sparse storage on tiny models, against hand computations."""

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.core.arch import Arch
from slimtune.methods.delta import Delta
from slimtune.methods.lora import LoRA
from slimtune.sparsity import criteria
from slimtune.sparsity.masks import (
    apply_mask,
    check_density,
    density_report,
    kept_from_scores,
    pin_to_optimizer,
    remove_mask,
)
from slimtune.sparsity.schedules import (
    SparsityHook,
    cubic_sparsity,
    iterative_densities,
    large_sparse_width,
    select_targets,
)
from slimtune.features.sparsity import SparsitySection
from slimtune.sparsity.storage import decode_state, encode, encode_state
from tests.tiny import tiny_bert


# -- masks ---------------------------------------------------------------------------------------


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


# -- criteria: a two-layer linear network, by hand ---------------------------------------------------


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(4, 3, bias=False)
        self.fc2 = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def setup():
    model = TwoLayer()
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(5, 4, generator=g), "t": torch.randn(5, 2, generator=g)} for _ in range(2)]
    loss_fn = lambda b: 0.5 * ((model(b["x"]) - b["t"]) ** 2).sum()  # noqa: E731
    targets = {"fc1.weight": (model.fc1, "weight"), "fc2.weight": (model.fc2, "weight")}
    return model, batches, loss_fn, targets


def hand_gradients(model, batches):
    """dL/dW2 = sum (y - t) h^T, dL/dW1 = sum W2^T (y - t) x^T, summed over the batches."""
    W1, W2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    g1, g2 = torch.zeros_like(W1), torch.zeros_like(W2)
    for b in batches:
        h = b["x"] @ W1.T
        err = h @ W2.T - b["t"]
        g2 += err.T @ h
        g1 += (err @ W2).T @ b["x"]
    return g1, g2


def test_snip_and_movement_equal_hand_gradients():
    model, batches, loss_fn, targets = setup()
    g1, g2 = hand_gradients(model, batches)
    W1, W2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    snip = criteria.score("snip", model, targets, batches=batches, loss_fn=loss_fn)
    assert torch.allclose(snip["fc1.weight"], (g1 * W1).abs(), atol=1e-5)
    assert torch.allclose(snip["fc2.weight"], (g2 * W2).abs(), atol=1e-5)
    movement = criteria.score("movement", model, targets, batches=batches, loss_fn=loss_fn)
    assert torch.allclose(movement["fc1.weight"], -(g1 * W1), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # gradients left as found


def test_grasp_equals_explicit_hessian_times_gradient():
    model, batches, loss_fn, targets = setup()
    W1, W2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()

    def loss_of(flat):
        w1, w2 = flat[:12].view(3, 4), flat[12:].view(2, 3)
        return sum(0.5 * ((b["x"] @ w1.T @ w2.T - b["t"]) ** 2).sum() for b in batches)

    flat = torch.cat([W1.flatten(), W2.flatten()])
    H = torch.autograd.functional.hessian(loss_of, flat)
    g1, g2 = hand_gradients(model, batches)
    Hg = H @ torch.cat([g1.flatten(), g2.flatten()])
    grasp = criteria.score("grasp", model, targets, batches=batches, loss_fn=loss_fn)
    assert torch.allclose(grasp["fc1.weight"], W1 * Hg[:12].view(3, 4), rtol=1e-4, atol=1e-4)
    assert torch.allclose(grasp["fc2.weight"], W2 * Hg[12:].view(2, 3), rtol=1e-4, atol=1e-4)


def test_synflow_magnitude_random_by_hand():
    model, _, _, targets = setup()
    W1, W2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    synflow = criteria.score("synflow", model, targets, synflow_forward=lambda: model(torch.ones(1, 4)))
    # R = 1^T |W2| |W1| 1: dR/d|W1|_ij = sum_k |W2|_ki, dR/d|W2|_ki = sum_j |W1|_ij
    assert torch.allclose(synflow["fc1.weight"], W1.abs() * W2.abs().sum(0)[:, None], atol=1e-6)
    assert torch.allclose(synflow["fc2.weight"], W2.abs() * W1.abs().sum(1)[None, :], atol=1e-6)
    assert torch.equal(model.fc1.weight, W1) and torch.equal(model.fc2.weight, W2)  # signs restored exactly
    assert torch.equal(criteria.score("magnitude", model, targets)["fc2.weight"], W2.abs())
    gen = torch.Generator().manual_seed(7)
    expected = [torch.rand(3, 4, generator=gen), torch.rand(2, 3, generator=gen)]
    rand = criteria.score("random", model, targets, seed=7)
    assert torch.equal(rand["fc1.weight"], expected[0]) and torch.equal(rand["fc2.weight"], expected[1])


def test_scores_see_the_mask_and_data_criteria_need_data():
    model, batches, loss_fn, targets = setup()
    kept = torch.ones(3, 4, dtype=torch.bool)
    kept[0, :2] = False
    apply_mask(model.fc1, "weight", kept)
    snip = criteria.score("snip", model, targets, batches=batches, loss_fn=loss_fn)
    assert torch.all(snip["fc1.weight"][0, :2] == 0)
    for name in ("snip", "grasp", "movement"):
        with pytest.raises(SlimtuneError, match="needs|batches"):
            criteria.score(name, model, targets)


# -- schedules -------------------------------------------------------------------------------------


def test_cubic_schedule_formula_at_sample_steps():
    args = dict(initial=0.0, final=0.9, start=10, end=110, frequency=10)
    assert cubic_sparsity(5, **args) == 0.0
    assert cubic_sparsity(10, **args) == 0.0
    assert cubic_sparsity(60, **args) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(65, **args) == cubic_sparsity(60, **args)  # held between pruning steps
    assert cubic_sparsity(30, **args) == pytest.approx(0.9 * (1 - 0.8**3))
    assert cubic_sparsity(110, **args) == pytest.approx(0.9) and cubic_sparsity(500, **args) == pytest.approx(0.9)
    assert cubic_sparsity(60, initial=0.2, final=0.8, start=10, end=110, frequency=10) == pytest.approx(0.8 - 0.6 * 0.125)


def test_schedule_steps_and_densities():
    section = SparsitySection(density=0.4, schedule="gradual", start_step=0, end_step=20, frequency=5)
    hook = SparsityHook(section, None, None, {})
    hook.total_steps = 40
    assert [s for s in range(41) if hook.density_at(s) is not None] == [0, 5, 10, 15, 20]
    assert hook.density_at(20) == pytest.approx(0.4) and hook.density_at(0) == pytest.approx(1.0)
    section = SparsitySection(density=0.125, schedule="iterative", rounds=3)
    hook = SparsityHook(section, None, None, {})
    hook.total_steps = 30
    assert [hook.density_at(s) for s in (0, 10, 20)] == pytest.approx([0.5, 0.25, 0.125])
    assert iterative_densities(0.125, 3)[-1] == pytest.approx(0.125)


def test_large_sparse_width_matches_the_dense_budget():
    for d, m, density in ((384, 24, 0.6), (768, 48, 0.4), (32, 2, 0.5)):
        wide = large_sparse_width(d, m, density)
        dense_budget = 2 * d * m + m + d
        sparse_nonzeros = density * 2 * d * wide + wide + d
        assert abs(sparse_nonzeros - dense_budget) <= (2 * d * density + 1) / 2 + 1e-9  # within half a width unit
    assert large_sparse_width(384, 24, 0.6) == 40
    assert large_sparse_width(384, 24, 0.5, bias=False) == 48


# -- targets and bad input ---------------------------------------------------------------------------


def test_targets_and_bad_input():
    model = tiny_bert()
    delta = Delta([LoRA({"r": 2})])
    delta.attach(model, Arch.of(model))
    targets = select_targets(model, delta, "delta")
    assert sorted(targets)[0].endswith("attention.self.query.lora_A") and len(targets) == 8
    base = select_targets(model, delta, "base")
    assert "bert.encoder.layer.0.attention.self.query.base.weight" in base and not any("classifier" in n for n in base)
    with pytest.raises(SlimtuneError, match="frozen"):
        select_targets(model, delta, "delta", include=["attention.self.key.weight"])
    delta.merge(model)
    with pytest.raises(SlimtuneError, match="merged"):
        select_targets(model, delta, "base")


def test_sparse_storage_bytes_and_round_trip():
    torch.manual_seed(0)
    value = torch.randn(64, 64)
    for density, key in ((0.02, "indices"), (0.6, "bitmap")):
        kept = torch.rand(64, 64) < density
        parts = encode("w", value, kept)
        assert f"w::sparse_{key}" in parts
        stored = sum(t.numel() * t.element_size() for t in parts.values())
        n_kept = int(kept.sum())
        expected = n_kept * 4 + 16 + (n_kept * 2 if key == "indices" else 64 * 64 // 8)
        assert stored == expected < 64 * 64 * 4
        dense, masks = decode_state(parts)
        assert torch.equal(dense["w"], value * kept) and torch.equal(masks["w"], kept)
    # A mask too dense to pay off stays a dense tensor.
    assert set(encode("w", value, torch.rand(64, 64) < 0.99)) == {"w"}
    layer = nn.Linear(64, 64)
    apply_mask(layer, "weight", torch.rand(64, 64) < 0.1)
    state = encode_state(layer, {"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    assert "weight::sparse_values" in state and "bias" in state
