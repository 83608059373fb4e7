"""User data files (.csv, .tsv, .jsonl, .parquet) -> a task with train/validation/test splits.

A task is described by a dict::

    {"file": "reviews.csv", "text": "review", "label": "stars",
     "text_pair": "title",        # optional second text
     "split": "fold",             # optional: values train / validation / test
     "name": "reviews",           # optional, default: the file's stem
     "metric": "macro_f1"}        # optional, default: accuracy

``text`` and ``label`` default to the columns ``text`` and ``label``. Without ``split``, a column
named ``split`` whose values include train/validation/test is the split column (said in one
line on stderr; other values in it are then refused); one without such values is ignored, also
said. Without a split column the rows are split 80/10/10, stratified by label and fixed by
``split_seed``; with one, a missing validation or test split is carved from train (10%,
stratified). Label names are the train split's distinct labels as strings, sorted (numerically
when all are integers).

Every problem is reported as one :class:`SlimtuneError` line naming the file, the row (data
rows count from 1 after the header; jsonl counts lines) or column, and what is valid. A data row
equal to the header (files concatenated with their headers) is refused; a label column with more
distinct values than a tenth of the rows (and more than 20) is warned about: it looks like text.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.tasks import (
    DEFAULT_SPLIT_SEED,
    METRICS,
    SPLITS,
    SplitFrames,
    TaskData,
    finish_task,
    held_out_size,
    split_pool,
    stratified_split,
)

__all__ = ["DATA_KEYS", "SUPPORTED_EXTENSIONS", "load_user_task", "read_user_splits"]

DATA_KEYS: tuple[str, ...] = ("file", "text", "text_pair", "label", "split", "name", "metric")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".parquet")
MIN_ROWS_TO_SPLIT = 10  # 80/10/10 needs at least one row in each held-out split
# A label column with more distinct values than this fraction of the rows, and more than the floor,
# is probably a text column (swapped columns). The floor keeps small files with many classes quiet;
# the zoo's widest task (newsgroups-20) has 20 classes in 18,790 rows.
LABEL_LIKE_TEXT_FRACTION = 0.1
LABEL_LIKE_TEXT_FLOOR = 20

# How a row is named in messages, given its 0-based position among the data rows.
RowNamer = Callable[[int], str]


def _data_row(position: int) -> str:
    return f"data row {position + 1} (1-based, header not counted)"


# ----------------------------------------------------------------------------- reading


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise SlimtuneError(
            f"{path}: line {line} (1-based, header included) has bytes that are not UTF-8 "
            f"(0x{raw[error.start]:02x}); save the file as UTF-8"
        ) from None


def _read_delimited(path: Path, separator: str) -> tuple[pd.DataFrame, RowNamer]:
    text = _decode_utf8(path)
    if not text.strip():
        raise SlimtuneError(f"{path}: the file is empty; it needs a header row and data rows")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as error:
        message = str(error).strip().splitlines()[0]
        raise SlimtuneError(f"{path}: cannot parse as {path.suffix[1:]}: {message}") from None
    return frame, _data_row


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, RowNamer]:
    records: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(_decode_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SlimtuneError(f"{path}: line {number} is not valid JSON: {error.msg}") from None
        except (ValueError, RecursionError) as error:  # a 5,000-digit number; nesting 100,000 deep
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(":")[0]
            raise SlimtuneError(f"{path}: line {number} is not usable JSON: {reason}") from None
        if not isinstance(record, dict):
            raise SlimtuneError(
                f"{path}: line {number} is a JSON {type(record).__name__}; every line must be "
                'one JSON object such as {"text": "...", "label": "..."}'
            )
        records.append(record)
        line_numbers.append(number)
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    frame = frame.astype(object)  # keep None for absent keys, never coerce to floats
    return frame, lambda position: f"line {line_numbers[position]}"


def _read_parquet(path: Path) -> tuple[pd.DataFrame, RowNamer]:
    if importlib.util.find_spec("pyarrow") is None:
        raise SlimtuneError(
            f"{path}: reading .parquet needs the pyarrow package, which is not installed; "
            "install pyarrow or convert the file to .csv/.jsonl"
        )
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises its own types for corrupt or non-parquet files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SlimtuneError(f"{path}: cannot read as parquet: {message}") from None
    return frame.astype(object), _data_row


_READERS: dict[str, Callable[[Path], tuple[pd.DataFrame, RowNamer]]] = {
    ".csv": lambda path: _read_delimited(path, ","),
    ".tsv": lambda path: _read_delimited(path, "\t"),
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


# ----------------------------------------------------------------------------- validation


def _check_keys(spec: Mapping[str, Any]) -> dict[str, str]:
    for key in spec:
        if key not in DATA_KEYS:
            raise SlimtuneError(
                f"unknown key '{key}' in the data dict{did_you_mean(str(key), DATA_KEYS)}"
            )
    if "file" not in spec:
        raise SlimtuneError(
            "the data dict needs 'file': a path to a .csv, .tsv, .jsonl or .parquet file"
        )
    settings = {"text": "text", "label": "label", **spec}
    for key, value in settings.items():
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise SlimtuneError(f"data dict key '{key}' must be a non-empty string, got {value!r}")
    return {key: str(value) for key, value in settings.items()}


def _resolve_file(file: str) -> Path:
    path = Path(file).expanduser()
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        kind = f"'{path.suffix}'" if path.suffix else "(no extension)"
        raise SlimtuneError(
            f"{path}: unsupported file type {kind}; use {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.exists():
        raise SlimtuneError(f"data file not found: {path}")
    if not path.is_file():
        raise SlimtuneError(f"data file {path} is a directory; give a {path.suffix} file")
    return path


def _check_column(frame: pd.DataFrame, path: Path, key: str, column: str) -> None:
    if column not in frame.columns:
        present = ", ".join(map(str, frame.columns)) or "none"
        hint = did_you_mean(column, [str(c) for c in frame.columns]).split(";")[0]
        raise SlimtuneError(
            f"{path}: no column '{column}' for {key}{hint}; columns present: {present}"
        )


def _as_text(value: Any) -> str | None:
    """A cell as a string; None when missing (None, NaN). Integral floats lose their '.0'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else str(float(value))
    raise TypeError(type(value).__name__)


