"""Kernel tables over *coarse* tiles that span several logical blocks, exact per sub-block.

A kernel whose tiles are larger than a :class:`~sparse_jax.BlockMask`'s logical
blocks (TPUs want 512-row tiles; FlexAttention-style masks come in 128-blocks)
walks, for each tile row, the list of tiles that overlap any non-empty logical
block. So that nothing is lost by coarsening, every list slot also carries the
class (empty / partial / full) of each logical block the tile overlaps (its
*sub-blocks*) and, for per-query-head masks under GQA, of each query head of the
group: the kernel computes the tile once per head, skips heads whose sub-blocks
are all empty, drops the mask work where they are all full, and otherwise builds
the element mask from the sub-block classes (full: allowed; partial: the mask
function; empty: not allowed) -- exactly the fine tables' semantics.

Tiles need not be multiples of the logical blocks (:class:`AxisTiles`): a tile
overlaps up to ``n_sub`` consecutive blocks, the first of which it may start
inside. Aligned tiles (multiples) are the common, cheaper case.

Packed classes: a slot holds ``words_per_slot = head_fields * words_per_head``
int32 words. Sub-block ``s = a * n_sub_kv + c`` (``a``-th overlapped block along q,
``c``-th along kv) of head field ``g`` sits in word ``g * words_per_head + s // 16``
at bits ``2 * (s % 16)``. Sub-block slots a tile does not overlap, and blocks past
the end of the sequence, are packed as FULL (the kernel never selects the former
and bound-checks the latter) but never make a tile active.

Lists (like the BlockMask's): ascending tile indices, slots past a row's count
repeat the last index; a row with no active tile repeats the previous row's last
index so the kernel's pipeline fetches nothing new for it. Every table is flat
int32 (``(((b * heads + h) * rows + r) * slots + s) * words + w``) because scalar
memory pads multi-dimensional arrays.

Lowering-independent: numpy on the host (exact widths), jax.numpy under tracing
(widths bounded from the BlockMask's static table widths).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _block_tables as T
from sparse_jax.block_mask import BlockMask

SUBS_PER_WORD = 16
_BITS = 2


@dataclasses.dataclass(frozen=True)
class SlotTables:
    """Flat per-row lists of active coarse tiles and their packed sub-block classes.

    index: int32 [batch * heads * rows * slots]; count: int32 [batch * heads * rows];
    words: int32 [batch * heads * rows * slots * words_per_slot]. ``batch``/``heads``
    are 1 when the tables broadcast over the batch / kv heads.
    """

    index: object
    count: object
    words: object
    batch: int
    heads: int
    rows: int
    slots: int
    head_fields: int
    words_per_head: int

    @property
    def words_per_slot(self) -> int:
        return self.head_fields * self.words_per_head

    def row(self, b, h, r):
        """Flat row number of (batch b, kv head h, tile row r); b, h may be traced scalars."""
        bb = b if self.batch > 1 else 0
        hh = h if self.heads > 1 else 0
        return (bb * self.heads + hh) * self.rows + r

    @property
    def smem_bytes(self) -> int:
        n = self.batch * self.heads * self.rows
        return 4 * (n + n * self.slots * (1 + self.words_per_slot))


@dataclasses.dataclass(frozen=True)
class AxisTiles:
    """Tiles of ``tile`` rows over logical blocks of ``block`` rows along an axis of ``length``.

    Tile t covers rows [t * tile, (t + 1) * tile) and overlaps logical blocks
    ``first(t) .. last(t)``; ``n_sub`` is the largest overlap. ``aligned`` tiles
    start on block boundaries (tile % block == 0), so sub-block k of every tile
    starts at row k * block of the tile; otherwise tile t starts ``offset(t)``
    rows into its first block.
    """

    tile: int
    block: int
    length: int

    @property
    def n_tiles(self) -> int:
        return -(-self.length // self.tile)

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.block)

    @property
    def aligned(self) -> bool:
        return self.tile % self.block == 0

    def first(self, t):
        return (t * self.tile) // self.block

    def last(self, t):
        return np.minimum(((t + 1) * self.tile - 1) // self.block, self.n_blocks - 1)

    def offset(self, t):
        return (t * self.tile) % self.block

    @property
    def n_sub(self) -> int:
        t = np.arange(self.n_tiles)
        return int((self.last(t) - self.first(t) + 1).max())

    def sub_blocks(self):
        """(block index int32 [n_tiles, n_sub] clipped to the grid, valid bool [n_tiles, n_sub])."""
        t = np.arange(self.n_tiles)[:, None]
        idx = self.first(t) + np.arange(self.n_sub)[None, :]
        valid = idx <= self.last(t)
        return np.minimum(idx, self.n_blocks - 1).astype(np.int32), valid


@dataclasses.dataclass(frozen=True)
class Coarse:
    """Kernel tiles over a BlockMask's logical blocks, along q and kv."""

    q: AxisTiles
    kv: AxisTiles

    @classmethod
    def make(cls, tile_q: int, tile_kv: int, block_size, q_len: int, kv_len: int) -> "Coarse":
        return cls(AxisTiles(tile_q, block_size[0], q_len), AxisTiles(tile_kv, block_size[1], kv_len))

    @property
    def tile_q(self) -> int:
        return self.q.tile

    @property
    def tile_kv(self) -> int:
        return self.kv.tile

    @property
    def n_q_tiles(self) -> int:
        return self.q.n_tiles

    @property
    def n_kv_tiles(self) -> int:
        return self.kv.n_tiles

    @property
    def subs(self) -> int:
        return self.q.n_sub * self.kv.n_sub

    @property
    def words_per_head(self) -> int:
        return -(-self.subs // SUBS_PER_WORD)

    def sub_word_and_shift(self, a: int, c: int) -> tuple[int, int]:
        """(word within a head's field, bit shift) of sub-block (a, c); static ints."""
        s = a * self.kv.n_sub + c
        return s // SUBS_PER_WORD, _BITS * (s % SUBS_PER_WORD)

    def full_pattern(self, w: int) -> int:
        """int32 value of a head's word ``w`` when every sub-block in it is FULL."""
        n = min(SUBS_PER_WORD, self.subs - w * SUBS_PER_WORD)
        v = sum(T.FULL << (_BITS * k) for k in range(n))
        return v - (1 << 32) if v >= (1 << 31) else v


def on_host(block_mask: BlockMask) -> bool:
    """True when the tables are concrete numpy arrays (exact widths, inspectable)."""
    leaves = [getattr(block_mask, f) for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                                                "full_kv_indices", "q_num_blocks", "q_indices")]
    return all(isinstance(x, np.ndarray) for x in leaves)


