"""An unlabelled text corpus for sparse pre-training (Prune Once for All's first stage, Zafrir et
al. 2021, which pre-trains on unlabelled English text) assembled from the installed text sources.

Every registered text task that is installed contributes its *training* split under the default
split (``split_seed`` 0), labels dropped; a sentence is left out when it appears (by SHA-256 of
its text) in the validation or test split of *any* task, so that a model pre-trained on the
corpus has never seen a sentence a downstream task evaluates on (whatever ``eval_size`` caps those
splits at: the caps take subsets of them). Texts are deduplicated across tasks and kept in a fixed
order (task name, then row). ``Corpus.record()`` is what a run writes down: the sources, counts and
the hash of the whole corpus.

A downstream recipe with another ``task.split_seed`` draws other test rows; the corpus then
overlaps them, which ``overlap_with_test_split`` counts (and a pre-training record names split seed 0).

As a task (``task: {name: corpus, objective: lm | mlm | features}``, :func:`load_corpus_task`) it has no
labels; its own validation and test splits are corpus sentences held out by the hash of their text
(:data:`HELD_OUT_PERCENT` each), so they do not move when sources are added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

#: The task name of the corpus (unlabelled: ``task.objective`` lm, mlm or features).
CORPUS_TASK = "corpus"
#: The downstream splits a corpus never takes a sentence from.
HELD_OUT = ("validation", "test")
#: Per cent of the corpus, by text hash, held out as the corpus task's validation and, as much again, its test split.
HELD_OUT_PERCENT = 2
#: The split seed the corpus excludes the downstream held-out splits under (``zoo.tasks.DEFAULT_SPLIT_SEED``).
SPLIT_SEED = 0


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    texts: list[str]
    sources: dict[str, int]  # task -> training sentences taken
    held_out: set[str] = field(repr=False)  # hashes of every task's validation/test sentences
    dropped_held_out: int = 0  # training sentences left out because a held-out split has them
    dropped_duplicates: int = 0

    def record(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.texts).encode("utf-8")).hexdigest()
        return {"sentences": len(self.texts), "sources": self.sources, "split_seed": SPLIT_SEED,
                "held_out_splits": list(HELD_OUT), "dropped_held_out": self.dropped_held_out,
                "dropped_duplicates": self.dropped_duplicates, "sha256": digest}


def installed_text_tasks() -> list[str]:
    # zoo.tasks and text_sources read pandas: imported when a corpus is built, so that the recipe
    # can name CORPUS_TASK cheaply.
    from slimtune.zoo.text_sources import TASKS, is_task_installed

    return sorted(name for name, spec in TASKS.items() if is_task_installed(spec))


def build_corpus(tasks: list[str] | None = None) -> Corpus:
    """The corpus of the module docstring over ``tasks`` (default: every installed text task;
    the held-out sentences are always those of every installed task)."""
    from slimtune.zoo.tasks import load_task

    every = installed_text_tasks()
    loaded = {name: load_task(name, split_seed=SPLIT_SEED) for name in every}
    held_out = {text_hash(t) for data in loaded.values() for split in HELD_OUT for t in _texts(data, split)}
    texts: list[str] = []
    seen: set[str] = set()
    sources: dict[str, int] = {}
    dropped_held, dropped_dupes = 0, 0
    for name in sorted(tasks if tasks is not None else every):
        taken = 0
        for text in _texts(loaded[name] if name in loaded else load_task(name), "train"):
            key = text_hash(text)
            if key in held_out:
                dropped_held += 1
            elif key in seen:
                dropped_dupes += 1
            else:
                seen.add(key)
                texts.append(text)
                taken += 1
        sources[name] = taken
    return Corpus(texts, sources, held_out, dropped_held, dropped_dupes)


def overlap_with_test_split(corpus: Corpus, task: str, split_seed: int) -> int:
    """How many sentences of ``task``'s test split under ``split_seed`` the corpus holds."""
    from slimtune.zoo.tasks import load_task

    hashes = {text_hash(t) for t in corpus.texts}
    return sum(text_hash(t) in hashes for t in _texts(load_task(task, split_seed=split_seed), "test"))


def _texts(data, split: str) -> list[str]:
    rows = data.splits[split]
    texts = list(rows["text"])
    if "text_pair" in rows.column_names:
        texts += [t for t in rows["text_pair"] if t]
    return texts


def corpus_split_of(text: str) -> str:
    """The corpus task's split of one sentence, fixed by its hash."""
    bucket = int(text_hash(text)[:8], 16) % 100
    return "validation" if bucket < HELD_OUT_PERCENT else "test" if bucket < 2 * HELD_OUT_PERCENT else "train"


def load_corpus_task(*, train_size: int | None = None, eval_size: int | None = None, seed: int = 0):
    """The corpus as an unlabelled task (``zoo.tasks.TaskData`` with no label names): every split
    a ``text`` column; ``train_size`` / ``eval_size`` keep a seeded sample of the training split /
    of validation and test (in corpus order)."""
    import numpy as np
    from datasets import Dataset, DatasetDict

    from slimtune.zoo.tasks import TaskData

    corpus = build_corpus()
    texts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for text in corpus.texts:
        texts[corpus_split_of(text)].append(text)
    policy = f"{HELD_OUT_PERCENT}% validation and {HELD_OUT_PERCENT}% test by the SHA-256 of the text, the rest train"
    for split, limit in (("train", train_size), ("validation", eval_size), ("test", eval_size)):
        if limit is not None and limit < len(texts[split]):
            kept = np.sort(np.random.default_rng(seed).choice(len(texts[split]), limit, replace=False))
            texts[split] = [texts[split][i] for i in kept]
    if train_size is not None or eval_size is not None:
        policy += f"; then a sample by seed={seed}: train_size={train_size}, eval_size={eval_size}"
    sources = ", ".join(f"{name} {count:,}" for name, count in corpus.sources.items())
    return TaskData(
        name=CORPUS_TASK,
        splits=DatasetDict({split: Dataset.from_dict({"text": rows}) for split, rows in texts.items()}),
        label_names=[],
        metric="loss",
        source=f"the training splits of the installed text tasks, labels dropped ({sources} sentences)",
        split_policy=policy,
        filtering=(f"dropped {corpus.dropped_held_out:,} sentences of a downstream validation/test split (split seed {SPLIT_SEED}) "
                   f"and {corpus.dropped_duplicates:,} duplicates"),
    )
