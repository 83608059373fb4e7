"""`slimtune export RUN --out DIR --lora-rank K`: the LoRA delta truncated to its top K singular
directions, as a run directory that loads back and evaluates, or merged into an exported model."""

import re

import pytest
import torch
import yaml

import slimtune
from slimtune.cli import main
from slimtune.compress.lora_rank import LORA_RANK_REPORT, parse_lora_rank
from slimtune.io import read_json
from slimtune.methods.delta import read_delta
from slimtune.methods.lora import LoRALinear
from slimtune.runner import evaluate_run, export_run, load_run

from tests.fixtures import text_logits, train_tiny_lora


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tiny_data_file):
    return train_tiny_lora(tmp_path_factory.mktemp("lora-rank") / "run", tiny_model_dir, tiny_data_file, alpha=8)


def loaded_run(run):
    built = load_run(run)
    return built.model.eval(), built


def svd_truncated(run, k):
    """The run's model with every LoRA update replaced by its rank-k SVD truncation, the slow way."""
    model, built = loaded_run(run)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                u, s, vh = torch.linalg.svd(module.delta_weight().double(), full_matrices=False)
                module.base.weight += ((u[:, :k] * s[:k]) @ vh[:k]).to(module.base.weight.dtype)
                module.lora_B.zero_()
    return model, built


def test_rank_k_run_directory_equals_the_svd_truncation_and_evaluates(run_dir, tmp_path, capsys):
    out = tmp_path / "r2"
    assert main(["export", str(run_dir), "--out", str(out), "--lora-rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "from rank 4 to 2" in printed and f"slimtune eval {out}" in printed
    method = yaml.safe_load((out / "recipe.yaml").read_text())["method"]
    assert (method["r"], method["alpha"]) == (2, 4.0)  # alpha * K / r: the scaling alpha / r is unchanged
    meta, state = read_delta(out)
    assert meta["methods"][0]["r"] == 2 and meta["lora_rank"]["kept_rank"] == 2
    assert all(t.shape[0] == 2 for n, t in state.items() if n.endswith("lora_A"))
    report = read_json(out / LORA_RANK_REPORT)
    assert report["delta_bytes_after"] < report["delta_bytes_before"] and 0 < report["max_relative_error"] < 1

    pruned, built = loaded_run(out)
    expected, _ = svd_truncated(run_dir, 2)
    assert torch.allclose(text_logits(pruned, built.tokenizer), text_logits(expected, built.tokenizer), atol=1e-5)
    original, _ = loaded_run(run_dir)
    assert not torch.allclose(text_logits(pruned, built.tokenizer), text_logits(original, built.tokenizer), atol=1e-5)  # it did change
    assert evaluate_run(out)["metrics"]["accuracy"] == pytest.approx(report["metrics_after"]["accuracy"])


def test_fraction_and_merged_export(run_dir, tmp_path):
    out = tmp_path / "merged"
    export_run(run_dir, out, merge=True, lora_rank=parse_lora_rank("0.5"), measure=False)
    record = read_json(out / "slimtune_export.json")
    assert record["lora_rank"]["kept_rank"] == 2 and record["layout"] == "rebuilt"  # mean pooling: no plain-HF class
    expected, built = svd_truncated(run_dir, 2)
    assert torch.allclose(text_logits(slimtune.load_exported(out), built.tokenizer), text_logits(expected, built.tokenizer), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "4"], "the LoRA delta has rank 4; keep fewer (1..3)"),
    (["--lora-rank", "0"], "a kept rank must be >= 1"),
    (["--lora-rank", "1.5"], "a fraction must be in (0, 1)"),
    (["--lora-rank", "half"], "give a kept rank K"),
])
def test_bad_ranks_fail_with_one_line_and_write_nothing(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["export", str(run_dir), "--out", str(out), *args]) != 0
    err = capsys.readouterr().err
    assert re.search(re.escape(message), err) and not out.exists()
