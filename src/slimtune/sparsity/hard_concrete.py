"""Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through
L0 Regularization") as a parametrisation of any tensor, the way Robust Tickets (Zheng et al.
2022) gate the weights of a fine-tuned BERT (official code: ruizheng20/robust_ticket,
``masked_linear.py`` ``L0Mask``; asappresearch/flop ``flop/hardconcrete.py`` is the same
distribution).

``apply_gate(module, "weight", granularity=...)`` registers :class:`HardConcreteGate` with
``torch.nn.utils.parametrize``, like :class:`slimtune.sparsity.masks.Mask`: ``module.weight``
reads ``original * gate`` (the gate broadcast onto the tensor), the dense value stays in
``module.parametrizations.weight.original`` and the learnable ``log_alpha`` lives on the gate.
It works on a base weight as on any delta's parameter (a LoRA factor, an adapter projection).

The distribution (defaults of the official code: l, r = -0.1, 1.1, beta = 2/3):

- training (the gate module's ``training`` flag, so ``model.train()``/``model.eval()`` switch
  it): u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
  s_bar = s (r - l) + l, z = min(1, max(0, s_bar)); one fresh sample per read of the tensor
  (inside ``parametrize.cached()`` one per forward);
- test: z = min(1, max(0, sigmoid(log_alpha) (r - l) + l)), the official code's (and the
  paper's) deterministic gate;
- expected L0: sum over gates of P(z != 0) = sigmoid(log_alpha - beta log(-l / r)).

Initialisation follows the official ``L0Mask.init_weights``: for ``keep_prob`` p (0.9),
log_alpha = log(q / (1 - q)) with q = (p - l) / (r - l), i.e. the *test-time gate* is p at
init (P(z != 0) at init is then about 0.96, not p).

Deliberate deviations from the official code, each labelled:

- u is clamped to [1e-6, 1 - 1e-6] (official: [1e-4, 0.9999]); both only keep log finite,
  the narrower clamp distorts the tails less;
- ``expected_l0`` is the paper's sum; the official ``regularizer()`` divides each layer's sum
  by its number of gates (a mean per layer) — ``gate_l0(..., reduction="mean")`` gives that;
- block gates cover contiguous blocks; the official ``out_w_per_mask``/``in_w_per_mask``
  reshape ties a gate to rows i, i + out/k, i + 2 out/k, ... (strided), which is not a block.

A ticket is drawn from the gate scores as in the official ``draw_retrain_ticket.py``: keep the
top fraction of gates by sigmoid(log_alpha) (the same order as log_alpha), globally over every
gated tensor (official) or per tensor; ties are broken in a fixed order (``kept_from_scores``).
:func:`draw_ticket` removes the gates and hands the binary masks to ``masks.apply_mask``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.errors import SlimtuneError
from slimtune.sparsity.masks import apply_mask, dense_tensor, kept_from_scores

GRANULARITIES = ("weight", "row", "column", "head", "block")
_U_EPS = 1e-6


def check_gate_settings(keep_prob: float, beta: float, limits: tuple[float, float]) -> None:
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, (int, float)) or not 0 < keep_prob < 1:
        raise SlimtuneError(f"hard_concrete.keep_prob: {keep_prob!r} is not a probability in (0, 1)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise SlimtuneError(f"hard_concrete.beta: {beta!r} is not a temperature; it must be > 0 (official 2/3)")
    try:
        l, r = (float(x) for x in limits)
    except (TypeError, ValueError):
        raise SlimtuneError(f"hard_concrete.limits: {limits!r} is not a pair (l, r) with l < 0 and r > 1") from None
    if not (l < 0 and r > 1):
        raise SlimtuneError(f"hard_concrete.limits: {limits!r} needs l < 0 and r > 1 (official (-0.1, 1.1))")


def group_sizes(shape: tuple[int, ...], granularity: str, head_size: int | None = None, head_dim: int = 0,
                block: tuple[int, int] | None = None) -> tuple[int, ...]:
    """How many entries of the tensor one gate covers along each dimension."""
    shape = tuple(shape)
    if granularity not in GRANULARITIES:
        raise SlimtuneError(f"hard_concrete.granularity: '{granularity}' is unknown; valid: {', '.join(GRANULARITIES)}")
    if granularity == "weight":
        return (1,) * len(shape)
    if granularity == "head":
        if not isinstance(head_size, int) or isinstance(head_size, bool) or head_size < 1:
            raise SlimtuneError(f"hard_concrete.head_size: {head_size!r} is not a positive integer (granularity head)")
        if head_dim not in range(len(shape)):
            raise SlimtuneError(f"hard_concrete.head_dim: {head_dim!r} is not a dimension of a tensor of shape {shape}")
        if shape[head_dim] % head_size:
            raise SlimtuneError(f"hard_concrete.head_size: {head_size} does not divide dimension {head_dim} of shape {shape}")
        # A head gate covers head_size rows (q/k/v, head_dim 0) or columns (attention output,
        # head_dim 1) across the whole other dimension.
        return tuple(head_size if d == head_dim else n for d, n in enumerate(shape))
    if len(shape) != 2:
        raise SlimtuneError(f"hard_concrete.granularity: '{granularity}' needs a 2-d tensor, got shape {shape}; use weight or head")
    if granularity == "row":
        return (1, shape[1])
    if granularity == "column":
        return (shape[0], 1)
    if (block is None or len(block) != 2 or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in block)):
        raise SlimtuneError(f"hard_concrete.block: {block!r} is not a pair of positive integers (granularity block)")
    if shape[0] % block[0] or shape[1] % block[1]:
        raise SlimtuneError(f"hard_concrete.block: {tuple(block)} does not divide shape {shape}")
    return tuple(block)


class HardConcreteGate(nn.Module):
    """``X -> X * expand(z)`` with z a hard-concrete gate per group of entries of X."""

    def __init__(self, shape: tuple[int, ...], granularity: str = "weight", *, head_size: int | None = None,
                 head_dim: int = 0, block: tuple[int, int] | None = None, keep_prob: float = 0.9,
                 beta: float = 2 / 3, limits: tuple[float, float] = (-0.1, 1.1)):
        super().__init__()
        check_gate_settings(keep_prob, beta, limits)
        self.shape = tuple(shape)
        self.granularity = granularity
        self.groups = group_sizes(self.shape, granularity, head_size, head_dim, block)
        self.gate_shape = tuple(n // g for n, g in zip(self.shape, self.groups))
        self.beta = float(beta)
        self.l, self.r = (float(x) for x in limits)
        self.keep_prob = float(keep_prob)
        # Official L0Mask.init_weights: the test-time gate sigmoid(log_alpha)(r - l) + l = keep_prob.
        q = (self.keep_prob - self.l) / (self.r - self.l)
        self.log_alpha = nn.Parameter(torch.full(self.gate_shape, math.log(q / (1 - q))))

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(_U_EPS, 1 - _U_EPS)
        # logit(u) = log u - log(1 - u), in one op (the gate is sampled on every forward).
        s = torch.sigmoid((torch.logit(u) + self.log_alpha) / self.beta)
        return (s * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def gate(self) -> torch.Tensor:
        """z in the gates' shape: a sample while training, the deterministic gate otherwise."""
        return self.sample() if self.training else self.deterministic()

    def prob_nonzero(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.l / self.r))

    def expected_l0(self, weighted: bool = False) -> torch.Tensor:
        """Expected number of non-zero gates; ``weighted``: of non-zero entries of the tensor."""
        total = self.prob_nonzero().sum()
        return total * math.prod(self.groups) if weighted else total

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Gates -> the tensor's shape (each gate repeated over its contiguous group)."""
        interleaved = [x for pair in zip(self.gate_shape, (1,) * len(self.shape)) for x in pair]
        sized = [x for pair in zip(self.gate_shape, self.groups) for x in pair]
        return z.reshape(interleaved).expand(sized).reshape(self.shape)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.expand(self.gate()).to(X.dtype)

    def extra_repr(self) -> str:
        return f"granularity={self.granularity}, gates={tuple(self.gate_shape)}, beta={self.beta:.4g}, limits=({self.l}, {self.r})"


