"""Kernel-side pieces shared by the Triton attention kernels (forward, dQ, dK/dV).

Everything here is traced *inside* a Pallas kernel: tile geometry (which rows of
the flattened ``[B*S*H, D]`` operands a tile reads), masked row loads, the
logit mask of a block, and the walk over one row (or column) of a BlockMask's
tables. Every load is a row gather ``x2[rows[:, None], cols[None, :]]`` (contiguity
along D is visible to Triton's axis analysis: 16-byte cp.async vectors); a tile's
rows are ``base + rel`` with a scalar ``base`` (the block being visited) and a
vector ``rel`` shared by every tile of a program (contiguous rows: ``c * H``;
GQA-packed rows: ``i * H + g``); ``kv_permutation`` gathers rows through the
permutation. (A 1-D layout with hoisted ``rel * D + cols`` offsets was tried: the
same SASS instruction count per step, ptxas already strength-reduces the
addresses — see the notes.)

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
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import attention_tiling as tiling_lib
from pallas_kernels.common.attention_tiling import BlockTiling, HeadPacking
from sparse_jax import masks

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


def _strip_arrays(mask):
    """The mask with its array leaves (document ids) replaced by None: kernels pass segment
    ids to ``Mask.evaluate`` explicitly and must not capture arrays."""
    if mask is None:
        return None
    leaves, tree = jax.tree_util.tree_flatten(mask)
    return jax.tree_util.tree_unflatten(tree, [None] * len(leaves))


def problem(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap, segments_everywhere,
            kv_permutation) -> Problem:
    """The static :class:`Problem` of one call (operand shapes, tables, mask, which metadata the kernels read)."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    bt, bh = block_mask.shape[:2]
    mask = block_mask.mask
    if isinstance(mask, masks.Full):  # allows every pair: nothing to evaluate in any block
        mask = None
    if mask is not None and mask.needs_segments and q_seg is None:
        raise ValueError("the mask contains a document mask but no segment ids reached the kernel")
    uses_segments = q_seg is not None and (segments_everywhere or (mask is not None and mask.needs_segments))
    has_perm = kv_permutation is not None
    return Problem(
        batch=B, q_len=Sq, kv_len=Skv, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, head_dim_v=Dv,
        block_q=block_mask.block_size[0], block_kv=block_mask.block_size[1], table_batch=bt, table_heads=bh,
        table_head_map=tiling_lib.table_head_map(bh, Hq, Hkv),
        n_q_blocks=block_mask.num_q_blocks, n_kv_blocks=block_mask.num_kv_blocks,
        max_kv=block_mask.max_kv_blocks, max_full_kv=block_mask.max_full_kv_blocks,
        max_q=block_mask.max_q_blocks, max_full_q=block_mask.max_full_q_blocks,
        scale=float(scale), softcap=None if softcap is None else float(softcap), mask=_strip_arrays(mask),
        has_q_pos=q_pos is not None and mask is not None,
        has_kv_pos=(kv_pos is not None or has_perm) and mask is not None,
        has_segments=uses_segments, segments_everywhere=bool(segments_everywhere and uses_segments),
        kv_meta_heads=Hkv if has_perm else 1, has_perm=has_perm)


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
    """Query rows of one tile (vectors [M]); ``head`` is a scalar when heads aren't packed.

    Row r of the tile is row ``base + rel[r]`` of the flattened [B*Sq*Hq, .] operands (and of
    the [B, Sq, Hq] row statistics); ``rel`` does not depend on the block visited.
    """

    pos: Any  # sequence index
    head: Any
    base: Any  # scalar
    rel: Any  # [M]
    valid: Any  # bool [M] or None when every row is valid
    qp: Any = None  # positions the mask sees
    seg: Any = None

    @property
    def rows(self):
        return self.base + self.rel


@dataclasses.dataclass
class KVTile:
    """Key rows of one tile (vectors [N]): loads read rows ``base + rel``; dK/dV of logical
    key j go to rows ``out_base + out_rel`` (before un-permuting)."""

    pos: Any  # logical index j
    base: Any
    rel: Any
    out_base: Any
    out_rel: Any
    valid: Any  # key usable: in range and (with a permutation) a valid entry
    in_range: Any  # j inside its block and the sequence (None: always)
    kp: Any = None
    seg: Any = None


def q_tile(P: Problem, tq: BlockTiling, pk: HeadPacking, b, head0, qblk, sub) -> QTile:
    """Rows of query tile ``sub`` of logical block ``qblk`` for heads head0 .. head0+heads-1."""
    n_pos, hp = tq.tile, pk.heads_pad
    r = jnp.arange(n_pos * hp, dtype=jnp.int32)
    i = div(r, hp)
    start = qblk * P.block_q + sub * n_pos  # first position of the tile
    pos = start + i
    valid = None
    if tq.needs_bounds:
        valid = pos < P.q_len
        if tq.padded:
            valid = valid & (sub * n_pos + i < P.block_q)
    rel = i * P.num_q_heads
    if hp > 1:
        g = mod(r, hp)
        if pk.heads < hp:
            valid = _and(valid, g < pk.heads)
            g = jnp.minimum(g, pk.heads - 1)
        head = head0 + g
        rel = rel + g
    else:
        head = head0
    base = (b * P.q_len + start) * P.num_q_heads + head0
    return QTile(pos, head, base, rel, valid)


