"""Recipe validation: every mistake is one line naming the field, the value and what is valid."""

import re

import pytest

from slimtune.errors import SlimtuneError
from slimtune.recipe import DEFAULT_RECIPE, apply_override, load_recipe, validate_recipe


def recipe(**changes):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_RECIPE.items()}
    data.update(changes)
    return data


def test_default_recipe_resolves_with_all_defaults():
    r = load_recipe()
    assert r.methods[0].name == "lora" and r.methods[0].config.r == 8
    assert r.train.max_length == 64 and r.train.epochs == 2
    again = validate_recipe(r.to_dict())
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "data,message",
    [
        (recipe(trian={}), r"unknown section 'trian' \(did you mean 'train'\?\)"),
        (recipe(train={"lr": -1}), r"train.lr: Input should be greater than 0 \(got -1\)"),
        (recipe(train={"epcohs": 2}), r"train.epcohs: unknown field \(did you mean 'epochs'\?\)"),
        (recipe(method={"name": "lorra"}), r"method.name: unknown method 'lorra'"),
        (recipe(method={"name": "lora", "rank": 4}), r"method.rank: unknown field"),
        (recipe(method={"name": "lora", "r": 0}), r"method.r: Input should be greater than or equal to 1 \(got 0\)"),
        (recipe(method=[{"name": "lora"}, {"name": "lora"}]), r"'lora' is listed twice"),
        (recipe(task={}), r"give exactly one of task.name"),
        (recipe(task={"file": "x.csv"}), r"needs task.text and task.label"),
        (recipe(train={"precision": "fp16"}), r"train.precision: Input should be 'fp32' or 'bf16'"),
        (recipe(method=None), r"method: missing"),
    ],
)
def test_validation_errors_are_one_clear_line(data, message):
    with pytest.raises(SlimtuneError, match=message) as info:
        validate_recipe(data, source="r.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("r.yaml: ")


def test_overrides_set_any_field_and_parse_values():
    r = load_recipe(None, ["train.lr=5e-4", "method.r=16", "task.name=trec-6", "train.max_steps=3"])
    assert r.train.lr == 5e-4 and r.methods[0].config.r == 16 and r.task.name == "trec-6" and r.train.max_steps == 3


def test_method_override_replaces_the_whole_method_section():
    r = load_recipe(None, ["method=bitfit"])
    assert [m.name for m in r.methods] == ["bitfit"]
    r = load_recipe(None, ["method={name: lora, r: 4}"])
    assert r.methods[0].config.r == 4 and r.methods[0].config.alpha == 16


def test_override_into_a_method_list_by_index(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: movie-sentiment\nmethod: [lora, bitfit]\n")
    r = load_recipe(path, ["method.0.r=4"])
    assert [m.name for m in r.methods] == ["lora", "bitfit"] and r.methods[0].config.r == 4


@pytest.mark.parametrize("bad", ["trainlr", "lr=1", "train.lr.x=1", "method.5.r=1"])
def test_bad_overrides_are_clear(bad):
    with pytest.raises(SlimtuneError, match="--set"):
        data = recipe()
        data["method"] = [{"name": "lora"}]
        apply_override(data, bad)
        validate_recipe(data)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=abc", "--set train.lr=abc: Input should be a valid number"),  # a bad value type
        ("train.lr=-1", "--set train.lr=-1: Input should be greater than 0 (got -1)"),
        ("train.lrr=1", "--set train.lrr=1: unknown field (did you mean 'lr'?)"),
        ("trian.lr=1", "--set trian.lr=1: unknown section 'trian' (did you mean 'train'?)"),
        ("method.r=abc", "--set method.r=abc: Input should be a valid integer"),
        ("method.rank=4", "--set method.rank=4: unknown field"),
        ("method=lorra", "--set method=lorra: method.name: unknown method 'lorra'"),
        ("method=[lora, lora]", "--set method=[lora, lora]: 'lora' is listed twice"),
        ("task.file=x.csv", "--set task.file=x.csv: task: give exactly one of task.name"),
        ("privacy.epsilon=abc", "--set privacy.epsilon=abc: Input should be a valid number"),
    ],
)
def test_errors_caused_by_a_set_name_the_set_not_the_file(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text("task: movie-sentiment\nmethod: lora\ntrain: {lr: 1.0e-3}\n")
    with pytest.raises(SlimtuneError) as info:
        load_recipe(path, ["train.epochs=1", override, "measure.repeats=2"])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert str(path) not in str(info.value)


def test_errors_of_the_file_still_name_the_file_with_sets(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: {name: movie-sentiment, file: x.csv}\nmethod: lora\ntrain: {lr: abc}\n")
    # a --set in the failing section that does not cause the error
    with pytest.raises(SlimtuneError, match=rf"^{re.escape(str(path))}: task: give exactly one of"):
        load_recipe(path, ["task.train_size=5", "train.lr=1e-3"])
    # a --set that fixes one mistake leaves the file blamed for the other
    with pytest.raises(SlimtuneError, match=rf"^{re.escape(str(path))}: train.lr: Input should be a valid number"):
        load_recipe(path, ["task=movie-sentiment"])
    # the default recipe of `slimtune run`
    with pytest.raises(SlimtuneError, match=r"^--set train.epochs=-1: Input should be greater than 0"):
        load_recipe(None, ["train.epochs=-1"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(SlimtuneError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: [\n")
    with pytest.raises(SlimtuneError, match=r"bad.yaml: invalid YAML \(line"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SlimtuneError, match="a recipe is a mapping"):
        load_recipe(listy)


def test_every_shipped_recipe_validates():
    from slimtune.listing import find_recipes

    paths = find_recipes()
    assert len(paths) >= 4
    for path in paths:
        load_recipe(path)


def test_the_public_start_dp_recipe_is_the_dp_recipe_plus_its_start():
    """recipes/dp-lora-public.yaml promises to differ from recipes/dp-lora.yaml only by
    train.init_from (and its public stage to share the method), so tuning one cannot silently
    leave the other behind."""
    from pathlib import Path

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    private = load_recipe(recipes / "dp-lora.yaml").to_dict()
    public = load_recipe(recipes / "dp-lora-public.yaml").to_dict()
    assert public["train"].pop("init_from") == "runs/public-amazon-lora"
    assert private["train"].pop("init_from") is None
    assert public == private
    assert load_recipe(recipes / "public-amazon-lora.yaml").to_dict()["method"] == private["method"]


def test_model_and_task_overrides_take_a_name_like_the_yaml_shorthand(tmp_path):
    r = load_recipe(None, ["model=minilm-l2", "task=trec-6"])
    assert r.model.name == "minilm-l2" and r.task.name == "trec-6"
    # Like `task: trec-6` in a recipe, the whole section is replaced (the default's sizes go) ...
    assert r.task.train_size is None and r.task.eval_size is None
    # ... while task.name=NAME changes the name alone.
    r = load_recipe(None, ["task.name=trec-6"])
    assert r.task.name == "trec-6" and r.task.train_size == 2000
    r = load_recipe(None, ["task={name: trec-6, train_size: 100}", "model=/some/local/dir"])
    assert r.task.train_size == 100 and r.model.name == "/some/local/dir"
    path = tmp_path / "r.yaml"
    path.write_text("model: minilm-l6\ntask: movie-sentiment\nmethod: lora\n")
    r = load_recipe(path, ["model=minilm-l2", "task=trec-6", "task.train_size=50"])
    assert (r.model.name, r.task.name, r.task.train_size) == ("minilm-l2", "trec-6", 50)
    assert load_recipe(None, ["model=0123"]).model.name == "0123"


@pytest.mark.parametrize("bad", ["model=", "task=", "model=[a, b]", "task=true"])
def test_model_and_task_overrides_refuse_what_is_not_a_name(bad):
    with pytest.raises(SlimtuneError, match=r"--set .*is a name or a YAML mapping"):
        load_recipe(None, [bad])


def test_on_nonfinite_is_validated():
    with pytest.raises(SlimtuneError, match="train.on_nonfinite: Input should be 'stop' or 'skip'"):
        validate_recipe({"task": {"name": "trec-6"}, "method": "lora", "train": {"on_nonfinite": "ignore"}})


def test_a_recipe_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SlimtuneError, match=r"evil.yaml: invalid YAML"):
        load_recipe(path)
    assert not marker.exists()


def test_pathologically_nested_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SlimtuneError, match=re.escape("invalid YAML: nested too deeply")):
        load_recipe(path)
