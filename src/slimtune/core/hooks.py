"""Trainer hooks: how features (sparsity schedules, DP-SGD, structure search, method phases)
attach to the one training loop without the loop knowing them by name.

The loop calls, per optimizer step::

    on_step_begin -> [backward: the first hook that returns a loss takes over, else loss.backward()]
    -> on_after_backward (gradient transforms) -> [gradient all-reduce across processes, unless a
    hook set ``trainer.gradients_synced``] -> on_before_optimizer_step -> optimizer.step()
    -> on_step_end

and ``on_train_begin``, ``on_epoch_end``, ``on_evaluate``, ``on_train_end`` around it. A hook may
stop training by returning a reason from ``stop_reason``; its ``state_dict`` is checkpointed and
its ``report`` is merged into ``report.json`` under its ``name``. Before any of that, when the
trainer is built, ``budget_steps`` may change how many steps the run trains (Scratch-B trains a
pruned model for the dense model's compute).

Optional capabilities are declared on the class, never sniffed: ``clips_gradients`` (the hook
clips gradients itself, so the trainer's global-norm clipping is off; a property where that
holds for one phase of a run, as a ticket search's),
``needs_independent_samples`` (each example's loss must not depend on the other examples of its
batch, as DP's per-sample sensitivity requires: hooks that compute batch statistics, such as
QAT's activation ranges, take them per example) and
``evaluation_metrics`` (metrics it adds to every evaluation of the run, the trainer's and
``slimtune eval``'s alike: a bare model's distillation loss),
``report_rows`` (its lines on the printed report card, read from its saved ``report.json``
section, so a report prints the same from disk). Every subclass with its own ``name`` is listed
in :data:`HOOK_CLASSES`, which the report card reads; it names no hook.

A step whose loss or gradients are NaN/inf is skipped under ``train.on_nonfinite: skip``: then
``on_before_optimizer_step`` is not called, and ``trainer.step_skipped`` is True in ``on_step_end``
(a privacy accountant should still count the step: its batch was sampled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch

    from slimtune.train.trainer import Trainer


#: Hook classes by ``name`` (their section key in report.json): filled by subclassing.
HOOK_CLASSES: dict[str, type[Hook]] = {}


class Hook:
    """Override the events you need; the defaults do nothing."""

    #: Key of this hook's state in checkpoints and of its section in report.json.
    name: ClassVar[str] = "hook"
    #: The hook clips (and noises) gradients itself: the trainer must not clip them again.
    clips_gradients: ClassVar[bool] = False
    #: Each example's loss must depend on that example alone (no statistics over the batch).
    needs_independent_samples: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            HOOK_CLASSES[cls.name] = cls

    def budget_steps(self, steps: int) -> int:
        """The number of optimizer steps to train, given the recipe's (``train.max_steps``, or its
        epochs' steps); called once when the trainer is built, before the schedule is. Default: as given."""
        return steps

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_begin(self, trainer: Trainer, batch: dict[str, torch.Tensor]) -> None: ...

    def backward(self, trainer: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Take over forward+backward for this step (e.g. per-sample gradients); return the loss."""
        return None

    def on_after_backward(self, trainer: Trainer) -> None: ...

    def on_before_optimizer_step(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None: ...

    def on_evaluate(self, trainer: Trainer, split: str, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def evaluation_metrics(self, model: torch.nn.Module, batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
                           autocast: Callable[[], Any], gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Metrics this hook adds to an evaluation of ``model`` on a split: ``batches()`` iterates
        the split's labelled batches (this process's shard), ``gather`` joins a tensor across
        processes. Default none."""
        return {}

    def stop_reason(self, trainer: Trainer) -> str | None:
        """A message when training must stop before the next step (e.g. the privacy budget)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; tensors go in ``tensor_state``."""
        return {}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None: ...

    def restore_structure(self, trainer: Trainer, state: dict[str, Any], delta: dict[str, torch.Tensor]) -> bool:
        """On resume, before a checkpoint's parameters are copied: rebuild a model structure this
        hook changed mid-run, from its checkpointed ``state`` and the checkpoint's non-trainable
        delta tensors (and rebuild the optimizer with ``trainer.rebuild_optimizer``). True when it did."""
        return False

    def report(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        """(label, value) lines for the printed report card, from this hook's ``report()`` as
        saved in report.json; default none."""
        return []
