"""Pfeiffer adapters (Pfeiffer et al., 2021, AdapterFusion): one bottleneck adapter per layer,
after the FFN only.

Defaults are AdapterHub's ``SeqBnConfig``: reduction factor 16, relu, ``init_weights='bert'``
(normal std 0.02 — here truncated at two std), layer norms frozen. Parameter count equals
AdapterHub's (113,040 on MiniLM-L6; checked in the tests).

Placement: the same hook as Houlsby's (``h + f(h)`` on the FFN output projection, before the
residual add and LayerNorm). AdapterHub's Pfeiffer block additionally feeds the adapter with
``LayerNorm(h + x)`` of the frozen post-LN (``original_ln_before``); that step has no
counterpart in pre-LN models (Llama, ViT), so one placement serves every architecture here.
Same parameters, a slightly different function in BERT.
"""

from __future__ import annotations

from pydantic import Field

from slimtune.methods.adapter import AdapterMethod, BottleneckConfig, NonLinearity
from slimtune.methods.base import register


class PfeifferConfig(BottleneckConfig):
    non_linearity: NonLinearity = Field("relu", description="activation inside the bottleneck (AdapterHub SeqBnConfig: relu)")
    init_std: float = Field(2e-2, gt=0, description="std of the (truncated) normal init of both projections (AdapterHub 'bert' init: 0.02)")
    train_layer_norm: bool = Field(False, description="also train the backbone's layer norms (AdapterHub: no)")
    targets: list[str] | None = Field(
        None,
        description="FFN output projections to follow with an adapter (name patterns); default: BERT layer.N.output.dense, "
        "Llama down_proj, ViT mlp.fc2",
    )


@register
class Pfeiffer(AdapterMethod):
    name = "pfeiffer"
    description = "bottleneck adapter h + f(h) after the FFN output projection only"
    paper = "Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning"
    Config = PfeifferConfig
    sites = ("ffn",)
    tag = "pfeiffer"
