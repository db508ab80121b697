"""Pieces shared by the TPU attention kernels (forward, dQ, dK/dV): static problem
description, operand layouts, and the per-tile mask.

Orientation: the forward and dQ kernels compute logits ``[bq, bkv]`` (query rows),
the dK/dV kernel computes their transpose ``[bkv, bq]`` (key rows), so every
row-axis vector arrives lane-replicated as ``[rows, 128]`` (tiled across the
columns) and every column-axis vector as a ``[1, cols]`` row. Tiles are multiples
of 128 on both axes.

Layouts of q/k/v/o (and their gradients) in HBM:

* ``folded`` (head dims multiples of 128): the caller's ``[B, S, H, D]`` viewed as
  ``[B, S, H * D]`` without a copy; a query block ``[bq, G * D]`` holds the G heads
  of one kv-head group side by side, a key block is ``[bkv, D]`` at lane offset
  ``h * D``.
* ``head_major`` (other head dims): ``[B, H, S, D]`` (a transpose in the wrapper);
  a query block is ``[G, bq, D]``, a key block ``[bkv, D]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.coarse_tables import AxisTiles, Coarse, SlotTables
from sparse_jax import _block_tables as T

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static about one attention call."""

    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    dtype: Any
    scale: float
    softcap: float | None
    mask: Any  # sparse_jax Mask with its array leaves stripped, or None
    has_q_pos: bool
    has_kv_pos: bool
    has_segments: bool
    segments_everywhere: bool

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def folded(self) -> bool:
        return self.head_dim % LANES == 0 and self.head_dim_v % LANES == 0

    @property
    def uses_positions(self) -> bool:
        return self.mask is not None

    @property
    def uses_segments(self) -> bool:
        return self.has_segments and (self.segments_everywhere or
                                      (self.mask is not None and self.mask.needs_segments))

    @property
    def precision(self):
        return lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None


def table_meta(t: SlotTables) -> SlotTables:
    """The static part of slot tables (what kernels and index maps close over)."""
    return dataclasses.replace(t, index=None, count=None, words=None)


# -- operand layouts --------------------------------------------------------------------------
def to_layout(P: Problem, x):
    """[B, S, H, d] -> the kernel's HBM layout."""
    b, s, h, d = x.shape
    return x.reshape(b, s, h * d) if P.folded else jnp.swapaxes(x, 1, 2)


def from_layout(P: Problem, x, heads: int, d: int):
    if P.folded:
        b, s, _ = x.shape
        return x.reshape(b, s, heads, d)
    return jnp.swapaxes(x, 1, 2)


def group_spec(P: Problem, rows: int, d: int, index):
    """Block of the G query heads of one group: ``index(b, h, *rest) -> (b, kv head, seq block)``."""
    G = P.group
    if P.folded:
        def imap(*a):
            b, h, blk = index(*a)
            return b, blk, h
        return pl.BlockSpec((None, rows, G * d), imap)

    def imap(*a):
        b, h, blk = index(*a)
        return b, h, blk, 0
    return pl.BlockSpec((None, G, rows, d), imap)


def kv_spec(P: Problem, rows: int, d: int, index):
    """Block of one kv head: ``index(...) -> (b, kv head, seq block)``."""
    if P.folded:
        def imap(*a):
            b, h, blk = index(*a)
            return b, blk, h
        return pl.BlockSpec((None, rows, d), imap)

    def imap(*a):
        b, h, blk = index(*a)
        return b, h, blk, 0
    return pl.BlockSpec((None, None, rows, d), imap)


def load_head(P: Problem, ref, g: int, d: int):
    return ref[:, g * d:(g + 1) * d] if P.folded else ref[g]


def store_head(P: Problem, ref, g: int, d: int, value):
    value = value.astype(ref.dtype)
    if P.folded:
        ref[:, g * d:(g + 1) * d] = value
    else:
        ref[g] = value


def rowstat_spec(rows: int, group: int, index):
    """lse / delta, float32 [B, Hkv, G, Sq]: a block of G rows of ``rows`` queries."""
    def imap(*a):
        b, h, blk = index(*a)
        return b, h, 0, blk
    return pl.BlockSpec((None, None, group, rows), imap)


def col_meta_spec(rows: int, index):
    """Positions / segment ids as lane-replicated columns int32 [B, S, 128]."""
    def imap(*a):
        b, blk = index(*a)
        return b, blk, 0
    return pl.BlockSpec((None, rows, LANES), imap)


def row_meta_spec(cols: int, index):
    """Positions / segment ids as rows int32 [B, 1, S]."""
    def imap(*a):
        b, blk = index(*a)
        return b, 0, blk
    return pl.BlockSpec((None, 1, cols), imap)


def col_meta(x):
    """int32 [B, S] -> [B, S, 128] (lane-replicated, for the row axis of a tile)."""
    return jnp.broadcast_to(x[:, :, None], x.shape + (LANES,))


def row_meta(x):
    return x[:, None, :]


