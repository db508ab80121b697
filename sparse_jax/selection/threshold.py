"""Turning block scores into block selections: cumulative threshold, budgets, GQA grouping.

Selections are bool [B, H, nQb, nKb] (True = the kernel computes the block). They become
:class:`~sparse_jax.BlockMask` tables through :func:`sparse_jax.selection.tables.to_block_mask`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.selection import _geometry as geo

__all__ = ["cumulative_threshold", "limit_blocks", "group_scores", "group_selection", "GQA_MODES"]

GQA_MODES = ("per_head", "union", "mean")


def _threshold_array(threshold, ndim_batch_heads):
    """float or [H] / [B, H] -> f32 broadcastable to [B, H, 1, 1] (concrete values checked)."""
    if not isinstance(threshold, jax.core.Tracer):
        t = np.asarray(threshold, np.float64)
        if np.any(~np.isfinite(t)) or np.any(t < 0):
            raise ValueError(f"threshold must be finite and >= 0; got {threshold!r}")
    t = jnp.asarray(threshold, jnp.float32)
    if t.ndim > 2:
        raise ValueError(f"threshold must be a scalar, [H] or [B, H]; got shape {tuple(t.shape)}")
    if t.ndim == 1:
        t = t[None]
    while t.ndim < ndim_batch_heads:
        t = t[None]
    return t[..., None, None]


def _grid_for(scores, q_len, kv_len, block_size):
    nq, nk = scores.shape[-2:]
    if q_len is None and kv_len is None and block_size is None:
        return geo.Grid(nq, nk, 1)  # block units, bottom-right aligned
    if q_len is None or kv_len is None or block_size is None:
        raise ValueError("pass q_len, kv_len and block_size together (or none of them)")
    grid = geo.Grid(int(q_len), int(kv_len), int(block_size))
    if (grid.nq, grid.nk) != (nq, nk):
        raise ValueError(f"block scores are [.., {nq}, {nk}] but q_len={q_len}, kv_len={kv_len}, "
                         f"block_size={block_size} give [{grid.nq}, {grid.nk}] blocks")
    return grid


def cumulative_threshold(block_scores, threshold, *, causal: bool = True, force_sink: bool = True,
                         force_local: bool = True, max_kv_blocks: int | None = None, q_len: int | None = None,
                         kv_len: int | None = None, block_size: int | None = None, allowed=None, forced=None):
    """Per query block, the fewest kv blocks holding ``threshold`` of the row's score mass.

    Args:
      block_scores: float [B, H, nQb, nKb], non-negative importance per block (e.g. the
        softmax mass of the block); only the ratios within a row matter.
      threshold: float in [0, 1], or per head [H] / [B, H]. >= 1 keeps every allowed block
        (exactly dense); <= 0 keeps only the forced blocks.
      causal: only blocks holding some kv <= q are allowed (queries aligned to the end of
        the keys when q_len < kv_len).
      force_sink / force_local: always keep the first kv block / the diagonal blocks;
        their mass counts towards the threshold first (XAttention's rule).
      max_kv_blocks: static cap per row; beyond it the lowest-scored blocks are dropped
        (forced blocks last). None: no cap.
      q_len, kv_len, block_size: the geometry (default: one unit per block, bottom-right).
      allowed, forced: optional bool [nQb, nKb] overriding the candidate / forced sets.

    Returns:
      bool [B, H, nQb, nKb]: the selection. Blocks with zero score are never added by the
      threshold (they carry no mass). Deterministic: ties at the cut-off value are kept.
    """
    s = jnp.asarray(block_scores)
    if s.ndim != 4:
        raise ValueError(f"block_scores must be [B, H, nQb, nKb]; got shape {tuple(s.shape)}")
    grid = _grid_for(s, q_len, kv_len, block_size)
    if allowed is None:
        allowed = geo.allowed_blocks(grid, causal)
    if forced is None:
        forced = geo.forced_blocks(grid, causal=causal, force_sink=force_sink, force_local=force_local)
    allowed = jnp.asarray(allowed, bool)
    forced = jnp.asarray(forced, bool) & allowed
    s = jnp.where(allowed, jnp.maximum(s.astype(jnp.float32), 0.0), 0.0)
    tau = _threshold_array(threshold, 2)
    need = tau * jnp.sum(s, axis=-1, keepdims=True)
    forced_mass = jnp.sum(jnp.where(forced, s, 0.0), axis=-1, keepdims=True)
    rest = jnp.where(forced, 0.0, s)
    desc = -jnp.sort(-rest, axis=-1)
    before = forced_mass + jnp.cumsum(desc, axis=-1) - desc  # mass already kept when reaching each entry
    take = (before < need) & (desc > 0)
    n = jnp.sum(take, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(desc, jnp.maximum(n - 1, 0), axis=-1)
    cutoff = jnp.where(n > 0, cutoff, jnp.inf)
    sel = forced | ((rest >= cutoff) & (rest > 0))
    sel = jnp.where(tau >= 1.0, allowed, sel) & allowed
    if max_kv_blocks is not None:
        sel = limit_blocks(sel, jnp.where(forced, jnp.inf, s), max_kv_blocks)
    return sel


def limit_blocks(selection, priority, max_blocks: int):
    """Keep at most ``max_blocks`` selected blocks per row, the highest ``priority`` first.

    selection: bool [..., nKb]; priority: float broadcastable to it (use +inf for blocks
    that must stay). Ties are broken towards lower block indices (``lax.top_k``).
    """
    max_blocks = int(max_blocks)
    if max_blocks <= 0:
        raise ValueError(f"max_kv_blocks must be positive; got {max_blocks}")
    selection = jnp.asarray(selection, bool)
    nk = selection.shape[-1]
    if max_blocks >= nk:
        return selection
    pr = jnp.where(selection, jnp.broadcast_to(priority, selection.shape).astype(jnp.float32), -jnp.inf)
    vals, idx = jax.lax.top_k(pr, max_blocks)
    keep = vals > -jnp.inf
    target = jnp.where(keep, idx, nk)  # column nk is a discard slot
    out = jnp.zeros(selection.shape[:-1] + (nk + 1,), bool)
    out = jnp.put_along_axis(out, target, True, axis=-1, inplace=False)
    return out[..., :nk] & selection


def group_scores(scores, num_kv_heads: int):
    """[B, Hq, ...] -> [B, Hkv, G, ...] (query heads of one kv head are contiguous)."""
    b, hq = scores.shape[:2]
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} kv heads")
    return scores.reshape(b, num_kv_heads, hq // num_kv_heads, *scores.shape[2:])


def group_selection(select, scores, num_kv_heads: int, gqa: str, max_kv_blocks: int | None, forced):
    """Apply a per-head selection rule under a GQA mode.

    select(scores [B, H, nQb, nKb]) -> bool selection of the same shape (no cap applied).
    gqa: "per_head" (tables [B, Hq]), "union" (each head selects, a kv head's table is the
    union over its query heads) or "mean" (the group's mean scores select once). The cap
    ``max_kv_blocks`` applies to the final tables, by (group) score.
    """
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}; got {gqa!r}")
    forced = jnp.asarray(forced, bool)
    if gqa == "per_head" or scores.shape[1] == num_kv_heads:
        sel, pr = select(scores), scores
    elif gqa == "mean":
        pr = jnp.mean(group_scores(scores, num_kv_heads), axis=2)
        sel = select(pr)
    else:
        sel = jnp.any(group_scores(select(scores), num_kv_heads), axis=2)
        pr = jnp.max(group_scores(scores, num_kv_heads), axis=2)
    if max_kv_blocks is not None:
        sel = limit_blocks(sel, jnp.where(forced, jnp.inf, pr), max_kv_blocks)
    return sel


def check_budget(max_kv_blocks, grid: geo.Grid, forced: np.ndarray):
    """Trace-time check: a cap below the forced blocks of some row is an error."""
    if max_kv_blocks is None:
        return None
    max_kv_blocks = int(max_kv_blocks)
    need = int(np.asarray(forced).sum(-1).max(initial=0))
    if max_kv_blocks < max(need, 1):
        raise ValueError(f"max_kv_blocks={max_kv_blocks} is below the {need} forced (sink/local) blocks "
                         "some query block needs")
    return min(max_kv_blocks, grid.nk)


def threshold_selection(scores, threshold, grid: geo.Grid, *, causal: bool, forced, num_kv_heads: int, gqa: str,
                        cap: int):
    """Cumulative-threshold selection of block scores [B, H, nQb, nKb] per head, combined per kv
    head as ``gqa`` says (see :func:`group_selection`): bool [B, H', nQb, nKb]."""

    def select(x):
        return cumulative_threshold(x, threshold, causal=causal, q_len=grid.q_len, kv_len=grid.kv_len,
                                    block_size=grid.block, forced=forced)

    return group_selection(select, scores, num_kv_heads, gqa, cap, forced)