def kv_tile(P: Problem, tk: BlockTiling, b, hkv, kvblk, sub, perm_ref, *, bounds: bool) -> KVTile:
    """Rows of key tile ``sub`` of logical block ``kvblk`` (gathered through the permutation)."""
    c = jnp.arange(tk.tile, dtype=jnp.int32)
    start = kvblk * P.block_kv + sub * tk.tile
    j = start + c
    in_range = None
    if bounds or P.has_perm:
        in_range = j < P.kv_len
        if tk.padded:
            in_range = in_range & (sub * tk.tile + c < P.block_kv)
    out_base = (b * P.kv_len + start) * P.num_kv_heads + hkv
    out_rel = c * P.num_kv_heads
    valid, base, rel = in_range, out_base, out_rel
    if P.has_perm:
        src = plgpu.load(perm_ref.at[(b * P.num_kv_heads + hkv) * P.kv_len + j], mask=in_range, other=-1)
        valid = in_range & (src >= 0)
        base = b * P.kv_len * P.num_kv_heads + hkv
        rel = jnp.maximum(src, 0) * P.num_kv_heads
    return KVTile(j, base, rel, out_base, out_rel, valid, in_range)


def _offsets(ref, base, rel, d_pad: int):
    """Ref view of rows base + rel, columns 0 .. d_pad-1."""
    rows = base + rel
    return ref.at[rows[:, None], jnp.arange(d_pad, dtype=jnp.int32)[None, :]]


def _row_mask(valid, d: int, d_pad: int):
    mask = None if valid is None else valid[:, None]
    if d_pad != d:
        mask = _and(mask, (jnp.arange(d_pad, dtype=jnp.int32) < d)[None, :])
    return mask


def load_rows(ref, base, rel, valid, d: int, d_pad: int):
    """x[base + rel, :d] padded to d_pad columns with zeros: [len(rel), d_pad]."""
    at = _offsets(ref, base, rel, d_pad)
    mask = _row_mask(valid, d, d_pad)
    if mask is None:
        return plgpu.load(at)
    return plgpu.load(at, mask=mask, other=0)


def store_rows(ref, base, rel, valid, value, d: int):
    at = _offsets(ref, base, rel, value.shape[-1])
    plgpu.store(at, value.astype(ref.dtype), mask=_row_mask(valid, d, value.shape[-1]))


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


def walk(w: Walk, refs_full, refs_part, row, carry, body: Callable, *, active=None, split=None,
         prefetch_index: bool = False):
    """Run ``body(block, sub, carry, kind)`` over the row's full then partial blocks.

    refs_full/refs_part: (num_ref, idx_ref) flat tables; ``row`` indexes the row.
    ``active`` (bool scalar) zeroes the trip counts of a tile that has no valid rows.
    ``split`` = (index, count): walk only that contiguous share of the row's steps
    (split-KV: the partial softmax states are merged afterwards).
    ``prefetch_index``: read step i+1's block index during step i and carry it. Without it
    Triton's pipeliner gives the index load of a full-block loop its own pipeline stage
    (an asynchronous copy), which leaves the K/V tiles one stage of prefetch instead of
    ``num_stages - 1``.
    """
    t = w.tiling
    n_sub = t.n_sub

    def slot_sub(i, slot0):
        if slot0 is None:
            return div(i, n_sub), mod(i, n_sub)
        return slot0, i

    def step(width, idx_ref, kind, slot0=None):
        if width == 0:  # the table has no such blocks at all: nothing to walk (or to read)
            return None, None

        def read(i):
            slot, _ = slot_sub(i, slot0)
            return idx_ref[row * width + jnp.minimum(slot, width - 1)]

        # The tail's index is loop-invariant (slot0): nothing to prefetch, and carrying it
        # crashed Triton's loop scheduler (TritonGPUScheduleLoops, triton 3.6; notes).
        if not prefetch_index or slot0 is not None:
            def fn(i, c):
                slot, sub = slot_sub(i, slot0)
                return body(idx_ref[row * width + slot], sub, c, kind)
            return fn, None

        def fn_pf(i, c):
            c, blk_i = c
            _, sub = slot_sub(i, slot0)
            nxt = read(i + 1)
            return body(blk_i, sub, c, kind), nxt
        return fn_pf, read

    full_num, full_idx = refs_full
    part_num, part_idx = refs_part
    n_full = full_num[row]
    tail = None
    if w.split_tail and t.ragged and w.full_width > 0:
        last = full_idx[row * w.full_width + jnp.maximum(n_full - 1, 0)]
        tail = ((n_full > 0) & (last == t.n_blocks - 1)).astype(jnp.int32)
        n_full = n_full - tail
    segments = [(n_full * n_sub, step(w.full_width, full_idx, "full"))]
    if tail is not None:
        segments.append((tail * t.n_sub_last, step(w.full_width, full_idx, "tail", slot0=n_full)))
    segments.append((part_num[row] * n_sub, step(w.part_width, part_idx, "partial")))

    def run(lo, hi, fn_read, carry):
        fn, read = fn_read
        if fn is None:
            return carry
        if read is None:
            return jax.lax.fori_loop(lo, hi, fn, carry)
        carry, _ = jax.lax.fori_loop(lo, hi, fn, (carry, read(lo)))
        return carry

    if split is None:
        for n, fr in segments:
            carry = run(0, n if active is None else jnp.where(active, n, 0), fr, carry)
        return carry
    index, count = split
    total = sum(n for n, _ in segments)
    chunk = (total + count - 1) // count
    lo = index * chunk
    hi = jnp.minimum(lo + chunk, total)
    if active is not None:
        hi = jnp.where(active, hi, lo)
    offset = 0
    for n, fr in segments:
        carry = run(jnp.clip(lo - offset, 0, n), jnp.clip(hi - offset, 0, n), fr, carry)
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
