"""Ladder Side-Tuning (Sung, Cho & Bansal, NeurIPS 2022): train a small side network fed by the
frozen backbone's hidden states, so that nothing is back-propagated through the backbone.

The side network (``model.lst``, the only new parameters besides the task head) is made of the
backbone's own block type at a reduced width: a copy of the backbone config with ``hidden_size``,
``intermediate_size`` and the head dimension divided by ``r`` (the number of heads is kept). With
``L`` ladder layers ``l_1 < ... < l_L`` of the backbone (all layers, or a subset when dropping
layers) it computes, in the order of the official T5 code (ytsung/LST ``modeling_t5.py`` and
the code derived from it: the backbone layer's output is merged into the side stream, then the
side block runs)::

    s_0 = down_0(e)                                   # e: the backbone's embedding output
    s_j = side_block_j(g_j * s_{j-1} + (1 - g_j) * down_j(h_{l_j}))     j = 1..L
    g_j = sigmoid(alpha_j / T),  alpha_j = 0 at init (g = 0.5),  T = 0.1
    out = up(norm(s_L))                               # norm: the side's final RMSNorm (Llama only;
                                                      # BERT blocks end in LayerNorm already)

where ``down_j`` are ``Linear(d, d/r)`` "ladders" and ``up`` is ``Linear(d/r, d)``. ``out``
replaces the backbone's final hidden states, so the unchanged HF head reads it: BERT's pooler +
classifier at ``[CLS]``, Llama's ``score`` at the last non-pad token, or ``lm_head`` for causal LM;
on a ViT it replaces the output of the final ``layernorm`` (the classifier reads ``[CLS]``), and
the side ends in its own LayerNorm (pre-LN blocks, like the backbone).
The side attention gets the backbone's own attention mask (padding; causal for Llama) and, for
Llama, rotary embeddings of the reduced head dimension.

Side dropout: hidden dropout follows the backbone config (as in the official code), but dropout on
the side's *attention weights* defaults to 0 (``attention_dropout``). The side keeps all heads, so
its attention maps are as large as the backbone's (B x H x T x T per layer); with attention dropout
PyTorch's CPU SDPA falls back to the math kernel and saves those maps for backward, which would
cost more than all other side activations together (measured on MiniLM-L6, batch 32 x 128: 600 MB
of saved activations with 0.1, see benchmarks/memory.py). With 0 the fused kernel saves none.

How it wraps the model's forward (the protocol's "side network" shape), without the trainer
knowing: ``attach`` overrides the ``forward`` of each backbone layer *instance* (parameter names
stay unchanged) with one that runs the original layer under ``torch.no_grad()`` and then advances
the side stream by one ladder step; a forward hook on the module that produces the final hidden
states (BERT: ``bert.encoder``; Llama: ``model.norm``) swaps in ``up(norm(s_L))``. So
``model(**batch)`` keeps the HF signature and returns ``.loss``/``.logits``, no backbone activation
is saved for backward and no gradient reaches a backbone parameter. A forward pre-hook on the
model keeps the backbone (embeddings and layers) in eval mode even while the model trains: the
backbone is a fixed feature extractor (no dropout), which the hidden-state cache relies on; the
side network, the pooler and the head follow ``model.train()`` as usual.

Initialisation (``init: pruned``, the paper's choice): each side block is a structurally pruned
copy of its backbone layer, by weight magnitude (L1 of the rows/columns that read or write a
dimension): one set of ``d/r`` residual dimensions shared by all side layers (the side stream is
one space), per head the top ``head_dim/r`` query/key dimensions and value/output dimensions, and
the top ``ffn/r`` FFN neurons. For Llama the query/key dimensions are kept in rotary pairs
(``i, i + head_dim/2``), the same pairs for all heads and layers, and the side's rotary embedding
uses those pairs' original frequencies. ``init: random`` uses the HF initialisation instead. The
ladders and the up-projection always start from PyTorch's default ``Linear`` initialisation.

Hidden-state cache (``cache_hidden_states: {max_bytes: N}``): the backbone is frozen and in eval
mode, so its hidden states depend only on the example. They are cached per example, keyed by a
hash of its unpadded token ids (and token type ids), at its unpadded length; a batch whose rows
are all cached skips every backbone layer (the embeddings still run, they are cheap). Only the
ladder layers' states are kept, and only while the model trains; examples that would exceed
``max_bytes`` are computed on the fly every time. Right padding is assumed (rows whose mask is not
a prefix of ones are never cached). The cache lives in process memory and is not counted in
``train.peak_memory_bytes``.

Trainable parameters (closed form, ``expected_param_count``; ``d_s = d/r``, ``f_s = f/r``,
``k = head_dim/r``, ``H``/``H_kv`` heads, ``L`` ladder layers, ``b = 1`` if ``bias`` else 0)::

    ladders + gates + up   (L + 1)(d d_s + b d_s) + L + (d_s d + b d)
    BERT side block        4 (d_s^2 + d_s) + 2 d_s f_s + f_s + d_s + 4 d_s
    Llama side block       d_s H k + 2 d_s H_kv k + H k d_s + 3 d_s f_s + 2 d_s   (+ d_s final norm)
    ViT side block         as BERT (+ 2 d_s: the side's final LayerNorm, pre-LN like the backbone)

Not supported: incremental decoding with a KV cache (``generate``): the side stream has no cache.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Arch, Method, MethodConfig, register
from slimtune.train.hooks import Hook

SIDE_ATTRIBUTE = "lst"  # the side network's attribute on the model (its parameters: "lst.*")


class HiddenStateCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_bytes: int = Field(..., ge=0, description="memory bound of the cached backbone hidden states, in bytes")


class LadderConfig(MethodConfig):
    r: int = Field(8, ge=1, description="reduction factor: side hidden size, FFN size and head dimension are the backbone's / r")
    gate_alpha: float = Field(0.0, description="initial gate logit alpha; the gate is sigmoid(alpha / T) (0 -> 0.5)")
    gate_T: float = Field(0.1, gt=0, description="gate temperature T")
    init: Literal["pruned", "random"] = Field(
        "pruned", description="side blocks from a magnitude-pruned copy of each backbone layer, or random (HF init)"
    )
    ladder_layers: list[int] | None = Field(
        None, description="backbone layers (0-based) that feed a ladder and get a side block; default: all (see drop_every)"
    )
    drop_every: int | None = Field(
        None, ge=2, description="layer dropping: leave out every k-th backbone layer (layers k-1, 2k-1, ...) from the ladders"
    )
    attention_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="dropout on the side blocks' attention weights (hidden dropout follows the backbone config); "
        "0 lets SDPA use its fused kernel, which keeps no attention maps for backward",
    )
    bias: bool = Field(True, description="bias in the ladder down-projections and the final up-projection")
    cache_hidden_states: HiddenStateCacheConfig | None = Field(
        None, description="cache backbone hidden states per example across epochs: {max_bytes: N}"
    )

    @model_validator(mode="after")
    def _one_layer_rule(self) -> LadderConfig:
        if self.ladder_layers is not None and self.drop_every is not None:
            raise ValueError("give either ladder_layers or drop_every, not both")
        if self.ladder_layers is not None and (not self.ladder_layers or len(set(self.ladder_layers)) != len(self.ladder_layers)):
            raise ValueError("ladder_layers must be a non-empty list of distinct layer indices")
        return self


# --------------------------------------------------------------------------------------------
# Backbone families: where the layers are, how a side block is built, pruned and called.
# --------------------------------------------------------------------------------------------


class _Family:
    name: str

    def __init__(self, model: nn.Module):
        self.model = model
        self.body = model.base_model

    def layers(self) -> nn.ModuleList: ...
    def final_module(self) -> nn.Module: ...
    def side_config(self, config, r: int, n_layers: int): ...


def _reduce(value: int, r: int, what: str) -> int:
    reduced = value // r
    if reduced < 1 or value % r:
        raise SlimtuneError(f"method.r: {what} {value} is not divisible by r={r} into at least 1; choose a smaller r")
    return reduced


class _Bert(_Family):
    name = "bert"

    def layers(self):
        return self.body.encoder.layer

    def final_module(self):
        return self.body.encoder

    def side_config(self, config, r, n_layers):
        side = copy.deepcopy(config)
        head_dim = config.hidden_size // config.num_attention_heads
        side.hidden_size = config.num_attention_heads * _reduce(head_dim, r, "head dimension")
        _reduce(config.hidden_size, r, "hidden_size")
        side.intermediate_size = _reduce(config.intermediate_size, r, "intermediate_size")
        side.num_hidden_layers = n_layers
        return side

    def set_attention_dropout(self, side_config, p):
        side_config.attention_probs_dropout_prob = p

    def build_block(self, side_config, index):
        return type(self.layers()[0])(side_config, layer_idx=index)

    def call_block(self, block, side, call_args, call_kwargs, net):
        mask = call_args[0] if call_args else call_kwargs.get("attention_mask")
        return block(side, mask)

    # -- magnitude importance --------------------------------------------------------------
    @staticmethod
    def _parts(layer):
        att = layer.attention
        return att.self.query, att.self.key, att.self.value, att.output.dense, layer.intermediate.dense, layer.output.dense

    def hidden_importance(self, layer):
        q, k, v, o, fin, fout = self._parts(layer)
        reads = sum(m.weight.abs().sum(0) for m in (q, k, v, fin))
        writes = o.weight.abs().sum(1) + fout.weight.abs().sum(1)
        return reads + writes

    def select(self, layer, config, side_config, hidden):
        """Kept indices of one layer: rows/columns of each weight (see :func:`_prune_bert`)."""
        q, k, v, o, fin, fout = self._parts(layer)
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        kept_dim = side_config.hidden_size // heads
        qk = (q.weight.abs().sum(1) + k.weight.abs().sum(1)).view(heads, head_dim)
        vo = (v.weight.abs().sum(1) + o.weight.abs().sum(0)).view(heads, head_dim)
        offsets = (torch.arange(heads) * head_dim)[:, None]
        qk_rows = (qk.topk(kept_dim, dim=1).indices.sort(dim=1).values + offsets).flatten()
        vo_rows = (vo.topk(kept_dim, dim=1).indices.sort(dim=1).values + offsets).flatten()
        neurons = (fin.weight.abs().sum(1) + fout.weight.abs().sum(0)).topk(side_config.intermediate_size).indices.sort().values
        return {"hidden": hidden, "qk": qk_rows, "vo": vo_rows, "ffn": neurons}

    def load_pruned(self, block, layer, keep):
        h, qk, vo, ffn = keep["hidden"], keep["qk"], keep["vo"], keep["ffn"]
        src, dst = self._parts(layer), self._parts(block)
        rows_cols = [(qk, h), (qk, h), (vo, h), (h, vo), (ffn, h), (h, ffn)]
        with torch.no_grad():
            for s, d, (rows, cols) in zip(src, dst, rows_cols):
                d.weight.copy_(s.weight[rows][:, cols])
                d.bias.copy_(s.bias[rows])
            for s, d in ((layer.attention.output.LayerNorm, block.attention.output.LayerNorm), (layer.output.LayerNorm, block.output.LayerNorm)):
                d.weight.copy_(s.weight[h])
                d.bias.copy_(s.bias[h])

    def block_param_count(self, d_s, f_s, side_config):
        return 4 * (d_s * d_s + d_s) + 2 * d_s * f_s + f_s + d_s + 4 * d_s


class _Llama(_Family):
    name = "llama"

    def layers(self):
        return self.body.layers

    def final_module(self):
        return self.body.norm

    def side_config(self, config, r, n_layers):
        side = copy.deepcopy(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        side.head_dim = _reduce(head_dim, r, "head dimension")
        if side.head_dim % 2:
            raise SlimtuneError(f"method.r: the side head dimension {head_dim}/{r} must be even for rotary embeddings; choose another r")
        side.hidden_size = _reduce(config.hidden_size, r, "hidden_size")
        side.intermediate_size = _reduce(config.intermediate_size, r, "intermediate_size")
        side.num_hidden_layers = n_layers
        return side

    def set_attention_dropout(self, side_config, p):
        side_config.attention_dropout = p

    def build_block(self, side_config, index):
        return type(self.layers()[0])(side_config, layer_idx=index)

    def call_block(self, block, side, call_args, call_kwargs, net):
        mask = call_args[0] if call_args else call_kwargs.get("attention_mask")
        position_ids = call_kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(side.shape[1], device=side.device)[None]
        if net._pass.position_embeddings is None:
            net._pass.position_embeddings = net.rotary(side, position_ids)
        # The side stream keeps no KV cache: pass none, so the backbone's cache is never touched.
        return block(side, attention_mask=mask, position_ids=position_ids, position_embeddings=net._pass.position_embeddings, cache=None, use_cache=False)

    # -- magnitude importance --------------------------------------------------------------
    @staticmethod
    def _parts(layer):
        a, m = layer.self_attn, layer.mlp
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj

    def hidden_importance(self, layer):
        q, k, v, o, g, u, dn = self._parts(layer)
        return sum(m.weight.abs().sum(0) for m in (q, k, v, g, u)) + o.weight.abs().sum(1) + dn.weight.abs().sum(1)

    def _heads(self, config):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_attention_heads, config.num_key_value_heads, head_dim

    def qk_pair_importance(self, layer, config):
        """Importance of each rotary pair (i, i + head_dim/2), summed over all query/key heads."""
        q, k, *_ = self._parts(layer)
        heads, kv_heads, head_dim = self._heads(config)
        per_dim = q.weight.abs().sum(1).view(heads, head_dim).sum(0) + k.weight.abs().sum(1).view(kv_heads, head_dim).sum(0)
        return per_dim[: head_dim // 2] + per_dim[head_dim // 2 :]

    def select(self, layer, config, side_config, hidden, pairs):
        q, k, v, o, g, u, dn = self._parts(layer)
        heads, kv_heads, head_dim = self._heads(config)
        kept_dim = side_config.head_dim
        qk_dims = torch.cat([pairs, pairs + head_dim // 2])
        group = heads // kv_heads
        vo = v.weight.abs().sum(1).view(kv_heads, head_dim) + o.weight.abs().sum(0).view(kv_heads, group, head_dim).sum(1)
        vo_dims = vo.topk(kept_dim, dim=1).indices.sort(dim=1).values  # per kv head
        q_rows = torch.cat([h * head_dim + qk_dims for h in range(heads)])
        k_rows = torch.cat([h * head_dim + qk_dims for h in range(kv_heads)])
        v_rows = torch.cat([h * head_dim + vo_dims[h] for h in range(kv_heads)])
        o_cols = torch.cat([h * head_dim + vo_dims[h // group] for h in range(heads)])
        neurons = (g.weight.abs().sum(1) + u.weight.abs().sum(1) + dn.weight.abs().sum(0)).topk(side_config.intermediate_size).indices.sort().values
        return {"hidden": hidden, "q": q_rows, "k": k_rows, "v": v_rows, "o": o_cols, "ffn": neurons, "rope_pairs": pairs}

    def load_pruned(self, block, layer, keep):
        h = keep["hidden"]
        rows_cols = [(keep["q"], h), (keep["k"], h), (keep["v"], h), (h, keep["o"]), (keep["ffn"], h), (keep["ffn"], h), (h, keep["ffn"])]
        with torch.no_grad():
            for s, d, (rows, cols) in zip(self._parts(layer), self._parts(block), rows_cols):
                d.weight.copy_(s.weight[rows][:, cols])
                if s.bias is not None:
                    d.bias.copy_(s.bias[rows])
            block.input_layernorm.weight.copy_(layer.input_layernorm.weight[h])
            block.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight[h])

    def block_param_count(self, d_s, f_s, side_config):
        heads, kv_heads, k = side_config.num_attention_heads, side_config.num_key_value_heads, side_config.head_dim
        bias = 1 if getattr(side_config, "attention_bias", False) else 0
        attention = d_s * heads * k + 2 * d_s * kv_heads * k + heads * k * d_s + bias * (heads * k + 2 * kv_heads * k + d_s)
        mlp = 3 * d_s * f_s + (bias * (2 * f_s + d_s) if getattr(side_config, "mlp_bias", False) else 0)
        return attention + mlp + 2 * d_s


class _ViT(_Bert):
    """ViT (pre-LayerNorm blocks): like BERT per head, but the residual stream is normalised by the
    backbone's final ``layernorm``, which the side network mirrors with its own LayerNorm."""

    name = "vit"

    def layers(self):
        return self.body.layers

    def final_module(self):
        return self.body.layernorm

    def build_block(self, side_config, index):
        return type(self.layers()[0])(side_config)

    def call_block(self, block, side, call_args, call_kwargs, net):
        mask = call_args[0] if call_args else call_kwargs.get("attention_mask")
        return block(side, mask)

    @staticmethod
    def _parts(layer):
        att, mlp = layer.attention, layer.mlp
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.fc1, mlp.fc2

    def load_pruned(self, block, layer, keep):
        h, qk, vo, ffn = keep["hidden"], keep["qk"], keep["vo"], keep["ffn"]
        rows_cols = [(qk, h), (qk, h), (vo, h), (h, vo), (ffn, h), (h, ffn)]
        with torch.no_grad():
            for s, d, (rows, cols) in zip(self._parts(layer), self._parts(block), rows_cols):
                d.weight.copy_(s.weight[rows][:, cols])
                d.bias.copy_(s.bias[rows])
            for s, d in ((layer.layernorm_before, block.layernorm_before), (layer.layernorm_after, block.layernorm_after)):
                d.weight.copy_(s.weight[h])
                d.bias.copy_(s.bias[h])


