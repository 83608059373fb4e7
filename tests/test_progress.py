"""Progress output: a redrawing bar on a terminal, a bounded number of plain lines in a log."""

import io
import re
import subprocess
import sys

import pytest
import yaml

from slimtune.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_stream_gets_tqdms_bar_and_a_log_gets_lines():
    from tqdm.std import tqdm

    bar = progress(total=5, desc="train", unit="step", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(total=5, desc="train", file=io.StringIO()), LineProgress)
    # disabled: nothing at all, whatever the stream
    quiet = io.StringIO()
    bar = progress(range(3), total=3, desc="train", file=quiet, disable=True)
    assert list(bar) == [0, 1, 2] and quiet.getvalue() == ""


@pytest.mark.parametrize("steps,every", [(270, None), (270, 10), (7, None), (1000, 50)])
def test_a_log_gets_a_bounded_number_of_readable_lines(steps, every):
    out = io.StringIO()
    bar = progress(total=steps, desc="train lora", unit="step", file=out, every=every)
    for i in range(steps):
        if i % 10 == 0:
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    n = every or bar.every
    assert len(lines) <= steps / n + 2
    assert "\r" not in out.getvalue()
    assert lines[0].startswith(f"train lora: 0/{steps} steps")
    assert re.fullmatch(rf"train lora: {steps}/{steps} steps \(100%\)  loss [0-9.]+  [0-9.e+]+ step/s  took \d+:\d\d", lines[-1]), lines[-1]
    for line in lines[1:-1]:
        assert re.match(rf"train lora: \d+/{steps} steps \(\d+%\)  loss [0-9.]+  [0-9.e+]+ step/s  eta \d+:\d\d$", line), line


def test_slow_loops_also_log_every_few_seconds_and_a_stop_short_of_total_is_logged():
    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(total=100, desc="train", unit="step", file=out, seconds=30, clock=lambda: now[0])
    for _ in range(3):  # 3 steps of 40 s each: one line per step (> 30 s apart), although every = 5 steps
        now[0] += 40
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("train: 3/100 steps (3%)") and "40 s/step" in lines[-1]
    assert "eta 1:05:20" in lines[-2]  # 98 steps x 40 s


def test_iterating_a_list_logs_each_cell_of_a_short_bench():
    out = io.StringIO()
    bar = progress(["a", "b", "c"], desc="bench quick", unit="cell", file=out)
    seen = []
    for item in bar:
        seen.append(item)
        bar.set_postfix(ok=len(seen), failed=0)
    lines = out.getvalue().splitlines()
    assert seen == ["a", "b", "c"] and len(lines) == 4
    assert lines[-1].startswith("bench quick: 3/3 cells (100%)  ok 3  failed 0")


def test_training_into_a_pipe_logs_lines_not_redraws(tiny_recipe, tmp_path):
    """The real loop through the CLI, stderr a pipe: a few progress lines with the loss."""
    tiny_recipe["train"].update(max_steps=40, batch_size=4, eval_each_epoch=False, log_every=5)
    tiny_recipe["measure"].update(flops=False, memory=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    result = subprocess.run([sys.executable, "-m", "slimtune", "train", str(path), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train lora:")]
    assert 3 <= len(lines) <= 40 / 2 + 2, result.stderr  # about 20 lines a loop: every 2 steps here
    assert lines[0].startswith("train lora: 0/40 steps") and lines[-1].startswith("train lora: 40/40 steps (100%)  loss ")
    assert all(" step/s" in line or " s/step" in line for line in lines[1:])


def test_no_progress_hides_the_bar_but_keeps_the_epoch_summaries(tiny_recipe, tmp_path, capsys):
    """--no-progress switches off the progress lines only: each epoch's loss and validation line
    is still printed."""
    from slimtune.cli import main

    tiny_recipe["train"].update(max_steps=None, epochs=2, batch_size=16)
    tiny_recipe["measure"].update(flops=False, memory=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "train lora:" not in captured.err and "train lora:" not in captured.out
    epochs = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"], captured.out
    assert all(re.search(r"train loss \d+\.\d{4}; validation accuracy \d\.\d{4}", line) for line in epochs), epochs


def test_bench_in_a_log_writes_a_line_per_cell(tmp_path, tiny_recipe, capsys):
    from slimtune.bench import load_suite, run_suite

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "recipe": tiny_recipe, "grid": {"method": ["no-such-a", "no-such-b", "no-such-c"]}}))
    rows = run_suite(load_suite(path), tmp_path / "bench", progress=True, report=False)
    assert [r["status"] for r in rows] == ["failed"] * 3
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("bench tiny:")]
    assert "\r" not in captured.err and len(lines) == 4
    assert lines[-1].startswith("bench tiny: 3/3 cells (100%)  ok 0  failed 3  skipped 0")
    assert captured.out.count(": FAILED: ") == 3
