"""Prompt tuning (Lester et al., 2021): ``num_tokens`` learned soft tokens in the input embedding
space; the frozen model reads them as if they were words. Initialised from the embeddings of
vocabulary tokens (the paper's best init; sampled with ``seed``, special tokens skipped) or at
random (Lester: Uniform(-0.5, 0.5)).

Where the prompts go, per family (the task head must still read the token it was built for):

* BERT / MPNet (the head pools position 0, ``[CLS]``/``<s>``): inserted right *after* the first
  token, ``[CLS] P_1..P_n x_1..x_L``; a forward pre-hook on the model turns ``input_ids`` into
  ``inputs_embeds`` with the prompts in place and widens ``attention_mask`` (and
  ``token_type_ids``, segment 0; a masked LM's token labels with -100) to match; position and
  segment embeddings are added by the model as for any token. (peft prepends before ``[CLS]``, so its classifier pools a prompt.)
* Llama (decoder; the head pools the last non-pad token, found from ``input_ids``): prepended,
  ``P_1..P_n x_1..x_L``, by a forward hook on the token embedding; the pre-hook widens
  ``attention_mask``, and a forward hook on the decoder stack drops the n prompt positions from
  its output, so the head (and a causal LM's logits) line up with ``input_ids`` unchanged —
  right padding keeps working. Not meant for cached generation.
* ViT: VPT-shallow (Jia et al., 2022) — after the embedding layer (patches + positions),
  inserted after the CLS token; random init is VPT's Xavier-uniform bound.

The trainer needs nothing: batches stay ``input_ids`` + ``attention_mask`` (+ ``labels``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method, MethodConfig, register
from slimtune.core.arch import Arch

MODULE = "prompt_tuning"


class PromptConfig(MethodConfig):
    num_tokens: int = Field(20, ge=1, description="number of soft prompt tokens (Lester et al.: 20 works well with init from vocabulary)")
    init: Literal["auto", "vocab", "random"] = Field(
        "auto", description="'vocab': copies of sampled vocabulary embeddings; 'random': Uniform(-0.5, 0.5) "
        "(ViT: VPT's Xavier bound); 'auto': vocab for text models, random for ViT"
    )
    seed: int = Field(0, description="seed for sampling the init tokens / random init")
    sharing: Literal["shared", "per-task"] = Field(
        "shared", description="multi-task runs: 'shared', one prompt for all tasks; 'per-task', one prompt per task (each example reads its task's)")


class SoftPrompt(nn.Module):
    """``num_tokens x hidden`` embeddings, or with a ``router`` (a multi-task run's
    :class:`slimtune.zoo.heads.TaskRouter`) one such prompt per task, ``tasks x num_tokens x hidden``."""

    def __init__(self, embeddings: torch.Tensor, router=None):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings)
        self.router = router

    def forward(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt for a batch of ``size`` (a view, no copy; per task: each example's task's).
        A call, so that hooks see it (DP's per-sample rule reads each example's gradient of its copy)."""
        # Without grad, a view of the Parameter would still claim requires_grad (with no grad_fn),
        # which torch's FlopCounterMode module tracker trips over.
        embeddings = self.embeddings if torch.is_grad_enabled() else self.embeddings.detach()
        if embeddings.dim() == 3:
            return embeddings.to(dtype)[self.router.current("prompt")]
        return embeddings.to(dtype).unsqueeze(0).expand(size, -1, -1)


