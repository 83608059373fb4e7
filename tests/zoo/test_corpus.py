"""The unlabelled pre-training corpus (zoo/corpus.py) from the installed text sources: no
sentence of any task's validation or test split is in it (checked by hash against every task
loaded here), no labels, no duplicates, the same corpus every time."""

import pytest

from slimtune.zoo.corpus import HELD_OUT, SPLIT_SEED, build_corpus, installed_text_tasks, overlap_with_test_split, text_hash
from slimtune.zoo.tasks import DEFAULT_SPLIT_SEED, load_task

pytestmark = pytest.mark.integration  # reads every installed text source


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


def test_no_held_out_sentence_of_any_task_is_in_the_corpus(corpus):
    tasks = installed_text_tasks()
    assert {"movie-sentiment", "trec-6", "sms-spam"} <= set(tasks)
    hashes = {text_hash(t) for t in corpus.texts}
    for name in tasks:
        data = load_task(name)
        for split in HELD_OUT:
            leaked = [t for t in data.splits[split]["text"] if text_hash(t) in hashes]
            assert not leaked, f"{name} {split}: {len(leaked)} sentences in the corpus, e.g. {leaked[0]!r}"
    assert overlap_with_test_split(corpus, "movie-sentiment", 0) == 0
    assert SPLIT_SEED == DEFAULT_SPLIT_SEED  # the split every downstream run uses unless told otherwise


def test_the_corpus_is_every_training_sentence_once_without_labels(corpus):
    assert all(isinstance(t, str) and t for t in corpus.texts)
    assert len(set(corpus.texts)) == len(corpus.texts)
    train_total = sum(len(load_task(name).splits["train"]) for name in installed_text_tasks())
    assert len(corpus.texts) + corpus.dropped_held_out + corpus.dropped_duplicates == train_total
    assert sum(corpus.sources.values()) == len(corpus.texts)
    record = corpus.record()
    assert record["sentences"] == len(corpus.texts) and record["split_seed"] == 0
    trec = build_corpus(["trec-6"])
    assert trec.sources == {"trec-6": corpus.sources["trec-6"]} and set(trec.texts) <= set(corpus.texts)


def test_another_split_seed_overlaps_and_is_counted(corpus):
    assert overlap_with_test_split(corpus, "trec-6", 1) > 0
