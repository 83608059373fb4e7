"""Rank pruning (FLOP, Wang, Wohlwend & Lei 2020, "Structured Pruning of Large Language Models";
the rank-pruning strategy of Xia & Shin 2021's multi-task pruning): every target weight is
factorised by its SVD, ``W = U diag(s) Vᵀ = L R`` with ``L = U diag(√s)``, ``R = diag(√s) Vᵀ``,
a hard-concrete gate ``z_k`` on each rank-1 component (``W = L diag(z) R``), and a Lagrangian
that drives the expected number of parameters to the budget; the components whose gates close
are removed, so the pruned layer is two thin matrices (``k (in + out)`` parameters).

Followed: asappresearch/flop ``flop/linear.py`` (``HardConcreteProjectedLinear``: the gated
projection, its expected size ``E[L0] (in + out)``), ``flop/hardconcrete.py`` (the gate; its
``init_mean`` 0.5 is ``keep_prob`` 0.5 here, log α = 0) and ``examples/enwik8/train_enwik8.py``
(the Lagrangian ``λ₁ (ŝ − t) + λ₂ (ŝ − t)²`` on the expected sparsity ŝ, λ maximised by Adam
at ``lr · prune_lr`` (prune_lr 3), the target t ramped linearly over a warm-up, and the final mask
keeping ``round(E[L0])`` components per layer, scaled by ``sigmoid(0.8 log α / β)``, FLOP's
"compiled" mask). The gate is :class:`slimtune.sparsity.hard_concrete.HardConcreteGate`, the
tickets' module, on a vector of ones between the factors.

The budget is stated as the share of the targets' *dense* parameters kept (``density``:
kept ``Σ k (in + out)`` over ``Σ in · out``), as Xia & Shin state theirs; FLOP states it against
the full-rank factorisation. The factors and gates train (and the head, as in every run;
the layer norms with ``train_layer_norm``); the embeddings stay frozen (FLOP fine-tunes them too). Deliberate deviations: the gates start
at exactly log α = 0 (FLOP adds N(0, 0.01) noise) and train with the factors' optimizer and
learning rate times ``prune_lr`` (FLOP: a separate Adam at ``lr · prune_lr``); the biases stay the base's, frozen
(FLOP trains them), so that the delta merges into plain linears and unmerges exactly.

With every gate at 1, ``L R`` is the dense weight (tested).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from slimtune.core.arch import Arch, find_targets, replace_module
from slimtune.core.hooks import Hook
from slimtune.methods.adapter import norm_parameters
from slimtune.methods.base import Method, MethodConfig, register
from slimtune.sparsity.hard_concrete import apply_gate, get_gate

#: FLOP's compiled-mask temperature factor ("an empirically validated magic number 0.8").
COMPILED_MASK_FACTOR = 0.8


class FactorizedLinear(nn.Module):
    """``y = L (z ⊙ (R x)) + b``: a linear layer as its rank-1 components, each gated."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.left = nn.Parameter(left)  # [out, k]
        self.right = nn.Parameter(right)  # [k, in]
        self.bias = bias  # the base linear's own, frozen
        # The gated vector: ones, read through a hard-concrete gate while the rank is searched.
        self.register_buffer("components", torch.ones(left.shape[1], dtype=left.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FactorizedLinear:
        weight = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s.sqrt()
        dtype = linear.weight.dtype
        return cls((u * root).to(dtype), (root[:, None] * vh).to(dtype), linear.bias)

    @property
    def in_features(self) -> int:
        return self.right.shape[1]

    @property
    def out_features(self) -> int:
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def weight(self) -> torch.Tensor:
        return (self.left * self.components) @ self.right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.right) * self.components, self.left, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> rank {self.rank} -> {self.out_features}"


class RankPruningConfig(MethodConfig):
    density: float = Field(0.5, gt=0, le=1, description="the budget: share of the targets' dense parameters kept (k (in + out) over in · out)")
    targets: list[str] | None = Field(
        None, description="linears to factorise and prune (name patterns); default: attention q/k/v/o and the FFN of every layer")
    keep_prob: float = Field(0.5, gt=0, lt=1, description="the gates' initial keep probability (FLOP's init_mean 0.5)")
    warmup: float = Field(0.5, ge=0, le=1, description="share of the steps over which the target density ramps linearly from 1 to density (FLOP: prune_warmup)")
    prune_lr: float = Field(3.0, gt=0, description="the gates and the Lagrange multipliers learn at train.lr x prune_lr (FLOP's default 3)")
    train_layer_norm: bool = Field(False, description="also train the backbone's layer norms (FLOP fine-tunes everything; off by default so "
                                   "that the pruned factors are the whole delta and merge exactly)")


class RankBudget(Hook):
    """The Lagrangian of FLOP: after each backward, ``λ₁ (ŝ − t) + λ₂ (ŝ − t)²`` (ŝ the expected
    sparsity of the gated layers, t the ramped target) adds its gradients to the gates, and λ
    takes one Adam step *up* that gradient; at the end of training the gates are compiled and
    closed components removed."""

    name = "rank_pruning"

    def __init__(self, method: RankPruning) -> None:
        self.method = method
        self.lambdas = torch.zeros(2, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.lambdas], lr=method.config.prune_lr, maximize=True)  # lr set by the run
        self.last: dict[str, float] = {}
        self.final: dict[str, Any] = {}

    def on_train_begin(self, trainer) -> None:
        for group in self.optimizer.param_groups:  # FLOP: optimizer_max at lr · prune_lr, maximising
            group["lr"] = trainer.cfg.lr * self.method.config.prune_lr

    def target_density(self, trainer) -> float:
        c = self.method.config
        ramp = max(1, round(c.warmup * trainer.total_steps))
        return 1.0 - (1.0 - c.density) * min(1.0, trainer.step / ramp)

    def on_after_backward(self, trainer) -> None:
        if trainer.step_skipped or not self.method.layers:
            return
        target = 1.0 - self.target_density(trainer)
        sparsity = 1.0 - self.method.expected_size() / self.method.dense_size
        gap = sparsity - target
        lagrangian = self.lambdas[0] * gap + self.lambdas[1] * gap**2
        lagrangian.backward()  # data-free: adds to the gates' gradients after any clipping/noise
        self.last = {"expected_density": 1.0 - float(sparsity.detach()), "target_density": 1.0 - target, "lagrangian": float(lagrangian.detach())}

    def on_step_end(self, trainer) -> None:
        if self.lambdas.grad is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, trainer) -> None:
        self.final = self.method.finalize()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": {k: v for k, v in self.optimizer.state_dict().items() if k != "state"}, "last": self.last}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        state = self.optimizer.state_dict()["state"].get(0, {})
        out = {"lambdas": self.lambdas.detach().clone()}
        out.update({f"adam.{k}": v.clone() if torch.is_tensor(v) else torch.tensor(v) for k, v in state.items()})
        return out

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lambdas.copy_(tensors["lambdas"])
        adam = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
        saved = self.optimizer.state_dict()
        saved["state"] = {0: adam} if adam else {}
        self.optimizer.load_state_dict(saved)
        self.last = dict(state.get("last", {}))

    def report(self) -> dict[str, Any]:
        return {"density": self.method.config.density, **self.final, "lambdas": [float(x) for x in self.lambdas.detach()]}

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        if "kept_density" not in section:
            return []
        return [("rank pruning", f"{section['kept_density']:.3f} of the targets' parameters kept (budget {section['density']:.3f}), "
                                 f"{section['kept_components']:,} of {section['components']:,} rank-1 components")]


