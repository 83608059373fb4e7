"""DP-SGD for any method, as a trainer hook (Abadi et al. 2016; the parameter-efficient variant of
Yu et al. 2022: only the delta's parameters are private and trained).

Each optimizer step: draw a Poisson sample of the training split (every example independently
with rate ``q = batch_size / N``), compute each example's gradient of the trainable parameters
(:mod:`slimtune.privacy.per_sample`), clip it to ``max_grad_norm``, sum (over memory-bounded
physical batches, and over processes), add Gaussian noise ``N(0, σ²C²)`` once for the whole
logical batch, divide by the expected batch size ``q N``, and hand the result to the optimizer.
The accountant (:mod:`slimtune.privacy.accounting`) tracks ε; training stops rather than exceed
the budget. The trainer knows none of this: it sees a hook that takes over ``backward``.
Optionally a DP linear probe fits the head first (:mod:`slimtune.privacy.linear_probe`), its cost
composed into the same ε.

Sampling and noise come from generators seeded by ``(seed, step)``, so a run is reproducible and
a resumed run continues exactly. Left unset, the seed is drawn from the OS once per run (and kept
in checkpoints): noise derived from a seed written in a recipe gives no privacy against whoever
reads the recipe.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from slimtune import progress
from slimtune.errors import SlimtuneError
from slimtune.privacy import accounting
from slimtune.privacy.linear_probe import probe_target, run_probe
from slimtune.privacy.losses import per_sample_losses
from slimtune.privacy.per_sample import PerSampleClipper
from slimtune.core.hooks import Hook

if TYPE_CHECKING:
    from slimtune.features.privacy import PrivacySection

_SAMPLE, _NOISE, _PROBE_NOISE = 1, 2, 3  # generator streams


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and runs."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


class PrivacyHook(Hook):
    name = "privacy"
    clips_gradients = True  # the trainer must not clip the noisy gradient again
    needs_independent_samples = True  # a clipped per-sample gradient bounds one example's influence only then

    def __init__(self, config: PrivacySection):
        self.config = config
        self.noise_multiplier: float | None = config.noise_multiplier
        self.sample_rate: float | None = None
        self.history: list[list[float]] = []  # accountant history: [noise_multiplier, sample_rate, steps]
        self.probe_history: list[list[float]] = []  # the linear probe's, composed before ``history``
        self.probe_report: dict[str, Any] = {}
        self.seed: int | None = config.seed
        self.allowed_steps: int | None = None
        self.clipper: PerSampleClipper | None = None
        self.last_batch_size = 0
        self.clipped_fraction = 0.0
        self.slow_notice: str | None = None

    # -- setup --------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        cfg = self.config
        n_train = len(trainer.rows["train"])
        if n_train == 0:
            raise SlimtuneError("privacy: the training split is empty")
        self.expected_batch = trainer.cfg.batch_size
        if self.expected_batch > n_train:
            raise SlimtuneError(f"train.batch_size: {self.expected_batch} is larger than the {n_train} training examples; DP sampling needs batch_size <= N")
        self.sample_rate = self.expected_batch / n_train
        planned = trainer.total_steps
        probe = cfg.linear_probe
        probe_plan = []
        if probe.steps:
            probe_sigma = accounting.calibrate_noise(cfg.accountant, probe.epsilon, cfg.delta, 1.0, probe.steps)
            probe_plan = [[probe_sigma, 1.0, probe.steps]]
        if self.noise_multiplier is None:
            self.noise_multiplier = accounting.calibrate_noise(cfg.accountant, cfg.epsilon, cfg.delta, self.sample_rate, planned, prior=probe_plan)
        if self.seed is None:
            self.seed = self._shared_secret_seed(trainer)
        if probe_plan and not self.probe_history and trainer.step == 0:
            # Not on resume: the probed head is in the checkpoint, its cost in ``probe_history``.
            if trainer.progress:
                tqdm.write(f"DP linear probe: fitting the head on the frozen features ({probe.steps} full-batch steps, σ={probe_plan[0][0]:.3g})")
            self.probe_report = run_probe(
                trainer, probe_target(trainer.model, trainer.delta.head_names), probe, probe_plan[0][0],
                lambda step: torch.Generator().manual_seed(_mix(self.seed, step, _PROBE_NOISE)), cfg.physical_batch_size,
            )
            self.probe_history = probe_plan
        if cfg.epsilon is not None:
            self.allowed_steps = self.steps_done() + accounting.max_steps_within(
                cfg.accountant, self.accounted(), self.noise_multiplier, self.sample_rate, cfg.delta, cfg.epsilon, limit=max(planned - trainer.step, 0) + 1
            )
        if not isinstance(self.clipper, PerSampleClipper):
            self.clipper = PerSampleClipper(trainer.model, trainer.trainable, ghost=cfg.ghost)

    def _shared_secret_seed(self, trainer) -> int:
        seed = torch.tensor([secrets.randbits(62)], dtype=torch.long)
        if trainer.world_size > 1:
            dist.broadcast(seed, src=0)
        return int(seed)

    def steps_done(self) -> int:
        """Fine-tuning steps taken (the probe's are reported on their own)."""
        return int(sum(h[2] for h in self.history))

    def accounted(self) -> list[list[float]]:
        """Everything the accountant composes: the probe, then the fine-tuning steps."""
        return [*self.probe_history, *self.history]

    # -- one step -----------------------------------------------------------------------------
    def _indices(self, trainer, batch_indices: list[int] | None) -> list[int]:
        """This process's share of the step's sample (the same global sample on every process)."""
        if not self.config.poisson:
            return batch_indices or []
        generator = torch.Generator().manual_seed(_mix(self.seed, trainer.step, _SAMPLE))
        chosen = torch.nonzero(torch.rand(len(trainer.rows["train"]), generator=generator) < self.sample_rate).flatten().tolist()
        return chosen[trainer.rank :: trainer.world_size]

    def backward(self, trainer, batch) -> torch.Tensor:
        cfg = self.config
        plan_indices = None
        if not cfg.poisson:
            epoch_order = trainer.plan.global_batch(trainer.epoch, trainer.batch_in_epoch)
            plan_indices = epoch_order[trainer.rank :: trainer.world_size]
        indices = self._indices(trainer, plan_indices)
        # The clipped sum does not depend on how the logical batch is cut into physical ones, so
        # cut it by length: each physical batch is padded to its own longest row (dynamic
        # padding), and similar lengths together waste far fewer padding tokens (about 2x fewer
        # on short sentences with a few long ones).
        train_rows = trainer.rows["train"]
        if not hasattr(train_rows, "pixel_values"):  # images are all one size
            indices = sorted(indices, key=lambda i: len(train_rows[i]["input_ids"]))
        params = trainer.trainable
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        loss_total, clipped, count = 0.0, 0, len(indices)
        for start in range(0, len(indices), cfg.physical_batch_size):
            chunk_indices = indices[start : start + cfg.physical_batch_size]
            chunk = trainer.batch("train", chunk_indices)

            def forward(chunk=chunk):
                inputs = {k: v for k, v in chunk.items() if k != "labels"}
                with trainer.autocast():
                    output = trainer.model(**inputs)
                return per_sample_losses(output, chunk, trainer.objective)

            losses, norms = self.clipper.clipped_sum(forward, len(chunk_indices), cfg.max_grad_norm, sums)
            loss_total += float(losses.sum())
            clipped += int((norms > cfg.max_grad_norm).sum())
        self._tell_slow_path(trainer)
        if trainer.world_size > 1:
            flat = torch.cat([s.flatten() for s in sums.values()] + [torch.tensor([loss_total, clipped, count], dtype=next(iter(sums.values())).dtype)])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for s in sums.values():
                s.copy_(flat[offset : offset + s.numel()].view_as(s))
                offset += s.numel()
            loss_total, clipped, count = float(flat[-3]), int(flat[-2]), int(flat[-1])
        # The same noise on every process (shared seed), added once to the global clipped sum.
        generator = torch.Generator().manual_seed(_mix(self.seed, trainer.step, _NOISE))
        std = self.noise_multiplier * cfg.max_grad_norm
        denominator = self.expected_batch if cfg.poisson else max(count, 1)
        for name, param in params.items():
            noisy = sums[name]
            if std > 0:
                noisy = noisy + torch.normal(0.0, std, size=noisy.shape, generator=generator, dtype=noisy.dtype)
            param.grad = (noisy / denominator).to(param.dtype)
        trainer.gradients_synced = True
        self.last_batch_size = count
        self.clipped_fraction = clipped / count if count else 0.0
        return torch.tensor(loss_total / count if count else 0.0)

    def _tell_slow_path(self, trainer) -> None:
        """One line, once (again only if it changes, e.g. after a mask is added), when some
        parameters take the slow exact per-sample path: which, and why."""
        notice = self.clipper.slow_notice()
        if notice and notice != self.slow_notice and trainer.rank == 0:
            progress.write(notice)
        self.slow_notice = notice

    def on_step_end(self, trainer) -> None:
        entry = [float(self.noise_multiplier), float(self.sample_rate if self.config.poisson else self.expected_batch / len(trainer.rows["train"]))]
        if self.history and self.history[-1][:2] == entry:
            self.history[-1][2] += 1
        else:
            self.history.append([*entry, 1])

    def on_train_end(self, trainer) -> None:
        if self.clipper is not None:
            self.clipper.remove()  # evaluation and export run without capture hooks
            self.clipper = _Described(self.clipper.describe())

    def stop_reason(self, trainer) -> str | None:
        if self.allowed_steps is not None and self.steps_done() >= self.allowed_steps and trainer.step < trainer.total_steps:
            return f"privacy budget: another step would spend more than ε={self.config.epsilon} (δ={self.config.delta}) after {self.steps_done()} steps"
        return None

    def epsilon(self) -> float:
        return accounting.epsilon_of(self.config.accountant, self.accounted(), self.config.delta)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "noise_multiplier": self.noise_multiplier, "seed": self.seed, "probe_history": self.probe_history, "probe": self.probe_report}

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.history = [list(h) for h in state.get("history", [])]
        self.noise_multiplier = state.get("noise_multiplier", self.noise_multiplier)
        self.seed = state.get("seed", self.seed)
        self.probe_history = [list(h) for h in state.get("probe_history", [])]
        self.probe_report = state.get("probe", {})

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        return [("privacy", f"ε = {section.get('epsilon') if section.get('epsilon') is not None else float('nan'):.2f} (δ = {section.get('delta')})")]

    def report(self) -> dict[str, Any]:
        if self.sample_rate is None:
            return {}
        eps = self.epsilon()
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_budget": self.config.epsilon,
            "delta": self.config.delta,
            "accountant": self.config.accountant,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch,
            "physical_batch_size": self.config.physical_batch_size,
            "poisson": self.config.poisson,
            "steps": self.steps_done(),
            "per_sample_rules": _count_rules(self.clipper.describe()) if self.clipper else {},
            "slow_path": self.slow_notice,
            **({"linear_probe": {**self.probe_report, "epsilon_alone": accounting.epsilon_of(self.config.accountant, self.probe_history, self.config.delta)}} if self.probe_history else {}),
        }


class _Described:
    """What a removed clipper used, kept for the report."""

    def __init__(self, described: dict[str, str]):
        self._described = described

    def describe(self) -> dict[str, str]:
        return self._described


def _count_rules(described: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in described.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts
