"""Architecture facts, in one place: which family a model belongs to, where its parts live, what
methods target by default, how modules are addressed by name and replaced, and where each
family keeps its heads and FFN neurons. Methods, sparsity, the ladder and export read them here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from slimtune.errors import SlimtuneError, did_you_mean

# --------------------------------------------------------------------------------------------
# Architectures: what the model is, where its parts live, what methods target by default.
# --------------------------------------------------------------------------------------------

#: HF ``model_type`` -> the family whose naming conventions the model follows.
FAMILY_OF_MODEL_TYPE = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "mpnet": "mpnet",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "vit": "vit",
    "timm_vit": "timm",  # timm VisionTransformer (no HF config): see Arch.of
}

#: Default target module names per family, by role. Methods name a role; users may give patterns.
DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    "attention_qv": {
        "bert": ["query", "value"],
        "vit": ["q_proj", "v_proj"],  # transformers 5 names ViT's projections like Llama's
        "mpnet": ["q", "v"],
        "llama": ["q_proj", "v_proj"],
        # timm fuses q, k, v into one Linear (d -> 3d); it is adapted as one target
        "timm": ["attn.qkv"],
    },
    "attention_qkvo": {
        "bert": ["query", "key", "value", "attention.output.dense"],
        "vit": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mpnet": ["q", "k", "v", "attention.attn.o"],
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "timm": ["attn.qkv", "attn.proj"],
    },
    "ffn": {
        "bert": ["intermediate.dense", "output.dense"],
        "vit": ["mlp.fc1", "mlp.fc2"],
        "mpnet": ["intermediate.dense", "output.dense"],
        "llama": ["gate_proj", "up_proj", "down_proj"],
        "timm": ["mlp.fc1", "mlp.fc2"],
    },
}

#: Modules that make up the task head (newly initialised, trained by every classification run).
HEAD_MODULE_NAMES = ("classifier", "score")
#: Every output head: the task heads and a causal LM's vocabulary projection (tied to the input
#: embeddings in most checkpoints), which pruning the base's Linears leaves alone.
OUTPUT_HEAD_NAMES = (*HEAD_MODULE_NAMES, "lm_head")


@dataclass(frozen=True)
class Arch:
    """What a method needs to know about the model it attaches to."""

    model_type: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    objective: str  # "classification" | "lm"

    @classmethod
    def of(cls, model: nn.Module, objective: str = "classification") -> Arch:
        if getattr(model, "config", None) is None and hasattr(model, "blocks") and hasattr(model, "patch_embed"):
            # A timm VisionTransformer: no HF config, its shape is read from the modules.
            return cls(
                model_type="timm_vit",
                family="timm",
                hidden_size=int(getattr(model, "embed_dim", 0)),
                num_layers=len(model.blocks),
                num_heads=int(getattr(model.blocks[0].attn, "num_heads", 0)),
                objective=objective,
            )
        config = model.config
        model_type = getattr(config, "model_type", "unknown")
        return cls(
            model_type=model_type,
            family=FAMILY_OF_MODEL_TYPE.get(model_type, model_type),
            hidden_size=getattr(config, "hidden_size", 0),
            num_layers=getattr(config, "num_hidden_layers", 0),
            num_heads=getattr(config, "num_attention_heads", 0),
            objective=objective,
        )

    def default_targets(self, role: str) -> list[str]:
        per_family = DEFAULT_TARGETS[role]
        if self.family not in per_family:
            raise SlimtuneError(
                f"no default targets for role '{role}' on model type '{self.model_type}'; "
                f"set method.targets to module name patterns"
            )
        return list(per_family[self.family])


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the task head (``classifier``/``score``); empty for a causal LM."""
    names = []
    for module_name, module in model.named_modules():
        if module_name.split(".")[-1] in HEAD_MODULE_NAMES:
            names += [f"{module_name}.{n}" for n, _ in module.named_parameters()]
    return names


# --------------------------------------------------------------------------------------------
# Target addressing by name patterns.
# --------------------------------------------------------------------------------------------


