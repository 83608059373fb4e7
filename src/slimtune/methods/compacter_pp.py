"""Compacter++ (Karimi Mahabadi et al., 2021): Compacter's PHM adapters after the FFN only
(Pfeiffer placement), the paper's most parameter-efficient variant. Same defaults as
``compacter`` (AdapterHub ``CompacterPlusPlusConfig``; MiniLM-L6: 7,192 parameters, as AdapterHub)."""

from __future__ import annotations

from pydantic import Field

from slimtune.methods.base import register
from slimtune.methods.compacter import Compacter, CompacterConfig


class CompacterPlusPlusConfig(CompacterConfig):
    targets: list[str] | None = Field(
        None,
        description="FFN output projections to follow with a PHM adapter (name patterns); default: BERT layer.N.output.dense, "
        "Llama down_proj, ViT mlp.fc2",
    )


@register
class CompacterPlusPlus(Compacter):
    name = "compacter++"
    description = "PHM (Kronecker-sum) adapters after the FFN only; rule matrices shared by all layers"
    Config = CompacterPlusPlusConfig
    sites = ("ffn",)
    tag = "compacter_pp"
