"""How a classification model turns token states into one vector for its head.

MiniLM and MPNet are sentence-embedding checkpoints trained with *mean pooling*; their [CLS]
state carries little signal (in the 2-layer MiniLM it is nearly constant across inputs: logistic
regression on it stays at the majority class, on mean-pooled states it reaches 75% on
movie-sentiment). So for BERT-family encoders the default head pools by the masked mean of the
last hidden states; ``cls`` keeps the model's own head (BERT: dense+tanh pooler over [CLS]; ViT:
[CLS]; Llama: the last real token).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError


class MaskedMeanPooler(nn.Module):
    """Stands in for BERT's pooler: the mean of the last hidden states over real (unmasked) tokens.
    It has no parameters; the attention mask is handed over by a pre-hook on the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[1] != hidden_states.shape[1]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _bert_style_pooler(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The encoder module that owns a BERT-style ``pooler`` (called with the hidden states)."""
    for name, module in model.named_modules():
        pooler = getattr(module, "pooler", None)
        if pooler is not None and type(pooler).__name__.endswith("Pooler") and hasattr(pooler, "dense"):
            return module, name
    return None


def configure_pooling(model: nn.Module, pooling: str, objective: str) -> str:
    """Apply ``head.pooling`` and return what was used (``mean`` or ``cls``)."""
    if objective != "classification":
        return "none"
    found = _bert_style_pooler(model)
    if pooling == "auto":
        pooling = "mean" if found is not None else "cls"
    if pooling == "cls":
        return "cls"
    if found is None:
        raise SlimtuneError(
            f"head.pooling: 'mean' needs a BERT-style encoder with a pooler; model type "
            f"'{getattr(model.config, 'model_type', '?')}' uses its own head (set head.pooling: cls)"
        )
    encoder, _ = found
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def hand_over_mask(module, args, kwargs):
        pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    return "mean"
