"""Kernel-side pieces shared by the Triton attention kernels (forward, dQ, dK/dV).

Everything here is traced *inside* a Pallas kernel: tile geometry (which rows of
the flattened ``[B*S*H, D]`` operands a tile reads), masked row loads, the
logit mask of a block, and the walk over one row (or column) of a BlockMask's
tables. Operands are flattened so every load is a row gather
``x2[rows[:, None], cols[None, :]]``: the same code serves contiguous tiles,
GQA-packed tiles and permuted K/V (``kv_permutation``).

Tables are flat int32 arrays read with scalar loads (Pallas-Triton has no scalar
prefetch); a row's full blocks are walked first, without mask work, then its
partial blocks with the mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import attention_tiling as tiling_lib
from pallas_kernels.common.attention_tiling import BlockTiling, HeadPacking

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call (everything a kernel specialises on)."""

    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    block_q: int  # logical (table) block sizes
    block_kv: int
    table_batch: int  # 1 or batch
    table_heads: int  # 1, num_kv_heads or num_q_heads
    table_head_map: str  # 'shared' | 'kv' | 'q'
    n_q_blocks: int
    n_kv_blocks: int
    max_kv: int
    max_full_kv: int
    max_q: int
    max_full_q: int
    scale: float
    softcap: float | None
    mask: Any  # sparse_jax.masks.Mask with array leaves stripped, or None
    has_q_pos: bool
    has_kv_pos: bool
    has_segments: bool
    segments_everywhere: bool
    kv_meta_heads: int  # kv positions / segment ids per kv head (1 or Hkv; Hkv with a permutation)
    has_perm: bool

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def head_dim_pad(self) -> int:
        return tiling_lib.padded_head_dim(self.head_dim)

    @property
    def head_dim_v_pad(self) -> int:
        return tiling_lib.padded_head_dim(self.head_dim_v)

    @property
    def mask_needs_segments(self) -> bool:
        return self.mask is not None and self.mask.needs_segments

    @property
    def needs_q_meta(self) -> bool:
        return self.mask is not None or self.segments_everywhere


# -- small integer helpers (shifts instead of divisions for powers of two) -----------------
def div(x, n: int):
    if n == 1:
        return x
    if tiling_lib.is_pow2(n):
        return jax.lax.shift_right_logical(x, jnp.int32(int(math.log2(n))))
    return x // n


def mod(x, n: int):
    if n == 1:
        return jnp.zeros_like(x)
    if tiling_lib.is_pow2(n):
        return x & (n - 1)
    return x % n


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


# -- tiles ---------------------------------------------------------------------------------
@dataclasses.dataclass
class QTile:
    """Query rows of one tile (all vectors [M]); ``head`` is a scalar when heads aren't packed."""

    pos: Any  # sequence index
    head: Any
    rows: Any  # row in the flattened [B*Sq*Hq, .] operands (and [B, Sq, Hq] row stats)
    valid: Any  # bool [M] or None when every row is valid
    qp: Any = None  # positions the mask sees
    seg: Any = None


@dataclasses.dataclass
class KVTile:
    """Key rows of one tile (vectors [N])."""

    pos: Any  # logical index j
    rows: Any  # row in the flattened [B*Skv*Hkv, .] operands
    out_rows: Any  # row where dK/dV of logical j is written (before un-permuting)
    valid: Any  # key usable: in range and (with a permutation) a valid entry
    in_range: Any  # j inside its block and the sequence (None: always)
    kp: Any = None
    seg: Any = None


def q_tile(P: Problem, tq: BlockTiling, pk: HeadPacking, b, head0, qblk, sub) -> QTile:
    """Rows of query tile ``sub`` of logical block ``qblk`` for heads head0 .. head0+heads-1."""
    n_pos, hp = tq.tile, pk.heads_pad
    r = jnp.arange(n_pos * hp, dtype=jnp.int32)
    i = div(r, hp)
    local = sub * n_pos + i
    pos = qblk * P.block_q + local
    valid = None
    if tq.needs_bounds:
        valid = pos < P.q_len
        if tq.padded:
            valid = valid & (local < P.block_q)
    if hp > 1:
        g = mod(r, hp)
        if pk.heads < hp:
            valid = _and(valid, g < pk.heads)
            g = jnp.minimum(g, pk.heads - 1)
        head = head0 + g
    else:
        head = head0
    rows = (b * P.q_len + pos) * P.num_q_heads + head
    return QTile(pos, head, rows, valid)


