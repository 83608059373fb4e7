"""Hard-concrete gates (slimtune.sparsity.hard_concrete) against closed forms computed by hand:
expected L0, the test-time gate, the stretched hard-concrete CDF (Monte Carlo), gradients,
granularities, the parametrisation round trip and tickets drawn from the gate scores."""

import math

import pytest
import torch
from torch import nn

from tests.fixtures import attach, randomize_lora_b, token_batch, tiny_bert
from slimtune.errors import SlimtuneError
from slimtune.sparsity.hard_concrete import (
    HardConcreteGate, apply_gate, draw_ticket, gate_l0, gate_parameters, gated_tensors, set_gate_sampling,
    ticket_masks,
)
from slimtune.sparsity.masks import Mask, get_mask

L, R, BETA = -0.1, 1.1, 2 / 3


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def cdf_s(t: float, log_alpha: float, beta: float = BETA) -> float:
    """P(s <= t) for the binary concrete s = sigmoid((logit u + log_alpha) / beta)."""
    return sigmoid(beta * (math.log(t) - math.log(1 - t)) - log_alpha)


def closed_form(log_alpha: float, l: float = L, r: float = R, beta: float = BETA) -> tuple[float, float, float]:
    """P(z = 0), P(z = 1), E[z] of z = clamp(s (r - l) + l, 0, 1); E[z] = int_0^1 P(z > t) dt
    by the midpoint rule."""
    p0 = cdf_s(-l / (r - l), log_alpha, beta)
    p1 = 1 - cdf_s((1 - l) / (r - l), log_alpha, beta)
    n = 20000
    mean = sum(1 - cdf_s(((k + 0.5) / n - l) / (r - l), log_alpha, beta) for k in range(n)) / n
    return p0, p1, mean


def test_init_follows_the_official_formula_and_test_time_gate_is_keep_prob():
    gate = HardConcreteGate((3, 4), keep_prob=0.9).eval()
    q = (0.9 - L) / (R - L)
    assert torch.allclose(gate.log_alpha, torch.full((3, 4), math.log(q / (1 - q))))
    assert torch.allclose(gate.gate(), torch.full((3, 4), 0.9))


def test_test_time_gate_matches_its_formula():
    gate = HardConcreteGate((7,)).eval()
    values = [-6.0, -2.5, -0.3, 0.0, 0.4, 1.7, 5.0]
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(values))
    expected = [min(1.0, max(0.0, sigmoid(a) * (R - L) + L)) for a in values]
    assert gate.gate().tolist() == pytest.approx(expected, abs=1e-6)
    assert gate.gate()[0] == 0 and gate.gate()[-1] == 1  # the stretch really clamps


def test_expected_l0_matches_the_closed_form_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 6))
    apply_gate(model[0], "weight")  # 20 gates
    apply_gate(model[1], "weight", granularity="row", beta=0.5)  # 6 gates of 4 entries
    with torch.no_grad():
        for p in gate_parameters(model):
            p.normal_(0, 2)
    a0 = model[0].parametrizations.weight[0].log_alpha.flatten().tolist()
    a1 = model[1].parametrizations.weight[0].log_alpha.flatten().tolist()
    l0_0 = sum(sigmoid(a - BETA * math.log(-L / R)) for a in a0)
    l0_1 = sum(sigmoid(a - 0.5 * math.log(-L / R)) for a in a1)
    assert float(gate_l0(model).detach()) == pytest.approx(l0_0 + l0_1, rel=1e-5)
    assert float(gate_l0(model, reduction="mean").detach()) == pytest.approx(l0_0 / 20 + l0_1 / 6, rel=1e-5)
    assert float(gate_l0(model, weighted=True).detach()) == pytest.approx(l0_0 + 4 * l0_1, rel=1e-5)
    # The same as 1 - P(z = 0) of the stretched distribution.
    assert sigmoid(a0[0] - BETA * math.log(-L / R)) == pytest.approx(1 - closed_form(a0[0])[0], abs=1e-9)


