"""The side network of Ladder Side-Tuning (``model.lst``): side blocks, gated ladders, the
up-projection, and the per-forward state that carries the side stream from one backbone layer to
the next. Its parameters are the method's trainable parameters (besides the task head)."""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.ladder.config import LadderConfig
from slimtune.methods.ladder.families import Family

SIDE_ATTRIBUTE = "lst"  # the side network's attribute on the model (its parameters: "lst.*")


class ForwardPass:
    """State of one forward pass through backbone + side network."""

    def __init__(self) -> None:
        self.side: torch.Tensor | None = None
        self.position_embeddings = None
        self.replay: dict[int, torch.Tensor] | None = None  # cached backbone outputs per layer
        self.store: list[tuple[int, bytes, int]] = []  # (row, key, length) to cache this pass


class LadderGates(nn.ParameterList):
    """The ladders' gate logits alpha_j (``lst.gates.j``), and the gated merge that reads them.

    The merge is this module's forward so that the gates belong to a module that is called with
    the batch: DP-SGD's generic per-sample rule (a module's forward under vmap) then covers them,
    where gate logits read directly from a list are invisible to it and fall back to a slow
    batched backward with a warning."""

    def __init__(self, n: int, alpha: float, T: float):
        super().__init__([nn.Parameter(torch.full((1,), float(alpha))) for _ in range(n)])
        self.T = T

    __call__ = nn.Module.__call__  # ParameterList refuses to be called; this one has a forward

    def gate(self, j: int) -> torch.Tensor:
        return torch.sigmoid(self[j] / self.T)

    def forward(self, j: int, side: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        g = self.gate(j)
        return g * side + (1 - g) * down


class LadderSideNetwork(nn.Module):
    """Side blocks, ladders, gates, up-projection (and, for Llama, final norm + rotary)."""

    def __init__(self, family: Family, config, side_config, ladder_layers: list[int], cfg: LadderConfig):
        super().__init__()
        d, d_s = config.hidden_size, side_config.hidden_size
        self.ladder_layers = list(ladder_layers)
        self.first_down = nn.Linear(d, d_s, bias=cfg.bias)
        self.downs = nn.ModuleList([nn.Linear(d, d_s, bias=cfg.bias) for _ in ladder_layers])
        self.gates = LadderGates(len(ladder_layers), cfg.gate_alpha, cfg.gate_T)
        self.blocks = nn.ModuleList([family.build_block(side_config, j) for j in range(len(ladder_layers))])
        self.up = nn.Linear(d_s, d, bias=cfg.bias)
        if family.name == "llama":
            from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

            self.final_norm = LlamaRMSNorm(d_s, eps=side_config.rms_norm_eps)
            self.rotary = LlamaRotaryEmbedding(side_config)
        elif family.name == "vit":  # pre-LN: the stream is normalised once at the end, as the backbone's
            self.final_norm = nn.LayerNorm(d_s, eps=side_config.layer_norm_eps)
            self.rotary = None
        else:
            self.final_norm = None
            self.rotary = None
        self._pass = ForwardPass()

    def gate(self, j: int) -> torch.Tensor:
        return self.gates.gate(j)

    def begin(self, embeddings: torch.Tensor) -> None:
        # detach: the embedding output is the backbone's, and gradients stop at the backbone
        self._pass.side = self.first_down(embeddings.detach())

    def merge(self, j: int, backbone_hidden: torch.Tensor) -> torch.Tensor:
        """The gated ladder: g_j * s_{j-1} + (1 - g_j) * down_j(h_{l_j})."""
        return self.gates(j, self._pass.side, self.downs[j](backbone_hidden))

    def finish(self) -> torch.Tensor:
        side = self._pass.side
        if side is None:
            raise SlimtuneError("lst: the side network saw no backbone layer in this forward pass")
        if self.final_norm is not None:
            side = self.final_norm(side)
        self._pass = ForwardPass()  # drop references to this pass
        return self.up(side)
