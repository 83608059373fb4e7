"""benchmarks/common.py's result merging: a part rerun for some (task, seed) pairs keeps the
others' rows and the other parts of the file."""

import json
from types import SimpleNamespace

import benchmarks.common as common


def test_a_rerun_replaces_only_its_task_seed_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)

    def run(tasks, seeds, part, rows, by_task_seed=True):
        entry = {"settings": {"seeds": seeds}, "rows": rows}
        return common.merge_part_and_write("demo", ("a", "b"), part, entry, SimpleNamespace(tasks=tasks, seeds=seeds), by_task_seed)

    run("t1,t2", "0", "a", [{"task": "t1", "seed": 0, "x": 1}, {"task": "t2", "seed": 0, "x": 2}])
    run("t1", "1", "a", [{"task": "t1", "seed": 1, "x": 3}])
    run("t1", "0", "b", [{"task": "t1", "seed": 0, "y": 1}], by_task_seed=False)
    merged = run("t1", "0", "a", [{"task": "t1", "seed": 0, "x": 4}])
    assert sorted((r["task"], r["seed"], r["x"]) for r in merged["a"]["rows"]) == [("t1", 0, 4), ("t1", 1, 3), ("t2", 0, 2)]
    assert merged["a"]["settings_of_kept_rows"] == {"seeds": "0"}
    assert merged["b"]["rows"] == [{"task": "t1", "seed": 0, "y": 1}]
    assert json.loads((tmp_path / "demo.json").read_text())["a"]["rows"] == merged["a"]["rows"]
    replaced = run("t9", "5", "b", [{"task": "t9", "seed": 5, "y": 2}], by_task_seed=False)
    assert replaced["b"]["rows"] == [{"task": "t9", "seed": 5, "y": 2}]
