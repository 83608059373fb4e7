"""Rank pruning (FLOP; Xia & Shin's rank strategy): the SVD factorisation, the gates' expected
size, the Lagrangian budget, the compiled mask, and a run that reloads pruned."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtune.methods.rank_pruning import FactorizedLinear, RankBudget
from slimtune.recipe import validate_recipe
from slimtune.sparsity.hard_concrete import get_gate
from tests.fixtures import attach, tiny_bert


def test_the_ungated_factorisation_is_the_dense_weight():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    layer = FactorizedLinear.from_linear(linear)
    assert layer.left.shape == (7, 7) and layer.right.shape == (7, 12) and layer.bias is linear.bias
    torch.testing.assert_close(layer.weight(), linear.weight, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-6, rtol=1e-6)


def test_the_expected_size_counts_each_open_component_at_in_plus_out():
    model = tiny_bert()
    delta = attach(model, ("rank-pruning", {"density": 0.5}))
    method = delta.methods[0]
    assert len(method.layers) == 2 * 6  # q, k, v, o, FFN in and out of both layers
    # log α = 0 at init (keep_prob 0.5): P(z != 0) = sigmoid(-β log(-l / r)) for every gate.
    p_open = 1 / (1 + math.exp((2 / 3) * math.log(0.1 / 1.1)))
    expected = sum(p_open * min(l.in_features, l.out_features) * (l.in_features + l.out_features) for l in method.layers.values())
    assert float(method.expected_size().detach()) == pytest.approx(expected, rel=1e-5)
    assert method.dense_size == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert delta.methods[0].expected_param_count(model) == sum(p.numel() for p in delta.methods[0].trainable_parameters(model).values())


class Trainer:
    """What the budget hook reads of the trainer."""

    def __init__(self, step, total, lr=1e-3):
        self.step, self.total_steps, self.step_skipped = step, total, False
        self.cfg = type("Cfg", (), {"lr": lr})()


def test_the_lagrangian_pushes_the_gates_towards_the_budget_and_lambda_up():
    model = tiny_bert()
    delta = attach(model, ("rank-pruning", {"density": 0.2, "warmup": 0.5}))
    method = delta.methods[0]
    hook = RankBudget(method)
    trainer = Trainer(step=100, total=100)
    hook.on_train_begin(trainer)
    assert hook.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # FLOP: lr x prune_lr
    assert set(method.learning_rate_factors(model).values()) == {3.0} and len(method.learning_rate_factors(model)) == 12
    assert hook.target_density(Trainer(0, 100)) == 1.0 and hook.target_density(Trainer(25, 100)) == pytest.approx(0.6)
    assert hook.target_density(trainer) == pytest.approx(0.2)
    with torch.no_grad():
        hook.lambdas.fill_(1.0)
    hook.on_after_backward(trainer)
    gate = get_gate(next(iter(method.layers.values())), "components")
    # Expected sparsity below the target (λ > 0): the gates' log α get a positive gradient, so
    # descent lowers them and closes components.
    assert hook.last["expected_density"] > 0.2 and (gate.log_alpha.grad > 0).all()
    assert hook.lambdas.grad[0] < 0  # d/dλ₁ = ŝ - t < 0: ascent lowers λ₁ (makes the penalty bite)
    before = hook.lambdas.detach().clone()
    hook.on_step_end(trainer)
    assert not torch.equal(hook.lambdas.detach(), before)


def test_finalize_keeps_round_expected_l0_components_scaled_by_the_compiled_mask():
    torch.manual_seed(0)
    model = tiny_bert()
    delta = attach(model, ("rank-pruning", {"density": 0.5}))
    method = delta.methods[0]
    name, layer = next(iter(method.layers.items()))
    gate = get_gate(layer, "components")
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6, 6, layer.rank))
    keep = round(float(gate.expected_l0().detach()))
    left, right = layer.left.detach().clone(), layer.right.detach().clone()
    log_alpha = gate.log_alpha.detach().clone()
    summary = method.finalize()
    assert layer.rank == keep == summary["ranks"][name] and get_gate(layer, "components") is None
    kept = torch.argsort(log_alpha, descending=True)[:keep].sort().values
    scale = torch.sigmoid(log_alpha[kept] / (2 / 3) * 0.8)
    torch.testing.assert_close(layer.weight(), (left[:, kept] * scale) @ right[kept])
    assert summary["kept_parameters"] == sum(l.rank * (l.in_features + l.out_features) for l in method.layers.values())


def test_a_rank_pruned_run_reloads_its_pruned_factors(tiny_recipe, tmp_path):
    from slimtune.runner import evaluate_run, train_run

    tiny_recipe["method"] = {"name": "rank-pruning", "density": 0.3, "warmup": 0.3}
    tiny_recipe["train"].update(max_steps=40, lr=5e-2)
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    section = report["rank_pruning"]
    assert 0 < section["kept_density"] < 1 and section["kept_components"] < section["components"]
    assert evaluate_run(tmp_path / "run")["metrics"] == pytest.approx(report["metrics"])


def test_the_delta_loads_in_either_shape():
    torch.manual_seed(0)
    model = tiny_bert()
    delta = attach(model, ("rank-pruning", {}))
    method = delta.methods[0]
    searching = {k: v.clone() for k, v in delta.state_dict(model).items()}
    with torch.no_grad():
        next(iter(method.layers.values())).parametrizations.components[0].log_alpha.fill_(-5.0)
    method.finalize()
    pruned = {k: v.clone() for k, v in delta.state_dict(model).items()}
    delta.load_state_dict(model, searching)  # back to the gated full rank
    assert not method.finalized and all(get_gate(l, "components") is not None for l in method.layers.values())
    fresh_model = tiny_bert()
    fresh = attach(fresh_model, ("rank-pruning", {}))
    fresh.load_state_dict(fresh_model, pruned)  # a finished run onto a freshly built model
    first = next(iter(fresh.methods[0].layers))
    assert fresh.methods[0].finalized and fresh.methods[0].layers[first].rank == pruned[f"{first}.left"].shape[1] < 32
