"""The command line: help that one can work from, listings, and one-line errors with exit 2."""

import subprocess
import sys

import pytest

from slimtune.cli import build_parser, main


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
