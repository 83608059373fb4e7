"""Lottery tickets (IMP with rewinding, the tickets section) on the tiny BERT: what a round leaves
(survivors = rewind values exactly, pruned entries zero, also through AdamW), the densities per
round, resume mid-search, one-line errors."""

import copy

import pytest
import torch

from slimtune.core.hooks import Hook
from slimtune.errors import SlimtuneError
from slimtune.io import read_json
from slimtune.recipe import validate_recipe
from slimtune.runner import train_run
from slimtune.sparsity.masks import get_mask
from tests.fixtures import assert_same_delta, crash_run, make_trainer


def ticket_recipe(tiny_recipe, steps=6, **tickets):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["method"] = {"name": "full"}
    recipe["train"].update(max_steps=steps, weight_decay=0.1, lr=1e-2, warmup_ratio=0.0)
    recipe["tickets"] = {"density": 0.25, "rounds": 2, **tickets}
    return recipe


class Probe(Hook):
    """Runs after the tickets hook: copies of every trainable tensor, its effective value and
    the optimizer's state size after each step."""

    def __init__(self):
        self.after = {}

    def on_train_begin(self, trainer):
        self.after[0] = self._copy(trainer)

    def on_step_end(self, trainer):
        self.after[trainer.step] = self._copy(trainer)

    @staticmethod
    def _copy(trainer):
        effective = {}
        for name, module in trainer.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                effective[f"{name}.weight"] = module.weight.detach().clone()
        return {"dense": {n: p.detach().clone() for n, p in trainer.trainable.items()}, "effective": effective,
                "adam": len(trainer.optimizer.state), "lr": trainer.scheduler.get_last_lr()[0], "last_epoch": trainer.scheduler.last_epoch}


def run_with_probe(recipe):
    probe = Probe()
    trainer = make_trainer(recipe, hooks=[probe], recipe_hooks=True)
    trainer.fit()
    tickets = next(h for h in trainer.hooks if h.name == "tickets")
    return trainer, tickets, probe


def head_names(trainer):
    return set(trainer.delta.head_names)


@pytest.mark.parametrize(("rewind", "rewind_step"), [("pretrained", 0), ("step:1", 1)])
def test_a_round_rewinds_survivors_exactly_and_pruned_entries_stay_zero(tiny_recipe, rewind, rewind_step):
    trainer, tickets, probe = run_with_probe(ticket_recipe(tiny_recipe, rewind=rewind))
    assert tickets.steps == [2, 4]  # 6 steps in 3 segments
    head = head_names(trainer)
    rewind_values = probe.after[rewind_step]["dense"]
    for step in (2, 4):
        after_round = probe.after[step]
        for name, value in after_round["dense"].items():
            if name in head:  # not rewound (as the official code)
                assert not torch.equal(value, rewind_values[name]), name
                continue
            assert torch.equal(value, rewind_values[name]), (step, name)
        assert after_round["adam"] == 0 and after_round["last_epoch"] == 0  # fresh AdamW, schedule from its step 0
        assert after_round["lr"] == probe.after[0]["lr"]
    # The training in between moved them (the check above can fail).
    assert any(not torch.equal(probe.after[3]["dense"][n], rewind_values[n]) for n in rewind_values if n not in head)
    # Pruned entries read zero after every step of later rounds, through AdamW with weight decay;
    # the effective survivors at the round equal the rewind values.
    for name, (module, tensor_name) in tickets.targets.items():
        kept = get_mask(module, tensor_name).kept
        for step in range(4, 7):
            assert bool((probe.after[step]["effective"][name][~kept] == 0).all()), (step, name)
        dense = next(v for n, v in rewind_values.items() if n.endswith(name) or name in n)
        assert torch.equal(probe.after[4]["effective"][name][kept], dense[kept]), name


def test_densities_per_round_are_density_to_the_k_over_rounds(tiny_recipe):
    for scope in ("global", "local"):
        trainer, tickets, _ = run_with_probe(ticket_recipe(tiny_recipe, steps=8, density=0.3, rounds=3, scope=scope))
        sizes = {n: getattr(m, t).numel() for n, (m, t) in tickets.targets.items()}
        total = sum(sizes.values())
        assert [h["step"] for h in tickets.history] == [2, 4, 6]  # 8 steps in 4 segments
        for k, entry in enumerate(tickets.history, start=1):
            want = 0.3 ** (k / 3)
            assert entry["density"] == pytest.approx(want)
            if scope == "global":
                assert entry["measured"] == pytest.approx(round(want * total) / total)
            else:
                assert entry["measured"] == pytest.approx(sum(round(want * n) for n in sizes.values()) / total)


