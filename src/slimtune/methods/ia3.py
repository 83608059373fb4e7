"""(IA)^3 (Liu et al., 2022): learned vectors that rescale the keys, the values and the FFN's
intermediate activations, ``k -> l_k * k``, ``v -> l_v * v``, ``a -> l_ff * a``, all
initialised to ones (training starts from the pre-trained function).

Targets follow peft's ``IA3Config`` defaults, so peft users get the same model: BERT ``key``,
``value`` (outputs scaled) and ``output.dense`` (input scaled: the FFN activation that feeds the
FFN output layer); Llama ``k_proj``, ``v_proj``, ``down_proj``; ViT ``k_proj``, ``v_proj``,
``mlp.fc2``. Note that on BERT the suffix ``output.dense`` also matches the attention's
``attention.output.dense`` (peft matches suffixes the same way), whose input (the attention
context) is then rescaled too: 16,128 vectors entries on MiniLM-L6, equal to peft's count
(checked in the tests). For the paper's exact three vectors use
``targets: [key, value, 're:.*layer\\.\\d+\\.output\\.dense']`` with the same ``feedforward``.

The scaling is done by hooks on the frozen linears (a forward hook scales the output, a forward
pre-hook the input), so each target stays an ``nn.Linear``. Being diagonal, it merges exactly:
``W <- diag(l) W, b <- l * b`` for scaled outputs, ``W <- W diag(l)`` for scaled inputs;
unmerge restores the kept original weights bit for bit.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.adapter import find_modules_by_name, is_linear_or_wrapped
from slimtune.methods.base import Method, MethodConfig, register
from slimtune.core.arch import Arch, pattern_matches

#: (targets, feedforward targets) per family, as peft's IA3 defaults (ViT/MPNet by analogy).
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "mpnet": (["k", "v", "output.dense"], ["output.dense"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "vit": (["k_proj", "v_proj", "mlp.fc2"], ["mlp.fc2"]),
}

VECTOR = "ia3_l"


class IA3Config(MethodConfig):
    targets: list[str] | None = Field(
        None,
        description="linears whose output (or, for feedforward ones, input) is rescaled; default as peft: "
        "BERT key/value/output.dense, Llama k_proj/v_proj/down_proj, ViT k_proj/v_proj/mlp.fc2",
    )
    feedforward: list[str] | None = Field(
        None,
        description="subset of targets whose *input* is rescaled (the FFN activation); default as peft: "
        "BERT output.dense, Llama down_proj, ViT mlp.fc2; empty when targets are given without it",
    )


class IA3Site:
    """One rescaled linear: its vector, whether it scales the input, its hook and merge state."""

    def __init__(self, linear: nn.Linear, scales_input: bool):
        self.linear = linear
        self.scales_input = scales_input
        size = linear.in_features if scales_input else linear.out_features
        linear.register_parameter(VECTOR, nn.Parameter(torch.ones(size, dtype=linear.weight.dtype)))
        self.original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # while merged
        self._hook()

    def _hook(self) -> None:
        if self.scales_input:
            self.handle = self.linear.register_forward_pre_hook(self._scale_input)
        else:
            self.handle = self.linear.register_forward_hook(self._scale_output)

    @property
    def vector(self) -> nn.Parameter:
        return getattr(self.linear, VECTOR)

    def _scale_input(self, module, args):
        return (args[0] * self.vector, *args[1:])

    def _scale_output(self, module, args, output):
        return output * self.vector

    def merge(self) -> None:
        if self.original is not None:
            return
        linear, vector = self.linear, self.vector.detach()
        with torch.no_grad():
            self.original = (linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone())
            if self.scales_input:
                linear.weight.mul_(vector[None, :])
            else:
                linear.weight.mul_(vector[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(vector)
        self.handle.remove()  # merged: the linear runs exactly as a plain base linear

    def unmerge(self) -> None:
        if self.original is None:
            return
        weight, bias = self.original
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias is not None:
                self.linear.bias.copy_(bias)
        self.original = None
        self._hook()


@register
class IA3(Method):
    name = "ia3"
    description = "learned rescaling of keys, values and FFN activations (vectors init 1; mergeable)"
    paper = "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
    Config = IA3Config
    mergeable = True

    def attach(self, model: nn.Module, arch: Arch) -> None:
        targets, feedforward = self.config.targets, self.config.feedforward
        if targets is None:
            if arch.family not in IA3_DEFAULTS:
                raise SlimtuneError(f"method ia3: no default targets for model type '{arch.model_type}'; set method.targets")
            default_targets, default_ff = IA3_DEFAULTS[arch.family]
            targets = default_targets
            feedforward = default_ff if feedforward is None else feedforward
        feedforward = feedforward or []
        for pattern in feedforward:
            if not any(pattern_matches(pattern, t) or pattern == t for t in targets):
                raise SlimtuneError(f"method.feedforward: '{pattern}' is not among method.targets {targets}")
        self.sites: dict[str, IA3Site] = {}
        self.claimed: list[str] = []
        for name, linear in find_modules_by_name(model, targets, "method.targets"):
            self.claimed.append(name)
            if not is_linear_or_wrapped(linear, name):
                continue  # wrapped by an earlier method: claims() names it and Delta reports the conflict
            scales_input = any(pattern_matches(p, name) for p in feedforward)
            self.sites[name] = IA3Site(linear, scales_input)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{name}.{VECTOR}": site.vector for name, site in self.sites.items()}

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.claimed)

    def merge(self, model: nn.Module) -> None:
        for site in self.sites.values():
            site.merge()

    def unmerge(self, model: nn.Module) -> None:
        for site in self.sites.values():
            site.unmerge()

    def expected_param_count(self, model: nn.Module) -> int:
        """One entry per output feature of each scaled-output linear, per input feature of each
        feedforward linear."""
        return sum(s.linear.in_features if s.scales_input else s.linear.out_features for s in self.sites.values())
