"""Bottleneck adapters (Houlsby et al., 2019), and the placement machinery that Pfeiffer adapters,
Compacter and Compacter++ share.

An adapter is ``h + f(h)`` with ``f(h) = W_up act(W_down h + b_down) + b_up`` (a bottleneck of
width ``hidden // reduction_factor``). Houlsby et al. insert one after the attention sublayer and
one after the FFN sublayer, on the sublayer's output *before* the residual add (and, in
post-LN models such as BERT, before the LayerNorm).

Placement, the same on every architecture: a forward hook on the sublayer's output projection
replaces its output ``h`` by ``h + f(h)``. The projections are

========  =========================  =======================================
family    after attention            after FFN
========  =========================  =======================================
BERT      ``attention.output.dense``  ``layer.N.output.dense``
MPNet     ``attention.attn.o``        ``layer.N.output.dense``
Llama     ``self_attn.o_proj``        ``mlp.down_proj``
ViT       ``attention.o_proj``        ``mlp.fc2``
========  =========================  =======================================

so in BERT the adapter sits between ``dense`` and the sublayer's dropout + ``LayerNorm(h + x)``
(the official adapter-bert code puts it after the dropout; at eval the two are identical), and in
pre-LN models (Llama, ViT) right before the residual add. The projection stays a plain
``nn.Linear`` (the hook is not a wrapper), so composing with a method that wraps the same linear
is caught by the claims check rather than silently stacking.

Defaults follow the official code: Houlsby's adapter-bert initialises both projections from a
truncated normal with std 1e-3 (near-identity) and trains the layer norms too; the
non-linearity is AdapterHub's ``DoubleSeqBnConfig`` default (swish), reduction factor 16.
Parameter counts equal AdapterHub's ``DoubleSeqBnConfig`` (226,080 on MiniLM-L6; AdapterHub does
not train layer norms, so compare with ``train_layer_norm: false``), and with the same weights the
encoder output equals AdapterHub 1.3's (both checked in tests/methods/test_adapters.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from transformers.activations import get_activation

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.methods.base import Method, MethodConfig, register
from slimtune.core.arch import HEAD_MODULE_NAMES, Arch, pattern_matches

#: Sublayer output projections per family: where adapters go (see the module docstring).
ADAPTER_SITES: dict[str, dict[str, list[str]]] = {
    "attention": {
        "bert": ["attention.output.dense"],
        "mpnet": ["attn.o"],
        "llama": ["o_proj"],
        "vit": ["attention.o_proj"],
        "timm": ["attn.proj"],
    },
    "ffn": {
        "bert": [r"re:.*layer\.\d+\.output\.dense"],  # not the attention's 'attention.output.dense'
        "mpnet": [r"re:.*layer\.\d+\.output\.dense"],
        "llama": ["down_proj"],
        "vit": ["mlp.fc2"],
        "timm": ["mlp.fc2"],
    },
}

NonLinearity = Literal["relu", "gelu", "swish", "silu", "tanh", "gelu_new", "leakyrelu"]


def activation(name: str):
    if name == "leakyrelu":
        return F.leaky_relu
    return get_activation(name)


def find_modules_by_name(model: nn.Module, patterns: Iterable[str], field: str) -> list[tuple[str, nn.Module]]:
    """Modules of any kind whose name matches a pattern (so that a linear already wrapped by
    another method is still found, and claimed, which makes the conflict check name it)."""
    patterns = list(patterns)
    candidates = [(n, m) for n, m in model.named_modules() if n and n.split(".")[-1] not in HEAD_MODULE_NAMES]
    found = [(n, m) for n, m in candidates if any(pattern_matches(p, n) for p in patterns)]
    for pattern in patterns:
        if not any(pattern_matches(pattern, n) for n, _ in found):
            leaves = sorted({".".join(n.split(".")[-2:]) for n, m in candidates if isinstance(m, nn.Linear)})
            raise SlimtuneError(f"{field}: pattern '{pattern}' matches no module{did_you_mean(pattern, leaves)}")
    return found


def is_linear_or_wrapped(module: nn.Module, name: str) -> bool:
    """True for a plain ``nn.Linear``; False for a linear another method has wrapped (its
    ``.base`` is the linear; the caller claims the name so that the conflict is reported);
    an error for anything else."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(getattr(module, "base", None), nn.Linear):
        return False
    raise SlimtuneError(f"method.targets: '{name}' is a {type(module).__name__}, not a linear layer; target linear layers")


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at two standard deviations (TF's truncated_normal_initializer)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class BottleneckAdapter(nn.Module):
    """``f(h) = W_up act(W_down h + b_down) + b_up``; the caller adds the skip ``h + f(h)``.

    Parameters are plain tensors, not ``nn.Linear`` children, so that methods which pick base
    modules by type (LoRA on 're:' patterns) or parameters by leaf name (BitFit's ``bias``) never
    mistake an adapter's projections for the model's own.

    In a multi-task run a projection may be one per task (``per_task``: ``"down"``/``"up"``): its
    weight and bias get a leading task axis, and each example uses its own task's (``router``,
    :class:`slimtune.zoo.heads.TaskRouter`); VL-Adapter's per-task and half-shared adapters
    (ylsung/VL_adapter ``adapters/adapter_controller.py``: one ``Adapter`` per task, with
    ``share_down_sampler`` / ``share_up_sampler`` one projection for all)."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, init_std: float, zero_up: bool, dtype=None,
                 *, per_task: tuple[str, ...] = (), router=None):
        super().__init__()
        self.non_linearity = non_linearity
        self.act = activation(non_linearity)
        self.router = router
        copies = {side: (len(router.names),) if side in per_task else () for side in ("down", "up")}
        self.down_weight = nn.Parameter(torch.empty(*copies["down"], bottleneck, hidden, dtype=dtype))
        self.down_bias = nn.Parameter(torch.zeros(*copies["down"], bottleneck, dtype=dtype))
        self.up_weight = nn.Parameter(torch.empty(*copies["up"], hidden, bottleneck, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(*copies["up"], hidden, dtype=dtype))
        truncated_normal_(self.down_weight, init_std)
        if zero_up:
            nn.init.zeros_(self.up_weight)
        else:
            truncated_normal_(self.up_weight, init_std)

    def project(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        if weight.dim() == 2:
            return F.linear(h, weight, bias)
        if self.router.single is not None:  # one task per batch (the multi-task sampler's batches): one matmul
            return F.linear(h, weight[self.router.single], bias[self.router.single])
        ids = task_ids if task_ids is not None else self.router.current("adapter")
        extra = (1,) * (h.dim() - 2)  # examples of several tasks (e.g. DP's Poisson batches): each its own task's
        return torch.einsum("b...i,boi->b...o", h, weight[ids]) + bias[ids].view(len(ids), *extra, -1)

    def forward(self, h: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        down = self.project(h, self.down_weight, self.down_bias, task_ids)
        return self.project(self.act(down), self.up_weight, self.up_bias, task_ids)

    def extra_repr(self) -> str:
        per_task = [side for side in ("down", "up") if getattr(self, f"{side}_weight").dim() == 3]
        return (f"{self.up_weight.shape[-2]} -> {self.down_weight.shape[-2]} -> {self.up_weight.shape[-2]}, {self.non_linearity}"
                + (f", per task: {' and '.join(per_task)}" if per_task else ""))


def add_skip_hook(adapter: nn.Module):
    """Forward hook for the projection the adapter follows: ``h -> h + f(h)``."""

    router = getattr(adapter, "router", None)

    def hook(module, args, output):
        # A task-conditioned adapter gets each example's task as an input (DP's per-sample re-run slices it).
        return output + (adapter(output, router.current("adapter")) if router is not None else adapter(output))

    return hook


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the backbone's layer norms (LayerNorm / RMSNorm), head excluded."""
    chosen = {}
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.LayerNorm) or kind.endswith(("LayerNorm", "RMSNorm")):
            if module_name.split(".")[0] in HEAD_MODULE_NAMES:
                continue
            chosen.update({f"{module_name}.{n}": p for n, p in module.named_parameters(recurse=False)})
    return chosen


