"""Train a pruned architecture: the shapes of a slim export with its inherited weights, or with
every weight re-initialised (Liu et al. 2019, "Rethinking the Value of Network Pruning"; official
code Eric-mingjie/rethinking-network-pruning, ``cifar/l1-norm-pruning/main_finetune.py`` (fine-tune
the pruned model), ``main_E.py`` (Scratch-E) and ``main_B.py`` (Scratch-B)).

In a recipe: ``model: {name: minilm-l2, structure: DIR, init: inherited|scratch}`` and
``train: {budget: steps|scratch-b, budget_cap: null}``.

- **The structure** is a ``slimtune export`` directory with removed heads/FFN neurons: ``--slim``,
  or a DSEE ``prune: heads`` run exported with ``--merge`` (its stage 2 removed them). Its shape
  record (``shapes.json``, :mod:`slimtune.sparsity.structured`) is applied to the dense
  ``model.name``, which must be the model it was exported from (same type, widths, layers, vocab).
- ``init: inherited``, the paper's control ("fine-tuned"): the export's weights, i.e. the trained
  model merged and pruned, and its task head when the task's labels are the export's (else a new
  head). The recipe's method then fine-tunes it.
- ``init: scratch``: the same architecture with every weight (embeddings, LayerNorms, attention,
  FFN, pooler, head) re-initialised by the model's own initializer, transformers' ``init_weights``
  (``_init_weights`` on every module; BERT: N(0, initializer_range) for linear and embedding
  weights, zero biases and padding row, unit LayerNorms), seeded by ``train.seed``. The tokenizer is
  kept. Without a structure this is the dense model from scratch.
- ``train.budget: steps`` trains the steps the recipe gives (``max_steps``, or its epochs): with
  ``init: scratch`` this is Scratch-E. ``scratch-b`` trains ``int(steps * FLOPs_dense / FLOPs_pruned)``
  steps, Scratch-B, as ``args.epochs = int(160 * (flops_std / flops_small))`` in main_B.py.

Deviations, on purpose:

- main_B.py scales epochs; here the recipe's optimizer steps are scaled (the same compute, finer
  grained; the learning-rate schedule and warm-up stretch with them, as the official step decays
  at 50% and 75% of the scaled epochs do).
- FLOPs are ``measure.flops`` forward FLOPs per example (torch FlopCounterMode: every matrix
  product, attention's included) of the whole classifier at ``train.max_length`` tokens, the
  dense model against the pruned one, with the same head; the official ``compute_flops.py``
  counts the forward convolution/linear FLOPs at the input resolution.
- No cap by default, as the CIFAR main_B.py; ``train.budget_cap: 2`` reproduces the ImageNet
  ``imagenet/l1-norm-pruning/main_B.py`` (180 = 2 x 90 epochs once the ratio is >= 2).
- An export in the plain Hugging Face layout (uniform widths) does not record which original units
  were kept; its shape record names the first ones (only their counts shape the model).

``build_on_structure`` is the Python entry point (the runner's, and benchmarks' for models in
process); its :class:`StructureHook` puts the init, the budget and the FLOPs ratio in report.json.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.core.hooks import Hook
from slimtune.errors import SlimtuneError
from slimtune.io import read_json

INITS = ("inherited", "scratch")
BUDGETS = ("steps", "scratch-b")
#: Config fields that must agree between the export and ``model.name`` whatever was removed.
SAME_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


@dataclass
class Structure:
    """A slim export directory, read without building a model."""

    directory: Path
    record: dict[str, Any]  # slimtune_export.json
    config: dict[str, Any]  # its config.json
    shapes: dict[str, Any] | None  # shapes.json, or None for the plain Hugging Face layout


def read_structure(directory: str | Path, where: str = "model.structure") -> Structure:
    """The export at ``directory``; one-line errors (prefixed ``where``) when it is missing, not a
    slimtune export, or has no removed structure."""
    from slimtune.compress.loader import SHAPES_FILE, read_export_record

    directory = Path(directory)
    try:
        record = read_export_record(directory)
        config = read_json(directory / "config.json")
    except SlimtuneError as exc:
        raise SlimtuneError(f"{where}: {exc}") from None
    # --slim exports are kind "slimmed"; a DSEE heads run exported with --merge is "merged" with a shapes.json.
    if "slimmed" not in (record.get("kinds") or []) and not record.get("shapes"):
        raise SlimtuneError(
            f"{where}: {directory} is a slimtune export without removed structure (kinds: {', '.join(record.get('kinds') or [])}); "
            "give a slim export: `slimtune export RUN --out DIR --slim heads=F,ffn=F` (or a DSEE prune: heads run with --merge)"
        )
    shapes = read_json(directory / SHAPES_FILE) if record.get("shapes") else None
    return Structure(directory, record, config, shapes)


def check_compatible(structure: Structure, model: nn.Module, model_name: str, where: str = "model.structure") -> dict[str, Any]:
    """Fail (one line) unless ``structure`` is a slimming of ``model``'s dense config; return its
    shape record relative to that config."""
    from slimtune.sparsity.structured import check_shape_record

    config = model.config
    for key in SAME_FIELDS:
        theirs, ours = structure.config.get(key), getattr(config, key, None)
        if theirs != ours:
            raise SlimtuneError(
                f"{where}: {structure.directory} was exported from another base model ({key} {theirs!r}; "
                f"model.name {model_name} has {ours!r}); name the model it was exported from"
            )
    shapes = structure.shapes if structure.shapes is not None else _shapes_from_config(structure, model, where)
    try:
        check_shape_record(shapes, model, str(structure.directory / "shapes.json"))
    except SlimtuneError as exc:
        raise SlimtuneError(f"{where}: {exc} (model.name {model_name}: is this the model it was exported from?)") from None
    return shapes


def _shapes_from_config(structure: Structure, model: nn.Module, where: str) -> dict[str, Any]:
    """The shape record of a plain-layout export, whose config.json holds the slimmed widths
    (uniform over layers): the first units of each kind are named as the kept ones."""
    from slimtune.sparsity.structured import SHAPE_RECORD_FORMAT, head_dim_of, kv_heads_of, model_family

    dense = model.config
    theirs = structure.config
    heads = int(theirs.get("num_attention_heads", dense.num_attention_heads))
    kv = int(theirs.get("num_key_value_heads") or heads)
    width = int(theirs.get("intermediate_size", dense.intermediate_size))
    if heads > dense.num_attention_heads or width > dense.intermediate_size or kv > kv_heads_of(model):
        raise SlimtuneError(f"{where}: {structure.directory} is wider than model.name ({heads} heads, FFN {width}); name the model it was exported from")
    if model_family(model) == "llama":
        group = dense.num_attention_heads // kv_heads_of(model)
        kept = [g * group + j for g in range(kv) for j in range(heads // kv)]
    else:
        kept = list(range(heads))
    layer = {"heads": kept, "kv_heads": list(range(kv)) if model_family(model) == "llama" else kept, "neurons": list(range(width))}
    return {
        "format": SHAPE_RECORD_FORMAT, "model_type": dense.model_type, "head_dim": head_dim_of(model),
        "num_attention_heads": dense.num_attention_heads, "num_key_value_heads": kv_heads_of(model),
        "intermediate_size": dense.intermediate_size, "layers": [copy.deepcopy(layer) for _ in range(dense.num_hidden_layers)],
    }


# --------------------------------------------------------------------------------------------
# Weights: inherited from the export, or re-initialised.
# --------------------------------------------------------------------------------------------


def reinitialise(model: nn.Module, seed: int = 0) -> None:
    """Re-initialise every parameter and buffer of a transformers model with its own initializer
    (``init_weights``: ``_init_weights`` on every module, then weight tying), seeded, in place;
    the global RNG is left as it was.

    transformers skips tensors and modules flagged ``_is_hf_initialized`` (as loaded weights
    are), so the flags are cleared first: every tensor is drawn afresh."""
    if not hasattr(model, "init_weights"):
        raise SlimtuneError(f"model.init: scratch needs a transformers model (its init_weights); got {type(model).__name__}")
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is not None and hasattr(tensor, "_is_hf_initialized"):
                del tensor._is_hf_initialized
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()


def inherit_weights(model: nn.Module, structure: Structure, *, head: bool, where: str = "model.structure") -> None:
    """Copy the export's weights into ``model`` (already shrunk to its shapes), the task head too
    when ``head``. Every parameter must be there, except a [CLS] pooler the export replaced by
    mean pooling (the run's own pooling is configured after this)."""
    from slimtune.compress.loader import load_exported
    from slimtune.core.arch import head_parameter_names

    if structure.record.get("int8"):
        raise SlimtuneError(
            f"{where}: {structure.directory} is an int8 export; inherited weights are fine-tuned in float, so export the run "
            "again without --int8 (init: scratch needs only its shapes)"
        )
    try:
        exported = load_exported(structure.directory)
    except SlimtuneError as exc:
        raise SlimtuneError(f"{where}: {exc}") from None
    state = exported.state_dict()
    heads = set(head_parameter_names(model))
    if not head:
        state = {k: v for k, v in state.items() if k not in heads}
    mean_pooled = structure.record.get("pooling") == "mean"
    for name, param in model.named_parameters():
        if name in state or (name in heads and not head) or (mean_pooled and ".pooler." in f".{name}"):
            continue
        raise SlimtuneError(f"{where}: {structure.directory} has no tensor '{name}' for model.name; name the model it was exported from")
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise SlimtuneError(f"{where}: {structure.directory} has a tensor '{unexpected[0]}' that model.name does not; name the model it was exported from")
    try:
        with torch.no_grad():
            model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise SlimtuneError(f"{where}: {structure.directory}: {str(exc).splitlines()[-1].strip()}") from None


# --------------------------------------------------------------------------------------------
# The model on a structure, its FLOPs ratio and its budget.
# --------------------------------------------------------------------------------------------


def _flops(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per example at ``seq_len`` tokens (they depend on shapes, not token values)."""
    from slimtune.measure.flops import flops_per_example

    ones = torch.ones(1, seq_len, dtype=torch.long)
    return flops_per_example(model, {"input_ids": ones, "attention_mask": ones})


def scratch_b_steps(steps: int, ratio: float, cap: float | None = None) -> int:
    """Scratch-B's step count: ``int(steps * min(ratio, cap))`` (main_B.py: ``int(160 * ratio)``)."""
    factor = min(ratio, cap) if cap is not None else ratio
    return max(1, int(steps * factor))


@dataclass
class StructuredModel:
    """A model built by :func:`build_on_structure` and what the report says about it."""

    model: nn.Module
    init: str
    source: Path | None  # the export directory; None: the dense model.name
    shapes: dict[str, Any] | None
    flops_dense: int | None = None
    flops_pruned: int | None = None
    seq_len: int | None = None
    head: str = "new"  # "inherited" (the export's) or "new"
    export_pooling: str | None = None
    params_dense: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        """FLOPs_dense / FLOPs_pruned (1.0 without a structure)."""
        if not self.flops_dense or not self.flops_pruned:
            return 1.0
        return self.flops_dense / self.flops_pruned

    def check_pooling(self, pooling: str, where: str = "head.pooling") -> None:
        """An inherited head reads what it was trained on: the export's pooling."""
        if self.head == "inherited" and self.export_pooling and pooling != self.export_pooling:
            raise SlimtuneError(
                f"{where}: '{pooling}', but the head inherited from {self.source} was trained on {self.export_pooling} pooling; "
                f"set head.pooling: {self.export_pooling} (or train a new head on another task)"
            )

    def check_delta(self, model: nn.Module, delta: Any) -> None:
        """``init: scratch`` leaves nothing at its random value: every re-initialised tensor must
        train (one line naming the method otherwise)."""
        if self.init != "scratch":
            return
        trained = {id(p) for p in delta.trainable_parameters(model).values()}
        frozen = [name for name, p in model.named_parameters() if id(p) not in trained]
        if frozen:
            raise SlimtuneError(
                f"model.init: scratch re-initialises every weight, and method '{delta.label}' leaves {len(frozen)} tensors "
                f"frozen at random values (e.g. '{frozen[0]}'); train them all: method: full"
            )

    def hook(self, budget: str = "steps", cap: float | None = None) -> StructureHook:
        return StructureHook(self, budget, cap)


def build_on_structure(
    model_name: str,
    structure: str | Path | None = None,
    init: str = "inherited",
    *,
    objective: str = "classification",
    labels: list[str] | None = None,
    seed: int = 0,
    seq_len: int = 128,
) -> StructuredModel:
    """The dense ``model_name`` shrunk to the slim export ``structure``'s shapes, with its inherited
    weights (``init="inherited"``) or every weight re-initialised (``"scratch"``, seeded by
    ``seed``); ``labels`` are the task's (the head is inherited when they are the export's). FLOPs
    per example of the dense and the pruned model are counted at ``seq_len`` tokens."""
    from slimtune.measure.params import param_counts
    from slimtune.sparsity.structured import apply_shape_record
    from slimtune.zoo.models import load_model

    if init not in INITS:
        raise SlimtuneError(f"model.init: unknown init '{init}'; valid: {', '.join(INITS)}")
    labels = list(labels) if labels is not None else None
    num_labels = len(labels) if labels is not None else 2
    read = read_structure(structure) if structure is not None else None
    if read is not None and read.record.get("objective", "classification") != objective:
        raise SlimtuneError(f"model.structure: {read.directory} is a {read.record.get('objective')} export; this run's objective is {objective}")
    model = load_model(model_name, objective=objective, num_labels=num_labels)
    seq_len = min(int(seq_len), int(getattr(model.config, "max_position_embeddings", None) or seq_len))
    out = StructuredModel(model=model, init=init, source=read.directory if read else None, shapes=None, seq_len=seq_len)
    if read is not None:
        shapes = check_compatible(read, model, model_name)
        out.params_dense = param_counts(model)["total"]
        out.flops_dense = _flops(model, seq_len)
        apply_shape_record(model, shapes, str(read.directory / "shapes.json"))
        out.flops_pruned = _flops(model, seq_len)
        out.shapes = shapes
        out.export_pooling = read.record.get("pooling")
    if init == "scratch":
        reinitialise(model, seed)
    elif read is not None:
        out.head = "inherited" if objective == "classification" and labels == read.record.get("labels") else "new"
        if objective == "classification" and out.head == "new":
            out.notes.append(f"new head: the export's labels {read.record.get('labels')} are not the task's {labels}")
        inherit_weights(model, read, head=out.head == "inherited")
    return out


# --------------------------------------------------------------------------------------------
# The hook: the step budget, and the report section.
# --------------------------------------------------------------------------------------------


class StructureHook(Hook):
    """Sets the run's step budget (Scratch-B) and reports the structure, init and budget."""

    name: ClassVar[str] = "structure"

    def __init__(self, built: StructuredModel, budget: str = "steps", cap: float | None = None):
        if budget not in BUDGETS:
            raise SlimtuneError(f"train.budget: unknown budget '{budget}'; valid: {', '.join(BUDGETS)}")
        self.built, self.budget, self.cap = built, budget, cap
        self.recipe_steps: int | None = None
        self.steps: int | None = None

    def budget_steps(self, steps: int) -> int:
        self.recipe_steps = steps
        self.steps = scratch_b_steps(steps, self.built.flops_ratio, self.cap) if self.budget == "scratch-b" else steps
        return self.steps

    def report(self) -> dict[str, Any]:
        b = self.built
        layers = (b.shapes or {}).get("layers")
        return {
            "source": str(b.source) if b.source is not None else None,
            "init": b.init,
            "initializer": f"{type(b.model).__name__}.init_weights (_init_weights)" if b.init == "scratch" else None,
            "head": b.head if b.init == "inherited" else "re-initialised",
            "budget": self.budget,
            "budget_cap": self.cap,
            "flops_dense": b.flops_dense,
            "flops_pruned": b.flops_pruned,
            "flops_ratio": b.flops_ratio if b.source is not None else None,
            "flops_seq_len": b.seq_len if b.source is not None else None,
            "steps_factor": (min(b.flops_ratio, self.cap) if self.cap else b.flops_ratio) if self.budget == "scratch-b" else 1.0,
            "recipe_steps": self.recipe_steps,
            "steps": self.steps,
            "params_dense": b.params_dense,
            "kept_heads_per_layer": [len(layer["heads"]) for layer in layers] if layers else None,
            "kept_neurons_per_layer": [len(layer["neurons"]) for layer in layers] if layers else None,
            "notes": list(b.notes),
        }

    @staticmethod
    def report_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
        rows = []
        if section.get("source"):
            heads, neurons = section.get("kept_heads_per_layer") or [], section.get("kept_neurons_per_layer") or []
            rows.append(("structure", f"{section['source']} (kept heads {heads}, FFN neurons {neurons}; "
                                      f"FLOPs dense / pruned = {section['flops_ratio']:.3f} at {section['flops_seq_len']} tokens)"))
        else:
            rows.append(("structure", "dense (model.name)"))
        init = section.get("init")
        rows.append(("init", f"scratch: every weight re-initialised by {section.get('initializer')}" if init == "scratch"
                     else f"inherited from the export (head: {section.get('head')})"))
        budget = section.get("budget")
        if budget == "scratch-b":
            cap = f", capped at {section['budget_cap']:g}" if section.get("budget_cap") else ""
            rows.append(("budget", f"scratch-b: {section.get('recipe_steps')} recipe steps x {section.get('steps_factor'):.3f}"
                                   f" (FLOPs ratio{cap}) = {section.get('steps')} steps"))
        else:
            label = "scratch-e" if init == "scratch" else "steps"
            rows.append(("budget", f"{label}: the recipe's {section.get('steps')} steps"))
        return rows

