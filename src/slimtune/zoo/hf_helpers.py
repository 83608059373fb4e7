"""Small helpers around Hugging Face models shared by the model registry, loading and the one-time
conversions: what a model directory is, silencing transformers' logs for one call, the pad-token
rule, and the first line of a library's error. A module of their own so that loading and conversion need not import each other; torch and
transformers are imported only when a helper runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from slimtune.errors import SlimtuneError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: it has a config.json."""
    return (path / "config.json").is_file()


def float32() -> torch.dtype:
    import torch

    return torch.float32


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (errors still raise) for one call."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder-only tokenizers often lack a pad token; reuse eos (masked out by attention)."""
    if tokenizer.pad_token is not None:
        return
    for fallback in (tokenizer.eos_token, tokenizer.sep_token, tokenizer.unk_token):
        if fallback is not None:
            tokenizer.pad_token = fallback
            return
    raise SlimtuneError(
        f"tokenizer of {tokenizer.name_or_path} has no pad, eos, sep or unk token to pad with"
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

