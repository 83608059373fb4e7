"""Safe files: atomic writes, and reads of safetensors and JSON only (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from slimtune.errors import SlimtuneError

#: Suffixes of pickle-based formats that slimtune refuses to open.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a temp file in the same directory, fsync, rename: a reader sees the old file or the
    new one, never half of one, even if the process is killed mid-write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def refuse_pickle(path: Path) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise SlimtuneError(f"{path}: refusing to load a pickle-based file; slimtune reads only .safetensors and .json")


def read_json(path: Path) -> Any:
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"{path}: corrupt JSON ({str(exc).splitlines()[0]})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise SlimtuneError(f"{path}: expected a .safetensors file")
    if not path.is_file():
        raise SlimtuneError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise SlimtuneError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None
