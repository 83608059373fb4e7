"""Hardware-friendly layouts of the removed units: ``scope`` (global ranking vs the same share in
every layer) and ``multiple`` (kept FFN neurons per layer rounded to a multiple of N), in
``select_lowest`` and in ``slimtune export --slim SPEC``."""

import re

import pytest

from slimtune.compress.export import SLIM_DEFAULTS, parse_slim_spec
from slimtune.errors import SlimtuneError
from slimtune.sparsity.structured import remove_ffn_neurons
from slimtune.sparsity.importance import select_lowest, unit_importance
from tests.fixtures import tiny_bert


def ramp(layers: int, width: int) -> dict[int, dict[int, float]]:
    """Layer i's unit j scores i + j / width: global ranking empties the early layers first."""
    return {i: {j: i + j / width for j in range(width)} for i in range(layers)}


def kept(scores, chosen):
    return [len(scores[layer]) - len(chosen[layer]) for layer in sorted(scores)]


def test_rounding_keeps_multiples_and_the_lowest_scored_units_go():
    scores = ramp(3, 100)
    chosen = select_lowest(scores, 0.3, "local", multiple=32)
    assert kept(scores, chosen) == [64, 64, 64]  # 70 -> 64 (nearest multiple of 32)
    assert chosen[1] == list(range(36))  # the 36 lowest of layer 1
    assert kept(scores, select_lowest(scores, 0.3, "local")) == [70, 70, 70]
    # Global: uneven layers (layer 0 loses 90), each rounded; a layer keeping anything keeps >= one multiple.
    chosen = select_lowest(scores, 0.3, "global", multiple=32)
    assert kept(scores, select_lowest(scores, 0.3, "global")) == [10, 100, 100]
    assert kept(scores, chosen) == [32, 100, 100]  # a whole layer stays whole (100 is no multiple of 32)
    # Ties round up (keep more): 48 of 64 kept -> 64 with multiple 32; 47 -> 32.
    assert kept(ramp(1, 64), select_lowest(ramp(1, 64), 0.25, "local", multiple=32)) == [64]
    assert kept(ramp(1, 64), select_lowest(ramp(1, 64), 0.27, "local", multiple=32)) == [32]
    # Nothing removed stays nothing removed; multiple=1 is the exact count.
    assert select_lowest(scores, 0.0, "local", multiple=32) == {0: [], 1: [], 2: []}


@pytest.mark.parametrize("multiple", [0, -3, 2.5, True])
def test_bad_multiples(multiple):
    with pytest.raises(SlimtuneError, match="multiple .* must be a positive integer"):
        select_lowest(ramp(1, 8), 0.5, "local", multiple=multiple)


def test_rounded_selection_removes_physically():
    model = tiny_bert()  # 2 layers x 64 neurons
    _, neurons = unit_importance(model, "magnitude")
    chosen = select_lowest(neurons, 0.4, "global", "ffn", multiple=16)
    record = remove_ffn_neurons(model, chosen)
    assert all(len(layer["neurons"]) % 16 == 0 for layer in record["layers"])


def test_spec_grammar_keeps_working_and_takes_scope_and_multiple():
    assert parse_slim_spec("heads=0.5,ffn=0.5") == {**SLIM_DEFAULTS, "heads": 0.5, "ffn": 0.5}
    assert SLIM_DEFAULTS["scope"] == "local" and SLIM_DEFAULTS["multiple"] == 32
    spec = parse_slim_spec("heads=0.5, ffn=0.5, scope=global, multiple=64")
    assert (spec["scope"], spec["multiple"]) == ("global", 64)
    assert parse_slim_spec("ffn=0.3,multiple=1")["multiple"] == 1


@pytest.mark.parametrize("spec, message", [
    ("ffn=0.5,multiple=0", "multiple=0 must be a positive integer"),
    ("ffn=0.5,multiple=32.5", "multiple=32.5 must be a positive integer"),
    ("ffn=0.5,multiple=", "is not key=value"),
    ("ffn=0.5,scope=layer", "scope 'layer' must be local or global"),
    ("ffn=0.5,multipel=32", "unknown key 'multipel' (did you mean 'multiple'?)"),
    ("ffn=0.5,multiple=8,multiple=16", "'multiple' given twice"),
])
def test_bad_layout_specs(spec, message):
    with pytest.raises(SlimtuneError, match=re.escape(message)) as info:
        parse_slim_spec(spec)
    assert "\n" not in str(info.value)


def test_export_help_documents_the_layout_keys(capsys):
    from slimtune.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "scope=local|global" in text and "multiple=N" in text and "heads=0.5,ffn=0.5,scope=local,multiple=32" in text
