"""Pooled-score selection: top-k blocks (MoBA / SeerAttention style) or a cumulative threshold."""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax.selection import _geometry as geo
from sparse_jax.selection import scores as scores_lib
from sparse_jax.selection import threshold as thr
from sparse_jax.selection.tables import to_block_mask

__all__ = ["topk_blocks", "threshold_blocks"]


def _setup(q, k, block_size, causal, force_sink, force_local):
    scores_lib.check_qk(q, k)
    grid = geo.Grid(q.shape[1], k.shape[1], block_size)
    scores_lib.check_causal_lengths(grid.q_len, grid.kv_len, causal)
    forced = geo.forced_blocks(grid, causal=causal, force_sink=force_sink, force_local=force_local)
    return grid, forced


def topk_blocks(q, k, *, block_size: int = 128, num_blocks: int, pooling: str = "mean", causal: bool = True,
                force_sink: bool = True, force_local: bool = True, gqa: str = "per_head",
                scale: float | None = None, return_scores: bool = False):
    """The ``num_blocks`` kv blocks with the highest pooled score, per query block.

    q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D]. Scores are softmaxed pooled logits
    (:func:`~sparse_jax.selection.scores.pooled_block_scores`, ``pooling`` "mean" or "max").
    ``num_blocks`` counts the forced sink / diagonal blocks (they are taken first) and is
    the static table width; rows with fewer allowed blocks keep them all. gqa as in
    :func:`~sparse_jax.selection.xattention`: "per_head", "union" (a kv head keeps the
    union of its query heads' top-k, capped back to ``num_blocks`` by the best per-head
    score) or "mean". Ties go to the lower block index.
    """
    grid, forced = _setup(q, k, block_size, causal, force_sink, force_local)
    num_blocks = thr.check_budget(num_blocks, grid, forced)
    allowed = jnp.asarray(geo.allowed_blocks(grid, causal))
    s = scores_lib.pooled_block_scores(q, k, block_size=block_size, pooling=pooling, causal=causal, scale=scale)
    forced_j = jnp.asarray(forced)

    def select(x):
        return thr.limit_blocks(jnp.broadcast_to(allowed, x.shape), jnp.where(forced_j, jnp.inf, x), num_blocks)

    sel = thr.group_selection(select, s, k.shape[2], gqa, num_blocks, forced)
    bm = to_block_mask(sel, grid, causal=causal, max_kv_blocks=num_blocks)
    return (bm, s) if return_scores else bm


def threshold_blocks(q, k, *, block_size: int = 128, threshold=0.9, pooling: str = "mean", causal: bool = True,
                     force_sink: bool = True, force_local: bool = True, max_kv_blocks: int | None = None,
                     gqa: str = "per_head", scale: float | None = None, return_scores: bool = False):
    """Pooled block scores + :func:`~sparse_jax.selection.cumulative_threshold` (FlexPrefill-like).

    Per-head budgets come out naturally: each head keeps as many blocks as its own
    score distribution needs, up to the static ``max_kv_blocks``.
    """
    grid, forced = _setup(q, k, block_size, causal, force_sink, force_local)
    cap = thr.check_budget(max_kv_blocks, grid, forced)
    s = scores_lib.pooled_block_scores(q, k, block_size=block_size, pooling=pooling, causal=causal, scale=scale)

    sel = thr.threshold_selection(s, threshold, grid, causal=causal, forced=forced, num_kv_heads=k.shape[2], gqa=gqa,
                                  cap=cap)
    bm = to_block_mask(sel, grid, causal=causal, max_kv_blocks=cap)
    return (bm, s) if return_scores else bm