def get_gate(module: nn.Module, tensor_name: str) -> HardConcreteGate | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, HardConcreteGate):
            return p
    return None


def apply_gate(module: nn.Module, tensor_name: str, granularity: str = "weight", **settings) -> HardConcreteGate:
    """Gate ``module.<tensor_name>`` (settings: head_size, head_dim, block, keep_prob, beta, limits)."""
    if get_gate(module, tensor_name) is not None:
        raise SlimtuneError(f"hard_concrete: '{tensor_name}' of {type(module).__name__} is already gated")
    dense = dense_tensor(module, tensor_name)
    gate = HardConcreteGate(tuple(dense.shape), granularity, **settings).to(device=dense.device)
    gate.train(module.training)
    parametrize.register_parametrization(module, tensor_name, gate)
    return gate


def gated_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, HardConcreteGate]]:
    """Every gated tensor of ``model``: (clean name, module, tensor name, gate)."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            gate = get_gate(module, tensor_name)
            if gate is not None:
                yield (f"{module_name}.{tensor_name}" if module_name else tensor_name), module, tensor_name, gate


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every gate's log_alpha (what a mask search trains)."""
    return [gate.log_alpha for _, _, _, gate in gated_tensors(model)]


def gate_l0(model: nn.Module, reduction: str = "sum", weighted: bool = False) -> torch.Tensor:
    """The expected-L0 penalty over every gate of ``model``: ``sum`` (the paper) or ``mean``
    (each tensor's expected L0 over its number of gates, summed over tensors: the official
    ``regularizer()``); ``weighted`` counts covered entries instead of gates (sum only)."""
    if reduction not in ("sum", "mean"):
        raise SlimtuneError(f"hard_concrete.reduction: '{reduction}' is unknown; valid: sum, mean")
    if weighted and reduction == "mean":
        raise SlimtuneError("hard_concrete.weighted: only with reduction sum")
    terms = []
    for _, _, _, gate in gated_tensors(model):
        l0 = gate.expected_l0(weighted)
        terms.append(l0 / gate.log_alpha.numel() if reduction == "mean" else l0)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def set_gate_sampling(model: nn.Module, sampling: bool) -> None:
    """Sample (True) or use the deterministic gate (False) regardless of the rest of the model;
    ``model.train()``/``model.eval()`` set it back to the model's mode."""
    for _, _, _, gate in gated_tensors(model):
        gate.train(sampling)


def ticket_masks(model: nn.Module, density: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Binary masks in each gated tensor's shape keeping ``round(density * gates)`` gates with
    the highest log_alpha (over all gated tensors together for ``global``, the official way)."""
    gated = list(gated_tensors(model))
    if not gated:
        raise SlimtuneError("hard_concrete: the model has no hard-concrete gates to draw a ticket from")
    scores = {name: gate.log_alpha.detach() for name, _, _, gate in gated}
    kept = kept_from_scores(scores, density, scope)
    return {name: gate.expand(kept[name]) for name, _, _, gate in gated}


def draw_ticket(model: nn.Module, density: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Replace every gate by the binary ``Mask`` of :func:`ticket_masks` (the dense values are
    untouched); returns the masks by clean tensor name."""
    masks = ticket_masks(model, density, scope)
    for name, module, tensor_name, _ in list(gated_tensors(model)):
        if len(module.parametrizations[tensor_name]) != 1:
            raise SlimtuneError(f"hard_concrete: '{name}' has another parametrisation beside its gate; remove it before drawing a ticket")
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        apply_mask(module, tensor_name, masks[name])
    return masks
