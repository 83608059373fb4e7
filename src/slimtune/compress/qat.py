"""Quantisation-aware training (QAT) for ``slimtune export --int8``, and its per-sample gradient
rules for DP-SGD.

The recipe section ``compress: {qat: {...}}`` fake-quantises, while fine-tuning, every Linear that
int8 export will quantise: the *effective* weight (base + a linear delta such as LoRA's s B A, so
the delta learns to survive rounding) per output channel exactly as the export will, and the
input activations per tensor (8 bits, range from each batch), with the straight-through
estimator (torch's fake-quantise ops); under DP-SGD each example's activations take their own
range (a batch-wide range would couple the examples, as batch norm does). It is switched off after training, so the run's own report
is of the float model; ``slimtune export --int8`` then converts it. Because the delta is folded
into the weight, a LoRA branch's dropout is not applied while QAT is on.

DP-SGD under QAT: a fake-quantised layer computes ``y = x̃ Q(W_eff)ᵀ + b`` (``x̃`` the quantised
input), so the gradient of ``W_eff`` is ``M ⊙ Σ_t b_t x̃_tᵀ`` with ``M`` where the straight-through
estimator passes it (all but each row's clipped extreme). The rules below rebuild exactly that
per sample, registered with :func:`slimtune.privacy.rules.register_rule_override` for modules
whose forward this module swapped: plain Linears as ghost norms, LoRA through its factors
(``s G Aᵀ``, ``s Bᵀ G`` without forming ``G``), other linear updates by pulling the per-sample
``G`` back through ``delta_weight()``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from slimtune.compress.quantize import ACT_QMAX, ACT_QMIN, WEIGHT_QMAX, WEIGHT_QMIN
from slimtune.core.hooks import Hook
from slimtune.methods.linear_update import LinearUpdate
from slimtune.methods.lora import LoRALinear
from slimtune.privacy.contributions import Dense, GhostLinear, Masked, as_sequence
from slimtune.privacy.rules import LinearRule, Rule, register_rule_override


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantisation, the scale torch's per-channel
    symmetric observer picks (max |w| / 127.5), straight-through gradient."""
    amax = weight.detach().abs().amax(dim=1).float()
    scale = (amax / ((WEIGHT_QMAX - WEIGHT_QMIN) / 2)).clamp_min(torch.finfo(torch.float32).eps)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, WEIGHT_QMIN, WEIGHT_QMAX)


def fake_quant_activation(x: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Asymmetric 8-bit fake quantisation with the batch's own range (as dynamic quantisation does
    at inference), straight-through gradient. ``per_sample``: each example's own range (row 0 of
    ``x`` is the batch), so no example's output depends on another's — what DP-SGD needs (a
    range over the batch would let one example move every other example's gradient)."""
    flat = x.detach().reshape(x.shape[0], -1) if per_sample else x.detach().reshape(1, -1)
    lo = flat.amin(1).clamp(max=0.0).float()
    hi = flat.amax(1).clamp(min=0.0).float()
    scale = ((hi - lo) / (ACT_QMAX - ACT_QMIN)).clamp_min(torch.finfo(torch.float32).eps)
    zero = (ACT_QMIN - torch.round(lo / scale)).clamp(ACT_QMIN, ACT_QMAX).to(torch.int32)
    if per_sample:
        return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, ACT_QMIN, ACT_QMAX)
    return torch.fake_quantize_per_tensor_affine(x, scale[0], zero[0], ACT_QMIN, ACT_QMAX)


def effective_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, LinearUpdate):
        base = module.base
        weight = base.weight if module.merged_from is not None else base.weight + module.effective_delta_weight().to(base.weight.dtype)
        return weight, base.bias
    return module.weight, module.bias


def _fake_quant_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight, bias = effective_weight_and_bias(self)
    # Kept (a reference, no copy) for DP's rules: the weight exactly as this forward quantised it
    # (under bf16 autocast a recomputation in fp32 would clip other entries).
    self.slimtune_qat_weight = weight.detach()
    return F.linear(quantised_input(self, x), fake_quant_weight(weight), bias)


def quantised_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mode = module.slimtune_qat_activations  # False, "batch" or "sample"
    return fake_quant_activation(x, per_sample=mode == "sample") if mode else x


