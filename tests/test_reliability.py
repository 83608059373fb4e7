"""Reliability and safety guarantees: numerical faults (stop / skip), hook state (e.g. a privacy
accountant) continuing across resume, pickle refused everywhere, corrupt files named in one line,
wrong-base deltas refused unless forced, and data-file validation naming file and row."""

import json
import pickle
import re
import shutil

import pytest
import torch

from tests.conftest_tiny import CrashAt
from slimtune import runner
from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.io import read_json, read_safetensors
from slimtune.recipe import load_recipe, validate_recipe
from slimtune.runner import build, evaluate_run, train_run
from slimtune.train.checkpoint import list_checkpoints, read_checkpoint
from slimtune.core.hooks import Hook
from slimtune.train.trainer import Trainer
from slimtune.zoo.models import load_model
from slimtune.zoo.tasks import load_task


def make_trainer(recipe, run_dir=None, hooks=()):
    built = build(recipe)
    return Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                   objective="classification", run_dir=run_dir, hooks=list(hooks), progress=False)


class PoisonGradient(Hook):
    """Sets one trainable gradient to NaN (or inf) at the given steps (1-based)."""

    name = "poison"

    def __init__(self, steps, value=float("nan")):
        self.steps, self.value = set(steps), value
        self.weights_before = {}

    def on_after_backward(self, trainer):
        if trainer.step + 1 in self.steps:
            self.weights_before = {n: p.detach().clone() for n, p in trainer.trainable.items()}
            next(iter(trainer.trainable.values())).grad.view(-1)[0] = self.value

    def on_step_end(self, trainer):
        if trainer.step in self.steps:  # the skipped step did not move any weight
            assert trainer.step_skipped
            assert all(torch.equal(p, self.weights_before[n]) for n, p in trainer.trainable.items())


class Trap:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -------------------------------------------------------------------------- numerical faults


