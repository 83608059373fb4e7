"""Knowledge distillation from a frozen teacher: the losses and the trainer hook behind the
``distill`` recipe section (:mod:`slimtune.features.distill`).

Per training step, on the same batch::

    loss = alpha_ce * CE(student) + alpha_kd * T^2 * KL(softmax(t / T) || softmax(s / T))
         + hidden * mean_l MSE(h_s[l], h_t[map(l)]) + attention * mean_l KL(A_t[map(l)] || A_s[l])

- **Logits KD** follows IntelLabs/Model-Compression-Research-Package
  ``model_compression_research/distiller.py`` (``TeacherWrapper.compute_cross_entropy_loss``:
  ``kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean") * T**2``, the student loss
  scaled by ``alpha_student``); Prune Once for All's defaults are alpha_ce = alpha_kd = 0.5, T = 2
  (``research/prune-once-for-all/*.sh``: ``--ce_alpha 0.5 --ce_temperature 2``).
  For a causal LM (``task.objective: lm``) the KD is token-level: the same loss over the vocabulary
  at every real (non-padding) position, averaged over those positions, and CE is the causal-LM loss;
  for a masked LM (``mlm``) over the masked positions only (DistilBERT's ``distiller.py`` does so),
  and CE is the masked-LM loss.
- **Hidden-state distillation** (TinyBERT, Jiao et al. 2020, ``L_hidn``): the mean squared error
  between the student's and the teacher's hidden states, embeddings output included (index 0),
  over the real (non-padding) tokens, averaged over the mapped layers.
- **Attention distillation**: the KL divergence from the teacher's to the student's attention
  distributions per head and query token (MiniLM, Wang et al. 2020, self-attention distribution
  transfer), over real query tokens, averaged over heads and mapped layers. Both models then run
  eager attention (PyTorch's SDPA kernel does not return attention probabilities).
- **Layer mapping**: ``uniform`` maps student layer m (1-based) to teacher layer m * N / M
  (TinyBERT's g(m)), and the embeddings to the embeddings; or an explicit list of teacher layers,
  one per student layer.

Deviations, on purpose: TinyBERT learns a projection W_h when the widths differ and distils the
attention *scores* before softmax by MSE; here the widths must be equal (a pruned student of its
own teacher is) and the attention distributions are distilled by KL, which needs no access inside
the attention kernel. Hidden/attention distillation needs tensors of the same shapes in both (checked
when the hook is built, by running both models on three tokens).

The teacher runs in eval mode under ``torch.no_grad`` with its parameters frozen; its forward
time and parameter count are reported (report.json ``distill``, and the report card).

With ``task.objective: features`` (a bare encoder, no head: Prune Once for All's pre-training stage
for a checkpoint without an MLM head) hidden/attention distillation is the whole loss, and every
evaluation of the run is that loss on the split (metrics ``distill_loss``, ``hidden_mse``,
``attention_kl``), since the model has no task metric of its own.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.core.hooks import Hook
from slimtune.errors import SlimtuneError


def logits_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` summed over classes, averaged over the batch;
    token logits [batch, tokens, vocab] are averaged over the real tokens (``attention_mask``)."""
    if student_logits.dim() == 3:
        keep = attention_mask.bool() if attention_mask is not None else torch.ones(student_logits.shape[:2], dtype=torch.bool)
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=-1), F.softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean") * temperature**2


def hidden_mse_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], pairs: list[tuple[int, int]],
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over ``pairs`` (student index, teacher index into the hidden-state tuples) of the mean
    squared error over the real tokens' features."""
    weights = _token_weights(student[0], attention_mask)
    per_layer = [(((student[s] - teacher[t]) ** 2).mean(-1) * weights).sum() / weights.sum() for s, t in pairs]
    return torch.stack(per_layer).mean()


