"""DSEE's stage 2 (see :mod:`slimtune.methods.dsee`): merge the stage-1 update into the weights,
prune them (unstructured masks, or attention heads and FFN neurons removed physically), wrap a
fresh update for the re-tune; the unit rankings; and the trainer hook that runs it at
``prune_at`` of training (and replays it when a run resumes from a post-prune checkpoint).

Units are chosen with :func:`slimtune.sparsity.importance.select_heads` /
:func:`~slimtune.sparsity.importance.select_lowest`, so grouped-query attention (Llama) removes
whole KV groups: there ``heads_per_layer`` counts query heads and is rounded to whole groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.core.arch import replace_module
from slimtune.sparsity.masks import apply_mask, kept_from_scores
from slimtune.sparsity.structured import head_dim_of, layer_parts, remove_ffn_neurons, remove_heads
from slimtune.sparsity.importance import Scores, select_heads, select_lowest, unit_importance
from slimtune.core.hooks import Hook
from slimtune.methods.dsee.layer import STAGE1, DSEELinear

if TYPE_CHECKING:
    from slimtune.methods.dsee.method import DSEE

# --------------------------------------------------------------------------------------------
# Rankings.
# --------------------------------------------------------------------------------------------


def head_update_scores(model: nn.Module) -> Scores:
    """The paper's rule. Per layer: L1 magnitude of each head's rows of the update (B A + S) in
    the wrapped query and value projections."""
    head_dim = head_dim_of(model)
    scores: Scores = {}
    for index, layer in enumerate(layer_parts(model)):
        total = None
        for name, module in model.named_modules():
            if isinstance(module, DSEELinear) and name.startswith(layer.layer + "."):
                with torch.no_grad():
                    per_head = module.delta_weight().abs().sum(1).view(-1, head_dim).sum(1)
                total = per_head if total is None else total + per_head
        if total is not None:
            scores[index] = dict(enumerate(total.tolist()))
    return scores


def lowest_heads(model: nn.Module, scores: Scores, per_layer: int, scope: str) -> dict[int, list[int]]:
    """``per_layer`` heads per layer (``local``) or as many in total (``global``) with the lowest
    scores: :func:`select_heads` at the matching fraction (whole KV groups under GQA)."""
    if not per_layer:
        return {}
    return select_heads(model, scores, per_layer / model.config.num_attention_heads, scope)


def score_merged(method: DSEE, model: nn.Module, heads: dict[int, list[int]] | None, batches) -> tuple[dict, dict]:
    """Heads (unless the update rule chose them already) and FFN neurons to remove, scored on
    the merged stage-1 model by :func:`slimtune.sparsity.importance.unit_importance`."""
    c = method.config
    wanted = {crit for crit, used in ((c.head_score, heads is None and c.heads_per_layer > 0),
                                      (c.ffn_score, c.ffn_fraction > 0)) if used}
    on_data = [field for field in c.scored_on_data if field != "head_score" or heads is None]
    if on_data and not batches:
        value = getattr(c, on_data[0])
        valid = "update or magnitude" if on_data[0] == "head_score" else "magnitude"
        raise SlimtuneError(f"method.{on_data[0]}: '{value}' needs training batches, and the task has none; use {valid}")
    computed = {crit: unit_importance(model, crit, batches=batches) for crit in sorted(wanted)}
    if heads is None:
        heads = lowest_heads(model, computed[c.head_score][0], c.heads_per_layer, c.structured_scope)
    neurons: dict[int, list[int]] = {}
    if c.ffn_fraction > 0:
        scores = computed[c.ffn_score][1]
        width = len(next(iter(scores.values())))
        # A whole number per layer first, so that global removes exactly that many times the layers.
        per_layer = round(c.ffn_fraction * width)
        neurons = select_lowest(scores, per_layer / width, c.structured_scope, "method.ffn_fraction")
    return heads, neurons


def backbone_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The backbone's linear layers (the task head excluded), by module name."""
    from slimtune.core.arch import HEAD_MODULE_NAMES

    return {
        n: m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(part in HEAD_MODULE_NAMES for part in n.split(".")) and ".pooler." not in f".{n}."
    }


# --------------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------------