class AdapterPlacementConfig(MethodConfig):
    """Fields every adapter-shaped method has (bottleneck adapters, Compacter)."""

    reduction_factor: float = Field(16, gt=0, description="bottleneck width = hidden // reduction_factor (AdapterHub default 16)")
    non_linearity: NonLinearity = Field("swish", description="activation inside the bottleneck (AdapterHub: swish for Houlsby, relu for Pfeiffer)")
    train_layer_norm: bool = Field(True, description="also train the backbone's layer norms (Houlsby et al. do; AdapterHub does not)")
    targets: list[str] | None = Field(
        None,
        description="sublayer output projections to follow with an adapter (name patterns); default: after attention "
        "and after FFN (BERT attention.output.dense + layer.N.output.dense, Llama o_proj + down_proj, ViT o_proj + fc2)",
    )


class BottleneckConfig(AdapterPlacementConfig):
    init_std: float = Field(1e-3, gt=0, description="std of the truncated-normal init of both projections (adapter-bert: 1e-3, near identity)")
    zero_up_init: bool = Field(False, description="start the up-projection at exactly zero (the adapter is exactly the identity at step 0)")
    sharing: Literal["shared", "per-task", "half-shared"] = Field(
        "shared",
        description="multi-task runs (VL-Adapter's comparison): 'shared', one adapter for all tasks; 'per-task', one per task; "
        "'half-shared', one projection (shared_projection) for all tasks and the other per task",
    )
    shared_projection: Literal["down", "up"] | None = Field(
        None, description="half-shared: the projection all tasks share (VL-Adapter's share_down_sampler / share_up_sampler; default down)")

    @model_validator(mode="after")
    def _half_shared(self) -> BottleneckConfig:
        if self.shared_projection is not None and self.sharing != "half-shared":
            raise ValueError(f"shared_projection applies to sharing: half-shared, not '{self.sharing}'")
        return self

    @property
    def per_task(self) -> tuple[str, ...]:
        """The projections with one copy per task."""
        if self.sharing == "half-shared":
            return ("up",) if self.shared_projection in (None, "down") else ("down",)
        return ("down", "up") if self.sharing == "per-task" else ()


