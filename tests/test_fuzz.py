"""Property-based tests: every generated recipe, `--set` override, recipe file and data file either
validates / loads or fails with SlimtuneError (one line) — never another exception.

Bounded (max_examples) and derandomized, so the run is fast and reproducible in CI; set
SLIMTUNE_FUZZ_EXAMPLES=2000 for a longer, randomized hunt.
"""

import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimtune.errors import SlimtuneError
from slimtune.methods.base import all_methods
from slimtune.core.features import all_features
from slimtune.recipe import CORE_SECTIONS, apply_override, load_recipe, validate_recipe
from slimtune.zoo.tasks import load_task

_EXAMPLES = os.environ.get("SLIMTUNE_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXAMPLES or 50), deadline=None, derandomize=_EXAMPLES is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

METHODS = all_methods()
SECTION_FIELDS = {name: sorted(cls.model_fields) for name, cls in {**CORE_SECTIONS, **all_features()}.items()}
METHOD_FIELDS = sorted({f for cls in METHODS.values() for f in cls.Config.model_fields})

# Values: plausible ones (so that many recipes get deep into validation) and hostile ones.
plausible = st.sampled_from([1, 2, 8, 0.5, 1e-3, 0.0, True, False, "stop", "skip", "linear", "bf16", "fp32", "lora",
                             "trec-6", "minilm-l2", "data.csv", "text", "label", ["query", "value"], None])
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10))
values = st.recursive(scalars | plausible, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
keys = st.text(max_size=8) | st.integers(-3, 3) | st.none()


def section(fields):
    return st.dictionaries(st.sampled_from(fields) if fields else st.text(max_size=8), values | plausible, max_size=5) if fields else st.just({})


method_item = st.one_of(
    st.sampled_from(sorted(METHODS)), st.text(max_size=8), values,
    st.builds(lambda name, fields: {"name": name, **fields}, st.sampled_from(sorted(METHODS)) | st.text(max_size=6),
              st.dictionaries(st.sampled_from(METHOD_FIELDS) | st.text(max_size=6), values | plausible, max_size=3)),
)
recipes = st.fixed_dictionaries(
    {},
    optional={
        **{name: section(fields) | values for name, fields in SECTION_FIELDS.items()},
        "method": method_item | st.lists(method_item, max_size=3),
        "tasks": values,  # a misspelt section
    },
) | st.dictionaries(keys, values, max_size=4)



@st.composite
def near_valid_recipes(draw):
    """A valid recipe with a few fields changed: reaches every field's own validation."""
    data = {"task": {"name": "trec-6"}, "method": {"name": "lora"}}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(SECTION_FIELDS) + ["method"]))
        fields = METHOD_FIELDS if name == "method" else SECTION_FIELDS[name]
        if fields:
            data.setdefault(name, {})[draw(st.sampled_from(fields))] = draw(plausible | values)
    return data


recipes = recipes | near_valid_recipes()


def validates_or_slimtune_error(call):
    try:
        return call()
    except SlimtuneError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return None


@FUZZ
@given(recipes)
def test_generated_recipes_validate_or_fail_with_slimtune_error(data):
    recipe = validates_or_slimtune_error(lambda: validate_recipe(data))
    event("valid" if recipe is not None else "refused")
    if recipe is not None:  # a valid recipe survives its own YAML round trip
        assert validate_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict()


override_keys = st.lists(st.sampled_from(["train", "method", "task", "model", "measure", "head", "0", "1", "lr", "r", "name", "x"]) | st.text(max_size=4), max_size=4)
override_values = st.sampled_from(["", "1", "-1", "[1, 2]", "{a: 1}", ".inf", ".nan", "lora", "'", "[", "null", "true", "1e-3"]) | st.text(max_size=6)


@FUZZ
@given(st.lists(st.tuples(override_keys, st.booleans(), override_values), max_size=4),
       st.sampled_from([{"task": {"name": "trec-6"}, "method": "lora"},
                        {"task": "trec-6", "method": ["lora", {"name": "bitfit"}], "train": {"lr": 1}},
                        {"task": {"name": "trec-6"}, "method": [5, "lora"], "train": 3}]))
