"""Parameter counts and stored sizes.

Definitions used on every report card:

* ``total`` -- the number of distinct parameter *elements* of a model. Tensors that share
  storage (tied input/output embeddings, aliases registered under two names, views of one
  buffer) are counted once: elements are deduplicated by storage, not by name or by
  ``nn.Parameter`` object. The packed weights of ``torch.ao`` quantised modules (which are not
  ``nn.Parameter``\\ s) are counted too, so an int8 model reports the same ``total`` as its float
  twin.
* ``trainable`` -- distinct elements of the parameters that train: those with
  ``requires_grad`` or, when given, exactly the named ones (names as in
  ``model.named_parameters()``; an alias of a tied tensor may be used).
* ``trainable_pct`` -- ``100 * trainable / base_total``, where ``base_total`` defaults to
  ``total``. Pass the base model's total to express a delta against the model it adapts
  (methods that add parameters grow ``total``; the papers report the ratio to the base).
* ``tensor_bytes`` -- the bytes needed to store a state dict's tensors: ``numel *
  element_size`` per tensor, with tensors that share a storage counted once (the union of the
  byte ranges they cover).
* ``file_bytes`` -- the size on disk of a file, or of every file under a directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError

__all__ = ["param_counts", "tensor_bytes", "file_bytes", "unique_tensor_bytes"]


# --------------------------------------------------------------------------------------------
# storage-level deduplication (shared with memory.py)
# --------------------------------------------------------------------------------------------
def storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """A key identifying the memory that ``t`` lives in (one key per storage).

    Tensors without a real storage (meta tensors, zero-size storages, tensor subclasses that do
    not expose one) get a key of their own, so they never merge with anything else.
    """
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t))
    if ptr == 0 or t.device.type == "meta":
        return ("id", id(t))
    return (t.device.type, t.device.index, ptr)


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the whole storage behind ``t`` (what keeping ``t`` alive keeps alive)."""
    try:
        if t.device.type != "meta":
            return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return int(t.numel() * t.element_size())


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """Half-open byte range ``[start, end)`` of ``t`` inside its storage.

    For a contiguous tensor the length is ``numel * element_size``; for a strided view it is the
    span from its first to its last element.
    """
    es = t.element_size()
    try:
        offset = t.storage_offset()
    except (RuntimeError, NotImplementedError):
        offset = 0
    start = offset * es
    if t.numel() == 0:
        return start, start
    if t.is_contiguous():
        return start, start + t.numel() * es
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + span * es


def _tensor_nbytes(t: torch.Tensor) -> int:
    return int(t.numel() * t.element_size())


def unique_tensor_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """``(numel, bytes)`` of ``tensors`` with shared storages counted once.

    Tensors that are the same view of one storage count once; different views of one storage
    count the union of the byte ranges they cover (elements = union bytes / element size).
    """
    groups: dict[tuple[Any, ...], dict[tuple[Any, ...], torch.Tensor]] = {}
    for t in tensors:
        view = (t.storage_offset() if t.device.type != "meta" else 0, tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(storage_key(t), {}).setdefault(view, t)
    numel = 0
    nbytes = 0
    for views in groups.values():
        ts = list(views.values())
        if len(ts) == 1:
            numel += ts[0].numel()
            nbytes += _tensor_nbytes(ts[0])
            continue
        ranges = sorted(_byte_range(t) for t in ts)
        covered = 0
        cur_start, cur_end = ranges[0]
        for start, end in ranges[1:]:
            if start > cur_end:
                covered += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        covered += cur_end - cur_start
        nbytes += covered
        numel += covered // max(1, ts[0].element_size())
    return numel, nbytes


# --------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------
def _is_quantized_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


def _packed_weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """Weights/biases of ``torch.ao`` quantised modules, which hide them in packed params."""
    for module in model.modules():
        if not _is_quantized_module(module):
            continue
        for attr in ("weight", "bias"):
            getter = getattr(module, attr, None)
            if not callable(getter):
                continue
            try:
                value = getter()
            except (RuntimeError, AttributeError, TypeError):
                continue
            if isinstance(value, torch.Tensor):
                yield value


def param_counts(
    model: nn.Module,
    trainable: Iterable[str] | None = None,
    *,
    base_total: int | None = None,
) -> dict[str, int | float]:
    """Count a model's parameters (see the module docstring for the definitions).

    Args:
        model: any ``nn.Module``.
        trainable: names of the parameters that train; ``None`` means "those with
            ``requires_grad``". Unknown names raise :class:`SlimtuneError`.
        base_total: the denominator of ``trainable_pct`` (default: this model's ``total``).

    Returns:
        ``{"total", "trainable", "trainable_pct", "base_total"}``.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    all_tensors = [p for _, p in named] + list(_packed_weights(model))
    total, _ = unique_tensor_bytes(all_tensors)

    if trainable is None:
        chosen = [p for _, p in named if p.requires_grad]
    else:
        wanted = set(trainable)
        by_name = dict(named)
        unknown = sorted(wanted - by_name.keys())
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise SlimtuneError(
                f"unknown parameter name(s): {shown}; valid names are those of model.named_parameters()"
            )
        chosen = [by_name[n] for n in wanted]
    n_trainable, _ = unique_tensor_bytes(chosen)

    denominator = total if base_total is None else int(base_total)
    if denominator < 0:
        raise SlimtuneError(f"base_total must be >= 0, got {denominator}")
    pct = 100.0 * n_trainable / denominator if denominator else 0.0
    return {"total": int(total), "trainable": int(n_trainable), "trainable_pct": pct, "base_total": denominator}


# --------------------------------------------------------------------------------------------
# stored sizes
# --------------------------------------------------------------------------------------------
def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a (possibly nested) mapping / list / tuple."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _iter_tensors(value)


def tensor_bytes(state_dict: Mapping[str, Any] | Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors of a state dict: ``sum(numel * element_size)``, shared storages once.

    Nested tuples/lists/dicts are walked (the state dict of a dynamically quantised ``Linear``
    stores ``(weight, bias)`` as a tuple); quantised tensors count at their element size (1 byte
    for ``qint8``). Non-tensor entries (dtypes, scales as floats) count 0.
    """
    source = state_dict.values() if isinstance(state_dict, Mapping) else state_dict
    return unique_tensor_bytes(_iter_tensors(list(source)))[1]


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of a file, or the summed size of all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    raise SlimtuneError(f"no such file or directory: {p}")