def is_fake_quantised(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fake_quant_forward


def qat_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The Linears int8 export quantises (every ``nn.Linear``, masked or not), with a linear
    delta wrapped around them where a method added one (the wrapper is faked as a whole)."""
    targets: dict[str, nn.Module] = {}
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LinearUpdate):
            targets[name] = module
            inside.add(f"{name}.base")
        elif parametrize.type_before_parametrizations(module) is nn.Linear and name not in inside:
            targets[name] = module
    return targets


def enable_fake_quant(model: nn.Module, activations: bool = True, per_sample: bool = False) -> int:
    """Make every int8 target compute with fake-quantised weights (and inputs, with each example's
    own range if ``per_sample``); returns the count. Module names and parameters are untouched
    (only the instance's forward is swapped)."""
    count = 0
    for module in qat_targets(model).values():
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(_fake_quant_forward, module)
        module.slimtune_qat_activations = ("sample" if per_sample else "batch") if activations else False
        count += 1
    return count


def disable_fake_quant(model: nn.Module) -> None:
    for module in model.modules():
        if is_fake_quantised(module):
            del module.forward
            del module.slimtune_qat_activations
            module.__dict__.pop("slimtune_qat_weight", None)


# --------------------------------------------------------------------------------------------
# Per-sample gradients under fake quantisation (DP-SGD with QAT).
# --------------------------------------------------------------------------------------------


def passed_by_quantiser(weight: torch.Tensor) -> torch.Tensor:
    """Where :func:`fake_quant_weight`'s straight-through gradient passes (boolean, the weight's
    shape): asked of the op itself, so it is exactly what autograd does."""
    probe = weight.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(fake_quant_weight(probe).sum(), probe)
    return grad != 0


class _FakeQuantRule(Rule):
    """Shared by the rules below: the quantised input and the weight's pass mask of a call."""

    #: The exact (pre-parametrisation) type this rule is for.
    layer_type: type[nn.Module] = nn.Linear

    @classmethod
    def accepts(cls, module):
        return is_fake_quantised(module) and parametrize.type_before_parametrizations(module) is cls.layer_type

    @classmethod
    def absorbs(cls, module: nn.Module) -> list[nn.Module]:
        """A fake-quantised linear update computes ``F.linear`` itself and never calls its
        ``base``: the base's trainable parameters (BitFit's bias beside LoRA) are this rule's."""
        return [module.base] if isinstance(module, LinearUpdate) else []

    def quantised(self, call, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = quantised_input(self.module, call.args[0].detach())
        weight = self.module.__dict__.get("slimtune_qat_weight")
        if weight is None:
            weight, _ = effective_weight_and_bias(self.module)
        return as_sequence(x.to(dtype)), passed_by_quantiser(weight)

    def base_contributions(self, x: torch.Tensor, b: torch.Tensor, passed: torch.Tensor) -> dict[str, list]:
        """The absorbed base's weight and bias, as a Linear's (``base.weight``, ``base.bias``)."""
        out: dict[str, list] = {}
        weight_name, bias_name = self.name_of("base.weight"), self.name_of("base.bias")
        if weight_name is not None:
            out[weight_name] = [Masked(GhostLinear(x, b), passed)]
        if bias_name is not None:
            out[bias_name] = [Dense(b.sum(1))]
        return out


class FakeQuantLinearRule(_FakeQuantRule, LinearRule):
    kind = "qat-linear"

    @classmethod
    def accepts(cls, module):
        return _FakeQuantRule.accepts.__func__(cls, module) and LinearRule.accepts.__func__(cls, module)

    def linear_input(self, call, dtype):
        return self.quantised(call, dtype)


class FakeQuantLoRARule(_FakeQuantRule):
    """``G = M ⊙ Σ_t b_t x̃_tᵀ`` pulled through ``W_eff = W + s B A``: ``∂B = s G Aᵀ``,
    ``∂A = s Bᵀ G``, each as the low-rank product minus the few entries ``M`` drops."""

    kind = "qat-lora"
    layer_type = LoRALinear

    @classmethod
    def accepts(cls, module):
        # The factor formulas assume W_eff = W + s B A: on a masked base (the update masked too)
        # the next rule pulls G back through the masked update instead.
        return super().accepts(module) and module.base_kept() is None

    def contributions(self, dtype):
        layer = self.module
        a_name, b_name = self.name_of("lora_A"), self.name_of("lora_B")
        out: dict[str, list] = {}
        for call, b in self.backprops(dtype):
            b = as_sequence(b)
            x, passed = self.quantised(call, dtype)
            rows, cols = torch.nonzero(~passed, as_tuple=True)
            dropped = (b[:, :, rows] * x[:, :, cols]).sum(1)  # (B, K): the entries of G that M drops
            a_weight = layer.lora_A.detach().to(dtype)
            b_scaled = layer.lora_B.detach().to(dtype) * layer.scaling
            if b_name is not None:
                grad = torch.bmm(b.transpose(1, 2), x @ a_weight.t()) * layer.scaling  # (B, out, r)
                grad.index_add_(1, rows, -(dropped.unsqueeze(-1) * a_weight[:, cols].t()) * layer.scaling)
                out.setdefault(b_name, []).append(Dense(grad))
            if a_name is not None:
                grad = torch.bmm((b @ b_scaled).transpose(1, 2), x)  # (B, r, in)
                grad.index_add_(2, cols, -(dropped.unsqueeze(-1) * b_scaled[rows]).transpose(1, 2))
                out.setdefault(a_name, []).append(Dense(grad))
            for name, items in self.base_contributions(x, b, passed).items():
                out.setdefault(name, []).extend(items)
        return out


class FakeQuantLinearUpdateRule(_FakeQuantRule):
    """Any other linear update (KAdaptation, FacT, DSEE): the per-sample ``G`` pulled back through
    ``delta_weight()`` by one batched vector-Jacobian product (through masks, if any)."""

    kind = "qat-linear-update"
    through_parametrizations = True
    reads_shared = True  # autograd reaches the shared factors through delta_weight()

    @classmethod
    def accepts(cls, module):
        return is_fake_quantised(module) and isinstance(module, LinearUpdate)

    def contributions(self, dtype):
        names = [n for n in self.params if not self.tensors[n].startswith("base.")]
        out: dict[str, list] = {}
        for call, b in self.backprops(dtype):
            x, passed = self.quantised(call, dtype)
            b = as_sequence(b)
            for name, items in self.base_contributions(x, b, passed).items():
                out.setdefault(name, []).extend(items)
            per_sample = Masked(GhostLinear(x, b), passed).dense()  # (B, out, in)
            with torch.enable_grad():
                update = self.module.effective_delta_weight()
                grads = torch.autograd.grad(update, [self.params[n] for n in names], grad_outputs=per_sample.to(update.dtype),
                                            is_grads_batched=True, allow_unused=True)
            for name, grad in zip(names, grads):
                grad = torch.zeros((per_sample.shape[0], *self.params[name].shape), dtype=dtype) if grad is None else grad.to(dtype)
                out.setdefault(name, []).append(Dense(grad))
        return out


# Most specific first: LoRA's factors, then any linear update, then plain Linears.
for _rule in (FakeQuantLoRARule, FakeQuantLinearUpdateRule, FakeQuantLinearRule):
    register_rule_override(is_fake_quantised, _rule)


# --------------------------------------------------------------------------------------------
# The recipe's hook (the section is slimtune.features.compress).
# --------------------------------------------------------------------------------------------


class QATConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    activations: bool = Field(True, description="also fake-quantise each Linear's input per tensor (8 bits, as dynamic int8 does at inference)")


class QATHook(Hook):
    name = "qat"

    def __init__(self, config: QATConfig):
        self.config = config
        self.layers = 0
        self.per_sample = False

    def on_train_begin(self, trainer) -> None:
        self.per_sample = any(h.needs_independent_samples for h in trainer.hooks)
        self.layers = enable_fake_quant(trainer.model, self.config.activations, per_sample=self.per_sample)

    def on_train_end(self, trainer) -> None:
        disable_fake_quant(trainer.model)

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        return [("QAT", f"int8 fake quantisation on {section.get('fake_quant_linears', 0)} Linears ({section.get('weights')}; activations {section.get('activations')})")]

    def report(self) -> dict[str, Any]:
        return {"fake_quant_linears": self.layers, "weights": "int8 per-channel symmetric",
                "activations": ("8-bit per-example dynamic (DP)" if self.per_sample else "8-bit per-tensor dynamic") if self.config.activations else "float"}
