"""Rank pruning of a LoRA delta: ``slimtune export RUN --out DIR --lora-rank K``.

Every LoRA update ``dW = (alpha / r) B A`` is replaced by its best rank-``K`` approximation (the
top ``K`` singular directions, Eckart-Young; ``slimtune.sparsity.importance.prune_lora_ranks``
with the magnitude criterion and the same rank in every layer). ``K`` is a kept rank (an integer
``1 <= K < r``) or a kept fraction of ``r`` (``0 < F < 1``, rounded, at least 1).

Alone, ``--lora-rank`` writes ``DIR`` as a *run directory* with the smaller delta: ``recipe.yaml``
(the LoRA section now says ``r: K`` and ``alpha: alpha * K / r``, so the scaling ``alpha / r`` and
therefore the update are those of the truncation), ``delta.json`` + ``delta.safetensors``, and
``lora_rank_report.json`` (ranks, bytes, per-layer relative error of the update, test metrics
before/after). Everything that reads a run reads it: ``slimtune eval DIR``, ``slimtune export DIR
--peft``, ``slimtune export DIR --out ... --merge``. With ``--merge``/``--slim``/``--int8``/
``--bf16`` the truncated delta is merged instead (see ``slimtune.compress.export.export_model``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from slimtune.errors import SlimtuneError

LORA_RANK_REPORT = "lora_rank_report.json"


def parse_lora_rank(text: str | int | float) -> int | float:
    """``8`` -> kept rank 8; ``0.5`` -> half of each LoRA method's rank. One-line errors."""
    raw = str(text).strip()
    if raw.isdigit():
        if int(raw) < 1:
            raise SlimtuneError(f"--lora-rank {raw}: a kept rank must be >= 1 (or a fraction in (0, 1))")
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        raise SlimtuneError(f"--lora-rank {raw}: give a kept rank K (integer >= 1) or a kept fraction in (0, 1)") from None
    if not 0 < value < 1:  # also rejects nan
        raise SlimtuneError(f"--lora-rank {raw}: a fraction must be in (0, 1); for a rank give an integer >= 1")
    return value


def kept_rank(rank: int | float, r: int) -> int:
    kept = rank if isinstance(rank, int) else max(1, round(rank * r))
    if kept >= r:
        raise SlimtuneError(f"--lora-rank {rank}: the LoRA delta has rank {r}; keep fewer (1..{r - 1})")
    return kept


def prune_run_lora(model, delta, rank: int | float) -> dict[str, Any]:
    """Truncate the (single) LoRA method of ``delta`` on ``model`` to a rank in place, and update
    that method's config (``r``, ``alpha``) so that it describes the result. Returns what was done."""
    import torch

    from slimtune.methods.lora import LoRALinear
    from slimtune.sparsity.importance import prune_lora_ranks

    loras = [m for m in delta.methods if m.name == "lora"]
    if len(loras) != 1:
        names = [m.name for m in delta.methods]
        raise SlimtuneError(f"--lora-rank: the run needs exactly one lora method; its methods are {names}")
    method = loras[0]
    r, alpha = method.config.r, method.config.alpha
    keep = kept_rank(rank, r)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    before = {n: m.delta_weight().detach().clone() for n, m in layers.items()}
    kept = prune_lora_ranks(model, (r - keep) / r, criterion="magnitude", scope="local")
    if set(kept.values()) != {keep}:  # rounding of (r - keep) / r * r must give keep exactly
        raise SlimtuneError(f"--lora-rank: internal error, kept ranks {sorted(set(kept.values()))} instead of {keep}")
    new_alpha = alpha * keep / r  # same scaling alpha / r, so the update is the truncation
    method.config = method.config.model_copy(update={"r": keep, "alpha": new_alpha})
    for layer in layers.values():
        layer.scaling = new_alpha / keep
    with torch.no_grad():
        errors = {n: float((m.delta_weight() - before[n]).norm() / before[n].norm().clamp_min(1e-30)) for n, m in layers.items()}
    return {"r": r, "kept_rank": keep, "alpha": alpha, "new_alpha": new_alpha, "layers": len(layers),
            "max_relative_error": max(errors.values()) if errors else 0.0, "relative_error": errors}


def truncate_run_lora(built, out: Path, rank: int | float, *, measure: bool = True) -> dict[str, Any]:
    """Write ``out`` as a run directory whose LoRA delta is truncated to ``rank``; ``built`` is the
    loaded run (``slimtune.runner.load_run``; ``slimtune.runner.export_lora_rank`` does both).
    Returns its report."""
    from slimtune.compress.export import check_out
    from slimtune.io import staged_directory, write_json
    from slimtune.measure.evaluate import evaluate_split

    check_out(out)
    recipe, run_dir = built.recipe, built.run_dir

    def evaluate() -> dict[str, float]:
        return evaluate_split(built, "test")

    before = evaluate() if measure else None
    bytes_before = sum(t.numel() * t.element_size() for t in built.delta.state_dict(built.model).values())
    info = prune_run_lora(built.model, built.delta, rank)
    data = copy.deepcopy(recipe.to_dict())
    methods = data["method"] if isinstance(data["method"], list) else [data["method"]]
    for spec in methods:
        if spec.get("name") == "lora":
            spec.update({"r": info["kept_rank"], "alpha": info["new_alpha"]})

    with staged_directory(out) as staging:
        # The run's own resolved recipe with the new r and alpha (as Recipe.to_yaml writes it).
        (staging / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        bytes_after = built.delta.save(staging, built.model, built.fingerprint,
                                       extra={"lora_rank": {"from_run": str(run_dir), "r": info["r"], "kept_rank": info["kept_rank"]}})
        report = {**info, "delta_bytes_before": bytes_before, "delta_bytes_after": bytes_after,
                  "source": str(run_dir), "criterion": "magnitude (top singular directions)"}
        if measure:
            report["metrics_before"], report["metrics_after"] = before, evaluate()
        write_json(staging / LORA_RANK_REPORT, report)
    return report


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    """What ``slimtune export --lora-rank`` prints."""
    lines = [f"LoRA delta truncated from rank {report['r']} to {report['kept_rank']} ({report['layers']} layers; "
             f"{report['delta_bytes_before'] / 1e3:.1f} kB -> {report['delta_bytes_after'] / 1e3:.1f} kB; largest relative "
             f"change of an update {report['max_relative_error']:.3f}), run directory {out}"]
    for key, value in (report.get("metrics_after") or {}).items():
        lines.append(f"  {key}: {report['metrics_before'][key]:.4f} -> {value:.4f}")
    lines.append(f"  report: {Path(out) / LORA_RANK_REPORT}; evaluate with: slimtune eval {out}")
    return lines
