"""Per-sample gradients of a model's trainable parameters, clipped and summed, in one forward and
one backward pass, for any method.

The backward pass asks autograd for the gradients of the per-sample losses' sum with respect to
the *outputs* of the modules that own trainable parameters (never for the parameters themselves,
so autograd skips the batch weight gradients it would otherwise compute and throw away). Each
sample's gradient is then rebuilt per layer from the activations (captured by forward hooks)
and these output gradients ("backprops"), by the fastest exact rule for the layer:

* ``nn.Linear`` (full fine-tuning, heads, adapters' projections, BitFit biases): per-sample
  ``b_iᵀ a_i`` instantiated as a batched matmul, or, for wide layers on short sequences, only its
  norm ("ghost norm": ``‖g_i‖² = ⟨a_i a_iᵀ, b_i b_iᵀ⟩``) and then the clipped sum as one
  reweighted matmul, without ever holding per-sample weights;
* LoRA's ``A``/``B`` (inside :class:`~slimtune.methods.lora.LoRALinear`): tiny ``r``-wide
  per-sample matrices from the branch input and the layer's backprop;
* ``nn.Embedding``: ghost norm over equal token ids and a scatter-add of the clipped rows;
* ``nn.LayerNorm``: sums of ``b ⊙ x̂`` and ``b``;
* any other module that owns a trainable parameter (prompts, scales, Kronecker factors, new
  methods): the module's own forward re-run per sample under ``torch.func.vmap`` and
  differentiated with its captured backprop (Opacus' functorch rule, generalised to any
  signature);
* and a last resort that is always exact: the backward pass of the per-sample losses vmapped over
  one-hot output gradients (``is_grads_batched``), for parameters the rules above cannot see (e.g.
  a parameter of a container module that other modules read directly).

On its first batch the engine checks each rule: the sum of its per-sample gradients must equal
autograd's batch gradient; a rule that fails (a module whose parameter is used elsewhere, an
in-place op on a captured output, ...) is demoted to the last resort, so no method has to know
about DP for its gradients to be right.

Rules are a registry keyed by module type, as Opacus' ``register_grad_sampler``: ``@register_rule(
ModuleType)`` on a :class:`Rule` subclass; the exact type is looked up first, then its bases, then
the generic vmap rule. A method's own layer gets an exact rule by one registration here (LoRA's
below); methods never import this package.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from slimtune.methods.lora import LoRALinear

# Instantiating per-sample weight gradients writes and reads B*out*in floats; on CPU that memory
# traffic costs about as much as this many multiply-adds per element (measured on the dev box).
GHOST_MEMORY_FACTOR = 16.0


# --------------------------------------------------------------------------------------------
# Contributions: one rule's per-sample gradient of one parameter, dense or as a ghost.
# --------------------------------------------------------------------------------------------


class Dense:
    """Instantiated per-sample gradients ``(B, *param.shape)``."""

    def __init__(self, grads: torch.Tensor):
        self.grads = grads

    def dense(self) -> torch.Tensor:
        return self.grads

    def sq_norms(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.grads.flatten(1), dim=1).square()

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(weights.to(self.grads.dtype), self.grads, dims=1)


class GhostLinear:
    """Per-sample ``Σ_t b_t a_tᵀ`` kept as its factors ``a (B,T,in)``, ``b (B,T,out)``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b

    def dense(self) -> torch.Tensor:
        return torch.bmm(self.b.transpose(1, 2), self.a)

    def sq_norms(self) -> torch.Tensor:
        if self.a.shape[1] == 1:
            return self.a.pow(2).sum((1, 2)) * self.b.pow(2).sum((1, 2))
        return (torch.bmm(self.a, self.a.transpose(1, 2)) * torch.bmm(self.b, self.b.transpose(1, 2))).sum((1, 2))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        scaled = self.b * weights.to(self.b.dtype)[:, None, None]
        return scaled.flatten(0, 1).t() @ self.a.flatten(0, 1)


