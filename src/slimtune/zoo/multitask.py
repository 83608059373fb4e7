"""Several tasks in one run: their data side by side, and which task each batch comes from.

A multi-task run (``task: [movie-sentiment, trec-6, sms-spam]``) trains one model with one head
per task (:mod:`slimtune.zoo.heads`). Its data is a :class:`MultiTaskData`: the member tasks'
splits one after the other, each row tagged with its task's index (``task_ids`` in every batch),
labels in the member's own ids.

Batches are homogeneous: every global batch comes from one task, as in Hyperformer's
``MultiTaskBatchSampler`` (rabeehk/hyperformer ``hyperformer/data/multitask_sampler.py``), which
:class:`MultiTaskBatchPlan` follows:

* ``temperature``: batch b's task is drawn with probability ∝ (n_t / N)^(1/T) (T = 10 in the
  official configs; T = 1 is ``proportional``), and its examples uniformly *with replacement*
  from that task's training rows, ``ceil(N / batch_size)`` batches per epoch;
* ``round-robin``: the tasks in turn, each walking through its own shuffled rows (reshuffled
  when it runs out), so small tasks are revisited more often than large ones.

Draws are seeded by ``(seed, epoch)`` only, so a resumed run sees the same batches, and every
process draws the same task for a global batch (each then takes its slice of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from slimtune.errors import SlimtuneError
from slimtune.zoo.tasks import SPLITS, TaskData

#: Hyperformer's configs (``configs/*.json``: ``"temperature": 10``).
DEFAULT_TEMPERATURE = 10.0
#: The primary metric of a multi-task run: the mean of each task's own primary metric.
AVERAGE_METRIC = "average"


@dataclass
class MultiTaskData(TaskData):
    """Member tasks trained together; ``label_names`` are every member's labels as
    ``task/label`` (the stacked heads' outputs), ``metric`` is :data:`AVERAGE_METRIC`."""

    members: list[TaskData] = field(default_factory=list)
    sampling: str = "temperature"
    temperature: float = DEFAULT_TEMPERATURE

    def row_ranges(self, split: str) -> list[tuple[int, int]]:
        """Where each member's rows of ``split`` lie among the run's rows (members in order)."""
        ranges, start = [], 0
        for member in self.members:
            end = start + len(member.splits[split])
            ranges.append((start, end))
            start = end
        return ranges

    def task_weights(self) -> list[float]:
        """The probability of each task for a batch (round-robin: the share of batches)."""
        sizes = [len(member.splits["train"]) for member in self.members]
        return sampling_weights(sizes, self.sampling, self.temperature)

    def summary(self) -> list[dict[str, Any]]:
        """One entry per member for the report: name, sizes, labels, metric, sampling weight."""
        return [
            {"name": member.name, **{f"n_{split}": len(member.splits[split]) for split in SPLITS},
             "labels": list(member.label_names), "primary_metric": member.metric, "sampling_weight": weight}
            for member, weight in zip(self.members, self.task_weights())
        ]


def sampling_weights(sizes: list[int], sampling: str, temperature: float = DEFAULT_TEMPERATURE) -> list[float]:
    """Hyperformer's ``generate_tasks_distribution``: (n_t / N)^(1/T), normalised."""
    if sampling == "round-robin":
        return [1.0 / len(sizes)] * len(sizes)
    t = 1.0 if sampling == "proportional" else temperature
    total = sum(sizes)
    raw = [(size / total) ** (1.0 / t) for size in sizes]
    return [w / sum(raw) for w in raw]


def combine_tasks(members: list[TaskData], *, sampling: str | None = None, temperature: float | None = None) -> MultiTaskData:
    """The member tasks as one :class:`MultiTaskData`; refused (one line) when two share a name,
    or a task has fewer than two labels (or its training rows show only one)."""
    names = [member.name for member in members]
    for index, member in enumerate(members):
        where = f"task.tasks.{index} ({member.name})"
        if names.index(member.name) != index:
            raise SlimtuneError(f"{where}: task '{member.name}' is listed twice; give one of them an alias")
        if "/" in member.name:
            raise SlimtuneError(f"{where}: a task's name may not contain '/' (metrics are named task/metric); give it an alias")
        if len(member.label_names) < 2:
            raise SlimtuneError(f"{where}: has {len(member.label_names)} label ({', '.join(member.label_names)}); a task needs two or more")
        seen = set(member.splits["train"]["label"])
        if len(seen) < 2:
            raise SlimtuneError(f"{where}: its training split has one class only ({member.label_names[next(iter(seen))]}); "
                                "nothing to learn (a larger train_size?)")
    from datasets import DatasetDict, Value, concatenate_datasets

    def tagged(member: TaskData, index: int, split: str):
        data = member.splits[split].select_columns(["text", "label"]).cast_column("label", Value("int64"))
        return data.add_column("task", [index] * len(data))

    splits = DatasetDict({split: concatenate_datasets([tagged(m, i, split) for i, m in enumerate(members)]) for split in SPLITS})
    return MultiTaskData(
        name="+".join(names),
        splits=splits,
        label_names=[f"{member.name}/{label}" for member in members for label in member.label_names],
        metric=AVERAGE_METRIC,
        source="; ".join(f"{member.name}: {member.source}" for member in members),
        split_policy="; ".join(f"{member.name}: {member.split_policy}" for member in members),
        filtering="; ".join(f"{member.name}: {member.filtering}" for member in members if member.filtering),
        members=list(members),
        sampling=sampling or "temperature",
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
    )


def is_multitask(task: Any) -> bool:
    return bool(getattr(task, "members", None))


@dataclass
class MultiTaskBatchPlan:
    """Deterministic homogeneous global batches (see the module docstring), sliced for one rank;
    the interface of :class:`slimtune.zoo.batches.BatchPlan`. ``sizes``: training rows per task,
    whose rows lie one after the other."""

    sizes: list[int]
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    sampling: str = "temperature"
    temperature: float = DEFAULT_TEMPERATURE

    def __post_init__(self) -> None:
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._epoch_cache: tuple[int, list[tuple[int, list[int]]]] | None = None

    @property
    def num_examples(self) -> int:
        return sum(self.sizes)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(task, global row indices) of every batch of ``epoch``."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches: list[tuple[int, list[int]]] = []
        if self.sampling == "round-robin":
            orders = [torch.randperm(n, generator=generator).tolist() for n in self.sizes]
            positions = [0] * len(self.sizes)
            for index in range(self.batches_per_epoch):
                task = index % len(self.sizes)
                chosen = []
                while len(chosen) < self.batch_size:
                    if positions[task] == len(orders[task]):  # this task ran out: a fresh pass over it
                        orders[task], positions[task] = torch.randperm(self.sizes[task], generator=generator).tolist(), 0
                    take = orders[task][positions[task]:positions[task] + self.batch_size - len(chosen)]
                    chosen += take
                    positions[task] += len(take)
                batches.append((task, [self.offsets[task] + i for i in chosen]))
        else:
            weights = torch.tensor(sampling_weights(self.sizes, self.sampling, self.temperature), dtype=torch.double)
            tasks = torch.multinomial(weights, self.batches_per_epoch, replacement=True, generator=generator).tolist()
            for task in tasks:
                rows = torch.randint(0, self.sizes[task], (self.batch_size,), generator=generator).tolist()
                batches.append((task, [self.offsets[task] + i for i in rows]))
        self._epoch_cache = (epoch, batches)
        return batches

    def global_batch(self, epoch: int, index: int) -> list[int]:
        return self.epoch_batches(epoch)[index][1]

    def iter_epoch(self, epoch: int, start: int = 0):
        for index, (_, rows) in enumerate(self.epoch_batches(epoch)[start:], start=start):
            yield index, rows[self.rank :: self.world_size]


def multitask_plan(task: MultiTaskData, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> MultiTaskBatchPlan:
    sizes = [len(member.splits["train"]) for member in task.members]
    if any(size == 0 for size in sizes):
        empty = task.members[sizes.index(0)].name
        raise SlimtuneError(f"task '{empty}' has no training rows; a multi-task run samples every task")
    return MultiTaskBatchPlan(sizes, batch_size, seed, rank, world_size, task.sampling, task.temperature)


def average_metrics(per_task: dict[str, dict[str, float]], primary: dict[str, str]) -> dict[str, float]:
    """The run's metrics: :data:`AVERAGE_METRIC` (the mean of each task's primary metric), the
    mean of every metric the tasks share, then each task's as ``task/metric``."""
    out = {AVERAGE_METRIC: sum(metrics[primary[name]] for name, metrics in per_task.items()) / len(per_task)}
    shared = [key for key in next(iter(per_task.values())) if all(key in m for m in per_task.values())]
    out.update({key: sum(m[key] for m in per_task.values()) / len(per_task) for key in shared})
    for name, metrics in per_task.items():
        out.update({f"{name}/{key}": value for key, value in metrics.items()})
    return out

