"""DP-SGD on two processes (torchrun + gloo) equals one process with the same logical batch: the
same Poisson sample, noise added once, the same ε; the DP linear probe before it too."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, BertForSequenceClassification

from slimtune.io import read_safetensors


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_recipe, tiny_model_dir, tmp_path):
    # Without dropout both runs compute the same function, so their weights must agree.
    model_dir = tmp_path / "no-dropout"
    config = AutoConfig.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification.from_pretrained(tiny_model_dir, config=config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(tiny_model_dir) / name).is_file():
            shutil.copy(Path(tiny_model_dir) / name, model_dir / name)
    tiny_recipe["model"]["name"] = str(model_dir)
    tiny_recipe["train"].update(max_steps=4, batch_size=32)
    tiny_recipe["measure"].update(memory=False, flops=False)
    tiny_recipe["privacy"] = {"epsilon": 8.0, "accountant": "rdp", "seed": 5, "physical_batch_size": 8, "linear_probe": {"steps": 3, "epsilon": 1.0}}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "slimtune", "train", str(path), "--out", str(tmp_path / "two"), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "slimtune", "train", str(path), "--out", str(tmp_path / "one"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    report_two = json.loads((tmp_path / "two/report.json").read_text())
    report_one = json.loads((tmp_path / "one/report.json").read_text())
    assert report_two["train"]["processes"] == 2
    assert report_two["privacy"]["epsilon"] == pytest.approx(report_one["privacy"]["epsilon"])
    assert report_two["privacy"]["noise_multiplier"] == report_one["privacy"]["noise_multiplier"]
    assert report_two["privacy"]["linear_probe"] == report_one["privacy"]["linear_probe"]
    a, b = read_safetensors(tmp_path / "one/delta.safetensors"), read_safetensors(tmp_path / "two/delta.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-4, msg=lambda m, k=key: f"{k}: {m}")
