"""Kernel tables over *coarse* tiles that span several logical blocks, exact per sub-block.

A kernel whose tile is ``factor_q x factor_kv`` logical blocks of a
:class:`~sparse_jax.BlockMask` (TPUs want 512-row tiles; FlexAttention-style masks
come in 128-blocks) walks, for each tile row, the list of tiles that contain any
non-empty logical block. So that nothing is lost by coarsening, every list slot
also carries the class (empty / partial / full) of each logical sub-block inside
the tile, and, for per-query-head masks under GQA, of each query head of the group:
the kernel computes the tile once per head, skips heads whose sub-blocks are all
empty, drops the mask work where they are all full, and otherwise builds the
element mask from the sub-block classes (full: allowed; partial: the mask
function; empty: not allowed). The result is exactly the fine tables' semantics.

Packed classes: a slot holds ``words_per_slot = head_fields * words_per_head``
int32 words. Sub-block ``s = a * factor_kv + c`` (``a`` along q, ``c`` along kv) of
head field ``g`` sits in word ``g * words_per_head + s // 16`` at bits
``2 * (s % 16)``. Sub-blocks past the end of the sequence are packed as FULL (the
kernel bound-checks the ragged last tile) but never make a tile active.

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
from sparse_jax.block_mask import BlockMask, group_sub_blocks

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
class Coarse:
    """Geometry of a coarsening: tiles of ``factor`` logical blocks along each axis."""

    factor_q: int
    factor_kv: int
    block_q: int  # logical block sizes
    block_kv: int
    q_len: int
    kv_len: int

    @property
    def tile_q(self) -> int:
        return self.factor_q * self.block_q

    @property
    def tile_kv(self) -> int:
        return self.factor_kv * self.block_kv

    @property
    def n_q_tiles(self) -> int:
        return -(-self.q_len // self.tile_q)

    @property
    def n_kv_tiles(self) -> int:
        return -(-self.kv_len // self.tile_kv)

    @property
    def subs(self) -> int:
        return self.factor_q * self.factor_kv

    @property
    def words_per_head(self) -> int:
        return -(-self.subs // SUBS_PER_WORD)

    def sub_word_and_shift(self, a: int, c: int) -> tuple[int, int]:
        """(word within a head's field, bit shift) of sub-block (a, c); static ints."""
        s = a * self.factor_kv + c
        return s // SUBS_PER_WORD, _BITS * (s % SUBS_PER_WORD)

    def full_pattern(self, w: int) -> int:
        """int32 value of a head's word ``w`` when every sub-block in it is FULL."""
        n = min(SUBS_PER_WORD, self.subs - w * SUBS_PER_WORD)
        v = sum(T.FULL << (_BITS * k) for k in range(n))
        return v - (1 << 32) if v >= (1 << 31) else v


def _xp_of(block_mask: BlockMask):
    leaves = [getattr(block_mask, f) for f in ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices")]
    return np if all(isinstance(x, np.ndarray) for x in leaves) else jnp


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
    sub, valid = group_sub_blocks(cls, coarse.factor_q, coarse.factor_kv, xp)  # [.., nQt, nKt, subs]
    active = xp.any((sub != T.EMPTY) & valid, axis=(2, -1))  # over head fields and sub-blocks
    sub = xp.where(valid, sub, xp.int8(T.FULL))
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
        # a tile column gathers factor_kv fine columns of every head field
        bound = gt * coarse.factor_kv * (block_mask.max_q_blocks + block_mask.max_full_q_blocks)
    else:
        bound = gt * coarse.factor_q * (block_mask.max_kv_blocks + block_mask.max_full_kv_blocks)
    counts, idx, w, slots = _lists(active, words, bound, xp)
    bt, hk, rows = counts.shape
    return SlotTables(_flat(idx, xp), _flat(counts, xp), _flat(w, xp), bt, hk, rows, slots, gt,
                      coarse.words_per_head)
