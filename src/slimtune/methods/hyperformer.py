"""Hyperformer++ (Karimi Mahabadi et al. 2021): adapters whose weights a hyper-network generates
from a task embedding, a layer embedding and a block-type embedding, one hyper-network shared by
every layer, both sublayers and every task of a multi-task run.

Followed: rabeehk/hyperformer ``adapters/adapter_hypernetwork.py``-era code in
``adapters/adapter_modeling.py`` (``AdapterLayersOneHyperNetController``, the
``efficient_unique_hyper_net`` of ``configs/hyperformer++.json``), ``adapter_utils.py`` and
``adapter_controller.py`` (``MetaLayersAdapterController``):

* input ``[task embedding; layer-id embedding; block-type embedding]`` (each 64 wide; block 0 the
  FFN, 1 self-attention), a task projector ``Linear(3·64, 128) → ReLU → Linear(128, 64)``, then
  ``LayerNorm(64, eps 1e-6)``: the projected embedding ``z``;
* from ``z``, linear generators of the down projection (``m × d`` and its bias ``m``), the up
  projection (``d × m``, bias ``d``) and the weight and bias of the layer norm applied to the
  adapter's output (``add_layer_norm_after_adapter``): ``h + LN_z(W_up act(W_down h + b) + b')``;
* every generator and the projector initialised ``Normal(0, 0.01)`` with zero biases
  (``linear_layer``); the task embeddings ``Normal(0, 1)`` and trained; layer and block
  embeddings ``nn.Embedding``'s ``Normal(0, 1)``;
* the configuration of ``hyperformer++.json``: reduction factor 32, ``gelu_new``, the backbone's
  layer norms trained (``unfreeze_layer_norms``).

Placement is the Houlsby adapters' (after the attention and FFN output projections,
:mod:`slimtune.methods.adapter`), as the official T5 code applies the generated adapter to the
sublayer's output before its residual. Deliberate deviations: T5's task-conditional layer norms
(``conditional_layer_norm``) are not ported (the backbone's norms are trained, shared); one
hyper-network serves the encoder (the official code has one per T5 stack).

The weights are generated for each task present in a batch (once for the sampler's one-task
batches) and each example uses its own task's. In a single-task run there is one task embedding
(a hyper-network over layers and blocks only).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.core.arch import Arch, pattern_matches
from slimtune.errors import SlimtuneError
from slimtune.methods.adapter import ADAPTER_SITES, AdapterMethod, AdapterPlacementConfig, NonLinearity, activation
from slimtune.methods.base import register

BLOCK_FFN, BLOCK_ATTENTION = 0, 1  # the official block-type ids (feed-forward 0, self-attention 1)


class HyperformerConfig(AdapterPlacementConfig):
    reduction_factor: float = Field(32, gt=0, description="bottleneck width = hidden // reduction_factor (hyperformer++.json: 32)")
    non_linearity: NonLinearity = Field("gelu_new", description="activation inside the bottleneck (hyperformer++.json: gelu_new)")
    train_layer_norm: bool = Field(True, description="also train the backbone's layer norms (hyperformer++.json: unfreeze_layer_norms)")
    task_embedding_dim: int = Field(64, ge=1, description="width of the task, layer-id and block-type embeddings (hyperformer++.json: 64)")
    task_hidden_dim: int = Field(128, ge=1, description="hidden width of the task projector (MetaAdapterConfig.task_hidden_dim: 128)")
    projected_task_embedding_dim: int = Field(64, ge=1, description="width of the projected embedding the generators read (64)")
    init_std: float = Field(1e-2, gt=0, description="std of the Normal init of the projector and generators (linear_layer: 1e-2)")


def _linear(inputs: int, outputs: int, std: float, dtype) -> tuple[nn.Parameter, nn.Parameter]:
    """A generator's weight ~ N(0, std) and zero bias (the official ``linear_layer``), as plain
    tensors (no ``nn.Linear`` that LoRA or BitFit could mistake for the model's)."""
    weight = nn.Parameter(torch.empty(outputs, inputs, dtype=dtype))
    nn.init.normal_(weight, std=std)
    return weight, nn.Parameter(torch.zeros(outputs, dtype=dtype))


class HyperNetwork(nn.Module):
    """Task, layer and block embeddings -> every adapter's weights (``AdapterLayersOneHyperNetController``
    with the ``TaskEmbeddingController``'s task embeddings)."""

    def __init__(self, tasks: int, layers: int, hidden: int, bottleneck: int, config: HyperformerConfig, dtype=None):
        super().__init__()
        t, h, p, std = config.task_embedding_dim, config.task_hidden_dim, config.projected_task_embedding_dim, config.init_std
        self.hidden, self.bottleneck, self.projected = hidden, bottleneck, p
        self.task_embeddings = nn.Parameter(torch.randn(tasks, t, dtype=dtype))
        self.layer_embeddings = nn.Parameter(torch.randn(layers, t, dtype=dtype))
        self.block_embeddings = nn.Parameter(torch.randn(2, t, dtype=dtype))
        self.projector_in_weight, self.projector_in_bias = _linear(3 * t, h, std, dtype)
        self.projector_out_weight, self.projector_out_bias = _linear(h, p, std, dtype)
        self.norm_weight = nn.Parameter(torch.ones(p, dtype=dtype))
        self.norm_bias = nn.Parameter(torch.zeros(p, dtype=dtype))
        self.down_weight_generator, self.down_weight_generator_bias = _linear(p, bottleneck * hidden, std, dtype)
        self.down_bias_generator, self.down_bias_generator_bias = _linear(p, bottleneck, std, dtype)
        self.up_weight_generator, self.up_weight_generator_bias = _linear(p, hidden * bottleneck, std, dtype)
        self.up_bias_generator, self.up_bias_generator_bias = _linear(p, hidden, std, dtype)
        self.post_norm_weight_generator, self.post_norm_weight_generator_bias = _linear(p, hidden, std, dtype)
        self.post_norm_bias_generator, self.post_norm_bias_generator_bias = _linear(p, hidden, std, dtype)

    def embedding(self, tasks: torch.Tensor, layer: int, block: int) -> torch.Tensor:
        """The projected, normalised embedding ``z`` of each task in ``tasks`` at (layer, block): [U, p]."""
        count = len(tasks)
        joint = torch.cat([self.task_embeddings[tasks], self.layer_embeddings[layer].expand(count, -1),
                           self.block_embeddings[block].expand(count, -1)], dim=-1)
        hidden = F.relu(F.linear(joint, self.projector_in_weight, self.projector_in_bias))
        z = F.linear(hidden, self.projector_out_weight, self.projector_out_bias)
        return F.layer_norm(z, (self.projected,), self.norm_weight, self.norm_bias, eps=1e-6)

    def generate(self, tasks: torch.Tensor, layer: int, block: int) -> dict[str, torch.Tensor]:
        """Each task's adapter weights at (layer, block), with a leading task axis."""
        z = self.embedding(tasks, layer, block)
        count, d, m = len(tasks), self.hidden, self.bottleneck

        def out(name: str) -> torch.Tensor:
            return F.linear(z, getattr(self, name), getattr(self, f"{name}_bias"))

        return {
            "down_weight": out("down_weight_generator").view(count, m, d), "down_bias": out("down_bias_generator"),
            "up_weight": out("up_weight_generator").view(count, d, m), "up_bias": out("up_bias_generator"),
            "norm_weight": out("post_norm_weight_generator"), "norm_bias": out("post_norm_bias_generator"),
        }

    def parameter_count(self) -> int:
        """The closed form: embeddings (T + L + 2) t, projector 3 t h + h + h p + p, norm 2 p,
        generators p (m d + m + d m + d + 2 d) + (m d + m + d m + d + 2 d)."""
        t = self.task_embeddings.shape[1]
        tasks, layers = self.task_embeddings.shape[0], self.layer_embeddings.shape[0]
        h, p, d, m = self.projector_in_weight.shape[0], self.projected, self.hidden, self.bottleneck
        generated = m * d + m + d * m + d + 2 * d
        return (tasks + layers + 2) * t + 3 * t * h + h + h * p + p + 2 * p + (p + 1) * generated


class HyperAdapter(nn.Module):
    """One site's adapter, its weights generated for each example's task: ``LN_z(f(h))``; the
    caller adds the skip. The hyper-network is read, not owned (the model owns it once)."""

    def __init__(self, network: HyperNetwork, layer: int, block: int, non_linearity: str, router) -> None:
        super().__init__()
        self._shared = [network]
        self.layer, self.block, self.router = layer, block, router
        self.non_linearity = non_linearity
        self.act = activation(non_linearity)

    def shared_modules(self) -> list[nn.Module]:
        return list(self._shared)

    def forward(self, h: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        network = self._shared[0]
        if self.router is None or self.router.single is not None:  # one task (a single-task run, or the sampler's batches)
            single = 0 if self.router is None else self.router.single
            tasks, rows = torch.tensor([single], device=h.device), None
        else:  # examples of several tasks: every task's weights, each example taking its own
            tasks = torch.arange(network.task_embeddings.shape[0], device=h.device)
            rows = task_ids if task_ids is not None else self.router.current("hyperformer adapter")
        w = network.generate(tasks, self.layer, self.block)
        d = h.shape[-1]
        if len(tasks) == 1:  # one task per batch (the multi-task sampler's): plain linear layers
            down = F.linear(h, w["down_weight"][0], w["down_bias"][0])
            up = F.linear(self.act(down), w["up_weight"][0], w["up_bias"][0])
            return F.layer_norm(up, (d,), w["norm_weight"][0], w["norm_bias"][0])
        extra = (1,) * (h.dim() - 2)

        def per_row(name: str) -> torch.Tensor:
            return w[name][rows]

        n = len(rows)
        down = torch.einsum("b...i,boi->b...o", h, per_row("down_weight")) + per_row("down_bias").view(n, *extra, -1)
        up = torch.einsum("b...i,boi->b...o", self.act(down), per_row("up_weight")) + per_row("up_bias").view(n, *extra, -1)
        normalised = F.layer_norm(up, (d,))
        return normalised * per_row("norm_weight").view(n, *extra, -1) + per_row("norm_bias").view(n, *extra, -1)

    def extra_repr(self) -> str:
        return f"layer {self.layer}, {'attention' if self.block == BLOCK_ATTENTION else 'ffn'}, {self.non_linearity}"


def layer_index(site: str) -> int:
    """The transformer layer a module name belongs to (``...layer.3...`` / ``...layers.3...``)."""
    found = re.search(r"(?:^|\.)layers?\.(\d+)\.", site)
    if found is None:
        raise SlimtuneError(f"method hyperformer: cannot tell which layer '{site}' is in (no layer.N in its name)")
    return int(found.group(1))


@register
class Hyperformer(AdapterMethod):
    name = "hyperformer"
    description = "adapters generated by one hyper-network from task, layer and block embeddings (multi-task)"
    paper = "Karimi Mahabadi et al. 2021, Parameter-efficient Multi-task Fine-tuning for Transformers via Shared Hypernetworks"
    Config = HyperformerConfig
    sites = ("attention", "ffn")
    tag = "hyperformer"
    shared_name = "hyperformer_network"

    def attach_shared(self, model: nn.Module, arch: Arch) -> None:
        if hasattr(model, self.shared_name):
            raise SlimtuneError(f"method {self.name}: the model already holds '{self.shared_name}'")
        self.arch_family = arch.family
        dtype = next(model.parameters()).dtype
        tasks = len(self.router.names) if self.router is not None else 1  # one task: the run's own
        self.network = HyperNetwork(tasks, arch.num_layers, arch.hidden_size,
                                    self.bottleneck_width(arch.hidden_size), self.config, dtype)
        model.add_module(self.shared_name, self.network)

    def make_adapter(self, hidden: int, dtype, site: str = "") -> nn.Module:
        attention = ADAPTER_SITES["attention"].get(self.arch_family, [])
        block = BLOCK_ATTENTION if any(pattern_matches(p, site) for p in attention) else BLOCK_FFN
        return HyperAdapter(self.network, layer_index(site), block, self.config.non_linearity, self.router)

    def shared_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{self.shared_name}.{n}": p for n, p in self.network.named_parameters()}

    def claims(self, model: nn.Module) -> set[str]:
        return super().claims(model) | set(self.shared_parameters(model))

    def expected_param_count(self, model: nn.Module) -> int:
        """The hyper-network's closed form (:meth:`HyperNetwork.parameter_count`) plus trained
        norms: the same whatever the number of layers it serves."""
        return self.network.parameter_count() + sum(p.numel() for p in self.norms.values())
