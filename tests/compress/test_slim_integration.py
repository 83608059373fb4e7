"""Integration: a real MiniLM-L2 run exported slim (half the heads and neurons, Taylor scores on
its training data) and int8, loaded back with slimtune.load_exported."""

import pytest
import torch

import slimtune
from slimtune.compress.export import plain_merged
from slimtune.io import read_json
from slimtune.methods.delta import read_delta
from slimtune.recipe import load_recipe
from slimtune.runner import build, export_run, train_run
from slimtune.sparsity.structured import remove_ffn_neurons, remove_heads

pytestmark = pytest.mark.integration


def test_minilm_l2_slim_export_round_trip(tmp_path):
    recipe = load_recipe(None, [
        "model.name=minilm-l2", "task.train_size=160", "task.eval_size=64", "train.max_steps=6",
        "train.batch_size=16", "train.max_length=32", "measure.latency=false", "measure.memory=false",
    ])
    train_run(recipe, tmp_path / "run", progress=False)
    report = export_run(tmp_path / "run", tmp_path / "slim", slim="heads=0.5,ffn=0.5,batches=2", repeats=1, batch_size=2, seq_len=32)
    shapes = read_json(tmp_path / "slim/shapes.json")
    assert sum(len(layer["heads"]) for layer in shapes["layers"]) == 12  # of 24
    assert sum(len(layer["neurons"]) for layer in shapes["layers"]) == 1536  # of 3072
    assert 0.45 < report["ratios"]["flops_per_example"] < 0.6  # encoder halved; embeddings count 0 FLOPs

    built = build(load_recipe(tmp_path / "run/recipe.yaml"))
    built.delta.load_state_dict(built.model, read_delta(tmp_path / "run")[1])
    plain_merged(built.model, built.delta)
    remove_heads(built.model, {i: sorted(set(range(12)) - set(layer["heads"])) for i, layer in enumerate(shapes["layers"])})
    remove_ffn_neurons(built.model, {i: sorted(set(range(1536)) - set(layer["neurons"])) for i, layer in enumerate(shapes["layers"])})
    batch = built.tokenizer(["a gripping, funny film", "tedious and flat"], padding=True, return_tensors="pt")
    loaded = slimtune.load_exported(tmp_path / "slim")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, built.model.eval()(**batch).logits)

    int8 = export_run(tmp_path / "run", tmp_path / "int8", int8=True, slim="heads=0.5,ffn=0.5,batches=2", measure=False)
    # int8 Linears; the fp32 word embeddings (11.7 M of the 15.5 M parameters) dominate the size
    assert int8["size_bytes"] < report["size_bytes"] - 2e6
    with torch.no_grad():
        quantized = slimtune.load_exported(tmp_path / "int8")(**batch).logits
        assert torch.allclose(quantized, built.model(**batch).logits, atol=0.1)


def test_minilm_l2_cls_merge_is_plain_hugging_face(tmp_path):
    """minilm-l2's own config.json says BertModel; the export's must name the class that computes
    the run's head, and the task's labels, so that transformers alone gives slimtune's logits."""
    from transformers import AutoModelForSequenceClassification

    recipe = load_recipe(None, [
        "model.name=minilm-l2", "task.train_size=64", "task.eval_size=32", "train.max_steps=2", "train.batch_size=16",
        "train.max_length=32", "head.pooling=cls", "measure.latency=false", "measure.memory=false", "measure.flops=false",
    ])
    train_run(recipe, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "merged", merge=True, measure=False)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.architectures == ["BertForSequenceClassification"] and plain.config.num_hidden_layers == 2
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    built = build(recipe)
    batch = built.tokenizer(["a gripping, funny film", "tedious and flat", "fine", "the worst of the year"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, slimtune.load_exported(tmp_path / "merged")(**batch).logits)
