"""`slimtune export RUN --out DIR [--merge] [--slim SPEC] [--int8] [--bf16]` and
`slimtune.load_exported`: round trips with identical outputs, int8/bf16 load and evaluate, and
bad input fails with one line and writes nothing."""

import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import slimtune
from slimtune.cli import main
from slimtune.compress.quantize import is_int8_linear, quantize_int8
from slimtune.compress.export import parse_slim_spec, plain_merged
from slimtune.errors import SlimtuneError
from slimtune.io import read_json
from slimtune.runner import export_run, load_run
from slimtune.sparsity.structured import remove_ffn_neurons, remove_heads

from tests.fixtures import text_logits, train_tiny_lora


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """Mean pooling (head.pooling auto on BERT)."""
    return train_tiny_lora(tmp_path_factory.mktemp("slim") / "run", tiny_model_dir, tiny_data_file)


@pytest.fixture(scope="module")
def cls_run_dir(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """[CLS] through BERT's pooler: the head transformers' BertForSequenceClassification computes."""
    return train_tiny_lora(tmp_path_factory.mktemp("slim-cls") / "run", tiny_model_dir, tiny_data_file, head={"pooling": "cls"})


def merged_run_model(run):
    built = load_run(run)
    plain_merged(built.model, built.delta)
    return built.model.eval(), built


def test_slimmed_export_round_trips_with_identical_outputs(run_dir, tmp_path):
    out = tmp_path / "slim"
    report = export_run(run_dir, out, slim="heads=0.5,ffn=0.5", repeats=2, batch_size=4)
    record = read_json(out / "slimtune_export.json")
    assert record["kinds"] == ["merged", "slimmed"] and record["layout"] == "rebuilt"
    assert not (out / "model.safetensors").exists()  # a bare from_pretrained fails rather than mis-loads
    shapes = read_json(out / "shapes.json")
    assert sum(len(layer["heads"]) for layer in shapes["layers"]) == 4  # 8 heads, half removed
    assert sum(len(layer["neurons"]) for layer in shapes["layers"]) == 64  # 128 neurons, half removed

    # The same removal applied by hand to the merged run model gives the same outputs.
    expected_model, built = merged_run_model(run_dir)
    remove_heads(expected_model, {i: [h for h in range(4) if h not in layer["heads"]] for i, layer in enumerate(shapes["layers"])})
    remove_ffn_neurons(expected_model, {i: [n for n in range(64) if n not in layer["neurons"]] for i, layer in enumerate(shapes["layers"])})
    loaded = slimtune.load_exported(out)
    assert torch.equal(text_logits(loaded, built.tokenizer), text_logits(expected_model, built.tokenizer))

    assert report["exported"]["params"] < report["reference"]["params"]
    assert report["ratios"]["flops_per_example"] < 0.75
    assert set(report["exported"]["metrics"]) >= {"accuracy"}
    assert report["size_bytes"] == report["exported"]["size_bytes"] > 0


def test_merged_and_ffn_only_exports_are_plain_hugging_face(cls_run_dir, tmp_path):
    model, built = merged_run_model(cls_run_dir)
    out = tmp_path / "merged"
    export_run(cls_run_dir, out, merge=True, measure=False)
    expected = text_logits(model, built.tokenizer)
    assert torch.equal(text_logits(slimtune.load_exported(out), built.tokenizer), expected)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, no slimtune
    assert torch.equal(text_logits(plain, built.tokenizer), expected)
    assert plain.config.id2label == {0: "neg", 1: "pos"} and plain.config.label2id == {"neg": 0, "pos": 1}
    assert plain.config.architectures == ["BertForSequenceClassification"]
    record = read_json(out / "slimtune_export.json")
    assert record["layout"] == "hf" and record["plain_hf"].startswith("yes: transformers' BertForSequenceClassification")
    # Local scope keeps a uniform FFN width, which BERT's config can express.
    ffn = tmp_path / "ffn"
    export_run(cls_run_dir, ffn, slim="ffn=0.25,scope=local,multiple=1,criterion=magnitude", measure=False)
    assert read_json(ffn / "slimtune_export.json")["layout"] == "hf"
    assert json.loads((ffn / "config.json").read_text())["intermediate_size"] == 48
    plain = AutoModelForSequenceClassification.from_pretrained(ffn).eval()
    assert plain.bert.encoder.layer[0].intermediate.dense.out_features == 48
    assert torch.equal(text_logits(plain, built.tokenizer), text_logits(slimtune.load_exported(ffn), built.tokenizer))


def test_a_mean_pooled_export_refuses_a_plain_hugging_face_load(run_dir, tmp_path):
    """No transformers class pools by the masked mean: a plain load must fail, not random-init
    BERT's [CLS] pooler in front of the classifier (near-constant logits)."""
    model, built = merged_run_model(run_dir)
    assert built.pooling == "mean"
    for name, options in (("merged", {"merge": True}), ("ffn", {"slim": "ffn=0.25,multiple=1,criterion=magnitude"})):
        out = tmp_path / name
        export_run(run_dir, out, measure=False, **options)
        with pytest.raises(OSError, match="no file named model.safetensors"):
            AutoModelForSequenceClassification.from_pretrained(out)
        record = read_json(out / "slimtune_export.json")
        assert record["layout"] == "rebuilt" and record["plain_hf"].startswith("no: its classifier reads the masked mean")
        config = json.loads((out / "config.json").read_text())
        assert "architectures" not in config and config["id2label"] == {"0": "neg", "1": "pos"}
    assert torch.equal(text_logits(slimtune.load_exported(tmp_path / "merged"), built.tokenizer), text_logits(model, built.tokenizer))


def test_a_pickle_posing_as_the_hf_weights_is_refused_in_one_line(cls_run_dir, tmp_path):
    import pickle

    from tests.fixtures import Trap

    out = tmp_path / "merged"
    export_run(cls_run_dir, out, merge=True, measure=False)
    weights = out / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(pickle.dumps(Trap(tmp_path / "ran")))
    with pytest.raises(SlimtuneError, match=r"model.safetensors: this is a Python pickle, not safetensors") as caught:
        slimtune.load_exported(out)
    assert len(str(caught.value).splitlines()) == 1 and not (tmp_path / "ran").exists()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(SlimtuneError, match="model.safetensors: corrupt or truncated safetensors file"):
        slimtune.load_exported(out)


def test_int8_export_loads_and_evaluates(run_dir, tmp_path):
    out = tmp_path / "int8"
    report = export_run(run_dir, out, slim="heads=0.25", int8=True, repeats=2, batch_size=4)
    loaded = slimtune.load_exported(out)
    assert sum(is_int8_linear(m) for m in loaded.modules()) == 2 * 6 + 1  # 6 Linears per layer + classifier
    # The stored int8 tensors are exactly those of the in-memory conversion.
    model, built = merged_run_model(run_dir)
    shapes = read_json(out / "shapes.json")
    remove_heads(model, {i: [h for h in range(4) if h not in layer["heads"]] for i, layer in enumerate(shapes["layers"])})
    assert torch.equal(text_logits(loaded, built.tokenizer), text_logits(quantize_int8(model), built.tokenizer))
    # FLOPs of an int8 model are those of its float shapes, not 0
    assert report["exported"]["flops_per_example"] > 0.5 * report["reference"]["flops_per_example"]
    assert abs(report["exported"]["metrics"]["accuracy"] - report["reference"]["metrics"]["accuracy"]) <= 0.25


def test_bf16_export_loads(run_dir, tmp_path):
    out = tmp_path / "bf16"
    export_run(run_dir, out, bf16=True, measure=False)
    loaded = slimtune.load_exported(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    model, built = merged_run_model(run_dir)
    assert torch.allclose(text_logits(loaded, built.tokenizer), text_logits(model, built.tokenizer), atol=0.1)


@pytest.mark.parametrize("spec, message", [
    ("hedas=0.5", "unknown key 'hedas' (did you mean 'heads'?)"),
    ("heads=1.0", "must be a fraction in [0, 1)"),
    ("heads=-0.1", "must be a fraction in [0, 1)"),
    ("heads=nan", "must be a fraction in [0, 1)"),
    ("heads", "is not key=value"),
    ("heads=0.5,criterion=taylr", "criterion 'taylr' is not known"),
    ("criterion=fisher", "give heads=F and/or ffn=F"),
])
def test_bad_slim_specs(spec, message):
    with pytest.raises(SlimtuneError, match=re.escape(message)):
        parse_slim_spec(spec)


def test_cli_errors_write_nothing(run_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (["export", str(run_dir), "--out", str(tmp_path / "a"), "--slim", "heads=2"], "[0, 1)"),
        (["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "b"), "--merge"], "run directory does not exist"),
        (["export", str(run_dir), "--out", str(taken), "--merge"], "not an empty directory"),
        (["export", str(run_dir), "--out", str(tmp_path / "c")], "give --merge"),
        (["export", str(run_dir), "--out", str(tmp_path / "d"), "--int8", "--bf16"], "choose one"),
        (["export", str(run_dir), "--peft", str(tmp_path / "e"), "--int8"], "does not combine"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_export_prints_the_report(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(run_dir), "--out", str(out), "--slim", "heads=0.5,criterion=fisher,batches=2"]) == 0
    printed = capsys.readouterr().out
    assert "exported (merged+slimmed" in printed and "latency ms" in printed
    assert (out / "export_report.json").is_file()


@pytest.mark.parametrize("heads, layout", [
    ({0: [1, 3], 1: [1, 3]}, "hf"),  # same head counts in every layer: Llama's config says so (head_dim explicit)
    ({0: [2, 3]}, "rebuilt"),  # a whole KV group gone in one layer only: per-layer shapes
])
def test_llama_gqa_slimmed_round_trip(tmp_path, heads, layout):
    from slimtune.compress.export import save_exported
    from tests.fixtures import tiny_llama, token_batch

    model = tiny_llama()
    remove_heads(model, heads)
    remove_ffn_neurons(model, {0: list(range(16)), 1: list(range(16, 32))})
    record = save_exported(model, tmp_path / "llama", pooling="cls")
    assert record["layout"] == layout and record["kinds"] == ["merged", "slimmed"]
    loaded = slimtune.load_exported(tmp_path / "llama")
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    int8 = save_exported(quantize_int8(model), tmp_path / "llama-int8", pooling="cls")
    assert int8["layout"] == "rebuilt" and int8["int8"]
    with torch.no_grad():
        assert torch.equal(slimtune.load_exported(tmp_path / "llama-int8")(**batch).logits, model(**batch).logits)


def test_load_exported_errors(tmp_path):
    with pytest.raises(SlimtuneError, match="does not exist"):
        slimtune.load_exported(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SlimtuneError, match="not a slimtune export"):
        slimtune.load_exported(tmp_path / "plain")


@pytest.mark.parametrize("section, fields", [
    ("privacy", {"epsilon": 8.0, "accountant": "rdp", "physical_batch_size": 8}),
    ("sparsity", {"target": "delta", "criterion": "magnitude", "density": 0.5}),
])
def test_the_export_report_carries_the_runs_privacy_and_sparsity(tiny_recipe, tmp_path, section, fields):
    """An exported DP model is still bound by its ε: the export report says so (and how the delta was sparsified)."""
    from slimtune.recipe import validate_recipe
    from slimtune.runner import train_run

    tiny_recipe[section] = fields
    tiny_recipe["train"]["max_steps"] = 2
    train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    ran = read_json(tmp_path / "run/report.json")[section]
    export_run(tmp_path / "run", tmp_path / "out", merge=True, measure=False)
    report = read_json(tmp_path / "out/export_report.json")
    assert report["run"][section] == ran and report["run"]["report"] == str(tmp_path / "run/report.json")
    if section == "privacy":
        assert 0 < report["run"]["privacy"]["epsilon"] <= 8.0 and report["run"]["privacy"]["delta"] == ran["delta"]
        # Slimming by scores on the private training data is not covered by that ε: refused, nothing written.
        with pytest.raises(SlimtuneError, match="criterion=taylor: scores heads and neurons on the training data of a DP run"):
            export_run(tmp_path / "run", tmp_path / "slim", slim="heads=0.5")
        assert not (tmp_path / "slim").exists()
        export_run(tmp_path / "run", tmp_path / "slim", slim="heads=0.5,criterion=magnitude", measure=False)
        assert read_json(tmp_path / "slim/export_report.json")["run"]["privacy"] == ran