def kv_tile(P: Problem, tk: BlockTiling, b, hkv, kvblk, sub, perm_ref, *, bounds: bool) -> KVTile:
    """Rows of key tile ``sub`` of logical block ``kvblk`` (gathered through the permutation)."""
    c = jnp.arange(tk.tile, dtype=jnp.int32)
    local = sub * tk.tile + c
    j = kvblk * P.block_kv + local
    in_range = None
    if bounds or P.has_perm:
        in_range = j < P.kv_len
        if tk.padded:
            in_range = in_range & (local < P.block_kv)
    out_rows = (b * P.kv_len + j) * P.num_kv_heads + hkv
    valid, rows = in_range, out_rows
    if P.has_perm:
        src = plgpu.load(perm_ref.at[(b * P.num_kv_heads + hkv) * P.kv_len + j], mask=in_range, other=-1)
        valid = in_range & (src >= 0)
        rows = (b * P.kv_len + jnp.maximum(src, 0)) * P.num_kv_heads + hkv
    return KVTile(j, rows, out_rows, valid, in_range)


def load_rows(ref, rows, valid, d: int, d_pad: int):
    """x[rows, :d] padded to d_pad columns with zeros: [len(rows), d_pad]."""
    cols = jnp.arange(d_pad, dtype=jnp.int32)
    mask = None if valid is None else valid[:, None]
    if d_pad != d:
        mask = _and(mask, (cols < d)[None, :])
    at = ref.at[rows[:, None], cols[None, :]]
    if mask is None:
        return plgpu.load(at)
    return plgpu.load(at, mask=mask, other=0)


def store_rows(ref, rows, valid, value, d: int):
    d_pad = value.shape[-1]
    cols = jnp.arange(d_pad, dtype=jnp.int32)
    mask = None if valid is None else valid[:, None]
    if d_pad != d:
        mask = _and(mask, (cols < d)[None, :])
    plgpu.store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype), mask=mask)


def load_vec(ref, idx, valid, other):
    if valid is None:
        return plgpu.load(ref.at[idx])
    return plgpu.load(ref.at[idx], mask=valid, other=other)


def store_vec(ref, idx, valid, value):
    plgpu.store(ref.at[idx], value.astype(ref.dtype), mask=valid)


def load_q_meta(P: Problem, qt: QTile, b, refs) -> None:
    """Positions and segment ids of a query tile, when the mask or segments need them."""
    if not P.needs_q_meta:
        return
    if P.mask is not None:
        qt.qp = load_vec(refs["q_pos"], b * P.q_len + qt.pos, qt.valid, 0) if P.has_q_pos else qt.pos
    if P.has_segments:
        qt.seg = load_vec(refs["q_seg"], b * P.q_len + qt.pos, qt.valid, -1)


def load_kv_meta(P: Problem, kt: KVTile, b, hkv, refs) -> None:
    if not P.needs_q_meta:
        return
    base = (b * P.kv_meta_heads + (hkv if P.kv_meta_heads > 1 else 0)) * P.kv_len
    if P.mask is not None:
        kt.kp = load_vec(refs["kv_pos"], base + kt.pos, kt.valid, 0) if P.has_kv_pos else kt.pos
    if P.has_segments:
        kt.seg = load_vec(refs["kv_seg"], base + kt.pos, kt.valid, -2)


def logit_mask(P: Problem, kind: str, b, qt: QTile, kt: KVTile, *, transposed: bool):
    """bool [M, N] ([N, M] when ``transposed``) of allowed pairs in a block, or None (all).

    kind 'full': only key validity and explicit segments; 'partial': the mask function too.
    """
    def qv(x):  # query-side vector as a row/column of the score tile
        return x[None, :] if transposed else x[:, None]

    def kv(x):
        return x[:, None] if transposed else x[None, :]

    shape = (kt.pos.shape[0], qt.pos.shape[0]) if transposed else (qt.pos.shape[0], kt.pos.shape[0])
    out = None
    if kind == "partial" and P.mask is not None:
        head = qv(qt.head) if jnp.ndim(qt.head) else qt.head
        qs = qv(qt.seg) if qt.seg is not None else None
        ks = kv(kt.seg) if kt.seg is not None else None
        out = jnp.broadcast_to(P.mask.evaluate(b, head, qv(qt.qp), kv(kt.kp), qs, ks), shape)
    if kt.valid is not None:
        out = _and(out, jnp.broadcast_to(kv(kt.valid), shape))
    if P.segments_everywhere:
        out = _and(out, qv(qt.seg) == kv(kt.seg))
    return out


