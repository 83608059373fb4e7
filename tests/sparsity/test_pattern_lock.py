"""Pattern lock (``sparsity: {lock: true}``, Prune Once for All's sparse transfer): full
fine-tuning of a sparse model keeps every loaded zero of the backbone's linear weights at zero
through AdamW with weight decay and through a resume, trains the rest, and leaves the head and
embeddings alone; bad uses are one line."""

import copy

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.recipe import validate_recipe
from slimtune.runner import build, load_run, train_run
from tests.fixtures import assert_same_delta, crash_run

from transformers import BertForSequenceClassification


@pytest.fixture(scope="module")
def sparse_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny BERT with 70% of every encoder/pooler Linear weight zeroed (random positions)."""
    import shutil

    path = tmp_path_factory.mktemp("sparse-bert")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "classifier":
                module.weight.mul_((torch.rand(module.weight.shape, generator=g) > 0.7).float())
    model.save_pretrained(path)
    return path


def lock_recipe(tiny_recipe, model_dir, **sparsity):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["model"] = {"name": str(model_dir)}
    recipe["method"] = {"name": "full"}
    recipe["train"].update(max_steps=6, weight_decay=0.1, lr=1e-2)
    recipe["sparsity"] = {"lock": True, **sparsity}
    return recipe


def linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("classifier") and "bert." in n}


def test_lock_keeps_every_loaded_zero_and_trains_the_rest(tmp_path, tiny_recipe, sparse_model_dir):
    recipe = validate_recipe(lock_recipe(tiny_recipe, sparse_model_dir))
    assert recipe.features["sparsity"].target == "base"
    before = linear_weights(BertForSequenceClassification.from_pretrained(sparse_model_dir))
    report = train_run(recipe, tmp_path / "run", progress=False)
    after = linear_weights(load_run(tmp_path / "run").model)
    assert len(after) == 2 * 6  # 6 Linears per layer (the run pools by the mean: no pooler)
    before = {name: before[name] for name in after}
    for name, weight in before.items():
        zeros = weight == 0
        assert bool((after[name][zeros] == 0).all()), f"{name}: a locked zero moved"
        assert bool((after[name][~zeros] != weight[~zeros]).any()), f"{name}: the kept weights did not train"
    density = sum(int((w != 0).sum()) for w in before.values()) / sum(w.numel() for w in before.values())
    assert report["sparsity"]["history"] == [{"step": 0, "locked": True, "measured": pytest.approx(density)}]


def test_a_locked_run_resumes_to_the_same_weights(tmp_path, tiny_recipe, sparse_model_dir):
    recipe = lock_recipe(tiny_recipe, sparse_model_dir)
    recipe["train"].update(checkpoint_every=2)
    recipe = validate_recipe(recipe)
    train_run(recipe, tmp_path / "whole", progress=False)
    crash_run(recipe, tmp_path / "crashed", 3)
    train_run(recipe, tmp_path / "crashed", resume=True, progress=False)
    assert_same_delta(tmp_path / "whole", tmp_path / "crashed")


def test_bad_locks_are_one_line(tiny_recipe, tiny_model_dir, sparse_model_dir):
    with pytest.raises(SlimtuneError, match="has no zero in its 12 target weights"):
        build(validate_recipe(lock_recipe(tiny_recipe, tiny_model_dir)))
    for field, value in (("density", 0.5), ("schedule", "gradual"), ("criterion", "snip")):
        with pytest.raises(SlimtuneError, match=f"sparsity.lock keeps the loaded model's zeros, so '{field}' has no meaning"):
            validate_recipe(lock_recipe(tiny_recipe, sparse_model_dir, **{field: value}))


def test_lora_on_a_locked_sparse_model_merges_into_the_same_zeros(tmp_path, tiny_recipe, sparse_model_dir):
    """The sparsity survives the merge: LoRA trained on the locked model is masked by it, and the
    merged export has exactly the loaded zeros and the run's outputs."""
    import slimtune
    from slimtune.runner import export_run
    from tests.fixtures import text_logits

    recipe = lock_recipe(tiny_recipe, sparse_model_dir)
    recipe["method"] = {"name": "lora", "r": 4}
    train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "merged", merge=True, measure=False)
    exported = slimtune.load_exported(tmp_path / "merged")
    loaded = BertForSequenceClassification.from_pretrained(sparse_model_dir)
    before, after = linear_weights(loaded), linear_weights(exported)
    assert len(after) == 12
    for name, weight in after.items():
        assert torch.equal(weight != 0, before[name] != 0), f"{name}: the merge moved the zeros"
    run = load_run(tmp_path / "run")
    torch.testing.assert_close(text_logits(exported, run.tokenizer), text_logits(run.model.eval(), run.tokenizer), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def locked_lora_run(tmp_path_factory, tiny_model_dir, tiny_data_file, sparse_model_dir):
    recipe = {
        "model": {"name": str(sparse_model_dir)},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 4, "batch_size": 16, "lr": 5e-3, "max_length": 16, "warmup_ratio": 0.0},
        "measure": {"latency": False},
        "sparsity": {"lock": True},
    }
    run = tmp_path_factory.mktemp("locked") / "run"
    train_run(validate_recipe(recipe), run, progress=False)
    return run


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_sparse_storage_round_trips_and_reports_the_encoder_compression(locked_lora_run, sparse_model_dir, tmp_path, int8):
    """export --sparse: the same tensors as the dense export, in fewer bytes; the encoder's
    compression is its float32 bytes over the stored ones."""
    import slimtune
    from slimtune.io import read_json, read_safetensors
    from slimtune.runner import export_run
    from tests.fixtures import text_logits

    export_run(locked_lora_run, tmp_path / "dense", merge=True, int8=int8, measure=False)
    report = export_run(locked_lora_run, tmp_path / "sparse", merge=True, int8=int8, sparse=True, measure=False)
    record = report["export"]
    assert "sparse" in record["kinds"] and record["sparse"]["format"] == "slimtune-sparse/1"
    stored = read_safetensors(tmp_path / "sparse" / "slimtune_model.safetensors")
    assert any("::sparse_" in k for k in stored) and not any(k.startswith("classifier.weight::") for k in stored)
    tokenizer = load_run(locked_lora_run).tokenizer
    dense, sparse = slimtune.load_exported(tmp_path / "dense"), slimtune.load_exported(tmp_path / "sparse")
    assert torch.equal(text_logits(sparse, tokenizer), text_logits(dense, tokenizer))
    layers = [k for k in stored if ".layer." in k]
    assert record["sparse"]["encoder_stored_bytes"] == sum(stored[k].numel() * stored[k].element_size() for k in layers)
    base = BertForSequenceClassification.from_pretrained(sparse_model_dir)  # the same shapes, dense float32
    dense_fp32 = sum(p.numel() * 4 for n, p in base.state_dict().items() if ".layer." in n)
    assert record["sparse"]["encoder_dense_fp32_bytes"] == dense_fp32
    assert record["sparse"]["encoder_compression"] == pytest.approx(dense_fp32 / record["sparse"]["encoder_stored_bytes"])
    assert record["sparse"]["encoder_compression"] > (3.0 if int8 else 1.5)  # 70% zeros in the Linears
    assert read_json(tmp_path / "sparse" / "slimtune_export.json")["sparse"] == record["sparse"]


