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

A layer that reads parameters it does not own (factors shared by every layer: Compacter's rules,
FacT's U/V, KAdaptation's slow weights) declares them by ``shared_modules()``; its rule then
differentiates them too, and the per-sample gradient of a shared tensor is the sum of every
reader's share.

A sparsity mask (a parametrisation ``original * kept``) keeps the layer's rule: the rule gives the
gradient of the tensor the forward reads, times ``kept``. When masks are added or removed during
training (a pruning schedule), the rules are rebuilt and checked again.

On its first batch, and once more after ``recheck_after`` batches (when the parameters have left
their init, where a wrong rule can agree by accident), the engine checks each rule: the sum of its
per-sample gradients must equal autograd's batch gradient; a rule that fails (a module whose parameter is used elsewhere, an
in-place op on a captured output, ...) is demoted to the last resort, so no method has to know
about DP for its gradients to be right. Each parameter sent to the last resort is named, with the
reason, in :attr:`PerSampleClipper.slow` (the DP hook prints it once, in one line).

The rules are a registry keyed by exact module type (:mod:`slimtune.privacy.rules`, as Opacus'
``register_grad_sampler``); this module is the clipper that applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.privacy.contributions import Dense, Masked
from slimtune.privacy.rules import SHARED_PREFIX, Call, ModuleVmapRule, NotPerSample, Rule, rule_for, tensor_name
from slimtune.sparsity.masks import Mask


# --------------------------------------------------------------------------------------------
# The engine.
# --------------------------------------------------------------------------------------------


