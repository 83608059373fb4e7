"""Distillation (compress/distill.py, the ``distill`` section): each loss against a slow loop over
examples, layers, heads and tokens; the layer map; the teacher gets no gradient and the step's
loss is the weighted sum; a run with a run-directory teacher reports its cost; bad input is one
line."""

import math
import shutil

import pytest
import torch

from slimtune.compress.distill import DistillHook, attention_kl_loss, hidden_mse_loss, layer_pairs, logits_kd_loss
from slimtune.errors import SlimtuneError
from slimtune.measure.report import report_rows
from slimtune.recipe import validate_recipe
from slimtune.runner import build, train_run

from tests.fixtures import make_batch, tiny_bert, train_tiny_lora


def test_logits_kd_is_t_squared_times_the_mean_kl_of_the_softened_distributions():
    g = torch.Generator().manual_seed(0)
    student, teacher, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs, zt = sum(math.exp(v / t) for v in s_row), sum(math.exp(v / t) for v in t_row)
        ps, pt = [math.exp(v / t) / zs for v in s_row], [math.exp(v / t) / zt for v in t_row]
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt)) / len(student)
    assert logits_kd_loss(student, teacher, t).item() == pytest.approx(expected * t * t, rel=1e-5)
    assert logits_kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_mse_averages_real_tokens_then_layers():
    g = torch.Generator().manual_seed(1)
    student = tuple(torch.randn(2, 5, 4, generator=g) for _ in range(3))
    teacher = tuple(torch.randn(2, 5, 4, generator=g) for _ in range(5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pairs = [(0, 0), (1, 2), (2, 4)]
    per_layer = []
    for s, t in pairs:
        errors = [((student[s][b, i] - teacher[t][b, i]) ** 2).mean().item() for b in range(2) for i in range(5) if mask[b, i]]
        per_layer.append(sum(errors) / len(errors))
    assert hidden_mse_loss(student, teacher, pairs, mask).item() == pytest.approx(sum(per_layer) / 3, rel=1e-5)


def test_attention_kl_averages_heads_and_real_queries():
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])

    def attention():
        scores = torch.randn(2, 3, 4, 4, generator=g).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return scores.softmax(-1)

    student, teacher = (attention(), attention()), (attention(), attention(), attention())
    pairs = [(0, 1), (1, 2)]
    per_layer = []
    for s, t in pairs:
        rows = []
        for b in range(2):
            for q in range(4):
                if not mask[b, q]:
                    continue
                for h in range(3):
                    p, r = teacher[t][b, h, q], student[s][b, h, q]
                    rows.append(sum(p[k].item() * math.log(p[k].item() / r[k].item()) for k in range(4) if mask[b, k]) / 3)
        per_layer.append(sum(rows) / mask.sum().item())
    assert attention_kl_loss(student, teacher, pairs, mask).item() == pytest.approx(sum(per_layer) / 2, rel=1e-5)


def test_layer_pairs_uniform_and_explicit_and_bad():
    assert layer_pairs(2, 6, "uniform") == [(1, 3), (2, 6)]
    assert layer_pairs(3, 3, "uniform") == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs(2, 6, [2, 5]) == [(1, 2), (2, 5)]
    with pytest.raises(SlimtuneError, match="multiple of the student's 4"):
        layer_pairs(4, 6, "uniform")
    with pytest.raises(SlimtuneError, match="one per student layer"):
        layer_pairs(2, 6, [1])
    with pytest.raises(SlimtuneError, match="layer 7 does not exist"):
        layer_pairs(2, 6, [1, 7])


class _Trainer:
    """What the hook reads of a trainer: the model and its autocast."""

    def __init__(self, model):
        self.model = model

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def test_the_teacher_gets_no_gradient_and_the_loss_is_the_weighted_sum():
    student, teacher = tiny_bert(), tiny_bert()
    with torch.no_grad():  # a different teacher, so that every term is non-zero
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.train()
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    hook = DistillHook(teacher, source="t", kind="run", alpha_ce=0.3, alpha_kd=0.7, temperature=2.0, hidden=0.5, attention=0.2,
                       layers="uniform", student=student)
    batch = make_batch(3, 6)
    loss = hook.backward(_Trainer(student), batch)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
        s = student(**batch, output_hidden_states=True, output_attentions=True)
    mask = batch["attention_mask"]
    expected = (0.3 * s.loss + 0.7 * logits_kd_loss(s.logits, t.logits, 2.0)
                + 0.5 * hidden_mse_loss(s.hidden_states, t.hidden_states, [(0, 0), (1, 1), (2, 2)], mask)
                + 0.2 * attention_kl_loss(s.attentions, t.attentions, [(0, 0), (1, 1)], mask))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(hook.last) == {"ce", "kd", "hidden", "attention"} and all(v > 0 for v in hook.last.values())
    assert hook.report()["teacher_params"] == sum(p.numel() for p in teacher.parameters())


