"""slimtune.measure.attacks: embedding-space PGD and the nearest-neighbour word-substitution attack."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.measure.attacks import AttackConfig, Substituter, pgd_eval, pgd_perturb, substitute_one, substitution_eval
from tests.fixtures import attach, disable_dropout, make_batch, one_line_error, tiny_bert, train_tiny_lora


def _bert():
    torch.manual_seed(0)
    model = tiny_bert()
    disable_dropout(model)
    return model.eval()


def test_pgd_respects_l2_bound_per_example_and_leaves_padding_untouched():
    model, batch = _bert(), make_batch(5, 9, seed=3)
    # a step much larger than the radius, so the projection is what keeps the bound
    cfg = AttackConfig("pgd", radius=0.1, steps=3, step_size=0.5)
    delta, _, _ = pgd_perturb(model, batch, cfg, torch.Generator().manual_seed(0))
    norms = delta.flatten(1).norm(dim=1)
    assert torch.all(norms <= 0.1 + 1e-6)
    assert torch.allclose(norms, torch.full_like(norms, 0.1), atol=1e-5)  # the bound is reached, not avoided
    pad = batch["attention_mask"] == 0
    assert pad.any() and torch.all(delta[pad] == 0)
    assert torch.all(delta[~pad].abs().sum(-1) > 0)
    # BERT's gradient at padding is already 0; a model that reads its padding has one there
    g = torch.Generator().manual_seed(0)
    reader = BagOfWords(torch.randn(100, 8, generator=g), torch.randn(8, generator=g), read_padding=True)
    delta, _, _ = pgd_perturb(reader, batch, cfg, torch.Generator().manual_seed(0))
    assert torch.all(delta[pad] == 0) and torch.all(delta.flatten(1).norm(dim=1) <= 0.1 + 1e-6)


def test_pgd_init_is_the_official_scaled_uniform_on_non_padding_tokens():
    model, batch = _bert(), make_batch(4, 8, seed=1)
    cfg = AttackConfig("pgd", radius=100.0, steps=0, init_radius=0.05)
    delta, _, _ = pgd_perturb(model, batch, cfg, torch.Generator().manual_seed(7))
    hidden = delta.shape[-1]
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        bound = 0.05 / math.sqrt(n * hidden)
        assert delta[i, :n].abs().max() <= bound + 1e-9 and delta[i, :n].abs().max() > bound / 2
        assert torch.all(delta[i, n:] == 0)


def test_pgd_one_step_is_the_normalised_gradient_of_the_loss():
    model, batch = _bert(), make_batch(3, 7, seed=2)
    cfg = AttackConfig("pgd", radius=100.0, steps=1, step_size=0.03, init_radius=0.0)
    delta, _, _ = pgd_perturb(model, batch, cfg, torch.Generator().manual_seed(0))
    # the slow way: the gradient of the mean cross-entropy at inputs_embeds = E[ids], per example
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, batch["labels"]), embeds)
    grad = grad * batch["attention_mask"].unsqueeze(-1)
    for i in range(3):
        expected = 0.03 * grad[i] / grad[i].norm()
        assert torch.allclose(delta[i], expected, atol=1e-7)


def test_pgd_radius_zero_changes_nothing():
    model = _bert()
    batches = [make_batch(6, 8, seed=s) for s in range(3)]
    out = pgd_eval(model, batches, AttackConfig("pgd", radius=0.0, steps=5, step_size=1.0))
    assert out["attacked_accuracy"] == out["clean_accuracy"] and out["attack_success_rate"] == 0
    delta, clean, robust = pgd_perturb(model, batches[0], AttackConfig("pgd", radius=0.0), torch.Generator().manual_seed(0))
    assert torch.all(delta == 0) and torch.equal(clean, robust)
    # and a large budget does break this random model on some example (the attack is not a no-op)
    strong = pgd_eval(model, batches, AttackConfig("pgd", radius=50.0, steps=5, step_size=10.0))
    assert strong["attacked_accuracy"] < strong["clean_accuracy"]


def test_pgd_is_deterministic_for_a_seed():
    model, batch = _bert(), make_batch(4, 8, seed=5)
    cfg = AttackConfig("pgd", radius=0.5, steps=2, step_size=0.2, init_radius=5.0)
    first, _, _ = pgd_perturb(model, batch, cfg, torch.Generator().manual_seed(3))
    again, _, _ = pgd_perturb(model, batch, cfg, torch.Generator().manual_seed(3))
    other, _, _ = pgd_perturb(model, batch, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_pgd_refuses_a_method_that_cannot_take_inputs_embeds():
    model = _bert()
    attach(model, ("prompt", {"num_tokens": 2}))
    with pytest.raises(SlimtuneError, match="cannot take inputs_embeds") as info:
        pgd_eval(model, [make_batch(2, 6)], AttackConfig("pgd"))
    assert "\n" not in str(info.value)


class BagOfWords(nn.Module):
    """Hand-built undefended classifier: mean of the token embeddings, logit = +-(w . mean)."""

    def __init__(self, weight: torch.Tensor, w: torch.Tensor, read_padding: bool = False):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(weight)
        self.w, self.read_padding = w, read_padding

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        m = (torch.ones_like(attention_mask) if self.read_padding else attention_mask).unsqueeze(-1).float()
        score = ((h * m).sum(1) / m.sum(1)) @ self.w
        return SimpleNamespace(logits=torch.stack([-score, score], -1))


@pytest.fixture(scope="module")
def bow():
    from slimtune.zoo.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    vocab = tokenizer.get_vocab()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(len(vocab), 16, generator=g) * 0.1
    a, b = torch.eye(16)[0], torch.eye(16)[1]
    # "great" and "awful" are each other's nearest neighbours (cosine 0.83) and the classifier reads b
    weight[vocab["great"]] = 10 * (a + 0.3 * b)
    weight[vocab["awful"]] = 10 * (a - 0.3 * b)
    return BagOfWords(weight, b), tokenizer


def test_substitution_finds_an_adversarial_example_for_an_undefended_model(bow):
    model, tokenizer = bow
    split = Dataset.from_dict({"text": ["the film was great", "a great and fine film", "the film was awful"], "label": [1, 1, 0]})
    out = substitution_eval(model, tokenizer, split, 16, AttackConfig("substitution", max_change=0.5, candidates=5))
    assert out["clean_accuracy"] == 1.0
    assert out["attack_success_rate"] > 0 and out["attacked_accuracy"] < out["clean_accuracy"]
    sub = Substituter(model, tokenizer, 16)
    assert "awful" in sub.neighbours("great", 5) and "great" not in sub.neighbours("great", 5)
    assert all(t.isalpha() and t not in ("the", "and") for t in sub.neighbours("film", 20))
    result = substitute_one(sub, "the film was great", 1, AttackConfig("substitution", max_change=0.5, candidates=5))
    assert result["success"] and result["text"] == "the film was awful" and result["changed"] == 1
    assert int(sub.probs([result["text"]])[0].argmax()) == 0  # really misclassified, checked the plain way
    punctuated = substitute_one(sub, "(great!) film", 1, AttackConfig("substitution", max_change=0.5, candidates=5))
    assert punctuated["text"] == "(awful!) film"
    assert substitution_eval(model, tokenizer, split, 16, AttackConfig("substitution", max_change=0.5, candidates=5)) == out


@pytest.mark.parametrize("fields", [{"max_change": 0.0}, {"candidates": 0}, {"max_change": 0.2}])
def test_substitution_with_no_budget_changes_nothing(bow, fields):
    model, tokenizer = bow
    # four words, max_change 0.2: floor(0.8) = 0 words may change
    split = Dataset.from_dict({"text": ["the film was great", "the film was awful"], "label": [1, 0]})
    out = substitution_eval(model, tokenizer, split, 16, AttackConfig("substitution", **fields))
    assert out["attacked_accuracy"] == out["clean_accuracy"] == 1.0 and out["attack_success_rate"] == 0


@pytest.mark.parametrize("argv, field", [
    (["--attack", "fgsm"], "--attack"),
    (["--attack", "pgd", "--attack-radius", "-1"], "--attack-radius"),
    (["--attack", "substitution", "--attack-max-change", "1.5"], "--attack-max-change"),
    (["--attack", "substitution", "--attack-max-change", "-0.1"], "--attack-max-change"),
    (["--attack", "pgd", "--attack-steps", "-2"], "--attack-steps"),
    (["--attack", "pgd", "--attack-examples", "0"], "--attack-examples"),
])
def test_bad_attack_values_are_one_line_errors(tmp_path, capsys, argv, field):
    err = one_line_error(["eval", str(tmp_path), *argv], capsys)
    assert field in err


def test_eval_attack_on_a_trained_tiny_run(tmp_path, tiny_model_dir, tiny_data_file, capsys):
    from slimtune.cli import main

    run = train_tiny_lora(tmp_path / "run", tiny_model_dir, tiny_data_file)
    capsys.readouterr()
    for attack in ("pgd", "substitution"):
        argv = ["eval", str(run), "--json", "--attack", attack, "--attack-examples", "8", "--attack-max-change", "0.5"]
        assert main(argv) == 0
        found = json.loads(capsys.readouterr().out)["attack"]
        assert found["examples"] == 8 and 0 <= found["attacked_accuracy"] <= found["clean_accuracy"]
        assert found.get("words_changed", 0) <= 0.5
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["attack"] == found  # reproducible
