"""Selections (bool block grids) -> :class:`~sparse_jax.BlockMask` with static widths.

A runtime selection only decides *which* blocks are computed; the *class* a selected block
takes (partial: the kernel masks inside it, full: no mask work) is a property of the mask
and the geometry alone. So the class grid is computed once on the host (numpy, cached)
and only the selection is traced. That keeps the trace free of mask classification over
constants (which XLA would constant-fold at compile time: seconds at 32K tokens) and lets
tables whose content does not depend on the data (PBS's diagonal segment) be numpy
constants.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _block_tables as T
from sparse_jax import masks
from sparse_jax.block_mask import BlockMask
from sparse_jax.selection import _geometry as geo

__all__ = ["to_block_mask", "causal_mask_for", "static_classes", "block_mask_from_selection"]


def causal_mask_for(grid: geo.Grid):
    """The causal mask of a (possibly chunked-prefill) problem, queries at the end of the keys."""
    if grid.offset == 0:
        return masks.causal
    return masks.bottom_right(masks.causal, grid.q_len, grid.kv_len)


@functools.lru_cache(maxsize=32)
def _classes_cached(q_len: int, kv_len: int, block: int, mask) -> np.ndarray:
    everything = np.ones((1, 1, -(-q_len // block), -(-kv_len // block)), bool)
    bm = BlockMask.from_block_bool(everything, q_len, kv_len, block, mask)  # host path (numpy)
    out = np.asarray(bm.block_classes())[0, 0].astype(np.int8)
    out.setflags(write=False)  # shared by every caller of the cache
    return out


def static_classes(q_len: int, kv_len: int, block: int, mask) -> np.ndarray:
    """int8 [nQb, nKb]: the class (EMPTY / PARTIAL / FULL) each block takes when selected,
    from ``mask``'s own classification on the host (None: every block FULL). Cached."""
    if mask is None:
        return np.full((-(-q_len // block), -(-kv_len // block)), T.FULL, np.int8)
    return _classes_cached(int(q_len), int(kv_len), int(block), masks.as_mask(mask))


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def block_mask_from_selection(selection, classes: np.ndarray, q_len: int, kv_len: int, block: int, mask, *,
                              max_kv_blocks: int, max_full_kv_blocks: int, static_partial: bool = False
                              ) -> BlockMask:
    """Tables for ``selection`` given the static class of every block.

    selection: bool [B|1, H|1, nQb, nKb] (traced or concrete); classes: int8 [nQb, nKb]
    (:func:`static_classes`; EMPTY blocks are never computed). ``static_partial``: every
    PARTIAL-class block is computed whatever the selection says, so the partial tables
    (row and column) are numpy constants broadcast over [B, H]. Row-table widths are
    ``max_kv_blocks`` (partial) and ``max_full_kv_blocks`` (full); column tables are
    nQb wide. Widths never depend on the data or on tracing. The same tables as
    :meth:`BlockMask.from_block_bool` with ``mask`` for ``selection | partial`` (tested).
    """
    xp = jnp if _is_traced(selection) else np
    sel = xp.asarray(selection).astype(bool)
    if sel.ndim != 4 or sel.shape[-2:] != classes.shape:
        raise ValueError(f"selection must be [B|1, H|1, {classes.shape[0]}, {classes.shape[1]}]; "
                         f"got shape {tuple(sel.shape)}")
    nq = classes.shape[0]
    lead = sel.shape[:2]
    partial_np, full_np = classes == T.PARTIAL, classes == T.FULL
    if static_partial:
        kv_n, kv_i = T.index_lists(partial_np, max_kv_blocks, np)
        q_n, q_i = T.index_lists(partial_np.T, nq, np)
        kv_n, kv_i, q_n, q_i = (xp.broadcast_to(xp.asarray(a), lead + a.shape) for a in (kv_n, kv_i, q_n, q_i))
    else:
        p = sel & partial_np
        kv_n, kv_i = T.index_lists(p, max_kv_blocks, xp)
        q_n, q_i = T.index_lists(xp.swapaxes(p, -1, -2), nq, xp)
    f = sel & full_np
    fkv_n, fkv_i = T.index_lists(f, max_full_kv_blocks, xp)
    fq_n, fq_i = T.index_lists(xp.swapaxes(f, -1, -2), nq, xp)
    return BlockMask(kv_n, kv_i, fkv_n, fkv_i, q_n, q_i, fq_n, fq_i, (block, block), int(q_len), int(kv_len),
                     None if mask is None else masks.as_mask(mask))


def to_block_mask(selection, grid: geo.Grid, *, causal: bool, max_kv_blocks: int | None = None) -> BlockMask:
    """Tables for ``selection`` bool [B, H, nQb, nKb] of ``grid``.

    With ``causal`` the diagonal blocks become partial (the kernel applies the causal
    mask) and the rest full; otherwise every selected block is full. The static row
    widths are ``max_kv_blocks`` (default: every block) for the full table and the most
    diagonal blocks a row can hold for the partial one; the column (transposed) tables
    are nQb wide. Widths never depend on the data or on tracing.
    """
    width = grid.nk if max_kv_blocks is None else min(int(max_kv_blocks), grid.nk)
    mask = causal_mask_for(grid) if causal else None
    classes = static_classes(grid.q_len, grid.kv_len, grid.block, mask)
    partial_width = min(width, geo.max_local_per_row(grid)) if causal else 1
    return block_mask_from_selection(selection, classes, grid.q_len, grid.kv_len, grid.block, mask,
                                     max_kv_blocks=partial_width, max_full_kv_blocks=width)
