"""Checkpoints that let a run continue exactly: trainable parameters, optimizer and scheduler
state, RNG states, the data position and every hook's state — safetensors + JSON only.

Layout: ``RUN_DIR/checkpoints/step-00000123/{tensors.safetensors, state.json}``. A checkpoint is
built in a temp directory and renamed into place (after fsync), so a kill at any moment leaves
either the previous checkpoint set or the new one. ``state.json`` is written last and carries
a hash of the tensors file, so a truncated or altered checkpoint is detected on resume; an
unusable checkpoint is set aside as ``corrupt-step-...`` and the previous one is used instead.

Crash tests inject a kill at a named point with ``SLIMTUNE_TEST_KILL_AT=STAGE:STEP`` (see
:func:`crash_point`); the variable is never set in normal use.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.errors import SlimtuneError
from slimtune.io import fsync_dir, read_json, read_safetensors, write_json, write_safetensors

KEEP_LAST = 2

#: Fault injection for the crash tests: ``STAGE:STEP`` makes the process SIGKILL itself there.
KILL_AT_ENV = "SLIMTUNE_TEST_KILL_AT"
#: ``step``: before optimizer step STEP runs; ``tensors``: checkpoint STEP has its tensors file
#: written in the temp dir; ``state``: ... and its state.json, not yet renamed into place;
#: ``renamed``: it is in place, older checkpoints not yet pruned.
CRASH_STAGES = ("step", "tensors", "state", "renamed")


def crash_point(stage: str, step: int) -> None:
    """Die like ``kill -9`` here when the crash tests ask for it (a no-op otherwise)."""
    if os.environ.get(KILL_AT_ENV) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], None, int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return meta, {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    name, _, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    position: dict[str, int],
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hooks: list[Any],
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; ``extra`` (JSON) and ``extra_tensors`` are the
    trainer's own state, handed back on resume."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    # Temp dirs of a killed writer are garbage: only one process writes a run's checkpoints.
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()

    rng_meta, rng_tensors = _rng_state()
    opt_meta, opt_tensors = _optimizer_tensors(optimizer)
    tensors = {f"param.{k}": v for k, v in params.items()} | opt_tensors | rng_tensors
    tensors |= {f"extra.{k}": v for k, v in (extra_tensors or {}).items()}
    hook_states = {}
    for hook in hooks:
        hook_states[hook.name] = hook.state_dict()
        tensors |= {f"hook.{hook.name}.{k}": v for k, v in hook.tensor_state().items()}
    write_safetensors(tmp / "tensors.safetensors", tensors)
    crash_point("tensors", step)
    digest = hashlib.sha256((tmp / "tensors.safetensors").read_bytes()).hexdigest()
    write_json(
        tmp / "state.json",
        {
            "step": step,
            "position": position,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_meta,
            "hooks": hook_states,
            "trainer": extra or {},
            "tensors_sha256": digest,
        },
    )
    crash_point("state", step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    crash_point("renamed", step)
    for old in list_checkpoints(run_dir)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("tensors_sha256"), str):
        raise SlimtuneError(f"{path / 'state.json'}: not a slimtune checkpoint state (no tensors_sha256)")
    position = state.get("position")
    if not (isinstance(state.get("step"), int) and isinstance(position, dict)
            and all(isinstance(position.get(k), int) for k in ("epoch", "batch"))):
        raise SlimtuneError(f"{path / 'state.json'}: no valid step and data position (epoch, batch)")
    tensors_path = path / "tensors.safetensors"
    if not tensors_path.is_file():
        raise SlimtuneError(f"{tensors_path}: missing")
    digest = hashlib.sha256(tensors_path.read_bytes()).hexdigest()
    if digest != state["tensors_sha256"]:
        raise SlimtuneError(f"{tensors_path}: corrupt or truncated (its sha256 does not match state.json)")
    return state, read_safetensors(tensors_path)


def _set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint out of the way (kept for inspection, never read again)."""
    target = path.with_name(f"corrupt-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"corrupt{n}-{path.name}")
    os.replace(path, target)
    return target


def restore_latest(
    run_dir: Path,
    *,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hooks: list[Any],
    warn=print,
    set_aside: bool = True,
    restore_extra=None,
    prepare=None,
) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint that reads back intact and fits this run. Each unusable
    one is set aside as ``corrupt-step-...`` with a warning, falling back to the previous one.
    None when there is no checkpoint at all; an error when none of them is usable. With several
    processes only the main one sets files aside (``set_aside``); the others just skip them.
    ``restore_extra(state, extra_tensors)`` restores the trainer's own part (may raise
    SlimtuneError to reject the checkpoint). ``prepare(state, tensors)`` runs before anything is
    copied and may rebuild the model's structure the checkpoint was written on (a hook that
    restructures the model mid-run); it returns None, or the new ``(params, optimizer, scheduler)``
    to restore into."""
    candidates = list_checkpoints(run_dir)
    for path in reversed(candidates):
        try:
            state, tensors = read_checkpoint(path)
            if prepare is not None and (rebuilt := prepare(state, tensors)) is not None:
                params, optimizer, scheduler = rebuilt
            restore_checkpoint(state, tensors, params=params, optimizer=optimizer, scheduler=scheduler, hooks=hooks, source=path)
            if restore_extra is not None:
                try:
                    restore_extra(state, {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
                except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                    raise SlimtuneError(f"{path}: unusable checkpoint state ({type(exc).__name__}: {exc})") from None
            return path, state
        except SlimtuneError as exc:
            note = f"set it aside as {_set_aside(path).name}; " if set_aside and path.exists() else ""
            warn(f"warning: {exc}; {note}falling back to the previous checkpoint")
    if candidates:
        raise SlimtuneError(
            f"{run_dir / 'checkpoints'}: none of its {len(candidates)} checkpoints is intact (set aside as corrupt-*); "
            "start a new run with --out"
        )
    return None


def latest_good_checkpoint(run_dir: Path, warn=print) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """The newest checkpoint that reads back intact; falls back to older ones, saying so."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state, tensors = read_checkpoint(path)
            return path, state, tensors
        except SlimtuneError as exc:
            warn(f"warning: {exc}; falling back to the previous checkpoint")
    return None


def restore_checkpoint(
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hooks: list[Any],
    source: Path | str = "checkpoint",
) -> None:
    with torch.no_grad():
        for name, param in params.items():
            key = f"param.{name}"
            if key not in tensors:
                raise SlimtuneError(f"{source}: lacks parameter '{name}' (was the recipe changed?)")
            if tensors[key].shape != param.shape:
                raise SlimtuneError(f"{source}: parameter '{name}' has shape {tuple(tensors[key].shape)}, the model {tuple(param.shape)}")
            param.copy_(tensors[key])
    try:
        _load_optimizer(optimizer, state["optimizer"], tensors)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], tensors)
        for hook in hooks:
            prefix = f"hook.{hook.name}."
            hook.load_state_dict(state["hooks"].get(hook.name, {}), {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        # state.json passed its hash check yet does not fit: hand-edited or from another version.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SlimtuneError(f"{source}: unusable checkpoint state ({type(exc).__name__}: {detail})") from None
