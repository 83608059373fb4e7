"""Two processes on CPU (torchrun + gloo) train the same global batch as one process."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=None, epochs=3, batch_size=32)
    # dropout draws differ between ranks; without it the two runs compute the same averaged gradient
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    torchrun = shutil.which("torchrun", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "slimtune", "train", str(path), "--out", str(tmp_path / "two"), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "slimtune", "train", str(path), "--out", str(tmp_path / "one"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    report_two = json.loads((tmp_path / "two/report.json").read_text())
    report_one = json.loads((tmp_path / "one/report.json").read_text())
    assert report_two["train"]["processes"] == 2 and report_one["train"]["processes"] == 1
    assert report_two["train"]["steps"] == report_one["train"]["steps"] == 3 * -(-report_one["task"]["n_train"] // 32)
    assert report_two["task"]["n_test"] == report_one["task"]["n_test"]
    assert abs(report_two["metrics"]["accuracy"] - report_one["metrics"]["accuracy"]) <= 0.1
    assert abs(report_two["train"]["history"][-1]["train_loss"] - report_one["train"]["history"][-1]["train_loss"]) < 0.15