def test_widths_heads_and_positions_must_match_for_hidden_and_attention():
    from transformers import BertConfig, BertForSequenceClassification

    student = tiny_bert()

    def teacher(**fields):
        config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        return BertForSequenceClassification(BertConfig(**{**config, **fields}))

    def refused(model, match, **weights):
        with pytest.raises(SlimtuneError, match=match) as info:
            DistillHook(model, source="t", kind="run", alpha_ce=0.5, alpha_kd=0.5, temperature=2.0, layers="uniform", student=student,
                        **{"hidden": 0.0, "attention": 0.0, **weights})
        assert "\n" not in str(info.value)

    refused(teacher(hidden_size=64), "distill.hidden: the student's hidden states at layer 0 are 1x3x32 where the teacher's at layer 0 are 1x3x64", hidden=1.0)
    refused(teacher(hidden_size=64, num_attention_heads=2), "distill.attention: .* at layer 1 are 1x4x3x3 where the teacher's at layer 1 are 1x2x3x3", attention=1.0)
    DistillHook(teacher(), source="t", kind="run", alpha_ce=0.5, alpha_kd=0.5, temperature=2.0, hidden=1.0, attention=1.0,
                layers="uniform", student=student)  # other FFN widths do not matter


def _recipe(tiny_model_dir, tiny_data_file, **distill):
    return {
        "model": {"name": str(tiny_model_dir)},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 5e-3, "max_length": 16, "warmup_ratio": 0.0},
        "measure": {"latency": False, "memory": False, "flops": False},
        "distill": distill,
    }


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_model_dir, tiny_data_file):
    return train_tiny_lora(tmp_path_factory.mktemp("teacher") / "run", tiny_model_dir, tiny_data_file)


def test_a_run_distils_from_a_run_directory_and_reports_the_teacher(teacher_run, tiny_model_dir, tiny_data_file, tmp_path):
    recipe = _recipe(tiny_model_dir, tiny_data_file, teacher=str(teacher_run), hidden=1.0)
    report = train_run(validate_recipe(recipe), tmp_path / "student", progress=False)
    section = report["distill"]
    assert section["teacher_kind"] == "run" and section["steps"] == 3 and section["teacher_seconds"] > 0
    assert set(section["last_losses"]) == {"ce", "kd", "hidden"}
    assert [list(pair) for pair in section["layer_pairs"]] == [[1, 1], [2, 2]]
    rows = dict(report_rows(report))
    assert rows["distill"].startswith(f"from {teacher_run} (run, ") and "alpha_kd 0.5" in rows["distill"]


def test_building_with_a_teacher_leaves_the_random_state_alone(teacher_run, tiny_model_dir, tiny_data_file):
    plain = _recipe(tiny_model_dir, tiny_data_file, teacher=str(teacher_run))
    torch.manual_seed(123)
    build(validate_recipe(plain))
    after_with = torch.rand(3)
    del plain["distill"]
    torch.manual_seed(123)
    build(validate_recipe(plain))
    assert torch.equal(after_with, torch.rand(3))


def test_bad_distillation_is_one_line(teacher_run, tiny_model_dir, tiny_data_file, tmp_path):
    def refused(match, **distill):
        with pytest.raises(SlimtuneError, match=match) as info:
            build(validate_recipe(_recipe(tiny_model_dir, tiny_data_file, **distill)))
        assert "\n" not in str(info.value)

    refused("every loss weight", teacher=str(teacher_run), alpha_ce=0, alpha_kd=0)
    refused("a model has no task head", teacher=str(tiny_model_dir))
    refused("not found.*a run directory, a `slimtune export` directory", teacher=str(tmp_path / "nowhere"))
    other_tokens = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other_tokens)
    from slimtune.zoo.models import load_tokenizer

    tokenizer = load_tokenizer(other_tokens)
    tokenizer.add_tokens(["zzqqx"])
    tokenizer.save_pretrained(other_tokens)
    refused("its tokenizer is not the run's", teacher=str(other_tokens), alpha_kd=0, hidden=1.0)
    with pytest.raises(SlimtuneError, match="temperature"):
        validate_recipe(_recipe(tiny_model_dir, tiny_data_file, teacher="x", temperature=0))
    dp = _recipe(tiny_model_dir, tiny_data_file, teacher=str(teacher_run))
    dp["privacy"] = {"epsilon": 8}
    with pytest.raises(SlimtuneError, match="distill: cannot be combined with privacy"):
        build(validate_recipe(dp))


def test_hidden_distillation_from_a_plain_model_directory(tiny_model_dir, tiny_data_file, tmp_path):
    recipe = _recipe(tiny_model_dir, tiny_data_file, teacher=str(tiny_model_dir), alpha_kd=0, hidden=1.0, attention=1.0)
    report = train_run(validate_recipe(recipe), tmp_path / "run", progress=False)
    assert report["distill"]["teacher_kind"] == "model" and set(report["distill"]["last_losses"]) == {"ce", "hidden", "attention"}
