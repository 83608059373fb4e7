"""Adversarial training on the word embeddings: FreeLB (Zhu et al. 2020, "FreeLB: Enhanced
Adversarial Training for Natural Language Understanding") the way the robust-ticket search runs
it (ruizheng20/robust_ticket, ``search_ticket.py``, the loop under ``# for freelb``).

Per batch, ``steps`` forward/backward passes on ``E[input_ids] + delta``: each adds
``loss / steps`` to the trainable parameters' gradients (so they receive the mean gradient over
the iterates), then delta takes one normalised L2 ascent step (``step_size * g / ||g||`` per
example) and, with ``max_norm > 0``, is scaled back into that L2 ball; the last pass takes no
step. The start is uniform on the non-padding tokens with L2 size about ``init_radius`` per
example (:func:`slimtune.measure.attacks.perturbation_start`), drawn from the global RNG (seeded
and checkpointed with the run). Official defaults: 2 passes in ``search_ticket.py``, 5 in the
paper's scripts (``stage2-search-ticket.sh``), ``adv_lr`` 0.03, ``adv_init_mag`` 0.05,
``adv_max_norm`` 0 (unbounded).

Deviation: the perturbation and its gradient are zeroed on padding positions (the official
leaves the gradient there; it is zero up to the attention mask's finite -10000).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.measure.attacks import ascent_step, perturbation_start, project_l2


@dataclass(frozen=True)
class FreeLB:
    steps: int = 5
    step_size: float = 0.03
    init_radius: float = 0.05
    max_norm: float = 0.0  # 0: unbounded, as the official default


def freelb_backward(model: nn.Module, batch: dict[str, torch.Tensor], cfg: FreeLB, autocast=nullcontext) -> torch.Tensor:
    """Accumulate FreeLB's gradient into ``.grad`` of the parameters that require it; returns the
    mean loss over the iterates (detached)."""
    embedding = model.get_input_embeddings()
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        delta = perturbation_start(embedding(input_ids), attention_mask, cfg.init_radius)
    total = torch.zeros(())
    for step in range(cfg.steps):
        delta.requires_grad_(True)
        # The lookup is repeated per pass (as the official) so trainable embeddings get every pass's gradient.
        with autocast():
            loss = model(inputs_embeds=embedding(input_ids) + delta, **extra).loss / cfg.steps
        loss.backward()
        total += loss.detach().float()
        if step == cfg.steps - 1:
            break
        delta = ascent_step(delta, delta.grad, attention_mask, cfg.step_size)
        if cfg.max_norm > 0:
            delta = project_l2(delta, cfg.max_norm)
    return total
