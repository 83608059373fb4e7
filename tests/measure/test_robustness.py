"""The robustness section (attacks at the end of a run), `slimtune eval --attack` merging into
report.json, `slimtune report RUN`, and the report card rows; tiny BERT runs."""

from __future__ import annotations

import copy
import json

import pytest

from slimtune.errors import SlimtuneError
from slimtune.io import read_json
from slimtune.measure.attacks import AttackConfig
from slimtune.measure.report import report_rows
from slimtune.measure.robustness import RobustnessHook, merge_attacks
from slimtune.recipe import load_recipe, validate_recipe
from slimtune.runner import evaluate_run, train_run
from tests.fixtures import one_line_error

# radius 0 must leave every prediction alone; a radius and step far beyond the embeddings' scale
# must break the tiny model somewhere; substitution on the tiny reviews ("the film was good and new")
ATTACKS = [{"name": "pgd", "radius": 0.0}, {"name": "pgd", "radius": 50.0, "step_size": 10.0}, {"name": "substitution", "max_change": 0.5}]


def robust_recipe(tiny_recipe, **section):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "full"}
    recipe["train"].update(max_steps=30, lr=1e-3, eval_each_epoch=False)  # the tiny model tells the reviews apart (0.875)
    recipe["robustness"] = {"attacks": ATTACKS, **section}
    return recipe


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory, tiny_model_dir, tiny_data_file):
    recipe = {
        "model": {"name": str(tiny_model_dir)},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 8, "batch_size": 16, "lr": 5e-3, "max_length": 16, "warmup_ratio": 0.0},
        "measure": {"latency": False},
    }
    out = tmp_path_factory.mktemp("robust") / "run"
    report = train_run(validate_recipe(robust_recipe(recipe)), out, progress=False)
    return out, report


def test_attacks_run_at_the_end_of_training_into_report_json(robust_run):
    out, report = robust_run
    assert read_json(out / "report.json")["robustness"] == report["robustness"]
    entries = report["robustness"]["attacks"]
    assert [e["key"] for e in entries] == ["pgd:radius=0", "pgd:radius=50:step_size=10", "substitution:max_change=0.5"]
    test_acc, n_test = report["metrics"]["accuracy"], report["task"]["n_test"]
    zero, strong, sub = entries
    # all test examples, the model the report describes: clean accuracy is the test accuracy
    assert all(e["examples"] == n_test and e["clean_accuracy"] == pytest.approx(test_acc) for e in entries)
    assert test_acc > 0.5  # the model learned something, so there is something to attack
    assert zero["attacked_accuracy"] == zero["clean_accuracy"] and zero["attack_success_rate"] == 0
    assert strong["attacked_accuracy"] < strong["clean_accuracy"]
    assert sub["attacked_accuracy"] <= sub["clean_accuracy"] and sub["words_changed"] <= 0.5 and sub["queries_per_example"] > 0
    assert sub["attack_success_rate"] == pytest.approx((sub["clean_accuracy"] - sub["attacked_accuracy"]) / sub["clean_accuracy"])


