"""GroupMetadata: the one tile -> group schedule every grouped-matmul kernel reads.

Rows of ``lhs [M, K]`` are sorted by group: group g owns rows
``[offsets[g], offsets[g + 1])`` with ``offsets = [0, cumsum(max(sizes, 0))]``
clamped to M (a sum past M is cut at M). With ``group_offset`` only the local
groups ``[offset, offset + G)`` are computed; every other row (earlier groups,
later groups, rows past the sum) is covered by *zero-fill tiles* (group -1) so
the kernel itself writes every output row exactly once.

The rows are split into segments -- [zero-fill before] + local groups + [zero-fill
after] -- and each segment into tiles of ``tile_m`` rows:

``align="group"`` (GPU)
    tiles start at the segment's first row (``row``, ``lo`` = start + j * tm), so a
    tile never straddles two groups; its last tile is short (masked rows).
``align="tile"`` (TPU)
    tiles are the ``tm``-aligned row blocks a segment overlaps; a block that holds
    the end of one group and the start of the next is visited once per group
    (megablox style), consecutively, so an output block stays resident between
    the visits.

=============  ==================  ====================================================
field          shape / dtype       meaning
=============  ==================  ====================================================
group_starts   int32 [G]           first row of each local group
group_ends     int32 [G]           one past its last row (== start when empty)
tile_group     int32 [T]           local group of tile t; -1: write zeros
tile_row       int32 [T]           first row of the tile's [tile_m] row block
tile_lo        int32 [T]           valid rows of tile t are [tile_lo, tile_hi)
tile_hi        int32 [T]
num_tiles      int32 [1]           active tiles (tiles >= num_tiles are idle)
=============  ==================  ====================================================

T = ``max_tiles(M, tm, G)`` is a static worst case (cdiv(M, tm) + G + 2), so the
metadata is built on device under ``jit`` with no host sync. Idle slots hold
group -1 and an empty row range. ``tile_m``, ``num_rows`` and ``align`` are
static pytree aux data.

Negative sizes in traced data cannot raise: they are clamped to 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["GroupMetadata", "make_group_metadata", "group_offsets", "local_group_bounds", "max_tiles",
           "schedule_segments"]

ALIGNS = ("group", "tile")


@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    group_starts: jax.Array
    group_ends: jax.Array
    tile_group: jax.Array
    tile_row: jax.Array
    tile_lo: jax.Array
    tile_hi: jax.Array
    num_tiles: jax.Array
    tile_m: int
    num_rows: int
    align: str

    @property
    def max_tiles(self) -> int:
        """Static number of tile slots T (>= num_tiles)."""
        return self.tile_group.shape[0]

    @property
    def num_groups(self) -> int:
        return self.group_starts.shape[0]

    @property
    def group_sizes(self) -> jax.Array:
        return self.group_ends - self.group_starts

    def tile_arrays(self) -> tuple[jax.Array, ...]:
        """(tile_group, tile_row, tile_lo, tile_hi, num_tiles): what a forward kernel prefetches."""
        return self.tile_group, self.tile_row, self.tile_lo, self.tile_hi, self.num_tiles


jax.tree_util.register_dataclass(
    GroupMetadata,
    data_fields=["group_starts", "group_ends", "tile_group", "tile_row", "tile_lo", "tile_hi", "num_tiles"],
    meta_fields=["tile_m", "num_rows", "align"],
)


def max_tiles(num_rows: int, tile_m: int, num_segments: int) -> int:
    """Static bound on the tiles ``num_segments`` row ranges partitioning ``num_rows`` rows need.

    Either alignment: each segment adds at most one tile beyond its share of
    cdiv(M, tm) (a partial tile, or a visit of an empty segment).
    """
    return -(-num_rows // tile_m) + num_segments


def group_offsets(group_sizes, num_rows: int):
    """int32 [G_total] sizes -> int32 [G_total + 1] row offsets (sizes clamped at 0, offsets at M)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])


def local_group_bounds(group_sizes, num_rows: int, num_groups: int | None = None, group_offset=None):
    """(starts [G], ends [G]) of the local groups [offset, offset + G) (empty past G_total).

    ``group_offset`` is a scalar (Python or traced int32) clamped to [0, G_total].
    """
    g_total = group_sizes.shape[0]
    num_groups = g_total if num_groups is None else num_groups
    offs = group_offsets(group_sizes, num_rows)
    off = jnp.int32(0) if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    off = jnp.clip(off, 0, g_total)
    idx = jnp.minimum(off + jnp.arange(num_groups + 1, dtype=jnp.int32), g_total)
    bounds = offs[idx]
    return bounds[:-1], bounds[1:]


