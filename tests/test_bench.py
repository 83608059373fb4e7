"""`slimtune bench`: a grid of tiny runs -> results.jsonl, report.md/html, plots; resuming skips
finished cells, redoes interrupted ones; one failing cell does not stop the others."""

import json
import shutil

import pytest
import yaml

from slimtune import runner
from slimtune.bench import load_suite, run_suite
from slimtune.errors import SlimtuneError


class CountingTrain:
    """Wraps runner.train_run and records which cells actually trained (and how)."""

    def __init__(self):
        self.calls = []

    def __call__(self, recipe, out, **kwargs):
        self.calls.append((out.name, kwargs.get("resume", False)))
        return runner.train_run(recipe, out, **kwargs)


def write_suite(tmp_path, data, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def grid_suite(tmp_path, tiny_recipe):
    base = dict(tiny_recipe, measure={"latency": True, "repeats": 1, "batch_size": 4})
    return write_suite(tmp_path, {
        "name": "tiny",
        "recipe": base,
        "grid": {"method": [{"name": "lora", "r": 4}, "bitfit", "no-such-method"], "train.seed": [0, 1]},
        "set": {"train.max_steps": 4, "train.checkpoint_every": 2},
    })


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_grid_reports_resume_and_failures(grid_suite, tmp_path):
    out = tmp_path / "bench"
    suite = load_suite(grid_suite)
    assert [c.id for c in suite.cells] == [
        "lora__seed0", "lora__seed1", "bitfit__seed0", "bitfit__seed1", "no-such-method__seed0", "no-such-method__seed1",
    ]
    train = CountingTrain()
    rows = run_suite(suite, out, progress=False, train=train)

    # Every cell has a line; the unknown method fails with its message, the others finished.
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"] * 2
    assert "unknown method 'no-such-method'" in rows[4]["error"]
    on_disk = read_rows(out)
    assert [r["cell"] for r in on_disk] == [c.id for c in suite.cells]
    assert on_disk[0]["overrides"] == {"train.max_steps": 4, "train.checkpoint_every": 2, "method": {"name": "lora", "r": 4}, "train.seed": 0}
    assert on_disk[0]["report"]["method"]["name"] == "lora" and on_disk[0]["report"]["train"]["steps"] == 4
    assert len(train.calls) == 4
    seed0 = on_disk[0]["report"]["metrics"]["accuracy"], on_disk[1]["report"]["metrics"]["accuracy"]

    # report.md: one table for the task, mean ± std over the 2 seeds; failed cells listed.
    md = (out / "report.md").read_text()
    assert "| lora | 2 |" in md and "| bitfit | 2 |" in md and " ± " in md
    assert "## Failed cells" in md and "no-such-method__seed0" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and "plots/tradeoff_trainable_params.png" in html
    for name in ("tradeoff_trainable_params", "tradeoff_stored_bytes", "tradeoff_inference_flops", "tradeoff_train_memory"):
        png = out / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{name}.png" in md
    assert not (out / "plots" / "tradeoff_epsilon.png").exists()  # no private run

    # Rerun: finished cells are skipped (no training, report.json untouched); failed ones retried.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/report.json")}
    assert len(stamps) == 4
    # Simulate interruptions: one cell killed before its first checkpoint (a stray file only),
    # one killed after its checkpoint (report.json missing) -> cleared and redone / resumed.
    shutil.rmtree(out / "runs" / "bitfit__seed1")
    (out / "runs" / "bitfit__seed1").mkdir()
    (out / "runs" / "bitfit__seed1" / "partial.tmp").write_text("x")
    (out / "runs" / "lora__seed1" / "report.json").unlink()
    del stamps[out / "runs" / "bitfit__seed1" / "report.json"], stamps[out / "runs" / "lora__seed1" / "report.json"]

    train = CountingTrain()
    rows = run_suite(load_suite(grid_suite), out, progress=False, train=train)
    assert sorted(train.calls) == [("bitfit__seed1", False), ("lora__seed1", True)]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert not (out / "runs" / "bitfit__seed1" / "partial.tmp").exists()
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"] * 2
    assert rows[0]["reused"] and not rows[3]["reused"]
    assert rows[0]["report"]["metrics"]["accuracy"] == seed0[0]
    assert rows[1]["report"]["metrics"]["accuracy"] == pytest.approx(seed0[1])  # resumed: same result


def test_bad_override_fails_its_cell_only(tmp_path, tiny_recipe):
    out = tmp_path / "bench"
    base = dict(tiny_recipe, train=dict(tiny_recipe["train"], max_steps=2))
    suite = write_suite(tmp_path, {"runs": [
        {"recipe": base, "set": {"method.r": -1}},
        {"recipe": base, "set": {"method.r": 2}},
        {"recipe": base, "set": ["train.lr=abc"], "id": "bad-lr"},
    ]})
    rows = run_suite(load_suite(suite), out, progress=False)
    assert [r["cell"] for r in rows] == ["lora__r-1", "lora__r2", "bad-lr"]
    assert [r["status"] for r in rows] == ["failed", "ok", "failed"]
    assert "method.r" in rows[0]["error"] and "-1" in rows[0]["error"]
    assert "train.lr" in rows[2]["error"]
    md = (out / "report.md").read_text()
    assert "lora__r-1" in md and "method.r" in md


def test_a_crash_inside_training_is_recorded(tmp_path, tiny_recipe):
    def explode(recipe, out, **kwargs):
        if recipe.train.seed == 0:
            raise RuntimeError("boom\nsecond line")
        return runner.train_run(recipe, out, **kwargs)

    base = dict(tiny_recipe, train=dict(tiny_recipe["train"], max_steps=2))
    suite = write_suite(tmp_path, {"recipe": base, "grid": {"train.seed": [0, 1]}})
    rows = run_suite(load_suite(suite), tmp_path / "bench", progress=False, train=explode)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"] == "RuntimeError: boom"
    assert "Traceback" in json.loads((tmp_path / "bench" / "runs" / "seed0" / "error.json").read_text())["traceback"]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"recipe": {"task": "x"}}, "needs a 'grid'"),
        ({"grid": {"train.seed": [0]}}, "exactly one of 'recipe'"),
        ({"recipe": {"task": "x"}, "grid": {"train.seed": 0}}, "grid.train.seed: expected a non-empty list"),
        ({"recipe": {"task": "x"}, "grid": {"seed": [0]}}, "'seed' is not a recipe path"),
        ({"recipe": "nope.yaml", "grid": {"train.seed": [0]}}, "recipe file 'nope.yaml' not found"),
        ({"recipe": {"task": "x"}, "grids": {}}, "unknown key 'grids' (did you mean 'grid'?)"),
        ({"runs": [{"recipe": {"task": "x"}}, {"recipe": {"task": "x"}}]}, "two cells get the id"),
        ({"runs": [{"recipe": {"task": "x"}, "sett": {}}]}, "runs.0: unknown key 'sett'"),
        ({"recipe": {"task": "x"}, "grid": {"train.seed": [0]}, "set": "train.lr"}, "set: expected a mapping"),
    ],
)
def test_suite_errors_are_one_line(tmp_path, data, message):
    with pytest.raises(SlimtuneError) as info:
        load_suite(write_suite(tmp_path, data))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_overrides_order_and_per_method(tmp_path, tiny_recipe):
    suite = load_suite(write_suite(tmp_path, {
        "recipe": tiny_recipe,
        "grid": {"method": ["lora", "full"], "train.seed": [3]},
        "set": {"train.lr": 0.5, "method.r": 2},  # method.r is replaced by the grid's whole method
        "per_method": {"full": {"train.lr": 5.0e-5}},
    }), ["train.batch_size=8"])
    lora, full = (cell.recipe() for cell in suite.cells)
    assert lora.method_label == "lora" and lora.methods[0].config.r != 2 and lora.train.lr == 0.5
    assert full.method_label == "full" and full.train.lr == 5.0e-5 and full.train.seed == 3
    assert lora.train.batch_size == full.train.batch_size == 8
    assert [c.group for c in suite.cells] == ["lora", "full"]


