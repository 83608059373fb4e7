"""Local intrinsic dimension per submodule: projections, the subspace wrapper, d90 and ranking."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.search.intrinsic_dim import (
    DenseProjection,
    FastfoodProjection,
    IntrinsicDimConfig,
    SubspaceLinear,
    fwht,
    intrinsic_dim_search,
    kind_pattern,
    measure_intrinsic_dims,
    main,
)
from tests.fixtures import attach
from tests.fixtures import tiny_bert


def sylvester(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fwht_is_the_hadamard_matrix():
    x = torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), sylvester(16).double() @ x)


def test_projections_have_unit_norm_columns():
    fastfood = FastfoodProjection(D=64, d=5, seed=0)
    matrix = fastfood.matrix()
    assert matrix.shape == (64, 5)
    torch.testing.assert_close(matrix.norm(dim=0), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(fastfood(torch.arange(5.0)), matrix @ torch.arange(5.0), atol=1e-5, rtol=0)
    dense = DenseProjection(D=50, d=3, seed=0)
    torch.testing.assert_close(dense.matrix.norm(dim=0), torch.ones(3))
    truncated = FastfoodProjection(D=40, d=3, seed=1)  # L = 64, first 40 rows
    assert truncated(torch.ones(3)).shape == (40,)


def test_subspace_linear_moves_the_weight_by_p_z_only():
    torch.manual_seed(0)
    base = nn.Linear(4, 3).requires_grad_(False)
    projection = DenseProjection(12, 2, seed=0)
    layer = SubspaceLinear(base, projection, 2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.z.copy_(torch.tensor([0.5, -2.0]))
    weight = base.weight + (projection.matrix @ layer.z).view(3, 4)
    torch.testing.assert_close(layer(x), x @ weight.T + base.bias)
    layer(x).sum().backward()
    assert layer.z.grad is not None and base.weight.grad is None


class Toy(nn.Module):
    """loss = ||a.weight - target_a||^2 + ||b.weight - W0_b||^2; score = -loss. Only `a` has
    anything to gain; `b` starts at its optimum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(1, 1)
        self.target_a = self.a.weight.detach() + 1.0
        self.start_b = self.b.weight.detach().clone()

    def forward(self, **batch):
        eye = torch.eye(2)  # a(eye) = W^T: the loss sees the weights through the modules' forward
        loss = ((self.a(eye) - self.target_a.T) ** 2).sum() + ((self.b(eye) - self.start_b.T) ** 2).sum() + self.head.bias.pow(2).sum()
        return SimpleNamespace(loss=loss)


def test_d90_is_the_first_size_that_reaches_the_gain_and_no_gain_ranks_last():
    toy = Toy()
    config = IntrinsicDimConfig(dims=[1, 2, 4], steps=120, lr=0.05, full_lr=0.05, target_fraction=0.9, projection="dense")
    result = measure_intrinsic_dims(
        toy, [("a", toy.a), ("b", toy.b)], [{}] * config.steps, lambda m: -float(m(**{}).loss), {"head.bias": toy.head.bias}, config, metric="neg_loss"
    )
    a, b = result.submodules
    threshold = result.head_only_score + 0.9 * (a.full_score - result.head_only_score)
    assert a.full_score > result.head_only_score + 1  # full training of `a` closes the gap of 4
    assert a.d90 == next(d for d, s in a.scores.items() if s >= threshold)
    assert all(s < threshold for d, s in a.scores.items() if d < a.d90)
    assert a.d90 is not None and 1 in a.scores  # a 4-d subspace of the 4 weights is the whole space
    assert b.d90 is None and b.scores == {}  # nothing to gain: no ladder
    assert [row.name for row in result.ranking()] == ["a", "b"]
    assert result.targets() == ["a"]
    torch.testing.assert_close(toy.b.weight, toy.start_b)  # the model is left as it was


def test_kind_pattern_matches_the_same_submodule_in_every_layer_only():
    from slimtune.core.arch import pattern_matches

    pattern = kind_pattern("bert.encoder.layer.3.output.dense")
    assert pattern_matches(pattern, "bert.encoder.layer.0.output.dense")
    assert not pattern_matches(pattern, "bert.encoder.layer.0.attention.output.dense")


def test_search_on_the_tiny_pipeline_emits_targets_kadaptation_and_lora_take(tiny_recipe, tmp_path):
    config = IntrinsicDimConfig(candidates=["query", "value", "intermediate.dense"], dims=[2, 16, 128], steps=6, eval_size=48, lr=0.1, full_lr=1e-2, head_lr=1e-2)
    result = intrinsic_dim_search(tiny_recipe, config)
    assert len(result.submodules) == 6 and 0 <= result.head_only_score <= 1
    for row in result.submodules:
        gains = row.full_score - result.head_only_score >= config.min_gain
        assert bool(row.scores) == gains and all(d in (2, 16, 128) for d in row.scores)
        assert row.d90 is None or row.d90 == max(row.scores)
    ranked = result.ranking()
    assert sorted(ranked, key=result._key) == ranked
    targets = result.targets(top_k=2, reached_only=False)
    kinds = result.targets(granularity="kind", reached_only=False)
    assert len(targets) == 2 and len(kinds) == 3
    for method, fields in [("kadaptation", {"n": 4}), ("lora", {"r": 2})]:
        delta = attach(tiny_bert(), (method, dict(targets=targets, **fields)))
        assert sorted(delta.methods[0].wrapped) == sorted(targets)
        delta = attach(tiny_bert(), (method, dict(targets=kinds[:1], **fields)))
        assert len(delta.methods[0].wrapped) == 2  # one kind = that submodule in both layers
    data = result.to_dict()
    assert data["ranking"][0]["name"] == ranked[0].name and len(data["kinds"]) == 3


def test_entry_point_writes_json_and_bad_dims_are_one_line(tiny_recipe, tmp_path, capsys):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main([str(path), "--candidates", "query", "--dims", "2", "8", "--steps", "2", "--out", str(tmp_path / "dims.json")]) == 0
    assert '"targets"' in capsys.readouterr().out and (tmp_path / "dims.json").is_file()
    with pytest.raises(SlimtuneError, match="strictly increasing"):
        measure_intrinsic_dims(tiny_bert(), [], [], lambda m: 0.0, {}, IntrinsicDimConfig(dims=[8, 2]))
