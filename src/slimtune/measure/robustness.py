"""A run's accuracy under attack (:mod:`slimtune.measure.attacks`) as the ``robustness`` section of
its report.json: measured at the end of training by the recipe's ``robustness`` section (the hook
here) or later by ``slimtune eval RUN --attack`` (merged into the same section), printed on the
report card by :meth:`RobustnessHook.report_rows` either way.

The section is ``{"attacks": [entry, ...]}``, one entry per attack setting, as
:func:`slimtune.measure.attacks.attack_task` returns it: ``key`` (e.g. ``pgd:radius=0.1``),
``config``, ``examples``, ``clean_accuracy``, ``attacked_accuracy``, ``attack_success_rate`` and
for substitution ``words_changed`` and ``queries_per_example``. A new result replaces the entry
with the same key.
"""

from __future__ import annotations

from typing import Any

from slimtune.core.hooks import Hook
from slimtune.measure.attacks import AttackConfig, attack_task


def merge_attacks(section: dict[str, Any] | None, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``section`` (a report's ``robustness``, or None) with ``entries`` added: an entry replaces
    the one with its key, in its place; new keys are appended."""
    found = list((section or {}).get("attacks", []))
    for entry in entries:
        at = next((i for i, old in enumerate(found) if old.get("key") == entry["key"]), None)
        if at is None:
            found.append(entry)
        else:
            found[at] = entry
    return {**(section or {}), "attacks": found}


def attacked_accuracies(report: dict[str, Any]) -> dict[str, float]:
    """``{key: attacked accuracy}`` of a report (none when it has no ``robustness`` section)."""
    section = report.get("robustness") or {}
    return {e["key"]: float(e["attacked_accuracy"]) for e in section.get("attacks", []) if "key" in e and "attacked_accuracy" in e}


def recipe_attack_keys(recipe: Any) -> list[str]:
    """The keys of the attacks a recipe's ``robustness`` section runs (none without one)."""
    section = (getattr(recipe, "features", None) or {}).get(RobustnessHook.name)
    return [c.key for c in section.configs()] if section is not None else []


class RobustnessHook(Hook):
    """Runs the attacks on the test split when the runner evaluates it after training (the model
    then is the one the report describes: training over, every hook's ``on_train_end`` done), on
    the main process only."""

    name = "robustness"

    def __init__(self, attacks: list[AttackConfig]):
        self.attacks = attacks
        self.results: list[dict[str, Any]] = []

    def on_evaluate(self, trainer, split: str, metrics: dict[str, float]) -> None:
        if split != "test" or not trainer.is_main:
            return
        cfg = trainer.recipe.train
        self.results = [
            attack_task(trainer.model, trainer.tokenizer, trainer.task, attack, objective=trainer.objective,
                        max_length=cfg.max_length, batch_size=cfg.eval_batch_size)
            for attack in self.attacks
        ]

    def report(self) -> dict[str, Any]:
        return {"attacks": self.results} if self.results else {}

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        rows = []
        for entry in section.get("attacks", []):
            try:
                label = AttackConfig(**entry["config"]).describe()
            except (KeyError, TypeError):
                label = str(entry.get("key", "attack"))
            value = (f"{entry['attacked_accuracy']:.4f} (clean {entry['clean_accuracy']:.4f}, {entry['examples']} test examples); "
                     f"success {entry['attack_success_rate']:.1%}")
            if "words_changed" in entry:
                value += f"; {entry['words_changed']:.1%} of words changed, {entry['queries_per_example']:.1f} queries/example"
            rows.append((f"accuracy under {label}", value))
        return rows
