"""XAttention: antidiagonal block scoring + cumulative threshold (Xu et al., 2025)."""

from __future__ import annotations

from sparse_jax.selection import _geometry as geo
from sparse_jax.selection import scores as scores_lib
from sparse_jax.selection import threshold as thr
from sparse_jax.selection.tables import to_block_mask

__all__ = ["xattention"]


def xattention(q, k, *, block_size: int = 128, stride: int = 8, threshold=0.9, causal: bool = True,
               max_kv_blocks: int | None = None, gqa: str = "per_head", force_sink: bool = True,
               force_local: bool = True, scale: float | None = None, return_scores: bool = False,
               backend: str | None = None, interpret: bool = False):
    """Block tables chosen by XAttention's antidiagonal estimate.

    Args:
      q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D] (GQA: Hq a multiple of Hkv; queries are the
        last Sq of the Skv positions when causal).
      block_size: square block of the tables (a multiple of ``stride``).
      stride: antidiagonal stride (8 or 16 in the paper): the estimate costs 1/stride of QK^T.
      threshold: fraction of each query block's estimated mass to keep; float or per
        head [Hq] (or [Hkv] with gqa="mean"). >= 1 keeps every causal block.
      max_kv_blocks: static cap on blocks per row (lowest-scored dropped beyond it); also
        the width of the tables. None: every block fits.
      gqa: "per_head" -> tables [B, Hq]; "union" -> [B, Hkv], the union of the group's
        selections; "mean" -> [B, Hkv], the group's mean scores thresholded once.
      force_sink / force_local: keep the first kv block and the diagonal (XAttention does).
      scale: logit scale (default 1/sqrt(D)); the estimate divides it by ``stride``.
      return_scores: also return the float32 [B, Hq, nQb, nKb] block scores.
      backend / interpret: where the scores run ("triton" kernel or "xla").

    Returns:
      BlockMask (causal mask on the diagonal when ``causal``), and the scores if asked.
    """
    scores_lib.check_qk(q, k)
    grid = geo.Grid(q.shape[1], k.shape[1], block_size)
    scores_lib.check_causal_lengths(grid.q_len, grid.kv_len, causal)
    forced = geo.forced_blocks(grid, causal=causal, force_sink=force_sink, force_local=force_local)
    cap = thr.check_budget(max_kv_blocks, grid, forced)
    s = scores_lib.antidiagonal_block_scores(q, k, block_size=block_size, stride=stride, causal=causal,
                                             scale=scale, backend=backend, interpret=interpret)

    sel = thr.threshold_selection(s, threshold, grid, causal=causal, forced=forced, num_kv_heads=k.shape[2], gqa=gqa,
                                  cap=cap)
    bm = to_block_mask(sel, grid, causal=causal, max_kv_blocks=cap)
    return (bm, s) if return_scores else bm
