"""The command line: help that one can work from, listings, and one-line errors with exit 2."""

import json
import re
import subprocess
import sys

import pytest

from slimtune.cli import build_parser, main
from tests.fixtures import one_line_error


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "slimtune", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_and_an_example():
    text = build_parser().format_help()
    for word in ("run", "train", "eval", "list", "--nproc_per_node 2", "--set"):
        assert word in text


@pytest.mark.parametrize("command", ["run", "train", "eval", "list"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 4


@pytest.mark.parametrize("what,expected", [("methods", ["lora", "alpha", "bitfit", "linear-probe"]), ("tasks", ["movie-sentiment", "trec-6", "reuters-r8"]), ("models", ["minilm-l6", "smollm2-135m"]), ("recipes", ["lora.yaml"])])
def test_list(what, expected, capsys):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


def test_list_in_a_pipe_is_plain_and_never_truncated():
    from slimtune.zoo.models import MODELS

    methods = run_cli("list", "methods")
    assert methods.returncode == 0, methods.stderr
    assert "…" not in methods.stdout and "┃" not in methods.stdout
    assert re.search(r"^  reduction_factor +32 +float +bottleneck width = hidden // reduction_factor", methods.stdout, re.M)
    assert re.search(r"^lora: low-rank update .*\[Hu et al. 2021", methods.stdout, re.M)
    models = run_cli("list", "models")
    assert "…" not in models.stdout and all(spec.description in models.stdout for spec in MODELS.values())
    tasks = run_cli("list", "tasks")
    assert "…" not in tasks.stdout and re.search(r"^reuters-r8 +8 +accuracy +(yes|no) +Reuters-21578", tasks.stdout, re.M)


def test_list_on_a_terminal_is_a_table_that_folds_instead_of_cutting():
    import io

    from slimtune.listing import print_listing

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    print_listing("methods", file=out)
    assert "┃" in out.getvalue() and "…" not in out.getvalue()


def test_list_json_is_machine_readable():
    from slimtune.methods.base import all_methods
    from slimtune.zoo.images import IMAGE_TASKS
    from slimtune.zoo.models import MODELS
    from slimtune.zoo.tasks import TASKS

    methods = json.loads(run_cli("list", "methods", "--json").stdout)
    assert [m["name"] for m in methods] == list(all_methods())
    lora = next(m for m in methods if m["name"] == "lora")
    assert lora["paper"].startswith("Hu et al. 2021") and lora["description"]
    r = next(f for f in lora["fields"] if f["name"] == "r")
    assert r == {"name": "r", "type": "int", "default": 8, "required": False, "description": "rank of the update B A"}
    assert all({"name", "type", "default", "required", "description"} <= set(f) for m in methods for f in m["fields"])
    tasks = json.loads(run_cli("list", "tasks", "--json").stdout)
    assert [t["name"] for t in tasks] == [*TASKS, *IMAGE_TASKS, "corpus"]
    trec = next(t for t in tasks if t["name"] == "trec-6")
    assert trec["kind"] == "text" and trec["n_labels"] == len(trec["labels"]) == 6 and trec["metric"] == "accuracy"
    models = json.loads(run_cli("list", "models", "--json").stdout)
    assert [m["name"] for m in models] == list(MODELS)
    assert all({"name", "family", "params", "installed", "dir", "description"} <= set(m) for m in models)
    assert all(m["dir"] is None or m["installed"] for m in models)
    recipes = json.loads(run_cli("list", "recipes", "--json").stdout)
    assert any(r["path"].endswith("lora.yaml") and r["method"] == "lora" for r in recipes)


def test_list_help_mentions_json_and_a_closed_pipe_is_no_traceback(capsys):
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    assert "--json" in capsys.readouterr().out
    assert "--json" in build_parser().format_help()
    closed = subprocess.run(f"{sys.executable} -m slimtune list methods --json | true", shell=True, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in closed.stderr and "BrokenPipe" not in closed.stderr, closed.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "missing.yaml"], "missing.yaml: recipe file not found"),
        (["eval", "no/such/run"], "no/such/run: run directory does not exist"),
        (["run", "--set", "method.name=lorra"], "unknown method 'lorra'"),
        (["run", "--set", "task.name=imdb"], "unknown task 'imdb'"),
        (["run", "--set", "model.name=bert-huge"], "bert-huge"),
        (["run", "--set", "train.lr=-3"], "train.lr"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize(
    "args", [["train", "missing.yaml"], ["run", "--set", "train.lr=-3"], ["run", "--set", "nosuch"], ["eval", "no/such/run"]]
)
def test_bad_input_fails_before_torch_is_imported(args):
    """The one-line error comes in well under a second: nothing heavy is imported first."""
    code = f"import sys; from slimtune.cli import main; main({args!r}); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stderr.startswith("error:") and result.stdout.strip() == "False", result.stderr


def test_an_error_from_a_set_names_the_set_not_the_recipe_file(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("task: movie-sentiment\nmethod: lora\n")
    out = ["--out", str(tmp_path / "run")]
    for override, message in [
        ("train.lr=abc", "error: --set train.lr=abc: Input should be a valid number"),
        ("train.lrr=1", "error: --set train.lrr=1: unknown field (did you mean 'lr'?)"),
        ("trian.lr=1", "error: --set trian.lr=1: unknown section 'trian'"),
        ("task.name=imdb", "error: --set task.name=imdb: unknown task 'imdb'"),
    ]:
        err = one_line_error(["train", str(path), "--set", override, *out], capsys)
        assert err.startswith(message) and str(path) not in err, err
    path.write_text("task: imdb\nmethod: lora\n")  # the file's own mistake still names the file
    assert one_line_error(["train", str(path), "--set", "train.lr=1e-3", *out], capsys).startswith(f"error: {path}: task.name: unknown task")
    assert not (tmp_path / "run").exists()


def test_train_and_eval_from_the_command_line(tiny_recipe, tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    result = run_cli("train", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.max_steps=4")
    assert result.returncode == 0, result.stderr
    assert "report card" in result.stdout and "trainable params" in result.stdout
    again = run_cli("train", str(path), "--out", str(tmp_path / "run"))
    assert again.returncode == 2 and "not empty" in again.stderr
    evaluated = run_cli("eval", str(tmp_path / "run"))
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout


def test_corrupt_delta_delta_json_and_recipe_are_one_line_errors_naming_the_file(trained_run, capsys):
    delta = trained_run / "delta.safetensors"
    good = delta.read_bytes()
    delta.write_bytes(good[: len(good) // 2])
    assert "delta.safetensors: corrupt or truncated safetensors file" in one_line_error(["eval", str(trained_run)], capsys)
    delta.write_bytes(good)
    meta = trained_run / "delta.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    assert "delta.json: corrupt JSON" in one_line_error(["eval", str(trained_run)], capsys)
    meta.write_text(text)
    recipe = trained_run / "recipe.yaml"
    recipe.write_text(recipe.read_text()[:-40] + "\n  lr: [unclosed\n")
    assert "recipe.yaml: invalid YAML (line" in one_line_error(["eval", str(trained_run)], capsys)


def test_wrong_base_delta_is_refused_by_the_cli_unless_forced(trained_run, capsys):
    meta_path = trained_run / "delta.json"
    meta = json.loads(meta_path.read_text())
    meta["base"]["weights_sha256"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    err = one_line_error(["eval", str(trained_run)], capsys)
    assert "delta.json: this delta was made for base" in err and "use --force" in err
    assert main(["eval", str(trained_run), "--force", "--json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)["metrics"]


def test_cli_arguments_are_validated_into_one_line_errors(trained_run, tmp_path, capsys):
    recipe = str(trained_run / "recipe.yaml")
    assert "drop --out" in one_line_error(["train", recipe, "--resume", str(trained_run), "--out", str(tmp_path / "x")], capsys)
    assert "--set 'train.lr'" in one_line_error(["train", recipe, "--set", "train.lr"], capsys)
    assert "train.seed" in one_line_error(["train", recipe, "--set", "train.seed=-1"], capsys)
    assert "train.epochs" in one_line_error(["train", recipe, "--set", "train.epochs=.inf"], capsys)
    assert "does not exist" in one_line_error(["train", recipe, "--resume", str(tmp_path / "nope")], capsys)


def test_eval_on_a_task_with_another_label_count_is_refused(trained_run, capsys):
    # The tiny run was trained on neg/pos; trec-6 has 6 labels (it ended in a size-mismatch traceback).
    err = one_line_error(["eval", str(trained_run), "--task", "trec-6"], capsys)
    assert "--task trec-6 has 6 labels (ABBR, DESC, ENTY, HUM, LOC, NUM)" in err and "trained on 2 (neg, pos)" in err


def test_eval_on_a_task_with_other_label_names_is_refused_unless_mapped(trained_run, capsys):
    # sms-spam's ham/spam were scored as if they were neg/pos.
    err = one_line_error(["eval", str(trained_run), "--task", "sms-spam"], capsys)
    assert "labels ham, spam" in err and "trained on neg, pos" in err and "--label-map ham=RUN_LABEL,spam=RUN_LABEL" in err
    assert "'x' is not a label of --task sms-spam" in one_line_error(["eval", str(trained_run), "--task", "sms-spam", "--label-map", "x=neg"], capsys)
    assert "all map to the run's 'neg'" in one_line_error(["eval", str(trained_run), "--task", "sms-spam", "--label-map", "ham=neg,spam=neg"], capsys)
    assert "is not TASK_LABEL=RUN_LABEL" in one_line_error(["eval", str(trained_run), "--label-map", "ham"], capsys)
    accuracy = {}
    for mapping in ("ham=neg,spam=pos", "ham=pos,spam=neg"):
        assert main(["eval", str(trained_run), "--task", "sms-spam", "--label-map", mapping, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["task"] == "sms-spam" and result["label_map"] == dict(pair.split("=") for pair in mapping.split(","))
        accuracy[mapping] = result["metrics"]["accuracy"]
    # Two labels: swapping the map swaps which predictions count as right.
    assert abs(accuracy["ham=neg,spam=pos"] + accuracy["ham=pos,spam=neg"] - 1) < 1e-9
