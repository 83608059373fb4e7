"""One training loop for every method: classification (cross-entropy on the task head) or causal
LM (next-token loss on the task's texts), on ``accelerate`` for process setup, with hooks for
everything else (see :mod:`slimtune.core.hooks`). It knows no method by name: it trains what
the :class:`~slimtune.methods.delta.Delta` says is trainable.

Numerical faults: a NaN/inf loss or gradient (checked after the gradient hooks and all-reduce,
so every process decides alike) stops the run naming the step, before anything is written, so
the last checkpoint stays good; with ``train.on_nonfinite: skip`` the step's gradients are
dropped instead (no optimizer step; the scheduler and hooks still advance, and
``trainer.step_skipped`` tells hooks) and the skipped steps are listed in report.json.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from slimtune.errors import SlimtuneError
from slimtune.measure.evaluate import evaluate_task
from slimtune.methods.delta import Delta
from slimtune.progress import progress as progress_bar
from slimtune.sparsity.masks import clean_name
from slimtune.train import checkpoint as ckpt
from slimtune.zoo.batches import batch_plan, eval_batches, fixed_length_batch, pad_id_of, rows_batch, split_rows
from slimtune.core.hooks import Hook
from slimtune.zoo.images import ImageRows, is_image_task
from slimtune.zoo.tasks import TaskData

if TYPE_CHECKING:
    from slimtune.recipe import Recipe

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "layernorm", "log_alpha")


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)  # steps dropped for a NaN/inf loss or gradient
    resumed_from_step: int | None = None
    kept: dict[str, Any] | None = None  # train.keep: best: the epoch restored at the end, and why

    @property
    def step_seconds_median(self) -> float:
        # The first step pays one-off costs (allocations, lazy init); leave it out when we can.
        times = self.step_seconds[1:] or self.step_seconds
        return statistics.median(times) if times else 0.0


class Trainer:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        tokenizer,
        task: TaskData,
        delta: Delta,
        recipe: Recipe,
        objective: str,
        run_dir: Path | None = None,
        hooks: list[Hook] | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.delta = delta
        self.recipe = recipe
        self.cfg = recipe.train
        self.objective = objective
        self.run_dir = run_dir
        self.hooks = list(hooks or [])
        self.accelerator = accelerator or Accelerator(cpu=True)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        # progress: the bar alone; the main process prints epoch summaries and warnings either way
        self.progress = progress and self.accelerator.is_main_process
        self.is_main = self.accelerator.is_main_process
        if self.cfg.batch_size % self.world_size:
            raise SlimtuneError(
                f"train.batch_size: {self.cfg.batch_size} is not divisible by the {self.world_size} processes"
            )
        self.gradients_synced = False
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_loss = float("nan")
        self.current_batch: dict[str, torch.Tensor] | None = None
        self.step_skipped = False
        self.last_checkpoint: Path | None = None
        #: Set by the runner: checkpoints record it and resume refuses a different base model.
        self.base_fingerprint: dict[str, str] | None = None
        self.result = TrainResult()
        #: train.keep: best: the best validation epoch so far ({"epoch", "step", "metric", "value"}) and its tensors.
        self.best: dict[str, Any] | None = None
        self.best_tensors: dict[str, torch.Tensor] = {}

        self.pad_id = pad_id_of(tokenizer)
        if is_image_task(task) and objective != "classification":
            raise SlimtuneError(f"task.objective: image tasks are classification, not '{objective}'")
        # Per split: tokenised examples (or one pixel tensor for images); batches are built by index.
        self.rows = {name: split_rows(task, tokenizer, name, self.cfg.max_length, objective) for name in ("train", "validation", "test")}
        self.plan = batch_plan(task, len(self.rows["train"]), self.cfg.batch_size, self.cfg.seed, self.rank, self.world_size)
        self.total_steps = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * self.plan.batches_per_epoch))
        for hook in self.hooks:  # a hook may set the compute budget (e.g. Scratch-B)
            self.total_steps = hook.budget_steps(self.total_steps)
        self.trainable = delta.trainable_parameters(model)
        if not self.trainable:
            raise SlimtuneError(f"method '{delta.label}': nothing to train")
        self.optimizer = self._build_optimizer()
        self.scheduler = self.make_scheduler(self.optimizer, self.total_steps, self.cfg.scheduler, self.cfg.warmup_ratio)

    # -- setup --------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        head = set(self.delta.head_names)
        factors = self.delta.learning_rate_factors(self.model)
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in self.trainable.items():
            lr = (self.cfg.head_lr or self.cfg.lr) if name in head else self.cfg.lr * factors.get(name, 1.0)
            decay = 0.0 if any(k in name for k in NO_DECAY) else self.cfg.weight_decay
            groups.setdefault((lr, decay), []).append(param)
        return torch.optim.AdamW([{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()])

    def rebuild_optimizer(self, from_step: int | None = None, *, steps: int | None = None,
                          parameters: dict[str, torch.nn.Parameter] | None = None) -> None:
        """Start a fresh optimizer and learning-rate schedule (warm-up included) for the ``steps``
        after ``from_step`` (default: now, and the rest of the run), over ``parameters`` (default:
        the delta's trainable parameters, re-read): for a hook that replaces the parameters mid-run
        (DSEE's prune-and-re-tune stage) or trains in phases (a ticket search), also when it
        rebuilds that state on resume."""
        self.trainable = self.delta.trainable_parameters(self.model) if parameters is None else parameters
        self.optimizer = self._build_optimizer()
        remaining = max(1, steps if steps is not None else self.total_steps - (self.step if from_step is None else from_step))
        self.scheduler = self.make_scheduler(self.optimizer, remaining, self.cfg.scheduler, self.cfg.warmup_ratio)

    @staticmethod
    def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, kind: str = "linear", warmup_ratio: float = 0.0):
        """``train.scheduler``'s schedule over ``steps`` steps, warm-up ``int(warmup_ratio * steps)``."""
        return get_scheduler(
            {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[kind],
            optimizer,
            num_warmup_steps=int(warmup_ratio * steps),
            num_training_steps=steps,
        )

    def batch(self, split: str, indices: list[int]) -> dict[str, torch.Tensor]:
        return rows_batch(self.rows[split], indices, self.pad_id, self.objective)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    # -- the loop -----------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.model(**batch).loss

    def train_step(self, batch: dict[str, torch.Tensor], meter=None) -> float:
        self.current_batch = batch
        self.gradients_synced = False
        for hook in self.hooks:
            hook.on_step_begin(self, batch)
        loss = None
        for hook in self.hooks:
            loss = hook.backward(self, batch)
            if loss is not None:
                break
        if loss is None:
            if meter is not None:
                with meter.track_forward():
                    loss = self.loss(batch)
            else:
                loss = self.loss(batch)
            loss.backward()
        loss_value = float(loss.detach())
        for hook in self.hooks:
            hook.on_after_backward(self)
        if not self.gradients_synced:
            self.all_reduce_gradients()
        fault = self._nonfinite(loss_value)
        self.step_skipped = fault is not None
        if fault is not None:
            return self._handle_nonfinite(fault, loss_value)
        if self.cfg.max_grad_norm is not None and not any(h.clips_gradients for h in self.hooks):
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.cfg.max_grad_norm)
        for hook in self.hooks:
            hook.on_before_optimizer_step(self)
        self.optimizer.step()
        self.scheduler.step()
        if meter is not None:
            meter.finish(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for hook in self.hooks:
            hook.on_step_end(self)
        return loss_value

    def _nonfinite(self, loss_value: float) -> str | None:
        """What is NaN/inf this step (loss, else the first such gradient), or None."""
        bad_loss = not math.isfinite(loss_value)
        if self.world_size > 1:  # one process's NaN loss must stop (or skip) all of them alike
            flag = torch.tensor([float(bad_loss)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad_loss = bool(flag.item())
        if bad_loss:
            return f"loss is {loss_value}" if not math.isfinite(loss_value) else "loss is not finite on another process"
        for name, param in self.trainable.items():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                return f"gradient of '{name}' is not finite ({'nan' if bool(param.grad.isnan().any()) else 'inf'})"
        return None

    def _handle_nonfinite(self, fault: str, loss_value: float) -> float:
        step = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.on_nonfinite == "stop":
            kept = f"the last good checkpoint {self.last_checkpoint} is kept; resume from it with --resume" if self.last_checkpoint else "no checkpoint was written yet"
            raise SlimtuneError(f"train step {step}: {fault}; stopping ({kept}; train.on_nonfinite: skip would skip such steps)")
        self.result.skipped_steps.append(step)
        if self.is_main:
            tqdm.write(f"warning: train step {step}: {fault}; step skipped (train.on_nonfinite: skip)")
        # The step is consumed (data, schedule, hooks advance) but the weights do not move.
        self.scheduler.step()
        self.step += 1
        for hook in self.hooks:
            hook.on_step_end(self)
        return loss_value

    def all_reduce_gradients(self) -> None:
        """Average gradients over processes (each rank computed the mean over its slice)."""
        if self.world_size == 1:
            return
        for param in self.trainable.values():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(self.world_size)
        self.gradients_synced = True

    def fit(self, resume: bool = False) -> TrainResult:
        set_seed(self.cfg.seed)
        result = self.result = TrainResult()
        if resume:
            self._resume()
        self.model.train()
        for hook in self.hooks:
            hook.on_train_begin(self)
        memory_meter = self._memory_meter()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=f"train {self.delta.label}", disable=not self.progress, unit="step")
        started = time.perf_counter()
        # Memory is measured on this process's second step (after one-off allocations), also when resumed.
        measured_step = min(self.step + 1, self.total_steps - 1)
        while self.step < self.total_steps and result.stop_reason is None:
            for index, indices in self.plan.iter_epoch(self.epoch, self.batch_in_epoch):
                reason = next((r for h in self.hooks if (r := h.stop_reason(self))), None)
                if reason:
                    result.stop_reason = reason
                    break
                ckpt.crash_point("step", self.step + 1)
                batch = self.batch("train", indices)
                measure = memory_meter if (memory_meter is not None and self.step == measured_step) else None
                t0 = time.perf_counter()
                self.last_loss = self.train_step(batch, measure)
                result.step_seconds.append(time.perf_counter() - t0)
                if measure is not None:
                    result.memory = {**measure.components, "peak": measure.peak_bytes}
                self.batch_in_epoch = index + 1
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", epoch=self.epoch + 1)
                bar.update(1)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
            else:
                self._end_epoch(result)
                continue
            if self.batch_in_epoch >= self.plan.batches_per_epoch:
                self._end_epoch(result)
        bar.close()
        result.steps = self.step
        result.seconds = time.perf_counter() - started
        if self.cfg.keep == "best":
            self._restore_best(result)
        if result.stop_reason and self.accelerator.is_main_process:
            tqdm.write(f"stopped early: {result.stop_reason}")
        for hook in self.hooks:
            hook.on_train_end(self)
        return result

    def _end_epoch(self, result: TrainResult) -> None:
        finished = self.epoch
        self.epoch += 1
        self.batch_in_epoch = 0
        for hook in self.hooks:
            hook.on_epoch_end(self, finished)
        entry: dict[str, Any] = {"epoch": finished + 1, "step": self.step, "train_loss": self.last_loss}
        if self.cfg.eval_each_epoch and len(self.rows["validation"]):
            entry["validation"] = self.evaluate("validation")
            self.model.train()
            if self.cfg.keep == "best":
                self._consider_best(entry)
        result.history.append(entry)
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in entry.get("validation", {}).items())
            tqdm.write(f"epoch {finished + 1}: train loss {self.last_loss:.4f}" + (f"; validation {shown}" if shown else ""))
        self.save_checkpoint()

    # -- train.keep: best ---------------------------------------------------------------------
    def primary_metric(self) -> tuple[str, bool]:
        """The validation metric that ranks epochs, and whether higher is better."""
        from slimtune.measure.report import PRIMARY_METRIC_OF_OBJECTIVE

        name = PRIMARY_METRIC_OF_OBJECTIVE.get(self.objective, self.task.metric)
        return name, name not in ("perplexity", "loss", "distill_loss")

    def _consider_best(self, entry: dict[str, Any]) -> None:
        name, higher = self.primary_metric()
        value = entry["validation"].get(name)
        if value is None:
            return
        if self.best is None or (value > self.best["value"] if higher else value < self.best["value"]):
            self.best = {"epoch": entry["epoch"], "step": entry["step"], "metric": name, "value": float(value)}
            self.best_tensors = {n: p.detach().clone() for n, p in self.trainable.items()}

    def _restore_best(self, result: TrainResult) -> None:
        """Put back the best epoch's trainable tensors (before the hooks' end of training)."""
        if self.best is None:
            result.kept = {"epoch": None, "why": "no validation metric was measured; the last step's weights are kept"}
            return
        same = self.best_tensors.keys() == self.trainable.keys() and all(
            self.best_tensors[n].shape == p.shape for n, p in self.trainable.items())
        if not same:  # a method changed the parameters mid-run (DSEE's stage 2): the old epoch's do not fit
            result.kept = {**self.best, "restored": False, "why": "the parameters changed shape during training; the last step's weights are kept"}
            return
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(self.best_tensors[name])
        result.kept = {**self.best, "restored": True}
        if self.is_main:
            tqdm.write(f"kept epoch {self.best['epoch']} (validation {self.best['metric']} {self.best['value']:.4f}), train.keep: best")

    def _memory_meter(self):
        if not self.recipe.measure.memory:
            return None
        from slimtune.measure.memory import TrainingMemoryMeter

        return TrainingMemoryMeter()

    # -- inference inputs and their cost (the report card and hooks measure through these) -----
    def inference_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """A batch of real test examples (training ones when there is no test split), truncated or
        padded to exactly ``seq_len`` tokens; no labels."""
        rows = self.rows["test"] or self.rows["train"]
        if isinstance(rows, ImageRows):  # no sequence length to pad to
            return rows.batch([i % len(rows) for i in range(batch_size)], with_labels=False)
        return fixed_length_batch(rows, self.pad_id, batch_size, seq_len)

    def flops_per_example(self, batch: dict[str, torch.Tensor]) -> int:
        """Forward FLOPs per example of the model as it is now (:mod:`slimtune.measure.flops`)."""
        from slimtune.measure.flops import flops_per_example

        return flops_per_example(self.model, batch)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, split: str = "test") -> dict[str, float]:
        def batches():
            return (self.batch(split, indices) for indices in eval_batches(len(self.rows[split]), self.cfg.eval_batch_size, self.rank, self.world_size))

        metrics = evaluate_task(self.model, lambda indices: self.batch(split, indices), self.task, split, len(self.rows[split]),
                                self.objective, self.cfg.eval_batch_size, rank=self.rank, world_size=self.world_size,
                                gather=self.gather, autocast=self.autocast)
        for hook in self.hooks:
            metrics.update(hook.evaluation_metrics(self.model, batches, self.autocast, self.gather))
        for hook in self.hooks:
            hook.on_evaluate(self, split, metrics)
        return metrics

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor``, concatenated (itself with one process)."""
        if self.world_size == 1:
            return tensor
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, tensor)
        return torch.cat(parts)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.run_dir is None or not self.accelerator.is_main_process:
            return
        self.last_checkpoint = ckpt.save_checkpoint(
            self.run_dir,
            step=self.step,
            position={"epoch": self.epoch, "batch": self.batch_in_epoch},
            params={n: p.detach() for n, p in self.trainable.items()},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            hooks=self.hooks,
            extra={"history": self.result.history, "skipped_steps": self.result.skipped_steps, "base": self.base_fingerprint,
                   "best": self.best},
            extra_tensors={**{f"delta.{k}": v for k, v in self._delta_only_state().items()},
                           **{f"best.{k}": v for k, v in self.best_tensors.items()}},
        )

    def _delta_only_state(self) -> dict[str, torch.Tensor]:
        """Saved delta tensors that are not trainable parameters (e.g. a method's masks); the delta
        names a masked tensor plainly, the parameters by its parametrisation (a lock masks them
        before the trainer is built)."""
        trainable = {clean_name(n) for n in self.trainable}
        return {k: v for k, v in self.delta.state_dict(self.model).items() if k not in trainable}

    def _restore_delta_only_state(self, state: dict[str, Any], extra: dict[str, torch.Tensor]) -> None:
        self.best = (state.get("trainer") or {}).get("best")
        self.best_tensors = {k[len("best."):]: v for k, v in extra.items() if k.startswith("best.")}
        saved = {k[len("delta."):]: v for k, v in extra.items() if k.startswith("delta.")}
        if saved or self._delta_only_state():
            self.delta.load_state_dict(self.model, {**{n: p.detach() for n, p in self.trainable.items()}, **saved})

    def _restore_structure(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]):
        """Let hooks rebuild a structure they changed mid-run before the checkpoint's parameters
        are copied; then the (rebuilt) parameters, optimizer and schedule to restore into."""
        delta = {k[len("extra.delta."):]: v for k, v in tensors.items() if k.startswith("extra.delta.")}
        changed = [hook.restore_structure(self, state.get("hooks", {}).get(hook.name, {}), delta) for hook in self.hooks]
        return (self.trainable, self.optimizer, self.scheduler) if any(changed) else None

    def _resume(self) -> None:
        if self.run_dir is None:
            raise SlimtuneError("resume needs a run directory")
        # Every process restores the same files; only the main one reports (and sets bad ones aside).
        main = self.accelerator.is_main_process
        found = ckpt.restore_latest(self.run_dir, params=self.trainable, optimizer=self.optimizer, scheduler=self.scheduler,
                                    hooks=self.hooks, warn=tqdm.write if main else (lambda _: None), set_aside=main,
                                    restore_extra=self._restore_delta_only_state, prepare=self._restore_structure)
        if found is None:
            if main:
                tqdm.write(f"{self.run_dir}: no checkpoint was written before the interruption; starting from step 0")
            self.result.resumed_from_step = 0
            return
        path, state = found
        try:
            self.step = int(state["step"])
            self.epoch = int(state["position"]["epoch"])
            self.batch_in_epoch = int(state["position"]["batch"])
        except (KeyError, TypeError, ValueError):
            raise SlimtuneError(f"{path / 'state.json'}: no valid step/position") from None
        saved = state.get("trainer") or {}
        base = saved.get("base")
        if base and self.base_fingerprint and base != self.base_fingerprint:
            raise SlimtuneError(
                f"{path}: this run was trained on another base model ({base.get('model')}, weights "
                f"{base.get('weights_sha256')}; now {self.base_fingerprint.get('weights_sha256')}); resume refused"
            )
        self.result.history = list(saved.get("history", []))
        self.result.skipped_steps = list(saved.get("skipped_steps", []))
        self.result.resumed_from_step = self.step
        self.last_checkpoint = path
        if main:
            tqdm.write(f"resumed from {path} (step {self.step})")