class PerSampleClipper:
    """Clipped per-sample gradient sums of ``params`` (name -> parameter) of ``model``."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], *, ghost: str = "auto", check: bool = True,
                 recheck_after: int | None = 20):
        self.model = model
        self.params = dict(params)
        self.ghost = ghost
        self.check = check
        # The first batch sees the parameters at their init, where a wrong rule can agree by
        # accident (a vector of ones, a zero factor): check once more after they have moved.
        self.recheck_after = recheck_after
        self.batches_seen = 0
        self.capturing = False
        self.batch_size = 0
        self.rules: list[Rule] = []
        self.fallback: dict[str, nn.Parameter] = {}
        #: Parameter name -> why it takes the slow batched-backward path (empty when none does).
        self.slow: dict[str, str] = {}
        self._handles: list[Any] = []
        self._build()

    def _structure(self) -> tuple:
        """What the rules depend on beyond the parameters: which tensors are parametrised (masks
        come and go during pruning schedules) and which forwards are swapped (QAT)."""
        return tuple(
            (id(m), tuple(m.parametrizations.keys()) if parametrize.is_parametrized(m) else (), "forward" in m.__dict__)
            for m in self.model.modules() if parametrize.is_parametrized(m) or "forward" in m.__dict__
        )

    def _build(self) -> None:
        self.remove()
        self.rules, self.fallback, self.slow = [], {}, {}
        self.masks: dict[str, Mask] = {}
        self.check_pending = self.check
        by_id = {id(p): n for n, p in self.params.items()}
        # Shared containers' parameters belong to the layers that read them, not to the container.
        read_by_layers = {id(p) for m in self.model.modules() for c in getattr(m, "shared_modules", lambda: [])() for p in c.parameters()}
        taken = set(read_by_layers)  # ids another module's rule covers
        covered: set[str] = set()
        for module in self.model.modules():
            if isinstance(module, parametrize.ParametrizationList):
                continue  # its ``original`` is read through the module that holds the list
            own = {by_id[id(p)]: p for p in module.parameters(recurse=False) if id(p) in by_id and id(p) not in taken}
            tensors = {n: tensor_name(module, p) for n, p in own.items()}
            only_masks = True
            if parametrize.is_parametrized(module):
                for tensor, chain in module.parametrizations.items():
                    name = by_id.get(id(chain.original))
                    if name is None or id(chain.original) in taken:
                        continue
                    own[name], tensors[name] = chain.original, tensor
                    if len(chain) == 1 and isinstance(chain[0], Mask):
                        self.masks[name] = chain[0]
                    else:
                        only_masks = False
            # Parameters of shared containers this layer reads (each reader adds its share).
            shared = getattr(module, "shared_modules", lambda: [])()
            for index, container in enumerate(shared):
                for local, p in container.named_parameters():
                    if id(p) in by_id:
                        own[by_id[id(p)]], tensors[by_id[id(p)]] = p, f"{SHARED_PREFIX}{index}.{local}"
            rule_class = rule_for(module) if only_masks else ModuleVmapRule  # vmap differentiates any parametrisation
            if shared and not rule_class.reads_shared:
                rule_class = ModuleVmapRule
            for child in rule_class.absorbs(module):
                child_name = next(n for n, m in module.named_children() if m is child)
                for p in child.parameters():
                    if id(p) in by_id and id(p) not in taken:
                        own[by_id[id(p)]], tensors[by_id[id(p)]] = p, f"{child_name}.{tensor_name(child, p)}"
                        taken.add(id(p))
            if not own:
                continue
            rule = rule_class(module, own, tensors, ghost=self.ghost)
            self._add(rule)
            self._handles += rule.extra_hooks(lambda: self.capturing)
            covered |= set(own)
        # Tied parameters are found under every module that holds them; any left are the fallback's.
        self.fallback = {n: p for n, p in self.params.items() if n not in covered}
        self.slow = {n: "no module owns it directly (read by another module)" for n in self.fallback}
        self._built_for = self._structure()

    def _add(self, rule: Rule) -> None:
        """Capture the rule's module calls. Other hooks on the module (IA3's scaling, the Houlsby
        skip) are part of what a replaying rule re-runs, so it takes the inputs before every
        pre-hook and the output after every hook; an exact rule takes the layer's own output,
        before any hook changes it (its backprop is then the gradient of that output)."""
        self.rules.append(rule)
        module = rule.module
        if rule.replays_forward:
            raw: list[tuple] = []

            def before(module, args, kwargs):
                if self.capturing:
                    raw.append((args, kwargs))

            self._handles.append(module.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
            self._handles.append(module.register_forward_hook(self._call_hook(rule, raw), with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(self._call_hook(rule), with_kwargs=True, prepend=True))

    def _call_hook(self, rule: Rule, raw: list[tuple] | None = None) -> Callable:
        def hook(module, args, kwargs, output):
            if not self.capturing:
                return None
            if raw:
                args, kwargs = raw.pop()
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
                rule.on_call(rule.calls[-1])
                return output
            rule.calls.append(Call(args, kwargs, output))
            rule.on_call(rule.calls[-1])
            return None

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _demote(self, rule: Rule, names, reason: str) -> None:
        for name in names:
            self.fallback[name] = self.params[name]
            self.slow[name] = f"{reason} ({rule.kind} rule, {type(rule.module).__name__})"

    def slow_notice(self) -> str | None:
        """One line naming the parameters on the slow exact path, and why (None when none is)."""
        if not self.slow:
            return None
        names = list(self.slow)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        reasons = "; ".join(dict.fromkeys(self.slow.values()))
        return f"DP: {len(names)} parameter(s) take the slow exact per-sample path (one backward pass per sample): {shown}; why: {reasons}"

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
        if self._structure() != self._built_for:
            self._build()  # a mask was added or removed, or QAT switched on: new rules, checked again
        self.batches_seen += 1
        if self.check and self.recheck_after is not None and self.batches_seen == self.recheck_after + 1:
            self.check_pending = True
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
                    raise NotPerSample
                found = rule.contributions(dtype)
            except Exception as exc:  # not batch-aligned, or data-dependent control flow under vmap
                if not isinstance(rule, ModuleVmapRule) and not isinstance(exc, NotPerSample):
                    raise
                why = "its output gradient is not one row per sample" if isinstance(exc, NotPerSample) else f"vmap failed: {type(exc).__name__}"
                self._demote(rule, rule.params, why)
                continue
            for name, items in found.items():
                if name in self.fallback:
                    continue
                if name in self.masks and not rule.through_parametrizations:
                    items = [Masked(item, self.masks[name].kept) for item in items]
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
                    rule = next(r for r in self.rules if name in r.params)
                    self._demote(rule, [name], "the rule's sum disagrees with autograd's batch gradient")
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


