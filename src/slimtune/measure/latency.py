"""Inference latency of one forward pass.

Definition used on the report card: the wall-clock time of ``model(**inputs)`` for one batch,
measured with ``time.perf_counter`` under ``torch.inference_mode()`` with the model in eval mode
and ``torch.set_num_threads(threads)``, after ``warmup`` untimed calls; ``latency_ms_median`` and
``latency_ms_p90`` summarise ``repeats`` timed calls (p90 by linear interpolation between order
statistics, as ``numpy.percentile`` does). The latency is per *batch*; divide by ``batch_size`` for
a per-example figure. The thread count and every module's train/eval flag are restored afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError

__all__ = ["measure_latency", "eval_mode", "call_model", "batch_size_of", "percentile"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own flag afterwards.

    Restoring per module (not ``model.train(was_training)``) keeps deliberately frozen
    submodules, e.g. a backbone kept in eval mode under a training side network, as they were.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def call_model(model: nn.Module, inputs: Mapping[str, Any] | torch.Tensor | tuple | list) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


_PRIMARY_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x")


def _primary_tensor(inputs: Mapping[str, Any] | torch.Tensor | tuple | list) -> tuple[str | None, torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return None, inputs
    if isinstance(inputs, Mapping):
        for key in _PRIMARY_KEYS:
            value = inputs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return key, value
        items = inputs.items()
    else:
        items = ((None, v) for v in inputs)
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return key, value
    raise SlimtuneError("inputs hold no tensor with a batch dimension")


def batch_size_of(inputs: Mapping[str, Any] | torch.Tensor | tuple | list) -> int:
    """The batch size: dim 0 of ``input_ids`` / ``inputs_embeds`` / ``pixel_values`` / first tensor."""
    return int(_primary_tensor(inputs)[1].shape[0])


def _seq_len_of(inputs: Mapping[str, Any] | torch.Tensor | tuple | list) -> int | None:
    """Tokens per example for token inputs (``input_ids``: dim 1, ``inputs_embeds``: dim 1), else None."""
    key, tensor = _primary_tensor(inputs)
    if key in ("input_ids", "inputs_embeds") and tensor.dim() >= 2:
        return int(tensor.shape[1])
    if key is None and tensor.dim() == 2 and not tensor.is_floating_point():
        return int(tensor.shape[1])
    return None


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (``numpy.percentile`` default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_latency(
    model: nn.Module,
    inputs: Mapping[str, Any] | torch.Tensor | tuple | list,
    *,
    threads: int = 2,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """Time ``repeats`` forward passes of ``model`` on one batch (see the module docstring).

    Returns ``latency_ms_median``, ``latency_ms_p90``, ``latency_ms_min``, ``latency_ms_mean``,
    ``batch_size``, ``seq_len`` (``None`` for non-token inputs), ``threads``, ``warmup`` and
    ``repeats``.
    """
    if threads < 1:
        raise SlimtuneError(f"threads must be >= 1, got {threads}")
    if repeats < 1:
        raise SlimtuneError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise SlimtuneError(f"warmup must be >= 0, got {warmup}")
    batch_size = batch_size_of(inputs)
    seq_len = _seq_len_of(inputs)

    old_threads = torch.get_num_threads()
    times_ms: list[float] = []
    try:
        torch.set_num_threads(threads)
        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                call_model(model, inputs)
            for _ in range(repeats):
                start = time.perf_counter()
                call_model(model, inputs)
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(old_threads)

    return {
        "latency_ms_median": percentile(times_ms, 50.0),
        "latency_ms_p90": percentile(times_ms, 90.0),
        "latency_ms_min": min(times_ms),
        "latency_ms_mean": sum(times_ms) / len(times_ms),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
    }
