"""BitFit (Ben Zaken et al., 2022): train only the bias terms of the frozen model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method, MethodConfig, register
from slimtune.core.arch import HEAD_MODULE_NAMES, Arch, pattern_matches

#: The paper's smaller variant (Sec. 4): the query bias and the FFN's intermediate bias.
QUERY_FFN_BIASES = {"bert": ["query", "intermediate.dense"], "vit": ["q_proj", "mlp.fc1"], "mpnet": ["q", "intermediate.dense"]}


class BitFitConfig(MethodConfig):
    subset: Literal["all", "query-ffn"] = Field(
        "all", description="'all' biases (the paper's main setting) or only query + FFN-intermediate biases"
    )


@register
class BitFit(Method):
    name = "bitfit"
    description = "train only bias terms"
    paper = "Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning"
    Config = BitFitConfig
    in_place = True

    def attach(self, model: nn.Module, arch: Arch) -> None:
        if self.config.subset == "query-ffn" and arch.family not in QUERY_FFN_BIASES:
            raise SlimtuneError(f"method.subset: 'query-ffn' is defined for BERT/ViT/MPNet, not '{arch.model_type}'")
        self.patterns = QUERY_FFN_BIASES.get(arch.family) if self.config.subset == "query-ffn" else None
        if not self.trainable_parameters(model):
            raise SlimtuneError(f"method bitfit: model type '{arch.model_type}' has no bias parameters to train")

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        chosen = {}
        for name, param in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            if leaf != "bias" or module_name.split(".")[-1] in HEAD_MODULE_NAMES:
                continue
            if self.patterns is None or any(pattern_matches(p, module_name) for p in self.patterns):
                chosen[name] = param
        return chosen
