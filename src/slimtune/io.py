"""Safe files: atomic writes, and reads of safetensors and JSON only (never pickle)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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
    fsync_dir(path.parent)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Build a directory under a hidden temporary name beside ``out``, then rename it to ``out``
    (which must be absent or empty): ``out`` appears complete or not at all, and a failure leaves
    nothing behind."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (the caller checked); rmdir refuses anything else
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
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


def _pickle_siblings(path: Path) -> list[Path]:
    """Pickle files standing where ``path`` was expected (``delta.bin`` for ``delta.safetensors``)."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f"{path.stem}.*") if p.suffix.lower() in PICKLE_SUFFIXES)


#: Bytes of a file's head that :func:`sniff_pickle` needs.
SNIFF_BYTES = 16
#: The safetensors format caps its JSON header at 100 MB.
SAFETENSORS_MAX_HEADER = 100_000_000


def sniff_pickle(head: bytes) -> str | None:
    """What a file's first bytes say it is, if it is a pickle (raw, or torch.save's zip).

    A safetensors file starts with its header's length (u64, little-endian) and then ``{``; a
    length such as 1152 (0x480) begins with the bytes of a pickle's protocol marker, so the
    safetensors layout is recognised first (a pickle's first 8 bytes read as a length are far
    beyond the format's header cap)."""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return None
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format, which holds a pickle)"
    return None


def read_json(path: Path) -> Any:
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints, deep nesting
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise SlimtuneError(f"{path}: corrupt JSON ({detail})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise SlimtuneError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def check_safetensors(path: Path) -> None:
    """Refuse in one line what is not a readable safetensors file (missing, a pickle under the
    name, a corrupt header), before anything (transformers, safetensors) opens it."""
    from safetensors import safe_open

    path = Path(path)
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise SlimtuneError(f"{path}: expected a .safetensors file")
    if not path.is_file():
        pickles = _pickle_siblings(path)
        if pickles:
            raise SlimtuneError(
                f"{path}: file not found; {pickles[0].name} is there but slimtune refuses pickle-based files "
                "(only .safetensors and .json are read)"
            )
        raise SlimtuneError(f"{path}: file not found")
    with open(path, "rb") as handle:
        kind = sniff_pickle(handle.read(SNIFF_BYTES))
    if kind:
        raise SlimtuneError(f"{path}: this is {kind}, not safetensors; refusing to load it (pickle can run code)")
    try:
        with safe_open(str(path), framework="pt"):  # parses the header only
            pass
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise SlimtuneError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None
