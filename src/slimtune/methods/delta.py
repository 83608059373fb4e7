"""A delta: the methods of one recipe attached together, plus the task head.

It freezes the base, checks that composed methods do not touch the same parameters, and saves
exactly what a task needs (``delta.safetensors`` + ``delta.json`` naming the methods, their
configs and a fingerprint of the base model, so a delta is never loaded onto another base).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.io import read_json, read_safetensors, write_json, write_safetensors
from slimtune.methods.base import Method, get_method_class
from slimtune.core.arch import Arch, head_parameter_names

DELTA_FORMAT = 1


def base_fingerprint(model_name: str, model: nn.Module) -> dict[str, str]:
    """Name, config hash and a hash of all base weights (the new task head excluded)."""
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "architectures", "id2label", "label2id", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    head = set(head_parameter_names(model))
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in head:
            continue
        weights.update(name.encode())
        weights.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return {"model": model_name, "config_sha256": config_hash, "weights_sha256": weights.hexdigest()[:16]}


class Delta:
    """The trainable part of one run: its methods (in recipe order) and the task head."""

    def __init__(self, methods: list[Method], train_pooler: bool = True):
        self.methods = methods
        self.train_pooler = train_pooler
        self.head_names: list[str] = []

    @classmethod
    def from_specs(cls, specs: list[Any], train_pooler: bool = True) -> Delta:
        return cls([get_method_class(s.name)(s.config) for s in specs], train_pooler)

    @property
    def label(self) -> str:
        return "+".join(m.name for m in self.methods)

    # -- attach -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, arch: Arch) -> None:
        for method in self.methods:
            reason = method.restructuring_reason
            others = [m.name for m in self.methods if m is not method]
            if method.alone_reason and others:
                raise SlimtuneError(f"method: '{method.name}' cannot be combined with '{others[0]}' ({method.alone_reason}); use '{others[0]}' alone")
            if reason and others:
                # It merges, unwraps and slices (or masks) the backbone mid-run: another method's
                # wrappers, inserted modules or selected parameters would be cut or left stale.
                raise SlimtuneError(
                    f"method: '{method.name}' restructures the model during training ({reason}), which '{others[0]}' "
                    "would not survive; run it alone or without that setting"
                )
        was_training = model.training
        owner: dict[str, str] = {}
        for method in self.methods:
            method.attach(model, arch)
            for claimed in method.claims(model):
                if claimed in owner:
                    raise SlimtuneError(
                        f"method: '{method.name}' and '{owner[claimed]}' both change '{claimed}'; "
                        "compose methods that touch different parameters"
                    )
                owner[claimed] = method.name
        # Claims name modules or parameters as each method sees them when it attaches; a method
        # that trains everything (full) or that attaches after a wrapper sees the other's
        # parameters only now. Two methods training one tensor is the same conflict.
        trained_by: dict[str, str] = {}
        for method in self.methods:
            for name in method.trainable_parameters(model):
                if name in trained_by and trained_by[name] != method.name:
                    raise SlimtuneError(
                        f"method: '{method.name}' and '{trained_by[name]}' both train '{name}'; "
                        "compose methods that touch different parameters"
                    )
                trained_by[name] = method.name
        if not was_training:
            model.eval()  # modules the methods built start in training mode (dropout on)
        self.head_names = head_parameter_names(model) if arch.objective == "classification" else []
        if self.train_pooler and arch.objective == "classification":
            self.head_names += [n for n, _ in model.named_parameters() if ".pooler." in n]
        model.requires_grad_(False)
        for param in self.trainable_parameters(model).values():
            param.requires_grad_(True)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for method in self.methods:
            params.update(method.trainable_parameters(model))
        lookup = dict(model.named_parameters())
        params.update({n: lookup[n] for n in self.head_names if n in lookup})
        return params

    def head_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        lookup = dict(model.named_parameters())
        return {n: lookup[n] for n in self.head_names if n in lookup}

    def hooks(self) -> list[Any]:
        return [hook for method in self.methods for hook in method.hooks()]

    def learning_rate_factors(self, model: nn.Module) -> dict[str, float]:
        """Trainable parameters whose learning rate is ``train.lr`` times a factor, by name."""
        return {name: factor for method in self.methods for name, factor in method.learning_rate_factors(model).items()}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from slimtune.sparsity.masks import clean_name

        state: dict[str, torch.Tensor] = {}
        for method in self.methods:
            state.update(method.delta_state_dict(model))
        state.update({n: p.detach() for n, p in self.head_parameters(model).items()})
        # A masked tensor is saved under its plain name (not `.parametrizations.<t>.original`).
        return {clean_name(n): t for n, t in state.items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from slimtune.sparsity.masks import clean_name
        from slimtune.sparsity.storage import decode_state, restore_masks

        state, kept = decode_state(state)  # sparse tensors (indices + values) -> dense + masks
        restore_masks(model, kept)
        # Masked tensors are saved under plain names; the model lists them as `.original`.
        state = {**state, **{n: state[clean_name(n)] for n, _ in model.named_parameters() if clean_name(n) != n and clean_name(n) in state}}
        for method in self.methods:
            method.load_delta_state_dict(model, state)
        head = self.head_parameters(model)
        with torch.no_grad():
            for name, param in head.items():
                if name not in state:
                    raise SlimtuneError(f"delta lacks the task head tensor '{name}'")
                param.copy_(state[name])

    def config(self) -> list[dict[str, Any]]:
        return [{"name": m.name, **m.config.model_dump()} for m in self.methods]

    def trained_with(self, saved: Any) -> bool:
        """``saved`` (a run's ``delta.json`` methods) are these methods with these settings; a
        field added to a method after the run was saved counts as its default value."""
        if not isinstance(saved, list) or len(saved) != len(self.methods):
            return False
        for old, method in zip(saved, self.methods):
            current = {"name": method.name, **method.config.model_dump()}
            if not isinstance(old, dict):
                return False
            fields = type(method.config).model_fields
            added = {key for key in current.keys() - old.keys() if key in fields and current[key] == fields[key].get_default()}
            if {key: value for key, value in current.items() if key not in added} != old:
                return False
        return True

    def save(self, directory: Path, model: nn.Module, fingerprint: dict[str, str], extra: dict[str, Any] | None = None) -> int:
        """Write ``delta.safetensors`` and ``delta.json`` atomically; returns the tensor bytes."""
        directory.mkdir(parents=True, exist_ok=True)
        from slimtune.sparsity.storage import encode_state

        state = encode_state(model, self.state_dict(model))  # masked tensors as indices + values
        write_safetensors(directory / "delta.safetensors", state)
        meta = {
            "format": DELTA_FORMAT,
            "methods": self.config(),
            "head": self.head_names,
            "train_pooler": self.train_pooler,
            "base": fingerprint,
            **(extra or {}),
        }
        write_json(directory / "delta.json", meta)
        return sum(t.numel() * t.element_size() for t in state.values())

    # -- merging ------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        for method in self.methods:
            if method.mergeable:
                method.merge(model)
            elif not method.in_place:
                raise SlimtuneError(f"method '{method.name}' is not a linear update and cannot be merged")

    def unmerge(self, model: nn.Module) -> None:
        for method in reversed(self.methods):
            if method.mergeable:
                method.unmerge(model)

    @property
    def can_merge(self) -> bool:
        """True when the adapted model can run as a plain base-shaped model (linear updates merged,
        or base parameters trained in place)."""
        return all(m.mergeable or m.in_place for m in self.methods)


def read_delta(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``delta.json`` and ``delta.safetensors`` (never a pickle) with one-line errors."""
    return read_json(directory / "delta.json"), read_safetensors(directory / "delta.safetensors")


def check_fingerprint(meta: dict[str, Any], actual: dict[str, str], source: Path, force: bool = False, remedy: str = "use --force to load it anyway") -> None:
    expected = meta.get("base", {})
    for key in ("model", "config_sha256", "weights_sha256"):
        if expected.get(key) != actual.get(key) and not force:
            raise SlimtuneError(
                f"{source}: this delta was made for base '{expected.get('model')}' "
                f"({key} {expected.get(key)}), not '{actual.get('model')}' ({actual.get(key)}); {remedy}"
            )


