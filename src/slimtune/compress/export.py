"""Ship a run as one model directory: ``slimtune export RUN_DIR --out DIR [--merge] [--slim SPEC]
[--int8] [--bf16] [--lora-rank K]``, loaded by ``slimtune.load_exported`` (see
``slimtune.compress.loader``).

The delta is merged into the base (``plain_merged``), optionally the least important heads and
FFN neurons are removed (``--slim``, ``parse_slim_spec``), the weights converted to int8 or bf16,
and the directory written (``save_exported``) with ``export_report.json``: size, params, FLOPs,
latency and task metrics of the re-loaded export next to the dense merged model's. The peft
adapter export lives in ``slimtune.compress.peft_export``. Loading the run is the runner's
(``slimtune.runner.export_run``): this package never imports the trainer or the runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.io import staged_directory, write_json, write_safetensors

# --------------------------------------------------------------------------------------------
# `slimtune export RUN_DIR --out DIR [--merge] [--slim SPEC] [--int8] [--bf16]`: a run shipped as
# one model directory that `slimtune.load_exported` loads (see slimtune.compress.loader).
# --------------------------------------------------------------------------------------------

# Default layout: the same share removed in every layer, FFN widths rounded to multiples of 32
# (benchmarks/slim.py measures global vs local vs rounded side by side: uniform layers turn more of
# the FLOP saving into speed than the uneven layers of a global ranking).
SLIM_DEFAULTS: dict[str, Any] = {"heads": 0.0, "ffn": 0.0, "criterion": "taylor", "scope": "local", "multiple": 32, "batches": 8}
SLIM_HELP = (
    "SPEC: comma-separated key=value; heads=F, ffn=F (fraction of attention heads / FFN neurons removed, "
    "0 <= F < 1), criterion=magnitude|delta|taylor|fisher (default taylor), scope=local|global (local, the "
    "default: the same share in every layer; global: ranked across layers, uneven widths), multiple=N (round "
    "each layer's kept FFN neurons to a multiple of N, default 32; 1 = no rounding), batches=N (training "
    "batches of 16 scored by taylor/fisher, default 8)"
)


def parse_slim_spec(text: str) -> dict[str, Any]:
    """``heads=0.5,ffn=0.5[,criterion=taylor][,scope=local][,multiple=32][,batches=8]`` -> a dict (one-line errors)."""
    from slimtune.errors import did_you_mean
    from slimtune.sparsity.importance import CRITERIA

    spec = dict(SLIM_DEFAULTS)
    seen = set()
    for item in str(text).split(","):
        key, sep, value = item.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise SlimtuneError(f"--slim '{text}': '{item.strip()}' is not key=value; {SLIM_HELP}")
        if key not in SLIM_DEFAULTS:
            raise SlimtuneError(f"--slim '{text}': unknown key '{key}'{did_you_mean(key, SLIM_DEFAULTS)}")
        if key in seen:
            raise SlimtuneError(f"--slim '{text}': '{key}' given twice")
        seen.add(key)
        if key in ("heads", "ffn"):
            try:
                fraction = float(value)
            except ValueError:
                raise SlimtuneError(f"--slim '{text}': {key}={value} is not a number; give a fraction in [0, 1)") from None
            if not 0 <= fraction < 1:  # also rejects nan
                raise SlimtuneError(f"--slim '{text}': {key}={value} must be a fraction in [0, 1) (removed share)")
            spec[key] = fraction
        elif key in ("batches", "multiple"):
            if not value.isdigit() or int(value) < 1:
                raise SlimtuneError(f"--slim '{text}': {key}={value} must be a positive integer")
            spec[key] = int(value)
        elif key == "criterion":
            if value not in CRITERIA:
                raise SlimtuneError(f"--slim '{text}': criterion '{value}' is not known{did_you_mean(value, CRITERIA)}")
            spec[key] = value
        else:
            if value not in ("global", "local"):
                raise SlimtuneError(f"--slim '{text}': scope '{value}' must be local or global")
            spec[key] = value
    if "heads" not in seen and "ffn" not in seen:
        raise SlimtuneError(f"--slim '{text}': give heads=F and/or ffn=F; {SLIM_HELP}")
    return spec


def plain_merged(model, delta) -> None:
    """Merge the delta into the base weights and leave plain ``nn.Linear`` modules with only
    ``weight``/``bias`` (no wrappers, no method parameters or hooks), in place."""
    import torch
    from torch import nn

    from slimtune.core.arch import replace_module

    if not delta.can_merge:
        unmergeable = [m.name for m in delta.methods if not (m.mergeable or m.in_place)]
        raise SlimtuneError(
            f"method(s) {', '.join(unmergeable)} are not linear updates: their run cannot be merged into a plain model "
            "(export supports runs of mergeable methods: lora, ia3, kadaptation, fact, bitfit, full, linear_probe)"
        )
    for method in delta.methods:
        if method.mergeable:
            import inspect

            # Exporting needs no exact-unmerge copy of every merged weight.
            takes_keep = "keep_original" in inspect.signature(method.merge).parameters
            method.merge(model, keep_original=False) if takes_keep else method.merge(model)
    for name, module in list(model.named_modules()):
        base = getattr(module, "base", None)
        if isinstance(base, nn.Linear) and getattr(module, "merged_from", None) is not None:
            replace_module(model, name, base)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            extra = {n for n, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}
            if extra or module._forward_hooks or module._forward_pre_hooks or type(module) is not nn.Linear:
                clean = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  dtype=module.weight.dtype)
                with torch.no_grad():
                    clean.weight.copy_(module.weight)
                    if module.bias is not None:
                        clean.bias.copy_(module.bias)
                replace_module(model, name, clean)
    leftovers = [n for n, m in model.named_modules() if hasattr(m, "merged_from")]
    if leftovers:
        raise SlimtuneError(f"after merging, '{leftovers[0]}' is still a method wrapper; this method cannot be exported")
    model.requires_grad_(False)


def _dedupe_shared(state: dict[str, Any]) -> dict[str, Any]:
    """Drop later names of tied tensors (safetensors refuses shared storage); loading re-ties them."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def hf_config(model):
    """A copy of the model's config that describes its (possibly slimmed) shapes, or None when
    the config cannot express them (per-layer widths; fewer BERT/MPNet heads). The model's own
    config is left as it is: the shape record is relative to it."""
    import copy

    from slimtune.sparsity.structured import is_dense, model_family, shape_record

    record = shape_record(model)
    config = copy.deepcopy(model.config)
    if is_dense(record):
        return config
    layers = record["layers"]
    widths = {len(layer["neurons"]) for layer in layers}
    heads = {len(layer["heads"]) for layer in layers}
    kv = {len(layer["kv_heads"]) for layer in layers}
    if len(widths) != 1 or min(widths) == 0:
        return None
    if model_family(model) == "llama":
        if len(heads) != 1 or len(kv) != 1 or min(heads) == 0:
            return None
        config.head_dim = record["head_dim"]
        config.num_attention_heads = heads.pop()
        config.num_key_value_heads = kv.pop()
    elif heads != {record["num_attention_heads"]}:
        return None
    config.intermediate_size = widths.pop()
    return config


