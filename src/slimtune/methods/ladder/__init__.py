"""Ladder Side-Tuning (Sung, Cho & Bansal, NeurIPS 2022): train a small side network fed by the
frozen backbone's hidden states, so that nothing is back-propagated through the backbone.

The side network (``model.lst``, the only new parameters besides the task head) is made of the
backbone's own block type at a reduced width: a copy of the backbone config with ``hidden_size``,
``intermediate_size`` and the head dimension divided by ``r`` (the number of heads is kept). With
``L`` ladder layers ``l_1 < ... < l_L`` of the backbone (all layers, or a subset when dropping
layers) it computes, in the order of the official T5 code (ytsung/LST ``modeling_t5.py`` and
the code derived from it: the backbone layer's output is merged into the side stream, then the
side block runs)::

    s_0 = down_0(e)                                   # e: the backbone's embedding output
    s_j = side_block_j(g_j * s_{j-1} + (1 - g_j) * down_j(h_{l_j}))     j = 1..L
    g_j = sigmoid(alpha_j / T),  alpha_j = 0 at init (g = 0.5),  T = 0.1
    out = up(norm(s_L))                               # norm: the side's final RMSNorm (Llama only;
                                                      # BERT blocks end in LayerNorm already)

where ``down_j`` are ``Linear(d, d/r)`` "ladders" and ``up`` is ``Linear(d/r, d)``. ``out``
replaces the backbone's final hidden states, so the unchanged HF head reads it: BERT's pooler +
classifier at ``[CLS]``, Llama's ``score`` at the last non-pad token, or ``lm_head`` for causal LM;
on a ViT it replaces the output of the final ``layernorm`` (the classifier reads ``[CLS]``), and
the side ends in its own LayerNorm (pre-LN blocks, like the backbone).
The side attention gets the backbone's own attention mask (padding; causal for Llama) and, for
Llama, rotary embeddings of the reduced head dimension.

Side dropout: hidden dropout follows the backbone config (as in the official code), but dropout on
the side's *attention weights* defaults to 0 (``attention_dropout``). The side keeps all heads, so
its attention maps are as large as the backbone's (B x H x T x T per layer); with attention dropout
PyTorch's CPU SDPA falls back to the math kernel and saves those maps for backward, which would
cost more than all other side activations together (measured on MiniLM-L6, batch 32 x 128: 600 MB
of saved activations with 0.1, see benchmarks/memory.py). With 0 the fused kernel saves none.

How it wraps the model's forward (the protocol's "side network" shape), without the trainer
knowing: ``attach`` overrides the ``forward`` of each backbone layer *instance* (parameter names
stay unchanged) with one that runs the original layer under ``torch.no_grad()`` and then advances
the side stream by one ladder step; a forward hook on the module that produces the final hidden
states (BERT: ``bert.encoder``; Llama: ``model.norm``) swaps in ``up(norm(s_L))``. So
``model(**batch)`` keeps the HF signature and returns ``.loss``/``.logits``, no backbone activation
is saved for backward and no gradient reaches a backbone parameter. A forward pre-hook on the
model keeps the backbone (embeddings and layers) in eval mode even while the model trains: the
backbone is a fixed feature extractor (no dropout), which the hidden-state cache relies on; the
side network, the pooler and the head follow ``model.train()`` as usual.

Initialisation (``init: pruned``, the paper's choice): each side block is a structurally pruned
copy of its backbone layer, by weight magnitude (L1 of the rows/columns that read or write a
dimension): one set of ``d/r`` residual dimensions shared by all side layers (the side stream is
one space), per head the top ``head_dim/r`` query/key dimensions and value/output dimensions, and
the top ``ffn/r`` FFN neurons. For Llama the query/key dimensions are kept in rotary pairs
(``i, i + head_dim/2``), the same pairs for all heads and layers, and the side's rotary embedding
uses those pairs' original frequencies. ``init: random`` uses the HF initialisation instead. The
ladders and the up-projection always start from PyTorch's default ``Linear`` initialisation.

Hidden-state cache (``cache_hidden_states: {max_bytes: N}``): the backbone is frozen and in eval
mode, so its hidden states depend only on the example. They are cached per example, keyed by a
hash of its unpadded token ids (and token type ids), at its unpadded length; a batch whose rows
are all cached skips every backbone layer (the embeddings still run, they are cheap). Only the
ladder layers' states are kept, and only while the model trains; examples that would exceed
``max_bytes`` are computed on the fly every time. Right padding is assumed (rows whose mask is not
a prefix of ones are never cached). The cache lives in process memory and is not counted in
``train.peak_memory_bytes``.

Trainable parameters (closed form, ``expected_param_count``; ``d_s = d/r``, ``f_s = f/r``,
``k = head_dim/r``, ``H``/``H_kv`` heads, ``L`` ladder layers, ``b = 1`` if ``bias`` else 0)::

    ladders + gates + up   (L + 1)(d d_s + b d_s) + L + (d_s d + b d)
    BERT side block        4 (d_s^2 + d_s) + 2 d_s f_s + f_s + d_s + 4 d_s
    Llama side block       d_s H k + 2 d_s H_kv k + H k d_s + 3 d_s f_s + 2 d_s   (+ d_s final norm)
    ViT side block         as BERT (+ 2 d_s: the side's final LayerNorm, pre-LN like the backbone)

Not supported: incremental decoding with a KV cache (``generate``): the side stream has no cache.

Modules (after peft's ``tuners/<method>/`` layout): ``config`` (the recipe fields), ``families``
(per-architecture layers, side blocks and pruning: BERT, Llama, ViT), ``side_network`` (the side
network and its per-forward state), ``cache`` (the hidden-state cache), ``method`` (the method and
its one ``@register``).
"""

from __future__ import annotations

from slimtune.methods.ladder.cache import HiddenStateCache
from slimtune.methods.ladder.config import HiddenStateCacheConfig, LadderConfig
from slimtune.methods.ladder.families import FAMILIES
from slimtune.methods.ladder.method import LadderSideTuning  # registers "lst" (once: a module runs once)
from slimtune.methods.ladder.side_network import SIDE_ATTRIBUTE, LadderSideNetwork

__all__ = [
    "FAMILIES",
    "SIDE_ATTRIBUTE",
    "HiddenStateCache",
    "HiddenStateCacheConfig",
    "LadderConfig",
    "LadderSideNetwork",
    "LadderSideTuning",
]
