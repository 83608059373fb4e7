"""Integration: the real SmolLM2-135M (Llama, grouped-query attention 9 query / 3 KV heads),
truncated to its first 2 layers at load time, slimmed (whole KV groups + FFN neurons), exported
and loaded back with slimtune.load_exported: outputs equal the masked dense model's."""

import copy

import pytest
import torch

import slimtune
from slimtune.compress.export import save_exported
from slimtune.io import read_json
from slimtune.sparsity import structured
from slimtune.sparsity import importance

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"


def truncated_smollm2(layers: int = 2):
    from transformers import AutoModelForCausalLM

    from slimtune.zoo.hf_helpers import quiet_transformers
    from slimtune.zoo.models import is_installed, load_config, load_tokenizer, model_dir

    if not is_installed(MODEL):
        pytest.skip(f"{MODEL} is not installed")
    config = load_config(MODEL)
    config.num_hidden_layers = layers
    with quiet_transformers():  # the unused weights of layers 2..29 are expected
        model = AutoModelForCausalLM.from_pretrained(model_dir(MODEL), config=config, dtype=torch.float32, use_safetensors=True)
    return model.eval(), load_tokenizer(MODEL)


def masked_dense(dense, record):
    """The dense model with the removed heads' output-projection columns and the removed
    neurons' down-projection columns zeroed: their contributions vanish, nothing else changes."""
    model = copy.deepcopy(dense)
    head_dim = record["head_dim"]
    with torch.no_grad():
        for layer, kept in zip(model.model.layers, record["layers"], strict=True):
            for h in set(range(record["num_attention_heads"])) - set(kept["heads"]):
                layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            gone = sorted(set(range(record["intermediate_size"])) - set(kept["neurons"]))
            layer.mlp.down_proj.weight[:, gone] = 0
    return model


@pytest.mark.parametrize("scope, layout", [("local", "hf"), ("global", "rebuilt")])
def test_smollm2_slim_export_round_trip(tmp_path, scope, layout):
    dense, tokenizer = truncated_smollm2()
    assert (dense.config.num_attention_heads, dense.config.num_key_value_heads) == (9, 3)
    batch = tokenizer(["The capital of France is", "Small models can be fast"], padding=True, return_tensors="pt")
    labelled = [{**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}]
    heads, neurons = importance.unit_importance(dense, "taylor", batches=labelled)
    slim = copy.deepcopy(dense)
    structured.remove_heads(slim, importance.select_heads(slim, heads, 1 / 3, scope))  # one KV group of 3 per layer (local)
    record = structured.remove_ffn_neurons(slim, importance.select_lowest(neurons, 0.5, scope, "ffn", multiple=32))
    assert all(len(layer["heads"]) == 3 * len(layer["kv_heads"]) for layer in record["layers"])  # GQA stays consistent
    assert all(len(layer["neurons"]) % 32 == 0 for layer in record["layers"])
    with torch.no_grad():
        want = masked_dense(dense, record)(**batch).logits
        got = slim(**batch).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # within 1e-5, relative to the logit scale

    saved = save_exported(slim, tmp_path / "out", objective="lm", tokenizer=tokenizer)
    assert saved["layout"] == layout and saved["kinds"] == ["merged", "slimmed"]
    loaded = slimtune.load_exported(tmp_path / "out")
    if layout == "hf":  # the Llama config expresses uniform GQA widths: 6 query / 2 KV heads, FFN 768
        config = read_json(tmp_path / "out/config.json")
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (6, 2, 768)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, got)
