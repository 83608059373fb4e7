"""User data files: round trips for every format and one clear line for every bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from slimtune.errors import SlimtuneError
from slimtune.zoo.files import load_user_task, read_user_splits
from slimtune.zoo.tasks import load_task

LABELS = ["neg", "pos", "neutral"]


def _rows(n: int = 60) -> list[dict[str, str]]:
    return [
        {"review": f"review number {i}", "title": f"title {i}", "stars": LABELS[i % 3]}
        for i in range(n)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _error(spec: dict) -> str:
    with pytest.raises(SlimtuneError) as raised:
        load_task(spec)
    message = str(raised.value)
    assert "\n" not in message  # one line
    return message


@pytest.mark.parametrize("extension", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_round_trip_without_a_split_column(tmp_path, extension):
    path = _write(tmp_path / f"reviews{extension}", _rows(60))
    spec = {"file": str(path), "text": "review", "text_pair": "title", "label": "stars"}
    task = load_task(spec)
    assert task.name == "reviews" and task.metric == "accuracy"
    assert task.label_names == ["neg", "neutral", "pos"]  # sorted
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [48, 6, 6]
    for split in ("train", "validation", "test"):
        dataset = task.splits[split]
        assert dataset.column_names == ["text", "text_pair", "label"]
        assert dataset.features["label"].names == task.label_names
        assert set(dataset["label"]) == {0, 1, 2}  # stratified
    all_texts = [t for s in ("train", "validation", "test") for t in task.splits[s]["text"]]
    assert sorted(all_texts) == sorted(row["review"] for row in _rows(60))
    # Each row keeps its own pair and label.
    row = task.splits["test"][0]
    number = int(row["text"].split()[-1])
    assert row["text_pair"] == f"title {number}"
    assert task.label_names[row["label"]] == LABELS[number % 3]
    # Fixed by split_seed, and the same file in another format splits identically.
    assert load_task(spec).splits["test"]["text"] == task.splits["test"]["text"]
    assert load_task(spec, split_seed=1).splits["test"]["text"] != task.splits["test"]["text"]


def test_all_formats_split_identically(tmp_path):
    tests = set()
    for extension in (".csv", ".tsv", ".jsonl", ".parquet"):
        path = _write(tmp_path / f"d{extension}", _rows(40))
        task = load_task({"file": path, "text": "review", "label": "stars"})
        tests.add(tuple(task.splits["test"]["text"]))
    assert len(tests) == 1


def test_split_column_defaults_and_options(tmp_path):
    rows = [
        {"text": f"t{i}", "label": i % 2, "fold": ["train", "Train", "validation", "test"][i % 4]}
        for i in range(40)
    ]
    path = _write(tmp_path / "folds.jsonl", rows)
    task = load_task({"file": str(path), "split": "fold", "name": "mine", "metric": "macro_f1"})
    assert task.name == "mine" and task.metric == "macro_f1"
    assert task.label_names == ["0", "1"]  # integer labels become strings
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [20, 10, 10]
    assert "column 'fold'" in task.split_policy
    # A missing validation split is carved from train.
    path = _write(tmp_path / "no_val.csv", [r for r in rows if r["fold"] != "validation"])
    task = load_task({"file": path, "split": "fold"})
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [18, 2, 10]
    assert "validation carved from train" in task.split_policy


def test_numeric_labels_sort_numerically_and_subsetting_applies(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 11} for i in range(220)]
    path = _write(tmp_path / "eleven.parquet", rows)
    task = load_user_task({"file": path}, train_size=33, eval_size=11, seed=2)
    assert task.label_names == [str(k) for k in range(11)]  # '10' after '9'
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [33, 11, 11]
    assert set(task.splits["train"]["label"]) == set(range(11))
    prepared = read_user_splits({"file": path})
    assert sum(len(frame) for frame in prepared.frames.values()) == 220


# ----------------------------------------------------------------------------- bad input


def test_missing_file_and_unsupported_extension(tmp_path):
    assert "data file not found" in _error({"file": tmp_path / "absent.csv"})
    (tmp_path / "sheet.xlsx").write_bytes(b"PK")
    message = _error({"file": tmp_path / "sheet.xlsx"})
    assert "sheet.xlsx" in message and "unsupported file type '.xlsx'" in message
    assert ".csv, .tsv, .jsonl, .parquet" in message


def test_unknown_or_missing_keys(tmp_path):
    path = _write(tmp_path / "d.csv", _rows(20))
    message = _error({"file": path, "text": "review", "lable": "stars"})
    assert "unknown key 'lable'" in message and "did you mean 'label'" in message
    assert "needs 'file'" in _error({"text": "review"})
    assert "key 'label' must be a non-empty string" in _error({"file": path, "label": ""})


def test_missing_column_lists_the_columns_present(tmp_path):
    path = _write(tmp_path / "d.csv", _rows(20))
    message = _error({"file": path, "text": "reveiw", "label": "stars"})
    assert "d.csv" in message and "no column 'reveiw' for text" in message
    assert "did you mean 'review'" in message
    assert "columns present: review, title, stars" in message
    message = _error({"file": path, "text": "review"})  # label defaults to 'label'
    assert "no column 'label' for label" in message


@pytest.mark.parametrize("extension", [".csv", ".jsonl", ".parquet"])
def test_blank_text_names_the_row(tmp_path, extension):
    rows = _rows(20)
    rows[6]["review"] = "   "
    path = _write(tmp_path / f"d{extension}", rows)
    message = _error({"file": path, "text": "review", "label": "stars"})
    where = "line 7" if extension == ".jsonl" else "data row 7 (1-based, header not counted)"
    assert f"d{extension}: {where}: column 'review' (text) is missing or empty" in message


def test_missing_label_names_the_row(tmp_path):
    rows = _rows(20)
    del rows[3]["stars"]
    path = _write(tmp_path / "d.jsonl", rows)
    message = _error({"file": path, "text": "review", "label": "stars"})
    assert "d.jsonl: line 4: column 'stars' (label) is missing or empty" in message
    rows = _rows(20)
    rows[11]["stars"] = ""
    path = _write(tmp_path / "d.csv", rows)
    assert "data row 12" in _error({"file": path, "text": "review", "label": "stars"})


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9 au lait,b\n")
    message = _error({"file": path})
    assert "latin.csv: line 3" in message and "not UTF-8" in message
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "na\xefve", "label": "b"}\n')
    assert "latin.jsonl: line 2" in _error({"file": path})


def test_bad_json_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    assert "d.jsonl: line 3 is not valid JSON" in _error({"file": path})
    path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
    assert "d.jsonl: line 2 is a JSON list" in _error({"file": path})
    path.write_text('{"text": ["a", "b"], "label": "x"}\n')
    assert "line 1: column 'text' (text) holds a list" in _error({"file": path})


def test_label_unseen_in_train_names_the_row(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": "train"} for i in range(10)]
    rows += [{"text": "v", "label": "a", "split": "validation"}]
    rows += [{"text": "w", "label": "c", "split": "test"}]
    path = _write(tmp_path / "d.csv", rows)
    message = _error({"file": path, "split": "split"})
    assert "d.csv: data row 12 (1-based, header not counted): label 'c' (test split)" in message
    assert "train labels: a, b" in message


def test_bad_split_values_and_missing_train(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": "train"} for i in range(10)]
    rows[4]["split"] = "dev"
    path = _write(tmp_path / "d.csv", rows)
    message = _error({"file": path, "split": "split"})
    assert (
        "data row 5" in message
        and "has 'dev'" in message
        and "valid: test, train, validation" in message
    )
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": "test"} for i in range(10)]
    path = _write(tmp_path / "d.csv", rows)
    assert "no rows have 'split' = train" in _error({"file": path, "split": "split"})


def test_too_few_rows_and_single_label(tmp_path):
    path = _write(
        tmp_path / "tiny.csv", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)]
    )
    message = _error({"file": path})
    assert "tiny.csv: too few rows to split 80/10/10: 6 data rows, need at least 10" in message
    # 10 rows, but 10 labels: every label keeps its only row in train, nothing to hold out.
    path = _write(tmp_path / "spread.csv", [{"text": f"t{i}", "label": f"l{i}"} for i in range(10)])
    assert "too few rows to make a validation split" in _error({"file": path})
    path = _write(tmp_path / "one.csv", [{"text": f"t{i}", "label": "same"} for i in range(20)])
    assert "only one distinct label ('same')" in _error({"file": path})


def test_empty_and_malformed_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert "empty.csv: the file is empty" in _error({"file": tmp_path / "empty.csv"})
    (tmp_path / "header.csv").write_text("text,label\n")
    assert "header.csv: no data rows" in _error({"file": tmp_path / "header.csv"})
    (tmp_path / "ragged.csv").write_text("text,label\na,b\nc,d,e,f\n")
    assert "ragged.csv: cannot parse as csv" in _error({"file": tmp_path / "ragged.csv"})
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert "fake.parquet: cannot read as parquet" in _error({"file": tmp_path / "fake.parquet"})
    assert "unknown metric 'f1'" in _error({"file": tmp_path / "header.csv", "metric": "f1"})


@pytest.mark.parametrize(
    "content,spec,message",
    [
        (b"text,label\na,pos\nb,neg\n", {"label": "stars"}, r"no column 'stars' for label; columns present: text, label"),
        (b"text,label\na,pos\n  ,neg\n", {}, r"data row 2 .*column 'text' \(text\) is missing or empty"),
        (b"text,label\na,pos\ncaf\xe9,neg\n", {}, r"line 3 .*not UTF-8 \(0xe9\)"),
        (b"text,label,split\na,pos,train\nb,neg,train\nc,pos,test\nd,meh,validation\n", {"split": "split"},
         r"data row 4 .*label 'meh' \(validation split\) never occurs in the train split"),
        (b'{"text": "a", "label": "pos"}\n{"text": ["x"], "label": "neg"}\n', {}, r"line 2: column 'text' \(text\) holds a list"),
    ],
)
def test_bad_data_files_name_the_file_and_the_row(tmp_path, content, spec, message):
    suffix = ".jsonl" if content.startswith(b"{") else ".csv"
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(SlimtuneError, match=message) as info:
        load_task({"file": str(path), **spec})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("deep.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 1}\n', "line 1 is not usable JSON: nested too deeply"),
        ("big.jsonl", '{"text": 1' + "0" * 5000 + ', "label": 1}\n', "line 1 is not usable JSON: Exceeds the limit"),
    ],
)
def test_pathological_nesting_and_numbers_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SlimtuneError, match=re.escape(message)):
        load_task({"file": str(path)})


# ----------------------------------------------------------------------------- silent mistakes


def test_a_column_named_split_is_used_when_task_split_is_not_set(tmp_path, capsys):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": ["train", "train", "validation", "test"][i % 4]} for i in range(40)]
    path = _write(tmp_path / "d.csv", rows)
    task = load_task({"file": str(path)})  # it was ignored: all 40 rows were re-split 80/10/10
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [20, 10, 10]
    assert "column 'split'" in task.split_policy
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1 and f"{path}: column 'split'" in note and "task.split" in note
    # So its checks run: a label only in test, a value that is not a split.
    path = _write(tmp_path / "unseen.csv", rows + [{"text": "w", "label": "c", "split": "test"}])
    assert "data row 41 (1-based, header not counted): label 'c' (test split) never occurs" in _error({"file": path})
    rows[4]["split"] = "dev"
    path = _write(tmp_path / "dev.csv", rows)
    message = _error({"file": path})
    assert "data row 5" in message and "column 'split' (split) has 'dev'" in message


def test_a_column_named_split_without_split_values_is_ignored_with_a_note(tmp_path, capsys):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": f"group {i % 3}"} for i in range(40)]
    path = _write(tmp_path / "d.csv", rows)
    task = load_task({"file": str(path)})
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1 and f"{path}: column 'split'" in note and "ignored" in note


def test_a_repeated_header_row_is_refused_naming_the_file_and_row(tmp_path):
    path = tmp_path / "joined.csv"
    part = "".join(f"review {i},{'ab'[i % 2]}\n" for i in range(20))
    path.write_text("text,label\n" + part + "text,label\n" + part)  # two csv files concatenated
    message = _error({"file": str(path)})
    assert f"{path}: data row 21 (1-based, header not counted) repeats the header" in message


def test_a_label_column_that_looks_like_text_is_warned_about(tmp_path, capsys):
    rows = [{"review": f"review number {i % 200}", "stars": LABELS[i % 3]} for i in range(300)]
    path = _write(tmp_path / "d.csv", rows)
    load_task({"file": str(path), "text": "review", "label": "stars"})
    assert capsys.readouterr().err == ""  # 3 classes in 300 rows: no warning
    task = load_task({"file": str(path), "text": "stars", "label": "review"})  # swapped: 200 classes
    assert task.num_labels == 200
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1, warning
    assert f"{path}: column 'review' (label) has 200 distinct values in 300 rows" in warning
    assert "task.text=review and task.label=stars" in warning


def test_the_zoo_tasks_labels_do_not_look_like_text():
    from slimtune.zoo.files import label_looks_like_text
    from slimtune.zoo.text_sources import TASKS, clean_source

    for name in TASKS:
        frames, _ = clean_source(name)
        for frame in [*frames.values(), pd.concat(frames.values())]:
            assert not label_looks_like_text(frame["label"].nunique(), len(frame)), name
