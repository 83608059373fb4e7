"""DSEE (Chen et al., ACL 2023, "Dually Sparsity-embedded Efficient Tuning"): sparsity in the
update and in the final weights.

Stage 1 — the update of each target linear (query and value by default) is low-rank plus
sparse, ``ΔW = (alpha / r) (B A + S)``, with ``S`` non-zero only on ``num_sparse`` (N) fixed
positions per matrix. The positions come from the pre-trained weight itself:

* ``decomposition`` (default): a low-rank + sparse decomposition ``W ≈ L + S`` of rank
  ``decomposition_rank`` and cardinality N (GoDec: alternate the best rank-r approximation of
  ``W - S`` by SVD and the N largest entries of ``W - L``); S's support is kept. The official
  code runs a GreBsmo-style variant (rank grown one at a time with QR sketches, residual
  hard-thresholded at an absolute 0.01); on BERT-scale weights (std ~0.04) that threshold keeps
  most of the residual and the alternation does not separate L from S, so the top-N pick is
  made here with the cardinality form, which does (tested on a synthetic low-rank + sparse
  matrix). Exact SVD is cheaper than sketches at these widths (< 0.5 s per 384 x 384 matrix);
* ``magnitude``: the N entries of largest |W| (the official "omp"); ``random``: N random
  positions (the official "rp").

Defaults from the official code and README: r = 16, N = 64, alpha = 32 (their ``lora_alpha``
default, which scales the sparse part too), decomposition rank 100 and 10 iterations. A is Kaiming-uniform and B and S start at zero (the pre-trained function at step 0; the
official code draws them from the model's own initialiser instead).

Stage 2 (``prune``), after a fraction ``prune_at`` of the training steps: merge ``W + ΔW`` into
the weights, prune them, and re-tune a fresh low-rank + sparse update on the pruned model for the
remaining steps (S's support again from the merged weight):

* ``unstructured``: global L1 pruning of all backbone linear weights at ``prune_ratio`` (fraction
  removed; the official ``pruning_ratio``), as masks (:mod:`slimtune.sparsity.masks`); the
  re-tuned update is masked too, so the merged final weights keep the zeros. Masked zeros are
  still dense computation: FLOPs do not drop;
* ``heads``: in each layer, the ``heads_per_layer`` attention heads whose stage-1 update
  (rows of ``B A + S`` in Q and V) has the smallest L1 magnitude are removed physically
  (:func:`slimtune.sparsity.structured.remove_heads`), so FLOPs and latency drop for real
  (grouped-query attention: whole KV groups, ``heads_per_layer`` rounded to whole groups).

Stage 2 lives in :mod:`slimtune.methods.dsee.stage2`. It changes the model mid-run, so DSEE with
``prune`` runs alone (no other method), without a sparsity section and without DP-SGD (see
``restructuring_reason``).

Extensions of the structured stage 2 (off by default; the defaults are the paper's rule). In a
BERT layer the heads are only about a third of the FLOPs (Q/K/V/O and attention; the FFN is the
rest), so a large FLOP saving from heads alone removes nearly all of them:

* ``ffn_fraction``: also remove that fraction of each layer's FFN neurons physically
  (:func:`slimtune.sparsity.structured.remove_ffn_neurons`), ranked by ``ffn_score``;
* ``head_score`` / ``ffn_score``: rank units on the merged stage-1 model by
  :func:`slimtune.sparsity.importance.unit_importance` — ``taylor`` (|dL/dgate|, Michel et al.
  2019), ``fisher`` ((dL/dgate)^2, Kwon et al. 2022), both on ``score_batches`` seeded training
  batches, or ``magnitude`` (weight norms) — instead of the paper's ``update`` rule for heads.

The saved delta holds the stage-1 update, the removed heads (and neurons) and the stage-2
update; loading it onto the pre-trained base replays the stage-2 transformation exactly (the
unstructured mask is a deterministic function of the merged weights; the structured removal is
stored, so data scores are not recomputed). A checkpoint written after stage 2 holds the same
tensors among its non-trainable delta state: a resume replays stage 2 from them before it copies
the stage-2 parameters and optimizer state.
"""

from slimtune.methods.dsee.layer import DSEELinear, godec, sparse_support
from slimtune.methods.dsee.method import DSEE, DSEEConfig
from slimtune.methods.dsee.stage2 import DSEEPruneHook, run_stage2

__all__ = ["DSEE", "DSEEConfig", "DSEELinear", "DSEEPruneHook", "godec", "run_stage2", "sparse_support"]