FAMILIES = {"bert": _Bert, "llama": _Llama, "vit": _ViT}


# --------------------------------------------------------------------------------------------
# The side network and the per-forward state.
# --------------------------------------------------------------------------------------------


class _Pass:
    """State of one forward pass through backbone + side network."""

    def __init__(self) -> None:
        self.side: torch.Tensor | None = None
        self.position_embeddings = None
        self.replay: dict[int, torch.Tensor] | None = None  # cached backbone outputs per layer
        self.store: list[tuple[int, bytes, int]] = []  # (row, key, length) to cache this pass


class LadderSideNetwork(nn.Module):
    """Side blocks, ladders, gates, up-projection (and, for Llama, final norm + rotary)."""

    def __init__(self, family: _Family, config, side_config, ladder_layers: list[int], cfg: LadderConfig):
        super().__init__()
        d, d_s = config.hidden_size, side_config.hidden_size
        self.ladder_layers = list(ladder_layers)
        self.gate_T = cfg.gate_T
        self.first_down = nn.Linear(d, d_s, bias=cfg.bias)
        self.downs = nn.ModuleList([nn.Linear(d, d_s, bias=cfg.bias) for _ in ladder_layers])
        self.gates = nn.ParameterList([nn.Parameter(torch.full((1,), float(cfg.gate_alpha))) for _ in ladder_layers])
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
        self._pass = _Pass()

    def gate(self, j: int) -> torch.Tensor:
        return torch.sigmoid(self.gates[j] / self.gate_T)

    def begin(self, embeddings: torch.Tensor) -> None:
        # detach: the embedding output is the backbone's, and gradients stop at the backbone
        self._pass.side = self.first_down(embeddings.detach())

    def merge(self, j: int, backbone_hidden: torch.Tensor) -> torch.Tensor:
        """The gated ladder: g_j * s_{j-1} + (1 - g_j) * down_j(h_{l_j})."""
        g = self.gate(j)
        return g * self._pass.side + (1 - g) * self.downs[j](backbone_hidden)

    def finish(self) -> torch.Tensor:
        side = self._pass.side
        if side is None:
            raise SlimtuneError("lst: the side network saw no backbone layer in this forward pass")
        if self.final_norm is not None:
            side = self.final_norm(side)
        self._pass = _Pass()  # drop references to this pass
        return self.up(side)