def run_stage2(
    method: DSEE,
    model: nn.Module,
    heads: dict[int, list[int]] | None = None,
    neurons: dict[int, list[int]] | None = None,
    batches: list[dict[str, torch.Tensor]] | None = None,
    replay: bool = False,
) -> dict[str, Any]:
    """Merge the stage-1 update into the weights, prune, wrap fresh stage-2 updates.

    ``replay``: apply the given ``heads``/``neurons`` (a saved delta's) instead of scoring;
    ``batches``: training batches for the taylor/fisher scores."""
    if method.stage != 1:
        raise SlimtuneError("dsee: stage 2 has already run")
    c = method.config
    structured = c.prune == "heads"
    method.stage1 = {f"{STAGE1}{k}": v.detach().clone() for k, v in method.delta_state_dict(model).items()}
    if structured and not replay and c.head_score == "update":
        heads = lowest_heads(model, head_update_scores(model), c.heads_per_layer, c.structured_scope)
    # Merge for good and unwrap: W <- W + ΔW; the wrapped names become plain linears again.
    for name in method.wrapped:
        layer = model.get_submodule(name)
        layer.merge(keep_original=False)
        replace_module(model, name, layer.base)
    info: dict[str, Any] = {}
    if structured:
        if not replay:
            heads, neurons = score_merged(method, model, heads, batches)
        heads = {int(k): sorted(int(h) for h in v) for k, v in (heads or {}).items() if len(v)}
        neurons = {int(k): sorted(int(n) for n in v) for k, v in (neurons or {}).items() if len(v)}
        remove_heads(model, heads)
        remove_ffn_neurons(model, neurons)
        method.removed_heads, method.removed_neurons = heads, neurons
        info["removed_heads"] = heads
        info["removed_neurons_per_layer"] = {layer: len(v) for layer, v in neurons.items()}
    elif c.prune == "unstructured":
        targets = backbone_linears(model)
        scores = {n: m.weight.detach().abs() for n, m in targets.items()}
        kept = kept_from_scores(scores, 1 - c.prune_ratio, "global")
        for n, m in targets.items():
            apply_mask(m, "weight", kept[n])
        info["weight_density"] = sum(int(k.sum()) for k in kept.values()) / sum(k.numel() for k in kept.values())
    method._wrap(model)
    for param in method.trainable_parameters(model).values():
        param.requires_grad_(True)
    method.stage = 2
    return info


# --------------------------------------------------------------------------------------------
# The hook.
# --------------------------------------------------------------------------------------------


class DSEEPruneHook(Hook):
    """Runs DSEE's stage 2 at ``prune_at`` of training and restarts the optimizer on the new
    parameters for the remaining steps."""

    name = "dsee"

    def __init__(self, method: DSEE):
        self.method = method
        self.info: dict[str, Any] = {}

    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer
        self.at = self.prune_step(trainer)
        if self.method.stage == 1:
            self.info["stage1_trainable"] = sum(p.numel() for p in self.method.trainable_parameters(trainer.model).values())

    def prune_step(self, trainer) -> int:
        return max(1, round(self.method.config.prune_at * trainer.total_steps))

    def on_step_end(self, trainer) -> None:
        if trainer.step != self.at or self.method.stage != 1:
            return
        model = trainer.model
        was_training = model.training
        model.eval()
        # The trainer counts (a method does not import the measuring code).
        one = trainer.inference_batch(1, trainer.cfg.max_length)
        self.method.merge(model)
        flops_before = trainer.flops_per_example(one)
        self.method.unmerge(model)
        batches = self._batches(trainer) if self.method.config.scored_on_data else None
        self.info.update(run_stage2(self.method, model, batches=batches))
        self.method.merge(model)
        flops_after = trainer.flops_per_example(one)
        self.method.unmerge(model)
        model.train(was_training)
        self.info.update({
            "stage2_step": trainer.step,
            "flops_per_example_before": flops_before,
            "flops_per_example_after": flops_after,
            "flops_saved": 1 - flops_after / flops_before,
            "flops_seq_len": int(one["input_ids"].shape[1]),
            "stage2_trainable": sum(p.numel() for p in self.method.trainable_parameters(model).values()),
        })
        trainer.rebuild_optimizer()

    def _batches(self, trainer) -> list[dict[str, torch.Tensor]]:
        """``score_batches`` seeded batches of the training split (not the test or validation data)."""
        n_rows = len(trainer.rows["train"])
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(self.method.config.seed)).tolist()
        size = trainer.cfg.batch_size
        chunks = [order[b * size:(b + 1) * size] for b in range(self.method.config.score_batches)]
        return [trainer.batch("train", chunk) for chunk in chunks if chunk]

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        if "flops_saved" not in section:
            return []
        return [("DSEE stage 2", f"FLOPs saved {section['flops_saved']:.1%}, final weight density {section.get('final_weight_density') or 1.0:.3f}")]

    def report(self) -> dict[str, Any]:
        from slimtune.sparsity.schedules import sparsity_report

        out = dict(self.info)
        out["stage"] = self.method.stage
        dense = sparsity_report(self.trainer.model, None) if hasattr(self, "trainer") else {}
        out["final_weight_density"] = dense.get("weight_density")
        return out

    def state_dict(self) -> dict[str, Any]:
        # The stage-2 figures go along so that a resumed run's report still has them.
        return {"stage": self.method.stage, "info": self.info}

    def restore_structure(self, trainer, state: dict[str, Any], delta: dict[str, torch.Tensor]) -> bool:
        """A checkpoint written after the prune step: replay stage 2 from its stage-1 update and
        removed units (the checkpoint's non-trainable delta tensors), so that its stage-2
        parameters fit, and restart the optimizer and schedule as at the prune step."""
        if state.get("stage", 1) == 1 or self.method.stage != 1:
            return False
        self.trainer = trainer
        self.method.replay_stage2(trainer.model, delta)
        trainer.rebuild_optimizer(from_step=int(state.get("info", {}).get("stage2_step", self.prune_step(trainer))))
        return True

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        stage = state.get("stage", 1)
        if stage != self.method.stage:
            # Only after a post-prune checkpoint was replayed and then rejected: stage 2 cannot be undone.
            raise SlimtuneError(f"dsee: checkpoint written at stage {stage}, the model is at stage {self.method.stage}; start the run again")
        self.info.update(state.get("info", {}))