def _describe(config, model, *, pooling: str, labels: list[str] | None) -> None:
    """What the saved config.json claims: the task's label names, and as ``architectures`` the
    transformers class that computes this model's head, or none when no class does (mean pooling:
    BERT's classes read [CLS] through a pooler the run never trained)."""
    config.architectures = None if pooling == "mean" else [type(model).__name__]
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}


def _plain_hf(model, layout: str, *, pooling: str, int8: bool, sparse: bool = False, task_heads: bool = False) -> str:
    """The ``plain_hf`` note of the export record: which transformers class reproduces the export
    from the directory alone, or why none does."""
    if layout == "hf":
        return f"yes: transformers' {type(model).__name__}.from_pretrained(DIR) computes this model"
    if task_heads:
        why = "it has one head per task, chosen by each example's task_ids, which no transformers class computes"
    elif pooling == "mean":
        why = ("its classifier reads the masked mean of the token states, which no transformers class computes "
               "(theirs read [CLS] through a pooler this run never trained)")
    elif int8:
        why = "its Linear layers are int8"
    elif sparse:
        why = "its Linear weights are stored sparse (positions + values)"
    else:
        why = "its per-layer shapes (shapes.json) are not expressible in config.json"
    return f"no: {why}; the weights are in a file transformers does not look for, so use slimtune.load_exported(DIR)"


