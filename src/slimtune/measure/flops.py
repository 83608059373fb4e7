"""Forward FLOPs per example.

Definition used on the report card: the FLOPs of one forward pass (inference, no gradients)
divided by the batch size, as counted by ``torch.utils.flop_counter.FlopCounterMode``. That
counter follows the usual convention of 2 FLOPs per multiply-accumulate and counts matrix
products and convolutions only (``mm``/``addmm``/``bmm``/``baddbmm``/convolutions/registered
attention kernels); element-wise work (softmax, LayerNorm, GELU, bias adds, masking, embedding
look-ups) counts 0. For a BERT layer on ``T`` tokens with hidden ``d`` and FFN width ``f`` this is
exactly ``2*T*(4*d*d + 2*d*f) + 4*T*T*d`` (the projections, then ``Q K^T`` and ``A V``).

Two kernels need care:

* **Attention.** The CPU scaled-dot-product-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) is not in the counter's registry and
  would count 0, silently dropping the ``Q K^T`` and ``A V`` products. While counting, every
  Hugging Face config reachable from the model is switched to ``"eager"`` attention (plain
  matmuls, which are counted) and switched back afterwards, so the count does not depend on the
  attention backend the model was loaded with.
* **Quantised linears.** ``torch.ao`` quantised ``Linear`` kernels are invisible to the counter.
  Their multiply-accumulates are added from their shapes (``2 * rows * in * out``, the same
  count the counter gives a float ``addmm``), so an int8 model reports the FLOPs of its float
  twin. For other opaque kernels pass ``shapes_from=`` a float twin to count instead.

``analytic_linear_flops`` gives the quick closed form ``2 * tokens * sum(in*out)`` over all
linear layers: exact for layers that see every token, an over-count for heads that read one
pooled token, and without the attention products.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimtune.errors import SlimtuneError
from slimtune.measure.latency import batch_size_of, call_model, eval_mode
from slimtune.zoo.hf_helpers import eager_attention

__all__ = ["flops_per_example", "eager_attention", "analytic_linear_flops", "linear_features"]


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a float or ``torch.ao`` quantised Linear, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_quantized_linear(module):
        return int(module.in_features), int(module.out_features)
    return None


def _is_quantized_linear(module: nn.Module) -> bool:
    return (
        type(module).__module__.startswith("torch.ao.nn.quantized")
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and "Linear" in type(module).__name__
    )


@contextmanager
def _count_quantized_linears(model: nn.Module) -> Iterator[list[int]]:
    """Forward hooks that add ``2 * rows * in * out`` for every quantised Linear call."""
    counts: list[int] = []
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and module.in_features:
            rows = x.numel() // module.in_features
            counts.append(2 * rows * module.in_features * module.out_features)

    for module in model.modules():
        if _is_quantized_linear(module):
            handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def flops_per_example(
    model: nn.Module,
    inputs: Mapping[str, Any] | torch.Tensor | tuple | list,
    *,
    shapes_from: nn.Module | None = None,
    batch_size: int | None = None,
    eager: bool = True,
) -> int:
    """Forward FLOPs per example of ``model`` on ``inputs`` (see the module docstring).

    Args:
        model: the model measured.
        inputs: one batch, passed as ``model(**inputs)`` (mapping) or ``model(inputs)``.
        shapes_from: count this module instead of ``model`` (e.g. the float twin of a model
            whose kernels the counter cannot see); it must accept the same inputs.
        batch_size: the divisor; default: dim 0 of ``input_ids``/``pixel_values``/first tensor.
        eager: switch Hugging Face attention to eager while counting (default; leave on unless
            you want to see what the counter makes of another backend).

    Returns:
        ``round(total_flops / batch_size)``.
    """
    target = shapes_from if shapes_from is not None else model
    n = batch_size if batch_size is not None else batch_size_of(inputs)
    if n <= 0:
        raise SlimtuneError(f"batch size must be positive, got {n}")
    with ExitStack() as stack:
        stack.enter_context(eval_mode(target))
        if eager:
            stack.enter_context(eager_attention(target))
        stack.enter_context(torch.no_grad())
        quant = stack.enter_context(_count_quantized_linears(target))
        counter = stack.enter_context(FlopCounterMode(display=False))
        call_model(target, inputs)
    total = int(counter.get_total_flops()) + sum(quant)
    return int(round(total / n))


def analytic_linear_flops(model: nn.Module, tokens: int) -> int:
    """``2 * tokens * sum(in_features * out_features)`` over every (float or quantised) Linear.

    The forward FLOPs of the linear layers of one example of ``tokens`` tokens, assuming every
    linear sees every token; no attention products, no element-wise work.
    """
    total = 0
    for module in model.modules():
        feats = linear_features(module)
        if feats is not None:
            total += feats[0] * feats[1]
    return 2 * int(tokens) * total
