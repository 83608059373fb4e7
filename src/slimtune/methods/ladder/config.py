"""The recipe fields of ``lst`` (Ladder Side-Tuning); kept apart so that validating a recipe reads
only the fields, and so the other modules of the method share one definition."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimtune.methods.base import MethodConfig


class HiddenStateCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_bytes: int = Field(..., ge=0, description="memory bound of the cached backbone hidden states, in bytes")


class LadderConfig(MethodConfig):
    r: int = Field(8, ge=1, description="reduction factor: side hidden size, FFN size and head dimension are the backbone's / r")
    gate_alpha: float = Field(0.0, description="initial gate logit alpha; the gate is sigmoid(alpha / T) (0 -> 0.5)")
    gate_T: float = Field(0.1, gt=0, description="gate temperature T")
    init: Literal["pruned", "random"] = Field(
        "pruned", description="side blocks from a magnitude-pruned copy of each backbone layer, or random (HF init)"
    )
    ladder_layers: list[int] | None = Field(
        None, description="backbone layers (0-based) that feed a ladder and get a side block; default: all (see drop_every)"
    )
    drop_every: int | None = Field(
        None, ge=2, description="layer dropping: leave out every k-th backbone layer (layers k-1, 2k-1, ...) from the ladders"
    )
    attention_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="dropout on the side blocks' attention weights (hidden dropout follows the backbone config); "
        "0 lets SDPA use its fused kernel, which keeps no attention maps for backward",
    )
    bias: bool = Field(True, description="bias in the ladder down-projections and the final up-projection")
    cache_hidden_states: HiddenStateCacheConfig | None = Field(
        None, description="cache backbone hidden states per example across epochs: {max_bytes: N}"
    )

    @model_validator(mode="after")
    def _one_layer_rule(self) -> LadderConfig:
        if self.ladder_layers is not None and self.drop_every is not None:
            raise ValueError("give either ladder_layers or drop_every, not both")
        if self.ladder_layers is not None and (not self.ladder_layers or len(set(self.ladder_layers)) != len(self.ladder_layers)):
            raise ValueError("ladder_layers must be a non-empty list of distinct layer indices")
        return self