def widen(x, n: int):
    """A lane-replicated [r, 128] value as [r, n]."""
    if n == LANES:
        return x
    reps = -(-n // LANES)
    y = jnp.tile(x, (1, reps))
    return y if reps * LANES == n else y[:, :n]


# -- scalar decoding of the packed sub-block classes ------------------------------------------
def head_state(words_ref, base, field: int, coarse: Coarse):
    """(all sub-blocks empty, all full) for head field ``field`` of the slot at ``base``."""
    wph = coarse.words_per_head
    empty = full = None
    for w in range(wph):
        x = words_ref[base + field * wph + w]
        e, f = x == 0, x == coarse.full_pattern(w)
        empty = e if empty is None else empty & e
        full = f if full is None else full & f
    return empty, full


def sub_class(words_ref, base, field: int, coarse: Coarse, a: int, c: int):
    """Scalar class of sub-block (a along q, c along kv)."""
    w, shift = coarse.sub_word_and_shift(a, c)
    x = words_ref[base + field * coarse.words_per_head + w]
    return lax.shift_right_logical(x, jnp.int32(shift)) & 3 if shift else x & 3


# -- the allowed-pairs mask of one tile ---------------------------------------------------------
@dataclasses.dataclass
class TileAxes:
    """Index vectors of one tile, already broadcast to the tile shape [R, C].

    q_idx / kv_idx: layout indices; q_pos / kv_pos: positions the mask sees;
    q_seg / kv_seg: segment ids (or None).
    """

    q_idx: Any
    kv_idx: Any
    q_pos: Any
    kv_pos: Any
    q_seg: Any
    kv_seg: Any


def tile_axes(P: Problem, shape, *, rows_are_q: bool, q_start, kv_start, refs) -> TileAxes:
    """Build the tile's index vectors. ``refs`` maps 'q_pos', 'kv_pos', 'q_seg', 'kv_seg'
    to meta refs (row-axis ones lane-replicated [R, 128], column-axis ones [1, C])."""
    R, C = shape
    q_axis, kv_axis = (0, 1) if rows_are_q else (1, 0)
    q_idx = lax.broadcasted_iota(jnp.int32, shape, q_axis) + q_start
    kv_idx = lax.broadcasted_iota(jnp.int32, shape, kv_axis) + kv_start

    def load(name, on_rows: bool):
        ref = refs.get(name)
        if ref is None:
            return None
        x = ref[...]
        return jnp.broadcast_to(widen(x, C) if on_rows else x, shape)

    q_pos = load("q_pos", rows_are_q)
    kv_pos = load("kv_pos", not rows_are_q)
    return TileAxes(q_idx, kv_idx, q_idx if q_pos is None else q_pos, kv_idx if kv_pos is None else kv_pos,
                    load("q_seg", rows_are_q), load("kv_seg", not rows_are_q))


def _sub_index(local, axis: AxisTiles, tile_idx):
    """Which of the tile's overlapped logical blocks each local index falls in (int32, same shape).

    Aligned tiles: block k starts at k * block; otherwise the tile starts ``offset``
    rows into its first block and block k starts at k * block - offset.
    """
    off = 0 if axis.aligned else lax.rem(tile_idx * axis.tile, axis.block)
    out = jnp.zeros_like(local)
    for k in range(1, axis.n_sub):
        out = out + (local >= k * axis.block - off).astype(jnp.int32)
    return out


def sub_class_tile(words_ref, base, field: int, coarse: Coarse, shape, *, rows_are_q: bool, q_tile, kv_tile):
    """int32 [R, C] tile of the logical sub-block classes (0 empty, 1 partial, 2 full).

    Separable: one [1, C] line of classes per row sub-block (cheap), then a select
    over the row sub-blocks on the tile (n_sub - 1 compares and selects per element).
    """
    R, C = shape
    row_ax, col_ax = (coarse.q, coarse.kv) if rows_are_q else (coarse.kv, coarse.q)
    row_t, col_t = (q_tile, kv_tile) if rows_are_q else (kv_tile, q_tile)
    col_sub = _sub_index(lax.broadcasted_iota(jnp.int32, (1, C), 1), col_ax, col_t)
    lines = []
    for r in range(row_ax.n_sub):
        line = None
        for cc in range(col_ax.n_sub):
            a, c = (r, cc) if rows_are_q else (cc, r)
            cls = sub_class(words_ref, base, field, coarse, a, c)
            line = jnp.full((1, C), cls, jnp.int32) if line is None else jnp.where(col_sub == cc, cls, line)
        lines.append(line)
    out = jnp.broadcast_to(lines[0], shape)
    if row_ax.n_sub > 1:
        row_sub = _sub_index(lax.broadcasted_iota(jnp.int32, shape, 0), row_ax, row_t)
        for r in range(1, row_ax.n_sub):
            out = jnp.where(row_sub == r, lines[r], out)
    return out


def allowed_tile(P: Problem, ax: TileAxes, *, b, hq, classes=None, partial_scalar=None, bounds=None,
                 apply_fn: bool):
    """bool tile of allowed pairs, or None when every pair is allowed.

    classes: int32 sub-block class tile (coarse tiles); partial_scalar: for a tile
    that is one logical block, a scalar bool "this block is partial" (else full);
    bounds: 'q' / 'kv' / None — which axis may run past the sequence in this tile.
    """
    out = None

    def conj(a, x):
        return x if a is None else a & x

    if apply_fn:
        fn = None
        if P.mask is not None:
            fn = jnp.broadcast_to(P.mask.evaluate(b, hq, ax.q_pos, ax.kv_pos, ax.q_seg, ax.kv_seg),
                                  ax.q_idx.shape)
        if classes is not None:
            full = classes == T.FULL
            part = classes == T.PARTIAL
            out = full | (part if fn is None else part & fn)
        elif fn is not None:  # one logical block: partial -> the mask, full (a ragged edge) -> everything
            whole = jnp.full(fn.shape, 1 - partial_scalar.astype(jnp.int32), jnp.int32)
            out = fn | (whole > 0)
    if P.segments_everywhere:
        out = conj(out, ax.q_seg == ax.kv_seg)
    if bounds == "kv":
        out = conj(out, ax.kv_idx < P.kv_len)
    elif bounds == "q":
        out = conj(out, ax.q_idx < P.q_len)
    return out


def softcapped(P: Problem, s):
    """Scaled logits (f32) -> (logits after softcap, tanh term for the gradient or None)."""
    s = s * P.scale
    if P.softcap is None:
        return s, None
    t = jnp.tanh(s / P.softcap)
    return t * P.softcap, t


def meta_arrays(P: Problem, q_seg, kv_seg, q_pos, kv_pos, *, rows_are_q: bool) -> dict:
    """The positions / segment-id arrays a kernel reads, in its orientation's layouts."""
    out = {}
    q_side = col_meta if rows_are_q else row_meta
    kv_side = row_meta if rows_are_q else col_meta
    if P.uses_positions and q_pos is not None:
        out["q_pos"] = q_side(q_pos)
    if P.uses_positions and kv_pos is not None:
        out["kv_pos"] = kv_side(kv_pos)
    if P.uses_segments:
        out["q_seg"] = q_side(q_seg)
        out["kv_seg"] = kv_side(kv_seg)
    return out


def meta_specs(metas: dict, *, rows_are_q: bool, q_rows: int, kv_rows: int, q_index, kv_index) -> list:
    """BlockSpecs for :func:`meta_arrays`' output (same order). q_index/kv_index -> (b, block)."""
    specs = []
    for name in metas:
        on_q = name.startswith("q_")
        on_rows = on_q == rows_are_q
        n, idx = (q_rows, q_index) if on_q else (kv_rows, kv_index)
        specs.append(col_meta_spec(n, idx) if on_rows else row_meta_spec(n, idx))
    return specs


def dispatch_heads(P: Problem, coarse: Coarse, meta: SlotTables, words_ref, base, *, edge, body):
    """Run ``body(g, masked, partial_scalar)`` for each query head g of the group under ``pl.when``.

    A head whose sub-blocks in this slot are all empty is skipped; all full (and the
    tile not on a ragged ``edge``) runs the fast path without mask work; anything
    else runs the masked path. Heads that share a class field share the branches.
    """
    fields = meta.head_fields
    for f in range(fields):
        empty, full = head_state(words_ref, base, f, coarse)
        fast = full if edge is None else jnp.logical_and(full, jnp.logical_not(edge))
        masked = jnp.logical_and(jnp.logical_not(empty), jnp.logical_not(fast))
        heads = [f] if fields > 1 else list(range(P.group))
        partial = jnp.logical_not(full)

        @pl.when(fast)
        def _fast(heads=heads):
            for g in heads:
                body(g, False, None)

        @pl.when(masked)
        def _masked(heads=heads, partial=partial):
            for g in heads:
                body(g, True, partial)


def tile_mask(P: Problem, coarse: Coarse, words_ref, base, field: int, shape, *, rows_are_q: bool, b, hq,
              q_tile, kv_tile, refs, partial, bounds):
    """The allowed-pairs tile of the masked path (see :func:`allowed_tile`)."""
    q_start, kv_start = q_tile * coarse.tile_q, kv_tile * coarse.tile_kv
    ax = tile_axes(P, shape, rows_are_q=rows_are_q, q_start=q_start, kv_start=kv_start, refs=refs)
    classes = None
    if coarse.subs > 1:
        classes = sub_class_tile(words_ref, base, field, coarse, shape, rows_are_q=rows_are_q, q_tile=q_tile,
                                 kv_tile=kv_tile)
    return allowed_tile(P, ax, b=b, hq=hq, classes=classes, partial_scalar=partial, bounds=bounds, apply_fn=True)


def fast_mask(P: Problem, shape, *, rows_are_q: bool, q_start, kv_start, refs):
    """The fast path's mask: only explicit segment ids (None when there are none)."""
    if not P.segments_everywhere:
        return None
    ax = tile_axes(P, shape, rows_are_q=rows_are_q, q_start=q_start, kv_start=kv_start, refs=refs)
    return allowed_tile(P, ax, b=None, hq=None, apply_fn=False)
