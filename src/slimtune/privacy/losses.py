"""One loss per example, for each training objective: what DP-SGD clips is the gradient of each."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def per_sample_losses(output: Any, batch: dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    """One loss per example: cross-entropy of the label, or the mean next-token loss of the row
    (masked LM: the mean loss of its masked tokens)."""
    logits = output.logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = batch["labels"]
    if objective == "classification":
        if logits.shape[-1] == 1:
            return (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2)
        return F.cross_entropy(logits, labels, reduction="none")
    shifted, targets = (logits, labels) if objective == "mlm" else (logits[:, :-1], labels[:, 1:])
    token_losses = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=-100)
    token_losses = token_losses.view(targets.shape)
    counts = (targets != -100).sum(1).clamp_min(1)
    return token_losses.sum(1) / counts

