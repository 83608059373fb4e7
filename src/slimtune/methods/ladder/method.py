"""The ``lst`` method (Ladder Side-Tuning) and its one registration: attaches the side network,
wraps the backbone layers' forwards, runs the hidden-state cache, and counts its parameters
(see the package docstring for the formulas)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method, register
from slimtune.core.arch import Arch
from slimtune.methods.ladder.cache import HiddenStateCache
from slimtune.methods.ladder.config import LadderConfig
from slimtune.methods.ladder.families import FAMILIES, Family
from slimtune.methods.ladder.side_network import SIDE_ATTRIBUTE, ForwardPass, LadderSideNetwork
from slimtune.core.hooks import Hook


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
        side._pass = ForwardPass()
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

    def _layer_forward(self, side: LadderSideNetwork, family: Family, index: int, ladder_j: int | None, original, hidden_states, *args, **kwargs):
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
