"""DP linear probing before DP fine-tuning (DP-LP-FT; Ke et al. 2024, "On the convergence of
differentially-private fine-tuning: to linearly probe or to fully fine-tune?").

With few private examples, DP fine-tuning from a random task head wastes its first noisy steps:
the examples' gradients barely agree (they fit a head that means nothing yet), so the noise
dominates and a high learning rate only random-walks the delta. Fitting the head's last linear
layer first, on the frozen starting model's features, is a convex problem with a few hundred
parameters: full-batch DP gradient descent solves it well at a small ε (0.3-0.5), and fine-tuning
then starts from a head whose gradients point somewhere.

The probe is an ordinary DP mechanism on the same data: each step clips every example's gradient
of the head (closed form for softmax regression: ``(p - y) [x, 1]``), sums over all examples
(sampling rate 1: every example, every step), adds ``N(0, σ²C²)`` once, and takes a gradient step.
Its ``(σ, 1.0, steps)`` joins the accountant's history, so probe and fine-tuning compose in one ε.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.core.features import Section


class LinearProbeSection(Section):
    steps: int = Field(0, ge=0, description="full-batch DP gradient-descent steps of the probe (0: no probe); the noise on the mean gradient is σ·C/N, so it pays off with thousands of examples, not hundreds")
    epsilon: float = Field(0.5, gt=0, description="ε the probe alone may spend (its σ is calibrated to it); the fine-tuning noise is then calibrated so that probe and fine-tuning together stay within privacy.epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="clip norm of each example's head gradient in the probe")
    lr: float = Field(3.0, gt=0, description="gradient-descent step size of the probe (on the mean clipped gradient)")


def probe_target(model: nn.Module, head_names: list[str]) -> nn.Linear:
    """The head's last linear layer (its input is what the probe fits on)."""
    modules = dict(model.named_modules())
    owners = {name.rsplit(".", 1)[0] for name in head_names}
    linears = [m for owner in sorted(owners) if owner in modules for m in modules[owner].modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SlimtuneError("privacy.linear_probe: the model has no linear task head to probe (a causal LM has none); remove linear_probe")
    return linears[-1]


@torch.no_grad()
def training_features(trainer, layer: nn.Linear, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the training split as (inputs of ``layer``, labels), model in eval mode."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach().float()))
    labels: list[torch.Tensor] = []
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        indices = list(range(trainer.rank, len(trainer.rows["train"]), trainer.world_size))
        for start in range(0, len(indices), batch_size):
            batch = trainer.batch("train", indices[start : start + batch_size])
            labels.append(batch.pop("labels"))
            with trainer.autocast():
                trainer.model(**batch)
    finally:
        handle.remove()
        trainer.model.train(was_training)
    features = torch.cat(captured) if captured else torch.zeros(0, layer.in_features)
    return features.reshape(-1, layer.in_features), torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def clipped_gradient_sum(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum over examples of each example's softmax-regression gradient clipped to ``clip``.

    Example i's gradient is ``e_i x_iᵀ`` (weight) and ``e_i`` (bias) with ``e_i = p_i - onehot(y_i)``,
    so its norm is ``|e_i| sqrt(|x_i|² + 1)`` without forming it.
    """
    logits = F.linear(x, weight, bias)
    error = torch.softmax(logits, dim=1) - F.one_hot(y, weight.shape[0]).to(x.dtype)
    squared = x.pow(2).sum(1) + (1.0 if bias is not None else 0.0)
    scale = (clip / (error.norm(dim=1) * squared.sqrt()).clamp_min(1e-12)).clamp(max=1.0)
    scaled = error * scale[:, None]
    return scaled.T @ x, scaled.sum(0) if bias is not None else None


def run_probe(trainer, layer: nn.Linear, cfg: LinearProbeSection, noise_multiplier: float, generator_for, batch_size: int) -> dict[str, Any]:
    """Fit ``layer`` (from zero) by ``cfg.steps`` steps of full-batch DP gradient descent; the
    same noise on every process (``generator_for(step)`` is seeded alike), added once to the
    global clipped sum. Returns what the report shows (nothing computed from un-noised data)."""
    x, y = training_features(trainer, layer, batch_size)
    if len(y) and int(y.max()) >= layer.out_features:
        raise SlimtuneError(f"privacy.linear_probe: label {int(y.max())} does not fit the head's {layer.out_features} outputs")
    count = torch.tensor([float(len(y))])
    if trainer.world_size > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    total = float(count)
    weight = torch.zeros(layer.out_features, layer.in_features)
    bias = torch.zeros(layer.out_features) if layer.bias is not None else None
    std = noise_multiplier * cfg.max_grad_norm
    for step in range(cfg.steps):
        grad_w, grad_b = clipped_gradient_sum(weight, bias, x, y, cfg.max_grad_norm)
        flat = torch.cat([grad_w.flatten()] + ([grad_b] if grad_b is not None else []))
        if trainer.world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if std > 0:
            flat = flat + torch.normal(0.0, std, size=flat.shape, generator=generator_for(step))
        weight -= cfg.lr * flat[: weight.numel()].view_as(weight) / total
        if bias is not None:
            bias -= cfg.lr * flat[weight.numel() :] / total
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
    return {"steps": cfg.steps, "noise_multiplier": noise_multiplier, "max_grad_norm": cfg.max_grad_norm, "lr": cfg.lr, "examples": int(total)}
