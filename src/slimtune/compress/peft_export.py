"""Export a LoRA run's delta as a peft adapter (``slimtune export RUN --peft OUT``).

``peft_adapter(run_files, out)`` (``slimtune.runner.export_peft(run_dir, out)`` reads the run): a LoRA run (``method: lora`` alone) becomes a peft adapter
directory, ``adapter_config.json`` + ``adapter_model.safetensors``, that
``peft.PeftModel.from_pretrained(base, out)`` loads and that computes the same outputs. The
mapping is one to one, because slimtune's LoRA is peft's LoRA (``W + (alpha / r) B A``, no
rsLoRA): ``<module>.lora_A`` -> ``base_model.model.<module>.lora_A.weight`` (same for ``lora_B``);
the task head (classifier/score, and BERT's pooler when it trained) goes to ``modules_to_save``
under ``base_model.model.<name>``. ``base_model_name_or_path`` is the local model directory,
except for a zoo model truncated at load time (``minilm-l2`` keeps 2 of minilm-l6's 6 layers):
its directory holds the full checkpoint, from which peft would rebuild the 6-layer model, so the
truncated base is written beside the adapter (``OUT/base``, checked against the run's base
fingerprint) and recorded by its absolute path; ``AutoPeftModelForSequenceClassification
.from_pretrained(OUT)`` then rebuilds the run's model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.io import read_json, staged_directory, write_json, write_safetensors

PEFT_PREFIX = "base_model.model."
TASK_TYPES = {"classification": "SEQ_CLS", "lm": "CAUSAL_LM"}
BASE_DIR = "base"  # OUT/base: the truncated base of a minilm-l2 run


def check_peft_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"--peft {out}: exists and is not an empty directory; choose a new one")


def peft_adapter(run, out: Path) -> dict[str, Any]:
    """Write the LoRA delta of a run (``slimtune.runner.RunFiles``: dir, recipe, meta, state) as a
    peft adapter directory ``out``; returns its config."""
    from slimtune.zoo.models import MODELS, model_dir

    check_peft_out(out)
    run_dir, recipe, meta, state = run.dir, run.recipe, run.meta, run.state
    methods = meta.get("methods", [])
    names = [m.get("name") for m in methods]
    if names != ["lora"]:
        raise SlimtuneError(
            f"{run_dir / 'delta.json'}: --peft exports LoRA deltas only (method: lora alone); this run's methods are {names}"
        )
    lora = methods[0]
    objective = recipe.objective
    if objective == "classification" and recipe.head.pooling != "cls":
        # peft wraps the plain HF model, whose head reads [CLS] through the pooler: a run trained
        # on mean-pooled features would not compute the same function there.
        raise SlimtuneError(
            f"{run_dir / 'recipe.yaml'}: --peft needs a run trained with head.pooling: cls (the HF head that peft "
            f"wraps reads [CLS]); this run used head.pooling: {recipe.head.pooling}"
        )
    head_names: list[str] = list(meta.get("head", []))

    tensors = {}
    targets = set()
    # A masked delta (a sparsity section) is stored sparsely: back to dense tensors, whose zeros
    # peft computes with exactly.
    from slimtune.sparsity.storage import decode_state

    state = decode_state(state)[0]
    for key, tensor in state.items():
        if key in head_names:
            tensors[PEFT_PREFIX + key] = tensor
            continue
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B"):
            raise SlimtuneError(f"{run_dir / 'delta.safetensors'}: unexpected tensor '{key}' in a LoRA delta")
        tensors[f"{PEFT_PREFIX}{module}.{leaf}.weight"] = tensor
        targets.add(module)
    if not targets:
        raise SlimtuneError(f"{run_dir / 'delta.safetensors'}: holds no LoRA tensors")
    modules_to_save = sorted({name.rpartition(".")[0] for name in head_names}) or None

    spec = MODELS.get(recipe.model.name)
    truncated = spec is not None and spec.num_hidden_layers is not None
    base_path = (out.resolve() / BASE_DIR) if truncated else model_dir(recipe.model.name)
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[objective],
        "base_model_name_or_path": str(base_path),
        "r": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": sorted(targets),
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    base = _truncated_base(run) if truncated else None  # loaded and checked before anything is written
    with staged_directory(out) as staging:
        write_safetensors(staging / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        write_json(staging / "adapter_config.json", config)
        if base is not None:
            from slimtune.zoo.hf_helpers import quiet_transformers

            model, tokenizer = base
            with quiet_transformers():  # no shard-writing progress bar in the CLI's output
                model.save_pretrained(staging / BASE_DIR)
            tokenizer.save_pretrained(staging / BASE_DIR)
    return config


def _truncated_base(run):
    """The base model (task head as initialised) and tokenizer of a run on a truncated zoo model,
    as the run was trained on it, with the task's label names in its config."""
    from slimtune.methods.delta import base_fingerprint, check_fingerprint
    from slimtune.zoo.models import load_model, load_tokenizer

    report_path = run.dir / "report.json"
    labels = None
    if run.recipe.objective == "classification":
        labels = read_json(report_path).get("task", {}).get("labels") if report_path.is_file() else None
        if not isinstance(labels, list) or len(labels) < 2:
            raise SlimtuneError(f"{report_path}: no task.labels there; --peft writes {run.recipe.model.name}'s truncated base "
                                "with the run's label count (export a finished run)")
    model = load_model(run.recipe.model.name, objective=run.recipe.objective, **({"num_labels": len(labels)} if labels else {}))
    check_fingerprint(run.meta, base_fingerprint(run.recipe.model.name, model), run.dir / "delta.json",
                      remedy="the peft export would write another base than the one this delta was trained on")
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    return model, load_tokenizer(run.recipe.model.name)