def test_monte_carlo_sampling_matches_the_stretched_hard_concrete_cdf():
    log_alphas = [-2.0, 0.0, 1.6, 3.0]
    n = 50000  # 4 x 50k = 200k samples
    gate = HardConcreteGate((len(log_alphas), n)).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alphas)[:, None].expand(-1, n))
    torch.manual_seed(123)
    with torch.no_grad():
        z = gate.gate().double()
    for row, a in enumerate(log_alphas):
        p0, p1, mean = closed_form(a)
        # binomial standard error <= 0.5 / sqrt(50k) = 0.0022: 0.01 is > 4 standard errors.
        assert float((z[row] == 0).double().mean()) == pytest.approx(p0, abs=0.01)
        assert float((z[row] == 1).double().mean()) == pytest.approx(p1, abs=0.01)
        assert float(z[row].mean()) == pytest.approx(mean, abs=0.01)
    assert float(((z > 0) & (z < 1)).double().mean()) > 0.1  # not a degenerate 0/1 gate


def test_gradients_flow_to_log_alpha_through_samples():
    gate = HardConcreteGate((40,), beta=0.5).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 40))
    weights = torch.linspace(0.5, 2.0, 40)
    torch.manual_seed(7)
    (gate.gate() * weights).sum().backward()
    # The same sample by hand, differentiated by autograd on the hand formula.
    torch.manual_seed(7)
    u = torch.rand(40).clamp(1e-6, 1 - 1e-6)
    a = torch.linspace(-3, 3, 40).requires_grad_(True)
    z = (torch.sigmoid((u.log() - (1 - u).log() + a) / 0.5) * (R - L) + L).clamp(0, 1)
    (z * weights).sum().backward()
    assert torch.allclose(gate.log_alpha.grad, a.grad, atol=1e-6)
    inside = (z > 0) & (z < 1)
    assert inside.any() and torch.all(gate.log_alpha.grad[inside] > 0)
    assert torch.all(gate.log_alpha.grad[~inside] == 0)  # clamped samples pass no gradient