def test_the_report_card_shows_clean_and_attacked_accuracy(robust_run, capsys):
    from slimtune.cli import main

    out, report = robust_run
    rows = dict(report_rows(report))
    zero = rows["accuracy under pgd, L2 0"]
    assert zero.startswith(f"{report['metrics']['accuracy']:.4f} (clean {report['metrics']['accuracy']:.4f}")
    assert "success 0.0%" in zero
    assert "accuracy under pgd, L2 50, 5 x 10 from 0.05" in rows
    assert "of words changed" in rows["accuracy under substitution, 50% of words"] and "queries/example" in rows["accuracy under substitution, 50% of words"]
    # the card printed from disk is the same
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy under pgd, L2 0" in printed and "queries/example" in printed
    assert main(["report", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["robustness"] == report["robustness"]


def test_eval_attack_merges_into_report_json_and_matches_the_training_time_result(robust_run, tmp_path, capsys):
    import shutil

    from slimtune.cli import main

    out, report = robust_run
    out = shutil.copytree(out, tmp_path / "run")  # the other tests read the run as training left it
    # the same attack measured by eval replaces the entry in its place, with the same figures
    assert main(["eval", str(out), "--json", "--attack", "pgd", "--attack-radius", "50", "--attack-step-size", "10"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["attack"] == report["robustness"]["attacks"][1]
    assert found["saved"].startswith("saved to")
    # a new one is appended, and printed on the card
    assert main(["eval", str(out), "--attack", "pgd", "--attack-radius", "0.5", "--attack-examples", "4"]) == 0
    assert "saved to" in capsys.readouterr().err
    saved = read_json(out / "report.json")["robustness"]["attacks"]
    assert [e["key"] for e in saved] == [e["key"] for e in report["robustness"]["attacks"]] + ["pgd:radius=0.5:examples=4"]
    assert saved[:3] == report["robustness"]["attacks"]
    assert main(["report", str(out)]) == 0
    assert "accuracy under pgd, L2 0.5" in capsys.readouterr().out
    # measured on another base: not saved
    before = read_json(out / "report.json")
    result = evaluate_run(out, attack=AttackConfig("pgd", radius=0.2, examples=2), force=True)
    assert result["saved"].startswith("not saved") and read_json(out / "report.json") == before


def test_merge_replaces_by_key_and_appends():
    a, b, a2 = {"key": "pgd", "x": 1}, {"key": "substitution", "x": 2}, {"key": "pgd", "x": 3}
    assert merge_attacks(None, [a]) == {"attacks": [a]}
    assert merge_attacks({"attacks": [a, b]}, [a2]) == {"attacks": [a2, b]}
    assert merge_attacks({"attacks": [a], "note": "kept"}, [b]) == {"attacks": [a, b], "note": "kept"}


def test_a_run_without_attacks_has_no_rows():
    assert RobustnessHook.report_rows({}) == [] and RobustnessHook([]).report() == {}


def test_keys_name_the_settings_that_differ_from_the_defaults():
    assert AttackConfig("pgd").key == "pgd"
    assert AttackConfig("pgd", radius=0.1, seed=3, max_change=0.9).key == "pgd:radius=0.1:seed=3"  # max_change is not pgd's
    assert AttackConfig("substitution", radius=0.1, examples=50, seed=3).key == "substitution:examples=50"
    assert AttackConfig("substitution", max_change=0.5, candidates=5).key == "substitution:max_change=0.5:candidates=5"


def test_section_shorthand_defaults_and_settings(tiny_recipe):
    recipe = validate_recipe(dict(tiny_recipe, robustness={"attacks": ["pgd", {"name": "substitution", "candidates": 5}], "examples": 10, "seed": 2}))
    configs = recipe.features["robustness"].configs()
    assert configs == [AttackConfig("pgd", examples=10, seed=2), AttackConfig("substitution", candidates=5, examples=10, seed=2)]
    # the resolved recipe (recipe.yaml) reads back the same
    assert validate_recipe(recipe.to_dict()).features["robustness"].configs() == configs


@pytest.mark.parametrize("section, message", [
    ({"attacks": ["fgsm"]}, "robustness.attacks.0: name: unknown attack 'fgsm'; valid: pgd, substitution"),
    ({"attacks": [{"name": "pgd", "radius": -1}]}, "robustness.attacks.0: radius: -1.0 must be a finite number >= 0"),
    ({"attacks": [{"name": "pgd", "init_radius": -0.5}]}, "robustness.attacks.0: init_radius: -0.5 must be a finite number >= 0"),
    ({"attacks": [{"name": "pgd", "steps": -2}]}, "robustness.attacks.0: steps: -2 must be >= 0"),
    ({"attacks": ["pgd", {"name": "substitution", "max_change": 1.5}]}, "robustness.attacks.1: max_change: 1.5 must be in [0, 1]"),
    ({"attacks": [{"name": "substitution", "radius": 0.1}]}, "robustness.attacks.0: radius: not a substitution setting; substitution takes max_change, candidates"),
    ({"attacks": [{"name": "pgd", "radius": 0.1, "budget": 2}]}, "robustness.attacks.0.budget: unknown field"),
    ({"attacks": []}, "robustness.attacks: give at least one attack"),
    ({"attacks": ["pgd", {"name": "pgd", "radius": 1.0}]}, "robustness: attacks.1 repeats attacks.0 (pgd)"),
    ({"attacks": ["pgd"], "examples": 0}, "robustness.examples: Input should be greater than or equal to 1"),
    ({}, "robustness.attacks: Field required"),
])
def test_bad_sections_are_one_line_errors(tiny_recipe, section, message):
    with pytest.raises(SlimtuneError) as info:
        validate_recipe(dict(tiny_recipe, robustness=section))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_set_adds_the_section_and_names_itself_when_wrong(tmp_path, tiny_recipe):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    recipe = load_recipe(path, ["robustness.attacks=[pgd, substitution]", "robustness.examples=20"])
    assert [c.key for c in recipe.features["robustness"].configs()] == ["pgd:examples=20", "substitution:examples=20"]
    with pytest.raises(SlimtuneError, match=r"^--set robustness.attacks=\[pgd, fgsm\]: .*unknown attack 'fgsm'"):
        load_recipe(path, ["robustness.attacks=[pgd, fgsm]"])


def test_what_cannot_be_attacked_is_refused_before_training(tmp_path, tiny_recipe, capsys):
    import yaml

    soft = dict(tiny_recipe, method={"name": "prompt", "num_tokens": 2}, robustness={"attacks": ["pgd"]})
    with pytest.raises(SlimtuneError, match=r"^robustness: pgd: this run's model cannot take inputs_embeds") as info:
        train_run(validate_recipe(soft), tmp_path / "soft", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "soft").exists()  # nothing trained, nothing left
    # substitution only queries texts: a soft-prompt run can take it
    validate_recipe(dict(soft, robustness={"attacks": ["substitution"]}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(dict(soft, train=dict(tiny_recipe["train"], max_steps=1))))
    err = one_line_error(["train", str(path), "--out", str(tmp_path / "cli"), "--no-progress"], capsys)
    assert "robustness: pgd: this run's model cannot take inputs_embeds" in err


@pytest.mark.parametrize("objective, columns", [("lm", {"text": ["a b"]}), ("classification", {"image": [0], "label": [0]})])
def test_a_language_model_or_image_run_is_refused(tiny_recipe, objective, columns):
    from types import SimpleNamespace

    from datasets import Dataset

    section = validate_recipe(dict(tiny_recipe, robustness={"attacks": ["substitution"]})).features["robustness"]
    task = SimpleNamespace(name="toy", splits={"test": Dataset.from_dict(columns)})
    with pytest.raises(SlimtuneError, match=rf"^robustness: only text classification runs can be attacked \(this run: {objective} on toy\)$"):
        section.build_hook(recipe=SimpleNamespace(objective=objective), model=None, delta=None, task=task)


def test_a_ticket_card_shows_density_stored_bytes_rounds_rewind_and_robustness(tmp_path, tiny_recipe, capsys):
    from slimtune.measure.report import print_report

    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "full"}
    recipe["train"].update(max_steps=6, eval_each_epoch=False)
    recipe["tickets"] = {"density": 0.25, "rounds": 2, "rewind": "step:1"}
    recipe["robustness"] = {"attacks": [{"name": "pgd", "radius": 0.0}, "substitution"], "examples": 6}
    report = train_run(validate_recipe(recipe), tmp_path / "ticket", progress=False)
    rows = dict(report_rows(report))
    ticket = report["tickets"]
    assert rows["tickets"] == f"imp: 2 of 2 rounds, rewind to step:1, density {ticket['final_density']:.3f}"
    assert ticket["final_density"] == pytest.approx(0.25, abs=0.01)
    assert rows["tickets: stored"] == f"{ticket['stored_bytes'] / 1e6:.2f} MB sparse of {ticket['dense_bytes'] / 1e6:.2f} MB dense"
    assert 0 < ticket["stored_bytes"] < ticket["dense_bytes"]
    zero, sub = report["robustness"]["attacks"]
    assert rows["accuracy under pgd, L2 0"].startswith(f"{zero['clean_accuracy']:.4f} (clean {zero['clean_accuracy']:.4f}, 6 test examples)")
    assert rows["accuracy under substitution, 20% of words"].startswith(f"{sub['attacked_accuracy']:.4f} (clean {sub['clean_accuracy']:.4f}, 6 test examples)")
    from rich.console import Console

    print_report(read_json(tmp_path / "ticket" / "report.json"), console=Console(width=200))
    printed = capsys.readouterr().out
    for text in ("rewind to step:1", "MB sparse of", "accuracy under pgd, L2 0", "accuracy under substitution", "test accuracy"):
        assert text in printed


def test_pgd_refuses_a_model_without_a_gradient_to_its_embeddings(tiny_recipe):
    """Ladder side tuning runs the backbone under no_grad: PGD would see no gradient at all and
    report the model as robust; it is refused, substitution (queries only) is not."""
    from slimtune.runner import build

    lst = dict(tiny_recipe, method={"name": "lst", "r": 2}, robustness={"attacks": ["pgd"]})
    with pytest.raises(SlimtuneError, match=r"^robustness: pgd: this run's logits carry no gradient back to the input embeddings") as info:
        build(validate_recipe(lst))
    assert "\n" not in str(info.value)
    build(validate_recipe(dict(lst, robustness={"attacks": ["substitution"]})))
