"""The trainer and the run directory on a tiny local model: files, report card, determinism,
resume, hooks, numerical faults, eval round trip, wrong-base refusal."""

import json

import pytest
import torch

from slimtune import runner
from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors
from slimtune.recipe import validate_recipe
from slimtune.runner import build, evaluate_run, train_run
from slimtune.train.checkpoint import list_checkpoints, read_checkpoint
from slimtune.core.hooks import Hook
from slimtune.train.trainer import Trainer
from tests.fixtures import CrashAt, make_trainer

REPORT_KEYS = {
    "model": ["name", "params_total"],
    "task": ["name", "n_train", "n_test"],
    "method": ["name"],
    "metrics": ["accuracy", "macro_f1"],
    "params": ["trainable", "trainable_pct", "stored_bytes"],
    "train": ["steps", "seconds", "step_seconds_median", "peak_memory_bytes", "peak_rss_bytes"],
    "inference": ["flops_per_example"],
}


def test_run_dir_holds_recipe_delta_and_a_complete_report(tiny_recipe, tmp_path):
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("recipe.yaml", "delta.safetensors", "delta.json", "report.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report, default=str))
    for section, keys in REPORT_KEYS.items():
        for key in keys:
            assert report[section].get(key) is not None, f"{section}.{key}"
    assert report["train"]["steps"] == 8
    assert "versions" in report and report["versions"]["torch"].startswith("2.13")
    # stored bytes are exactly the saved tensors: LoRA + head, not the base
    tensors = read_safetensors(run / "delta.safetensors")
    assert report["params"]["stored_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report["params"]["trainable"] == sum(t.numel() for t in tensors.values())
    meta = json.loads((run / "delta.json").read_text())
    assert meta["methods"][0]["name"] == "lora" and meta["base"]["weights_sha256"]


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_recipe, tmp_path):
    first = train_run(validate_recipe(tiny_recipe), tmp_path / "a", progress=False)
    second = train_run(validate_recipe(tiny_recipe), tmp_path / "b", progress=False)
    a, b = read_safetensors(tmp_path / "a/delta.safetensors"), read_safetensors(tmp_path / "b/delta.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first["metrics"] == second["metrics"]
    tiny_recipe["train"]["seed"] = 1
    train_run(validate_recipe(tiny_recipe), tmp_path / "c", progress=False)
    c = read_safetensors(tmp_path / "c/delta.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_after_a_crash_gives_the_same_weights_as_an_uninterrupted_run(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=12, checkpoint_every=3, batch_size=32)  # 160 rows: 5 batches/epoch
    recipe = validate_recipe(tiny_recipe)
    train_run(recipe, tmp_path / "whole", progress=False)

    built = build(recipe)
    run = tmp_path / "crashed"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", run_dir=run, hooks=[CrashAt(7)], progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert [p.name for p in (run / "checkpoints").iterdir()][-1] == "step-00000006"
    train_run(recipe, run, resume=True, progress=False)
    whole = read_safetensors(tmp_path / "whole/delta.safetensors")
    resumed = read_safetensors(run / "delta.safetensors")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_hooks_see_every_event_in_order(tiny_recipe):
    events = []

    class Recorder(Hook):
        name = "recorder"

        def on_train_begin(self, trainer): events.append("begin")
        def on_step_begin(self, trainer, batch): events.append("step")
        def on_after_backward(self, trainer):
            assert all(p.grad is not None for p in trainer.trainable.values())
            events.append("grads")
        def on_before_optimizer_step(self, trainer): events.append("optim")
        def on_step_end(self, trainer): events.append("end")
        def on_epoch_end(self, trainer, epoch): events.append(f"epoch{epoch}")
        def on_train_end(self, trainer): events.append("finish")

    tiny_recipe["train"].update(max_steps=None, epochs=1, batch_size=80, eval_each_epoch=False)
    recipe = validate_recipe(tiny_recipe)
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", hooks=[Recorder()], progress=False)
    trainer.fit()
    steps = trainer.plan.batches_per_epoch
    assert events == ["begin"] + ["step", "grads", "optim", "end"] * steps + ["epoch0", "finish"]


def test_a_hook_can_stop_training_with_a_reason(tiny_recipe):
    class Budget(Hook):
        name = "budget"

        def stop_reason(self, trainer):
            return "budget spent" if trainer.step >= 3 else None

    recipe = validate_recipe(tiny_recipe)
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", hooks=[Budget()], progress=False)
    result = trainer.fit()
    assert result.steps == 3 and result.stop_reason == "budget spent"


def test_nan_loss_stops_with_the_step_named(tiny_recipe):
    class Poison(Hook):
        name = "poison"

        def on_step_begin(self, trainer, batch):
            if trainer.step == 2:
                with torch.no_grad():
                    trainer.model.classifier.weight.fill_(float("nan"))

    recipe = validate_recipe(tiny_recipe)
    built = build(recipe)
    trainer = Trainer(model=built.model, tokenizer=built.tokenizer, task=built.task, delta=built.delta, recipe=recipe,
                      objective="classification", hooks=[Poison()], progress=False)
    with pytest.raises(SlimtuneError, match="train step 3: loss is nan"):
        trainer.fit()


def test_eval_round_trip_reproduces_the_report_metrics(tiny_recipe, tmp_path):
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    result = evaluate_run(tmp_path / "run")
    assert result["metrics"] == report["metrics"]


def test_a_delta_for_another_base_is_refused_unless_forced(tiny_recipe, tmp_path):
    train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    meta_path = tmp_path / "run/delta.json"
    meta = json.loads(meta_path.read_text())
    meta["base"]["weights_sha256"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SlimtuneError, match="made for base"):
        evaluate_run(tmp_path / "run")
    assert evaluate_run(tmp_path / "run", force=True)["metrics"]


def test_an_existing_run_dir_is_never_overwritten(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    with pytest.raises(SlimtuneError, match="exists and is not empty"):
        train_run(validate_recipe(tiny_recipe), run, progress=False)
    assert (run / "keep.txt").read_text() == "mine"


def test_merged_inference_is_reported_for_linear_deltas(tiny_recipe, tmp_path):
    tiny_recipe["measure"] = {"latency": True, "repeats": 2, "batch_size": 4}
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    assert report["inference"]["merged"] is True and report["inference"]["latency_ms_median"] > 0


def test_init_from_starts_from_the_earlier_runs_delta_and_head(tiny_recipe, tmp_path):
    from slimtune.runner import warm_start

    train_run(validate_recipe(tiny_recipe), tmp_path / "public", progress=False)
    saved = read_safetensors(tmp_path / "public/delta.safetensors")
    tiny_recipe["train"]["init_from"] = str(tmp_path / "public")
    recipe = validate_recipe(tiny_recipe)
    built = build(recipe)
    fresh = built.delta.state_dict(built.model)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # LoRA B starts at zero, the trained one does not
    warm_start(built, tmp_path / "public")
    started = built.delta.state_dict(built.model)
    assert started.keys() == saved.keys() and all(torch.equal(started[k], saved[k]) for k in saved)
    report = train_run(recipe, tmp_path / "private", progress=False)
    assert report["train"]["steps"] == 8 and report["train"]["init_from"] == str(tmp_path / "public")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, run: r["train"].update(init_from=str(run.parent / "missing")), "run directory does not exist"),
        (lambda r, run: r["train"].update(init_from=str(run.parent)), "no delta.json there"),
        (lambda r, run: r["method"].update(r=2), "a warm start needs the same methods"),
        (lambda r, run: (run / "delta.json").write_text((run / "delta.json").read_text().replace('"weights_sha256": "', '"weights_sha256": "0')),
         "needs a run on the same base model"),
    ],
)
def test_init_from_refuses_a_run_it_cannot_start_from(tiny_recipe, tmp_path, change, message):
    run = tmp_path / "public"
    train_run(validate_recipe(tiny_recipe), run, progress=False)
    tiny_recipe["train"]["init_from"] = str(run)
    change(tiny_recipe, run)
    with pytest.raises(SlimtuneError, match=f"train.init_from .*{message}"):
        train_run(validate_recipe(tiny_recipe), tmp_path / "private", progress=False)
    assert not (tmp_path / "private/delta.json").exists()


def test_init_from_names_a_head_of_another_label_count(tiny_recipe, tmp_path):
    run = tmp_path / "public"
    train_run(validate_recipe(tiny_recipe), run, progress=False)
    state = read_safetensors(run / "delta.safetensors")
    head = next(k for k in state if k.startswith("classifier.weight"))
    state[head] = torch.zeros(3, state[head].shape[1])
    from slimtune.io import write_safetensors

    write_safetensors(run / "delta.safetensors", state)
    tiny_recipe["train"]["init_from"] = str(run)
    with pytest.raises(SlimtuneError, match=r"'classifier.weight' has shape \(3, 32\) there, this recipe needs \(2, 32\)"):
        train_run(validate_recipe(tiny_recipe), tmp_path / "private", progress=False)


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
