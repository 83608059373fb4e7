"""Loading named or local models offline: config (with the registry's layer truncation, e.g.
minilm-l2 keeps 2 of MiniLM-L6's layers), tokenizer (with a pad token), and the model for an
objective (classification / causal LM / masked LM / the bare encoder's features; ViT-like configs
load as image classifiers), safetensors
weights only. This is the zoo's model API: the registry's names (:mod:`slimtune.zoo.model_registry`)
are re-exported here, so ``from slimtune.zoo.models import MODELS, model_dir, load_model`` works.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.hf_helpers import ensure_pad_token, first_line, float32, quiet_transformers
from slimtune.zoo.model_registry import (
    BUNDLED_WEIGHTS,
    MODELS,
    Family,
    ModelSpec,
    cache_dir,
    is_installed,
    list_models,
    model_dir,
)

if TYPE_CHECKING:  # torch/transformers are imported lazily: listing models must stay cheap
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BUNDLED_WEIGHTS",
    "MODELS",
    "OBJECTIVES",
    "Family",
    "ModelSpec",
    "cache_dir",
    "is_installed",
    "is_vision_config",
    "list_models",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_dir",
    "require_safetensors_weights",
]

logger = logging.getLogger(__name__)

Objective = Literal["classification", "lm", "mlm", "features"]
OBJECTIVES: tuple[str, ...] = ("classification", "lm", "mlm", "features")


def _spec_for(name_or_path: str | os.PathLike[str]) -> ModelSpec | None:
    if isinstance(name_or_path, str):
        return MODELS.get(name_or_path)
    return None


def _display_name(name_or_path: str | os.PathLike[str]) -> str:
    return name_or_path if isinstance(name_or_path, str) else os.fspath(name_or_path)


def load_config(name_or_path: str | os.PathLike[str]) -> PretrainedConfig:
    """The model's config, with the registry's overrides (e.g. minilm-l2 keeps 2 layers)."""
    from transformers import AutoConfig

    directory = model_dir(name_or_path)
    spec = _spec_for(name_or_path)
    overrides: dict[str, Any] = {}
    if spec is not None and spec.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = spec.num_hidden_layers
    try:
        return AutoConfig.from_pretrained(directory, **overrides)
    except (OSError, ValueError) as error:
        raise SlimtuneError(
            f"cannot read {directory / 'config.json'}: {first_line(error)}"
        ) from error


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos for Llama) and right-side padding."""
    from transformers import AutoTokenizer

    directory = model_dir(name_or_path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise SlimtuneError(
            f"cannot load a tokenizer from {directory}: {first_line(error)}"
        ) from error
    ensure_pad_token(tokenizer)
    # Classification pools the first token or masks padding; right padding keeps positions
    # aligned with pre-training for both encoders and decoders.
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    objective: Objective = "classification",
    num_labels: int = 2,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    keep_head: bool = False,
) -> PreTrainedModel:
    """Load a model offline for an objective.

    ``objective="classification"`` gives ``AutoModelForSequenceClassification`` with a new head
    of ``num_labels`` outputs; ``objective="lm"`` gives ``AutoModelForCausalLM``;
    ``objective="mlm"`` gives ``AutoModelForMaskedLM`` and refuses a checkpoint without the
    masked-LM head (the sentence-transformers MiniLM has none);
    ``objective="features"`` gives the bare model (``AutoModel``: hidden states, no head), what a
    sparse pre-training stage trains when the checkpoint has no LM head. ``dtype``
    defaults to float32. ``attn_implementation="sdpa"`` falls back to eager for architectures
    without SDPA support (MPNet). The expected report about the new, randomly initialised head is
    silenced; any other missing or unused weights are logged as a warning, and real loading
    errors raise :class:`SlimtuneError`.

    Vision models (a config with ``image_size``, e.g. ViT) load as
    ``AutoModelForImageClassification``. Their checkpoint may carry the pre-training head; it is
    re-initialised (a new task gets a new head, as for text) unless ``keep_head=True`` (used to
    check a checkpoint's own accuracy).
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    if objective not in OBJECTIVES:
        raise SlimtuneError(
            f"unknown objective '{objective}'{did_you_mean(str(objective), OBJECTIVES)}"
        )
    valid_count = (
        isinstance(num_labels, int) and not isinstance(num_labels, bool) and num_labels >= 2
    )
    if objective == "classification" and not valid_count:
        raise SlimtuneError(
            f"num_labels must be an integer >= 2 for classification, got {num_labels!r}"
        )

    directory = model_dir(name_or_path)
    require_safetensors_weights(directory)
    config = load_config(name_or_path)
    if objective == "classification":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            # Decoder classifiers pool the last non-pad token, so they must know the pad id;
            # the tokenizer pads with eos for these models.
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        auto_class = AutoModelForImageClassification if is_vision_config(config) else AutoModelForSequenceClassification
    elif objective == "lm":
        auto_class = AutoModelForCausalLM
    elif objective == "mlm":
        auto_class = AutoModelForMaskedLM
    else:
        auto_class = AutoModel

    try:
        with quiet_transformers():
            model, loading_info = auto_class.from_pretrained(
                directory,
                config=config,
                dtype=dtype if dtype is not None else float32(),
                attn_implementation=_attention_for(auto_class, config, attn_implementation),
                output_loading_info=True,
                use_safetensors=True,  # never fall back to pickle weights (pytorch_model.bin)
                # A checkpoint with a head (a vision model's pre-training head, a fine-tuned text
                # classifier) and a task with another number of classes: a new head (a vision one
                # is re-initialised below in any case).
                **({"ignore_mismatched_sizes": True} if objective == "classification" else {}),
            )
    except (OSError, ValueError, RuntimeError) as error:
        label = _display_name(name_or_path)
        raise SlimtuneError(
            f"cannot load model '{label}' from {directory}: {first_line(error)}"
        ) from error
    if objective == "mlm":
        _require_mlm_head(model, loading_info, _display_name(name_or_path))
    _warn_unexpected_loading(model, loading_info, config, _display_name(name_or_path))
    if auto_class is AutoModelForImageClassification and not keep_head:
        _reinitialise_head(model)
    return model


def _require_mlm_head(model: PreTrainedModel, loading_info: dict[str, Any], label: str) -> None:
    """A masked-LM run trains the checkpoint's own MLM head; a new random one would make the loss
    measure the head rather than the encoder."""
    head = sorted(k for k in loading_info.get("missing_keys", ()) if not k.startswith(f"{model.base_model_prefix}."))
    if head:
        raise SlimtuneError(f"model '{label}' has no masked-LM head ({len(head)} weights missing from its checkpoint, e.g. {head[0]}); "
                            "use task.objective features with a distill section (hidden-state distillation) instead")


def is_vision_config(config: PretrainedConfig) -> bool:
    """A vision encoder (ViT-like): its inputs are ``pixel_values``."""
    return getattr(config, "image_size", None) is not None and getattr(config, "num_channels", None) is not None


def _reinitialise_head(model: PreTrainedModel) -> None:
    import torch
    from torch import nn

    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        std = getattr(model.config, "initializer_range", 0.02)
        with torch.no_grad():  # ViT's own init for its classifier: truncated normal, zero bias
            nn.init.trunc_normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)


#: Weight files that are pickles underneath; transformers would unpickle them, slimtune refuses.
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors_weights(directory: Path) -> None:
    """Refuse a model directory whose weights are not safetensors (pickle can run code)."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _PICKLE_WEIGHTS)
    if pickles:
        raise SlimtuneError(
            f"{directory}: its weights are pickle files ({', '.join(pickles[:3])}); slimtune loads only "
            "safetensors weights (model.safetensors); convert them once in a trusted environment"
        )
    raise SlimtuneError(f"{directory}: no weights found; a model directory needs model.safetensors")