@pytest.mark.parametrize("granularity, settings, index", [
    ("weight", {}, lambda i, j: (i, j)),
    ("row", {}, lambda i, j: (i, 0)),
    ("column", {}, lambda i, j: (0, j)),
    ("head", {"head_size": 2}, lambda i, j: (i // 2, 0)),
    ("head", {"head_size": 3, "head_dim": 1}, lambda i, j: (0, j // 3)),
    ("block", {"block": (2, 3)}, lambda i, j: (i // 2, j // 3)),
])
def test_granularity_broadcasts_each_gate_onto_its_entries(granularity, settings, index):
    layer = nn.Linear(6, 8).eval()
    gate = apply_gate(layer, "weight", granularity, **settings)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape) * 3)
    z = gate.gate()
    original = layer.parametrizations.weight.original
    expected = torch.empty(8, 6)
    for i in range(8):
        for j in range(6):
            expected[i, j] = original[i, j] * z[index(i, j)]
    assert torch.equal(layer.weight, expected)
    n_gates = {"weight": 48, "row": 8, "column": 6, "head": 4 if settings.get("head_dim", 0) == 0 else 2, "block": 8}
    assert gate.log_alpha.numel() == n_gates[granularity]


def test_parametrisation_round_trip_keeps_the_original():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    weight = layer.weight
    dense_before = weight.detach().clone()
    gate = apply_gate(layer, "weight", "column")
    assert layer.parametrizations.weight.original is weight
    layer.train()
    torch.manual_seed(4)
    sampled = layer.weight
    torch.manual_seed(4)
    assert torch.equal(sampled, weight * gate.expand(gate.sample()))
    assert not torch.equal(layer.weight, sampled)  # a fresh sample per read while training
    layer.eval()
    assert torch.equal(layer.weight, weight * gate.expand(gate.deterministic()))
    out = layer(torch.randn(2, 5))
    out.sum().backward()
    assert gate.log_alpha.grad is not None and weight.grad is not None
    assert torch.equal(weight.detach(), dense_before)


def test_sampling_follows_the_training_flag_and_can_be_switched():
    model = nn.Sequential(nn.Linear(4, 4))
    apply_gate(model[0], "weight")
    model.train()
    assert not torch.equal(model[0].weight, model[0].weight)
    model.eval()
    assert torch.equal(model[0].weight, model[0].weight)
    model.train()
    set_gate_sampling(model, False)
    assert model[0].training and torch.equal(model[0].weight, model[0].weight)
    set_gate_sampling(model, True)
    assert not torch.equal(model[0].weight, model[0].weight)


def test_gates_on_a_delta_tensor_lora_ranks():
    torch.manual_seed(0)
    model = tiny_bert()
    attach(model, ("lora", {"r": 4}))
    randomize_lora_b(model)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    for layer in layers:
        apply_gate(layer, "lora_A", "row")  # one gate per rank
    assert len(list(gated_tensors(model))) == len(layers)
    assert all(p.numel() == 4 for p in gate_parameters(model))
    model.eval()
    batch = token_batch()
    before = model(**batch).logits
    with torch.no_grad():  # close ranks 1..3 of every layer: the model is LoRA with rank 1
        for p in gate_parameters(model):
            p.copy_(torch.tensor([[10.0], [-10.0], [-10.0], [-10.0]]))
    closed = model(**batch).logits
    for layer in layers:
        assert torch.all(layer.lora_A[1:] == 0) and torch.equal(layer.lora_A[0], layer.parametrizations.lora_A.original[0])
    assert not torch.allclose(before, closed)
    model.train()
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None for p in gate_parameters(model))


def test_ticket_keeps_exactly_round_density_times_n_by_log_alpha_deterministically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    for layer in model:
        apply_gate(layer, "weight")
    with torch.no_grad():
        for p in gate_parameters(model):
            p.copy_(torch.randint(-3, 4, p.shape).float())  # many ties
    scores = torch.cat([p.detach().flatten() for p in gate_parameters(model)])
    n = scores.numel()  # 50
    for density in (0.33, 0.5, 0.9):
        masks = ticket_masks(model, density)
        kept = torch.cat([m.flatten() for m in masks.values()])
        assert int(kept.sum()) == round(density * n)
        assert scores[kept].min() >= scores[~kept].max()
        again = ticket_masks(model, density)
        assert all(torch.equal(masks[k], again[k]) for k in masks)
    local = ticket_masks(model, 0.5, scope="local")
    assert [int(m.sum()) for m in local.values()] == [round(0.5 * 35), round(0.5 * 15)]


def test_draw_ticket_replaces_gates_with_binary_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    apply_gate(model[0], "weight", "head", head_size=2)
    apply_gate(model[1], "weight")
    with torch.no_grad():
        for p in gate_parameters(model):
            p.normal_()
    originals = [layer.parametrizations.weight.original for layer in model]
    dense = [o.detach().clone() for o in originals]
    expected = ticket_masks(model, 0.5)
    masks = draw_ticket(model, 0.5)
    assert list(gated_tensors(model)) == []
    for i, layer in enumerate(model):
        mask = get_mask(layer, "weight")
        assert isinstance(mask, Mask) and torch.equal(mask.kept, masks[f"{i}.weight"])
        assert torch.equal(masks[f"{i}.weight"], expected[f"{i}.weight"])
        assert layer.parametrizations.weight.original is originals[i]
        assert torch.equal(layer.weight, dense[i] * masks[f"{i}.weight"])
    # head gates: whole 2-row heads kept or dropped; 4 + 16 gates, 10 kept
    head_rows = masks["0.weight"].view(4, 2, 6)
    assert torch.all(head_rows == head_rows[:, :1, :1])
    assert int(head_rows[:, 0, 0].sum()) + int(masks["1.weight"].sum()) == 10


@pytest.mark.parametrize("kwargs, field", [
    ({"granularity": "neuron"}, "granularity"),
    ({"granularity": "head", "head_size": 5}, "head_size"),
    ({"granularity": "head"}, "head_size"),
    ({"granularity": "block", "block": (4, 4)}, "block"),
    ({"keep_prob": 1.0}, "keep_prob"),
    ({"keep_prob": 0}, "keep_prob"),
    ({"beta": 0}, "beta"),
    ({"beta": -1.0}, "beta"),
    ({"limits": (0.0, 1.1)}, "limits"),
    ({"limits": (-0.1, 1.0)}, "limits"),
])
def test_bad_values_are_one_line_errors(kwargs, field):
    with pytest.raises(SlimtuneError) as info:
        apply_gate(nn.Linear(6, 8), "weight", **kwargs)
    message = str(info.value)
    assert "\n" not in message and f"hard_concrete.{field}" in message


def test_a_second_gate_and_a_ticket_without_gates_are_refused():
    layer = nn.Linear(3, 3)
    apply_gate(layer, "weight")
    with pytest.raises(SlimtuneError, match="already gated"):
        apply_gate(layer, "weight")
    with pytest.raises(SlimtuneError, match="no hard-concrete gates"):
        ticket_masks(nn.Linear(3, 3), 0.5)