@register
class RankPruning(Method):
    name = "rank-pruning"
    description = "each target linear as its SVD's rank-1 components, hard-concrete gated under a parameter budget (FLOP)"
    paper = "Wang et al. 2020, Structured Pruning of Large Language Models (FLOP); Xia & Shin 2021 (multi-task)"
    Config = RankPruningConfig
    mergeable = True

    def attach(self, model: nn.Module, arch: Arch) -> None:
        patterns = self.config.targets or arch.default_targets("attention_qkvo") + arch.default_targets("ffn")
        self.layers: dict[str, FactorizedLinear] = {}
        for name, linear in find_targets(model, patterns, kind=nn.Linear):
            layer = FactorizedLinear.from_linear(linear)
            apply_gate(layer, "components", keep_prob=self.config.keep_prob)
            replace_module(model, name, layer)
            self.layers[name] = layer
        self.dense_size = sum(layer.in_features * layer.out_features for layer in self.layers.values())
        self.norms = norm_parameters(model) if self.config.train_layer_norm else {}
        self.finalized = False

    def hooks(self) -> list[Hook]:
        return [RankBudget(self)]

    def learning_rate_factors(self, model: nn.Module) -> dict[str, float]:
        return {name: self.config.prune_lr for name in self.trainable_parameters(model) if name.endswith("log_alpha")}

    def expected_size(self) -> torch.Tensor:
        """E[parameters kept]: Σ E[L0] (in + out) over the gated layers (FLOP's num_parameters)."""
        total = torch.zeros(())
        for layer in self.layers.values():
            gate = get_gate(layer, "components")
            if gate is not None:
                total = total + gate.expected_l0() * (layer.in_features + layer.out_features)
            else:
                total = total + layer.rank * (layer.in_features + layer.out_features)
        return total

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            params.update({f"{name}.{n}": p for n, p in layer.named_parameters() if n != "bias"})
        params.update(self.norms)
        return params

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.layers) | set(self.norms)

    @torch.no_grad()
    def finalize(self) -> dict[str, Any]:
        """FLOP's compiled mask: per layer keep round(E[L0]) components with the largest log α,
        scaled by sigmoid(0.8 log α / β); the others are removed, and the gate with them."""
        if self.finalized:
            return self.summary()
        for layer in self.layers.values():
            gate = get_gate(layer, "components")
            log_alpha = gate.log_alpha.detach().reshape(-1)
            keep = min(layer.rank, max(0, round(float(gate.expected_l0()))))
            order = torch.argsort(log_alpha, descending=True, stable=True)[:keep].sort().values
            scale = torch.sigmoid(log_alpha / gate.beta * COMPILED_MASK_FACTOR)[order]
            parametrize.remove_parametrizations(layer, "components", leave_parametrized=False)
            layer.left = nn.Parameter((layer.left[:, order] * scale).contiguous())
            layer.right = nn.Parameter(layer.right[order].contiguous())
            layer.components = torch.ones(keep, dtype=layer.left.dtype)
        self.finalized = True
        return self.summary()

    def summary(self) -> dict[str, Any]:
        kept = sum(layer.rank * (layer.in_features + layer.out_features) for layer in self.layers.values())
        return {"kept_density": kept / self.dense_size, "kept_parameters": kept, "dense_parameters": self.dense_size,
                "kept_components": sum(layer.rank for layer in self.layers.values()),
                "components": sum(min(layer.in_features, layer.out_features) for layer in self.layers.values()),
                "ranks": {name: layer.rank for name, layer in self.layers.items()}}

    def load_delta_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Take the saved state's shape first: a finished run's pruned factors (no gates), or the
        gated full-rank factors of a run still searching (a checkpoint, the initial state)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                if f"{name}.left" not in state:
                    continue  # the base class names what is missing
                gated = f"{name}.parametrizations.components.0.log_alpha" in state
                rank = state[f"{name}.left"].shape[1]
                if gated == (get_gate(layer, "components") is not None) and rank == layer.rank:
                    continue
                if get_gate(layer, "components") is not None:
                    parametrize.remove_parametrizations(layer, "components", leave_parametrized=False)
                layer.left = nn.Parameter(torch.empty(layer.out_features, rank, dtype=layer.left.dtype))
                layer.right = nn.Parameter(torch.empty(rank, layer.in_features, dtype=layer.right.dtype))
                layer.components = torch.ones(rank, dtype=layer.left.dtype)
                if gated:
                    apply_gate(layer, "components", keep_prob=self.config.keep_prob)
            self.finalized = all(get_gate(layer, "components") is None for layer in self.layers.values())
        super().load_delta_state_dict(model, state)

    @property
    def restructuring_reason(self) -> str | None:
        return "removes the closed rank-1 components (and their gates) when training ends"

    # -- merging: W = L R back into a plain Linear (the export's way) ----------------------------
    def merge(self, model: nn.Module) -> None:
        self._dense = {}
        for name, layer in self.layers.items():
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.left.dtype)
            with torch.no_grad():
                dense.weight.copy_(layer.weight())
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            dense.requires_grad_(False)
            replace_module(model, name, dense)
            self._dense[name] = dense
        self.merged = True

    def unmerge(self, model: nn.Module) -> None:
        for name, layer in self.layers.items():
            replace_module(model, name, layer)
        self.merged = False

    def expected_param_count(self, model: nn.Module) -> int:
        """Per target: rank (in + out) factor entries (full rank min(in, out) while searching)
        plus the gates' rank log α, plus trained norms."""
        total = 0
        for layer in self.layers.values():
            gated = get_gate(layer, "components") is not None
            total += layer.rank * (layer.in_features + layer.out_features) + (layer.rank if gated else 0)
        return total + sum(p.numel() for p in self.norms.values())

    def describe(self) -> str:
        return super().describe() + f" on {len(getattr(self, 'layers', {}))} linears"

