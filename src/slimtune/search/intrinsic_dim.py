"""Which submodules to adapt: the local intrinsic dimension of each candidate submodule.

For one candidate (say layer 3's query projection) only that submodule's weight trains, and only
inside a random subspace: ``W = W0 + reshape(P z)`` with ``z`` in R^d trainable and ``P`` a fixed
random projection (dense Gaussian with unit-norm columns when D x d is small, Fastfood
``S H G Pi H B`` otherwise, as in Li et al. 2018). The task head trains with it in every run.
The smallest d of an increasing ladder whose score reaches a target fraction (90 %) of what
training the whole submodule reaches is its ``d90`` (He et al. 2022, KAdaptation, choose the
submodules to adapt by this local intrinsic dimension). Candidates are ranked by d90 (lower is
easier to adapt with few parameters; ties: larger full-training gain first; those that never
reach the target come last) and the first ones become a ``targets`` list for ``kadaptation`` or
``lora``.

The fraction is applied to the *gain* over the head-only run by default (``d = 0``):
``score(d) >= score(0) + fraction * (score(full) - score(0))``; ``mode: absolute`` applies it to
the score itself (Li et al.'s ``d90``, accuracy only). Each run is short (``steps`` optimizer
steps on the same batches), so the measure is cheap and comparable across candidates, not a
converged value.

From Python::

    from slimtune.search.intrinsic_dim import IntrinsicDimConfig, intrinsic_dim_search
    result = intrinsic_dim_search("recipes/kadaptation.yaml", IntrinsicDimConfig(dims=[4, 16, 64]))
    targets = result.targets(top_k=4)            # module names, usable as method.targets
    targets = result.targets(top_k=2, granularity="kind")   # one regex per kind, all layers

or ``python -m slimtune.search.intrinsic_dim RECIPE [--dims 4 16 64] [--top-k 4] [--out dims.json]``.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimtune.errors import SlimtuneError

# --------------------------------------------------------------------------------------------
# Random projections R^d -> R^D.
# --------------------------------------------------------------------------------------------


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The (unnormalised, natural-order) Walsh-Hadamard transform of a vector of length 2^k."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    h = 1
    y = x
    while h < n:
        y = y.reshape(n // (2 * h), 2, h)
        y = torch.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), dim=1)
        h *= 2
    return y.reshape(n)


class DenseProjection(nn.Module):
    """P: a D x d Gaussian matrix with unit-norm columns."""

    def __init__(self, D: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(D, d, generator=generator, dtype=torch.float64)
        self.register_buffer("matrix", (matrix / matrix.norm(dim=0, keepdim=True)).to(dtype), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.matrix @ z


class FastfoodProjection(nn.Module):
    """Fastfood ``H G Pi H B`` on z zero-padded to L = 2^ceil(log2 max(D, d)), first D entries,
    scaled so every column of the L x L transform has unit norm. O(L log L), no D x d matrix."""

    def __init__(self, D: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.D, self.d = D, d
        self.L = 1 << max(0, math.ceil(math.log2(max(D, d))))
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.L,), generator=generator).to(dtype) * 2 - 1
        permutation = torch.randperm(self.L, generator=generator)
        gaussian = torch.randn(self.L, generator=generator, dtype=torch.float64)
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.register_buffer("gaussian", gaussian.to(dtype), persistent=False)
        self.norm = math.sqrt(self.L) * float(gaussian.norm())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.pad(z, (0, self.L - self.d)) * self.signs
        x = fwht(x)[self.permutation] * self.gaussian
        return fwht(x)[: self.D] / self.norm

    def matrix(self) -> torch.Tensor:
        """The D x d matrix this transform applies (for tests on small sizes)."""
        eye = torch.eye(self.d, dtype=self.signs.dtype)
        return torch.stack([self(eye[i]) for i in range(self.d)], dim=1)


def make_projection(D: int, d: int, seed: int, kind: str = "auto", dense_limit: int = 1 << 22) -> nn.Module:
    if kind == "dense" or (kind == "auto" and D * d <= dense_limit):
        return DenseProjection(D, d, seed)
    return FastfoodProjection(D, d, seed)


class SubspaceLinear(nn.Module):
    """A frozen linear whose weight moves only in a random d-dimensional subspace: W0 + reshape(P z)."""

    def __init__(self, base: nn.Linear, projection: nn.Module, d: int):
        super().__init__()
        self.base = base
        self.projection = projection
        self.z = nn.Parameter(torch.zeros(d, dtype=base.weight.dtype, device=base.weight.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + self.projection(self.z).view_as(self.base.weight)
        return F.linear(x, weight, self.base.bias)


# --------------------------------------------------------------------------------------------
# The search.
# --------------------------------------------------------------------------------------------


class IntrinsicDimConfig(BaseModel):
    """How to measure: candidates, the ladder of subspace sizes, the budget of each run."""

    model_config = ConfigDict(extra="forbid")
    candidates: list[str] | None = Field(
        None, description="module name patterns of the candidate submodules; default: q, k, v, o and FFN linears of every layer"
    )
    dims: list[int] = Field([4, 16, 64, 256, 1024], description="increasing subspace sizes d to try (stops at the first that reaches the target)")
    target_fraction: float = Field(0.9, gt=0, le=1, description="fraction of the full-training score that defines d90")
    mode: Literal["gain", "absolute"] = Field("gain", description="'gain': fraction of the gain over the head-only run; 'absolute': of the score")
    steps: int = Field(20, ge=1, description="optimizer steps per run (the same batches for every run)")
    batch_size: int = Field(16, ge=1, description="training batch size")
    eval_size: int = Field(256, ge=1, description="validation examples scored after each run")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of the subspace coordinates z")
    full_lr: float = Field(1e-3, gt=0, description="Adam learning rate when the whole submodule trains (the reference run)")
    head_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the task head (trained in every run)")
    projection: Literal["auto", "dense", "fastfood"] = Field("auto", description="random projection; auto: dense when D*d <= dense_limit")
    dense_limit: int = Field(1 << 22, ge=1, description="largest D*d for a dense Gaussian projection under 'auto'")
    min_gain: float = Field(1e-3, ge=0, description="a candidate whose full training gains less than this is ranked last")
    seed: int = Field(0, description="seed of the batches, the projections and the head")


@dataclass
class SubmoduleDim:
    name: str
    kind: str  # a regex pattern matching this submodule in every layer
    numel: int
    full_score: float
    scores: dict[int, float] = field(default_factory=dict)
    d90: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "numel": self.numel, "d90": self.d90, "full_score": self.full_score, "scores": self.scores}


@dataclass
class IntrinsicDimResult:
    head_only_score: float
    metric: str
    config: dict[str, Any]
    submodules: list[SubmoduleDim]

    def _key(self, row: SubmoduleDim) -> tuple:
        no_gain = row.full_score - self.head_only_score < self.config["min_gain"] and self.config["mode"] == "gain"
        return (row.d90 is None or no_gain, row.d90 if row.d90 is not None else math.inf, -row.full_score)

    def ranking(self) -> list[SubmoduleDim]:
        """Submodules, easiest to adapt first (lowest d90)."""
        return sorted(self.submodules, key=self._key)

    def kind_ranking(self) -> list[tuple[str, float]]:
        """Kinds (e.g. every layer's query) by the median d90 of their layers (inf: not reached)."""
        by_kind: dict[str, list[float]] = {}
        for row in self.submodules:
            value = math.inf if self._key(row)[0] else float(row.d90)
            by_kind.setdefault(row.kind, []).append(value)
        medians = {kind: statistics.median(values) for kind, values in by_kind.items()}
        return sorted(medians.items(), key=lambda item: item[1])

    def targets(self, top_k: int | None = None, granularity: Literal["module", "kind"] = "module", reached_only: bool = True) -> list[str]:
        """Patterns for ``method.targets``: module names, or one regex per kind (all layers)."""
        if granularity == "kind":
            kinds = [(kind, d90) for kind, d90 in self.kind_ranking() if not (reached_only and math.isinf(d90))]
            return [kind for kind, _ in kinds[:top_k]]
        rows = [row for row in self.ranking() if not (reached_only and self._key(row)[0])]
        return [row.name for row in rows[:top_k]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "head_only_score": self.head_only_score,
            "config": self.config,
            "ranking": [row.to_dict() for row in self.ranking()],
            "kinds": [{"kind": kind, "median_d90": None if math.isinf(v) else v} for kind, v in self.kind_ranking()],
        }


def kind_pattern(module_name: str) -> str:
    """A regex matching this submodule in every layer: the last numeric component becomes \\d+."""
    parts = module_name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numeric:
        return "re:" + re.escape(module_name)
    i = numeric[-1]
    return "re:" + re.escape(".".join(parts[:i])) + r"\.\d+\." + re.escape(".".join(parts[i + 1 :]))


def measure_intrinsic_dims(
    model: nn.Module,
    candidates: Sequence[tuple[str, nn.Linear]],
    train_batches: Sequence[dict[str, torch.Tensor]],
    score: Callable[[nn.Module], float],
    head_parameters: dict[str, nn.Parameter],
    config: IntrinsicDimConfig,
    metric: str = "accuracy",
    log: Callable[[str], None] | None = None,
) -> IntrinsicDimResult:
    """The measurement on any model: ``train_batches`` are the (same) batches of every run,
    ``score(model)`` evaluates (higher is better), ``head_parameters`` train in every run.
    The model is left as it was (head and submodules restored)."""
    from slimtune.core.arch import replace_module

    if list(config.dims) != sorted(set(config.dims)) or config.dims[0] < 1:
        raise SlimtuneError(f"dims: {config.dims} must be strictly increasing positive integers")
    if config.mode == "absolute" and metric != "accuracy":
        raise SlimtuneError("mode: 'absolute' needs an accuracy-like score; use mode: gain")
    head_start = {n: p.detach().clone() for n, p in head_parameters.items()}
    model.requires_grad_(False)

    def run(extra: list[nn.Parameter], lr: float) -> float:
        with torch.no_grad():
            for n, p in head_parameters.items():
                p.copy_(head_start[n])
        params = [{"params": list(head_parameters.values()), "lr": config.head_lr}]
        if extra:
            params.append({"params": extra, "lr": lr})
        for group in params:
            for p in group["params"]:
                p.requires_grad_(True)
        optimizer = torch.optim.Adam(params)
        torch.manual_seed(config.seed)  # same dropout masks for every run
        model.train()
        for batch in train_batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            value = float(score(model))
        for group in params:
            for p in group["params"]:
                p.requires_grad_(False)
        return value

    say = log or (lambda message: None)
    head_only = run([], config.head_lr)
    say(f"head only: {metric} {head_only:.4f}")
    rows = []
    for index, (name, linear) in enumerate(candidates):
        original = linear.weight.detach().clone()
        full = run([linear.weight], config.full_lr)
        with torch.no_grad():
            linear.weight.copy_(original)
        row = SubmoduleDim(name=name, kind=kind_pattern(name), numel=linear.weight.numel(), full_score=full)
        threshold = (
            head_only + config.target_fraction * (full - head_only) if config.mode == "gain" else config.target_fraction * full
        )
        no_gain = config.mode == "gain" and full - head_only < config.min_gain
        for d in [] if no_gain else config.dims:  # nothing to reach: skip the ladder, rank last
            if d > row.numel:  # beyond D the subspace is the whole space
                break
            projection = make_projection(row.numel, d, seed=config.seed * 7919 + index * 104729 + d, kind=config.projection, dense_limit=config.dense_limit)
            projection.to(linear.weight.device)
            wrapper = SubspaceLinear(linear, projection, d)
            replace_module(model, name, wrapper)
            try:
                row.scores[d] = run([wrapper.z], config.lr)
            finally:
                replace_module(model, name, linear)
            if row.scores[d] >= threshold:
                row.d90 = d
                break
        say(f"{name}: full {full:.4f}, scores {row.scores}, d90 {row.d90}")
        rows.append(row)
    with torch.no_grad():
        for n, p in head_parameters.items():
            p.copy_(head_start[n])
    return IntrinsicDimResult(head_only_score=head_only, metric=metric, config=config.model_dump(), submodules=rows)


def intrinsic_dim_search(recipe: Any, config: IntrinsicDimConfig | dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> IntrinsicDimResult:
    """Measure every candidate submodule of the recipe's model on the recipe's task.

    ``recipe``: a :class:`~slimtune.recipe.Recipe`, a recipe dict or a path to a recipe YAML.
    Only the model, task, head and ``train.max_length`` of the recipe are used."""
    from accelerate.utils import set_seed

    from slimtune.core.arch import Arch, find_targets, head_parameter_names
    from slimtune.measure.evaluate import evaluate
    from slimtune.recipe import Recipe, load_recipe, validate_recipe
    from slimtune.zoo.batches import collate, eval_batches, tokenize_split
    from slimtune.zoo.models import load_model, load_tokenizer
    from slimtune.zoo.tasks import load_task

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = validate_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise SlimtuneError("intrinsic_dim_search: give a Recipe, a recipe dict or a recipe path")
    config = config if isinstance(config, IntrinsicDimConfig) else IntrinsicDimConfig(**(config or {}))
    objective = recipe.objective
    if objective != "classification":
        raise SlimtuneError("intrinsic-dimension search scores classification accuracy; task.objective must be classification")
    if recipe.task.tasks is not None:
        raise SlimtuneError("intrinsic-dimension search scores one task's accuracy; give task.name (or task.file), not task.tasks")
    set_seed(config.seed)
    task = load_task(recipe.task.loader_spec(), split_seed=recipe.task.split_seed, train_size=recipe.task.train_size, eval_size=recipe.task.eval_size, seed=recipe.task.split_seed)
    model = load_model(recipe.model.name, objective=objective, num_labels=len(task.label_names))
    tokenizer = load_tokenizer(recipe.model.name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows = tokenize_split(task.splits["train"], tokenizer, recipe.train.max_length, objective).to_list()
    eval_split = "validation" if len(task.splits["validation"]) else "test"
    eval_rows = tokenize_split(task.splits[eval_split], tokenizer, recipe.train.max_length, objective).to_list()[: config.eval_size]
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.cat([torch.randperm(len(train_rows), generator=generator) for _ in range(-(-config.steps * config.batch_size // len(train_rows)))])
    train_batches = [
        collate([train_rows[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size].tolist()], pad_id, objective)
        for s in range(config.steps)
    ]
    eval_batch_list = [collate([eval_rows[i] for i in idx], pad_id, objective) for idx in eval_batches(len(eval_rows), 64)]
    num_labels = len(task.label_names)

    def accuracy(m: nn.Module) -> float:
        return evaluate(m, eval_batch_list, objective, num_labels)["accuracy"]

    arch = Arch.of(model, objective)
    patterns = config.candidates or arch.default_targets("attention_qkvo") + arch.default_targets("ffn")
    candidates = find_targets(model, patterns, kind=nn.Linear, field="candidates")
    head_names = head_parameter_names(model)
    if recipe.head.train_pooler:
        head_names += [n for n, _ in model.named_parameters() if ".pooler." in n]
    lookup = dict(model.named_parameters())
    head = {n: lookup[n] for n in head_names}
    return measure_intrinsic_dims(model, candidates, train_batches, accuracy, head, config, metric="accuracy", log=log)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m slimtune.search.intrinsic_dim", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path, help="a recipe YAML (its model, task, head and train.max_length are used)")
    parser.add_argument("--candidates", nargs="+", help="module name patterns of the candidates (default: q/k/v/o/FFN of every layer)")
    parser.add_argument("--dims", nargs="+", type=int, help="increasing subspace sizes (default 4 16 64 256 1024)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 20)")
    parser.add_argument("--top-k", type=int, default=4, help="how many targets to emit (default 4)")
    parser.add_argument("--granularity", choices=["module", "kind"], default="module", help="emit module names or one regex per kind")
    parser.add_argument("--out", type=Path, help="write the full result as JSON")
    args = parser.parse_args(argv)
    fields = {k: v for k, v in {"candidates": args.candidates, "dims": args.dims, "steps": args.steps}.items() if v is not None}
    try:
        result = intrinsic_dim_search(args.recipe, IntrinsicDimConfig(**fields), log=lambda m: print(m, file=sys.stderr))
    except SlimtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        from slimtune.io import write_json

        write_json(args.out, result.to_dict())
    print(json.dumps({"targets": result.targets(args.top_k, args.granularity)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
