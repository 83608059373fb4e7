"""The recipe: one YAML file that says what to adapt, on what, how, and how to measure it.

Sections: ``model``, ``task``, ``method`` (a name, ``{name, fields...}``, or a list of those to
compose), ``head``, ``train``, ``measure``, and feature sections (``privacy``, ``sparsity``,
``compress``, ...) that features declare and register (:mod:`slimtune.core.features`). Every field is validated
into a one-line error (file, field, value, what is allowed); ``--set section.field=value``
overrides any field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimtune.core.features import FEATURES, Feature, Section, all_features
from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.corpus import CORPUS_TASK


class ModelSection(Section):
    name: str = Field("minilm-l6", description="a zoo model name (see `slimtune list models`) or a local HF model directory")
    structure: str | None = Field(
        None,
        description="a slim export directory (`slimtune export RUN --slim ...`, or a DSEE prune: heads run with --merge) "
        "exported from model.name: train its pruned architecture (Liu et al. 2019; docs/rethinking.md)",
    )
    init: Literal["inherited", "scratch"] = Field(
        "inherited",
        description="'inherited': the pre-trained weights, or with model.structure the export's weights (the pruned model, "
        "fine-tuned: the paper's control); 'scratch': every weight re-initialised by the model's own initializer "
        "(train.seed), architecture kept",
    )


class TaskSection(Section):
    name: str | None = Field(None, description="a zoo task name (see `slimtune list tasks`)")
    file: str | None = Field(None, description="a user data file (.csv/.tsv/.jsonl/.parquet) instead of a zoo task")
    text: str | None = Field(None, description="user file: the text column")
    text_pair: str | None = Field(None, description="user file: optional second text column (pairs)")
    label: str | None = Field(None, description="user file: the label column")
    split: str | None = Field(None, description="user file: optional column with train/validation/test")
    images: str | None = Field(None, description="a user image folder (one sub-folder of images per class) instead of a zoo task")
    protocol: Literal["vtab-1k"] | None = Field(None, description="image tasks: 'vtab-1k' = 1,000 training examples (800 train / 200 validation), full test set")
    shots: int | None = Field(None, ge=1, description="image tasks: k-shot, k train (+ k validation) examples per class (1, 2, 4, 8, 16), full test set")
    seed: int | None = Field(None, ge=0, description="image tasks: seed of the vtab-1k / k-shot sample (default 0; deterministic, independent of train.seed)")
    train_size: int | None = Field(None, ge=1, description="use a seeded stratified subset of this many training rows")
    eval_size: int | None = Field(None, ge=1, description="cap validation and test at this many rows (seeded)")
    split_seed: int = Field(0, ge=0, description="seed of the train/validation/test split (fixed, independent of train.seed)")
    objective: Literal["auto", "classification", "lm", "mlm", "features"] = Field(
        "auto", description="'classification', 'lm' (causal-LM loss on the task's texts; decoders only), 'mlm' (masked-LM loss, "
        "BERT's 15% masking; encoders whose checkpoint has the MLM head) or 'features' (the bare "
        "model's hidden states, no head and no labels: the loss is the distill section's hidden/attention distillation from a "
        "dense teacher, the sparse pre-training of an encoder without an LM head); auto: classification"
    )

    tasks: list[TaskSection] | None = Field(
        None,
        description="multi-task: train one model on several tasks, each a zoo task name or a task mapping "
        "(name/file/..., train_size, eval_size, alias); each task gets its own head; the fields here (train_size, "
        "eval_size, split_seed) are their defaults. Shorthand: task: [movie-sentiment, trec-6]",
    )
    alias: str | None = Field(None, description="multi-task: the name this task goes by (default: its zoo name or the file's stem)")
    sampling: Literal["temperature", "proportional", "round-robin"] | None = Field(
        None,
        description="multi-task: which task each batch comes from: 'temperature' (task t with probability "
        "proportional to n_t^(1/T), Hyperformer's sampler; the default), 'proportional' (T = 1) or 'round-robin' "
        "(every task in turn)",
    )
    temperature: float | None = Field(None, gt=0, description="multi-task: T of temperature sampling (default 10, Hyperformer's configs)")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, value: Any) -> Any:
        # A zoo name stands for {name: NAME}, as `task: NAME` does.
        return [{"name": item} if isinstance(item, str) else item for item in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_source(self) -> TaskSection:
        if self.tasks is not None:
            return self._several_tasks()
        if self.sampling is not None or self.temperature is not None:
            raise ValueError("task.sampling and task.temperature choose among several tasks: give task.tasks (a list)")
        if sum(source is not None for source in (self.name, self.file, self.images)) != 1:
            raise ValueError("give exactly one of task.name (a zoo task), task.file (your data) or task.images (your image folder)")
        if (self.protocol is not None or self.shots is not None) and self.file is not None:
            raise ValueError("task.protocol and task.shots apply to image tasks (task.name or task.images)")
        if self.protocol is not None and self.shots is not None:
            raise ValueError("give either task.protocol (vtab-1k) or task.shots (k per class), not both")
        if self.file is not None and (self.text is None or self.label is None):
            raise ValueError("a task.file needs task.text and task.label (column names)")
        if self.name == CORPUS_TASK and self.objective in ("auto", "classification"):
            raise ValueError(f"task '{CORPUS_TASK}' is unlabelled text: set task.objective to 'lm' (a decoder's causal-LM loss), "
                             "'mlm' (an encoder with its masked-LM head) or 'features' (an encoder's hidden-state distillation, "
                             "with a distill section)")
        return self

    def _several_tasks(self) -> TaskSection:
        if any(source is not None for source in (self.name, self.file, self.images, self.alias)):
            raise ValueError("task.tasks lists the tasks: name, file, images and alias go on each of them, not beside the list")
        if len(self.tasks) < 2:
            raise ValueError(f"task.tasks: a multi-task run needs at least two tasks, got {len(self.tasks)}")
        if self.objective not in ("auto", "classification"):
            raise ValueError(f"task.objective: multi-task runs are classification (one head per task), not '{self.objective}'")
        if self.sampling != "temperature" and self.sampling is not None and self.temperature is not None:
            raise ValueError(f"task.temperature applies to sampling: temperature, not '{self.sampling}'")
        seen: dict[str, int] = {}
        for index, member in enumerate(self.tasks):
            where = f"task.tasks.{index}"
            if member.tasks is not None or member.sampling is not None or member.temperature is not None:
                raise ValueError(f"{where}: a task of a multi-task run is one task (tasks, sampling and temperature go on the list)")
            if member.name == CORPUS_TASK or member.objective not in ("auto", "classification"):
                raise ValueError(f"{where}: multi-task runs train classification heads; '{member.name or member.file}' with objective "
                                 f"'{member.objective}' has no labels to mix in (train it in a run of its own)")
            if member.images is not None or member.protocol is not None or member.shots is not None:
                raise ValueError(f"{where}: image tasks cannot be combined in a multi-task run yet; list text tasks")
            name = member.member_name
            if name in seen:
                raise ValueError(f"{where}: task '{name}' is listed twice (also task.tasks.{seen[name]}); each task goes by one name "
                                 "(give one an alias to train it twice)")
            seen[name] = index
            if "split_seed" not in member.model_fields_set:  # the list's split seed, written down (recipe.yaml reads back alike)
                object.__setattr__(member, "split_seed", self.split_seed)
        return self

    @property
    def member_name(self) -> str:
        """The name of one task (of a multi-task run): its alias, zoo name or file stem."""
        return self.alias or self.name or Path(self.file or self.images or "task").stem

    def loader_spec(self) -> str | dict[str, Any]:
        if self.tasks is not None:
            raise ValueError("a multi-task section has no single loader spec; load each of task.tasks")
        if self.images is not None or self.protocol is not None or self.shots is not None:
            source = {"images": self.images} if self.images is not None else {"name": self.name}
            return {**source, "protocol": self.protocol, "shots": self.shots, "seed": self.seed or 0}
        if self.name is not None:
            return self.name
        spec = {"file": self.file, "text": self.text, "label": self.label}
        spec.update({k: v for k, v in (("text_pair", self.text_pair), ("split", self.split)) if v})
        return spec


class HeadSection(Section):
    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto",
        description="how token states become the head's input: 'mean' (masked mean, as the sentence-embedding "
        "checkpoints were trained), 'cls' (the model's own head: BERT's pooler over [CLS], ViT [CLS], Llama last "
        "token); auto: mean for BERT-family encoders, cls otherwise",
    )
    train_pooler: bool = Field(True, description="with pooling 'cls': also train BERT's pooler (dense+tanh over [CLS])")


class TrainSection(Section):
    epochs: float = Field(2.0, gt=0, description="passes over the training split (max_steps wins when both are set)")
    max_steps: int | None = Field(None, ge=1, description="total optimizer steps; wins over epochs")
    batch_size: int = Field(32, ge=1, description="global (logical) batch size, split over processes")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the method's parameters")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head (default: lr)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases/LayerNorm)")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="learning-rate schedule after warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm (null: no clipping)")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per example (longer texts are truncated)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of initialisation, shuffling and dropout")
    init_from: str | None = Field(
        None,
        description="start from the delta and head of a finished run (its run directory; same model, methods and "
        "label count), e.g. a non-private run on public data before a DP run on private data",
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (fast on AMX CPUs) or fp32")
    eval_each_epoch: bool = Field(True, description="evaluate on the validation split after each epoch")
    keep: Literal["last", "best"] = Field(
        "last", description="'best': end on the epoch whose validation primary metric was best (a multi-task run: the average "
        "over tasks; Hyperformer's load_best_model_at_end), each task's best epoch in report.json; 'last': the last step's weights"
    )
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N steps (always at each epoch end)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient: 'stop' (name the step, keep the last checkpoint) or 'skip' the step (counted in report.json)"
    )
    log_every: int = Field(10, ge=1, description="steps between progress-bar loss updates")
    eval_batch_size: int = Field(64, ge=1, description="batch size for evaluation")
    budget: Literal["steps", "scratch-b"] = Field(
        "steps",
        description="'steps': the steps max_steps or epochs give (Scratch-E with model.init: scratch); 'scratch-b': those "
        "steps x FLOPs_dense / FLOPs_pruned of model.structure, the same compute as the dense model (Liu et al. 2019)",
    )
    budget_cap: float | None = Field(
        None, ge=1, description="scratch-b: cap the step factor (the official ImageNet code caps it at 2; CIFAR does not: default none)"
    )

    @model_validator(mode="after")
    def _budget_cap(self) -> TrainSection:
        if self.budget_cap is not None and self.budget != "scratch-b":
            raise ValueError(f"budget_cap caps the factor of budget: scratch-b; budget is '{self.budget}'")
        return self


class MeasureSection(Section):
    flops: bool = Field(True, description="count inference FLOPs per example (torch FlopCounterMode, eager attention)")
    latency: bool = Field(True, description="measure inference latency (median of repeats after warm-up)")
    memory: bool = Field(True, description="measure training peak tensor memory on one step")
    batch_size: int = Field(32, ge=1, description="batch size for latency")
    seq_len: int | None = Field(None, ge=1, description="sequence length for FLOPs/latency (default: train.max_length)")
    threads: int = Field(2, ge=1, description="torch threads for latency")
    repeats: int = Field(10, ge=1, description="timed repeats for latency (after 3 warm-ups)")


class MethodSpec(BaseModel):
    """One resolved method: its registry name and validated config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    config: Any

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.config.model_dump()}