def _write_model(model, staging: Path, *, int8: bool, pooling: str, labels: list[str] | None, sparse: bool = False,
                 dense_model=None, task_heads: bool = False) -> dict[str, Any]:
    """Write the weights and config; returns the layout part of the export record (with
    ``sparse``: the sparse format and the compression against ``dense_model``, the float32 twin)."""
    import copy

    from slimtune.compress.loader import HF_WEIGHTS, REBUILT_WEIGHTS, SHAPES_FILE
    from slimtune.compress.quantize import INT8_FORMAT, int8_state
    from slimtune.sparsity.structured import is_dense, shape_record

    record = shape_record(model)
    # Mean pooling is written in the rebuilt layout: under model.safetensors,
    # AutoModelForSequenceClassification would load it with a random [CLS] pooler in front of the
    # classifier and predict near-constant logits without an error.
    config = None if int8 or sparse or pooling == "mean" or task_heads else hf_config(model)
    if config is not None:
        # The Hugging Face layout: config.json + model.safetensors under the model's own names.
        _describe(config, model, pooling=pooling, labels=labels)
        config.save_pretrained(staging)
        write_safetensors(staging / HF_WEIGHTS, _dedupe_shared(model.state_dict()), metadata={"format": "pt"})
        return {"layout": "hf", "shapes": None, "int8": None, "plain_hf": _plain_hf(model, "hf", pooling=pooling, int8=int8)}
    config = copy.deepcopy(model.config)  # the dense config; shapes.json says what was removed
    _describe(config, model, pooling=pooling, labels=labels)
    config.save_pretrained(staging)
    state = _dedupe_shared(int8_state(model) if int8 else dict(model.state_dict()))
    sparse_record = None
    if sparse:
        from slimtune.compress.sparse_weights import SPARSE_FORMAT, compression, sparse_weights

        state = sparse_weights(model, state)
        sparse_record = {"format": SPARSE_FORMAT, **compression(state, dense_model if dense_model is not None else model)}
    write_safetensors(staging / REBUILT_WEIGHTS, state, metadata={"format": "pt"})
    shapes = None
    if not is_dense(record):
        write_json(staging / SHAPES_FILE, record)
        shapes = SHAPES_FILE
    return {"layout": "rebuilt", "shapes": shapes, "int8": INT8_FORMAT if int8 else None, "sparse": sparse_record,
            "plain_hf": _plain_hf(model, "rebuilt", pooling=pooling, int8=int8, sparse=sparse, task_heads=task_heads)}


