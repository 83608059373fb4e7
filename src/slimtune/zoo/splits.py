"""Fixed, seeded, stratified splitting shared by the registered text tasks, user data files and
image tasks: held-out parts and subsets that keep every class, 80/10/10 pools and validation
carved from an official train split. Sampling uses ``numpy.random.RandomState``, whose stream
numpy keeps stable across versions and machines, so a split depends only on its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

HELD_OUT_FRACTION = 0.1  # validation (and test, when there is no official one) per split


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


def _shuffled_classes(labels: Sequence[int] | np.ndarray, seed: int) -> tuple[np.random.RandomState, list[np.ndarray], np.ndarray]:
    """The seeded generator, the row positions of each class (by sorted label id, shuffled by
    it) and the class sizes; the caller keeps drawing from the same generator."""
    labels = np.asarray(labels)
    random = np.random.RandomState(seed)
    per_class = [random.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    return random, per_class, np.array([len(rows) for rows in per_class])


def stratified_split(
    labels: Sequence[int] | np.ndarray, held_out_sizes: Sequence[int], seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split row positions into a remainder and held-out parts of the given sizes, stratified.

    Every class keeps at least one row in the remainder (the training split), so no held-out
    label is unseen in training. Returns (remainder, [part, ...]), each in a seeded random order.
    """
    random, per_class, counts = _shuffled_classes(labels, seed)
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
    random, per_class, counts = _shuffled_classes(labels, seed)
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
