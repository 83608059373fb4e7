"""Lottery tickets by iterative magnitude pruning (IMP) with rewinding (Chen et al. 2020, "The
Lottery Ticket Hypothesis for Pre-trained BERT Networks"; official code VITA-Group/BERT-Tickets,
``LT_glue.py``: ``pruning_model``, ``rewind`` and the pruning block of ``train``).

Training is cut into ``rounds + 1`` equal segments of ``trainer.total_steps``. At the end of
segment k (k = 1..rounds) the target weights are pruned by magnitude to density
``density^(k / rounds)`` (or, with ``rate``, ``(1 - rate)^k``, the last round at ``density``;
:func:`slimtune.sparsity.schedules.prune`: masks only tighten), every
trainable tensor except the task head is rewound to its rewind value (the pre-trained/initial
value, or its value after step K), the AdamW state is dropped (a fresh optimizer, as the official
code re-creates AdamW) and the learning-rate schedule restarts at its step 0 (the official code
re-creates ``get_linear_schedule_with_warmup`` with the whole run's ``t_total``; so here: the
run's own schedule, warm-up included, from its start). The last segment trains the ticket, which
is then evaluated as usual.

Deliberate deviations, labelled:

* the official prunes 10% of the *original* weights per round (``amount = 1/(10 - round)``, a
  linear density schedule 0.9, 0.8, ...) for 10 rounds and stops; here ``rounds`` rounds reach
  ``density`` geometrically (each round removes the same fraction of what is left), as the
  ``sparsity`` section's iterative schedule does;
* the official only searches masks (``mask.pt``) and retrains them in a second script
  (``glue_trans.py``); here the final segment retrains the ticket in the same run;
* the official prunes the encoder's linear weights and the pooler; ``target: base`` here is every
  backbone linear weight outside the task head (encoder and pooler alike);
* ``rewind: step:K`` (Frankle et al.'s late rewinding) is not in the official BERT code, which
  rewinds to the pre-trained weights only.

Like the official (which rewinds only ``bert.*`` keys), the task head is not rewound.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.core.hooks import Hook
from slimtune.errors import SlimtuneError
from slimtune.sparsity.masks import dense_tensor, get_mask, masked_tensors, pin_to_optimizer
from slimtune.sparsity.schedules import Targets, prune
from slimtune.sparsity.storage import encode


def parse_rewind(spec: Any) -> int:
    """``pretrained`` -> 0, ``step:K`` -> K (K >= 0): the step after which the rewind values are
    taken (0 = before the first step)."""
    if spec == "pretrained":
        return 0
    if isinstance(spec, str) and spec.startswith("step:"):
        number = spec[len("step:"):]
        if number.isdigit():
            return int(number)
    raise SlimtuneError(f"tickets.rewind: '{spec}' is not a rewinding point; valid: pretrained, step:K (K a step number >= 0)")


def reinitialised(model: nn.Module, module: nn.Module, tensor_name: str) -> torch.Tensor:
    """A fresh value for ``module.<tensor_name>`` from the model's own initializer
    (transformers' ``_init_weights`` on a new module of the same kind and shape)."""
    init = getattr(model, "_init_weights", None)
    if init is None or not isinstance(module, nn.Linear):
        raise SlimtuneError(f"tickets.init: random needs a transformers model and linear targets; {type(module).__name__} has no initializer here")
    fresh = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    init(fresh)
    return getattr(fresh, tensor_name).detach().to(getattr(module, tensor_name).dtype)


def prune_steps(total_steps: int, rounds: int) -> list[int]:
    """The steps after which rounds 1..rounds prune: the ends of the first ``rounds`` of
    ``rounds + 1`` equal segments."""
    return [round(k * total_steps / (rounds + 1)) for k in range(1, rounds + 1)]


class TicketsHook(Hook):
    """IMP with rewinding on ``targets`` (see the module docstring)."""

    name = "tickets"

    def __init__(self, config: Any, model: nn.Module, delta: Any, targets: Targets):
        self.config = config
        self.model = model
        self.delta = delta
        self.targets = targets
        self.rewind_step = parse_rewind(config.rewind)
        self.densities = config.densities()
        #: Rewind values of the rewound tensors (trainer parameter names), once taken.
        self.snapshot: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.pin = None
        self.steps: list[int] = []

    def _rewound(self, trainer) -> dict[str, torch.Tensor]:
        head = set(self.delta.head_names) if self.delta is not None else set()
        return {name: p for name, p in trainer.trainable.items() if name not in head}

    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer
        self.steps = prune_steps(trainer.total_steps, self.config.rounds)
        if self.steps[0] <= self.rewind_step or self.steps[0] < 1:
            raise SlimtuneError(
                f"tickets.rewind: the first round prunes after step {self.steps[0]} (of {trainer.total_steps} steps in "
                f"{self.config.rounds + 1} segments), so rewinding to step {self.rewind_step} is not before it; "
                "use an earlier step, fewer rounds or more steps"
            )
        if self.pin is None:
            self.pin = pin_to_optimizer(self.model, trainer.optimizer)
        if not self.snapshot and trainer.step == 0 and self.rewind_step == 0:
            self._take_snapshot(trainer)

    def _take_snapshot(self, trainer) -> None:
        self.snapshot = {name: p.detach().clone() for name, p in self._rewound(trainer).items()}

    def on_step_end(self, trainer) -> None:
        step = trainer.step
        if step == self.rewind_step and not self.snapshot:
            self._take_snapshot(trainer)
        if step in self.steps:
            self._round(trainer, self.steps.index(step))

    @torch.no_grad()
    def _round(self, trainer, index: int) -> None:
        density = self.densities[index]
        was_training = self.model.training
        self.model.eval()
        try:
            kept = prune(self.model, self.targets, criterion="magnitude", density=density, scope=self.config.scope,
                         when=f"in round {index + 1} (step {trainer.step})")
        finally:
            self.model.train(was_training)
        # Rewind: the dense values of every rewound tensor (masked entries read zero through the mask).
        for name, param in self._rewound(trainer).items():
            param.copy_(self.snapshot[name])
        if self.config.init == "random" and index == len(self.steps) - 1:
            self.reinitialise_targets()
        # A fresh AdamW (the official re-creates it): no moments, step counts from 0.
        trainer.optimizer.state.clear()
        # The run's schedule from its step 0 again (the official re-creates it with the run's t_total).
        scheduler = trainer.scheduler
        scheduler.last_epoch = 0
        lrs = [base * fn(0) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(trainer.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        entry = {"round": index + 1, "step": trainer.step, "density": density, "measured": self.measured_density()}
        left = [name for name in self.targets if name not in kept]
        if left:
            entry["left_dense"] = left
        self.history.append(entry)

    @torch.no_grad()
    def reinitialise_targets(self) -> None:
        """The ticket's target weights from the model's initializer (``init: random``), masks kept."""
        for module, tensor_name in self.targets.values():
            dense_tensor(module, tensor_name).copy_(reinitialised(self.model, module, tensor_name))

    def measured_density(self) -> float:
        kept = total = 0
        for module, tensor_name in self.targets.values():
            mask = get_mask(module, tensor_name)
            n = getattr(module, tensor_name).numel()
            kept += int(mask.kept.sum()) if mask is not None else n
            total += n
        return kept / total if total else 1.0

    def mask_bytes(self) -> tuple[int, int]:
        """(bytes of the target tensors in slimtune's sparse storage, their dense bytes)."""
        stored = dense = 0
        for name, (module, tensor_name) in self.targets.items():
            value = getattr(module, tensor_name).detach()
            mask = get_mask(module, tensor_name)
            kept = mask.kept if mask is not None else torch.ones_like(value, dtype=torch.bool)
            stored += sum(t.numel() * t.element_size() for t in encode(name, value, kept).values())
            dense += value.numel() * value.element_size()
        return stored, dense

    def report(self) -> dict[str, Any]:
        stored, dense = self.mask_bytes()
        return {
            "config": self.config.model_dump(),
            "mode": self.config.mode,
            "rounds": self.config.rounds,
            "rewind": self.config.rewind,
            "init": self.config.init,
            "rounds_done": len(self.history),
            "final_density": self.measured_density(),
            "stored_bytes": stored,
            "dense_bytes": dense,
            "history": self.history,
        }

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        mode = section.get("mode", "imp")
        init = "random re-init" if section.get("init") == "random" else f"rewind to {section.get('rewind', 'pretrained')}"
        if mode == "imp":
            rows = [("tickets", f"imp: {section.get('rounds_done', 0)} of {section.get('rounds', 0)} rounds, "
                                f"{init}, density {section.get('final_density', 1.0):.3f}")]
        else:
            phases = section.get("phases", {})
            source = f"scores of {section['from_scores']}" if section.get("from_scores") else (
                f"{phases.get('finetune', 0)} fine-tune + {phases.get('search', 0)} search steps")
            rows = [("tickets", f"{mode} search ({source}), {phases.get('retrain', 0)} retrain steps, {init}, "
                                f"density {section.get('final_density', 1.0):.3f}")]
        if section.get("dense_bytes"):
            rows.append(("tickets: stored", f"{section['stored_bytes'] / 1e6:.2f} MB sparse of {section['dense_bytes'] / 1e6:.2f} MB dense"))
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "snapshot": bool(self.snapshot)}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        out = {f"mask.{name}": mask.kept for name, _, _, mask in masked_tensors(self.model) if name in self.targets}
        out.update({f"rewind.{name}": value for name, value in self.snapshot.items()})
        return out

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        from slimtune.sparsity.storage import restore_masks

        self.history = list(state.get("history", []))
        restore_masks(self.model, {k[len("mask."):]: v.to(torch.bool) for k, v in tensors.items() if k.startswith("mask.")})
        self.snapshot = {k[len("rewind."):]: v.clone() for k, v in tensors.items() if k.startswith("rewind.")}
