"""The sparsity section (slimtune.sparsity.schedules): the cubic and iterative schedules, target
selection, and Large-Sparse as a recipe switch (``sparsity.large_sparse: true``): the method is
widened so that its non-zeros at the density equal the dense method's parameters; a one-line
error where it cannot apply. Also: a sparsity section composed with DSEE's stage 2."""

import copy

import pytest

from slimtune.errors import SlimtuneError
from slimtune.core.arch import Arch
from slimtune.methods.delta import Delta
from slimtune.methods.lora import LoRA
from slimtune.recipe import validate_recipe
from slimtune.runner import build, evaluate_run, train_run
from slimtune.features.sparsity import SparsitySection
from slimtune.sparsity.schedules import SparsityHook, cubic_sparsity, iterative_densities, large_sparse_width, select_targets
from tests.fixtures import tiny_bert


def recipe_with(tiny_recipe, method, **sparsity):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = method
    recipe["train"]["max_steps"] = 4
    recipe["sparsity"] = {"target": "delta", "criterion": "magnitude", "density": 0.5, "large_sparse": True, **sparsity}
    return recipe


def weights_nonzero(model, delta):
    return sum(int((p != 0).sum()) for n, p in delta.trainable_parameters(model).items()
               if p.dim() >= 2 and n not in set(delta.head_names))


def dense_count(model, delta):
    return sum(p.numel() for n, p in delta.trainable_parameters(model).items() if p.dim() >= 2 and n not in set(delta.head_names))


# The widths by hand, d = 32, density 0.5: m' = round(m (2 d + 1) / (2 d density + 1)) = round(m 65 / 33):
# m = 2 -> 130 / 33 = 3.94 -> 4; m = 4 -> 260 / 33 = 7.88 -> 8; LoRA: r / density = 4 / 0.5 = 8.
# LoRA prunes after a step: at init its B is all zeros, which magnitude cannot rank (refused below).
@pytest.mark.parametrize("method,field,before,after,at", [
    ({"name": "houlsby", "reduction_factor": 16}, "width", 2, 4, "init"),
    ({"name": "pfeiffer", "reduction_factor": 8}, "width", 4, 8, "init"),
    ({"name": "lora", "r": 4}, "r", 4, 8, 1),
])
def test_large_sparse_widens_to_the_dense_budget(tmp_path, tiny_recipe, method, field, before, after, at):
    recipe = validate_recipe(recipe_with(tiny_recipe, method, at=at))
    dense = build(validate_recipe({k: v for k, v in recipe_with(tiny_recipe, method).items() if k != "sparsity"}))
    built = build(recipe)
    # Weights of the wide delta at density 0.5 == weights of the dense delta.
    assert dense_count(built.model, built.delta) == 2 * dense_count(dense.model, dense.delta)
    report = train_run(recipe, tmp_path / "run", progress=False)
    assert report["sparsity"]["large_sparse"][method["name"]][field] == [before, after]
    assert report["sparsity"]["history"][0]["measured"] == pytest.approx(0.5, abs=1e-3)
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == report["metrics"]


def test_large_sparse_lora_at_init_with_zero_b_is_one_line_error(tmp_path, tiny_recipe):
    """At init LoRA's B is all zeros: left dense, the widened LoRA would exceed the dense budget."""
    with pytest.raises(SlimtuneError, match=r"sparsity.large_sparse: 'magnitude' cannot rank 4 x lora_B at initialisation .*dense method's non-zero budget") as err:
        train_run(validate_recipe(recipe_with(tiny_recipe, {"name": "lora", "r": 4})), tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)