def _column_values(
    frame: pd.DataFrame, path: Path, key: str, column: str, name_row: RowNamer
) -> list[str]:
    """The column as stripped-checked strings; the first blank or non-scalar cell is an error."""
    values: list[str] = []
    for position, cell in enumerate(frame[column].tolist()):
        try:
            value = _as_text(cell)
        except TypeError as error:
            raise SlimtuneError(
                f"{path}: {name_row(position)}: column '{column}' ({key}) holds a {error}; "
                "it must be a string"
            ) from None
        if value is None or not value.strip():
            what = {"label": "label", "split": "split (train/validation/test)"}.get(key, "text")
            raise SlimtuneError(
                f"{path}: {name_row(position)}: column '{column}' ({key}) is missing or empty; "
                f"every row needs a non-blank {what}"
            )
        values.append(value)
    return values


def _sorted_labels(labels: set[str]) -> list[str]:
    """Labels in order: numerically when all are integers (so '10' follows '9'), else by text."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def label_looks_like_text(n_distinct: int, n_rows: int) -> bool:
    """Too many classes for the rows: a text column given as the label."""
    return n_distinct > max(LABEL_LIKE_TEXT_FLOOR, n_rows * LABEL_LIKE_TEXT_FRACTION)


def _implicit_split_column(table: pd.DataFrame, path: Path, settings: dict[str, str]) -> str | None:
    """A column named ``split`` (any case) when ``split`` is not given: the split column if its
    values include train/validation/test (so held-out rows are not re-split into training and its
    values get checked), else ignored; either way said in one line."""
    used = {settings[key] for key in ("text", "text_pair", "label") if key in settings}
    column = next((c for c in table.columns if c.strip().lower() == "split" and c not in used), None)
    if column is None:
        return None
    values = {str(value).strip().lower() for value in table[column].tolist() if isinstance(value, str)}
    if values & set(SPLITS):
        _note(f"note: {path}: column '{column}' has train/validation/test values, so it sets the splits "
              "(task.split is not set); rename the column to have the rows split 80/10/10 instead")
        return column
    _note(f"note: {path}: column '{column}' is ignored: none of its values is train, validation or test; "
          "rows are split 80/10/10 (set task.split to a column with those values)")
    return None


def _check_repeated_header(rows: pd.DataFrame, path: Path, settings: dict[str, str], roles: list[str],
                           name_row: RowNamer) -> None:
    """A data row equal to the header (csv files concatenated with their headers) would become a
    class of its own; refuse it."""
    repeated = np.logical_and.reduce([rows[key].str.strip() == settings[key].strip() for key in roles])
    if repeated.any():
        positions = np.flatnonzero(repeated)
        header = ", ".join(settings[key] for key in roles)
        more = f" ({len(positions)} such rows)" if len(positions) > 1 else ""
        raise SlimtuneError(
            f"{path}: {name_row(int(positions[0]))} repeats the header ({header}){more}: files joined "
            "with their headers? delete those rows"
        )


def _warn_label_like_text(rows: pd.DataFrame, path: Path, settings: dict[str, str]) -> None:
    n_rows, n_labels = len(rows), rows["label"].nunique()
    if not label_looks_like_text(n_labels, n_rows):
        return
    text, label = settings["text"], settings["label"]
    if label_looks_like_text(rows["text"].nunique(), n_rows):
        advice = "check that task.label names the label column"
    else:  # the text column looks like labels: the two are swapped
        advice = f"if text and label are swapped, set task.text={label} and task.label={text}"
    _note(f"warning: {path}: column '{label}' (label) has {n_labels} distinct values in {n_rows} rows, "
          f"more than a tenth: it looks like text (or a continuous score), not class labels; {advice}")


# ----------------------------------------------------------------------------- splitting


def _assign_splits(
    rows: pd.DataFrame, path: Path, split_column: str | None, split_seed: int
) -> tuple[dict[str, pd.DataFrame], str]:
    """Split rows (columns text [, text_pair], label (str), position) and describe how."""
    if split_column is None:
        if len(rows) < MIN_ROWS_TO_SPLIT:
            raise SlimtuneError(
                f"{path}: too few rows to split 80/10/10: {len(rows)} data rows, need at least "
                f"{MIN_ROWS_TO_SPLIT} (or add a split column with train/validation/test)"
            )
        codes = rows["label"].astype("category").cat.codes
        frames = split_pool(rows.assign(label=codes), split_seed)
        labels = rows["label"].astype("category").cat.categories
        frames = {
            split: frame.assign(label=labels[frame["label"].to_numpy()])
            for split, frame in frames.items()
        }
        return frames, (
            f"stratified 80/10/10 train/validation/test split of all rows, fixed by "
            f"split_seed={split_seed}"
        )

    frames = {split: rows[rows["split"] == split].reset_index(drop=True) for split in SPLITS}
    if frames["train"].empty:
        raise SlimtuneError(
            f"{path}: no rows have '{split_column}' = train; the train split is required"
        )
    carved = [split for split in ("validation", "test") if frames[split].empty]
    if carved:
        train = frames["train"]
        codes = train["label"].astype("category").cat.codes.to_numpy()
        kept, parts = stratified_split(codes, [held_out_size(len(train))] * len(carved), split_seed)
        frames["train"] = train.iloc[kept].reset_index(drop=True)
        for split, part in zip(carved, parts, strict=True):
            frames[split] = train.iloc[part].reset_index(drop=True)
    policy = f"splits from column '{split_column}'"
    if carved:
        policy += (
            f"; {' and '.join(carved)} carved from train (10% each, stratified, "
            f"split_seed={split_seed})"
        )
    return frames, policy


def _check_splits(frames: dict[str, pd.DataFrame], path: Path, name_row: RowNamer) -> list[str]:
    """Label names from train; every held-out label must occur in train."""
    train_labels = set(frames["train"]["label"])
    if len(train_labels) < 2:
        found = ", ".join(f"'{label}'" for label in sorted(train_labels))
        raise SlimtuneError(
            f"{path}: the train split has only one distinct label ({found}); classification "
            "needs at least 2"
        )
    label_names = _sorted_labels(train_labels)
    for split in ("validation", "test"):
        frame = frames[split]
        if frame.empty:
            raise SlimtuneError(
                f"{path}: too few rows to make a {split} split (every label keeps at least one "
                "training row); add rows or a split column"
            )
        unseen = frame[~frame["label"].isin(train_labels)]
        if not unseen.empty:
            first = unseen.sort_values("position").iloc[0]
            raise SlimtuneError(
                f"{path}: {name_row(int(first['position']))}: label '{first['label']}' "
                f"({split} split) never occurs in the train split; train labels: "
                f"{', '.join(label_names)}"
            )
    return label_names


# ----------------------------------------------------------------------------- entry points


def read_user_splits(
    spec: Mapping[str, Any], *, split_seed: int = DEFAULT_SPLIT_SEED
) -> SplitFrames:
    """Read and validate a user data file and split it (before any train/eval subsetting)."""
    if not isinstance(spec, Mapping):
        raise SlimtuneError(
            f"user data must be a dict with file/text/label, got {type(spec).__name__}"
        )
    settings = _check_keys(spec)
    path = _resolve_file(settings["file"])
    metric = settings.get("metric", "accuracy")
    if metric not in METRICS:
        raise SlimtuneError(
            f"unknown metric '{metric}' in the data dict{did_you_mean(metric, METRICS)}"
        )

    table, name_row = _READERS[path.suffix.lower()](path)
    if table.empty:
        raise SlimtuneError(f"{path}: no data rows")
    table.columns = [str(column) for column in table.columns]
    implicit_split = None if "split" in settings else _implicit_split_column(table, path, settings)
    if implicit_split is not None:
        settings["split"] = implicit_split
    roles = [key for key in ("text", "text_pair", "label", "split") if key in settings]
    for key in roles:
        _check_column(table, path, key, settings[key])

    rows = pd.DataFrame({"position": np.arange(len(table))})
    for key in roles:
        rows[key] = _column_values(table, path, key, settings[key], name_row)
    _check_repeated_header(rows, path, settings, roles, name_row)
    _warn_label_like_text(rows, path, settings)
    if "split" in settings:
        rows["split"] = rows["split"].str.strip().str.lower()
        invalid = rows[~rows["split"].isin(SPLITS)]
        if not invalid.empty:
            first = invalid.iloc[0]
            raise SlimtuneError(
                f"{path}: {name_row(int(first['position']))}: column '{settings['split']}' "
                f"(split) has '{first['split']}'{did_you_mean(first['split'], SPLITS)}"
            )

    frames, policy = _assign_splits(rows, path, settings.get("split"), split_seed)
    if implicit_split is not None:
        policy += " (a column named split, used as task.split is not set)"
    label_names = _check_splits(frames, path, name_row)
    label_ids = {label: index for index, label in enumerate(label_names)}
    columns = ["text", "text_pair"] if "text_pair" in settings else ["text"]
    return SplitFrames(
        name=settings.get("name", path.stem),
        frames={
            split: frame[columns].assign(label=frame["label"].map(label_ids).astype(int))
            for split, frame in frames.items()
        },
        label_names=label_names,
        metric=metric,
        source=f"user file {path}",
        split_policy=policy,
        filtering=f"{len(table):,} rows read, none dropped",
    )


def load_user_task(
    spec: Mapping[str, Any],
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """A user data file as a :class:`TaskData` (same arguments as ``tasks.load_task``)."""
    prepared = read_user_splits(spec, split_seed=split_seed)
    return finish_task(prepared, train_size=train_size, eval_size=eval_size, seed=seed)