def scores(P: Problem, s):
    """Raw q·k (f32) -> (logits in log2 units, tanh term for softcap's gradient or None).

    Without softcap the log2e·scale factor is returned separately (see ``log2_factor``)
    so it folds into the exp2's FMA instead of costing a multiply per element.
    """
    if P.softcap is None:
        return s, None
    t = jnp.tanh(s * (P.scale / P.softcap))
    return t * (P.softcap * LOG2E), t


def log2_factor(P: Problem) -> float:
    """Factor from ``scores()`` output to log2-domain logits."""
    return 1.0 if P.softcap is not None else P.scale * LOG2E


# -- the table walk ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Walk:
    """One row of a table pair (full + partial) over an axis tiled by ``tiling``.

    ``split_tail``: walk a full block that is the last, ragged block of the axis
    separately (kind 'tail', bound-checked) so other full blocks skip bounds work.
    """

    tiling: BlockTiling
    full_width: int
    part_width: int
    split_tail: bool


def walk(w: Walk, refs_full, refs_part, row, carry, body: Callable, *, active=None, split=None):
    """Run ``body(block, sub, carry, kind)`` over the row's full then partial blocks.

    refs_full/refs_part: (num_ref, idx_ref) flat tables; ``row`` indexes the row.
    ``active`` (bool scalar) zeroes the trip counts of a tile that has no valid rows.
    ``split`` = (index, count): walk only that contiguous share of the row's steps
    (split-KV: the partial softmax states are merged afterwards).
    """
    t = w.tiling
    n_sub = t.n_sub

    def step(width, idx_ref, kind, slot0=None):
        def fn(i, c):
            if slot0 is None:
                slot, sub = div(i, n_sub), mod(i, n_sub)
            else:
                slot, sub = slot0, i
            blk = idx_ref[row * width + slot]
            return body(blk, sub, c, kind)
        return fn

    full_num, full_idx = refs_full
    part_num, part_idx = refs_part
    n_full = full_num[row]
    tail = None
    if w.split_tail and t.ragged:
        last = full_idx[row * w.full_width + jnp.maximum(n_full - 1, 0)]
        tail = ((n_full > 0) & (last == t.n_blocks - 1)).astype(jnp.int32)
        n_full = n_full - tail
    segments = [(n_full * n_sub, step(w.full_width, full_idx, "full"))]
    if tail is not None:
        segments.append((tail * t.n_sub_last, step(w.full_width, full_idx, "tail", slot0=n_full)))
    segments.append((part_num[row] * n_sub, step(w.part_width, part_idx, "partial")))

    if split is None:
        for n, fn in segments:
            carry = jax.lax.fori_loop(0, n if active is None else jnp.where(active, n, 0), fn, carry)
        return carry
    index, count = split
    total = sum(n for n, _ in segments)
    chunk = (total + count - 1) // count
    lo = index * chunk
    hi = jnp.minimum(lo + chunk, total)
    if active is not None:
        hi = jnp.where(active, hi, lo)
    offset = 0
    for n, fn in segments:
        carry = jax.lax.fori_loop(jnp.clip(lo - offset, 0, n), jnp.clip(hi - offset, 0, n), fn, carry)
        offset = offset + n
    return carry


def kind_needs_bounds(kind: str, t: BlockTiling) -> bool:
    """Whether a block of ``kind`` may hold key columns outside its block / the sequence."""
    if kind == "tail":
        return True
    if kind == "full":  # the ragged last block is walked as 'tail'
        return t.padded
    return t.needs_bounds


def table_row(P: Problem, b, head0, hkv, blk, n_blocks: int):
    """Index of (b, head, blk) in a flattened [Bt, Ht, n_blocks] table."""
    tb = b if P.table_batch > 1 else 0
    th = {"shared": 0, "kv": hkv, "q": head0}[P.table_head_map]
    return (tb * P.table_heads + th) * n_blocks + blk