def test_large_sparse_nonzeros_equal_the_dense_adapter():
    from slimtune.methods.adapter import Houlsby
    from slimtune.core.arch import Arch
    from slimtune.recipe import parse_methods
    from slimtune.sparsity.schedules import large_sparse_specs

    hidden, density = 384, 0.6
    specs = parse_methods({"name": "houlsby", "reduction_factor": 16}, "test")
    wide, changes = large_sparse_specs(specs, hidden, density)
    assert changes["houlsby"]["width"] == [24, 40]  # the paper's MiniLM-size example
    assert Houlsby(wide[0].config).bottleneck_width(hidden) == 40
    model = tiny_bert()
    method = Houlsby(large_sparse_specs(parse_methods({"name": "houlsby", "reduction_factor": 4}, "t"), 32, 0.5)[0][0].config)
    method.attach(model, Arch.of(model))
    assert method.bottleneck_width(32) == 16  # m = 32 // 4 = 8: round(8 * 65 / 33) = round(15.76)
    assert {tuple(a.down_weight.shape) for a in method.adapters.values()} == {(16, 32)}  # the attached adapters are that wide


@pytest.mark.parametrize("change,message", [
    ({"method": {"name": "dsee", "r": 4, "num_sparse": 4, "decomposition_rank": 4}}, "method 'dsee' has no width to widen"),
    ({"sparsity": {"target": "base"}}, "needs target: delta"),
    ({"sparsity": {"include": ["adapter_down.weight"]}}, "drop include"),
    ({"method": {"name": "lora", "r": 4, "train_a": False}}, r"method 'lora' has train_a: false \(FFA-LoRA\)"),
])
def test_large_sparse_where_it_cannot_apply_is_one_line_error(tiny_recipe, change, message):
    recipe = recipe_with(tiny_recipe, change.get("method", {"name": "houlsby", "reduction_factor": 4}), **change.get("sparsity", {}))
    with pytest.raises(SlimtuneError, match=message) as err:
        build(validate_recipe(recipe))
    assert "\n" not in str(err.value)


def test_sparsity_with_dsee_stage2(tmp_path, tiny_recipe):
    """A sparsity section on DSEE's stage-1 update works; with stage 2 it is refused up front:
    stage 2 merges the (masked) update into the weights and replaces the modules, so a delta mask
    would silently stop applying, and base masks would be merged over and cut by head removal."""
    dsee = {"name": "dsee", "r": 4, "num_sparse": 16, "decomposition_rank": 4}
    recipe = copy.deepcopy(tiny_recipe)
    recipe["train"]["max_steps"] = 4
    recipe["method"] = dsee
    recipe["sparsity"] = {"target": "delta", "criterion": "magnitude", "density": 0.5}
    report = train_run(validate_recipe(recipe), tmp_path / "stage1", progress=False)  # stage 1 only: fine
    # DSEE's B starts at zero: magnitude cannot rank it, so it stays dense and the rest is at 0.5.
    assert [n.rpartition(".")[2] for n in report["sparsity"]["left_dense"]] == ["lora_B"] * 4
    assert report["sparsity"]["history"][0]["ranked_density"] == pytest.approx(0.5, abs=1e-3)
    assert evaluate_run(tmp_path / "stage1")["metrics"] == report["metrics"]
    for target, prune in (("delta", "heads"), ("base", "unstructured"), ("base", "heads")):
        recipe["method"] = {**dsee, "prune": prune, "heads_per_layer": 1}
        recipe["sparsity"] = {"target": target, "criterion": "magnitude", "density": 0.5}
        with pytest.raises(SlimtuneError, match="dsee.*stage 2") as err:
            build(validate_recipe(recipe))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("other", [{"name": "bitfit"}, {"name": "houlsby", "reduction_factor": 8}])
def test_dsee_stage2_with_another_method_is_one_line_error(tmp_path, tiny_recipe, other):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = [{"name": "dsee", "r": 4, "num_sparse": 16, "decomposition_rank": 4, "prune": "heads", "heads_per_layer": 1}, other]
    with pytest.raises(SlimtuneError, match=f"method: 'dsee' restructures the model during training .*'{other['name']}' would not survive") as err:
        train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
    recipe["method"][0]["prune"] = "none"  # stage 1 composes like any update
    recipe["train"]["max_steps"] = 2
    report = train_run(validate_recipe(recipe), tmp_path / "stage1", progress=False)
    assert report["train"]["steps"] == 2 and "dsee" not in report  # no stage 2 ran
    assert report["method"]["name"] == f"dsee+{other['name']}"


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
