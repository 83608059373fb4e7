"""Pruning scores: a higher score means "keep". Every criterion scores the tensors it is given
(``{name: (module, tensor_name)}``), whatever they are: base weights, a delta's parameters or
merged weights.

==========  ==========================================================  ================
criterion   score of weight w                                            needs
==========  ==========================================================  ================
random      U(0, 1) (seeded)                                             nothing
magnitude   |w|                                                          nothing
snip        |g ⊙ w|, g = sum of dL/dw over a few batches (Lee 2019)     data
grasp       w ⊙ (H g) (Wang 2020: remove the largest -w ⊙ Hg)            data
synflow     |w ⊙ dR/dw|, R = sum of the outputs of the network with      nothing
            every parameter replaced by its absolute value, on an
            all-ones input (Tanaka 2020; one round here)
movement    -w ⊙ sum of dL/dw (Sanh 2020; during training the schedule   data
            accumulates it over the training steps instead)
==========  ==========================================================  ================

``w`` is the tensor as the network sees it (masked entries are 0). Gradients are taken with
respect to these tensors even when they are frozen (their ``requires_grad`` is switched on for
the scoring passes and restored after); the model's existing ``.grad`` fields are left as found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.sparsity.masks import dense_tensor

CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow", "movement")
DATA_CRITERIA = frozenset({"snip", "grasp", "movement"})

Targets = dict[str, tuple[nn.Module, str]]
LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def check_criterion(criterion: str, have_data: bool, field: str = "sparsity.criterion") -> None:
    if criterion not in CRITERIA:
        raise SlimtuneError(f"{field}: unknown criterion '{criterion}'{did_you_mean(criterion, CRITERIA)}")
    if criterion in DATA_CRITERIA and not have_data:
        raise SlimtuneError(f"{field}: '{criterion}' scores weights with gradients on data, and no training batches were given; use random, magnitude or synflow, or give a task")


def effective(module: nn.Module, tensor_name: str) -> torch.Tensor:
    return getattr(module, tensor_name)


@contextmanager
def _gradients_of(model: nn.Module, targets: Targets):
    """Dense tensors of the targets with requires_grad on and ``.grad`` cleared; everything
    (flags, existing gradients, train/eval mode) restored on exit."""
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_flags = [p.requires_grad for p in params]
    dense = {name: dense_tensor(m, t) for name, (m, t) in targets.items()}
    for p in params:
        p.grad = None
    for t in dense.values():
        t.requires_grad_(True)
    try:
        yield dense
    finally:
        for p, g, f in zip(params, saved_grads, saved_flags):
            p.grad = g
            p.requires_grad_(f)


def _summed_gradients(model: nn.Module, targets: Targets, batches: Iterable[dict], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """sum over batches of dL/dw for the *effective* tensors (a mask's zeros get gradient
    through the dense tensor times the mask, so masked entries read 0)."""
    with _gradients_of(model, targets) as dense:
        n = 0
        for batch in batches:
            loss_fn(batch).backward()
            n += 1
        if n == 0:
            raise SlimtuneError("sparsity: the criterion needs at least one batch of data, got none")
        return {name: (t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)) for name, t in dense.items()}


def score(
    criterion: str,
    model: nn.Module,
    targets: Targets,
    *,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    loss_fn: LossFn | None = None,
    synflow_forward: Callable[[], torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Scores (higher = keep) for each target tensor; shapes as the tensors."""
    batches = list(batches) if batches is not None else None
    check_criterion(criterion, have_data=bool(batches))
    loss_fn = loss_fn or (lambda batch: model(**batch).loss)
    weights = {name: effective(m, t).detach() for name, (m, t) in targets.items()}
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return {name: torch.rand(w.shape, generator=gen) for name, w in weights.items()}
    if criterion == "magnitude":
        return {name: w.abs() for name, w in weights.items()}
    if criterion == "snip":
        grads = _summed_gradients(model, targets, batches, loss_fn)
        return {name: (grads[name] * w).abs() for name, w in weights.items()}
    if criterion == "movement":
        grads = _summed_gradients(model, targets, batches, loss_fn)
        return {name: -(grads[name] * w) for name, w in weights.items()}
    if criterion == "grasp":
        return _grasp(model, targets, batches, loss_fn, weights)
    return _synflow(model, targets, weights, synflow_forward)


def _grasp(model, targets: Targets, batches, loss_fn, weights) -> dict[str, torch.Tensor]:
    """w ⊙ Hg with g the summed gradient and Hg summed over the same batches (a Hessian-vector
    product through a second backward)."""
    from slimtune.zoo.hf_helpers import eager_attention

    g = _summed_gradients(model, targets, batches, loss_fn)
    # The CPU scaled-dot-product kernel has no double backward: run attention eagerly here.
    with eager_attention(model), _gradients_of(model, targets) as dense:
        names = list(dense)
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(batch), [dense[n] for n in names], create_graph=True, allow_unused=True)
            z = sum((gr * g[n]).sum() for n, gr in zip(names, grads) if gr is not None)
            if isinstance(z, torch.Tensor) and z.requires_grad:
                z.backward()
        hg = {n: (dense[n].grad.detach().clone() if dense[n].grad is not None else torch.zeros_like(dense[n])) for n in names}
    return {name: w * hg[name] for name, w in weights.items()}


def default_synflow_forward(model: nn.Module) -> Callable[[], torch.Tensor]:
    """An all-ones input for a transformers model (``inputs_embeds`` of ones, 8 positions)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise SlimtuneError("sparsity.criterion: synflow needs an all-ones input; this model has no input embeddings to replace")
    dim = embeddings.embedding_dim

    def forward() -> torch.Tensor:
        ones = torch.ones(1, 8, dim, dtype=embeddings.weight.dtype)
        out = model(inputs_embeds=ones, attention_mask=torch.ones(1, 8, dtype=torch.long))
        return out.logits if hasattr(out, "logits") else out[0]

    return forward


def _synflow(model, targets: Targets, weights, forward) -> dict[str, torch.Tensor]:
    forward = forward or default_synflow_forward(model)
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    signs = [torch.sign(p.detach()) for p in params]
    with torch.no_grad():
        for p in params:
            p.abs_()
    try:
        with _gradients_of(model, targets) as dense:
            forward().sum().backward()
            grads = {n: (t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)) for n, t in dense.items()}
            abs_weights = {name: effective(m, t).detach().clone() for name, (m, t) in targets.items()}
    finally:
        with torch.no_grad():
            for p, s in zip(params, signs):
                p.mul_(s)  # |p| * sign(p) == p exactly
        model.train(was_training)
    return {name: (grads[name] * abs_weights[name]).abs() for name in weights}


def describe() -> dict[str, Any]:
    return {"criteria": list(CRITERIA), "need_data": sorted(DATA_CRITERIA)}