# --------------------------------------------------------------------------------------------
# The hidden-state cache.
# --------------------------------------------------------------------------------------------


class HiddenStateCache:
    """Backbone hidden states of the ladder layers per example (unpadded), within ``max_bytes``."""

    def __init__(self, max_bytes: int, layers: list[int]):
        self.max_bytes = max_bytes
        self.layers = layers
        self.entries: dict[bytes, dict[int, torch.Tensor]] = {}
        self.bytes = 0
        self.hits = 0  # batches served entirely from the cache
        self.misses = 0

    @staticmethod
    def row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None) -> list[tuple[bytes, int] | None]:
        """One (key, length) per row, or None for a row that is not right-padded."""
        keys: list[tuple[bytes, int] | None] = []
        for i in range(input_ids.shape[0]):
            length = int(attention_mask[i].sum()) if attention_mask is not None else input_ids.shape[1]
            if attention_mask is not None and not bool(attention_mask[i, :length].all()):
                keys.append(None)
                continue
            digest = hashlib.sha256(input_ids[i, :length].to(torch.int64).numpy().tobytes())
            if token_type_ids is not None:
                digest.update(token_type_ids[i, :length].to(torch.int64).numpy().tobytes())
            keys.append((digest.digest(), length))
        return keys

    def lookup(self, keys, seq_len: int, hidden_size: int) -> dict[int, torch.Tensor] | None:
        if any(k is None or k[0] not in self.entries for k in keys):
            return None
        replay = {}
        for layer in self.layers:
            first = self.entries[keys[0][0]][layer]
            padded = first.new_zeros(len(keys), seq_len, hidden_size)
            for row, (key, length) in enumerate(keys):
                padded[row, :length] = self.entries[key][layer]
            replay[layer] = padded
        return replay

    def admit(self, keys, hidden_size: int) -> list[tuple[int, bytes, int]]:
        """Rows of this batch to store, within the bound (4 bytes per value, an upper bound)."""
        admitted, planned, seen = [], 0, set()
        for row, key in enumerate(keys):
            if key is None or key[0] in self.entries or key[0] in seen:
                continue
            need = key[1] * hidden_size * 4 * len(self.layers)
            if self.bytes + planned + need > self.max_bytes:
                continue
            admitted.append((row, key[0], key[1]))
            planned += need
            seen.add(key[0])
        return admitted

    def store(self, admitted, layer: int, hidden: torch.Tensor) -> None:
        for row, key, length in admitted:
            value = hidden[row, :length].detach().clone()
            self.entries.setdefault(key, {})[layer] = value
            self.bytes += value.numel() * value.element_size()


