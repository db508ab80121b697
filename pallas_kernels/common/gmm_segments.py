"""Segment table of the GPU grouped-matmul forward: the whole tile schedule in a few small vectors.

The rows of ``lhs [M, K]`` are sorted by group. A forward (``pallas_kernels/triton``) runs
one or two launches over them: launch 0 (big tiles of ``tm0`` rows) computes rows
``[start[h], mid[h])`` of every local group h and writes zeros over the rows of no local
group; launch 1 (small tiles of ``tm1`` rows) computes ``[mid[h], end[h])``. Tiles are
group-aligned (a tile starts at its segment's first row, the last one is short), so a
launch's tiles are: zero-fill tiles before the local groups, each local group's tiles in
order, zero-fill tiles after (launch 0 only).

Instead of one entry per worst-case tile slot, the table keeps per group the row bounds and
the cumulative tile count; a kernel decodes its work tile ``t`` with one compare-and-count
over a [W] vector (:func:`decode`). One tiny kernel builds it from ``group_sizes`` (no XLA
ops around the matmul; the previous XLA schedule took ~0.2 ms of small launches per call).

Table: int32 [NUM_ROWS, W], W = :func:`table_width` (a power of two >= G_total); column h
is *global* group h (``group_offset`` picks the local ones, non-local groups have no tiles):

=========  ==========================================================================
row        meaning
=========  ==========================================================================
START      first row of group h (offsets = cumsum(clip(sizes, 0, M)) clamped to M)
MID        end of launch 0's share / start of launch 1's (== END without a split)
END        one past the last row of group h
INCL0      cumulative launch-0 tile count over groups 0..h (zero-fill tiles excluded)
INCL1      cumulative launch-1 tile count over groups 0..h
SCALARS    [OFF, LO, HI, Z0, G0, TOTAL0, G1, 0, ...]: clamped group offset, rows [LO, HI)
           of the local groups, zero-fill tiles before them, launch-0 group tiles, all
           launch-0 tiles, launch-1 tiles
=========  ==========================================================================

Everything here is plain jnp on [W] / [16, W] arrays with ops Pallas-Triton lowers
(iota, cumsum, where, reductions, integer division by constants): the same code runs
inside the kernel and, in XLA, in the tests.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax

START, MID, END, INCL0, INCL1, SCALARS = range(6)
NUM_ROWS = 6
OFF, LO, HI, Z0, G0, TOTAL0, G1 = range(7)
_MIN_WIDTH = 8  # the SCALARS row needs 7 slots


def table_width(num_groups_total: int) -> int:
    """W: a power of two (Triton vector length) holding every group and the scalars."""
    return max(_MIN_WIDTH, 1 << max(int(num_groups_total) - 1, 0).bit_length())


def _cdiv(a, b: int):
    return (a + (b - 1)) // b


def segment_table(sizes, off, *, num_rows: int, num_groups: int, num_groups_total: int, tm0: int,
                  tm1: int | None = None, split: Callable | None = None) -> tuple:
    """The table's rows (each int32 [W]) from group sizes.

    Args:
      sizes: int32 [W], group_sizes padded with zeros (negative entries count as 0, entries
        are clipped to M; the cumulative sum must stay below 2^31).
      off: int32 scalar, first local group (clamped to [0, G_total]).
      num_rows: M; num_groups: local groups G; num_groups_total: G_total (<= W).
      tm0 / tm1: tile rows of launch 0 / launch 1 (None: one launch).
      split: ``split(start, end) -> mid`` per group (int32 [W] each), e.g.
        :func:`pallas_kernels.common.gmm_plan.split_rows`; required with ``tm1``.
    """
    W = sizes.shape[0]
    M = num_rows
    h = lax.broadcasted_iota(jnp.int32, (W,), 0)
    s = jnp.clip(sizes, 0, M)
    incl = jnp.cumsum(s)
    end = jnp.minimum(incl, M)
    start = jnp.minimum(incl - s, M)
    off = jnp.clip(off, 0, num_groups_total)
    local = (h >= off) & (h < off + num_groups)
    lo = jnp.minimum(jnp.sum(jnp.where(h < off, s, 0)), M)
    hi = jnp.minimum(jnp.sum(jnp.where(h < off + num_groups, s, 0)), M)
    local_end = jnp.where(local, end, start)  # non-local groups: no rows, no tiles
    if tm1 is None:
        mid = local_end
        c1 = jnp.zeros_like(s)
    else:
        mid = jnp.clip(split(start, local_end), start, local_end)
        c1 = _cdiv(local_end - mid, tm1)
    c0 = _cdiv(mid - start, tm0)
    incl0, incl1 = jnp.cumsum(c0), jnp.cumsum(c1)
    g0, g1 = jnp.sum(c0), jnp.sum(c1)
    z0, z1 = _cdiv(lo, tm0), _cdiv(M - hi, tm0)
    scalars = jnp.zeros_like(s)
    for slot, v in ((OFF, off), (LO, lo), (HI, hi), (Z0, z0), (G0, g0), (TOTAL0, z0 + g0 + z1), (G1, g1)):
        scalars = jnp.where(h == slot, v, scalars)
    return start, mid, end, incl0, incl1, scalars


def decode(t, *, launch: int, tm: int, num_rows: int, row: Callable, at: Callable):
    """Work tile ``t`` (< the launch's tile count) -> (local group or -1 for zero fill, first row, row end).

    The tile computes rows [first, end) (group-aligned: end - first <= tm).
    ``row(r)`` returns table row r as int32 [W]; ``at(r, i)`` the scalar table[r, i].
    """
    incl = row(INCL0 + launch)
    W = incl.shape[0]
    groups = at(SCALARS, G0 if launch == 0 else G1)
    u = t - (at(SCALARS, Z0) if launch == 0 else 0)  # index among the launch's group tiles
    done = incl <= u
    h = jnp.minimum(jnp.sum(done.astype(jnp.int32)), W - 1)  # first group whose tiles reach past u
    first_tile = jnp.max(jnp.where(done, incl, 0))
    seg_lo = at(START if launch == 0 else MID, h)
    seg_hi = at(MID if launch == 0 else END, h)
    first = seg_lo + (u - first_tile) * tm
    g = h - at(SCALARS, OFF)
    end = jnp.minimum(first + tm, seg_hi)
    if launch == 1:
        return g, first, end
    before, after = u < 0, u >= groups
    z_first = jnp.where(before, t * tm, at(SCALARS, HI) + (u - groups) * tm)
    z_end = jnp.minimum(z_first + tm, jnp.where(before, at(SCALARS, LO), num_rows))
    zero = before | after
    return jnp.where(zero, -1, g), jnp.where(zero, z_first, first), jnp.where(zero, z_end, end)


def max_tiles(num_rows: int, tm: int, num_groups: int, launch: int) -> int:
    """Static bound on a launch's tiles: cdiv(M, tm) plus one partial tile per segment."""
    return -(-num_rows // tm) + num_groups + (2 if launch == 0 else 0)


def table_xla(group_sizes, group_offset=None, **kw):
    """:func:`segment_table` as one int32 [NUM_ROWS, W] array, computed by XLA (tests, reference)."""
    gt = group_sizes.shape[0]
    W = table_width(gt)
    sizes = jnp.pad(group_sizes.astype(jnp.int32), (0, W - gt))
    off = jnp.int32(0) if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    return jnp.stack(segment_table(sizes, off, num_groups_total=gt, **kw))
