"""``slimtune.load_exported(DIR)``: one loader for every kind of ``slimtune export``.

An export directory always holds ``slimtune_export.json`` (what the export is), ``config.json``
and the tokenizer. Its weights come in one of two layouts:

- **plain Hugging Face** (``model.safetensors``), whenever the config can express the model and
  a transformers class computes its head (not mean pooling): a merged model, a bf16 model, a
  slimmed model whose layers all kept the same FFN width (and, for Llama, the same numbers of
  query and KV heads: ``head_dim`` is explicit there), and, for BERT/MPNet, no head removed (their
  config derives the head width from hidden / heads, so fewer heads of the same width cannot be
  written down). ``AutoModelFor*.from_pretrained(DIR)`` loads these directly and computes the
  same logits; ``config.json`` carries the task's ``id2label``.
- **rebuilt** (``slimtune_model.safetensors`` + ``shapes.json``), otherwise: per-layer widths,
  int8 weights (see ``slimtune.compress.quantize``), or a mean-pooled classifier. ``config.json`` then describes the *dense*
  model; ``shapes.json`` is the per-layer shape record of ``slimtune.sparsity.structured``
  (kept original head / KV-head / neuron indices per layer). The loader builds the dense
  skeleton from the config, shrinks it to those shapes, quantises it if the export is int8 and
  loads the tensors; ``export --sparse`` stores its Linear weights as positions + values
  (``slimtune.compress.sparse_weights``), decoded here. The file name differs from ``model.safetensors`` on purpose: a plain
  ``from_pretrained`` fails loudly instead of loading mismatched tensors.

Classification exports trained with mean pooling (the default for MiniLM/MPNet) record
``pooling: mean``; the loader puts the masked-mean pooler back in place of BERT's [CLS] pooler.
No transformers class computes that head, which is why they are never in the plain layout (a bare
``from_pretrained`` would random-initialise the [CLS] pooler and predict near-constant logits).
The record's ``plain_hf`` says whether transformers alone reproduces the export.

A multi-task export (``tasks`` in the record: each task's name and labels) is rebuilt too: its
stacked head is split back into one head per task, and the model is called with ``task_ids``
(each example's task index, in the record's order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.io import check_safetensors, read_json, read_safetensors

EXPORT_FORMAT = "slimtune-export/1"
EXPORT_RECORD = "slimtune_export.json"
SHAPES_FILE = "shapes.json"
HF_WEIGHTS = "model.safetensors"
REBUILT_WEIGHTS = "slimtune_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _auto_class(objective: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    if objective == "classification":
        return AutoModelForSequenceClassification
    if objective == "lm":
        return AutoModelForCausalLM
    if objective == "mlm":
        return AutoModelForMaskedLM
    if objective == "features":
        return AutoModel
    raise SlimtuneError(f"{EXPORT_RECORD}: objective '{objective}' must be 'classification', 'lm', 'mlm' or 'features'")


def read_export_record(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise SlimtuneError(f"{directory}: export directory does not exist")
    path = directory / EXPORT_RECORD
    if not path.is_file():
        raise SlimtuneError(f"{directory}: not a slimtune export (no {EXPORT_RECORD}); write one with `slimtune export`")
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise SlimtuneError(f"{path}: format is {record.get('format') if isinstance(record, dict) else None!r}, expected '{EXPORT_FORMAT}'")
    if record.get("dtype") not in DTYPES:
        raise SlimtuneError(f"{path}: dtype {record.get('dtype')!r} must be one of {', '.join(DTYPES)}")
    return record


def load_exported(directory: str | Path) -> nn.Module:
    """Load a ``slimtune export`` directory; returns the model in eval mode, ready for inference
    (tokenizer: ``AutoTokenizer.from_pretrained(directory)``). ``model.slimtune_export`` holds the
    export record (kinds, pooling, labels, dtype, shapes)."""
    from transformers import AutoConfig

    from slimtune.zoo.heads import configure_pooling
    from slimtune.zoo.hf_helpers import quiet_transformers

    directory = Path(directory)
    record = read_export_record(directory)
    objective = record.get("objective", "classification")
    auto_class = _auto_class(objective)
    dtype = DTYPES[record["dtype"]]
    if record.get("layout") == "hf":
        check_safetensors(directory / HF_WEIGHTS)  # a pickle or corrupt file: one line, not transformers' traceback
    try:
        # A mean-pooled export has no [CLS] pooler weights: transformers' report of them as
        # missing is expected (the pooler is replaced just below), so it is silenced.
        with quiet_transformers():
            if record.get("layout") == "hf":
                model = auto_class.from_pretrained(directory, dtype=dtype, use_safetensors=True)
            else:
                config = AutoConfig.from_pretrained(directory)
                model = auto_class.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise SlimtuneError(f"{directory}: cannot load the model ({str(error).splitlines()[0]})") from None
    if objective == "classification":
        configure_pooling(model, record.get("pooling", "cls"), objective)
    if record.get("tasks"):  # a multi-task model: one head per task, each call routed by task_ids
        from slimtune.zoo.heads import attach_task_heads

        tasks = record["tasks"]
        attach_task_heads(model, [t["name"] for t in tasks], [len(t["labels"]) for t in tasks])
    if record.get("layout") != "hf":
        _load_rebuilt(model, directory, record, dtype)
    model.slimtune_export = record
    return model.eval()


def _load_rebuilt(model: nn.Module, directory: Path, record: dict[str, Any], dtype: torch.dtype) -> None:
    from slimtune.sparsity.structured import apply_shape_record

    if record.get("shapes"):
        apply_shape_record(model, read_json(directory / SHAPES_FILE), str(directory / SHAPES_FILE))
    weights = directory / REBUILT_WEIGHTS
    state = read_safetensors(weights)
    if record.get("sparse"):  # positions + values back to dense tensors (zeros elsewhere)
        from slimtune.sparsity.storage import decode_state

        state = decode_state(state)[0]
    if record.get("int8"):
        from slimtune.compress.quantize import load_int8_state

        load_int8_state(model, state, str(weights))
        return
    model.to(dtype)
    result = model.load_state_dict(state, strict=False)
    # Tied/derived buffers may be absent from a saved state; every parameter must be present.
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise SlimtuneError(f"{weights}: tensor '{first}' {'missing' if missing else 'not expected'} for this model")
