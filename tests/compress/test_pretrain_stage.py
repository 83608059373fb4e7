"""Prune Once for All's first stage on tiny models (issue 21, item 2): unlabelled text from the
corpus task, gradual magnitude pruning of every Linear but the head, distillation from the dense
model (hidden states for a bare encoder, objective features; token-level logits KD for a causal
LM), and the sparse pre-trained model exported as a directory that ``model: {name: PATH}`` loads
for a pattern-locked transfer."""


import pytest
import torch
from safetensors.torch import load_file

from slimtune.compress.distill import logits_kd_loss
from slimtune.compress.loader import load_exported
from slimtune.errors import SlimtuneError
from slimtune.recipe import validate_recipe
from slimtune.runner import build, evaluate_run, export_run, train_run
from slimtune.sparsity.schedules import select_targets
from slimtune.zoo.models import load_model

from tests.fixtures import tiny_llama

pytestmark = pytest.mark.integration  # the corpus task reads every installed text source


def _pretrain_recipe(model_dir, **distill):
    return {
        "model": {"name": str(model_dir)},
        "task": {"name": "corpus", "objective": "features", "train_size": 64, "eval_size": 16},
        "method": {"name": "full"},
        "train": {"max_steps": 6, "batch_size": 16, "lr": 1e-3, "max_length": 16, "warmup_ratio": 0.0},
        "sparsity": {"target": "base", "sparsity": 0.85, "schedule": "gradual", "frequency": 1, "end_step": 4, "scope": "local"},
        "distill": {"teacher": str(model_dir), "hidden": 1.0, **distill},
        "measure": {"latency": False, "memory": False},
    }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pretrain")
    report = train_run(validate_recipe(_pretrain_recipe(tiny_model_dir)), root / "run", progress=False)
    export_run(root / "run", root / "sparse-model", merge=True, measure=False)
    return report, root / "sparse-model", root / "run"


def test_the_corpus_task_is_unlabelled_and_its_own_held_out_splits_are_disjoint():
    from slimtune.zoo.tasks import load_task

    task = load_task("corpus", train_size=200, eval_size=50)
    assert task.label_names == [] and all(task.splits[s].column_names == ["text"] for s in ("train", "validation", "test"))
    texts = {split: set(task.splits[split]["text"]) for split in ("train", "validation", "test")}
    assert len(texts["train"]) == 200 and len(texts["validation"]) == len(texts["test"]) == 50
    assert not (texts["train"] & texts["validation"]) and not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    assert load_task("corpus", train_size=200, eval_size=50).splits["test"]["text"] == task.splits["test"]["text"]


def test_pretraining_prunes_every_linear_of_the_bare_encoder_and_is_evaluated_by_its_distillation_loss(pretrained):
    report, _, run = pretrained
    assert report["task"]["objective"] == "features" and report["task"]["primary_metric"] == "distill_loss"
    assert set(report["metrics"]) == {"distill_loss", "hidden_mse"} and report["metrics"]["distill_loss"] > 0
    assert report["distill"]["alpha_ce"] == report["distill"]["alpha_kd"] == 0.0
    assert set(report["distill"]["last_losses"]) == {"hidden"}
    per_layer = report["sparsity"]["per_layer"]
    assert len(per_layer) == 2 * 6 + 1  # q, k, v, attention out, FFN in/out per layer, and the pooler
    assert all(abs(density - 0.15) < 0.01 for density in per_layer.values())
    assert evaluate_run(run)["metrics"] == pytest.approx(report["metrics"], rel=1e-5)  # `slimtune eval` measures the same


def test_the_sparse_pretrained_directory_loads_as_a_plain_model_and_transfers_with_the_pattern_locked(pretrained, tiny_data_file, tmp_path):
    _, model_dir, _ = pretrained
    weights = load_file(model_dir / "model.safetensors")
    linear = [k for k in weights if k.endswith(".weight") and weights[k].dim() == 2 and "embeddings" not in k]
    zeros = {k: weights[k] == 0 for k in linear}
    assert all(abs(float(z.float().mean()) - 0.85) < 0.01 for z in zeros.values())
    plain = load_model(model_dir, objective="features")  # transformers' BertModel under its own names
    assert torch.equal(plain.encoder.layer[0].attention.self.query.weight, weights["encoder.layer.0.attention.self.query.weight"])
    transfer = {
        "model": {"name": str(model_dir)},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": {"name": "full"},
        "train": {"max_steps": 4, "batch_size": 16, "lr": 1e-2, "max_length": 16, "warmup_ratio": 0.0, "weight_decay": 0.1},
        "sparsity": {"lock": True},
        "measure": {"latency": False, "memory": False, "flops": False},
    }
    train_run(validate_recipe(transfer), tmp_path / "transfer", progress=False)
    export_run(tmp_path / "transfer", tmp_path / "transferred", merge=True, measure=False)
    after = load_exported(tmp_path / "transferred").state_dict()
    for name, zero in zeros.items():
        if name.startswith("pooler."):  # mean pooling (MiniLM's) replaces the [CLS] pooler downstream
            continue
        moved = after[f"bert.{name}"]
        assert bool((moved[zero] == 0).all()), name
        assert not torch.equal(moved, weights[name]), f"{name} did not train"


