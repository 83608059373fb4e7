"""Backbone families for Ladder Side-Tuning: where a backbone's layers are, how a reduced-width side
block of the same type is configured, built, called, and initialised from a magnitude-pruned copy
of its backbone layer (BERT, Llama, ViT). One class per family keeps each architecture's module
names in one place; the side network and the method only talk to :class:`Family`."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import nn

from slimtune.errors import SlimtuneError


class Family(ABC):
    """One backbone architecture, bound to a model: its layers, the module whose output the side
    network replaces, and how side blocks of its own block type are made."""

    name: str

    def __init__(self, model: nn.Module):
        self.model = model
        self.body = model.base_model

    def layers(self) -> nn.ModuleList: ...
    def final_module(self) -> nn.Module: ...
    def _reduce_attention_width(self, side, config, r: int) -> None: ...

    def side_config(self, config, r: int, n_layers: int):
        """A copy of the backbone config at width / r (the number of heads is kept), n_layers blocks."""
        side = copy.deepcopy(config)
        self._reduce_attention_width(side, config, r)
        side.intermediate_size = _reduce(config.intermediate_size, r, "intermediate_size")
        side.num_hidden_layers = n_layers
        return side

    @staticmethod
    def _attention_mask(call_args, call_kwargs):
        """The mask the backbone layer was called with (positionally or by keyword)."""
        return call_args[0] if call_args else call_kwargs.get("attention_mask")

    def build_block(self, side_config, index):
        return type(self.layers()[0])(side_config, layer_idx=index)

    @staticmethod
    @abstractmethod
    def _parts(layer) -> tuple[nn.Linear, ...]:
        """The layer's Linear modules, in the order ``load_pruned`` gives their kept rows/columns."""

    def _copy_pruned(self, block, layer, rows_cols) -> None:
        """Copy the kept rows/columns of each of the layer's Linears into the side block's."""
        for s, d, (rows, cols) in zip(self._parts(layer), self._parts(block), rows_cols):
            d.weight.copy_(s.weight[rows][:, cols])
            if s.bias is not None:
                d.bias.copy_(s.bias[rows])


def _reduce(value: int, r: int, what: str) -> int:
    reduced = value // r
    if reduced < 1 or value % r:
        raise SlimtuneError(f"method.r: {what} {value} is not divisible by r={r} into at least 1; choose a smaller r")
    return reduced


class BertFamily(Family):
    name = "bert"

    def layers(self):
        return self.body.encoder.layer

    def final_module(self):
        return self.body.encoder

    def _reduce_attention_width(self, side, config, r):
        head_dim = config.hidden_size // config.num_attention_heads
        side.hidden_size = config.num_attention_heads * _reduce(head_dim, r, "head dimension")
        _reduce(config.hidden_size, r, "hidden_size")

    def set_attention_dropout(self, side_config, p):
        side_config.attention_probs_dropout_prob = p

    def call_block(self, block, side, call_args, call_kwargs, net):
        return block(side, self._attention_mask(call_args, call_kwargs))

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
        """Kept indices of one layer: rows/columns of each weight (see :meth:`load_pruned`)."""
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

    @staticmethod
    def _norms(layer):
        return layer.attention.output.LayerNorm, layer.output.LayerNorm

    def load_pruned(self, block, layer, keep):
        h, qk, vo, ffn = keep["hidden"], keep["qk"], keep["vo"], keep["ffn"]
        with torch.no_grad():
            self._copy_pruned(block, layer, [(qk, h), (qk, h), (vo, h), (h, vo), (ffn, h), (h, ffn)])
            for s, d in zip(self._norms(layer), self._norms(block)):
                d.weight.copy_(s.weight[h])
                d.bias.copy_(s.bias[h])

    def block_param_count(self, d_s, f_s, side_config):
        return 4 * (d_s * d_s + d_s) + 2 * d_s * f_s + f_s + d_s + 4 * d_s


class LlamaFamily(Family):
    name = "llama"

    def layers(self):
        return self.body.layers

    def final_module(self):
        return self.body.norm

    def _reduce_attention_width(self, side, config, r):
        head_dim = self._heads(config)[2]
        side.head_dim = _reduce(head_dim, r, "head dimension")
        if side.head_dim % 2:
            raise SlimtuneError(f"method.r: the side head dimension {head_dim}/{r} must be even for rotary embeddings; choose another r")
        side.hidden_size = _reduce(config.hidden_size, r, "hidden_size")

    def set_attention_dropout(self, side_config, p):
        side_config.attention_dropout = p

    def call_block(self, block, side, call_args, call_kwargs, net):
        mask = self._attention_mask(call_args, call_kwargs)
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
            self._copy_pruned(block, layer, rows_cols)
            block.input_layernorm.weight.copy_(layer.input_layernorm.weight[h])
            block.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight[h])

    def block_param_count(self, d_s, f_s, side_config):
        heads, kv_heads, k = side_config.num_attention_heads, side_config.num_key_value_heads, side_config.head_dim
        bias = 1 if getattr(side_config, "attention_bias", False) else 0
        attention = d_s * heads * k + 2 * d_s * kv_heads * k + heads * k * d_s + bias * (heads * k + 2 * kv_heads * k + d_s)
        mlp = 3 * d_s * f_s + (bias * (2 * f_s + d_s) if getattr(side_config, "mlp_bias", False) else 0)
        return attention + mlp + 2 * d_s


class ViTFamily(BertFamily):
    """ViT (pre-LayerNorm blocks): like BERT per head, but the residual stream is normalised by the
    backbone's final ``layernorm``, which the side network mirrors with its own LayerNorm."""

    name = "vit"

    def layers(self):
        return self.body.layers

    def final_module(self):
        return self.body.layernorm

    def build_block(self, side_config, index):
        return type(self.layers()[0])(side_config)

    @staticmethod
    def _parts(layer):
        att, mlp = layer.attention, layer.mlp
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.fc1, mlp.fc2

    @staticmethod
    def _norms(layer):
        return layer.layernorm_before, layer.layernorm_after


FAMILIES: dict[str, type[Family]] = {"bert": BertFamily, "llama": LlamaFamily, "vit": ViTFamily}