# --------------------------------------------------------------------------------------------
# The method.
# --------------------------------------------------------------------------------------------


@register
class LadderSideTuning(Method):
    name = "lst"
    description = "Ladder Side-Tuning: a small side network on gated ladders from the frozen backbone (no backprop through it)"
    paper = "Sung, Cho & Bansal 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning"
    Config = LadderConfig

    # -- attach -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, arch: Arch) -> None:
        cfg: LadderConfig = self.config
        if arch.family not in FAMILIES:
            raise SlimtuneError(f"method lst: model type '{arch.model_type}' is not supported; valid families: {', '.join(FAMILIES)}")
        if hasattr(model, SIDE_ATTRIBUTE):
            raise SlimtuneError("method lst: the model already has a side network")
        family = FAMILIES[arch.family](model)
        config = model.config
        layers = family.layers()
        n = len(layers)
        ladder = self._ladder_layers(n)
        side_config = family.side_config(config, cfg.r, len(ladder))
        family.set_attention_dropout(side_config, cfg.attention_dropout)
        side = LadderSideNetwork(family, config, side_config, ladder, cfg)
        dtype = next(model.parameters()).dtype
        side.to(dtype)
        self.selection: list[dict[str, torch.Tensor]] = []
        if cfg.init == "pruned":
            self._prune_into(side, family, config, side_config, ladder)
        model.add_module(SIDE_ATTRIBUTE, side)

        self.family = family.name
        self.ladder = ladder
        self.side_config = side_config
        self.cache = HiddenStateCache(cfg.cache_hidden_states.max_bytes, ladder) if cfg.cache_hidden_states else None
        self._wrapped = [f"{self._layer_prefix(model, layers)}.{i}" for i in range(n)]
        self._backbone_modules = [m for name, m in model.base_model.named_modules() if not name.startswith("pooler")]
        ladder_index = {layer: j for j, layer in enumerate(ladder)}
        for i, layer in enumerate(layers):
            layer.forward = functools.partial(self._layer_forward, side, family, i, ladder_index.get(i), layer.forward)
        self._handles = [
            model.register_forward_pre_hook(functools.partial(self._model_pre_hook, side), with_kwargs=True),
            family.final_module().register_forward_hook(functools.partial(self._final_hook, side)),
        ]

    def _ladder_layers(self, n: int) -> list[int]:
        cfg: LadderConfig = self.config
        if cfg.ladder_layers is not None:
            bad = [i for i in cfg.ladder_layers if not 0 <= i < n]
            if bad:
                raise SlimtuneError(f"method.ladder_layers: layer {bad[0]} does not exist; the backbone has layers 0..{n - 1}")
            return sorted(cfg.ladder_layers)
        if cfg.drop_every is not None:
            kept = [i for i in range(n) if (i + 1) % cfg.drop_every]
            if not kept:
                raise SlimtuneError(f"method.drop_every: {cfg.drop_every} drops every layer")
            return kept
        return list(range(n))

    @staticmethod
    def _layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
        return next(name for name, m in model.named_modules() if m is layers)

    def _prune_into(self, side, family, config, side_config, ladder) -> None:
        layers = family.layers()
        with torch.no_grad():
            hidden_score = sum(family.hidden_importance(layers[i]).float() for i in ladder)
            hidden = hidden_score.topk(side_config.hidden_size).indices.sort().values
            extra: dict[str, Any] = {}
            if family.name == "llama":
                pair_score = sum(family.qk_pair_importance(layers[i], config).float() for i in ladder)
                pairs = pair_score.topk(side_config.head_dim // 2).indices.sort().values
                extra["pairs"] = pairs
                inv_freq = family.body.rotary_emb.inv_freq[pairs].clone()
                side.rotary.inv_freq = inv_freq  # the kept pairs rotate at their original frequencies
                side.rotary.original_inv_freq = inv_freq.clone()
                side.final_norm.weight.copy_(family.body.norm.weight[hidden])
            if family.name == "vit":
                side.final_norm.weight.copy_(family.body.layernorm.weight[hidden])
                side.final_norm.bias.copy_(family.body.layernorm.bias[hidden])
            for j, i in enumerate(ladder):
                keep = family.select(layers[i], config, side_config, hidden, **extra)
                family.load_pruned(side.blocks[j], layers[i], keep)
                self.selection.append(keep)

    # -- the wrapped forward --------------------------------------------------------------------
    def _model_pre_hook(self, side: LadderSideNetwork, module, args, kwargs):
        for m in self._backbone_modules:  # the frozen backbone never uses dropout (see docstring)
            m.training = False
        side._pass = _Pass()
        if self.cache is None:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            return None
        keys = HiddenStateCache.row_keys(input_ids, kwargs.get("attention_mask"), kwargs.get("token_type_ids"))
        replay = self.cache.lookup(keys, input_ids.shape[1], self.model_hidden_size(module))
        if replay is not None:
            self.cache.hits += 1
            side._pass.replay = replay
        else:
            self.cache.misses += 1
            if side.training:
                side._pass.store = self.cache.admit(keys, self.model_hidden_size(module))
        return None

    @staticmethod
    def model_hidden_size(model) -> int:
        return model.config.hidden_size

    def _layer_forward(self, side: LadderSideNetwork, family: _Family, index: int, ladder_j: int | None, original, hidden_states, *args, **kwargs):
        state = side._pass
        if index == 0:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise SlimtuneError("method lst: incremental decoding with a KV cache is not supported; call with use_cache=False")
            side.begin(hidden_states)
            state = side._pass
        if state.replay is not None:
            output = state.replay.get(index, hidden_states)
        else:
            with torch.no_grad():
                output = original(hidden_states, *args, **kwargs)
        if ladder_j is not None:
            hidden = output[0] if isinstance(output, tuple) else output
            if state.store and self.cache is not None:
                self.cache.store(state.store, index, hidden)
            merged = side.merge(ladder_j, hidden)
            block_out = family.call_block(side.blocks[ladder_j], merged, args, kwargs, side)
            state.side = block_out[0] if isinstance(block_out, tuple) else block_out
        return output

    def _final_hook(self, side: LadderSideNetwork, module, args, output):
        side_out = side.finish()
        if isinstance(output, torch.Tensor):
            return side_out
        output["last_hidden_state"] = side_out
        return output

    # -- detach (tests, benchmarks) ----------------------------------------------------------------
    def detach(self, model: nn.Module) -> None:
        """Undo ``attach``: restore the layers' forwards, remove hooks and the side network."""
        for handle in self._handles:
            handle.remove()
        for name in self._wrapped:
            layer = model.get_submodule(name)
            if "forward" in layer.__dict__:
                del layer.forward
        delattr(model, SIDE_ATTRIBUTE)

    # -- protocol -----------------------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        prefix = SIDE_ATTRIBUTE + "."
        return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}

    def claims(self, model: nn.Module) -> set[str]:
        """The backbone layers whose forward it takes over, and its own parameters."""
        return set(self._wrapped) | set(self.trainable_parameters(model))

    def expected_param_count(self, model: nn.Module) -> int:
        family = FAMILIES[self.family](model)
        d = model.config.hidden_size
        d_s, f_s = self.side_config.hidden_size, self.side_config.intermediate_size
        b = 1 if self.config.bias else 0
        n_ladders = len(self.ladder)
        ladders = (n_ladders + 1) * (d * d_s + b * d_s) + n_ladders + (d_s * d + b * d)
        blocks = n_ladders * family.block_param_count(d_s, f_s, self.side_config)
        final_norm = {"llama": d_s, "vit": 2 * d_s}.get(self.family, 0)
        return ladders + blocks + final_norm

    def cache_stats(self) -> dict[str, int] | None:
        if self.cache is None:
            return None
        return {"entries": len(self.cache.entries), "bytes": self.cache.bytes, "hit_batches": self.cache.hits, "miss_batches": self.cache.misses}

    def hooks(self) -> list[Any]:
        return [_CacheReport(self)] if self.config.cache_hidden_states is not None else []


class _CacheReport(Hook):
    """Puts the hidden-state cache's figures in report.json (section ``lst_cache``)."""

    name = "lst_cache"

    def __init__(self, method: LadderSideTuning):
        self.method = method

    def report(self) -> dict[str, Any]:
        return self.method.cache_stats() or {}