def test_a_bare_encoder_distils_hidden_states_only(tiny_model_dir):
    for field, value, match in (("alpha_kd", 0.5, "alpha_kd 0.5 with task.objective features"),
                                ("hidden", 0.0, "give hidden or attention > 0")):
        with pytest.raises(SlimtuneError, match=match) as info:
            build(validate_recipe(_pretrain_recipe(tiny_model_dir, **{field: value})))
        assert "\n" not in str(info.value)
    with pytest.raises(SlimtuneError, match="task 'corpus' is unlabelled text: set task.objective"):
        recipe = _pretrain_recipe(tiny_model_dir)
        recipe["task"]["objective"] = "classification"
        validate_recipe(recipe)


def test_token_level_kd_averages_the_real_tokens_kd():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rows = [logits_kd_loss(student[b, t][None], teacher[b, t][None], 2.0) for b in range(2) for t in range(5) if mask[b, t]]
    assert torch.allclose(logits_kd_loss(student, teacher, 2.0, mask), torch.stack(rows).mean(), atol=1e-6)


def test_pruning_the_base_of_a_causal_lm_leaves_its_vocabulary_projection():
    model = tiny_llama(lm=True)
    targets = select_targets(model, None, "base")
    assert "lm_head.weight" not in targets and len(targets) == 2 * 7


def test_a_bare_encoder_without_a_teacher_is_refused_in_one_line(tiny_model_dir):
    recipe = _pretrain_recipe(tiny_model_dir)
    del recipe["distill"]
    with pytest.raises(SlimtuneError, match="task.objective: 'features' trains a bare model, which has no loss of its own; add a distill section"):
        validate_recipe(recipe)


def _tiny_mlm_dir(path):
    """A tiny random BERT with its masked-LM head and MiniLM's tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    from slimtune.zoo.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_masking_is_berts_static_and_leaves_special_tokens(tiny_model_dir):
    from datasets import Dataset

    from slimtune.zoo.batches import IGNORE_INDEX, collate, tokenize_split
    from slimtune.zoo.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    texts = [f"sentence number {i} is a rather long example of ordinary english words for masking" for i in range(300)]
    rows = tokenize_split(Dataset.from_dict({"text": texts}), tokenizer, 32, "mlm").to_list()
    plain = tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    predicted = masked = randomised = kept = 0
    for row, original in zip(rows, plain):
        labels = row["labels"]
        assert labels[0] == labels[-1] == IGNORE_INDEX  # [CLS] and [SEP] are never predicted
        # BERT's create_pretraining_data.py: max(1, round(15% of the row's tokens)) predictions
        assert sum(label != IGNORE_INDEX for label in labels) == max(1, round(0.15 * (len(original) - 2)))
        for position, label in enumerate(labels):
            if label == IGNORE_INDEX:
                assert row["input_ids"][position] == original[position]
                continue
            predicted += 1
            assert label == original[position]
            shown = row["input_ids"][position]
            masked += shown == tokenizer.mask_token_id
            kept += shown == original[position]
            randomised += shown not in (tokenizer.mask_token_id, original[position])
    assert abs(masked / predicted - 0.8) < 0.04 and abs(kept / predicted - 0.1) < 0.03 and abs(randomised / predicted - 0.1) < 0.03
    assert tokenize_split(Dataset.from_dict({"text": texts}), tokenizer, 32, "mlm").to_list() == rows  # the same every time
    batch = collate(rows[:4], tokenizer.pad_token_id, "mlm")
    assert batch["labels"].shape == batch["input_ids"].shape and bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())


def test_masked_lm_pretraining_with_token_kd_on_the_masked_positions(tmp_path, tiny_model_dir):
    model_dir = _tiny_mlm_dir(tmp_path / "tiny-mlm")
    recipe = _pretrain_recipe(model_dir, alpha_ce=0.5, alpha_kd=0.5, hidden=0.0)
    recipe["task"]["objective"] = "mlm"
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert report["task"]["primary_metric"] == "perplexity" and report["metrics"]["perplexity"] > 1
    assert set(report["distill"]["last_losses"]) == {"ce", "kd"}
    assert abs(report["sparsity"]["weight_density"] - 0.15) < 0.01
    assert evaluate_run(tmp_path / "run")["metrics"] == pytest.approx(report["metrics"], rel=1e-5)
    no_head = _pretrain_recipe(tiny_model_dir, alpha_ce=0.5, alpha_kd=0.5, hidden=0.0)
    no_head["task"]["objective"] = "mlm"
    with pytest.raises(SlimtuneError, match="has no masked-LM head .* use task.objective features") as info:
        build(validate_recipe(no_head))
    assert "\n" not in str(info.value)


def test_a_masked_lm_per_example_loss_is_its_own_loss_and_soft_prompts_are_never_predicted(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from slimtune.privacy.losses import per_sample_losses
    from tests.fixtures import attach

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).eval()
    ids = torch.randint(5, 100, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 1], labels[1, 4], labels[2, 7] = 11, 12, 13, 14
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        losses = per_sample_losses(model(**batch), batch, "mlm")
        one_by_one = [model(**{k: v[i:i + 1] for k, v in batch.items()}).loss for i in range(3)]
    assert torch.allclose(losses, torch.stack(one_by_one), atol=1e-5)
    attach(model, ("prompt", {"num_tokens": 4}), objective="mlm")
    with torch.no_grad():
        out = model(**batch)  # the labels are widened with the soft tokens, never predicted
    assert out.logits.shape[1] == 9 + 4 and torch.isfinite(out.loss)
