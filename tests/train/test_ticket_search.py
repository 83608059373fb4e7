"""Robust and plain ticket search (tickets mode robust|plain) on the tiny BERT: FreeLB against a
slow loop, the L0 schedule, what each phase trains, the drawn ticket (top gate scores, survivors
= rewind values, zeros through AdamW), scores reused by another run, random re-init, resume in
every phase, one-line errors."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimtune.core.hooks import Hook
from slimtune.errors import SlimtuneError
from slimtune.io import read_json, read_safetensors
from slimtune.recipe import validate_recipe
from slimtune.runner import train_run
from slimtune.sparsity.hard_concrete import gated_tensors
from slimtune.sparsity.masks import get_mask, kept_from_scores
from slimtune.train.adversarial import FreeLB, freelb_backward
from slimtune.train.ticket_search import SCORES_FILE, l0_weight, phase_steps
from tests.fixtures import assert_same_delta, crash_run, disable_dropout, make_trainer, tiny_bert


def search_recipe(tiny_recipe, steps=10, **tickets):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "full"}
    recipe["train"].update(max_steps=steps, weight_decay=0.1, lr=1e-2, warmup_ratio=0.0)
    recipe["tickets"] = {"mode": "robust", "density": 0.4, "phases": [0.2, 0.5, 0.3],
                         "adversary": {"steps": 3}, "search": {"lr": 0.5}, **tickets}
    return recipe


def test_l0_weight_is_zero_then_a_linear_ramp_then_constant():
    weights = [l0_weight(t, 100, 0.5, 0.1, 0.3) for t in range(1, 101)]
    assert weights[:10] == [0.0] * 10  # steps 1..10
    assert weights[24] == pytest.approx(0.5 * 15 / 30)  # step 25: half-way up the ramp
    assert weights[39:] == [0.5] * 61  # from step 40 on
    assert all(b >= a for a, b in zip(weights, weights[1:]))
    assert phase_steps(10, (0.2, 0.5, 0.3)) == (2, 7)


def _slow_freelb(model, batch, cfg, start):
    """The obvious loop: the mean over iterates of each iterate's parameter gradient, with the
    perturbation stepped by the normalised gradient (and bounded)."""
    mask = batch["attention_mask"].unsqueeze(-1).float()
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    delta = start.clone()
    for step in range(cfg.steps):
        delta = delta.detach().requires_grad_(True)
        embeds = model.get_input_embeddings()(batch["input_ids"])  # the word embeddings train too
        logits = model(inputs_embeds=embeds + delta, attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        grads = torch.autograd.grad(loss, params + [delta])
        total = [t + g / cfg.steps for t, g in zip(total, grads[:-1])]
        g = grads[-1] * mask
        for i in range(len(delta)):
            delta_i = delta[i].detach() + cfg.step_size * g[i] / g[i].norm().clamp_min(1e-8)
            if cfg.max_norm > 0 and delta_i.norm() > cfg.max_norm:
                delta_i = delta_i * cfg.max_norm / delta_i.norm()
            delta.data[i] = delta_i * mask[i]
    return total


@pytest.mark.parametrize("max_norm", [0.0, 0.02])
def test_freelb_accumulates_the_mean_gradient_over_the_iterates(max_norm):
    model = tiny_bert()
    disable_dropout(model)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}
    batch["attention_mask"][1, 5:] = 0
    cfg = FreeLB(steps=4, step_size=0.05, init_radius=0.05, max_norm=max_norm)
    state = torch.get_rng_state()
    loss = freelb_backward(model, batch, cfg)
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    # The same start, drawn from the same global RNG state.
    torch.set_rng_state(state)
    from slimtune.measure.attacks import perturbation_start

    start = perturbation_start(model.get_input_embeddings()(batch["input_ids"]).detach(), batch["attention_mask"], cfg.init_radius)
    model.zero_grad()
    slow = _slow_freelb(model, batch, cfg, start)
    for (name, got), want in zip(fast.items(), slow):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    assert float(loss) > 0


def test_one_pass_from_zero_is_the_clean_gradient():
    model = tiny_bert()
    disable_dropout(model)
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long), "labels": torch.tensor([1, 0])}
    freelb_backward(model, batch, FreeLB(steps=1, init_radius=0.0))
    adversarial = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(adversarial[name], p.grad, msg=name)


class Probe(Hook):
    """After the tickets hook: values of the base parameters, of the gates, and the optimizer's
    parameters after each step; counts forward passes of the model."""

    def __init__(self):
        self.after, self.forwards, self.handle = {}, {}, None

    def on_train_begin(self, trainer):
        self.handle = trainer.model.register_forward_pre_hook(lambda *_: self._count(trainer))
        self.after[0] = self._copy(trainer)

    def _count(self, trainer):
        if trainer.model.training:
            self.forwards[trainer.step + 1] = self.forwards.get(trainer.step + 1, 0) + 1

    def on_step_end(self, trainer):
        self.after[trainer.step] = self._copy(trainer)

    def on_train_end(self, trainer):
        self.handle.remove()

    @staticmethod
    def _copy(trainer):
        tickets = next(h for h in trainer.hooks if h.name == "tickets")
        return {"base": {n: p.detach().clone() for n, p in tickets.base_trainable.items()},
                "gates": {n: p.detach().clone() for n, p in trainer.trainable.items() if n.endswith("log_alpha")},
                "optimized": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
                "effective": {f"{n}.weight": m.weight.detach().clone() for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Linear)}}


def run_with_probe(recipe, run_dir=None):
    probe = Probe()
    trainer = make_trainer(recipe, run_dir=run_dir, hooks=[probe], recipe_hooks=True)
    trainer.fit()
    return trainer, next(h for h in trainer.hooks if h.name == "tickets"), probe


@pytest.mark.parametrize("mode", ["robust", "plain"])
def test_each_phase_trains_what_it_should_and_the_ticket_is_the_top_gates(tiny_recipe, tmp_path, mode):
    recipe = search_recipe(tiny_recipe, mode=mode)
    if mode == "plain":
        del recipe["tickets"]["adversary"]
    trainer, tickets, probe = run_with_probe(recipe, tmp_path)
    assert (tickets.finetune_end, tickets.search_end) == (2, 7)
    names = list(tickets.targets)
    base_names = list(probe.after[0]["base"])
    # Fine-tuning (steps 1-2) moves the weights and has no gates (they come after step 2).
    assert not probe.after[1]["gates"] and probe.after[2]["gates"] and any(not torch.equal(probe.after[2]["base"][n], probe.after[0]["base"][n]) for n in base_names)
    # The search (steps 3-7): the weights stay the fine-tuned ones; only the gates train (after
    # step 7 the ticket is drawn and everything rewound).
    for step in range(3, 7):
        for n in base_names:
            assert torch.equal(probe.after[step]["base"][n], probe.after[2]["base"][n]), (step, n)
    assert probe.after[3]["gates"] and not all(torch.equal(probe.after[3]["gates"][g], probe.after[6]["gates"][g]) for g in probe.after[3]["gates"])
    # FreeLB: 3 forward passes per search step; plain: 1; fine-tuning and retraining: 1.
    per_step = 3 if mode == "robust" else 1
    assert [probe.forwards[s] for s in range(1, 11)] == [1, 1] + [per_step] * 5 + [1, 1, 1]
    # The ticket: the top 40% of the final gate scores, globally (the saved scores file).
    scores = read_safetensors(tmp_path / SCORES_FILE)
    assert set(scores) == {f"{n}.log_alpha" for n in names}
    want = kept_from_scores({n: scores[f"{n}.log_alpha"] for n in names}, 0.4, "global")
    total = sum(m.numel() for m in want.values())
    assert sum(int(m.sum()) for m in want.values()) == round(0.4 * total)
    for n, (module, tensor_name) in tickets.targets.items():
        assert torch.equal(get_mask(module, tensor_name).kept, want[n]), n
    # Retraining (steps 8-10) starts from the values before training, head included.
    after_draw = probe.after[7]
    for n in base_names:
        assert torch.equal(after_draw["base"][n], probe.after[0]["base"][n]), n
    assert after_draw["optimized"] == sum(p.numel() for p in tickets.base_trainable.values())
    # ... and the pruned entries stay zero through AdamW with weight decay; the survivors train.
    for n in names:
        kept = want[n]
        for step in range(7, 11):
            assert bool((probe.after[step]["effective"][n][~kept] == 0).all()), (step, n)
        if kept.any():
            assert not torch.equal(probe.after[10]["effective"][n][kept], after_draw["effective"][n][kept])
    report = tickets.report()
    assert report["phases"] == {"finetune": 2, "search": 5, "retrain": 3}
    assert report["final_density"] == pytest.approx(round(0.4 * total) / total)
    assert report["adversarial"] is (mode == "robust") and report["scores_file"] == SCORES_FILE
    assert report["search_log"][-1]["step"] == 7
    from slimtune.sparsity.tickets import TicketsHook

    rows = dict(TicketsHook.report_rows(report))
    assert rows["tickets"] == f"{mode} search (2 fine-tune + 5 search steps), 3 retrain steps, rewind to pretrained, density {report['final_density']:.3f}"


def test_the_l0_penalty_lowers_the_gates(tiny_recipe):
    """With a large L0 weight and no task signal to keep them, the gates' keep probability falls
    once the penalty starts; with l0 = 0 it does not fall as far."""
    finals = {}
    for l0 in (0.0, 50.0):
        recipe = search_recipe(tiny_recipe, steps=20, mode="plain", search={"lr": 0.5, "l0": l0, "l0_start": 0.0, "l0_warmup": 0.0})
        del recipe["tickets"]["adversary"]
        _, tickets, _ = run_with_probe(recipe)
        finals[l0] = tickets.log[-1]["keep_prob"]
    assert finals[50.0] < finals[0.0] - 0.2


def test_from_scores_draws_the_same_ticket_at_another_density(tiny_recipe, tmp_path):
    train_run(validate_recipe(search_recipe(tiny_recipe)), tmp_path / "search", progress=False)
    scores = read_safetensors(tmp_path / "search" / SCORES_FILE)
    recipe = search_recipe(tiny_recipe, steps=4, density=0.7, from_scores=str(tmp_path / "search"))
    del recipe["tickets"]["phases"]
    trainer, tickets, probe = run_with_probe(recipe)
    names = list(tickets.targets)
    want = kept_from_scores({n: scores[f"{n}.log_alpha"] for n in names}, 0.7, "global")
    for n, (module, tensor_name) in tickets.targets.items():
        assert torch.equal(get_mask(module, tensor_name).kept, want[n]), n
    assert [probe.forwards[s] for s in range(1, 5)] == [1, 1, 1, 1]  # no search: all retraining
    assert tickets.report()["phases"] == {"finetune": 0, "search": 0, "retrain": 4}
    bad = search_recipe(tiny_recipe, from_scores=str(tmp_path / "nowhere"))
    with pytest.raises(SlimtuneError, match="does not exist; give a run directory of a finished tickets search") as err:
        make_trainer(bad, recipe_hooks=True).fit()
    assert "\n" not in str(err.value)


def test_random_init_re_initialises_the_ticket_with_the_models_initializer(tiny_recipe):
    torch.manual_seed(0)
    _, tickets, probe = run_with_probe(search_recipe(tiny_recipe, init="random"))
    std = tickets.model.config.initializer_range
    values = []
    for n, (module, tensor_name) in tickets.targets.items():
        kept = get_mask(module, tensor_name).kept
        if kept.any():
            values.append(probe.after[7]["effective"][n][kept])
            assert not torch.equal(values[-1], probe.after[0]["base"][n][kept]), n
    assert len(values) > 3
    values = torch.cat(values)
    assert values.mean().abs() < 0.1 * std and values.std() == pytest.approx(std, rel=0.1)


@pytest.mark.parametrize("crash_at", [2, 5, 9])  # in fine-tuning, in the search, in retraining
def test_resume_in_every_phase_equals_the_uninterrupted_run(tmp_path, tiny_recipe, crash_at):
    recipe = search_recipe(tiny_recipe)
    recipe["train"].update(checkpoint_every=1, batch_size=32)
    recipe = validate_recipe(recipe)
    train_run(recipe, tmp_path / "whole", progress=False)
    run = tmp_path / "crashed"
    crash_run(recipe, run, crash_at)
    train_run(recipe, run, resume=True, progress=False)
    assert_same_delta(tmp_path / "whole", run)
    for name in (SCORES_FILE,):
        whole, resumed = read_safetensors(tmp_path / "whole" / name), read_safetensors(run / name)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    report, whole = read_json(run / "report.json")["tickets"], read_json(tmp_path / "whole/report.json")["tickets"]
    timings = whole.pop("step_seconds_median")
    assert set(timings) == {"finetune", "search", "retrain"}
    report.pop("step_seconds_median")
    assert report == whole


@pytest.mark.parametrize(("tickets", "message"), [
    ({"phases": [0.5, 0.5, 0.0]}, "leaves no retraining step"),
    ({"phases": [0.3, 0.0, 0.7]}, "leaves no search step"),
    ({"rewind": "step:5"}, "is after fine-tuning ends"),
])
def test_impossible_phases_are_one_line_errors(tiny_recipe, tickets, message):
    with pytest.raises(SlimtuneError, match=message) as err:
        make_trainer(search_recipe(tiny_recipe, **tickets), recipe_hooks=True).fit()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("tickets", "message"), [
    ({"mode": "plain", "adversary": {"steps": 2}}, "mode plain is the search without the adversarial term"),
    ({"rounds": 2}, "tickets.rounds: only for mode imp"),
    ({"mode": "imp", "adversary": None, "search": None}, "only for mode robust or plain"),
    ({"search": {"l0": -0.1}}, "tickets.search.l0: -0.1 is negative"),
    ({"phases": [0.5, 0.6, 0.1]}, "summing to 1"),
    ({"adversary": {"steps": 0}}, "adversary.steps"),
])
def test_bad_values_are_one_line_errors(tiny_recipe, tickets, message):
    recipe = search_recipe(tiny_recipe)
    recipe["tickets"].update(tickets)
    recipe["tickets"] = {k: v for k, v in recipe["tickets"].items() if v is not None}
    with pytest.raises(SlimtuneError, match=message.replace("(", r"\(")) as err:
        validate_recipe(recipe)
    assert "\n" not in str(err.value)


def test_privacy_is_refused_with_a_search(tiny_recipe):
    recipe = search_recipe(tiny_recipe)
    recipe["privacy"] = {"epsilon": 8.0}
    with pytest.raises(SlimtuneError, match="use mode imp with privacy") as err:
        make_trainer(recipe, recipe_hooks=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("method", "target"), [({"name": "lora", "r": 4}, "base"), ({"name": "lora", "r": 4}, "delta"), ({"name": "pfeiffer"}, "delta")])
def test_the_search_gates_any_methods_tensors(tiny_recipe, method, target):
    recipe = search_recipe(tiny_recipe, target=target)
    recipe["method"] = method
    trainer, tickets, probe = run_with_probe(recipe)
    assert tickets.targets and not list(gated_tensors(trainer.model))  # the gates are gone: fixed masks
    kept = sum(int(get_mask(m, t).kept.sum()) for m, t in tickets.targets.values())
    total = sum(get_mask(m, t).kept.numel() for m, t in tickets.targets.values())
    assert kept == round(0.4 * total)
    assert probe.forwards[4] == 3  # a search step: 3 FreeLB passes