class GhostEmbedding:
    """Per-sample embedding gradients: rows ``ids`` receive ``b``; never a (B, vocab, dim) tensor."""

    def __init__(self, ids: torch.Tensor, b: torch.Tensor, num_embeddings: int, padding_idx: int | None):
        if padding_idx is not None:  # PyTorch gives the padding row no gradient
            b = b * (ids != padding_idx).unsqueeze(-1).to(b.dtype)
        self.ids, self.b, self.num_embeddings = ids, b, num_embeddings

    def dense(self) -> torch.Tensor:
        batch, dim = self.b.shape[0], self.b.shape[-1]
        out = self.b.new_zeros(batch, self.num_embeddings, dim)
        return out.scatter_add_(1, self.ids.unsqueeze(-1).expand(-1, -1, dim), self.b)

    def sq_norms(self) -> torch.Tensor:
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.b.dtype)
        return (same * torch.bmm(self.b, self.b.transpose(1, 2))).sum((1, 2))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        scaled = self.b * weights.to(self.b.dtype)[:, None, None]
        out = self.b.new_zeros(self.num_embeddings, self.b.shape[-1])
        return out.index_add_(0, self.ids.reshape(-1), scaled.reshape(-1, self.b.shape[-1]))


def _as_sequence(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d), T = the product of the middle dims (1 for (B, d))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


# --------------------------------------------------------------------------------------------
# Rules: which module, what it captures, what it contributes.
# --------------------------------------------------------------------------------------------


class _NotPerSample(Exception):
    """A module's output gradient is not one row per sample."""


class Call:
    """One call of a module in the forward pass: its inputs, its output, and later the output's gradient."""

    __slots__ = ("args", "kwargs", "output", "extra", "grad")

    def __init__(self, args, kwargs, output):
        self.args, self.kwargs, self.output, self.extra, self.grad = args, kwargs, output, None, None


#: Module type -> the rule that computes per-sample gradients of the parameters it owns directly.
RULES: dict[type[nn.Module], type[Rule]] = {}


def register_rule(*module_types: type[nn.Module]):
    """Class decorator: ``cls`` computes per-sample gradients for modules of these exact types."""

    def decorate(cls: type[Rule]) -> type[Rule]:
        for module_type in module_types:
            RULES[module_type] = cls
        return cls

    return decorate


def rule_for(module: nn.Module) -> type[Rule]:
    """The rule registered for ``module``'s exact type (a subclass may change the forward), if it
    accepts this module, else the generic vmap rule."""
    rule = RULES.get(type(module))
    return rule if rule is not None and rule.accepts(module) else ModuleVmapRule


class Rule(ABC):
    """How per-sample gradients of one module's parameters are rebuilt from its captured calls."""

    kind = "rule"

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], **options: Any):
        self.module = module
        self.params = params  # name -> parameter, the ones this rule covers
        self.calls: list[Call] = []

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this rule is exact for this instance of its module type."""
        return True

    def extra_hooks(self, capturing: Callable[[], bool]) -> list[Any]:
        """Hook handles capturing more than the module's own call (removed with the clipper)."""
        return []

    def reset(self) -> None:
        """Forget the captured calls (before each physical batch)."""
        self.calls = []

    def output_tensors(self, call: Call) -> list[torch.Tensor]:
        out = call.output
        return [out] if isinstance(out, torch.Tensor) and out.requires_grad else []

    @abstractmethod
    def contributions(self, dtype: torch.dtype) -> dict[str, Any]:
        """Per parameter name, this rule's per-sample gradient contributions (dense or ghost)."""

    def _backprop(self, call: Call, dtype: torch.dtype) -> torch.Tensor | None:
        return None if call.grad is None or call.grad[0] is None else call.grad[0].to(dtype)


@register_rule(nn.Linear)
class LinearRule(Rule):
    kind = "linear"

    def __init__(self, module, params, ghost: str = "auto", **options):
        super().__init__(module, params)
        self.ghost = ghost

    def use_ghost(self, seq_len: int) -> bool:
        if self.ghost != "auto":
            return self.ghost == "always"
        d_in, d_out = self.module.in_features, self.module.out_features
        return seq_len * seq_len * (d_in + d_out) < GHOST_MEMORY_FACTOR * d_in * d_out

    def contributions(self, dtype):
        out: dict[str, list] = {}
        weight_name = next((n for n, p in self.params.items() if p is self.module.weight), None)
        bias_name = next((n for n, p in self.params.items() if self.module.bias is not None and p is self.module.bias), None)
        for call in self.calls:
            b = self._backprop(call, dtype)
            if b is None:
                continue
            b = _as_sequence(b)
            if weight_name is not None:
                a = _as_sequence(call.args[0].detach().to(dtype))
                ghost = GhostLinear(a, b)
                out.setdefault(weight_name, []).append(ghost if self.use_ghost(a.shape[1]) and len(self.calls) == 1 else Dense(ghost.dense()))
            if bias_name is not None:
                out.setdefault(bias_name, []).append(Dense(b.sum(1)))
        return out


