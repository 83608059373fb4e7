"""How a classification model turns token states into one vector for its head.

MiniLM and MPNet are sentence-embedding checkpoints trained with *mean pooling*; their [CLS]
state carries little signal (in the 2-layer MiniLM it is nearly constant across inputs: logistic
regression on it stays at the majority class, on mean-pooled states it reaches 75% on
movie-sentiment). So for BERT-family encoders the default head pools by the masked mean of the
last hidden states; ``cls`` keeps the model's own head (BERT: dense+tanh pooler over [CLS]; ViT:
[CLS]; Llama: the last real token).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError


class MaskedMeanPooler(nn.Module):
    """Stands in for BERT's pooler: the mean of the last hidden states over real (unmasked) tokens.
    It has no parameters; the attention mask is handed over by a pre-hook on the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[1] != hidden_states.shape[1]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _bert_style_pooler(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The encoder module that owns a BERT-style ``pooler`` (called with the hidden states)."""
    for name, module in model.named_modules():
        pooler = getattr(module, "pooler", None)
        if pooler is not None and type(pooler).__name__.endswith("Pooler") and hasattr(pooler, "dense"):
            return module, name
    return None


def configure_pooling(model: nn.Module, pooling: str, objective: str) -> str:
    """Apply ``head.pooling`` and return what was used (``mean`` or ``cls``)."""
    if objective != "classification":
        return "none"
    found = _bert_style_pooler(model)
    if pooling == "auto":
        pooling = "mean" if found is not None else "cls"
    if pooling == "cls":
        return "cls"
    if found is None:
        raise SlimtuneError(
            f"head.pooling: 'mean' needs a BERT-style encoder with a pooler; model type "
            f"'{getattr(model.config, 'model_type', '?')}' uses its own head (set head.pooling: cls)"
        )
    encoder, _ = found
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def hand_over_mask(module, args, kwargs):
        pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    return "mean"


# ----------------------------------------------------------------------------- several tasks


class TaskRouter:
    """The task of each example of the current forward pass (``task_ids``, one per row), for the
    modules that depend on it: the task heads and task-conditioned deltas. A pre-hook on the model
    takes ``task_ids`` out of its inputs (the model's own forward never sees it) and sets it here,
    None when a call gives none."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.task_ids: torch.Tensor | None = None
        #: The task of every example when the batch is one task's (the sampler's batches), else None:
        #: modules then use that task's weights as plain layers. Set with ``task_ids``, outside any
        #: per-sample re-run, where a data-dependent test could not be made.
        self.single: int | None = None

    def set(self, task_ids: torch.Tensor | None) -> None:
        self.task_ids = task_ids
        self.single = int(task_ids[0]) if task_ids is not None and len(task_ids) and bool((task_ids == task_ids[0]).all()) else None

    def current(self, what: str) -> torch.Tensor:
        if self.task_ids is None:
            raise SlimtuneError(f"{what}: this model serves {len(self.names)} tasks ({', '.join(self.names)}); "
                                "call it with task_ids (each example's task index)")
        return self.task_ids


class MultiTaskHead(nn.Module):
    """One linear head per task, stored as one stacked ``linear`` (task t's rows are its block of
    outputs): each example reads its own task's block, padded to the largest label count with the
    dtype's minimum (softmax 0, never the argmax, no gradient), so the model's own cross-entropy
    over ``max(labels)`` columns is each task's own. A task's block gets gradients from its own
    examples only."""

    def __init__(self, linear: nn.Linear, sizes: list[int], router: TaskRouter) -> None:
        super().__init__()
        if linear.out_features != sum(sizes):
            raise ValueError(f"the stacked head has {linear.out_features} outputs for {sum(sizes)} labels")
        self.linear = linear
        self.sizes = list(sizes)
        self.router = router
        self.register_buffer("offsets", torch.tensor([sum(sizes[:i]) for i in range(len(sizes))]), persistent=False)
        self.register_buffer("counts", torch.tensor(sizes), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = self.linear(x)
        ids = self.router.current("task head").to(stacked.device)
        width = max(self.sizes)
        columns = torch.arange(width, device=stacked.device)
        index = (self.offsets[ids].unsqueeze(-1) + columns).clamp_max(stacked.shape[-1] - 1)  # [B, width]
        valid = columns < self.counts[ids].unsqueeze(-1)
        shape = (index.shape[0],) + (1,) * (stacked.dim() - 2) + (width,)  # Llama scores every position: [B, T, labels]
        index, valid = index.view(shape).expand(*stacked.shape[:-1], width), valid.view(shape)
        picked = stacked.gather(-1, index)
        return picked.masked_fill(~valid, torch.finfo(picked.dtype).min)

    def extra_repr(self) -> str:
        return f"{len(self.sizes)} tasks: {', '.join(f'{n}: {s}' for n, s in zip(self.router.names, self.sizes))} labels"


def task_head_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The task head's output linear (BERT/ViT ``classifier``, Llama ``score``, MPNet
    ``classifier.out_proj``): its parent module, attribute name and the linear."""
    from slimtune.core.arch import HEAD_MODULE_NAMES

    for name in HEAD_MODULE_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return model, name, head
        if head is not None and isinstance(getattr(head, "out_proj", None), nn.Linear):
            return head, "out_proj", head.out_proj
    raise SlimtuneError(f"multi-task: no task head found on model type '{getattr(getattr(model, 'config', None), 'model_type', '?')}'")


def attach_task_heads(model: nn.Module, names: list[str], sizes: list[int]) -> TaskRouter:
    """Turn the model's head (built with ``sum(sizes)`` outputs) into one head per task and route
    each forward pass by its ``task_ids``; the model then reports ``max(sizes)`` logits."""
    router = TaskRouter(names)
    parent, attribute, linear = task_head_linear(model)
    setattr(parent, attribute, MultiTaskHead(linear, sizes, router))
    model.config.num_labels = max(sizes)
    if hasattr(model, "num_labels"):
        model.num_labels = max(sizes)

    def take_task_ids(module, args, kwargs):
        router.set(kwargs.pop("task_ids", None))
        return args, kwargs

    model.register_forward_pre_hook(take_task_ids, with_kwargs=True)
    model.slimtune_task_router = router
    return router