def save_exported(
    model,
    directory: str | Path,
    *,
    objective: str = "classification",
    pooling: str = "cls",
    labels: list[str] | None = None,
    tokenizer=None,
    kinds: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    sparse: bool = False,
    dense_model=None,
    tasks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write an in-memory model (plain Linears: merged, possibly slimmed by
    ``slimtune.sparsity.structured``, possibly int8 or bf16) as an export directory that
    ``slimtune.load_exported`` loads; returns the export record. ``directory`` must not exist
    or be empty. ``pooling``: what feeds a classification head (``mean`` re-installs slimtune's
    masked-mean pooler at load time). ``sparse``: Linear weights with zeros stored as positions +
    values (``compress.sparse_weights``), the record's ``sparse`` holding the encoder compression against
    ``dense_model`` (the float32 model, when ``model`` is int8). ``tasks``: a multi-task model's
    heads (name and labels of each, in order; :func:`task_heads`), re-attached at load time."""
    import torch

    from slimtune.compress.loader import EXPORT_FORMAT, EXPORT_RECORD
    from slimtune.compress.quantize import is_int8_linear
    from slimtune.sparsity.structured import is_dense, shape_record

    directory = Path(directory)
    check_out(directory)
    directory.mkdir(parents=True, exist_ok=True)
    int8 = any(is_int8_linear(m) for m in model.modules())
    float_params = [p for p in model.parameters() if p.is_floating_point()]
    bf16 = bool(float_params) and float_params[0].dtype == torch.bfloat16
    if kinds is None:
        kinds = (["merged"] + ([] if is_dense(shape_record(model)) else ["slimmed"]) + (["int8"] if int8 else []) + (["bf16"] if bf16 else [])
                 + (["sparse"] if sparse else []))
    layout = _write_model(model, directory, int8=int8, pooling=pooling, labels=labels if objective == "classification" else None,
                          sparse=sparse, dense_model=dense_model, task_heads=bool(tasks))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    record = {
        "format": EXPORT_FORMAT,
        "kinds": kinds,
        "objective": objective,
        "pooling": pooling,
        "labels": labels,
        **({"tasks": tasks} if tasks else {}),
        "dtype": "bfloat16" if bf16 else "float32",
        **layout,
        **(extra or {}),
    }
    write_json(directory / EXPORT_RECORD, record)
    return record


def measure_model(model, rows, pad_id, objective, num_labels, *, batch_size=32, seq_len=128, threads=2, repeats=10,
                  directory: Path | None = None, shapes_from=None, task=None) -> dict[str, Any]:
    """The export report's figures for one model: metrics (of each task of a multi-task ``task``
    too), params, FLOPs, latency (and size)."""
    from slimtune.measure.evaluate import evaluate_rows, evaluate_task
    from slimtune.zoo.batches import rows_batch
    from slimtune.zoo.multitask import is_multitask
    from slimtune.measure.flops import flops_per_example
    from slimtune.measure.latency import measure_latency
    from slimtune.measure.params import file_bytes, param_counts
    from slimtune.zoo.batches import fixed_length_batch

    one = fixed_length_batch(rows, pad_id, 1, seq_len)
    timing = measure_latency(model, fixed_length_batch(rows, pad_id, batch_size, seq_len), threads=threads, repeats=repeats)
    out = {
        "metrics": evaluate_task(model, lambda indices: rows_batch(rows, indices, pad_id, objective), task, "test", len(rows), objective, 64)
        if is_multitask(task) else evaluate_rows(model, rows, pad_id, objective, num_labels),
        "params": param_counts(model)["total"],
        "flops_per_example": flops_per_example(model, one, shapes_from=shapes_from),
        "latency_ms_median": timing["latency_ms_median"],
        "latency_ms_p90": timing["latency_ms_p90"],
    }
    if directory is not None:
        out["size_bytes"] = file_bytes(directory)
    return out


def task_heads(task) -> list[dict[str, Any]] | None:
    """A multi-task run's heads as the export record keeps them (name and labels of each task)."""
    members = getattr(task, "members", None)
    return [{"name": m.name, "labels": list(m.label_names)} for m in members] if members else None


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"--out {out}: exists and is not an empty directory; choose a new one (nothing was written)")