def _xp_of(block_mask: BlockMask):
    return np if on_host(block_mask) else jnp


def head_fields(table_heads: int, num_q_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(kernel table heads, head fields per slot) for a mask with ``table_heads`` heads.

    H = 1: one table for everything; H = Hkv: one per kv head; H = Hq > Hkv: one
    union table per kv head with a class field for each of the G query heads.
    """
    if table_heads == 1:
        return 1, 1
    if table_heads == num_kv_heads:
        return num_kv_heads, 1
    if table_heads == num_q_heads:
        return num_kv_heads, num_q_heads // num_kv_heads
    raise ValueError(f"block mask has H={table_heads}; expected 1, {num_kv_heads} or {num_q_heads}")


def _sub_classes(block_mask: BlockMask, coarse: Coarse, num_q_heads: int, num_kv_heads: int, xp):
    """int8 [Bt, Hk, nQt, nKt, G_t, subs] classes and bool [Bt, Hk, nQt, nKt] activity."""
    cls = block_mask.block_classes()
    if xp is jnp:
        cls = jnp.asarray(cls)
    bt, ht = cls.shape[:2]
    hk, gt = head_fields(ht, num_q_heads, num_kv_heads)
    cls = cls.reshape(bt, hk, gt, *cls.shape[2:])
    qi, qv = coarse.q.sub_blocks()
    ki, kv = coarse.kv.sub_blocks()
    sub = cls[..., qi[:, None, :, None], ki[None, :, None, :]]  # [Bt, Hk, G_t, nQt, nKt, nsq, nsk]
    valid = (qv[:, None, :, None] & kv[None, :, None, :])
    sub = sub.reshape(*sub.shape[:-2], -1)
    valid = valid.reshape(*valid.shape[:-2], -1)
    active = xp.any((sub != T.EMPTY) & valid, axis=(2, -1))  # over head fields and sub-blocks
    sub = xp.where(valid, sub, xp.int8(T.FULL))  # never-hit / past-the-end sub-blocks: see the module doc
    sub = xp.moveaxis(sub, 2, -2)  # [Bt, Hk, nQt, nKt, G_t, subs]
    return sub, active, gt


def _pack(sub, coarse: Coarse, xp):
    """Classes [..., G_t, subs] -> int32 words [..., G_t * words_per_head]."""
    wph = coarse.words_per_head
    pad = wph * SUBS_PER_WORD - coarse.subs
    if pad:
        widths = [(0, 0)] * (sub.ndim - 1) + [(0, pad)]
        sub = xp.pad(sub, widths)
    sub = sub.reshape(*sub.shape[:-1], wph, SUBS_PER_WORD).astype(xp.uint32)
    shifts = (xp.arange(SUBS_PER_WORD, dtype=xp.uint32) * _BITS).astype(xp.uint32)
    words = xp.sum(sub << shifts, axis=-1, dtype=xp.uint32)
    words = words.reshape(*words.shape[:-2], -1)
    if xp is np:
        return words.view(np.int32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def _fill_empty_rows(counts, idx, xp):
    """Rows with no active tile take the previous non-empty row's last index."""
    rows = counts.shape[-1]
    last = idx[..., -1]
    pos = xp.where(counts > 0, xp.arange(rows, dtype=xp.int32), -1)
    if xp is np:
        src = np.maximum.accumulate(pos, axis=-1)
    else:
        src = jax.lax.cummax(pos, axis=pos.ndim - 1)
    prev = xp.take_along_axis(last, xp.maximum(src, 0), axis=-1)
    prev = xp.where(src >= 0, prev, 0)
    return xp.where((counts > 0)[..., None], idx, prev[..., None]).astype(xp.int32)


def _lists(active, words, bound: int, xp):
    """Per-row lists of the True entries of ``active`` [..., R, C] with their words [..., R, C, W]."""
    if xp is np:
        slots = max(1, int(active.sum(-1).max(initial=0)))
    else:
        slots = max(1, min(active.shape[-1], bound))
    counts, idx = T.index_lists(active, slots, xp)
    idx = _fill_empty_rows(counts, idx, xp)
    w = xp.take_along_axis(words, idx[..., None], axis=-2)
    return counts, idx, w, slots


def _flat(x, xp):
    return x.reshape(-1).astype(xp.int32)


def build(block_mask: BlockMask, coarse: Coarse, *, num_q_heads: int, num_kv_heads: int,
          transpose: bool) -> SlotTables:
    """Row tables (``transpose=False``: per q tile, the kv tiles) or column tables
    (``transpose=True``: per kv tile, the q tiles) of the coarsened mask."""
    xp = _xp_of(block_mask)
    sub, active, gt = _sub_classes(block_mask, coarse, num_q_heads, num_kv_heads, xp)
    words = _pack(sub, coarse, xp)  # [Bt, Hk, nQt, nKt, W]
    if transpose:
        active = xp.swapaxes(active, -1, -2)
        words = xp.swapaxes(words, -2, -3)
        # a tile column gathers n_sub fine columns of every head field
        bound = gt * coarse.kv.n_sub * (block_mask.max_q_blocks + block_mask.max_full_q_blocks)
    else:
        bound = gt * coarse.q.n_sub * (block_mask.max_kv_blocks + block_mask.max_full_kv_blocks)
    counts, idx, w, slots = _lists(active, words, bound, xp)
    bt, hk, rows = counts.shape
    return SlotTables(_flat(idx, xp), _flat(counts, xp), _flat(w, xp), bt, hk, rows, slots, gt,
                      coarse.words_per_head)
