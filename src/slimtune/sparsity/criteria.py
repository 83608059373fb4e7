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
wanda       |w_ij| * ||x_j||_2, x_j the layer's j-th input feature over  data
            the real tokens of a few batches (Sun et al. 2024, Wanda;
            official locuslab/wanda ``lib/prune.py`` ``prune_wanda``,
            which compares within each output row: ``scope: row``)
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

CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow", "movement", "wanda")
DATA_CRITERIA = frozenset({"snip", "grasp", "movement", "wanda"})

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
    if criterion == "wanda":
        norms = _input_norms(model, targets, batches, loss_fn)
        return {name: w.abs() * norms[name].to(w.dtype) for name, w in weights.items()}
    return _synflow(model, targets, weights, synflow_forward)


def _input_norms(model: nn.Module, targets: Targets, batches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Per target Linear weight, the L2 norm of each input feature over the real tokens of
    ``batches`` (Wanda's ``scaler_row``: the sum of squares over the calibration tokens, then its
    square root), shaped to broadcast over the weight's rows. Padding tokens are left out (the
    official code calibrates on unpadded segments)."""
    for name, (module, tensor_name) in targets.items():
        if not isinstance(module, nn.Linear) or tensor_name != "weight":
            raise SlimtuneError(f"sparsity.criterion: 'wanda' scores the weight of a Linear layer by that layer's inputs; '{name}' is not one "
                                "(use target: base, or another criterion)")
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64) for name, (module, _) in targets.items()}
    real: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args):
            x = args[0].detach().double()
            mask = real.get("mask")
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, (module, _) in targets.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                real["mask"] = mask.bool() if mask is not None else None
                loss_fn(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: total.sqrt().float().unsqueeze(0) for name, total in sums.items()}


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
