"""Row tiles of a grouped matmul whose groups start at multiples of 8 rows (the Mosaic GPU forward).

Hopper's TMA copies a 2-D box into swizzled shared memory; Pallas can slice such a buffer, and
address the global rows of the copy, only at multiples of its 8-row tile. So the Mosaic GPU
gmm takes *aligned* groups: every group size (hence every group start) a multiple of
:data:`ALIGN`. The MoE layer's padded dispatch (``plan_dispatch(..., row_align=8)``) builds that
layout at no extra pass: its gathers write each expert's rows from an 8-row boundary.

The table is a few small XLA ops on [G]-sized vectors (no host sync). It cuts [0, M) into
*segments*: the rows before the local groups (zeros), the G local groups, the rows after them
(zeros), then each segment into tiles of ``tile_rows`` rows (128 or 256) starting at the segment start
(a tile never straddles two groups; a segment's last tile is partial, a multiple of 8 rows).
If any local group breaks the alignment, the whole table becomes zero tiles flagged BAD over
[0, M): the kernel then writes NaN everywhere (a loud failure rather than rows it cannot place).
"""

from __future__ import annotations

import jax.numpy as jnp

ALIGN = 8          # rows: the 8-row tile of Hopper's swizzled shared-memory layout
GROUP, ROW0, ROWS, BAD = range(4)  # fields of the table


def max_tiles(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """Static bound on the tiles of any group sizes: each of the G + 2 segments adds at most one partial tile."""
    return -(-num_rows // tile_rows) + num_groups + 2


def tile_table(group_sizes, group_offset, *, num_rows: int, num_groups: int, tile_rows: int):
    """int32 [4, T] table and int32 [] tile count for M = num_rows rows over the local groups.

    group_sizes int32 [G_total] (negative entries count as 0; a sum past M is cut at M);
    group_offset int32 [] or None: the local groups are [offset, offset + num_groups).
    Rows: GROUP (local group id, -1 for a tile of zeros), ROW0 (first row), ROWS (rows of the
    tile, 1..tile_rows; 0 past the count), BAD (1 in every tile when some group's start or size
    is not a multiple of ALIGN: the kernel then writes NaN rows everywhere).
    T = :func:`max_tiles` (static).
    """
    gs = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    g_total = gs.shape[0]
    cum = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.minimum(jnp.cumsum(gs), num_rows)])
    off = jnp.int32(0) if group_offset is None else group_offset.astype(jnp.int32)
    gid = off + jnp.arange(num_groups, dtype=jnp.int32)
    start = cum[jnp.clip(gid, 0, g_total)]
    end = cum[jnp.clip(gid + 1, 0, g_total)]
    lo, hi = cum[jnp.clip(off, 0, g_total)], cum[jnp.clip(off + num_groups, 0, g_total)]
    seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), start, hi[None]])
    seg_end = jnp.concatenate([lo[None], end, jnp.full((1,), num_rows, jnp.int32)])
    seg_group = jnp.concatenate([jnp.full((1,), -1, jnp.int32), jnp.arange(num_groups, dtype=jnp.int32),
                                 jnp.full((1,), -1, jnp.int32)])
    size = seg_end - seg_start
    bad = ((seg_start % ALIGN) != 0) | ((size % ALIGN) != 0)
    tiles = -(-size // tile_rows)
    cum_tiles = jnp.cumsum(tiles)
    T = max_tiles(num_rows, num_groups, tile_rows)
    t = jnp.arange(T, dtype=jnp.int32)
    seg = jnp.minimum(jnp.sum(cum_tiles[None, :] <= t[:, None], axis=1), num_groups + 1).astype(jnp.int32)
    row0 = seg_start[seg] + (t - (cum_tiles[seg] - tiles[seg])) * tile_rows
    rows = jnp.clip(seg_end[seg] - row0, 0, tile_rows)
    table = jnp.stack([seg_group[seg], row0, rows, jnp.zeros_like(rows)])
    # a broken promise: zero tiles over [0, M) flagged BAD (the kernel writes NaN)
    poison = jnp.stack([jnp.full_like(t, -1), t * tile_rows, jnp.clip(num_rows - t * tile_rows, 0, tile_rows),
                        jnp.ones_like(t)])
    any_bad = jnp.any(bad)
    return jnp.where(any_bad, poison, table), jnp.where(any_bad, -(-num_rows // tile_rows), cum_tiles[-1])