def attention_kl_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], pairs: list[tuple[int, int]],
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over ``pairs`` (0-based layer indices) of KL(teacher row || student row) of the
    attention probabilities [batch, heads, query, key], over real query tokens and heads."""
    weights = _token_weights(student[0][:, 0, :, 0], attention_mask)  # [batch, query]
    per_layer = []
    for s, t in pairs:
        target = teacher[t]
        # 0 * log 0 is 0: masked keys carry no probability in either model.
        kl = (target * (target.clamp_min(1e-12).log() - student[s].clamp_min(1e-12).log())).sum(-1).mean(1)  # [batch, query]
        per_layer.append((kl * weights).sum() / weights.sum())
    return torch.stack(per_layer).mean()


def _token_weights(like: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    shape = like.shape[:2]
    return attention_mask.to(like.dtype) if attention_mask is not None else torch.ones(shape, dtype=like.dtype, device=like.device)


def layer_pairs(student_layers: int, teacher_layers: int, mapping: str | list[int]) -> list[tuple[int, int]]:
    """(student, teacher) transformer-layer numbers, 1-based: ``uniform`` is TinyBERT's
    m -> m * N / M; a list gives each student layer's teacher layer. One-line errors."""
    if mapping == "uniform":
        if teacher_layers % student_layers:
            raise SlimtuneError(f"distill.layers: uniform needs the teacher's {teacher_layers} layers to be a multiple of the "
                                f"student's {student_layers}; give a list of {student_layers} teacher layers instead")
        step = teacher_layers // student_layers
        return [(m, m * step) for m in range(1, student_layers + 1)]
    if len(mapping) != student_layers:
        raise SlimtuneError(f"distill.layers: {len(mapping)} teacher layers given for a student of {student_layers} layers; give one per student layer")
    bad = [t for t in mapping if not 1 <= t <= teacher_layers]
    if bad:
        raise SlimtuneError(f"distill.layers: teacher layer {bad[0]} does not exist; the teacher's layers are 1..{teacher_layers}")
    return [(m, t) for m, t in enumerate(mapping, start=1)]


def _layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def check_matching_shapes(student: nn.Module, teacher: nn.Module, pairs: list[tuple[int, int]], *, hidden: bool, attention: bool) -> None:
    """Refuse (one line) hidden/attention distillation between tensors of different shapes, found
    by running both models on three tokens: other widths, other heads (a slimmed layer), or a
    student method that adds positions (soft prompts)."""
    probe = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            s, t = (m(**probe, output_hidden_states=hidden, output_attentions=attention) for m in (student, teacher))
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    checks = ([("hidden", "hidden states", s.hidden_states, t.hidden_states, [(0, 0), *pairs])] if hidden else []) + (
        [("attention", "attention probabilities", s.attentions, t.attentions, [(m - 1, n - 1) for m, n in pairs])] if attention else [])
    for field, what, ours, theirs, index_pairs in checks:
        for m, n in index_pairs:
            if ours[m].shape != theirs[n].shape:
                shape = "x".join
                raise SlimtuneError(
                    f"distill.{field}: the student's {what} at layer {m + (field == 'attention')} are {shape(map(str, ours[m].shape))} "
                    f"where the teacher's at layer {n + (field == 'attention')} are {shape(map(str, theirs[n].shape))} (for 3 tokens); "
                    "distilling them needs the same widths, heads and positions (no learned projection; a soft prompt adds positions): "
                    "use logits KD alone")