def test_cli_bench_help_dry_run_and_errors(tmp_path, tiny_recipe, capsys):
    from slimtune.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("grid:", "per_method", "results.jsonl", "Pareto", "--only", "--report-only", "resumes"):
        assert word in text
    suite = write_suite(tmp_path, {"recipe": tiny_recipe, "grid": {"method": ["lora", "bitfit"], "train.seed": [0, 1]}})
    assert main(["bench", str(suite), "--out", str(tmp_path / "b"), "--dry-run", "--set", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out and "bitfit__seed1: " in out and "train.max_steps=2" in out
    assert not (tmp_path / "b").exists()
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: suite file not found" in capsys.readouterr().err
    assert main(["bench", str(suite), "--out", str(tmp_path / "b"), "--only", "nothing*"]) == 2
    assert "matches no cell" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_shipped_suites_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "suites"
    quick = load_suite(root / "quick.yaml")
    assert len(quick.cells) >= 6 and {c.group for c in quick.cells} >= {"lora", "bitfit", "linear-probe"}
    assert all(c.recipe().model.name == "minilm-l2" for c in quick.cells)
    paper = load_suite(root / "paper.yaml")
    assert {c.recipe_data()["task"]["name"] for c in paper.cells} == {"movie-sentiment", "trec-6", "sms-spam"}
    assert len({c.group for c in paper.cells}) >= 13


def test_list_form_groups_seeds_and_checks_per_method(tmp_path, tiny_recipe):
    suite = load_suite(write_suite(tmp_path, {"runs": [
        {"recipe": tiny_recipe, "set": {"train.seed": 0}},
        {"recipe": tiny_recipe, "set": {"train.seed": 1}},
        {"recipe": tiny_recipe, "set": {"method.r": 2}, "id": "small"},
    ]}))
    assert [(c.id, c.group) for c in suite.cells] == [("lora__seed0", "lora"), ("lora__seed1", "lora"), ("small", "small")]
    with pytest.raises(SlimtuneError, match="per_method.ful: no cell uses this method"):
        load_suite(write_suite(tmp_path, {"recipe": tiny_recipe, "grid": {"method": ["lora", "full"]}, "per_method": {"ful": {"train.lr": 1}}}))


def test_attacked_accuracy_columns_from_the_recipes_and_from_bench_attack(tmp_path, tiny_recipe, capsys):
    from slimtune.cli import main
    from slimtune.measure.attacks import AttackConfig

    recipe = dict(tiny_recipe, robustness={"attacks": [{"name": "pgd", "radius": 0.0}], "examples": 4})
    suite_path = write_suite(tmp_path, {"name": "robust", "recipe": recipe, "grid": {"method": [{"name": "lora", "r": 4}, "bitfit"], "train.seed": [0, 1]},
                                        "set": {"train.max_steps": 2}})
    out = tmp_path / "bench"
    suite = load_suite(suite_path)
    rows = run_suite(suite, out, progress=False, only=["*seed0"])
    for row in rows[::2]:  # the seed-0 cells: radius 0 changes nothing
        (entry,) = row["report"]["robustness"]["attacks"]
        assert entry["key"] == "pgd:radius=0:examples=4" and entry["attacked_accuracy"] == entry["clean_accuracy"]
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| method"))
    assert "| accuracy (%), mean ± std | under pgd:radius=0:examples=4 (%) | trainable params |" in header
    lora_row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| lora"))
    acc = rows[0]["report"]["robustness"]["attacks"][0]["attacked_accuracy"]
    assert f"| {acc * 100:.1f} |" in lora_row

    # --attack: the finished cells are attacked where they are (no retraining), the others train first
    train = CountingTrain()
    attack = AttackConfig("pgd", radius=50.0, step_size=10.0, examples=4)
    rows = run_suite(suite, out, progress=False, train=train, attack=attack, plot_y=attack.key)
    assert [name for name, _ in train.calls] == ["lora__seed1", "bitfit__seed1"]
    for row in rows:
        keys = [e["key"] for e in row["report"]["robustness"]["attacks"]]
        assert keys == ["pgd:radius=0:examples=4", "pgd:radius=50:step_size=10:examples=4"]
        assert read_rows(out)[rows.index(row)]["report"]["robustness"] == row["report"]["robustness"]  # results.jsonl too
    on_disk = json.loads((out / "runs" / "lora__seed0" / "report.json").read_text())
    assert on_disk["robustness"] == rows[0]["report"]["robustness"]
    report = (out / "report.md").read_text()
    assert "under pgd:radius=50:step_size=10:examples=4 (%)" in report and "Y-axis: test accuracy under pgd:radius=50:step_size=10:examples=4" in report
    assert (out / "plots" / "tradeoff_trainable_params.png").is_file()
    # again: nothing left to attack, nothing trained
    train = CountingTrain()
    again = run_suite(suite, out, progress=False, train=train, attack=attack)
    assert [r["report"] for r in again] == [r["report"] for r in rows] and train.calls == []

    # --plot-y is checked before anything runs
    assert main(["bench", str(suite_path), "--out", str(out), "--plot-y", "fgsm"]) == 2
    assert "--plot-y fgsm: give metric or an attack key" in capsys.readouterr().err
    assert main(["bench", str(suite_path), "--out", str(out), "--report-only", "--plot-y", "pgd:radius=3"]) == 2
    err = capsys.readouterr().err
    assert "--plot-y pgd:radius=3: no cell is measured under this attack; measured: pgd:radius=0:examples=4, pgd:radius=50" in err
    assert main(["bench", str(suite_path), "--out", str(out), "--report-only", "--plot-y", "pgd:radius=0:examples=4"]) == 0
    assert "Y-axis: test accuracy under pgd:radius=0:examples=4" in (out / "report.md").read_text()
    assert main(["bench", str(suite_path), "--out", str(out), "--report-only", "--attack", "pgd"]) == 2
    assert "--attack with --report-only" in capsys.readouterr().err


def test_a_cell_that_cannot_be_attacked_is_reported_and_stays_finished(tmp_path, tiny_recipe):
    from slimtune.measure.attacks import AttackConfig

    suite = load_suite(write_suite(tmp_path, {"recipe": tiny_recipe, "grid": {"method": [{"name": "prompt", "num_tokens": 2}, "bitfit"]},
                                              "set": {"train.max_steps": 1}}))
    rows = run_suite(suite, tmp_path / "b", progress=False, attack=AttackConfig("pgd", examples=2))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "cannot take inputs_embeds" in rows[0]["attack_error"] and "attack_error" not in rows[1]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| prompt | attack: pgd: this run's model cannot take inputs_embeds" in report.replace("--attack ", "")