class AdapterMethod(Method):
    """Shared machinery: find the sites, hang one adapter module under each, hook it in."""

    #: Which sublayers get an adapter by default ("attention", "ffn").
    sites: ClassVar[tuple[str, ...]] = ("attention", "ffn")
    #: Attribute name of the adapter under its projection (also marks its parameters).
    tag: ClassVar[str] = "adapter"

    def site_patterns(self, arch: Arch) -> list[str]:
        if self.config.targets:
            return list(self.config.targets)
        patterns = []
        for site in self.sites:
            if arch.family not in ADAPTER_SITES[site]:
                raise SlimtuneError(
                    f"method {self.name}: no default adapter sites for model type '{arch.model_type}'; "
                    "set method.targets to the sublayer output projections"
                )
            patterns += ADAPTER_SITES[site][arch.family]
        return patterns

    def bottleneck_width(self, hidden: int) -> int:
        return max(1, int(hidden // self.config.reduction_factor))

    def make_adapter(self, hidden: int, dtype, site: str = "") -> nn.Module:
        """The adapter that follows the projection named ``site`` (of width ``hidden``)."""
        c = self.config
        return BottleneckAdapter(hidden, self.bottleneck_width(hidden), c.non_linearity, c.init_std, c.zero_up_init, dtype,
                                 per_task=c.per_task, router=self.router if c.per_task else None)

    def attach_shared(self, model: nn.Module, arch: Arch) -> None:
        """Hook for methods with parameters shared by all adapters (Compacter's rule matrices)."""

    def attach(self, model: nn.Module, arch: Arch) -> None:
        self.router = getattr(model, "slimtune_task_router", None)
        if getattr(self.config, "sharing", "shared") != "shared" and self.router is None:
            raise SlimtuneError(f"method {self.name}: sharing '{self.config.sharing}' gives each task its own weights, which needs "
                                "a multi-task run (task.tasks: a list of tasks)")
        self.attach_shared(model, arch)
        self.sites_found: list[str] = []
        self.adapters: dict[str, nn.Module] = {}
        self.handles = []
        for name, projection in find_modules_by_name(model, self.site_patterns(arch), "method.targets"):
            self.sites_found.append(name)
            if not is_linear_or_wrapped(projection, name):
                continue  # already wrapped by an earlier method: claims() names it, Delta reports the conflict
            if hasattr(projection, self.tag):
                raise SlimtuneError(f"method {self.name}: '{name}' already has an adapter '{self.tag}'")
            adapter = self.make_adapter(projection.out_features, projection.weight.dtype, site=name)
            projection.add_module(self.tag, adapter)
            self.adapters[f"{name}.{self.tag}"] = adapter
            self.handles.append(projection.register_forward_hook(add_skip_hook(adapter)))
        self.norms = norm_parameters(model) if self.config.train_layer_norm else {}

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = {f"{prefix}.{n}": p for prefix, module in self.adapters.items() for n, p in module.named_parameters()}
        params.update(self.shared_parameters(model))
        params.update(self.norms)
        return params

    def shared_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {}

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.sites_found) | set(self.norms)

    def expected_param_count(self, model: nn.Module) -> int:
        """2 d m + m + d per adapter (d hidden, m = d // reduction_factor), plus trained norms; in
        a multi-task run of T tasks each per-task projection T times: per-task T (2 d m + m + d),
        half-shared (down shared) d m + m + T (m d + d)."""
        tasks = len(self.router.names) if self.router is not None else 1
        per_task = getattr(self.config, "per_task", ())
        total = 0
        for module in self.adapters.values():
            d = module.up_weight.shape[-2]
            m = self.bottleneck_width(d)
            total += (tasks if "down" in per_task else 1) * (d * m + m) + (tasks if "up" in per_task else 1) * (m * d + d)
        return total + sum(p.numel() for p in self.norms.values())

    def describe(self) -> str:
        return super().describe() + f" at {len(getattr(self, 'adapters', {}))} sites"


@register
class Houlsby(AdapterMethod):
    name = "houlsby"
    description = "bottleneck adapters h + f(h) after the attention and the FFN output projections"
    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP"
    Config = BottleneckConfig
    sites = ("attention", "ffn")
    tag = "houlsby"