def check_export_request(out: Path, *, merge: bool = False, slim: str | dict[str, Any] | None = None, int8: bool = False,
                         bf16: bool = False, sparse: bool = False, **options: Any) -> dict[str, Any]:
    """Validate an export's options before anything loads (one-line errors); the options for
    :func:`export_model`, ``slim`` parsed."""
    spec = parse_slim_spec(slim) if isinstance(slim, str) else slim
    if int8 and bf16:
        raise SlimtuneError("--int8 and --bf16: choose one (int8 Linears run on float32 activations)")
    if sparse and bf16:
        raise SlimtuneError("--sparse and --bf16: the sparse format stores float32 or int8 weights; choose one")
    if not (merge or spec or int8 or bf16 or sparse):
        raise SlimtuneError("export: give --merge, --slim SPEC, --int8, --bf16 and/or --sparse (or --peft OUT for a peft adapter)")
    check_out(out)
    return {"merge": merge, "slim": spec, "int8": int8, "bf16": bf16, "sparse": sparse, **options}


def export_model(
    built,
    out: Path,
    *,
    merge: bool = False,
    slim: dict[str, Any] | None = None,
    int8: bool = False,
    bf16: bool = False,
    sparse: bool = False,
    measure: bool = True,
    threads: int = 2,
    batch_size: int = 32,
    seq_len: int | None = None,
    repeats: int = 10,
    lora_rank: int | float | None = None,
) -> dict[str, Any]:
    """``built``: a loaded run (``slimtune.runner.load_run``; options checked by
    :func:`check_export_request`; ``slimtune.runner.export_run`` does both). Merge a run's delta into its base (its LoRA update first truncated to ``lora_rank``, see
    ``slimtune.compress.lora_rank``, when given), optionally remove the least important heads/neurons
    (``slim``), convert to int8 or bf16, and write ``out`` (loadable by ``slimtune.load_exported``)
    with ``export_report.json``: size on disk, params, FLOPs, latency and the task metrics of the
    exported model (re-loaded from ``out``), next to the dense merged float32 model's, measured
    side by side. Nothing is written unless all inputs are valid; ``out`` appears complete or not
    at all (written under a temporary name, then renamed). Returns the report."""
    import torch

    from slimtune.compress.loader import load_exported
    from slimtune.measure.params import file_bytes
    from slimtune.zoo.batches import pad_id_of, split_rows

    spec = slim
    check_out(out)
    recipe, run_dir = built.recipe, built.run_dir
    run_sections = _run_sections(run_dir)
    if spec and spec["criterion"] in ("taylor", "fisher") and "privacy" in run_sections:
        # Scoring units on the private training data without noise is not covered by the run's ε.
        raise SlimtuneError(
            f"--slim criterion={spec['criterion']}: scores heads and neurons on the training data of a DP run "
            f"({run_dir / 'report.json'} has a privacy section), which its ε does not cover; use criterion=magnitude or delta"
        )
    model, objective = built.model, built.objective
    lora_info = None
    if lora_rank is not None:
        from slimtune.compress.lora_rank import prune_run_lora

        lora_info = prune_run_lora(model, built.delta, lora_rank)
        lora_info.pop("relative_error")
    pad_id = pad_id_of(built.tokenizer)
    max_length = recipe.train.max_length
    seq_len = seq_len or recipe.measure.seq_len or max_length
    rows = {name: split_rows(built.task, built.tokenizer, name, max_length, objective) for name in ("train", "test")}
    num_labels = len(built.task.label_names)

    plain_merged(model, built.delta)
    model.eval()
    reference = None
    if measure:
        reference = measure_model(model, rows["test"], pad_id, objective, num_labels, batch_size=batch_size,
                                  seq_len=seq_len, threads=threads, repeats=repeats, task=built.task)
    slimming = None
    if spec:
        slimming = _slim(model, built, spec, rows["train"], pad_id)
    kinds = ["merged"] + (["slimmed"] if spec else []) + (["int8"] if int8 else []) + (["bf16"] if bf16 else []) + (["sparse"] if sparse else [])
    float_twin = None
    if int8:
        import copy

        float_twin = copy.deepcopy(model)  # FLOPs of an int8 model are those of the same shapes
        from slimtune.compress.quantize import quantize_int8

        quantize_int8(model)
    if bf16:
        model.to(torch.bfloat16)

    with staged_directory(out) as staging:
        record = save_exported(
            model, staging, objective=objective, pooling=built.pooling, labels=list(built.task.label_names),
            tokenizer=built.tokenizer, kinds=kinds, sparse=sparse, dense_model=float_twin, tasks=task_heads(built.task),
            extra={"slim": slimming, "max_length": max_length, "lora_rank": lora_info,
                   "source": {"run_dir": str(run_dir), "model": recipe.model.name, "method": built.delta.label, "task": built.task.name}},
        )
        exported = load_exported(staging)
        report: dict[str, Any] = {"export": record, "size_bytes": file_bytes(staging)}
        if run_sections:
            report["run"] = run_sections
        if measure:
            report["exported"] = measure_model(
                exported, rows["test"], pad_id, objective, num_labels, batch_size=batch_size, seq_len=seq_len,
                threads=threads, repeats=repeats, shapes_from=float_twin, task=built.task,
            )
            report["exported"]["size_bytes"] = report["size_bytes"]
            what = "the run's model merged, dense, float32, measured in this process"
            if lora_info:
                what += f" (its LoRA update truncated to rank {lora_info['kept_rank']} of {lora_info['r']}, as exported)"
            report["reference"] = {**reference, "what": what}
            report["ratios"] = {
                key: report["exported"][key] / reference[key]
                for key in ("params", "flops_per_example", "latency_ms_median") if reference[key]
            }
            report["setting"] = {"batch_size": batch_size, "seq_len": seq_len, "threads": threads, "repeats": repeats,
                                 "n_test": len(rows["test"])}
        write_json(staging / "export_report.json", report)
    return report