class DistillHook(Hook):
    """Takes over each step's forward and backward: the teacher's outputs without gradient, then the
    student's loss of the module docstring."""

    name: ClassVar[str] = "distill"

    def __init__(self, teacher: nn.Module, *, source: str, kind: str, alpha_ce: float, alpha_kd: float, temperature: float,
                 hidden: float, attention: float, layers: str | list[int], student: nn.Module, objective: str = "classification"):
        self.teacher = teacher.eval()
        self.objective = objective
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.source, self.kind = source, kind
        self.alpha_ce, self.alpha_kd, self.temperature = alpha_ce, alpha_kd, temperature
        self.hidden, self.attention = hidden, attention
        self.pairs = layer_pairs(_layers(student), _layers(teacher), layers) if hidden or attention else []
        if attention:
            for model in (student, teacher):
                model.set_attn_implementation("eager")
        if hidden or attention:
            check_matching_shapes(student, teacher, self.pairs, hidden=bool(hidden), attention=bool(attention))
        self.teacher_params = sum(p.numel() for p in teacher.parameters())
        self.teacher_seconds = 0.0
        self.steps = 0
        self.last: dict[str, float] = {}

    def _outputs(self, model: nn.Module, batch: dict[str, torch.Tensor], *, with_labels: bool):
        inputs = batch if with_labels else {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs, output_hidden_states=bool(self.hidden), output_attentions=bool(self.attention))

    def losses(self, student_model: nn.Module, batch: dict[str, torch.Tensor], autocast) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one batch (the teacher's forward timed, without gradient)."""
        start = time.perf_counter()
        with torch.no_grad(), autocast():
            teacher = self._outputs(self.teacher, batch, with_labels=False)
        self.teacher_seconds += time.perf_counter() - start
        with autocast():
            student = self._outputs(student_model, batch, with_labels=True)
        mask = batch.get("attention_mask")
        parts: dict[str, torch.Tensor] = {}
        if self.alpha_ce:
            parts["ce"] = self.alpha_ce * student.loss
        if self.alpha_kd:
            # Masked LM: KD on the masked positions, as DistilBERT's distiller (the others' logits are copies of the input).
            kd_mask = batch["labels"] != -100 if self.objective == "mlm" else mask
            parts["kd"] = self.alpha_kd * logits_kd_loss(student.logits.float(), teacher.logits.float(), self.temperature, kd_mask)
        if self.hidden:
            parts["hidden"] = self.hidden * hidden_mse_loss(student.hidden_states, teacher.hidden_states, [(0, 0), *self.pairs], mask)
        if self.attention:
            parts["attention"] = self.attention * attention_kl_loss(
                student.attentions, teacher.attentions, [(m - 1, t - 1) for m, t in self.pairs], mask)
        return parts

    def backward(self, trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.losses(trainer.model, batch, trainer.autocast)
        loss = sum(parts.values())
        loss.backward()
        self.steps += 1
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return loss.detach()

    def evaluation_metrics(self, model, batches, autocast, gather) -> dict[str, float]:
        """A bare model (objective features) is evaluated by the distillation loss itself: the
        example-weighted mean of each term over the split (unweighted names: hidden_mse, attention_kl)."""
        if self.objective != "features":
            return {}
        names = {"hidden": ("hidden_mse", self.hidden), "attention": ("attention_kl", self.attention)}
        sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # per term, the total, the example count
        was_training = model.training
        model.eval()
        seconds = self.teacher_seconds  # evaluation is not training cost
        try:
            with torch.no_grad():
                for batch in batches():
                    parts, size = self.losses(model, batch, autocast), len(batch["input_ids"])
                    for i, (key, (_, weight)) in enumerate(names.items()):
                        if key in parts:
                            sums[i] += float(parts[key]) / weight * size
                    sums[-2] += float(sum(parts.values())) * size
                    sums[-1] += size
        finally:
            model.train(was_training)
            self.teacher_seconds = seconds
        totals = gather(sums).view(-1, len(sums)).sum(0)
        count = max(float(totals[-1]), 1.0)
        metrics = {"distill_loss": float(totals[-2]) / count}
        for i, (name, weight) in enumerate(names.values()):
            if weight:
                metrics[name] = float(totals[i]) / count
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_seconds": self.teacher_seconds, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.teacher_seconds, self.steps = float(state.get("teacher_seconds", 0.0)), int(state.get("steps", 0))

    def report(self) -> dict[str, Any]:
        return {
            "teacher": self.source, "teacher_kind": self.kind, "teacher_params": self.teacher_params,
            "alpha_ce": self.alpha_ce, "alpha_kd": self.alpha_kd, "temperature": self.temperature,
            "hidden": self.hidden, "attention": self.attention, "layer_pairs": self.pairs,
            "teacher_seconds": self.teacher_seconds, "steps": self.steps,
            "teacher_seconds_per_step": self.teacher_seconds / self.steps if self.steps else None,
            "last_losses": self.last,
        }

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        weights = ", ".join(f"{k} {section[k]:g}" for k in ("alpha_ce", "alpha_kd", "hidden", "attention") if section.get(k))
        per_step = section.get("teacher_seconds_per_step")
        cost = f"{section['teacher_seconds']:.1f} s teacher forward" + (f" ({per_step * 1000:.0f} ms/step)" if per_step else "")
        return [("distill", f"from {section['teacher']} ({section['teacher_kind']}, {section['teacher_params'] / 1e6:.2f}M params; "
                            f"{weights}" + (f", T {section['temperature']:g}" if section.get("alpha_kd") else "") + f"); {cost}")]
