"""The DSEE method: its fields and the registered class (see :mod:`slimtune.methods.dsee`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import MethodConfig, register
from slimtune.core.arch import Arch, find_targets, replace_module
from slimtune.methods.linear_update import LinearUpdateMethod
from slimtune.sparsity.masks import clean_name, dense_tensor
from slimtune.methods.dsee.layer import HEADS_KEY, NEURONS_KEY, STAGE1, DSEELinear, sparse_support
from slimtune.methods.dsee.stage2 import DSEEPruneHook, run_stage2

# --------------------------------------------------------------------------------------------
# The method.
# --------------------------------------------------------------------------------------------


class DSEEConfig(MethodConfig):
    r: int = Field(16, ge=1, description="rank of the low-rank part B A (official default 16)")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: ΔW = (alpha / r)(B A + S) (official lora_alpha 32)")
    num_sparse: int = Field(64, ge=0, description="N: non-zeros of the sparse part S per matrix (official 64)")
    sparse_init: Literal["decomposition", "magnitude", "random"] = Field("decomposition", description="how S's support is chosen from the pre-trained weight: decomposition (low-rank + sparse W = L + S, support of S), magnitude (top-N |W|), random")
    decomposition_rank: int = Field(100, ge=1, description="decomposition: rank of the low-rank part (official 100)")
    decomposition_iterations: int = Field(10, ge=1, description="decomposition: alternating iterations (official 10)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the update's input")
    targets: list[str] | None = Field(None, description="module name patterns to wrap; default: query/value (BERT), q/v (MPNet), q_proj/v_proj (Llama)")
    prune: Literal["none", "unstructured", "heads"] = Field("none", description="stage 2: merge W + ΔW, prune the final weights (unstructured global L1, or whole attention heads — plus FFN neurons with ffn_fraction — removed physically), re-tune")
    prune_at: float = Field(0.5, gt=0, lt=1, description="stage 2 starts after this fraction of the training steps")
    prune_ratio: float = Field(0.5, gt=0, lt=1, description="unstructured: fraction of backbone linear weights removed (global L1; official pruning_ratio 0.5)")
    heads_per_layer: int = Field(4, ge=0, description="heads: attention heads removed per layer (ranked by head_score)")
    head_score: Literal["update", "taylor", "fisher", "magnitude"] = Field("update", description="heads: how heads are ranked — update (the paper: L1 of the head's rows of the stage-1 update B A + S in Q and V); extensions, scored on the merged model: taylor (mean |dL/dgate| over score_batches training batches), fisher (mean (dL/dgate)^2), magnitude (L2 of the head's Q/K/V rows and output columns)")
    ffn_fraction: float = Field(0.0, ge=0, lt=1, description="heads (extension, not in the paper): also remove this fraction of each layer's FFN neurons physically (0 = the paper's heads only)")
    ffn_score: Literal["magnitude", "taylor", "fisher"] = Field("taylor", description="ffn_fraction: how neurons are ranked on the merged model — taylor (mean |dL/dgate| on score_batches training batches), fisher (mean (dL/dgate)^2), magnitude (L2 of the neuron's FFN input row and output column)")
    structured_scope: Literal["local", "global"] = Field("local", description="heads/ffn_fraction: remove the same number of units in every layer (local; the paper's per-layer heads) or as many in total, ranked across layers (global; extension — a layer may lose all its heads)")
    score_batches: int = Field(8, ge=1, description="taylor/fisher scores: seeded batches of the training split (at train.batch_size) used at the prune step")
    seed: int = Field(0, ge=0, description="seed of 'random' supports and of the scoring batches")

    @property
    def scored_on_data(self) -> list[str]:
        """The stage-2 rankings that need training batches: "head_score" and/or "ffn_score"."""
        if self.prune != "heads":
            return []
        return [field for field, value, used in (("head_score", self.head_score, self.heads_per_layer > 0),
                                                 ("ffn_score", self.ffn_score, self.ffn_fraction > 0))
                if used and value in ("taylor", "fisher")]

    @model_validator(mode="after")
    def _stage2(self) -> DSEEConfig:
        if self.prune != "heads" and self.ffn_fraction > 0:
            raise ValueError(f"ffn_fraction {self.ffn_fraction} needs prune: heads (structured stage 2); prune is '{self.prune}'")
        if self.prune == "heads" and self.heads_per_layer == 0 and self.ffn_fraction == 0:
            raise ValueError("prune: heads with heads_per_layer 0 and ffn_fraction 0 would remove nothing; set one of them")
        return self


@register
class DSEE(LinearUpdateMethod):
    name = "dsee"
    description = "update (alpha/r)(B A + S) with S sparse on positions from a low-rank + sparse decomposition of W; optional stage 2: merge, prune final weights (unstructured or heads; FFN neurons too as an extension), re-tune"
    paper = "Chen et al. 2023, DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models"
    Config = DSEEConfig
    layer_class = DSEELinear
    owned_marker = ".lora_"

    # -- attach -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, arch: Arch) -> None:
        n_heads = getattr(model.config, "num_attention_heads", None)
        if self.config.prune == "heads" and n_heads is not None and self.config.heads_per_layer >= n_heads:
            raise SlimtuneError(f"method.heads_per_layer: {self.config.heads_per_layer} would remove every head of a layer (it has {n_heads}); use fewer")
        self.arch = arch
        self.patterns = self.config.targets or arch.default_targets("attention_qv")
        self.stage = 1
        self.stage1: dict[str, torch.Tensor] = {}
        self.removed_heads: dict[int, list[int]] = {}
        self.removed_neurons: dict[int, list[int]] = {}
        self.report_info: dict[str, Any] = {}
        self._wrap(model)

    def _wrap(self, model: nn.Module) -> None:
        c = self.config
        self.wrapped = []
        for i, (name, linear) in enumerate(find_targets(model, self.patterns, kind=nn.Linear)):
            indices = sparse_support(
                dense_tensor(linear, "weight"), c.num_sparse, c.sparse_init, rank=c.decomposition_rank,
                iterations=c.decomposition_iterations, seed=c.seed + i,
            )
            replace_module(model, name, DSEELinear(linear, c.r, c.alpha, indices, c.dropout))
            self.wrapped.append(name)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        # named_parameters, not getattr: a masked factor (a sparsity section) is a parametrisation
        # whose trainable leaf is `.parametrizations.<name>.original`.
        params = {}
        for name, module in model.named_modules():
            if isinstance(module, DSEELinear):
                params.update({f"{name}.{n}": p for n, p in module.named_parameters()
                               if not n.startswith("base.") and clean_name(n) in ("lora_A", "lora_B", "sparse_values")})
        return params

    def claims(self, model: nn.Module) -> set[str]:
        return set(self.wrapped)

    def expected_param_count(self, model: nn.Module) -> int:
        """r (in + out) + N per wrapped linear."""
        return sum(self.config.r * (m.base.in_features + m.base.out_features) + m.sparse_indices.numel() for m in self._layers(model))

    @property
    def restructuring_reason(self) -> str | None:
        """Stage 2 merges and prunes the model mid-run."""
        return f"its stage 2, prune: {self.config.prune}" if self.config.prune != "none" else None

    def hooks(self) -> list[Any]:
        return [DSEEPruneHook(self)] if self.config.prune != "none" else []

    # -- state --------------------------------------------------------------------------------
    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in self.trainable_parameters(model).items()}
        # S is stored as its values plus flat positions (int32: a weight has < 2^31 entries).
        state.update({f"{n}.sparse_indices": m.sparse_indices.to(torch.int32) for n, m in model.named_modules() if isinstance(m, DSEELinear)})
        state.update(self.stage1)
        for layer, heads in self.removed_heads.items():
            state[f"{HEADS_KEY}.{layer}"] = torch.tensor(heads, dtype=torch.int64)
        for layer, neurons in self.removed_neurons.items():
            state[f"{NEURONS_KEY}.{layer}"] = torch.tensor(neurons, dtype=torch.int64)
        return state

    def load_delta_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.stage == 1 and any(k.startswith(STAGE1) for k in state):
            self.replay_stage2(model, state)
        self._load_layers(model, {k: v for k, v in state.items() if not k.startswith((STAGE1, HEADS_KEY, NEURONS_KEY))})

    def replay_stage2(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the stage-2 model from a saved delta's (or checkpoint's) stage-1 update and
        removed heads/neurons; the stage-2 update is left fresh, for the caller to load."""
        stage1 = {k[len(STAGE1):]: v for k, v in state.items() if k.startswith(STAGE1)}
        if not stage1:
            raise SlimtuneError(f"{self.name}: the state written after stage 2 lacks the stage-1 update ('{STAGE1}*' tensors)")
        self._load_layers(model, stage1)
        heads, neurons = ({int(k.rpartition(".")[2]): v.tolist() for k, v in state.items() if k.startswith(key + ".")}
                          for key in (HEADS_KEY, NEURONS_KEY))
        run_stage2(self, model, heads=heads, neurons=neurons, replay=True)

    def _load_layers(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if not isinstance(module, DSEELinear):
                    continue
                for attr in ("lora_A", "lora_B", "sparse_indices", "sparse_values"):
                    key = f"{name}.{attr}"
                    if key not in state:
                        raise SlimtuneError(f"{self.name}: delta lacks '{key}'")
                    tensor = module.sparse_indices if attr == "sparse_indices" else dense_tensor(module, attr)
                    value = state[key]
                    if attr == "sparse_indices":
                        if value.numel() and (value.min() < 0 or value.max() >= module.base.weight.numel()):
                            raise SlimtuneError(f"{self.name}: delta tensor '{key}' has positions outside the weight")
                        if value.shape != tensor.shape:
                            module.sparse_values = nn.Parameter(torch.zeros(value.numel(), dtype=module.sparse_values.dtype))
                        module.sparse_indices = value.to(torch.int64).clone()
                        continue
                    if value.shape != tensor.shape:
                        raise SlimtuneError(f"{self.name}: delta tensor '{key}' has shape {tuple(value.shape)}, the model expects {tuple(tensor.shape)}")
                    tensor.copy_(value)