def test_generated_set_overrides_apply_or_fail_with_slimtune_error(assignments, base):
    import copy

    data = copy.deepcopy(base)

    def apply_all():
        for parts, with_equals, value in assignments:
            apply_override(data, ".".join(parts) + ("=" if with_equals else "") + value)
        return validate_recipe(data)

    validates_or_slimtune_error(apply_all)


@FUZZ
@given(st.text(max_size=200) | st.builds(lambda d: yaml.safe_dump(d), recipes) | st.binary(max_size=100))
def test_generated_recipe_files_load_or_fail_with_slimtune_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        validates_or_slimtune_error(lambda: load_recipe(path))


# ------------------------------------------------------------------------------ data files

columns = st.sampled_from(["text", "label", "split", "title", "Text", ""]) | st.text(max_size=5)
cells = st.one_of(
    st.sampled_from(["pos", "neg", "neutral", "train", "validation", "test", "", " ", "1", "2", "a,b", '"q"', "x\ny", "é"]),
    st.text(max_size=12),
)
json_cells = st.one_of(cells, st.none(), st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def delimited_files(draw):
    header = draw(st.lists(columns, min_size=1, max_size=4))
    n_rows = draw(st.integers(0, 30))
    rows = [[draw(cells) for _ in header] for _ in range(n_rows)]
    sep = draw(st.sampled_from([",", "\t"]))
    suffix = ".csv" if sep == "," else ".tsv"
    text = "\n".join(sep.join(row) for row in [header, *rows]) + draw(st.sampled_from(["", "\n", "\r\n"]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return suffix, text.encode(encoding, "replace")


@st.composite
def jsonl_files(draw):
    import json

    n_rows = draw(st.integers(0, 30))
    keys_ = draw(st.lists(columns, min_size=1, max_size=4))
    lines = []
    for _ in range(n_rows):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.text(max_size=10)))  # not JSON
        elif kind == 1:
            lines.append(json.dumps(draw(json_cells)))  # JSON, not an object
        else:
            lines.append(json.dumps({k: draw(json_cells) for k in keys_ if draw(st.booleans()) or k in ("text", "label")}))
    return ".jsonl", "\n".join(lines).encode("utf-8", "surrogatepass")


@st.composite
def labelled_files(draw):
    """Mostly well-formed files with two labels, so that many examples get through to splitting."""
    n_rows = draw(st.integers(0, 40))
    with_split = draw(st.booleans())
    lines = ["text,label" + (",split" if with_split else "")]
    def rarely(common, rare):  # one faulty cell in a file is enough to refuse it: keep faults rare
        return draw(st.sampled_from(rare)) if draw(st.integers(0, 60)) == 0 else draw(st.sampled_from(common))

    for _ in range(n_rows):
        row = [rarely(["good film", "bad film", "ok", "fine"], ["", " "]), rarely(["pos", "neg"], ["meh", ""])]
        if with_split:
            row.append(rarely(["train", "train", "train", "validation", "test"], ["dev", ""]))
        lines.append(",".join(row))
    return ".csv", ("\n".join(lines) + "\n").encode()


data_files = delimited_files() | jsonl_files() | labelled_files() | st.tuples(st.sampled_from([".csv", ".tsv", ".jsonl", ".txt", ""]), st.binary(max_size=200))


@FUZZ
@given(data_files, st.sampled_from([{}, {"split": "split"}, {"text_pair": "title"}, {"text": "Text", "label": "label"}, {"metric": "macro_f1"}]),
       st.integers(0, 3))
def test_generated_data_files_load_or_fail_with_slimtune_error(file, spec, split_seed):
    suffix, content = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        task = validates_or_slimtune_error(lambda: load_task({"file": str(path), **spec}, split_seed=split_seed))
        event("loaded" if task is not None else "refused")
        if task is not None:
            assert len(task.label_names) >= 2 and all(len(task.splits[s]) for s in ("train", "validation", "test"))