CORE_SECTIONS = {"model": ModelSection, "task": TaskSection, "head": HeadSection, "train": TrainSection, "measure": MeasureSection}


class Recipe(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    model: ModelSection
    task: TaskSection
    methods: list[MethodSpec]
    head: HeadSection
    train: TrainSection
    measure: MeasureSection
    features: dict[str, Feature] = {}
    source: str = "recipe"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.model_dump(), "task": self.task.model_dump(exclude_none=True)}
        dumped = [m.dump() for m in self.methods]
        out["method"] = dumped[0] if len(dumped) == 1 else dumped
        out["head"] = self.head.model_dump()
        out["train"] = self.train.model_dump()
        out["measure"] = self.measure.model_dump()
        for name, section in self.features.items():
            out[name] = section.model_dump()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def objective(self) -> str:
        """The training objective: 'classification', 'lm', 'mlm' or 'features' (``task.objective``, auto = classification)."""
        return "classification" if self.task.objective == "auto" else self.task.objective

    @property
    def method_label(self) -> str:
        return "+".join(m.name for m in self.methods)


DEFAULT_RECIPE: dict[str, Any] = {
    # The main job (`slimtune run`): LoRA on MiniLM-L6 + movie-sentiment, a few minutes on 2 cores.
    "model": {"name": "minilm-l6"},
    "task": {"name": "movie-sentiment", "train_size": 2000, "eval_size": 1000},
    "method": {"name": "lora", "r": 8, "alpha": 16},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "max_length": 64},
}


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation.
# --------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SlimtuneError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise SlimtuneError(f"{path}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise SlimtuneError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: a recipe is a mapping of sections (model, task, method, train, ...)")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.field=value`` (value parsed as YAML; ``method.0.r=4`` indexes a list).
    ``method=NAME`` (or a YAML mapping/list) replaces the whole method section; ``model=NAME``
    and ``task=NAME`` (or a YAML mapping) replace theirs, like ``model: NAME`` in a recipe
    (``task.name=NAME`` changes the name alone and keeps the other task fields)."""
    if "=" not in assignment:
        raise SlimtuneError(f"--set {assignment!r}: expected section.field=value, e.g. train.lr=1e-4")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if parts in (["model"], ["task"]):
        data[parts[0]] = _section_shorthand(parts[0], raw, assignment)
        return
    if parts == ["method"]:
        try:
            data["method"] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SlimtuneError(f"--set {assignment!r}: the method is a name or a YAML mapping, e.g. method=bitfit") from None
        return
    if len(parts) < 2:
        raise SlimtuneError(f"--set {assignment!r}: expected section.field=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    set_field(data, key.strip(), value)


def _section_shorthand(section: str, raw: str, assignment: str) -> dict[str, Any]:
    """``model=NAME`` / ``task=NAME`` as ``{name: NAME}``; a YAML mapping is taken as the section."""
    example = "model=minilm-l2" if section == "model" else "task=trec-6"
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw.strip()
    if isinstance(value, dict):
        return value
    if value is None or isinstance(value, (list, bool)):
        raise SlimtuneError(f"--set {assignment!r}: the {section} is a name or a YAML mapping, e.g. {example}")
    # A number is kept as written: a model directory named 0123 stays "0123".
    return {"name": value if isinstance(value, str) else raw.strip()}


def set_field(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``section.field`` (``method.0.r`` indexes a method list) to an already parsed value."""
    parts = [p for p in key.split(".") if p]
    if parts[0] == "method" and isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SlimtuneError(f"--set {key}: '{part}' is not an index of this list (0..{len(node) - 1})")
            if isinstance(node[int(part)], str):
                node[int(part)] = {"name": node[int(part)]}
            if not isinstance(node[int(part)], dict):
                raise SlimtuneError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = node[int(part)]
        else:
            if not isinstance(node.get(part, {}), (dict, list)):
                raise SlimtuneError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = node.setdefault(part, {})
    if isinstance(node, list):
        raise SlimtuneError(f"--set {key}: give an index into the method list, e.g. method.0.{parts[-1]}=...")
    node[parts[-1]] = value


