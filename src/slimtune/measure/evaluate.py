"""Task metrics of a model: the one evaluation loop used by the trainer, ``slimtune eval``,
export, ``--lora-rank``, warm starts and the intrinsic-dimension search.

Classification: argmax of the logits against the labels (:func:`slimtune.zoo.tasks.compute_metrics`);
causal LM: token-weighted mean next-token loss and its perplexity (masked LM: over the masked tokens); features (a bare model, no head):
no metric of its own (the distill hook adds its losses on the split, ``Hook.evaluation_metrics``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimtune.zoo.batches import eval_batches, pad_id_of, rows_batch, split_rows
from slimtune.zoo.tasks import compute_metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    objective: str,
    num_labels: int,
    *,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` over labelled ``batches`` (eval mode for the loop, restored after).
    ``gather`` joins the per-process predictions (or loss sums) of a multi-process evaluation;
    ``autocast`` is the context each forward runs in (bf16)."""
    if objective == "features":
        return {}
    gather = gather or (lambda t: t)
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    predictions, labels, loss_sum, token_count = [], [], 0.0, 0
    try:
        for batch in batches:
            with autocast():
                out = model(**batch)
            if objective == "classification":
                predictions.append(out.logits.float().argmax(-1))
                labels.append(batch["labels"])
            else:
                predicted = batch["labels"] if objective == "mlm" else batch["labels"][:, 1:]  # causal: the next token
                n_tokens = int((predicted != -100).sum())
                loss_sum += float(out.loss) * n_tokens
                token_count += n_tokens
    finally:
        model.train(was_training)
    if objective == "classification":
        preds = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
        golds = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        return compute_metrics(gather(preds).numpy(), gather(golds).numpy(), num_labels)
    totals = gather(torch.tensor([loss_sum, float(token_count)], dtype=torch.float64)).view(-1, 2).sum(0)
    mean_loss = float(totals[0] / max(totals[1], 1))
    return {"loss": mean_loss, "perplexity": math.exp(mean_loss)}


def evaluate_rows(model: nn.Module, rows, pad_id: int, objective: str, num_labels: int, batch_size: int = 64) -> dict[str, float]:
    """:func:`evaluate` on model-ready rows (:func:`slimtune.zoo.batches.split_rows`), one process."""
    batches = (rows_batch(rows, indices, pad_id, objective) for indices in eval_batches(len(rows), batch_size))
    return evaluate(model, batches, objective, num_labels)


def evaluate_task(
    model: nn.Module,
    batch_of: Callable[[list[int]], dict[str, torch.Tensor]],
    task,
    split: str,
    num_rows: int,
    objective: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """:func:`evaluate` over the ``num_rows`` rows of ``split`` (``batch_of(indices)`` builds a
    batch, this rank's share of them in order); a multi-task run's each task on its own rows, with
    its own label count, and their average (:func:`slimtune.zoo.multitask.average_metrics`)."""
    def batches(start: int, end: int):
        return (batch_of([start + i for i in indices]) for indices in eval_batches(end - start, batch_size, rank, world_size))

    options = {"gather": gather, "autocast": autocast}
    members = getattr(task, "members", None)
    if not members:
        return evaluate(model, batches(0, num_rows), objective, len(task.label_names), **options)
    from slimtune.zoo.multitask import average_metrics

    per_task = {member.name: evaluate(model, batches(start, end), objective, member.num_labels, **options)
                for member, (start, end) in zip(members, task.row_ranges(split)) if end > start}
    if not per_task:
        return {}
    return average_metrics(per_task, {member.name: member.metric for member in members})


def evaluate_split(run, split: str = "test") -> dict[str, float]:
    """:func:`evaluate` of a built run (``slimtune.runner.Built``: model, tokenizer, task, recipe,
    objective, hooks) on one split of its task, batched as its recipe says, with the metrics its
    hooks add (``Hook.evaluation_metrics``), as the trainer evaluates."""
    recipe = run.recipe
    rows = split_rows(run.task, run.tokenizer, split, recipe.train.max_length, run.objective)
    pad_id, size = pad_id_of(run.tokenizer), recipe.train.eval_batch_size
    metrics = evaluate_task(run.model, lambda indices: rows_batch(rows, indices, pad_id, run.objective), run.task, split,
                            len(rows), run.objective, size)

    def batches():
        return (rows_batch(rows, indices, pad_id, run.objective) for indices in eval_batches(len(rows), size))

    for hook in run.hooks:
        metrics.update(hook.evaluation_metrics(run.model, batches, contextlib.nullcontext, lambda t: t))
    return metrics