def pattern_matches(pattern: str, module_name: str) -> bool:
    """``pattern`` matches a module name when it is the whole name, a dotted suffix of it
    (``value`` matches ``encoder.layer.0.attention.self.value``), or, prefixed with ``re:``,
    a regular expression that matches the whole name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module_name) is not None
    return module_name == pattern or module_name.endswith("." + pattern)


def find_targets(
    model: nn.Module,
    patterns: Iterable[str],
    *,
    kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
    field: str = "method.targets",
) -> list[tuple[str, nn.Module]]:
    """All modules of type ``kind`` whose name matches any pattern, in model order.

    Fails with one line when a pattern matches nothing, listing the names that would match."""
    patterns = list(patterns)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    candidates = [(n, m) for n, m in candidates if n.split(".")[-1] not in HEAD_MODULE_NAMES]
    found = [(n, m) for n, m in candidates if any(pattern_matches(p, n) for p in patterns)]
    # A target another method already wrapped (its frozen layer lives at `<name>.base`) is a
    # conflict, not a miss: say so rather than silently skipping it or suggesting `.base`.
    for name, module in model.named_modules():
        if isinstance(getattr(module, "base", None), kind) and any(pattern_matches(p, name) for p in patterns):
            raise SlimtuneError(
                f"{field}: '{name}' is already changed by another method of this recipe; "
                "compose methods that touch different parameters"
            )
    for pattern in patterns:
        if not any(pattern_matches(pattern, n) for n, _ in candidates):
            leaf_names = sorted({".".join(n.split(".")[-2:]) for n, _ in candidates} | {n.split(".")[-1] for n, _ in candidates})
            raise SlimtuneError(
                f"{field}: pattern '{pattern}' matches no {_kind_name(kind)} module"
                f"{did_you_mean(pattern, leaf_names)}"
            )
    return found


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return "/".join(k.__name__ for k in kinds)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------------------------------
# Where each family keeps its heads and neurons (structured pruning, physical removal).
# --------------------------------------------------------------------------------------------

#: Families whose layers structured removal knows (LayerParts below).
STRUCTURED_FAMILIES = ("bert", "mpnet", "llama")


@dataclass
class LayerParts:
    """Module paths (relative to the model) of one transformer layer's prunable parts."""

    layer: str  # the layer module; kept indices are stored on it
    attention: str  # the module that owns the head counts and computes attention
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # rows = neurons
    ffn_out: str  # columns = neurons


def model_family(model: nn.Module) -> str:
    """The family of a model whose heads and neurons can be removed (bert, mpnet, llama)."""
    model_type = getattr(model.config, "model_type", "unknown")
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family not in STRUCTURED_FAMILIES:
        supported = [t for t, f in FAMILY_OF_MODEL_TYPE.items() if f in STRUCTURED_FAMILIES]
        raise SlimtuneError(f"model type '{model_type}': structured removal supports {', '.join(supported)}")
    return family


def _layers_path(model: nn.Module, family: str) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    base = model.base_model
    container = base.layers if family == "llama" else base.encoder.layer
    return names[id(container)]


def layer_parts(model: nn.Module) -> list[LayerParts]:
    """The prunable parts of every layer, in order."""
    family = model_family(model)
    root = _layers_path(model, family)
    count = len(model.get_submodule(root))
    parts = []
    for i in range(count):
        p = f"{root}.{i}"
        if family == "bert":
            parts.append(LayerParts(
                layer=p, attention=f"{p}.attention.self", q=f"{p}.attention.self.query", k=f"{p}.attention.self.key",
                v=f"{p}.attention.self.value", o=f"{p}.attention.output.dense",
                ffn_in=(f"{p}.intermediate.dense",), ffn_out=f"{p}.output.dense",
            ))
        elif family == "mpnet":
            parts.append(LayerParts(
                layer=p, attention=f"{p}.attention.attn", q=f"{p}.attention.attn.q", k=f"{p}.attention.attn.k",
                v=f"{p}.attention.attn.v", o=f"{p}.attention.attn.o",
                ffn_in=(f"{p}.intermediate.dense",), ffn_out=f"{p}.output.dense",
            ))
        else:
            parts.append(LayerParts(
                layer=p, attention=f"{p}.self_attn", q=f"{p}.self_attn.q_proj", k=f"{p}.self_attn.k_proj",
                v=f"{p}.self_attn.v_proj", o=f"{p}.self_attn.o_proj",
                ffn_in=(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), ffn_out=f"{p}.mlp.down_proj",
            ))
    return parts