def insert(sequence: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    """Insert ``block`` (B, n, ...) into ``sequence`` (B, L, ...) before position ``at``."""
    return torch.cat([sequence[:, :at], block, sequence[:, at:]], dim=1)


def special_token_ids(config) -> set[int]:
    ids = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "unk_token_id", "mask_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


@register
class PromptTuning(Method):
    name = "prompt"
    description = "learned soft tokens in the input (after [CLS] for encoders, prepended for decoders, VPT for ViT)"
    paper = "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning"
    Config = PromptConfig

    def attach(self, model: nn.Module, arch: Arch) -> None:
        if hasattr(model, MODULE):
            raise SlimtuneError("method prompt: the model already holds soft prompts; use one prompt method per recipe")
        c = self.config
        self.family = arch.family
        router = getattr(model, "slimtune_task_router", None) if c.sharing == "per-task" else None
        if c.sharing == "per-task" and router is None:
            raise SlimtuneError("method prompt: sharing 'per-task' gives each task its own prompt, which needs a multi-task run "
                                "(task.tasks: a list of tasks)")
        copies = len(router.names) if router is not None else 1
        generator = torch.Generator().manual_seed(c.seed)
        backbone = model.base_model
        if arch.family == "vit":
            if c.init == "vocab":
                raise SlimtuneError("method.init: a ViT has no vocabulary; use 'random' or 'auto'")
            config = model.config
            bound = math.sqrt(6.0 / (config.num_channels * config.patch_size**2 + config.hidden_size))
            dtype = next(model.parameters()).dtype
            init = (torch.rand(copies, c.num_tokens, config.hidden_size, generator=generator) * 2 - 1) * bound
            self.prompt = SoftPrompt(init.to(dtype) if router is not None else init[0].to(dtype), router)
            model.add_module(MODULE, self.prompt)
            self.handles = [backbone.embeddings.register_forward_hook(self._after_vit_embeddings)]
            return
        embedding = model.get_input_embeddings()
        if embedding is None:
            raise SlimtuneError(f"method prompt: model type '{arch.model_type}' has no input embedding to prompt")
        weight = embedding.weight
        if c.init == "random":
            init = torch.rand(copies, c.num_tokens, weight.shape[1], generator=generator) - 0.5
        else:
            skip = special_token_ids(model.config)
            allowed = torch.tensor([i for i in range(weight.shape[0]) if i not in skip])
            picked = allowed[torch.randint(len(allowed), (copies, c.num_tokens), generator=generator)]
            init = weight.detach()[picked].float().clone()
        self.prompt = SoftPrompt((init if router is not None else init[0]).to(weight.dtype), router)
        model.add_module(MODULE, self.prompt)
        self.handles = [model.register_forward_pre_hook(self._widen_inputs, with_kwargs=True)]
        if arch.family in ("bert", "mpnet"):
            self.insert_at = 1  # keep [CLS] (pooled by the head) at position 0
            self.embedding = embedding
            # absolute position embeddings bound the widened sequence (MPNet/RoBERTa start at pad + 1)
            offset = getattr(model.config, "pad_token_id", 0) + 1 if arch.family == "mpnet" else 0
            self.max_positions = getattr(model.config, "max_position_embeddings", 10**9) - offset
        elif arch.family == "llama":
            self.insert_at = 0
            self.handles.append(embedding.register_forward_hook(self._prepend_to_embeddings))
            self.handles.append(backbone.register_forward_hook(self._drop_prompt_positions))
        else:
            raise SlimtuneError(f"method prompt: model type '{arch.model_type}' is not supported (BERT, MPNet, Llama, ViT are)")

    # -- hooks ----------------------------------------------------------------------------------
    def _widen_inputs(self, module, args, kwargs):
        kwargs = dict(kwargs)
        if args:  # model(input_ids, ...) positionally
            kwargs.setdefault("input_ids", args[0])
            args = args[1:]
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise SlimtuneError("method prompt: the model was called without input_ids; soft prompts are inserted at the token level")
        if kwargs.get("position_ids") is not None:
            raise SlimtuneError("method prompt: explicit position_ids are not supported with soft prompts")
        batch, n, at = input_ids.shape[0], self.config.num_tokens, self.insert_at
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = insert(mask, mask.new_ones(batch, n), at)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = insert(types, types.new_zeros(batch, n), at)
        labels = kwargs.get("labels")
        if self.family in ("bert", "mpnet") and labels is not None and labels.dim() == 2:
            # Token labels (a masked LM's): the soft tokens are never predicted.
            kwargs["labels"] = insert(labels, labels.new_full((batch, n), -100), at)
        if self.family in ("bert", "mpnet"):
            if input_ids.shape[1] + n > self.max_positions:
                raise SlimtuneError(
                    f"method prompt: {input_ids.shape[1]} tokens + {n} soft tokens exceed the model's "
                    f"{self.max_positions} positions; lower train.max_length or method.num_tokens"
                )
            embeds = self.embedding(input_ids)
            kwargs["inputs_embeds"] = insert(embeds, self.prompt(batch, embeds.dtype), at)
            kwargs["input_ids"] = None
        return args, kwargs

    def _prepend_to_embeddings(self, module, args, output):
        return insert(output, self.prompt(output.shape[0], output.dtype), self.insert_at)

    def _drop_prompt_positions(self, module, args, output):
        output.last_hidden_state = output.last_hidden_state[:, self.config.num_tokens :]
        return output

    def _after_vit_embeddings(self, module, args, output):
        return insert(output, self.prompt(output.shape[0], output.dtype), 1)

    # -- protocol -------------------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        # By named_parameters: a masked prompt's Parameter is parametrizations.embeddings.original.
        return {f"{MODULE}.{name}": p for name, p in self.prompt.named_parameters()}

    def claims(self, model: nn.Module) -> set[str]:
        return {f"{MODULE}.embeddings", "<input sequence>"}

    def expected_param_count(self, model: nn.Module) -> int:
        """num_tokens x hidden (per task: times the number of tasks)."""
        tasks = len(self.prompt.router.names) if self.prompt.router is not None else 1
        return tasks * self.config.num_tokens * model.config.hidden_size
