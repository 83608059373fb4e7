"""Pruning criteria (slimtune.sparsity.criteria) against hand computations: SNIP, movement, GraSP, SynFlow, Wanda, magnitude, random."""

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.sparsity import criteria
from slimtune.sparsity.masks import apply_mask


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


def test_wanda_is_weight_magnitude_times_the_input_feature_norm_over_real_tokens():
    model, _, _, targets = setup()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(2, 3, 4, generator=g), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])} for _ in range(2)]
    loss_fn = lambda b: model(b["x"]).sum()  # noqa: E731
    W1, W2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    real_x = torch.cat([b["x"][b["attention_mask"].bool()] for b in batches])  # (tokens, 4), padding dropped
    norm1 = real_x.pow(2).sum(0).sqrt()
    norm2 = (real_x @ W1.T).pow(2).sum(0).sqrt()
    wanda = criteria.score("wanda", model, targets, batches=batches, loss_fn=loss_fn)
    torch.testing.assert_close(wanda["fc1.weight"], W1.abs() * norm1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wanda["fc2.weight"], W2.abs() * norm2, rtol=1e-5, atol=1e-6)
    with pytest.raises(SlimtuneError, match="data"):
        criteria.score("wanda", model, targets)
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    other = Scaled()
    with pytest.raises(SlimtuneError, match="'wanda' scores the weight of a Linear layer.*'scale' is not one"):
        criteria.score("wanda", other, {"scale": (other, "scale")}, batches=batches, loss_fn=lambda b: other(b["x"]).sum())


def test_row_scope_prunes_the_same_count_in_every_output_row():
    from slimtune.sparsity.masks import kept_from_scores

    g = torch.Generator().manual_seed(0)
    scores = {"w": torch.rand(5, 10, generator=g)}
    kept = kept_from_scores(scores, 0.65, "row")["w"]
    assert kept.sum(1).tolist() == [10 - int(10 * 0.35)] * 5  # the official int(columns * sparsity) removed per row
    for row, mask in zip(scores["w"], kept):
        assert row[mask].min() > row[~mask].max()  # the highest scores of each row kept