@register_rule(LoRALinear)
class LoRARule(Rule):
    """``y = base(x) + (d(x) Aᵀ)(s B)ᵀ``: capture ``d(x)`` at the dropout module, ``b`` at the layer."""

    kind = "lora"

    def __init__(self, module, params, **options):
        super().__init__(module, params)
        self.branch_inputs: list[torch.Tensor] = []

    def extra_hooks(self, capturing):
        def hook(module, args, output):
            if capturing():
                self.branch_inputs.append(output)

        return [self.module.dropout.register_forward_hook(hook)]

    def reset(self) -> None:
        super().reset()
        self.branch_inputs = []

    def contributions(self, dtype):
        layer = self.module
        out: dict[str, list] = {}
        names = {id(p): n for n, p in self.params.items()}
        if len(self.branch_inputs) != len(self.calls):
            raise RuntimeError("LoRA layer: branch inputs and calls do not pair up")
        for call, x in zip(self.calls, self.branch_inputs):
            b = self._backprop(call, dtype)
            if b is None:
                continue
            b = _as_sequence(b)
            x = _as_sequence(x.detach().to(dtype))
            a_weight, b_weight = layer.lora_A.detach().to(dtype), layer.lora_B.detach().to(dtype)
            if id(layer.lora_B) in names:
                u = x @ a_weight.t()  # (B, T, r)
                out.setdefault(names[id(layer.lora_B)], []).append(Dense(torch.bmm(b.transpose(1, 2), u) * layer.scaling))
            if id(layer.lora_A) in names:
                h = b @ (b_weight * layer.scaling)  # (B, T, r)
                out.setdefault(names[id(layer.lora_A)], []).append(Dense(torch.bmm(h.transpose(1, 2), x)))
        return out


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    kind = "embedding"

    @classmethod
    def accepts(cls, module) -> bool:
        return not module.sparse and module.max_norm is None

    def contributions(self, dtype):
        (name,) = self.params
        out = []
        for call in self.calls:
            b = self._backprop(call, dtype)
            if b is None:
                continue
            ids = call.args[0]
            if ids.shape[0] != b.shape[0]:  # e.g. position ids (1, T) shared by the batch
                ids = ids.expand(b.shape[0], *ids.shape[1:])
            ids = ids.reshape(b.shape[0], -1)
            out.append(GhostEmbedding(ids, _as_sequence(b), self.module.num_embeddings, self.module.padding_idx))
        return {name: out}


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    kind = "layernorm"

    def contributions(self, dtype):
        ln = self.module
        out: dict[str, list] = {}
        dims = len(ln.normalized_shape)
        for call in self.calls:
            b = self._backprop(call, dtype)
            if b is None:
                continue
            reduce = tuple(range(1, b.dim() - dims))
            for name, param in self.params.items():
                if param is ln.weight:
                    x = call.args[0].detach().to(dtype)
                    normed = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
                    grad = (b * normed).sum(reduce) if reduce else b * normed
                else:
                    grad = b.sum(reduce) if reduce else b
                out.setdefault(name, []).append(Dense(grad))
        return out