class RecipeFieldError(SlimtuneError):
    """A validation error at one place of the recipe (``loc``: 'train.lr', 'method.0', 'task',
    or an unknown section's key), so that an error a ``--set`` caused can name that ``--set``."""

    def __init__(self, source: str, loc: str, message: str):
        self.source, self.loc, self.message = source, loc, message
        super().__init__(f"{source}: {message}")


def _format_validation_error(exc: ValidationError, prefix: str) -> tuple[str, str]:
    """(where, one line) for the first error of ``exc``."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        return loc, f"{loc}: unknown field"
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        return loc, f"{loc}: {msg} (got {err['input']!r})"
    return loc, f"{loc}: {msg}"


def _validate_section(cls: type[BaseModel], data: Any, name: str, source: str) -> BaseModel:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeFieldError(source, name, f"section '{name}' must be a mapping of fields, got {data!r}")
    unknown = [k for k in data if k not in cls.model_fields]
    if unknown:
        raise RecipeFieldError(source, f"{name}.{unknown[0]}", f"{name}.{unknown[0]}: unknown field{did_you_mean(unknown[0], cls.model_fields)}")
    try:
        return cls(**data)
    except ValidationError as exc:
        raise RecipeFieldError(source, *_format_validation_error(exc, name)) from None


def parse_methods(raw: Any, source: str) -> list[MethodSpec]:
    from slimtune.methods.base import get_method_class

    items = raw if isinstance(raw, list) else [raw]
    if not items or raw is None:
        raise RecipeFieldError(source, "method", "method: missing; give a method name, e.g. method: lora (see `slimtune list methods`)")
    specs = []
    for i, item in enumerate(items):
        where = "method" if not isinstance(raw, list) else f"method.{i}"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise RecipeFieldError(source, where, f"{where}: expected a method name or a mapping with 'name', got {item!r}")
        fields = {k: v for k, v in item.items() if k != "name"}
        try:
            cls = get_method_class(str(item["name"]))
        except SlimtuneError as exc:
            raise RecipeFieldError(source, f"{where}.name", f"{where}.name: {str(exc).split(': ', 1)[-1]}") from None
        specs.append(MethodSpec(name=cls.name, config=_validate_section(cls.Config, fields, where, source)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RecipeFieldError(source, "method", f"method: '{names[0]}' is listed twice; each method may appear once")
    return specs


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise SlimtuneError(f"{source}: a recipe is a mapping of sections (model, task, method, train, ...), got {type(data).__name__}")
    data = copy.deepcopy(data)
    # Feature modules import torch: load them only for a recipe that names a section beyond the
    # core ones, so that a mistake in a core section is reported in well under a second.
    if any(key not in CORE_SECTIONS and key != "method" for key in data):
        all_features()
    valid = {*CORE_SECTIONS, "method", *FEATURES}
    for key in data:
        if key not in valid:
            raise RecipeFieldError(source, str(key), f"unknown section '{key}'{did_you_mean(str(key), valid)}")
    sections = {name: _validate_section(cls, data.get(name), name, source) for name, cls in CORE_SECTIONS.items()}
    if "task" not in data:
        raise RecipeFieldError(source, "task", "task: missing; e.g. task: {name: movie-sentiment} (see `slimtune list tasks`)")
    features = {name: _validate_section(cls, data[name], name, source) for name, cls in FEATURES.items() if data.get(name) is not None}
    if sections["train"].budget == "scratch-b" and sections["model"].structure is None:
        raise RecipeFieldError(source, "train.budget", "train.budget: scratch-b scales the steps by FLOPs_dense / FLOPs_pruned, "
                               "which needs a pruned structure: model.structure (a `slimtune export --slim` directory)")
    if sections["train"].keep == "best":
        if not sections["train"].eval_each_epoch:
            raise RecipeFieldError(source, "train.keep", "train.keep: best chooses an epoch by its validation metrics; set train.eval_each_epoch: true")
        private = [name for name, feature in features.items() if feature.private_training_data]
        if private:
            raise RecipeFieldError(source, "train.keep", f"train.keep: best chooses an epoch by the validation split of data that {private[0]} keeps "
                                   "private, which its ε does not account for; use train.keep: last")
    if sections["task"].objective == "features" and "distill" not in features:
        raise RecipeFieldError(source, "task.objective", "task.objective: 'features' trains a bare model, which has no loss of its own; "
                               "add a distill section, e.g. distill: {teacher: MODEL, hidden: 1.0, attention: 1.0}")
    return Recipe(methods=parse_methods(data.get("method"), source), features=features, source=source, **sections)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or the default main-job recipe), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else copy.deepcopy(DEFAULT_RECIPE)
    return recipe_from_data(data, overrides, source=str(path) if path is not None else "default recipe")


def recipe_from_data(data: dict[str, Any], overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    """A recipe mapping (the YAML's structure; ``model: NAME`` / ``task: NAME`` shorthands), with
    ``--set`` overrides applied, validated. ``data`` is not changed."""
    overrides = list(overrides or [])
    try:
        return validate_recipe(_with_overrides(data, overrides), source=source)
    except RecipeFieldError as exc:
        culprit = _override_at_fault(exc, data, overrides, source)
        if culprit is None:
            raise
        message = exc.message.removeprefix(f"{exc.loc}: ") if _override_path(culprit) == exc.loc else exc.message
        raise SlimtuneError(f"--set {culprit.strip()}: {message}") from None


def _with_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    if isinstance(data.get("task"), str):
        data["task"] = {"name": data["task"]}
    elif isinstance(data.get("task"), list):  # several tasks: a multi-task run
        data["task"] = {"tasks": data["task"]}
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def _override_path(assignment: str) -> str:
    return ".".join(p for p in assignment.partition("=")[0].strip().split(".") if p)


def blame(overrides: list[str] | None, loc: str, source: str, message: str) -> str:
    """``message`` about ``loc`` (a mistake found after validation, e.g. an unknown task name),
    naming the last ``--set`` that wrote ``loc`` (``--set task.name=x: ...``), else the recipe."""
    for assignment in reversed(overrides or []):
        path = _override_path(assignment)
        if path == loc:
            return f"--set {assignment.strip()}: {message}"
        if loc.startswith(path + "."):
            return f"--set {assignment.strip()}: {loc}: {message}"
    return f"{source}: {loc}: {message}"


def _override_at_fault(exc: RecipeFieldError, data: dict[str, Any], overrides: list[str], source: str) -> str | None:
    """The ``--set`` that caused ``exc``: the last one that wrote at, inside or around the error's
    place and without which that part of the recipe no longer fails this way; None when the
    file's own content is at fault."""
    def touches(path: str) -> bool:
        return path == exc.loc or path.startswith(exc.loc + ".") or exc.loc.startswith(path + ".")

    for i in reversed(range(len(overrides))):
        if not touches(_override_path(overrides[i])):
            continue
        try:
            without = _with_overrides(data, overrides[:i] + overrides[i + 1:])
        except SlimtuneError:  # a later --set built on this one
            return overrides[i]
        if not _part_fails_alike(without, exc, source):
            return overrides[i]
    return None


def _part_fails_alike(data: dict[str, Any], exc: RecipeFieldError, source: str) -> bool:
    """Whether the top-level part of ``data`` where ``exc`` arose fails with the same error. Only
    that part is validated: a whole recipe would import the methods (and torch) for a mistake
    that is reported before them."""
    top = exc.loc.split(".")[0]
    try:
        if top == "method":
            parse_methods(data.get("method"), source)
        elif top in CORE_SECTIONS:
            _validate_section(CORE_SECTIONS[top], data.get(top), top, source)
        elif top in FEATURES:
            if data.get(top) is not None:
                _validate_section(FEATURES[top], data[top], top, source)
        else:  # an unknown section
            return top in data
    except SlimtuneError as other:
        return str(other) == str(exc)
    return False