def test_a_nan_gradient_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(checkpoint_every=2)
    trainer = make_trainer(validate_recipe(tiny_recipe), tmp_path, [PoisonGradient([5])])
    with pytest.raises(SlimtuneError, match=r"train step 5: gradient of '.+' is not finite \(nan\); stopping \(the last good checkpoint .*step-00000004"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    state, tensors = read_checkpoint(list_checkpoints(tmp_path)[-1])  # intact: the hash matches
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_an_inf_loss_stops_even_before_any_checkpoint(tiny_recipe):
    class InfLoss(Hook):
        name = "inf"

        def backward(self, trainer, batch):
            return torch.tensor(float("inf")) if trainer.step == 1 else None

    trainer = make_trainer(validate_recipe(tiny_recipe), None, [InfLoss()])
    with pytest.raises(SlimtuneError, match="train step 2: loss is inf; stopping \\(no checkpoint was written yet"):
        trainer.fit()


def test_skip_mode_drops_faulty_steps_and_counts_them_in_the_report(tiny_recipe, tmp_path, monkeypatch):
    tiny_recipe["train"]["on_nonfinite"] = "skip"
    real_build = runner.build

    def build_with_poison(*args, **kwargs):
        built = real_build(*args, **kwargs)
        built.hooks.append(PoisonGradient([3, 6], value=float("inf")))
        return built

    monkeypatch.setattr(runner, "build", build_with_poison)
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    assert report["train"]["steps"] == 8
    assert report["train"]["skipped_nonfinite_steps"] == 2 and report["train"]["skipped_steps"] == [3, 6]
    assert all(torch.isfinite(t).all() for t in read_safetensors(tmp_path / "run/delta.safetensors").values())


def test_on_nonfinite_is_validated():
    with pytest.raises(SlimtuneError, match="train.on_nonfinite: Input should be 'stop' or 'skip'"):
        validate_recipe({"task": {"name": "trec-6"}, "method": "lora", "train": {"on_nonfinite": "ignore"}})


# -------------------------------------------------------------------------- hook state (privacy budget)


class StepAccountant(Hook):
    """A toy privacy accountant: counts steps (JSON state) and sums 'spent budget' (tensor state)."""

    name = "accountant"

    def __init__(self):
        self.steps = 0
        self.spent = torch.zeros(())

    def on_step_end(self, trainer):
        self.steps += 1
        self.spent += 0.5

    def state_dict(self):
        return {"steps": self.steps}

    def tensor_state(self):
        return {"spent": self.spent}

    def load_state_dict(self, state, tensors):
        self.steps = state["steps"]
        self.spent = tensors["spent"].clone()


def test_hook_state_continues_across_resume_and_never_restarts(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=10, checkpoint_every=3)
    recipe = validate_recipe(tiny_recipe)
    first = StepAccountant()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(recipe, tmp_path, [first, CrashAt(7)]).fit()
    assert first.steps == 7  # steps 7 ran past the last checkpoint (6) and are lost with the crash

    resumed = StepAccountant()
    trainer = make_trainer(recipe, tmp_path, [resumed])
    trainer.fit(resume=True)
    assert trainer.step == 10
    assert resumed.steps == 10 and float(resumed.spent) == 5.0  # 6 restored + 4 new, not 4


def test_non_trainable_delta_state_such_as_masks_is_checkpointed(tiny_recipe, tmp_path):
    """A method may keep state outside its trainable parameters (a pruning mask, a buffer); the
    delta's state dict is what defines it, and a resumed run continues from its saved value."""
    tiny_recipe["train"].update(max_steps=10, checkpoint_every=3)
    recipe = validate_recipe(tiny_recipe)

    class GrowMask(Hook):
        name = "grow"

        def on_step_end(self, trainer):
            trainer.model.toy_mask += 1  # the method's own state; the hook keeps none

    def with_mask(trainer):
        trainer.model.register_buffer("toy_mask", torch.zeros(3))
        delta, model = trainer.delta, trainer.model
        plain_state, plain_load = delta.state_dict, delta.load_state_dict
        delta.state_dict = lambda m: {**plain_state(m), "toy_mask": m.toy_mask}
        delta.load_state_dict = lambda m, state: (plain_load(m, state), m.toy_mask.copy_(state["toy_mask"]))
        return trainer

    with pytest.raises(KeyboardInterrupt):
        with_mask(make_trainer(recipe, tmp_path, [GrowMask(), CrashAt(7)])).fit()
    trainer = with_mask(make_trainer(recipe, tmp_path, [GrowMask()]))
    trainer.fit(resume=True)
    assert trainer.model.toy_mask.tolist() == [10.0, 10.0, 10.0]  # 6 restored + 4, not 4


def test_resume_onto_another_base_model_is_refused(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=3, checkpoint_every=2)
    recipe = validate_recipe(tiny_recipe)
    train_run(recipe, tmp_path / "run", progress=False)
    state_path = list_checkpoints(tmp_path / "run")[-1] / "state.json"
    state = json.loads(state_path.read_text())
    state["trainer"]["base"]["weights_sha256"] = "0" * 16
    state_path.write_text(json.dumps(state))
    with pytest.raises(SlimtuneError, match="this run was trained on another base model .*resume refused"):
        train_run(recipe, tmp_path / "run", resume=True, progress=False)


# -------------------------------------------------------------------------- safe loading


@pytest.fixture
def trained_run(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=2, checkpoint_every=1)
    train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    return tmp_path / "run"


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_pickle_planted_as_the_delta_is_refused_and_never_unpickled(trained_run, tmp_path, kind):
    marker = tmp_path / "pwned"
    delta = trained_run / "delta.safetensors"
    if kind == "torch.save":
        torch.save({"lora": Trap(marker)}, delta)
        expected = "not safetensors; refusing"
    else:
        delta.write_bytes(pickle.dumps(Trap(marker)))
        expected = "this is a Python pickle, not safetensors"
    with pytest.raises(SlimtuneError, match=expected):
        evaluate_run(trained_run)
    assert not marker.exists()


def test_a_delta_bin_instead_of_safetensors_is_refused(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    (trained_run / "delta.safetensors").unlink()
    torch.save({"w": Trap(marker)}, trained_run / "delta.bin")
    with pytest.raises(SlimtuneError, match="delta.bin is there but slimtune refuses pickle-based files"):
        evaluate_run(trained_run)
    assert not marker.exists()
    with pytest.raises(SlimtuneError, match="refusing to load a pickle-based file"):
        read_safetensors(trained_run / "delta.bin")
    with pytest.raises(SlimtuneError, match="refusing to load a pickle-based file"):
        read_json(trained_run / "state.pt")


def test_a_pickle_planted_as_checkpoint_tensors_is_refused_even_with_a_matching_hash(trained_run, tmp_path):
    import hashlib

    marker = tmp_path / "pwned"
    checkpoint = list_checkpoints(trained_run)[-1]
    tensors = checkpoint / "tensors.safetensors"
    torch.save({"param.x": Trap(marker)}, tensors)
    state = json.loads((checkpoint / "state.json").read_text())
    state["tensors_sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()  # a crafted, consistent checkpoint
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(SlimtuneError, match="zip archive .*refusing to load it"):
        read_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_model_directory_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": Trap(marker)}, model / "pytorch_model.bin")
    with pytest.raises(SlimtuneError, match=r"pickled-model: its weights are pickle files \(pytorch_model.bin\)"):
        load_model(str(model))
    assert not marker.exists()


def test_a_recipe_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SlimtuneError, match=r"evil.yaml: invalid YAML"):
        load_recipe(path)
    assert not marker.exists()


# -------------------------------------------------------------------------- corrupt files, wrong base


def one_line_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


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


def test_resume_with_a_changed_recipe_is_refused(trained_run, capsys):
    recipe = str(trained_run / "recipe.yaml")
    assert "recipe differs" in one_line_error(["train", recipe, "--resume", str(trained_run), "--set", "train.lr=0.5"], capsys)


# -------------------------------------------------------------------------- data files


@pytest.mark.parametrize(
    "content,spec,message",
    [
        (b"text,label\na,pos\nb,neg\n", {"label": "stars"}, r"no column 'stars' for label; columns present: text, label"),
        (b"text,label\na,pos\n  ,neg\n", {}, r"data row 2 .*column 'text' \(text\) is missing or empty"),
        (b"text,label\na,pos\ncaf\xe9,neg\n", {}, r"line 3 .*not UTF-8 \(0xe9\)"),
        (b"text,label,split\na,pos,train\nb,neg,train\nc,pos,test\nd,meh,validation\n", {"split": "split"},
         r"data row 4 .*label 'meh' \(validation split\) never occurs in the train split"),
        (b'{"text": "a", "label": "pos"}\n{"text": ["x"], "label": "neg"}\n', {}, r"line 2: column 'text' \(text\) holds a list"),
    ],
)
def test_bad_data_files_name_the_file_and_the_row(tmp_path, content, spec, message):
    suffix = ".jsonl" if content.startswith(b"{") else ".csv"
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(SlimtuneError, match=message) as info:
        load_task({"file": str(path), **spec})
    assert str(path) in str(info.value) and "\n" not in str(info.value)



@pytest.mark.parametrize(
    "name,content,message",
    [
        ("deep.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 1}\n', "line 1 is not usable JSON: nested too deeply"),
        ("big.jsonl", '{"text": 1' + "0" * 5000 + ', "label": 1}\n', "line 1 is not usable JSON: Exceeds the limit"),
        ("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n", "invalid YAML: nested too deeply"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "corrupt JSON (nested too deeply)"),
    ],
)
def test_pathological_nesting_and_numbers_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    read = {".jsonl": lambda: load_task({"file": str(path)}), ".yaml": lambda: load_recipe(path), ".json": lambda: read_json(path)}
    with pytest.raises(SlimtuneError, match=re.escape(message)):
        read[path.suffix]()


def test_staged_directory_appears_whole_or_not_at_all(tmp_path):
    from slimtune.io import staged_directory

    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            (staging / "half.json").write_text("{}")
            raise RuntimeError("killed mid-export")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty target is replaced
    with staged_directory(out) as staging:
        (staging / "done.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["done.json"] and len(list(tmp_path.iterdir())) == 1
