"""Row-vector products on the tensor cores, the idiom of the decode kernels (Pallas-Triton).

A [n] vector times a [n, m] block goes through ``tl.dot`` broadcast to ``ROWS`` MMA rows
(its smallest M): 16x the arithmetic of a GEMV, which costs nothing in a launch bound by
streaming weights, and the dot keeps the loop's loads in Triton's software pipeline (a dot's
operands get ``num_stages`` buffers). All rows are equal; ``max`` over them picks one exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

ROWS = 16


def rows(v):
    """[n] -> [ROWS, n]: the vector broadcast to the MMA's rows."""
    return jnp.broadcast_to(v[None, :], (ROWS, v.shape[0]))


def block_mask(rows_ok, cols_ok, shape):
    """[r, c] load mask from optional row and column masks (None, None: no mask at all, the
    block is full)."""
    if rows_ok is None and cols_ok is None:
        return None
    r = jnp.ones((shape[0],), jnp.bool_) if rows_ok is None else rows_ok
    c = jnp.ones((shape[1],), jnp.bool_) if cols_ok is None else cols_ok
    return r[:, None] & c[None, :]
