"""Small helpers around Hugging Face models shared by the model registry, loading and the one-time
conversions: what a model directory is, silencing transformers' logs for one call, the pad-token
rule, the first line of a library's error, and eager attention for a while (FLOP counting and
double backward). A module of their own so that loading and conversion need not import each other; torch and
transformers are imported only when a helper runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimtune.errors import SlimtuneError

if TYPE_CHECKING:
    import torch
    from torch import nn
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


def _hf_configs(model: nn.Module) -> list[Any]:
    """Distinct Hugging Face configs (and their sub-configs) reachable from ``model``'s modules."""
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run every Hugging Face (sub)model inside ``model`` with eager attention.

    transformers 5 reads ``config._attn_implementation`` at every forward, so setting the
    internal field on each reachable config switches the backend without reloading; the old
    values are restored on exit. Non-HF modules are left alone.
    """
    saved: list[tuple[Any, Any]] = []
    for cfg in _hf_configs(model):
        if hasattr(cfg, "_attn_implementation_internal"):
            saved.append((cfg, cfg._attn_implementation_internal))
            cfg._attn_implementation_internal = "eager"
    try:
        yield model
    finally:
        for cfg, value in saved:
            cfg._attn_implementation_internal = value