def schedule_segments(seg_start, seg_end, seg_group, *, num_rows: int, tile_m: int, align: str,
                      visit_empty: bool, num_slots: int):
    """Tile arrays for row segments (sorted, disjoint): the core of every schedule.

    seg_start/seg_end/seg_group int32 [S] -> (tile_group, tile_row, tile_lo, tile_hi [num_slots],
    num_tiles [1]). ``visit_empty`` gives each empty segment one tile with an empty row
    range (tgmm writes its zeros there).
    """
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}; got {align!r}")
    tm = tile_m
    size = seg_end - seg_start
    if align == "group":
        first = jnp.zeros_like(seg_start)
        count = (size + tm - 1) // tm
    else:
        last_block = max(-(-num_rows // tm) - 1, 0)
        first = jnp.minimum(seg_start // tm, last_block)
        count = jnp.where(size > 0, (seg_end + tm - 1) // tm - seg_start // tm, 0)
    if visit_empty:
        count = jnp.where(size > 0, count, 1)
    incl = jnp.cumsum(count)
    excl = incl - count
    t = jnp.arange(num_slots, dtype=jnp.int32)
    # Segment of each slot: how many segments end at or before it (a compare-all
    # search: S x T int compares fuse into one small kernel, no sequential steps).
    seg = jnp.sum((incl[None, :] <= t[:, None]).astype(jnp.int32), axis=1)
    active = seg < seg_start.shape[0]
    seg = jnp.minimum(seg, seg_start.shape[0] - 1)
    j = t - excl[seg]
    s, e = seg_start[seg], seg_end[seg]
    if align == "group":
        row = s + j * tm
        lo, hi = row, jnp.minimum(row + tm, e)
    else:
        row = (first[seg] + j) * tm
        lo, hi = jnp.clip(s, row, row + tm), jnp.clip(e, row, row + tm)
    hi = jnp.maximum(hi, lo)
    tile_group = jnp.where(active, seg_group[seg], -1)
    zero = jnp.zeros_like(t)
    tile_row = jnp.where(active, row, zero)
    tile_lo = jnp.where(active, lo, zero)
    tile_hi = jnp.where(active, hi, zero)
    num_tiles = jnp.minimum(incl[-1], num_slots).reshape(1).astype(jnp.int32)
    return tile_group, tile_row, tile_lo, tile_hi, num_tiles


def metadata_from_rows(group_starts, group_ends, *, num_rows: int, tile_m: int, align: str,
                       zero_fill: bool, visit_empty: bool, rows_start=None, rows_end=None) -> GroupMetadata:
    """Schedule the rows ``[rows_start[g], rows_end[g])`` of each local group (default: all of them).

    With ``zero_fill`` the rows outside ``[group_starts[0], group_ends[-1])`` get zero-fill
    tiles. ``rows_start/rows_end`` let one backend split a group's rows between several
    tile heights (each kernel gets the metadata of its share).
    """
    G = group_starts.shape[0]
    rs = group_starts if rows_start is None else rows_start
    re = group_ends if rows_end is None else rows_end
    ids = jnp.arange(G, dtype=jnp.int32)
    if zero_fill:
        lo = group_starts[0] if G else jnp.int32(num_rows)
        hi = group_ends[-1] if G else jnp.int32(num_rows)
        z0, zM = jnp.zeros((1,), jnp.int32), jnp.full((1,), num_rows, jnp.int32)
        seg_start = jnp.concatenate([z0, rs, hi.reshape(1)])
        seg_end = jnp.concatenate([lo.reshape(1), re, zM])
        seg_group = jnp.concatenate([jnp.full((1,), -1, jnp.int32), ids, jnp.full((1,), -1, jnp.int32)])
    else:
        seg_start, seg_end, seg_group = rs, re, ids
    slots = max_tiles(num_rows, tile_m, seg_start.shape[0])
    tiles = schedule_segments(seg_start, seg_end, seg_group, num_rows=num_rows, tile_m=tile_m, align=align,
                              visit_empty=visit_empty, num_slots=slots)
    return GroupMetadata(group_starts, group_ends, *tiles, tile_m=tile_m, num_rows=num_rows, align=align)


def make_group_metadata(group_sizes, *, num_rows: int, tile_m: int, num_groups: int | None = None,
                        group_offset=None, align: str = "group", zero_fill: bool = True,
                        visit_empty: bool = False) -> GroupMetadata:
    """Build the schedule of ``num_groups`` local groups (from ``group_offset``) on device.

    Args:
      group_sizes: int32 [G_total] (traced is fine; negative entries count as 0).
      num_rows: M, the rows of lhs (static).
      tile_m: rows per tile (static).
      num_groups: local groups G (default G_total).
      group_offset: first local group (scalar int, traced is fine).
      align: "group" (tiles start at each group's first row) or "tile" (tm-aligned blocks).
      zero_fill: add group -1 tiles over the rows of no local group.
      visit_empty: give every empty local group one (empty) tile, for kernels that must
        write a per-group output even when the group has no rows.
    """
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32 [G]; got {group_sizes.dtype} {tuple(group_sizes.shape)}")
    if tile_m <= 0 or num_rows < 0:
        raise ValueError(f"need tile_m > 0 and num_rows >= 0; got {tile_m}, {num_rows}")
    starts, ends = local_group_bounds(group_sizes, num_rows, num_groups, group_offset)
    return metadata_from_rows(starts, ends, num_rows=num_rows, tile_m=tile_m, align=align, zero_fill=zero_fill,
                              visit_empty=visit_empty)
