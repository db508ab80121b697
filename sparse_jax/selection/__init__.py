"""Runtime block selection: estimate where attention mass lies, return BlockMask tables.

Every selector takes q [B, Sq, Hq, D], k [B, Skv, Hkv, D] (GQA allowed; queries are the
last Sq positions when causal), runs under ``jit``/``vmap`` and returns a
:class:`~sparse_jax.BlockMask` whose table widths are static (``max_kv_blocks``), ready
for :func:`sparse_jax.block_sparse_attention`.

=======================  ===========================================================
:func:`xattention`       antidiagonal scores (stride s) + cumulative threshold
:func:`threshold_blocks` pooled scores + cumulative threshold (per-head budgets)
:func:`topk_blocks`      pooled scores + top-k (MoBA / SeerAttention)
:func:`vertical_slash`   MInference's columns + diagonals from the last queries
=======================  ===========================================================

Building blocks: :func:`cumulative_threshold` and :func:`limit_blocks` (bool block
selections), the scores in :mod:`sparse_jax.selection.scores`, :func:`to_block_mask`;
:mod:`sparse_jax.selection.synthetic` plants attention patterns for evaluation. GQA: ``gqa="per_head"`` gives
[B, Hq] tables, ``"union"`` / ``"mean"`` one table per kv head (see also
:func:`sparse_jax.gqa_union`).
"""

from sparse_jax.selection import scores, synthetic
from sparse_jax.selection._geometry import Grid
from sparse_jax.selection.scores import (antidiagonal_block_scores, last_block_importance, pooled_block_logits,
                                         pooled_block_scores)
from sparse_jax.selection.tables import to_block_mask
from sparse_jax.selection.threshold import cumulative_threshold, limit_blocks
from sparse_jax.selection.topk import threshold_blocks, topk_blocks
from sparse_jax.selection.vertical_slash import vertical_slash
from sparse_jax.selection.xattention import xattention

__all__ = ["xattention", "threshold_blocks", "topk_blocks", "vertical_slash", "cumulative_threshold",
           "limit_blocks", "to_block_mask", "antidiagonal_block_scores", "pooled_block_scores",
           "pooled_block_logits", "last_block_importance", "scores", "synthetic", "Grid"]
