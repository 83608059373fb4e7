"""The runner (recipe -> run directory): resuming checks that the recipe is the run's; a refused
run leaves nothing behind and removes nothing that was there."""

import pytest
import yaml

from slimtune.errors import SlimtuneError
from slimtune.recipe import validate_recipe
from tests.fixtures import one_line_error


def test_resume_with_a_changed_recipe_is_refused(trained_run, capsys):
    recipe = str(trained_run / "recipe.yaml")
    assert "recipe differs" in one_line_error(["train", recipe, "--resume", str(trained_run), "--set", "train.lr=0.5"], capsys)


# ------------------------------------------------------------------------------ refused runs

def refused(tiny_recipe):
    """A recipe refused when the run is built (after its directory is prepared): a bad target."""
    tiny_recipe["method"] = {"name": "lora", "r": 4, "targets": ["nosuch"]}
    return validate_recipe(tiny_recipe)


def test_a_refused_run_leaves_no_directory_behind(tiny_recipe, tmp_path, capsys):
    from slimtune.runner import train_run

    with pytest.raises(SlimtuneError, match="nosuch"):
        train_run(refused(tiny_recipe), tmp_path / "new" / "deeper" / "run", progress=False)
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too
    # through the CLI: DP-SGD with a method that restructures the model mid-run
    tiny_recipe["method"] = {"name": "dsee", "r": 4, "num_sparse": 4, "prune": "heads", "heads_per_layer": 1}
    tiny_recipe["privacy"] = {"epsilon": 8.0}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert "restructures the model" in one_line_error(["train", str(path), "--out", str(tmp_path / "dp-run"), "--no-progress"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.yaml"]


def test_a_refused_run_keeps_what_was_there(tiny_recipe, tmp_path):
    from slimtune.runner import train_run

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlimtuneError):
        train_run(refused(tiny_recipe), empty, progress=False)
    assert empty.is_dir() and list(empty.iterdir()) == []  # it existed: it stays, as it was
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "notes.txt").write_text("mine")
    with pytest.raises(SlimtuneError):
        train_run(refused(tiny_recipe), tmp_path / "parent" / "run", progress=False)
    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["notes.txt"]
    # a resumed run's directory is never removed, even when it holds only its recipe.yaml
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "recipe.yaml").write_text(refused(tiny_recipe).to_yaml())
    with pytest.raises(SlimtuneError):
        train_run(refused(tiny_recipe), resumed, resume=True, progress=False)
    assert [p.name for p in resumed.iterdir()] == ["recipe.yaml"]


def test_a_run_that_fails_after_writing_checkpoints_or_is_interrupted_keeps_its_directory(tiny_recipe, tmp_path, monkeypatch):
    from slimtune import runner
    from slimtune.train.trainer import Trainer

    tiny_recipe["train"].update(max_steps=2, checkpoint_every=1)
    recipe = validate_recipe(tiny_recipe)

    def broken(self, split="test"):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(Trainer, "evaluate", broken)
    with pytest.raises(RuntimeError):
        runner.train_run(recipe, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "recipe.yaml").is_file() and (tmp_path / "run" / "checkpoints").is_dir()  # resumable

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.train_run(recipe, tmp_path / "interrupted", progress=False)
    assert [p.name for p in (tmp_path / "interrupted").iterdir()] == ["recipe.yaml"]  # --resume it
