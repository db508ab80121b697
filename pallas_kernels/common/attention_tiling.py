"""Lowering-independent tiling decisions for the block-sparse attention kernels.

A :class:`~sparse_jax.BlockMask` describes sparsity in *logical* blocks
(``block_size = (BQ, BKV)``, any positive ints). A kernel works in power-of-two
*tiles*. This module decides how tiles cover logical blocks, how the head
dimension is padded, which heads share a program (GQA packing), and the order in
which query rows are scheduled. Both the Triton and the Mosaic TPU lowerings use
it; nothing here emits kernel code.

Conventions used by the kernels:

* A logical block of size ``block`` is covered by ``n_sub`` tiles of ``tile``
  rows; tile ``s`` of block ``i`` starts at ``i * block + s * tile``. When the
  tile does not divide the block (``padded``) the last tile reaches past the
  block and the kernel masks the extra rows/columns.
* With GQA packing a query tile holds ``rows_per_tile = tile_m // heads_pad``
  positions of ``heads_pad`` (a power of two >= heads per program) heads,
  row ``r`` <-> (position ``r // heads_pad``, head ``r % heads_pad``).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# Smallest tile Triton's tl.dot accepts along M/N/K.
MIN_DOT_TILE = 16


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def padded_head_dim(d: int) -> int:
    """Head dim rounded up to a power of two (at least 16, the MMA K minimum)."""
    if d <= 0:
        raise ValueError(f"head dim must be positive; got {d}")
    return max(MIN_DOT_TILE, next_pow2(d))


@dataclasses.dataclass(frozen=True)
class BlockTiling:
    """How tiles of ``tile`` rows cover logical blocks of ``block`` rows along one axis.

    ``length`` is the sequence length along the axis; ``n_blocks`` logical blocks
    cover it. ``n_sub`` tiles per block; ``padded`` when ``tile`` does not divide
    ``block`` (the last tile of a block runs past it and must be masked).
    ``n_sub_last``: tiles that hold valid rows in the last (possibly ragged) block.
    """

    block: int
    tile: int
    length: int

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.block)

    @property
    def span(self) -> int:
        """Rows of a block that tiles ever cover: a block never holds more than ``length``."""
        return min(self.block, self.length)

    @property
    def n_sub(self) -> int:
        return -(-self.span // self.tile)

    @property
    def padded(self) -> bool:
        return self.span % self.tile != 0

    @property
    def ragged(self) -> bool:
        """The last block is shorter than ``block``."""
        return self.length % self.block != 0

    @property
    def n_sub_last(self) -> int:
        last_rows = self.length - (self.n_blocks - 1) * self.block
        return -(-last_rows // self.tile)

    @property
    def n_tiles(self) -> int:
        return self.n_blocks * self.n_sub

    @property
    def needs_bounds(self) -> bool:
        """Some tile of some block holds rows outside its block or past ``length``."""
        return self.padded or self.ragged


def fit_tile(block: int, length: int, want: int, *, min_tile: int = MIN_DOT_TILE) -> BlockTiling:
    """Choose a power-of-two tile of at most ``want`` rows for logical blocks of ``block``.

    Preference: the largest power of two <= ``want`` that divides the block (no
    wasted rows) as long as it is at least ``max(min_tile, 32)``; otherwise one
    power-of-two tile that covers the block (or ``want`` if smaller) with the
    excess masked. Short sequences (``length < block``) shrink the tile to fit.
    """
    if not is_pow2(want):
        raise ValueError(f"tile size must be a power of two; got {want}")
    span = min(block, length)
    want = max(min_tile, min(want, next_pow2(span)))
    t, floor = want, max(min_tile, min(32, want))
    while t >= floor:
        if span % t == 0:
            return BlockTiling(block, t, length)
        t //= 2
    return BlockTiling(block, want, length)


@dataclasses.dataclass(frozen=True)
class HeadPacking:
    """Which query heads one program handles.

    heads: heads per program (1 or the GQA group size G); heads_pad: next power of
    two (rows per position in a packed tile); num_programs_per_batch = Hq // heads.
    """

    heads: int
    heads_pad: int
    num_q_heads: int
    num_kv_heads: int

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def programs_per_batch(self) -> int:
        return self.num_q_heads // self.heads

    @property
    def packed(self) -> bool:
        return self.heads > 1


def head_packing(num_q_heads: int, num_kv_heads: int, table_heads: int, pack: bool | None, *,
                 q_span: int, tile_m: int) -> HeadPacking:
    """Decide GQA packing: the ``G`` query heads of a kv head share one query tile.

    Packing needs one block table per group (``table_heads`` of 1 or the kv heads).
    ``pack=None`` packs when a tile's worth of positions is not available
    (``q_span < tile_m``: decode and short prefill), where it turns an M of a
    few rows into G times that and loads each K/V tile once per group.
    """
    g = num_q_heads // num_kv_heads
    can = g > 1 and table_heads in (1, num_kv_heads)
    if pack and not can:
        if g > 1:
            raise ValueError(f"GQA packing needs one block table per kv head group; the mask has "
                             f"{table_heads} heads for {num_q_heads} query heads")
        pack = False
    if pack is None:
        pack = can and q_span < tile_m
    heads = g if pack else 1
    return HeadPacking(heads, next_pow2(heads), num_q_heads, num_kv_heads)


def q_tiling(block: int, length: int, tile_m: int, packing: HeadPacking) -> BlockTiling:
    """Tiling of the query axis in *positions*: a tile of ``tile_m`` rows holds
    ``tile_m // heads_pad`` positions of each packed head (at least one)."""
    want_rows = max(1, tile_m // packing.heads_pad)
    min_rows = max(1, MIN_DOT_TILE // packing.heads_pad)
    return fit_tile(block, length, next_pow2(want_rows), min_tile=min_rows)


def tile_rows(tiling: BlockTiling, packing: HeadPacking) -> int:
    """M of the MMA: positions per tile x padded heads."""
    return tiling.tile * packing.heads_pad


def heavy_first_order(num_blocks, full_num_blocks):
    """Query blocks sorted by descending work: int32 [Bt, Ht, nQb] (a schedule).

    Long rows start first so short ones fill the tail of the grid (the causal
    diagonal puts the heavy rows last otherwise). Partial blocks count 1.25x a
    full one for their mask work.
    """
    work = full_num_blocks.astype(jnp.float32) + 1.25 * num_blocks.astype(jnp.float32)
    return jnp.argsort(-work, axis=-1, stable=True).astype(jnp.int32)


def table_head_map(table_heads: int, num_q_heads: int, num_kv_heads: int) -> str:
    """'shared' (H=1), 'kv' (one table per kv head) or 'q' (one per query head)."""
    if table_heads == 1:
        return "shared"
    if table_heads == num_q_heads:
        return "q"
    if table_heads == num_kv_heads:
        return "kv"
    raise ValueError(f"block mask has H={table_heads}; expected 1, {num_kv_heads} or {num_q_heads}")


def attention_flops(num_pairs, head_dim: int, head_dim_v: int | None = None) -> float:
    """Forward FLOPs of attention over ``num_pairs`` (query, key) pairs: 2·D + 2·Dv each."""
    dv = head_dim if head_dim_v is None else head_dim_v
    return float(num_pairs) * 2.0 * (head_dim + dv)


def log2e() -> float:
    return math.log2(math.e)


def row_delta(o, do, lse, dlse=None):
    """float32 [B, H, S]: FlashAttention-2's ``delta_i = sum_d o_id do_id`` minus the lse
    cotangent (o, do [B, S, H, Dv]; lse, dlse float32 [B, H, S] or None).

    With a loss that also reads lse, dL/ds_ij = p_ij (dp_ij - delta_i + dlse_i): the kernels'
    ``p (dp - delta)`` with delta shifted. Rows with no allowed key (lse = -inf) ignore dlse.
    """
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is None:
        return delta
    return delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
