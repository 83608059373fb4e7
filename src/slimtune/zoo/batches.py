"""From task splits to batches: tokenise once (HF datasets), then deterministic, resumable batches.

The order of an epoch is a permutation seeded by ``(seed, epoch)``, so a run restarted at
``(epoch, batch)`` sees exactly the batches it would have seen. With several processes, each
global batch is split across ranks (``batch[rank::world]``): the global batch size is what the
recipe says, whatever the number of processes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import torch

# Tokenising a few thousand rows takes well under a second; its progress bars are noise.
datasets.disable_progress_bars()

IGNORE_INDEX = -100
#: The batch key of each row's task in a multi-task run (:mod:`slimtune.zoo.multitask`).
TASK_IDS = "task_ids"
#: Masked-LM masking (BERT's): this share of each row's non-special tokens is predicted; of them
#: MASK_REPLACE become [MASK], RANDOM_REPLACE a random token, the rest stay as they are.
MASK_SHARE, MASK_REPLACE, RANDOM_REPLACE = 0.15, 0.8, 0.1


def tokenize_split(split: datasets.Dataset, tokenizer, max_length: int, objective: str) -> datasets.Dataset:
    pair = "text_pair" in split.column_names

    def encode(rows):
        texts = rows["text"]
        pairs = rows["text_pair"] if pair else None
        if objective == "lm" and tokenizer.eos_token is not None:
            texts = [t + tokenizer.eos_token for t in texts]
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_special_tokens_mask=objective == "mlm")
        if objective == "classification":
            encoded["labels"] = rows["label"]
        if objective == "mlm":
            special = encoded.pop("special_tokens_mask")
            masked = [mask_row(ids, flags, text, tokenizer) for ids, flags, text in zip(encoded["input_ids"], special, texts)]
            encoded["input_ids"], encoded["labels"] = [m[0] for m in masked], [m[1] for m in masked]
        return encoded

    keep = [c for c in split.column_names]
    # An explicit fingerprint: otherwise datasets hashes `encode` with dill, tokenizer included,
    # which costs ~1 s per split (more than tokenising); nothing is read from its cache anyway.
    fingerprint = f"slimtune-tokenized-{uuid.uuid4().hex}"
    return split.map(encode, batched=True, remove_columns=keep, desc=None, load_from_cache_file=False, new_fingerprint=fingerprint)


def mask_row(ids: list[int], special: list[int], text: str, tokenizer) -> tuple[list[int], list[int]]:
    """BERT's masking of one row (Devlin et al. 2019; google-research/bert
    ``create_pretraining_data.py``): max(1, round(``MASK_SHARE`` x the non-special tokens)) are
    predicted, 80% of them shown as [MASK], 10% as a random token, 10% as themselves; returns (input ids, labels: the original id where predicted, else -100). Static,
    as the original BERT's data preparation: seeded by the text's CRC32, so a row is masked the
    same in every epoch, process and resumed run (a deliberate choice over RoBERTa's dynamic
    masking, which would need the step in the batch builder)."""
    import zlib

    import numpy as np

    rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
    candidates = [i for i, flag in enumerate(special) if not flag]
    ids, labels = list(ids), [IGNORE_INDEX] * len(ids)
    if not candidates:
        return ids, labels
    chosen = rng.choice(candidates, size=max(1, round(MASK_SHARE * len(candidates))), replace=False)
    for position, draw in zip(chosen.tolist(), rng.random(len(chosen)).tolist()):
        labels[position] = ids[position]
        if draw < MASK_REPLACE:
            ids[position] = tokenizer.mask_token_id
        elif draw < MASK_REPLACE + RANDOM_REPLACE:
            ids[position] = int(rng.integers(len(tokenizer)))
    return ids, labels


def collate(rows: list[dict], pad_id: int, objective: str) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch (dynamic padding, right side)."""
    longest = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        if key == "labels":
            continue
        if key == TASK_IDS:  # one value per row, not per token
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows], dtype=torch.long)
    if objective == "classification":
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    elif objective == "mlm":
        batch["labels"] = torch.tensor([r["labels"] + [IGNORE_INDEX] * (longest - len(r["labels"])) for r in rows], dtype=torch.long)
    elif objective == "lm":
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
    return batch


@dataclass
class BatchPlan:
    """Deterministic global batches of example indices, sliced for one rank."""

    num_examples: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def global_batch(self, epoch: int, index: int) -> list[int]:
        order = self.epoch_order(epoch)
        return order[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        order = self.epoch_order(epoch)
        for index in range(start, self.batches_per_epoch):
            global_indices = order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
            yield index, global_indices[self.rank :: self.world_size]


def eval_batches(num_examples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """This rank's shard of the evaluation set, in order, in batches."""
    shard = list(range(rank, num_examples, world_size))
    for start in range(0, len(shard), batch_size):
        yield shard[start : start + batch_size]


def fixed_length_batch(rows: list[dict], pad_id: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Real examples (cycled), truncated or padded to exactly ``seq_len`` tokens, without labels:
    the inputs of FLOP and latency measurements."""
    chosen = [rows[i % len(rows)] for i in range(batch_size)]
    batch: dict[str, torch.Tensor] = {}
    for key in chosen[0]:
        if key == "labels":
            continue
        if key == TASK_IDS:
            batch[key] = torch.tensor([r[key] for r in chosen], dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([(r[key] + [fill] * seq_len)[:seq_len] for r in chosen], dtype=torch.long)
    return batch


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0


def split_rows(task, tokenizer, split: str, max_length: int, objective: str):
    """One split as model-ready rows: tokenised examples (a list of dicts) for a text task; for an
    image task the processor's pixel tensor (``ImageRows``). Batches are built by index."""
    from slimtune.zoo.images import is_image_task

    if members := getattr(task, "members", None):  # a multi-task run: each task's rows, tagged with its index
        return [{**row, TASK_IDS: index} for index, member in enumerate(members)
                for row in split_rows(member, tokenizer, split, max_length, objective)]
    if is_image_task(task):
        return tokenizer.encode_split(task.splits[split])
    return tokenize_split(task.splits[split], tokenizer, max_length, objective).to_list()


def batch_plan(task, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The training batches of ``task``: shuffled epochs (:class:`BatchPlan`), or for several tasks
    one task per batch (:class:`slimtune.zoo.multitask.MultiTaskBatchPlan`)."""
    if getattr(task, "members", None):
        from slimtune.zoo.multitask import multitask_plan

        return multitask_plan(task, batch_size, seed, rank, world_size)
    return BatchPlan(num_examples, batch_size, seed, rank, world_size)


def rows_batch(rows, indices: list[int], pad_id: int, objective: str) -> dict[str, torch.Tensor]:
    """The labelled batch of ``rows[indices]`` (text rows padded to the longest, or images)."""
    from slimtune.zoo.image_processing import ImageRows

    if isinstance(rows, ImageRows):
        return rows.batch(indices)
    return collate([rows[i] for i in indices], pad_id, objective)


def shuffled_batches(rows: list[dict], pad_id: int, objective: str, batch_size: int, count: int, seed: int) -> list[dict]:
    """``count`` seeded, shuffled training batches (with labels), e.g. for importance scores."""
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [collate([rows[i] for i in order[s:s + batch_size]], pad_id, objective)
            for s in range(0, min(len(order), count * batch_size), batch_size)]

