"""Peak training memory, by accounting.

CPU PyTorch keeps no allocator statistics, and process RSS mixes in the interpreter, libraries
and allocator caching, so it cannot compare two fine-tuning methods fairly. The report card's
``train.peak_memory_bytes`` is therefore computed by *accounting* for the tensors a training step
holds, the same way for every method:

``peak_bytes = weights + optimizer_state + grads + activations + extra``

* ``weights`` -- every parameter and buffer of the model (frozen or not), storages counted once.
* ``optimizer_state`` -- every tensor in ``optimizer.state`` after ``optimizer.step()`` (Adam's
  moments and step counters, momentum buffers, ...).
* ``grads`` -- the ``.grad`` tensors of the parameters after ``backward()``.
* ``activations`` -- the tensors autograd *saved for backward* during the tracked forward pass,
  recorded with :func:`torch.autograd.graph.saved_tensors_hooks`. A saved tensor keeps its
  whole storage alive, so each distinct storage counts its full size once. Storages that belong
  to the model's parameters or buffers (a frozen weight saved to compute an input gradient) are
  excluded: they are already in ``weights``. The figure is the peak of the bytes *live* in the
  graph while the context is open (a graph dropped without backward releases its bytes); when
  the context is entered several times in one step (gradient accumulation: each forward is
  back-propagated before the next) the largest is kept.
* ``extra`` -- anything the trainer registers with :meth:`TrainingMemoryMeter.add` (a teacher,
  per-sample gradients of DP-SGD, a side cache), plus Opacus-style ``p.grad_sample`` tensors
  found on the parameters.

This is a documented **upper bound** of the step's live tensor bytes: during backward the saved
activations are freed progressively while gradients are allocated, so the true peak lies
between ``weights + state + max(activations, grads)`` and the sum above; we report the sum because
it is deterministic, needs no allocator, and ranks methods the way their memory actually differs
(frozen backbones save no activations and own no gradients or optimizer state). Temporary
buffers inside kernels, the gradient of the activations in flight, and allocator overhead are
not counted. Activations recomputed by gradient checkpointing are not saved and so not counted
(an inner ``saved_tensors_hooks`` pair -- checkpointing, offloading -- takes precedence over the
meter's, by PyTorch's rule that only the innermost pair applies).

``torch.func`` transforms (``grad``, ``vjp``, ``vmap(grad(...))``) refuse to run while saved-tensor
hooks are active (``RuntimeError: ... don't yet support saved tensor hooks``): a per-sample
gradient engine built on ``torch.func`` must run outside ``track_forward`` and register what it
holds (the per-sample gradients) with :meth:`TrainingMemoryMeter.add`.

The pack hook returns ``tensor.detach()``: the same storage, values and version counter (nothing
is copied, gradients are bit-identical), without the reference cycle that returning the input
tensor object itself would create (see the ``saved_tensors_hooks`` documentation).

:func:`peak_rss_bytes` gives the process's high-water resident set size, for context only.
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtune.measure.params import storage_key, storage_nbytes

__all__ = ["TrainingMemoryMeter", "peak_rss_bytes", "current_rss_bytes", "unique_storage_bytes"]

_Key = tuple[Any, ...]


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _iter_tensors(value)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for value in obj:
            yield from _iter_tensors(value)


def _storages(tensors: Iterable[torch.Tensor]) -> dict[_Key, int]:
    """Map storage key -> storage bytes for the given tensors (each storage once)."""
    out: dict[_Key, int] = {}
    for t in tensors:
        key = storage_key(t)
        if key not in out:
            out[key] = storage_nbytes(t)
    return out


def unique_storage_bytes(obj: Any) -> int:
    """Bytes of the distinct storages behind the tensors in ``obj`` (tensor, module, containers)."""
    return sum(_storages(_iter_tensors(obj)).values())


class _ForwardRecord:
    """Saved-tensor events of one ``track_forward`` context, replayed at ``finish``."""

    def __init__(self) -> None:
        self.open = True
        # (key, nbytes, +1 | -1) in the order they happened while the context was open
        self.events: list[tuple[_Key, int, int]] = []

    def peak(self, exclude: set[_Key]) -> int:
        counts: dict[_Key, int] = {}
        live = 0
        peak = 0
        for key, nbytes, delta in self.events:
            if key in exclude:
                continue
            before = counts.get(key, 0)
            after = before + delta
            counts[key] = after
            if before == 0 and after > 0:
                live += nbytes
                peak = max(peak, live)
            elif before > 0 and after == 0:
                live -= nbytes
        return peak


class TrainingMemoryMeter:
    """Accounts the tensor bytes of one training step (definition in the module docstring).

    Usage around ONE step::

        meter = TrainingMemoryMeter()
        with meter.track_forward():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        meter.finish(model, optimizer)
        meter.peak_bytes      # weights + optimizer_state + grads + activations + extra
        meter.components      # {"weights", "grads", "optimizer_state", "activations", "extra"}
    """

    def __init__(self) -> None:
        self._records: list[_ForwardRecord] = []
        self._extra: dict[str, Any] = {}
        self._components: dict[str, int] | None = None
        self._details: dict[str, int] = {}

    # ---------------------------------------------------------------- forward
    @contextmanager
    def track_forward(self) -> Iterator[TrainingMemoryMeter]:
        """Record every tensor saved for backward inside this context (no copies, same values)."""
        record = _ForwardRecord()
        self._records.append(record)
        self._components = None

        def release(key: _Key, nbytes: int) -> None:
            if record.open:
                record.events.append((key, nbytes, -1))

        def pack(t: torch.Tensor) -> torch.Tensor:
            packed = t.detach()
            if record.open:
                key = storage_key(t)
                nbytes = storage_nbytes(t)
                record.events.append((key, nbytes, +1))
                try:
                    weakref.finalize(packed, release, key, nbytes)
                except TypeError:  # pragma: no cover - tensors support weakrefs
                    pass
            return packed

        def unpack(t: torch.Tensor) -> torch.Tensor:
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield self
        finally:
            record.open = False

    # ---------------------------------------------------------------- extras
    def add(self, name: str, obj: Any) -> None:
        """Count more memory under ``extra``: a tensor, tensors, a module (its weights) or an int of bytes.

        Tensors are resolved at :meth:`finish` (so register a list that the trainer fills), and
        storages already counted as weights/grads/optimizer state are not counted again.
        """
        self._extra[name] = obj
        self._components = None

    # ---------------------------------------------------------------- finish
    def finish(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Account weights, gradients, optimizer state and extras; return :attr:`components`.

        Call after ``backward()`` and ``optimizer.step()`` (before ``zero_grad``), so that the
        gradients and the optimizer state of the step exist.
        """
        params = list(model.parameters())
        weights = _storages([*params, *model.buffers()])
        counted = set(weights)

        grads = {k: v for k, v in _storages(p.grad for p in params if p.grad is not None).items() if k not in counted}
        counted |= grads.keys()

        state: dict[_Key, int] = {}
        if optimizer is not None:
            state = {k: v for k, v in _storages(_iter_tensors(list(optimizer.state.values()))).items() if k not in counted}
        counted |= state.keys()

        details: dict[str, int] = {}
        sample_grads = [g for p in params if isinstance(g := getattr(p, "grad_sample", None), torch.Tensor)]
        extra_sources: list[tuple[str, Any]] = []
        if sample_grads:
            extra_sources.append(("grad_sample", sample_grads))
        extra_sources.extend(self._extra.items())
        extra_total = 0
        for name, obj in extra_sources:
            if isinstance(obj, int) and not isinstance(obj, bool):
                nbytes = int(obj)
            else:
                fresh = {k: v for k, v in _storages(_iter_tensors(obj)).items() if k not in counted}
                counted |= fresh.keys()
                nbytes = sum(fresh.values())
            details[name] = details.get(name, 0) + nbytes
            extra_total += nbytes

        exclude = set(weights)
        activations = max((r.peak(exclude) for r in self._records), default=0)

        self._components = {
            "weights": sum(weights.values()),
            "grads": sum(grads.values()),
            "optimizer_state": sum(state.values()),
            "activations": activations,
            "extra": extra_total,
        }
        self._details = details
        return dict(self._components)

    # ---------------------------------------------------------------- results
    def _require(self) -> dict[str, int]:
        if self._components is None:
            raise RuntimeError("TrainingMemoryMeter: call finish(model, optimizer) after the step first")
        return self._components

    @property
    def components(self) -> dict[str, int]:
        """``{"weights", "grads", "optimizer_state", "activations", "extra"}`` in bytes."""
        return dict(self._require())

    @property
    def extra_details(self) -> dict[str, int]:
        """Bytes of each ``extra`` source by name (``grad_sample`` and the names given to :meth:`add`)."""
        self._require()
        return dict(self._details)

    @property
    def peak_bytes(self) -> int:
        """The documented upper bound: the sum of all :attr:`components`."""
        return int(sum(self._require().values()))

    def reset(self) -> None:
        """Forget everything recorded (to measure another step with the same meter)."""
        self._records.clear()
        self._extra.clear()
        self._components = None
        self._details = {}


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """The current resident set size in bytes (Linux ``/proc/self/statm``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
