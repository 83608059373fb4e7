"""A mask as a parametrisation of any tensor: a base weight, a delta's parameter (adapter
projection, LoRA factor) or a merged weight.

``apply_mask(module, "weight", kept)`` registers :class:`Mask` with
``torch.nn.utils.parametrize``: ``module.weight`` then reads ``original * kept`` while the dense
value stays in ``module.parametrizations.weight.original`` (the same ``Parameter`` object, so an
optimizer built earlier still holds it). The product routes the gradient through ``kept``, so
masked entries get exactly zero gradient, and the effective tensor is zero there whatever the
optimizer does to the dense value.

AdamW would still move the *dense* value of masked entries (decoupled weight decay shrinks every
entry; stale Adam moments keep pushing entries masked mid-training). :func:`pin_to_optimizer`
prevents that: an optimizer step pre-hook saves the masked entries, the post-hook writes them
back and zeroes the Adam moments there. So the stored dense value is never silently changed,
and ``restore`` (removing a mask without baking) gives back exactly what was there.

Names: a parametrised tensor appears in ``named_parameters()`` as
``<module>.parametrizations.<name>.original``; :func:`clean_name` maps it back to
``<module>.<name>``, the name saved in deltas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.errors import SlimtuneError


class Mask(nn.Module):
    """``X -> X * kept``; ``kept`` is a boolean buffer of X's shape."""

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.register_buffer("kept", kept.detach().to(torch.bool).clone())

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.kept.to(X.dtype)

    @property
    def density(self) -> float:
        return float(self.kept.float().mean()) if self.kept.numel() else 1.0

    def extra_repr(self) -> str:
        return f"density={self.density:.4f}"