class ModuleVmapRule(Rule):
    """Any module: re-run its forward per sample under vmap and pull its backprop through it."""

    kind = "module-vmap"

    def output_tensors(self, call):
        leaves, _ = tree_flatten(call.output)
        call.extra = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        return [leaves[i] for i in call.extra]

    def contributions(self, dtype):
        from torch.func import functional_call, grad, vmap

        module = self.module
        local = {_local_name(module, p): n for n, p in self.params.items()}
        out: dict[str, list] = {}
        for call in self.calls:
            grads_out = [g for g in call.grad if g is not None] if call.grad else []
            if not grads_out:
                continue
            batch = grads_out[0].shape[0]
            leaves, spec = tree_flatten((call.args, call.kwargs))
            mapped = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in leaves]
            mapped_leaves = [t.detach() for t, m in zip(leaves, mapped) if m]
            fixed = {i: t for i, (t, m) in enumerate(zip(leaves, mapped)) if not m}
            used = [(position, g) for position, g in zip(call.extra, call.grad) if g is not None]
            positions = [position for position, _ in used]
            weights = {k: self.params[v].detach() for k, v in local.items()}

            def sample_objective(params, sample_leaves, sample_grads):
                it = iter(sample_leaves)
                full = [fixed[i] if i in fixed else next(it).unsqueeze(0) for i in range(len(leaves))]
                args, kwargs = tree_unflatten(full, spec)
                result = functional_call(module, params, tuple(args), kwargs)
                outputs = tree_flatten(result)[0]
                return sum((outputs[i] * g.unsqueeze(0)).sum() for i, g in zip(positions, sample_grads))

            grads = vmap(grad(sample_objective), in_dims=(None, 0, 0), randomness="same")(weights, mapped_leaves, [g for _, g in used])
            for key, name in local.items():
                out.setdefault(name, []).append(Dense(grads[key].to(dtype)))
        return out


def _local_name(module: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in module.named_parameters(recurse=False) if p is param)


# --------------------------------------------------------------------------------------------
# The engine.
# --------------------------------------------------------------------------------------------