def test_sparse_export_refuses_bf16(locked_lora_run, tmp_path):
    from slimtune.runner import export_run

    with pytest.raises(SlimtuneError, match="--sparse and --bf16"):
        export_run(locked_lora_run, tmp_path / "x", sparse=True, bf16=True)
    assert not (tmp_path / "x").exists()


def test_locked_transfer_with_task_distillation_from_a_dense_teacher(tmp_path, tiny_recipe, tiny_model_dir, sparse_model_dir, tiny_data_file):
    """Prune Once for All's transfer: the sparse model fine-tuned with its pattern locked while a
    dense fine-tuned teacher of the task is distilled into it."""
    from tests.fixtures import train_tiny_lora

    teacher = train_tiny_lora(tmp_path / "teacher", tiny_model_dir, tiny_data_file)
    recipe = lock_recipe(tiny_recipe, sparse_model_dir)
    recipe["distill"] = {"teacher": str(teacher)}
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert report["distill"]["teacher_kind"] == "run" and set(report["distill"]["last_losses"]) == {"ce", "kd"}
    before = linear_weights(BertForSequenceClassification.from_pretrained(sparse_model_dir))
    after = linear_weights(load_run(tmp_path / "run").model)
    assert all(bool((after[n][before[n] == 0] == 0).all()) for n in after)