def clean_name(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (other names unchanged)."""
    if ".parametrizations." in name and name.endswith(".original"):
        head, _, rest = name.partition(".parametrizations.")
        return f"{head}.{rest[: -len('.original')]}"
    if name.startswith("parametrizations.") and name.endswith(".original"):
        return name[len("parametrizations."): -len(".original")]
    return name


def split_name(name: str) -> tuple[str, str]:
    module_name, _, tensor_name = clean_name(name).rpartition(".")
    return module_name, tensor_name


def get_mask(module: nn.Module, tensor_name: str) -> Mask | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, Mask):
            return p
    return None


def dense_tensor(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The stored dense tensor (the ``Parameter`` itself), masked or not."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def apply_mask(module: nn.Module, tensor_name: str, kept: torch.Tensor) -> Mask:
    """Mask ``module.<tensor_name>`` with ``kept`` (True = kept); a second call replaces the
    mask in place (a pruning schedule tightens it) rather than stacking another."""
    dense = dense_tensor(module, tensor_name)
    if kept.shape != dense.shape:
        raise SlimtuneError(f"mask for '{tensor_name}' has shape {tuple(kept.shape)}, the tensor {tuple(dense.shape)}")
    existing = get_mask(module, tensor_name)
    if existing is not None:
        existing.kept.copy_(kept.to(torch.bool))
        return existing
    mask = Mask(kept.to(dense.device))
    parametrize.register_parametrization(module, tensor_name, mask)
    return mask


def remove_mask(module: nn.Module, tensor_name: str, bake: bool) -> None:
    """Remove the mask: ``bake=True`` writes the zeros into the tensor for good (the dense
    values of masked entries are dropped); ``bake=False`` restores the dense tensor."""
    if get_mask(module, tensor_name) is None:
        return
    original = module.parametrizations[tensor_name].original
    if bake:
        with torch.no_grad():
            original.mul_(get_mask(module, tensor_name).kept.to(original.dtype))
    # leave_parametrized=False keeps `original` (same Parameter object) as the plain tensor.
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


def masked_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Mask]]:
    """Every masked tensor of ``model``: (clean name, module, tensor name, mask)."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            mask = get_mask(module, tensor_name)
            if mask is not None:
                yield (f"{module_name}.{tensor_name}" if module_name else tensor_name), module, tensor_name, mask


def density_report(model: nn.Module) -> dict[str, Any]:
    """Density (fraction kept) per masked tensor and overall."""
    per_tensor, kept, total = {}, 0, 0
    for name, _, _, mask in masked_tensors(model):
        n_kept, n = int(mask.kept.sum()), mask.kept.numel()
        per_tensor[name] = n_kept / n if n else 1.0
        kept += n_kept
        total += n
    return {"density": kept / total if total else 1.0, "kept": kept, "total": total, "per_tensor": per_tensor}


def bake_all(model: nn.Module) -> None:
    for _, module, tensor_name, _ in list(masked_tensors(model)):
        remove_mask(module, tensor_name, bake=True)


def restore_all(model: nn.Module) -> None:
    for _, module, tensor_name, _ in list(masked_tensors(model)):
        remove_mask(module, tensor_name, bake=False)


# --------------------------------------------------------------------------------------------
# Keeping masked entries' dense values (and Adam state) still through optimizer steps.
# --------------------------------------------------------------------------------------------


class OptimizerPin:
    """Pre/post step hooks: masked entries of trainable tensors keep their dense value, and
    their Adam moments are zeroed (so nothing stale acts on them if the mask is lifted)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _targets(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for _, module, tensor_name, mask in masked_tensors(self.model):
            original = module.parametrizations[tensor_name].original
            if id(original) in in_optimizer:
                yield original, mask.kept

    def _pre(self, optimizer, args, kwargs) -> None:
        self.saved = [(p, ~kept, p.detach()[~kept].clone()) for p, kept in self._targets()]

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        for param, dropped, values in self.saved:
            param[dropped] = values
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                buf = optimizer.state.get(param, {}).get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
                    buf[dropped] = 0
        self.saved = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def pin_to_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerPin:
    """Keep masked entries' dense values and Adam state fixed through ``optimizer.step()``."""
    return OptimizerPin(model, optimizer)


def kept_from_scores(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the top ``density`` fraction by score: per tensor (``local``), over
    all tensors together (``global``), or within each output row of each tensor (``row``, Wanda's
    comparison group: every row loses ``int(columns * (1 - density))`` entries, as the official
    ``prune_wanda``). Exactly ``round(density * n)`` entries are kept (at least one per tensor for
    ``local``); ties are broken in a fixed random order."""
    check_density(density)
    if scope == "row":
        out = {}
        for name, s in scores.items():
            rows = s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1)
            k = rows.shape[1] - int(rows.shape[1] * (1 - density))
            out[name] = torch.stack([_top_k_mask(row.float(), k) for row in rows]).view_as(s)
        return out
    if scope == "local":
        out = {}
        for name, s in scores.items():
            k = max(1, round(density * s.numel()))
            out[name] = _top_k_mask(s.flatten().float(), k).view_as(s)
        return out
    if scope != "global":
        raise SlimtuneError(f"sparsity.scope: '{scope}' is not a scope; valid: global, local, row")
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    k = max(1, round(density * flat.numel()))
    kept = _top_k_mask(flat, k)
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = kept[offset: offset + s.numel()].view_as(s)
        offset += s.numel()
    return out


def _top_k_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k >= flat.numel():
        kept[:] = True
        return kept
    # Ties (e.g. every score 0 for a zero-initialised LoRA B) are broken by a fixed random
    # order rather than by position, so a tied tensor is not pruned as one block. NaN never wins.
    order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0)).to(flat.device)
    safe = torch.nan_to_num(flat, nan=float("-inf"))[order]
    ranked = torch.sort(safe, descending=True, stable=True).indices
    kept[order[ranked[:k]]] = True
    return kept


def check_density(density: Any, field: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < float(density) <= 1):
        raise SlimtuneError(f"{field}: {density!r} is not a density; density is the fraction KEPT, in (0, 1]")
    return float(density)
