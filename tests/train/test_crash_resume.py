"""kill -9 at several points of a real `slimtune train` process (mid-training, while a checkpoint
is being written, before one is renamed into place), a truncated newest checkpoint, then
`--resume`: the final delta is bit-for-bit the one of an uninterrupted run with the same seed.

The kills are injected with SLIMTUNE_TEST_KILL_AT=STAGE:STEP (the process SIGKILLs itself at that
point; see slimtune.train.checkpoint.crash_point), so every kill lands exactly where intended.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from slimtune.io import read_safetensors
from slimtune.recipe import validate_recipe
from slimtune.runner import train_run
from slimtune.train.checkpoint import list_checkpoints

# 160 rows -> 128 training rows -> 4 batches of 32 per epoch: epochs end at steps 4, 8, 12;
# with checkpoint_every=3 checkpoints are written at 3, 4, 6, 8, 9, 12 (the last 2 are kept).
STEPS = 13


def crash_recipe(tiny_recipe):
    tiny_recipe["train"].update(max_steps=STEPS, checkpoint_every=3, batch_size=32)
    tiny_recipe["measure"] = {"latency": False, "flops": False, "memory": False}
    return tiny_recipe


def slimtune(*args, kill_at=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SLIMTUNE_TEST_KILL_AT", None)
    if kill_at:
        env["SLIMTUNE_TEST_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "slimtune", *args, "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def steps_of(run):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run)]


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights(tiny_recipe, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(crash_recipe(tiny_recipe)))
    run, ref = tmp_path / "run", tmp_path / "ref"
    reference = slimtune("train", str(path), "--out", str(ref))  # runs alongside the first crash

    # 1. killed before optimizer step 7: checkpoints 4 and 6 survive (3 was pruned).
    code, _, err = finish(slimtune("train", str(path), "--out", str(run), kill_at="step:7"))
    assert code == -signal.SIGKILL, err
    assert steps_of(run) == [4, 6]

    # 2. resumed from 6, killed while writing the epoch-end checkpoint 8 (tensors written, no state.json).
    code, out, err = finish(slimtune("train", str(path), "--resume", str(run), kill_at="tensors:8"))
    assert code == -signal.SIGKILL, err
    assert "resumed from" in out and "step-00000006" in out
    assert steps_of(run) == [4, 6] and list((run / "checkpoints").glob(".tmp-step-00000008-*"))

    # 3. resumed from 6 again, killed when checkpoint 12 is complete but not yet renamed into place.
    code, out, err = finish(slimtune("train", str(path), "--resume", str(run), kill_at="state:12"))
    assert code == -signal.SIGKILL, err
    assert "step-00000006" in out and steps_of(run) == [8, 9]

    # 4. the newest checkpoint is truncated (a disk fault): resume says so and falls back to 8.
    tensors = run / "checkpoints/step-00000009/tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    code, out, err = finish(slimtune("train", str(path), "--resume", str(run)))
    assert code == 0, err
    assert "step-00000009/tensors.safetensors: corrupt or truncated" in out and "falling back" in out
    assert "resumed from" in out and "step-00000008" in out
    assert (run / "checkpoints/corrupt-step-00000009").is_dir()
    assert not list((run / "checkpoints").glob(".tmp-*"))

    code, _, err = finish(reference)
    assert code == 0, err
    whole, resumed = read_safetensors(ref / "delta.safetensors"), read_safetensors(run / "delta.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    report, ref_report = json.loads((run / "report.json").read_text()), json.loads((ref / "report.json").read_text())
    assert report["train"]["steps"] == STEPS and report["train"]["resumed_from_step"] == 8
    assert report["train"]["history"] == ref_report["train"]["history"]  # epoch history survives the crashes
    assert report["metrics"] == ref_report["metrics"]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tiny_recipe, tmp_path, capsys):
    recipe = validate_recipe(crash_recipe(tiny_recipe))
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    report = train_run(recipe, run, resume=True, progress=False)
    assert "no checkpoint was written before the interruption; starting from step 0" in capsys.readouterr().out
    assert report["train"]["steps"] == STEPS and report["train"]["resumed_from_step"] == 0


def test_resume_when_every_checkpoint_is_corrupt_is_a_clear_error(tiny_recipe, tmp_path):
    from slimtune.errors import SlimtuneError

    tiny_recipe = crash_recipe(tiny_recipe)
    tiny_recipe["train"]["max_steps"] = 4
    recipe = validate_recipe(tiny_recipe)
    run = tmp_path / "run"
    train_run(recipe, run, progress=False)
    for checkpoint in list_checkpoints(run):
        (checkpoint / "state.json").write_text("{ truncated")
    with pytest.raises(SlimtuneError, match="none of its 2 checkpoints is intact"):
        train_run(recipe, run, resume=True, progress=False)
