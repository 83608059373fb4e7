"""int8 for CPU inference: dynamic quantisation of Linear layers and its safetensors format.

Which int8 path, and why (checked on this machine, torch 2.13, minilm-l6, batch 32 x 128 tokens,
2 threads): ``torch.ao.quantization.quantize_dynamic`` runs the fbgemm/x86 int8 GEMM kernels and
was ~0.5x fp32 latency; torchao 0.18 (``quantize_(model, Int8DynamicActivationInt8WeightConfig())``,
installable next to torch 2.13) was *slower* than fp32 on this CPU (1.24x: no fast CPU kernel
for its int8 tensor subclass), so it buys nothing here. torch.ao's eager quantisation is marked
deprecated in favour of torchao but still ships and works in 2.13; its warnings are silenced
locally. Weights: per-output-channel symmetric int8; activations: quantised per tensor at run
time (what "dynamic" means). Everything not a Linear (embeddings, LayerNorm) stays float32.

Stored format (``model.safetensors`` of an int8 export): every quantised Linear ``<name>`` as
``<name>.weight`` (int8, out x in), ``<name>.weight_scale`` (float64, per output channel),
``<name>.weight_zero_point`` (int64), ``<name>.bias`` (float32, if any); every other tensor as in
the float state dict. ``load_int8_state`` rebuilds the quantised modules from it (no pickle).

Quantisation-aware training for this export: :mod:`slimtune.compress.qat`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from slimtune.errors import SlimtuneError

INT8_FORMAT = "torch.ao-dynamic-int8-per-channel"
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
ACT_QMIN, ACT_QMAX = 0, 255


@contextmanager
def _quiet_deprecation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
        yield


def _qconfig():
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig


def is_int8_linear(module: nn.Module) -> bool:
    """A dynamically quantised Linear (not its inner packed-params holder)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return isinstance(module, DynamicQuantizedLinear)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 of every ``nn.Linear`` (in place; returns the model), for CPU inference."""
    if next(model.parameters()).dtype != torch.float32:
        raise SlimtuneError("int8 quantisation needs a float32 model (do not combine --int8 with --bf16)")
    with _quiet_deprecation():
        from torch.ao.quantization import quantize_dynamic

        # By name, not by type: a layer slimmed to nothing (all heads or neurons removed) keeps an
        # empty Linear, which the per-channel observer cannot quantise; it costs nothing as is.
        names = {name: _qconfig() for name, module in model.named_modules() if isinstance(module, nn.Linear) and module.weight.numel()}
        quantize_dynamic(model, names, inplace=True)
    return model


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors-ready state dict of a dynamically quantised model (see the module docstring)."""
    int8_names = {name for name, module in model.named_modules() if is_int8_linear(module)}
    # A dynamic Linear's own output scale/zero point are unused placeholders: not stored.
    state = {k: v for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and "_packed_params" not in k and k.rpartition(".")[0] not in int8_names}
    with _quiet_deprecation():
        for name, module in model.named_modules():
            if name not in int8_names:
                continue
            weight, bias = module._weight_bias()
            if weight.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
                raise SlimtuneError(f"'{name}': expected a per-channel int8 weight, got {weight.qscheme()}")
            state[f"{name}.weight"] = weight.int_repr()
            state[f"{name}.weight_scale"] = weight.q_per_channel_scales().to(torch.float64)
            state[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().to(torch.int64)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach()
    return state


def load_int8_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "model.safetensors") -> nn.Module:
    """Quantise the float skeleton ``model`` (right shapes) and load ``state`` into it."""
    quantize_int8(model)
    state = dict(state)
    with _quiet_deprecation():
        for name, module in model.named_modules():
            if not is_int8_linear(module):
                continue
            try:
                q = state.pop(f"{name}.weight")
                scale = state.pop(f"{name}.weight_scale")
                zero = state.pop(f"{name}.weight_zero_point")
            except KeyError as exc:
                raise SlimtuneError(f"{source}: int8 tensor {exc.args[0]!r} missing") from None
            if tuple(q.shape) != (module.out_features, module.in_features):
                raise SlimtuneError(f"{source}: '{name}.weight' has shape {tuple(q.shape)}, expected {(module.out_features, module.in_features)}")
            weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero.long(), 0)
            module.set_weight_bias(weight, state.pop(f"{name}.bias", None))
    # The float rest (embeddings, LayerNorms, ...) by name; load_state_dict would ask the int8
    # modules for their pickle-era keys.
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unexpected = sorted(set(state) - set(targets))
    if unexpected:
        raise SlimtuneError(f"{source}: tensor '{unexpected[0]}' not expected for this model")
    missing = sorted(n for n, _ in model.named_parameters() if n not in state)
    if missing:
        raise SlimtuneError(f"{source}: tensor '{missing[0]}' missing")
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(targets[name].shape) != tuple(tensor.shape):
                raise SlimtuneError(f"{source}: '{name}' has shape {tuple(tensor.shape)}, expected {tuple(targets[name].shape)}")
            targets[name].copy_(tensor)
    return model
