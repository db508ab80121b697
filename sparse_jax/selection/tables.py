"""Selections (bool block grids) -> :class:`~sparse_jax.BlockMask` with static widths."""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax import masks
from sparse_jax.block_mask import BlockMask
from sparse_jax.selection import _geometry as geo

__all__ = ["to_block_mask", "causal_mask_for"]


def causal_mask_for(grid: geo.Grid):
    """The causal mask of a (possibly chunked-prefill) problem, queries at the end of the keys."""
    if grid.offset == 0:
        return masks.causal
    return masks.bottom_right(masks.causal, grid.q_len, grid.kv_len)


def to_block_mask(selection, grid: geo.Grid, *, causal: bool, max_kv_blocks: int | None = None) -> BlockMask:
    """Tables for ``selection`` bool [B, H, nQb, nKb] of ``grid``.

    With ``causal`` the diagonal blocks become partial (the kernel applies the causal
    mask) and the rest full; otherwise every selected block is full. The static row
    widths are ``max_kv_blocks`` (default: every block) for the full table and the most
    diagonal blocks a row can hold for the partial one; the column (transposed) tables
    are nQb wide. Widths never depend on the data or on tracing.
    """
    width = grid.nk if max_kv_blocks is None else min(int(max_kv_blocks), grid.nk)
    sel = jnp.asarray(selection, bool)
    # Column tables at full height: the same widths eagerly and under jit.
    cols = dict(max_q_blocks=grid.nq, max_full_q_blocks=grid.nq)
    if causal:
        return BlockMask.from_block_bool(sel, grid.q_len, grid.kv_len, grid.block, causal_mask_for(grid),
                                         max_kv_blocks=min(width, geo.max_local_per_row(grid)),
                                         max_full_kv_blocks=width, **cols)
    return BlockMask.from_block_bool(sel, grid.q_len, grid.kv_len, grid.block, None, max_kv_blocks=1,
                                     max_full_kv_blocks=width, **cols)
