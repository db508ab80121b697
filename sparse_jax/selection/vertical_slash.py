"""MInference's vertical-slash pattern, estimated from the last queries, as block tables.

MInference (Jiang et al., 2024) scores every key with the last ``last_q`` queries and
keeps the ``vertical_size`` best *columns* (keys every query attends to) and the
``slash_size`` best *diagonals* (fixed distances q - k, e.g. local windows and
periodic patterns); its kernel then computes exactly those columns and diagonals.

Approximation made here: the block-sparse kernel computes whole blocks, so a column
becomes every causal block of its kv block and a diagonal becomes every block it
crosses (one or two kv blocks per query block). The tables are a superset of
MInference's exact pattern: recall is at least MInference's for the same budgets, the
density is higher (up to ``block_size`` times for isolated columns). The exact lists are
returned with ``return_indices=True`` for an indexed kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.selection import _geometry as geo
from sparse_jax.selection import scores as scores_lib
from sparse_jax.selection import threshold as thr
from sparse_jax.selection.tables import to_block_mask

__all__ = ["vertical_slash", "vertical_slash_scores", "lists_to_blocks"]


def vertical_slash_scores(q, k, *, last_q: int = 64, scale: float | None = None):
    """Per-key and per-diagonal attention of the last ``last_q`` queries (causal).

    Returns (vertical float32 [B, Hq, Skv]: summed probability each key receives;
    slash float32 [B, Hq, Skv]: summed probability along the diagonal q - k = d, d in
    [0, Skv)). Queries sit at the end of the keys.
    """
    scores_lib.check_qk(q, k)
    sq, skv = q.shape[1], k.shape[1]
    scores_lib.check_causal_lengths(sq, skv, True)
    r = max(1, min(int(last_q), sq))
    pos = np.arange(sq - r, sq) + (skv - sq)  # absolute positions of the estimating queries
    p = scores_lib.last_queries_probs(q[:, sq - r:], k, q_positions=pos, scale=scale, causal=True)
    vertical = p.sum(2)
    d = np.arange(skv)
    cols = pos[:, None] - d[None, :]  # [R, Skv]: the key on diagonal d for each row
    ok = cols >= 0
    diag = jnp.take_along_axis(p, jnp.asarray(np.where(ok, cols, 0))[None, None], axis=-1)
    slash = jnp.sum(jnp.where(ok, diag, 0.0), axis=2)
    return vertical, slash


def _topk_mask(x, n: int):
    n = int(min(n, x.shape[-1]))
    _, idx = jax.lax.top_k(x, n)
    out = jnp.zeros(x.shape, bool)
    return jnp.put_along_axis(out, idx, True, axis=-1, inplace=False), idx


@functools.lru_cache(maxsize=32)
def _block_ranges(grid: geo.Grid):
    """Static per-block key and diagonal ranges (int32 [nQb, nKb] each, inclusive; hi < lo: none)."""
    q_lo, q_hi = grid.q_range()
    kv_lo, kv_hi = grid.kv_range()
    c_lo = np.broadcast_to(kv_lo[None, :], (grid.nq, grid.nk))
    c_hi = np.minimum(kv_hi[None, :], q_hi[:, None])  # keys some query of the block sees
    d_lo = np.maximum(0, q_lo[:, None] - kv_hi[None, :])
    d_hi = q_hi[:, None] - kv_lo[None, :]
    return tuple(a.astype(np.int32) for a in (c_lo, c_hi, d_lo, d_hi))


def lists_to_blocks(column_sel, diagonal_sel, grid: geo.Grid):
    """Blocks holding a causal pair on a selected column or diagonal.

    column_sel, diagonal_sel: bool [B, H, Skv] (keys; diagonals d = q - k in [0, Skv)).
    Returns bool [B, H, nQb, nKb] (exact: a block is selected iff it contains such a pair).
    """
    c_lo, c_hi, d_lo, d_hi = _block_ranges(grid)

    def hits(sel, lo, hi):
        cum = jnp.pad(jnp.cumsum(sel.astype(jnp.int32), axis=-1), ((0, 0), (0, 0), (1, 0)))
        hi_c = np.clip(hi + 1, 0, sel.shape[-1])
        lo_c = np.clip(lo, 0, sel.shape[-1])
        n = cum[..., hi_c] - cum[..., lo_c]
        return (n > 0) & jnp.asarray(hi >= lo)

    return hits(column_sel, c_lo, c_hi) | hits(diagonal_sel, d_lo, d_hi)


def vertical_slash(q, k, *, vertical_size: int, slash_size: int, last_q: int = 64, block_size: int = 128,
                   force_sink: bool = True, force_local: bool = True, gqa: str = "per_head",
                   scale: float | None = None, return_indices: bool = False):
    """Causal block tables of the vertical-slash pattern (see the module docstring).

    Args:
      q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D], queries the last Sq positions.
      vertical_size: keys kept per head (the best columns by the last queries' attention).
      slash_size: diagonals kept per head.
      last_q: queries used for the estimate (the last ones).
      block_size: square block of the tables.
      force_sink / force_local: also keep the first kv block / the diagonal blocks.
      gqa: "per_head" (tables [B, Hq]), "union" (kv head tables = union over its query
        heads) or "mean" (the group's mean scores pick one list per kv head).
      return_indices: also return (columns int32 [B, H, vertical], diagonals int32 [B, H, slash]),
        MInference's exact lists.

    Returns a BlockMask whose static width bounds vertical + 2 * slash + forced blocks.
    """
    scores_lib.check_qk(q, k)
    if gqa not in thr.GQA_MODES:
        raise ValueError(f"gqa must be one of {thr.GQA_MODES}; got {gqa!r}")
    if int(vertical_size) < 0 or int(slash_size) < 0 or int(vertical_size) + int(slash_size) == 0:
        raise ValueError(f"vertical_size and slash_size must be >= 0 and not both 0; "
                         f"got {vertical_size}, {slash_size}")
    grid = geo.Grid(q.shape[1], k.shape[1], block_size)
    hkv = k.shape[2]
    vertical, slash = vertical_slash_scores(q, k, last_q=last_q, scale=scale)
    if gqa == "mean":
        vertical = thr.group_scores(vertical, hkv).mean(2)
        slash = thr.group_scores(slash, hkv).mean(2)
    empty = jnp.zeros(vertical.shape, bool)
    cols, col_idx = _topk_mask(vertical, vertical_size) if vertical_size else (empty, None)
    diags, diag_idx = _topk_mask(slash, slash_size) if slash_size else (empty, None)
    sel = lists_to_blocks(cols, diags, grid)
    forced = geo.forced_blocks(grid, causal=True, force_sink=force_sink, force_local=force_local)
    sel = (sel | jnp.asarray(forced)) & jnp.asarray(geo.causal_blocks(grid))
    if gqa == "union" and sel.shape[1] != hkv:
        sel = jnp.any(thr.group_scores(sel, hkv), axis=2)
    per_head = min(grid.nk, int(vertical_size) + 2 * int(slash_size) + int(forced.sum(-1).max(initial=0)))
    width = per_head if gqa != "union" else min(grid.nk, per_head * (q.shape[2] // hkv))
    bm = to_block_mask(sel, grid, causal=True, max_kv_blocks=width)
    if return_indices:
        return bm, (col_idx, diag_idx)
    return bm