class PerSampleClipper:
    """Clipped per-sample gradient sums of ``params`` (name -> parameter) of ``model``."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], *, ghost: str = "auto", check: bool = True):
        self.model = model
        self.params = dict(params)
        self.capturing = False
        self.batch_size = 0
        self.check_pending = check
        self.rules: list[Rule] = []
        self.fallback: dict[str, nn.Parameter] = {}
        self._handles: list[Any] = []
        by_id = {id(p): n for n, p in self.params.items()}
        covered: set[str] = set()
        for module in model.modules():
            own = {by_id[id(p)]: p for p in module.parameters(recurse=False) if id(p) in by_id}
            if not own:
                continue
            rule = rule_for(module)(module, own, ghost=ghost)
            self._add(rule)
            self._handles += rule.extra_hooks(lambda: self.capturing)
            covered |= set(own)
        # Tied parameters are found under every module that holds them; any left are the fallback's.
        self.fallback = {n: p for n, p in self.params.items() if n not in covered}

    def _add(self, rule: Rule) -> None:
        self.rules.append(rule)
        self._handles.append(rule.module.register_forward_hook(self._call_hook(rule), with_kwargs=True))

    def _call_hook(self, rule: Rule) -> Callable:
        def hook(module, args, kwargs, output):
            if not self.capturing:
                return None
            batch = self.batch_size
            if (
                batch > 1 and isinstance(output, torch.Tensor) and output.dim() > 0 and output.shape[0] == 1
                and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0 and args[0].shape[0] == 1
            ):
                # A module applied to an input shared by the batch (position ids (1, T)): its
                # output is broadcast later, so autograd would sum the samples' gradients.
                # An expanded view keeps them apart at no cost.
                output = output.expand(batch, *output.shape[1:])
                args = (args[0].expand(batch, *args[0].shape[1:]), *args[1:])
                rule.calls.append(Call(args, kwargs, output))
                return output
            rule.calls.append(Call(args, kwargs, output))
            return None

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def describe(self) -> dict[str, str]:
        """Parameter name -> the rule computing its per-sample gradients."""
        out = {n: rule.kind for rule in self.rules for n in rule.params if n not in self.fallback}
        out.update({n: "batched-backward" for n in self.fallback})
        return out

    # -- one physical batch -------------------------------------------------------------------
    def per_sample(self, forward: Callable[[], torch.Tensor], batch_size: int) -> tuple[torch.Tensor, dict[str, list]]:
        """Run ``forward`` (-> per-sample losses, shape (B,)) and return the losses and, per
        parameter, its contributions (each with ``sq_norms``/``weighted_sum``/``dense``)."""
        self.batch_size = batch_size
        for rule in self.rules:
            rule.reset()
        self.capturing = True
        try:
            losses = forward()
        finally:
            self.capturing = False
        dtype = next(iter(self.params.values())).dtype
        active = [r for r in self.rules if any(n not in self.fallback for n in r.params)]
        outputs: list[torch.Tensor] = []
        slots: list[tuple[Call, int, int]] = []
        for rule in active:
            for call in rule.calls:
                tensors = rule.output_tensors(call)
                slots.append((call, len(outputs), len(tensors)))
                outputs.extend(tensors)
        total = losses.sum()
        # The graph is kept for the first-batch check and for the fallback; otherwise freed as
        # the backward pass goes, as in a plain step.
        graph_alive = self.check_pending or bool(self.fallback) or not outputs
        if outputs:
            grads = torch.autograd.grad(total, outputs, allow_unused=True, retain_graph=graph_alive)
            for call, start, count in slots:
                call.grad = list(grads[start : start + count])
        contributions: dict[str, list] = {n: [] for n in self.params}
        for rule in active:
            try:
                if any(g is not None and g.dim() > 0 and g.shape[0] != losses.shape[0] for call in rule.calls for g in (call.grad or [])):
                    raise _NotPerSample
                found = rule.contributions(dtype)
            except Exception as exc:  # not batch-aligned, or data-dependent control flow under vmap
                if not isinstance(rule, ModuleVmapRule) and not isinstance(exc, _NotPerSample):
                    raise
                self.fallback.update(rule.params)
                continue
            for name, items in found.items():
                if name not in self.fallback:
                    contributions[name].extend(items)
        if self.check_pending:
            self.check_pending = False
            low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in outputs)
            names = [n for n in self.params if n not in self.fallback]
            reference = torch.autograd.grad(total, [self.params[n] for n in names], allow_unused=True, retain_graph=True)
            for name, ref in zip(names, reference):
                ref = torch.zeros_like(self.params[name]) if ref is None else ref.to(dtype)
                items = contributions[name]
                got = sum(item.weighted_sum(torch.ones(losses.shape[0], dtype=dtype)) for item in items) if items else torch.zeros_like(ref)
                scale = float(ref.abs().max()) + 1e-12
                # bf16 autocast: autograd's reference and our fp32 products differ by rounding;
                # a broken rule (zeros, wrong sample, in-place op) is off by O(1) either way.
                rtol = 5e-2 if low_precision else 1e-3
                if float((got - ref).abs().max()) > rtol * scale + (1e-5 if dtype == torch.float32 else 1e-10):
                    warnings.warn(f"per-sample gradients of '{name}': the module rule disagrees with autograd; using the batched-backward fallback", stacklevel=2)
                    self.fallback[name] = self.params[name]
                    contributions[name] = []
        if self.fallback:
            names = list(self.fallback)
            batch = losses.shape[0]
            graph_losses = losses if graph_alive else forward()  # a rule failed after its first batch
            eye = torch.eye(batch, dtype=graph_losses.dtype)
            grads = torch.autograd.grad(graph_losses, [self.params[n] for n in names], grad_outputs=eye, is_grads_batched=True, allow_unused=True)
            for name, g in zip(names, grads):
                g = torch.zeros((batch, *self.params[name].shape), dtype=dtype) if g is None else g.to(dtype)
                contributions[name] = [Dense(g)]
        return losses.detach(), contributions

    def clipped_sum(self, forward: Callable[[], torch.Tensor], batch_size: int, max_grad_norm: float, into: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``Σ_i clip(g_i)`` to ``into`` (name -> tensor); return the losses and per-sample norms."""
        losses, contributions = self.per_sample(forward, batch_size)
        batch = losses.shape[0]
        dtype = next(iter(self.params.values())).dtype
        sq = torch.zeros(batch, dtype=dtype)
        merged: dict[str, Any] = {}
        for name, items in contributions.items():
            if not items:
                continue
            item = items[0] if len(items) == 1 else Dense(sum(i.dense() for i in items))
            merged[name] = item
            sq = sq + item.sq_norms()
        norms = sq.clamp_min(0).sqrt()
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, item in merged.items():
            into[name].add_(item.weighted_sum(factors).reshape(into[name].shape).to(into[name].dtype))
        return losses, norms