def test_resume_mid_search_equals_the_uninterrupted_run(tmp_path, tiny_recipe):
    recipe = ticket_recipe(tiny_recipe, steps=8, rewind="step:1")
    recipe["train"].update(checkpoint_every=2, batch_size=32)
    recipe = validate_recipe(recipe)
    train_run(recipe, tmp_path / "whole", progress=False)
    run = tmp_path / "crashed"
    crash_run(recipe, run, 5)  # prunes after steps 3 and 5 (8 steps in 3 segments); crashes in round 2 after the checkpoint at 4
    train_run(recipe, run, resume=True, progress=False)
    assert_same_delta(tmp_path / "whole", run)
    report = read_json(run / "report.json")["tickets"]
    assert report == read_json(tmp_path / "whole/report.json")["tickets"]
    assert report["rounds_done"] == 2 and report["rewind"] == "step:1"
    assert 0 < report["stored_bytes"] < report["dense_bytes"]
    from slimtune.sparsity.tickets import TicketsHook

    rows = dict(TicketsHook.report_rows(report))
    assert rows["tickets"] == f"imp: 2 of 2 rounds, rewind to step:1, density {report['final_density']:.3f}"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("density", 0.0, "not in (0, 1]"),
    ("density", 1.5, "not in (0, 1]"),
    ("rounds", 0, "integer >= 1"),
    ("rewind", "step:x", "valid: pretrained, step:K"),
    ("rewind", "init", "valid: pretrained, step:K"),
])
def test_bad_values_are_one_line_errors(tiny_recipe, field, value, message):
    with pytest.raises(SlimtuneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")) as err:
        validate_recipe(ticket_recipe(tiny_recipe, **{field: value}))
    assert "\n" not in str(err.value)


def test_late_rewind_after_the_first_round_and_a_restructuring_method_are_refused(tiny_recipe):
    trainer = make_trainer(ticket_recipe(tiny_recipe, rewind="step:2"), recipe_hooks=True)
    with pytest.raises(SlimtuneError, match="rewinding to step 2 is not before it") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    from slimtune.features.tickets import TicketsSection

    class Restructuring:
        name = "dsee"
        restructuring_reason = "stage 2 prunes heads"

    class Delta:
        methods = [Restructuring()]

    with pytest.raises(SlimtuneError, match="tickets: method 'dsee' restructures the model during training") as err:
        TicketsSection(density=0.5).check_methods(Delta())
    assert "\n" not in str(err.value)
    recipe = ticket_recipe(tiny_recipe)
    recipe["sparsity"] = {"target": "base", "criterion": "magnitude", "density": 0.5}
    with pytest.raises(SlimtuneError, match="use tickets or sparsity, not both"):
        make_trainer(recipe, recipe_hooks=True)


class Before(Hook):
    """Runs before the tickets hook: the effective target weights each round ranks."""

    def __init__(self):
        self.seen = {}

    def on_step_end(self, trainer):
        self.seen[trainer.step] = {f"{n}.weight": m.weight.detach().clone() for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Linear)}


class Masks(Hook):
    """Runs after it: the masks each round leaves."""

    def __init__(self, targets):
        self.targets, self.after = targets, {}

    def on_step_end(self, trainer):
        self.after[trainer.step] = {n: get_mask(m, t).kept.clone() for n, (m, t) in self.targets.items() if get_mask(m, t) is not None}


def test_each_round_keeps_the_largest_trained_magnitudes_among_the_survivors(tiny_recipe):
    trainer = make_trainer(ticket_recipe(tiny_recipe, steps=8, density=0.3, rounds=3), recipe_hooks=True)
    tickets = next(h for h in trainer.hooks if h.name == "tickets")
    before, masks = Before(), Masks(tickets.targets)
    trainer.hooks = [before, *trainer.hooks, masks]
    trainer.fit()
    names = list(tickets.targets)
    previous = {n: torch.ones_like(before.seen[2][n], dtype=torch.bool) for n in names}
    for k, step in enumerate([2, 4, 6], start=1):
        # The obvious global ranking: |w| of this round's trained weights, earlier pruned entries last.
        scores = torch.cat([torch.where(previous[n], before.seen[step][n].abs(), torch.tensor(-1.0)).flatten() for n in names])
        keep = round(0.3 ** (k / 3) * scores.numel())
        threshold = scores.sort(descending=True).values[keep - 1]
        for n in names:
            want = torch.where(previous[n], before.seen[step][n].abs(), torch.tensor(-1.0)) >= threshold
            assert torch.equal(masks.after[step][n], want), (step, n)
            assert not bool((masks.after[step][n] & ~previous[n]).any())  # only tightens
        previous = masks.after[step]


def test_rate_sets_the_rounds_and_the_densities(tiny_recipe):
    from slimtune.features.tickets import TicketsSection

    section = TicketsSection(density=0.3, rate=0.2)
    assert section.rounds == 6  # 0.8^5 = 0.328 > 0.3 >= 0.8^6 = 0.262
    assert section.densities() == pytest.approx([0.8, 0.64, 0.512, 0.4096, 0.32768, 0.3])
    assert TicketsSection(density=0.3).densities() == pytest.approx([0.3 ** (1 / 3), 0.3 ** (2 / 3), 0.3])
    for fields, message in [({"rate": 0.0}, "not in \\(0, 1\\)"), ({"rate": 0.2, "rounds": 2}, "give rounds or rate, not both")]:
        with pytest.raises(SlimtuneError, match=message) as err:
            validate_recipe(ticket_recipe(tiny_recipe, **fields))
        assert "\n" not in str(err.value)
