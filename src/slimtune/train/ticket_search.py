"""Robust tickets (Zheng et al. 2022, "Robust Lottery Tickets for Pre-trained Language Models";
official code ruizheng20/robust_ticket: ``search_ticket.py``, ``draw_retrain_ticket.py``,
``masked_linear.py``) and the plain control: a ticket *searched* by hard-concrete gates rather than
by weight magnitude.

One run, three phases over ``trainer.total_steps`` (``tickets.phases``, fractions; the official
scripts run 3 : 20 : 10 epochs in three scripts):

1. **fine-tune** the recipe's method for the first F steps (its own schedule over F steps; the
   official ``stage1-finetune.sh``, ``run_glue.py``);
2. **search**: every target weight gets a hard-concrete gate (:mod:`slimtune.sparsity.hard_concrete`,
   log-alpha initialised for keep probability 0.9); the fine-tuned model is frozen and only the
   gates train, with their own AdamW (lr 0.1, weight decay 1e-6) and linear schedule (warm-up 0.1)
   over the S search steps. Loss: the task loss on FreeLB adversarial embeddings
   (``mode: robust``, :mod:`slimtune.train.adversarial`) or on the clean inputs (``mode: plain``,
   the control), its gradient clipped to norm 1, plus ``lambda * L0`` with L0 the official
   regulariser (each tensor's expected L0 over its number of gates, summed) and lambda 0 for the
   first 10% of the search steps, then ramped linearly to ``l0`` over the next 30%;
3. **retrain**: the ticket is drawn (the top ``density`` of the gates by log-alpha, globally, as
   ``draw_retrain_ticket.py``), the gates become fixed binary masks, every trainable tensor of the
   method *including the task head* is rewound (to its values before training, or after step K)
   and trained for the remaining steps with a fresh AdamW and the run's schedule.

With ``from_scores: RUN`` phases 1-2 are skipped: the gate scores another search run saved
(``ticket_scores.safetensors``) are drawn at this run's density at step 0 and the whole run
retrains (the official draws several sparsities from one search).

Deliberate deviations, labelled:

* the three scripts are one run (resumable in every phase); the official retrain reloads
  ``bert-base-uncased``, i.e. a freshly initialised head; here the head is rewound to its initial
  values of this run, which is the same thing for ``rewind: pretrained``;
* only the gates' gradient is clipped: the official calls ``clip_grad_norm_(model.parameters())``
  with the frozen weights' gradients accumulating (never zeroed) in that norm, so its task signal
  fades against the unclipped L0 term as training goes on;
* the L0 warm-up counts search steps; the official counts ``processed += len(model_inputs)``
  (the number of input keys per batch, not examples), so its ramp starts earlier than stated;
* the official searches ``bert.encoder`` linear layers and the pooler; ``target: base`` here is
  every backbone linear weight outside the task head (the same for BERT);
* ``init: random`` (re-initialise the ticket's target weights with the model's own initializer
  instead of rewinding them) is the rethinking-pruning control, not in the official code.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.io import read_safetensors, write_safetensors
from slimtune.sparsity.hard_concrete import apply_gate, draw_ticket, gate_l0, gated_tensors
from slimtune.sparsity.masks import pin_to_optimizer
from slimtune.sparsity.tickets import TicketsHook
from slimtune.train.adversarial import FreeLB, freelb_backward

SCORES_FILE = "ticket_scores.safetensors"


def phase_steps(total_steps: int, phases: tuple[float, float, float]) -> tuple[int, int]:
    """(F, E): fine-tuning ends after step F, the search after step E."""
    finetune = round(phases[0] * total_steps)
    return finetune, finetune + round(phases[1] * total_steps)


def l0_weight(search_step: int, search_steps: int, l0: float, start: float, warmup: float) -> float:
    """The official lambda schedule: 0 until ``start`` of the search, then linear to ``l0`` over
    ``warmup`` of it, then ``l0`` (``search_step`` counts from 1)."""
    if warmup <= 0:
        return l0 if search_step > start * search_steps else 0.0
    ratio = (search_step - start * search_steps) / (warmup * search_steps)
    return l0 * max(0.0, min(1.0, ratio))


class TicketSearchHook(TicketsHook):
    """Fine-tune -> gate search -> draw and retrain (see the module docstring). Shares the IMP
    hook's report section, masks, rewind values and stored-bytes accounting."""

    def __init__(self, config: Any, model: nn.Module, delta: Any, targets):
        super().__init__(config, model, delta, targets)
        self.adversary = FreeLB(**config.adversary.model_dump()) if config.adversary is not None else None
        self.finetune_end = self.search_end = 0
        self.base_trainable: dict[str, nn.Parameter] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.log: list[dict[str, float]] = []
        self.in_search = False
        self.gates: list[nn.Parameter] = []

    def _rewound(self, trainer) -> dict[str, nn.Parameter]:
        # Everything the method trains, the head included (the official retrain starts from a
        # freshly loaded model).
        return self.base_trainable

    # -- phases -----------------------------------------------------------------------------------
    @property
    def clips_gradients(self) -> bool:
        # During the search the gates' task gradient is clipped in ``backward``, before the L0 term.
        return self.in_search

    def _plan(self, trainer) -> None:
        self.trainer = trainer
        if self.config.from_scores:
            self.finetune_end = self.search_end = 0
        else:
            self.finetune_end, self.search_end = phase_steps(trainer.total_steps, tuple(self.config.phases))
            if self.search_end <= self.finetune_end:
                raise SlimtuneError(f"tickets.phases: {self.config.phases} leaves no search step of {trainer.total_steps}; give the search a larger fraction or train longer")
        if self.search_end >= trainer.total_steps:
            raise SlimtuneError(f"tickets.phases: {self.config.phases} leaves no retraining step of {trainer.total_steps}; give the retrain a larger fraction or train longer")
        if self.rewind_step > self.finetune_end:
            raise SlimtuneError(f"tickets.rewind: step {self.rewind_step} is after fine-tuning ends (step {self.finetune_end}); rewind to an earlier step")
        if not self.base_trainable:
            self.base_trainable = dict(trainer.trainable)

    def on_train_begin(self, trainer) -> None:
        self._plan(trainer)
        if trainer.step != 0:
            return  # resumed: restore_structure set the phase up
        if not self.snapshot and self.rewind_step == 0:
            self._take_snapshot(trainer)
        if self.config.from_scores:
            self._install_gates()
            self._load_scores()
            self._finish_search(trainer)
        elif self.finetune_end == 0:
            self._enter_search(trainer)
        else:
            trainer.rebuild_optimizer(0, steps=self.finetune_end, parameters=self.base_trainable)

    def on_step_end(self, trainer) -> None:
        step = trainer.step
        if step == self.rewind_step and not self.snapshot:
            self._take_snapshot(trainer)
        if step == self.finetune_end and not self.in_search and step < self.search_end:
            self._enter_search(trainer)
        elif step == self.search_end and self.in_search:
            self._finish_search(trainer)

    def _install_gates(self) -> None:
        s = self.config.search
        for module, tensor_name in self.targets.values():
            apply_gate(module, tensor_name, s.granularity, keep_prob=s.keep_prob, beta=s.beta)

    def _enter_search(self, trainer, *, resumed: bool = False) -> None:
        for param in self.base_trainable.values():
            param.requires_grad_(False)
        self._install_gates()
        # Named as the model names them (so a delta's own state, which may list them, matches).
        ids = {id(gate.log_alpha) for _, _, _, gate in gated_tensors(self.model)}
        gates = {n: p for n, p in self.model.named_parameters() if id(p) in ids}
        self.gates = list(gates.values())  # clipped every search step
        # The frozen fine-tuned weights stay in ``trainable`` so checkpoints keep them.
        trainer.trainable = {**self.base_trainable, **gates}
        s = self.config.search
        trainer.optimizer = torch.optim.AdamW(list(gates.values()), lr=s.lr, weight_decay=s.weight_decay, eps=1e-8)
        trainer.scheduler = trainer.make_scheduler(trainer.optimizer, self.search_end - self.finetune_end, "linear", s.warmup_ratio)
        self.in_search = True

    def _load_scores(self) -> None:
        path = Path(self.config.from_scores) / SCORES_FILE
        if not path.is_file():
            raise SlimtuneError(f"tickets.from_scores: {path} does not exist; give a run directory of a finished tickets search (mode robust or plain)")
        scores = read_safetensors(path)
        for name, _, _, gate in gated_tensors(self.model):
            key = f"{name}.log_alpha"
            if key not in scores:
                raise SlimtuneError(f"tickets.from_scores: {path} has no scores for '{name}' (was it searched on another model or target?)")
            if tuple(scores[key].shape) != tuple(gate.log_alpha.shape):
                raise SlimtuneError(f"tickets.from_scores: {path}: scores of '{name}' have shape {tuple(scores[key].shape)}, the gates {tuple(gate.log_alpha.shape)} (another granularity?)")
            with torch.no_grad():
                gate.log_alpha.copy_(scores[key])

    @torch.no_grad()
    def _finish_search(self, trainer) -> None:
        self.scores = {f"{name}.log_alpha": gate.log_alpha.detach().clone() for name, _, _, gate in gated_tensors(self.model)}
        if trainer.run_dir is not None and trainer.is_main and not self.config.from_scores:
            write_safetensors(trainer.run_dir / SCORES_FILE, self.scores)
        draw_ticket(self.model, self.config.density, self.config.scope)
        for name, param in self.base_trainable.items():
            param.copy_(self.snapshot[name])
            param.requires_grad_(True)
        if self.config.init == "random":
            self.reinitialise_targets()
        self.in_search = False
        self.gates = []
        trainer.rebuild_optimizer(self.search_end, parameters=self.base_trainable)
        self.pin = pin_to_optimizer(self.model, trainer.optimizer)
        self.history.append({"step": trainer.step, "density": self.config.density, "measured": self.measured_density()})

    # -- the search step -----------------------------------------------------------------------
    def backward(self, trainer, batch):
        if not self.in_search:
            return None
        if self.adversary is not None:
            loss = freelb_backward(self.model, batch, self.adversary, trainer.autocast)
        else:
            with trainer.autocast():
                loss = self.model(**batch).loss
            loss.backward()
            loss = loss.detach().float()
        s = self.config.search
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.gates, s.max_grad_norm)
        search_step = trainer.step - self.finetune_end + 1
        weight = l0_weight(search_step, self.search_end - self.finetune_end, s.l0, s.l0_start, s.l0_warmup)
        l0 = gate_l0(self.model, reduction="mean")
        (weight * l0).backward()
        if search_step == 1 or search_step % max(1, trainer.cfg.log_every) == 0 or trainer.step + 1 == self.search_end:
            self.log.append({"step": trainer.step + 1, "loss": float(loss), "l0": float(l0.detach()), "lambda": weight,
                             "keep_prob": self._mean_keep_prob()})
        return loss

    def _mean_keep_prob(self) -> float:
        probs = [gate.prob_nonzero().detach() for _, _, _, gate in gated_tensors(self.model)]
        return float(torch.cat([p.flatten() for p in probs]).mean()) if probs else 1.0

    # -- resume, report -----------------------------------------------------------------------------
    def restore_structure(self, trainer, state, delta) -> bool:
        self._plan(trainer)
        step = int(state.get("step", -1))
        if step < 0:
            raise SlimtuneError("tickets: the checkpoint does not say at which step it was written; resume refused")
        if self.config.from_scores or step >= self.search_end:
            trainer.rebuild_optimizer(self.search_end, parameters=self.base_trainable)
            self.pin = pin_to_optimizer(self.model, trainer.optimizer)
        elif step >= self.finetune_end:
            self._enter_search(trainer)
        else:
            trainer.rebuild_optimizer(0, steps=self.finetune_end, parameters=self.base_trainable)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.trainer.step, "log": self.log}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {**super().tensor_state(), **{f"scores.{k}": v for k, v in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state, tensors)
        self.log = list(state.get("log", []))
        self.scores = {k[len("scores."):]: v.clone() for k, v in tensors.items() if k.startswith("scores.")}

    def _phase_seconds(self) -> dict[str, float]:
        """Median seconds per step of each phase this process trained (a search step costs
        ``adversary.steps`` forward/backward passes)."""
        result = getattr(self.trainer, "result", None)
        if result is None or not result.step_seconds:
            return {}
        first = (result.resumed_from_step or 0) + 1
        phases: dict[str, list[float]] = {}
        for step, seconds in enumerate(result.step_seconds, start=first):
            phase = "finetune" if step <= self.finetune_end else "search" if step <= self.search_end else "retrain"
            phases.setdefault(phase, []).append(seconds)
        return {phase: statistics.median(times) for phase, times in phases.items()}

    def report(self) -> dict[str, Any]:
        out = {k: v for k, v in super().report().items() if k not in ("rounds", "rounds_done")}
        total = getattr(self.trainer, "total_steps", 0)
        out.update({
            "phases": {"finetune": self.finetune_end, "search": self.search_end - self.finetune_end, "retrain": total - self.search_end},
            "adversarial": self.adversary is not None,
            "search_log": self.log,
        })
        if (seconds := self._phase_seconds()):
            out["step_seconds_median"] = seconds
        if self.config.from_scores:
            out["from_scores"] = str(self.config.from_scores)
        elif self.scores:
            out["scores_file"] = SCORES_FILE
        return out
