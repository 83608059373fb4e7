"""`slimtune export RUN_DIR --peft OUT`: peft loads the adapter and computes the same outputs."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors
from slimtune.methods.delta import read_delta
from slimtune.recipe import load_recipe, validate_recipe
from slimtune.runner import build, export_peft, train_run
from slimtune.zoo.models import load_model


def slimtune_and_peft_logits(run_dir, out, batch):
    recipe = load_recipe(run_dir / "recipe.yaml")
    built = build(recipe)
    built.delta.load_state_dict(built.model, read_delta(run_dir)[1])
    built.model.eval()
    base = load_model(recipe.model.name, num_labels=len(built.task.label_names))
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        return built.model(**batch).logits, peft_model(**batch).logits, built


def tokens(built, texts):
    encoded = built.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def test_peft_loads_the_adapter_and_gives_the_same_outputs(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    tiny_recipe["method"] = {"name": "lora", "r": 4, "alpha": 12, "targets": ["query", "value", "attention.output.dense"]}
    tiny_recipe["head"] = {"pooling": "cls"}
    train_run(validate_recipe(tiny_recipe), run, progress=False)
    assert main(["export", str(run), "--peft", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 4 and config["lora_alpha"] == 12
    # a model directory loaded as it is: the adapter points there and no copy is written
    assert config["base_model_name_or_path"] == str(Path(tiny_recipe["model"]["name"]).resolve()) and not (tmp_path / "peft/base").exists()
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    keys = set(read_safetensors(tmp_path / "peft/adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys
    recipe = load_recipe(run / "recipe.yaml")
    built = build(recipe)
    batch = tokens(built, ["the film was great and new", "the film was awful", "dull"])
    ours, theirs, _ = slimtune_and_peft_logits(run, tmp_path / "peft", batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the trained delta matters: the base alone gives other outputs
    base = load_model(recipe.model.name, num_labels=2).eval()
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, ours, atol=1e-4)


def test_only_lora_runs_export_and_the_out_dir_is_never_overwritten(tiny_recipe, tmp_path):
    tiny_recipe["method"] = "bitfit"
    tiny_recipe["train"]["max_steps"] = 1
    train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    with pytest.raises(SlimtuneError, match=r"exports LoRA deltas only.*\['bitfit'\]"):
        export_peft(tmp_path / "run", tmp_path / "peft")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep").write_text("x")
    with pytest.raises(SlimtuneError, match="not an empty directory"):
        export_peft(tmp_path / "run", tmp_path / "full")
    assert main(["export", str(tmp_path / "run"), "--peft", str(tmp_path / "peft2")]) == 2


def test_a_mean_pooled_run_is_refused_by_the_peft_export(tiny_recipe, tmp_path):
    tiny_recipe["method"] = {"name": "lora", "r": 2}
    tiny_recipe["train"]["max_steps"] = 1
    train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    with pytest.raises(SlimtuneError, match="needs a run trained with head.pooling: cls"):
        export_peft(tmp_path / "run", tmp_path / "peft")


@pytest.mark.integration
def test_minilm_l2_lora_export_matches_peft(tmp_path):
    recipe = validate_recipe({
        "model": {"name": "minilm-l2"},
        "task": {"name": "movie-sentiment", "train_size": 64, "eval_size": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "head": {"pooling": "cls"},
        "train": {"max_steps": 2, "batch_size": 16, "lr": 5e-3, "max_length": 32},
        "measure": {"latency": False, "flops": False, "memory": False},
    })
    train_run(recipe, tmp_path / "run", progress=False)
    export_peft(tmp_path / "run", tmp_path / "peft")
    built = build(recipe)
    batch = tokens(built, ["a gripping, beautifully shot film", "tedious and overlong", "fine"])
    ours, theirs, _ = slimtune_and_peft_logits(tmp_path / "run", tmp_path / "peft", batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # peft alone, from the adapter directory: the base it records must be the 2-layer one the
    # run trained (the zoo truncates minilm-l6's checkpoint at load), not the 6-layer checkpoint.
    from peft import AutoPeftModelForSequenceClassification

    alone = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(alone(**batch).logits, ours, atol=1e-5, rtol=1e-5)
    assert alone.config.num_hidden_layers == 2 and alone.config.id2label == {0: "negative", 1: "positive"}
    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "peft/base").resolve())


def test_causal_lm_lora_exports_as_causal_lm_without_head(tmp_path):
    import yaml
    from transformers import LlamaForCausalLM

    from slimtune.core.arch import Arch
    from tests.fixtures import attach, randomize, tiny_llama, token_batch

    base_dir = tmp_path / "tiny-llama"
    tiny_llama(lm=True).save_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    delta = attach(model, ("lora", dict(r=2, alpha=6, targets=["q_proj", "v_proj", "down_proj"])))
    randomize(delta, model, scale=0.2, replace=True)
    assert Arch.of(model).family == "llama"
    run = tmp_path / "run"
    run.mkdir()
    recipe = {"model": {"name": str(base_dir)}, "task": {"file": "unused.txt", "text": "text", "label": "label", "objective": "lm"}, "method": {"name": "lora", "r": 2, "alpha": 6, "targets": ["q_proj", "v_proj", "down_proj"]}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    delta.head_names = []
    delta.save(run, model, {"model": str(base_dir)})
    config = export_peft(run, tmp_path / "peft")
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None and len(config["target_modules"]) == 6
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "peft").eval()
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_masked_lora_delta_exports_with_its_zeros(tiny_recipe, tmp_path):
    """A sparsity section over the LoRA factors stores them sparsely (``name::sparse_values`` ...);
    the export decodes them to dense tensors whose zeros are exact for peft."""
    run = tmp_path / "run"
    tiny_recipe["head"] = {"pooling": "cls"}
    tiny_recipe["sparsity"] = {"target": "delta", "density": 0.3, "at": 1}  # after a step: at init B = 0 cannot be ranked
    train_run(validate_recipe(tiny_recipe), run, progress=False)
    assert any("::sparse_" in key for key in read_safetensors(run / "delta.safetensors"))
    export_peft(run, tmp_path / "peft")
    adapter = read_safetensors(tmp_path / "peft/adapter_model.safetensors")
    assert not any("::" in key for key in adapter)
    factors = [t for key, t in adapter.items() if ".lora_" in key]
    assert 0.2 < sum(int((t != 0).sum()) for t in factors) / sum(t.numel() for t in factors) < 0.4
    built = build(load_recipe(run / "recipe.yaml"))
    ours, theirs, _ = slimtune_and_peft_logits(run, tmp_path / "peft", tokens(built, ["the film was great", "awful"]))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
