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