def _attention_for(auto_class: Any, config: PretrainedConfig, requested: str) -> str:
    """The requested attention, except SDPA falls back to eager where transformers lacks it.

    MPNet, for one, has no SDPA path in transformers 5 and refuses to load with it.
    """
    if requested != "sdpa":
        return requested
    try:
        model_class = auto_class._model_mapping[type(config)]
    except KeyError:  # not a supported architecture: from_pretrained reports it
        return requested
    if getattr(model_class, "_supports_sdpa", False):
        return requested
    logger.info("%s has no SDPA attention; using eager attention", model_class.__name__)
    return "eager"


_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def _warn_unexpected_loading(
    model: PreTrainedModel, loading_info: dict[str, Any], config: PretrainedConfig, label: str
) -> None:
    """Log weights that were missing or unused beyond the expected ones.

    Expected: a newly initialised task head (outside the base model), checkpoint layers beyond
    a truncated ``num_hidden_layers``, and pooler / LM-head weights the task model has no use for
    (a bare model, objective features, has no use for any head a checkpoint carries).
    """
    base_prefix = f"{model.base_model_prefix}."
    bare = model.base_model is model
    kept_layers = getattr(config, "num_hidden_layers", None)

    def truncated_layer(key: str) -> bool:
        match = _LAYER_INDEX.search(f".{key}")
        return match is not None and kept_layers is not None and int(match.group(1)) >= kept_layers

    surprising_missing = sorted(
        key for key in loading_info.get("missing_keys", ()) if key.startswith(base_prefix) or bare
    )
    surprising_unused = sorted(
        key
        for key in loading_info.get("unexpected_keys", ())
        if not truncated_layer(key) and "pooler." not in key and not key.startswith("lm_head.")
        and not (bare and not key.startswith(base_prefix))
    )
    for what, keys in (
        ("weights were missing from the checkpoint and newly initialised", surprising_missing),
        ("checkpoint weights were not used", surprising_unused),
    ):
        if keys:
            logger.warning("%s: %d %s: %s", label, len(keys), what, ", ".join(keys[:8]))