#: Sections of the run's report.json that still hold for its export: the privacy guarantee (ε, δ:
#: merging, removing units by weights, converting and measuring on test data are post-processing)
#: and how the run was sparsified or quantisation-aware trained.
RUN_SECTIONS = ("privacy", "sparsity", "qat")


def _run_sections(run_dir: Path | None) -> dict[str, Any]:
    """The run's report.json sections in ``RUN_SECTIONS`` (with the file they came from), or {}."""
    from slimtune.io import read_json

    path = Path(run_dir) / "report.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    saved = read_json(path)
    sections = {key: saved[key] for key in RUN_SECTIONS if isinstance(saved, dict) and key in saved}
    return {"report": str(path), **sections} if sections else {}


def _slim(model, built, spec: dict[str, Any], train_rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Score heads and neurons on the task's training data and remove the requested fractions."""
    from slimtune.sparsity import importance, structured
    from slimtune.zoo.batches import shuffled_batches

    batches = reference = None
    if spec["criterion"] in ("taylor", "fisher"):
        batches = shuffled_batches(train_rows, pad_id, built.objective, 16, spec["batches"], built.recipe.train.seed)
    if spec["criterion"] == "delta":
        from slimtune.zoo.models import load_model

        base = load_model(built.recipe.model.name, objective=built.objective, num_labels=len(built.task.label_names))
        reference = base.state_dict()
    head_scores, neuron_scores = importance.unit_importance(model, spec["criterion"], batches=batches, reference=reference)
    heads = importance.select_heads(model, head_scores, spec["heads"], spec["scope"])
    neurons = importance.select_lowest(neuron_scores, spec["ffn"], spec["scope"], "ffn", spec.get("multiple", 1))
    structured.remove_heads(model, heads)
    record = structured.remove_ffn_neurons(model, neurons)
    return {
        **spec,
        "removed_heads": sum(len(v) for v in heads.values()),
        "removed_neurons": sum(len(v) for v in neurons.values()),
        "kept_heads_per_layer": [len(layer["heads"]) for layer in record["layers"]],
        "kept_neurons_per_layer": [len(layer["neurons"]) for layer in record["layers"]],
    }
