"""Comparing runs (slimtune.measure.compare): scores over seeds, summaries per task and variant."""

import pytest

from slimtune.measure.compare import Summary, fmt_score, summarize


def test_score_format():
    s = Summary(task="t", label="lora", method="lora", metric="accuracy", scores=[0.80, 0.82])
    assert fmt_score(s) == "81.0 ± 1.4"
    assert fmt_score(Summary(task="t", label="x", method="x", metric="accuracy", scores=[0.8])) == "80.0"


def test_summaries_group_seeds_by_task_and_variant():
    def row(group, task, acc, seed):
        report = {"task": {"name": task, "primary_metric": "accuracy"}, "method": {"name": group}, "metrics": {"accuracy": acc},
                  "params": {"trainable": 10, "trainable_pct": 1.0, "stored_bytes": 40}, "train": {}, "inference": {}}
        return {"cell": f"{group}__{task}__seed{seed}", "group": group, "status": "ok", "overrides": {"train.seed": seed}, "report": report}

    out = summarize([row("lora", "a", 0.8, 0), row("lora", "a", 0.9, 1), row("lora", "b", 0.5, 0), row("bitfit", "a", 0.7, 0),
                     {"cell": "x", "status": "failed", "error": "e"}])
    assert list(out) == ["a", "b"]
    assert [(s.label, s.n) for s in out["a"]] == [("lora", 2), ("bitfit", 1)]
    assert out["a"][0].score_mean == pytest.approx(0.85) and out["a"][0].cost("stored_bytes") == 40


def test_attacked_accuracy_columns_per_attack_key():
    from slimtune.measure.compare import table

    def row(group, seed, attacks):
        report = {"task": {"name": "a", "primary_metric": "accuracy"}, "method": {"name": group}, "metrics": {"accuracy": 0.8},
                  "params": {}, "train": {}, "inference": {},
                  "robustness": {"attacks": [{"key": k, "attacked_accuracy": v, "clean_accuracy": 0.8} for k, v in attacks.items()]}}
        return {"cell": f"{group}__seed{seed}", "group": group, "status": "ok", "overrides": {"train.seed": seed}, "report": report}

    rows = [row("lora", 0, {"pgd": 0.5, "substitution": 0.2}), row("lora", 1, {"pgd": 0.7}), row("bitfit", 0, {})]
    (groups,) = summarize(rows).values()
    assert groups[0].attacks == {"pgd": [0.5, 0.7], "substitution": [0.2]}
    header, body = table(groups)
    at = header.index("under pgd (%)")
    assert header[at + 1] == "under substitution (%)" and header[at - 1] == "accuracy (%), mean ± std"
    assert body[0][at:at + 2] == ["60.0 ± 14.1", "20.0 (1 of 2 seeds)"]
    assert body[1][at:at + 2] == ["–", "–"]  # bitfit was not attacked
    # no attack anywhere: no column
    assert not [h for h in table(summarize([row("bitfit", 0, {})])["a"])[0] if h.startswith("under")]
