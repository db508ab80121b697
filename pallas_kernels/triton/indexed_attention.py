"""Indexed attention on GPUs (Pallas -> Triton): token lists and block lists, query-major loop.

One program per (query tile, batch x kv head). A query tile is ``T`` consecutive tokens
(``T = 1`` by default for token lists); the tile's T tokens x G query heads share one
walk over the union of the tokens' lists and form the M = T x Gp rows of every MMA, a
per-(row, key) membership bit masking the keys a row's token did not list. With ``T = 1``
this is NSA's query-group packing (DSA/MLA: G = 64..128); ``T > 1`` loads a key row once
for every token of the tile that listed it (selections of neighbouring tokens overlap).
The inner loop walks the union in chunks of ``BN`` key positions: gathered rows (token
lists) or whole blocks (block lists, ``span`` = block size); positions that are not keys
are read at address 0 and masked to -inf.

Memory safety (Triton has no bounds checks; the interpreter does, so it cannot catch this):
blocks padded past an array's extent (Gp > G, Dp > D) alias the neighbouring heads' memory,
so every access to them is a masked gather/scatter; outputs carry ``T``-padded token rows so
that no two lanes of one store share an address, and dK/dV buffers carry ``BN`` spare rows
(a masked lane scatter-adds zeros to its own row) and Dp columns. Each store is checked by
``tests/triton_store_lint.py``.

Backward: one kernel recomputes P, accumulates the tile's dQ in registers and scatters dK,
dV with float32 atomic adds (relaxed order: :func:`sparse_jax._compat.triton_atomic_add`).
Summation order across programs varies: dK/dV are not bitwise deterministic run to run.
The block kernels' kv-major loop order (``indexed_block_kv_major``) is deterministic.

Entry points ``forward`` / ``backward`` take canonical lists
(:func:`pallas_kernels.common.indexed.canonicalize`) and dispatch on ``loop_order``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import indexed as common
from pallas_kernels.mosaic_gpu import dispatch as mgpu_dispatch
from pallas_kernels.mosaic_gpu import indexed_block_fwd as mgpu_indexed
from sparse_jax import _compat


_OVERRIDE: contextvars.ContextVar[dict] = contextvars.ContextVar("indexed_triton_config", default={})


@contextlib.contextmanager
def config_override(**kw):
    """Force launch parameters of the indexed kernels traced inside (tuning): query-major
    ``BN``, ``num_warps``, ``num_stages`` (forward) and ``bwd_BN``, ``bwd_warps``, ``bwd_stages``,
    ``relaxed_atomics`` (bool); kv-major ``rows`` / ``bwd_rows`` (MMA rows per step), ``kv_warps``,
    ``kv_stages``, ``kv_bwd_warps``, ``kv_bwd_stages``;
    indexer ``BQ``, ``indexer_warps``, ``indexer_stages``. Wrap a fresh function: jit caches by
    function, not by these settings."""
    token = _OVERRIDE.set({**_OVERRIDE.get(), **kw})
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def overridden(name: str, default):
    return _OVERRIDE.get().get(name, default)


def default_query_tile(G: int, span: int) -> int:
    """Tokens per query tile when the caller gives none: 1 for token and block lists.

    H100 round 2 (notes: Round 2 outcomes): tiles > 1 lost on random block selections (G=16:
    T=4 1.5x slower forward, 2.1x fwd+bwd; G=4: T=8 1.4x slower) and won only the forward on
    strongly overlapping ones (G=16 correlated, T=4: 1.14x); pass ``query_tile`` for that case.
    """
    del G, span
    return 1


@dataclasses.dataclass(frozen=True)
class _Geometry:
    G: int
    Gp: int  # rows per token in the MMA (power of two; T * Gp >= 16)
    T: int
    D: int
    Dv: int
    Dp: int
    Dvp: int
    n: int  # slots per (tile) list
    Sq: int
    Hkv: int
    span: int
    n_units: int
    kv_len: int
    causal: bool
    scale: float

    @property
    def M(self):
        return self.T * self.Gp


def _padded_group(G: int, T: int) -> int:
    """MMA rows per token of a query-major program (power of two; T * Gp >= 16, a Triton dot's minimum)."""
    return max(common.next_pow2(G), 16 // T)


def _geometry(q, k, v, tiles: common.TileLists, span, causal, scale):
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, T = Hq // Hkv, tiles.T
    Gp = _padded_group(G, T)
    return _Geometry(G=G, Gp=Gp, T=T, D=D, Dv=Dv, Dp=max(16, common.next_pow2(D)),
                     Dvp=max(16, common.next_pow2(Dv)), n=tiles.idx.shape[-1], Sq=Sq, Hkv=Hkv, span=span,
                     n_units=Skv if span == 1 else common.cdiv(Skv, span), kv_len=Skv, causal=causal, scale=scale)


def _config(geo: _Geometry, backward: bool):
    """(BN, num_warps, num_stages). BN need not divide the block size: a chunk may straddle blocks."""
    width = max(geo.Dp, geo.Dvp)
    # H100 round 2 timed token lists at M=64, D=Dv=128 (DSA/MLA: G=64, T=1): forward BN=32 / 4 warps
    # 1.24 ms vs BN=64 and BN=128 1.68 ms; backward BN=32 / 4 warps 4.5 ms vs 8 warps 10.2 ms and
    # BN=64 / 8 warps 7.7 ms (ptxas: 255 registers at 4 warps, yet no spill). Other shapes keep the
    # round-1 rules below until timed.
    if geo.span == 1 and (geo.M, width) == (64, 128):
        if backward:
            return overridden("bwd_BN", 32), overridden("bwd_warps", 4), overridden("bwd_stages", 2)
        return overridden("BN", 32), overridden("num_warps", 4), overridden("num_stages", 2)
    # H100 round 7 (tune_indexed block_sweep; 16 x 64-token blocks, Skv=32K, D=Dv=128, one token per
    # program): block lists at G=64 and G=128 ran fastest with the token lists' BN=32 / 4 warps forward
    # (0.523 vs 0.539 ms at G=64; 0.990 vs 1.160 ms at G=128), and backward with BN=32 / 4 warps at
    # M=64 (fwd+bwd 2.80 vs 5.40 ms) and BN=64 / 8 warps at M=128 (4.76 vs 5.64 ms).
    if geo.span > 1 and geo.T == 1 and width == 128 and geo.M in (64, 128):
        if backward:
            bn, warps = (32, 4) if geo.M == 64 else (64, 8)
            return overridden("bwd_BN", bn), overridden("bwd_warps", warps), overridden("bwd_stages", 2)
        return overridden("BN", 32), overridden("num_warps", 4), overridden("num_stages", 2)
    bn = 64 if width <= 256 else 32
    if backward:
        bn = 32  # BN=64 spills at D=128 (ptxas sm_90a: dK, dV [BN, D] f32 live with dQ); H100 round 1: 1.6x
    warps = 8 if geo.M * width > 64 * 128 else 4  # H100 round 1, M=64: 8 warps ran the forward 1.5x slower
    if backward:
        # M=64, D=128: 4 warps need 255 registers (no margin), 8 warps 162 (ptxas sm_90a).
        warps = 8 if geo.M * width >= 64 * 128 else 4
        return overridden("bwd_BN", bn), overridden("bwd_warps", warps), overridden("bwd_stages", 2)
    return overridden("BN", bn), overridden("num_warps", warps), overridden("num_stages", 2)


class _Tile:
    """The M = T x Gp rows of one program: token, head, bit position, validity, absolute position."""

    def __init__(self, geo: _Geometry, i, off):
        r = jnp.arange(geo.M, dtype=jnp.int32)
        self.j, self.g = r // geo.Gp, r % geo.Gp
        self.tok = i * geo.T + self.j  # < nT * T: a row of the T-padded outputs
        self.ok = (self.tok < geo.Sq) & (self.g < geo.G)
        self.src = jnp.where(self.tok < geo.Sq, self.tok, 0)  # input row (inputs are not padded)
        self.t_abs = self.tok + off
        self.geo = geo

    def load(self, ref, width, real, other=0.0):
        cols = jnp.arange(width, dtype=jnp.int32)
        return plgpu.load(ref.at[self.src[:, None], self.g[:, None], cols[None, :]],
                          mask=self.ok[:, None] & (cols < real)[None, :], other=other)

    def load_row(self, ref, other):
        return plgpu.load(ref.at[self.src, self.g], mask=self.ok, other=other)

    def store(self, ref, val, real):
        cols = jnp.arange(val.shape[-1], dtype=jnp.int32)
        plgpu.store(ref.at[self.tok[:, None], self.g[:, None], cols[None, :]], val.astype(ref.dtype),
                    mask=self.ok[:, None] & (cols < real)[None, :])

    def store_row(self, ref, val):
        plgpu.store(ref.at[self.tok, self.g], val.astype(ref.dtype), mask=self.ok)

    def allowed(self, pos, ok, bits):
        """bool [M, BN]: key ``pos`` is a real key, listed by the row's token, not after it."""
        a = ok[None, :]
        if bits is not None:
            a &= (jnp.right_shift(bits[None, :], self.j[:, None]) & 1) != 0
        if self.geo.causal:
            a &= pos[None, :] <= self.t_abs[:, None]
        return a


def _chunk(geo: _Geometry, idx_ref, bits_ref, c, count, BN):
    """(pos [BN], ok [BN], bits [BN] or None) of chunk ``c`` of the tile's list."""
    def load_units(slots, in_range):
        return plgpu.load(idx_ref.at[slots], mask=in_range, other=-1)
    pos, ok, slots, in_range = common.chunk_positions(load_units, c, count, BN=BN, span=geo.span,
                                                      n_units=geo.n_units, kv_len=geo.kv_len)
    bits = None if bits_ref is None else plgpu.load(bits_ref.at[slots], mask=in_range, other=0)
    return pos, ok, bits


def _rows(ref, rows, width, real_width, mask):
    """Gather rows of a [S, width] ref view: [len(rows), width], zeros where ~mask or past real_width."""
    cols = jnp.arange(width, dtype=jnp.int32)
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask[:, None] & (cols < real_width)[None, :],
                      other=0.0)


def _split_refs(refs, has_bits):
    if has_bits:
        return refs
    return refs[:6] + (None,) + refs[6:]


def _program(geo: _Geometry, off_ref, count_ref, q_ref):
    """What a (query tile, batch x kv head) program of either pass starts from: its tile, the
    number of list units to walk, and the tile's query rows [M, Dp]."""
    i, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // geo.Hkv, bh % geo.Hkv
    tile = _Tile(geo, i, off_ref[b])
    return tile, jnp.minimum(count_ref[b, i, h], geo.n), tile.load(q_ref, geo.Dp, geo.D)


def _fwd_kernel(*refs, geo: _Geometry, BN: int):
    off_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, bits_ref, o_ref, lse_ref = _split_refs(refs, geo.T > 1)
    tile, count, q = _program(geo, off_ref, count_ref, q_ref)
    qk_scale = geo.scale * common.LOG2E

    def body(c, carry):
        acc, m, l = carry
        pos, ok, bits = _chunk(geo, idx_ref, bits_ref, c, count, BN)
        kc = _rows(k_ref, pos, geo.Dp, geo.D, ok)
        s = plgpu.dot(q, kc, trans_b=True) * qk_scale  # [M, BN], log2 units
        s = jnp.where(tile.allowed(pos, ok, bits), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        vc = _rows(v_ref, pos, geo.Dvp, geo.Dv, ok)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(vc.dtype), vc)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((geo.M, geo.Dvp), jnp.float32), jnp.full((geo.M,), -jnp.inf, jnp.float32),
            jnp.zeros((geo.M,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, common.num_chunks(count, BN=BN, span=geo.span), body, init)
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    tile.store(o_ref, acc / l_safe[:, None], geo.Dv)
    tile.store_row(lse_ref, jnp.where(has, (m + jnp.log2(l_safe)) * common.LN2, -jnp.inf))


def _bwd_kernel(*refs, geo: _Geometry, BN: int, relaxed: bool):
    refs = _split_refs(refs, geo.T > 1)
    off_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, bits_ref = refs[:7]
    do_ref, lse_ref, delta_ref, _, _, dq_ref, dk_ref, dv_ref = refs[7:]  # dk/dv inputs aliased with outputs
    tile, count, q = _program(geo, off_ref, count_ref, q_ref)
    do = tile.load(do_ref, geo.Dvp, geo.Dv)
    lse = tile.load_row(lse_ref, jnp.inf)
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * common.LOG2E)  # empty and padded rows: P = 0
    delta = tile.load_row(delta_ref, 0.0)
    qk_scale = geo.scale * common.LOG2E
    lanes = jnp.arange(BN, dtype=jnp.int32)
    dcols = jnp.arange(geo.Dp, dtype=jnp.int32)
    dvcols = jnp.arange(geo.Dvp, dtype=jnp.int32)

    def body(c, dq):
        pos, ok, bits = _chunk(geo, idx_ref, bits_ref, c, count, BN)
        kc = _rows(k_ref, pos, geo.Dp, geo.D, ok)
        vc = _rows(v_ref, pos, geo.Dvp, geo.Dv, ok)
        s = plgpu.dot(q, kc, trans_b=True) * qk_scale
        p = jnp.where(tile.allowed(pos, ok, bits), jnp.exp2(s - lse2[:, None]), 0.0)  # [M, BN]
        dp = plgpu.dot(do, vc, trans_b=True)
        ds = p * (dp - delta[:, None])
        dq = dq + plgpu.dot(ds.astype(kc.dtype), kc)
        dk = plgpu.dot(ds.astype(q.dtype), q, trans_a=True) * geo.scale  # [BN, Dp]
        dv = plgpu.dot(p.astype(do.dtype), do, trans_a=True)  # [BN, Dvp]
        rows = jnp.where(ok, pos, geo.kv_len + lanes)  # masked lanes add zeros to their own spare row
        _compat.triton_atomic_add(dk_ref, (rows[:, None], dcols[None, :]), dk, relaxed=relaxed)
        _compat.triton_atomic_add(dv_ref, (rows[:, None], dvcols[None, :]), dv, relaxed=relaxed)
        return dq

    dq = jax.lax.fori_loop(0, common.num_chunks(count, BN=BN, span=geo.span), body,
                           jnp.zeros((geo.M, geo.Dp), jnp.float32))
    tile.store(dq_ref, dq * geo.scale, geo.D)


def _specs(geo: _Geometry, Sq_rows: int, Skv: int, n: int):
    """BlockSpecs over (query tile i, batch x kv head bh)."""
    Hkv = geo.Hkv
    tok = lambda width: pl.BlockSpec((None, Sq_rows, None, geo.Gp, width), lambda i, bh: (bh // Hkv, 0, bh % Hkv, 0, 0))
    tok1 = pl.BlockSpec((None, Sq_rows, None, geo.Gp), lambda i, bh: (bh // Hkv, 0, bh % Hkv, 0))
    kv = lambda rows, width: pl.BlockSpec((None, rows, None, width), lambda i, bh: (bh // Hkv, 0, bh % Hkv, 0))
    lst = pl.BlockSpec((None, None, None, n), lambda i, bh: (bh // Hkv, i, bh % Hkv, 0))
    return tok, tok1, kv, lst


def _list_args(tiles: common.TileLists, lst):
    if tiles.bits is None:
        return [lst], [tiles.idx]
    return [lst, lst], [tiles.idx, tiles.bits]


# Rows per query-major program (T tokens x Gp padded heads). H100 round 7: G=128 at T=8 (1024 rows)
# asked for 328 KB of shared memory (the SM has 227 KB) and failed at run time; 512 rows compiled.
MAX_TILE_ROWS = 512


def _tiles(lists, span, G, query_tile):
    T = default_query_tile(G, span) if query_tile is None else int(query_tile)
    rows = T * _padded_group(G, T)
    if rows > MAX_TILE_ROWS:
        raise ValueError(f"query_tile={T} with {G} query heads per kv head gives {rows} rows per program; the "
                         f"Triton kernel takes at most {MAX_TILE_ROWS} (query_tile <= "
                         f"{max(1, MAX_TILE_ROWS // common.next_pow2(G))} here)")
    return common.tile_lists(lists, T)


def forward_query_major(q, k, v, lists: common.Lists, q_off, *, span: int, scale: float, causal: bool,
                        query_tile: int | None = None, interpret: bool = False):
    """o [B, Sq, Hq, Dv] (q.dtype), lse f32 [B, Sq, Hq] (natural log; -inf for empty rows)."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    tiles = _tiles(lists, span, Hq // Hkv, query_tile)
    geo = _geometry(q, k, v, tiles, span, causal, scale)
    BN, warps, stages = _config(geo, backward=False)
    nT = tiles.idx.shape[1]
    Sq_rows = nT * geo.T
    tok, tok1, kv, lst = _specs(geo, Sq_rows, Skv, geo.n)
    q_spec = pl.BlockSpec((None, Sq, None, geo.Gp, geo.Dp), lambda i, bh: (bh // Hkv, 0, bh % Hkv, 0, 0))
    list_specs, list_arrays = _list_args(tiles, lst)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo, BN=BN), grid=(nT, B * Hkv),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_spec, kv(Skv, geo.Dp), kv(Skv, geo.Dvp), *list_specs],
        out_specs=[tok(geo.Dvp), tok1],
        out_shape=[jax.ShapeDtypeStruct((B, Sq_rows, Hkv, geo.G, Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, Sq_rows, Hkv, geo.G), jnp.float32)],
        compiler_params=_compat.triton_compiler_params(num_warps=warps, num_stages=stages),
        interpret=interpret, name="indexed_attention_fwd",
    )(q_off, tiles.count, q.reshape(B, Sq, Hkv, geo.G, D), k, v, *list_arrays)
    return o[:, :Sq].reshape(B, Sq, Hq, Dv), lse[:, :Sq].reshape(B, Sq, Hq)


# Query heads per kv head one backward program takes at one token per program. H100 (2026-11-23):
# G=256 asked for 311 KB of shared memory (the SM has 227 KB); G=128 runs. Larger groups are split
# into head chunks that accumulate into the same dK/dV buffers.
BWD_MAX_GROUP = 128


def _backward_pass(q, k, v, o, lse, do, tiles: common.TileLists, q_off, acc, *, span, scale, causal, interpret):
    """One backward launch: dq [B, Sq, Hq, D] (q.dtype) and the float32 dK/dV accumulators
    ``acc`` (None: fresh zeros; [B, Skv + BN, Hkv, Dp] and [.., Dvp]) with this launch's atomics added."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    geo = _geometry(q, k, v, tiles, span, causal, scale)
    BN, warps, stages = _config(geo, backward=True)
    nT = tiles.idx.shape[1]
    Sq_rows = nT * geo.T
    G = geo.G
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, Sq, Hq]
    tok, tok1, kv, lst = _specs(geo, Sq_rows, Skv, geo.n)
    in_tok = lambda width: pl.BlockSpec((None, Sq, None, geo.Gp, width), lambda i, bh: (bh // Hkv, 0, bh % Hkv, 0, 0))
    in_tok1 = pl.BlockSpec((None, Sq, None, geo.Gp), lambda i, bh: (bh // Hkv, 0, bh % Hkv, 0))
    rows = Skv + BN  # BN spare rows take the masked lanes' atomics
    if acc is None:  # Dp columns: no padded block past the array
        acc = (jnp.zeros((B, rows, Hkv, geo.Dp), jnp.float32), jnp.zeros((B, rows, Hkv, geo.Dvp), jnp.float32))
    dk0, dv0 = acc
    list_specs, list_arrays = _list_args(tiles, lst)
    dk_arg = 8 + len(list_arrays)  # off, count, q, k, v, lists..., do, lse, delta, dk0, dv0
    kernel = functools.partial(_bwd_kernel, geo=geo, BN=BN, relaxed=overridden("relaxed_atomics", True))
    dq, dk, dv = pl.pallas_call(
        kernel, grid=(nT, B * Hkv),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), in_tok(geo.Dp), kv(Skv, geo.Dp), kv(Skv, geo.Dvp), *list_specs,
                  in_tok(geo.Dvp), in_tok1, in_tok1, kv(rows, geo.Dp), kv(rows, geo.Dvp)],
        out_specs=[tok(geo.Dp), kv(rows, geo.Dp), kv(rows, geo.Dvp)],
        out_shape=[jax.ShapeDtypeStruct((B, Sq_rows, Hkv, G, D), q.dtype),
                   jax.ShapeDtypeStruct(dk0.shape, jnp.float32), jax.ShapeDtypeStruct(dv0.shape, jnp.float32)],
        input_output_aliases={dk_arg: 1, dk_arg + 1: 2},
        compiler_params=_compat.triton_compiler_params(num_warps=warps, num_stages=stages),
        interpret=interpret, name="indexed_attention_bwd",
    )(q_off, tiles.count, q.reshape(B, Sq, Hkv, G, D), k, v, *list_arrays, do.reshape(B, Sq, Hkv, G, Dv),
      lse.reshape(B, Sq, Hkv, G), delta.reshape(B, Sq, Hkv, G), dk0, dv0)
    return dq[:, :Sq].reshape(B, Sq, Hq, D), (dk, dv)


def _head_chunk(G: int, T: int) -> int:
    """Heads per backward launch: G, or (one token per program, G > BWD_MAX_GROUP) the largest
    divisor of G that fits."""
    if T > 1 or G <= BWD_MAX_GROUP:
        return G
    return max(c for c in range(1, BWD_MAX_GROUP + 1) if G % c == 0)


def backward_query_major(q, k, v, o, lse, do, lists: common.Lists, q_off, *, span: int, scale: float,
                         causal: bool, query_tile: int | None = None, interpret: bool = False):
    """(dq, dk, dv) in the input dtypes; lse f32 [B, Sq, Hq] from the forward."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    tiles = _tiles(lists, span, G, query_tile)
    chunk = _head_chunk(G, tiles.T)

    def part(x, c):  # heads c*chunk .. of every kv head's group, as a problem with `chunk` heads per kv head
        x = x.reshape(B, Sq, Hkv, G, *x.shape[3:])[:, :, :, c * chunk:(c + 1) * chunk]
        return x.reshape(B, Sq, Hkv * chunk, *x.shape[4:])

    acc, dqs = None, []
    for c in range(G // chunk):
        args = (q, k, v, o, lse, do) if chunk == G else (part(q, c), k, v, part(o, c), part(lse, c), part(do, c))
        dq, acc = _backward_pass(*args, tiles, q_off, acc, span=span, scale=scale, causal=causal,
                                 interpret=interpret)
        dqs.append(dq.reshape(B, Sq, Hkv, chunk, D))
    dk, dv = acc
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)
    return (dq.reshape(B, Sq, Hq, D), dk[:, :Skv, :, :D].astype(k.dtype), dv[:, :Skv, :, :Dv].astype(v.dtype))


FWD_IMPL_ENV = "SPARSE_JAX_GPU_INDEXED_FWD"


def forward_impl(q, k, v, *, span, interpret) -> str:
    """'mosaic_gpu' or 'triton': which kernel runs a forward.

    Block lists may run the Mosaic GPU kernel (:mod:`pallas_kernels.mosaic_gpu.indexed_block_fwd`:
    TMA block copies, query-major with its own query tiles below 64 heads per kv head) whatever the
    loop order: both loops return the same (o, lse), and ``loop_order`` / ``query_tile`` then pick
    the Triton backward. ``SPARSE_JAX_GPU_INDEXED_FWD`` = ``auto`` (default: Mosaic GPU on Hopper
    when it takes the problem), ``triton`` or ``mosaic_gpu``. Token lists, interpret mode and
    Triton launch overrides (``config_override``) run Triton.
    """
    force = interpret or span == 1 or bool(_OVERRIDE.get())
    return mgpu_dispatch.choose(FWD_IMPL_ENV, lambda: mgpu_indexed.unsupported(q, k, v, span=span),
                                force_triton=force)


def forward(q, k, v, lists, q_off, *, span, scale, causal, loop_order=common.QUERY_MAJOR, query_tile=None,
            interpret=False):
    """Dispatch on ``loop_order`` ("query" for any list, "kv" for block lists) and, for block lists on
    Hopper, to the Mosaic GPU forward (:func:`forward_impl`)."""
    if forward_impl(q, k, v, span=span, interpret=interpret) == "mosaic_gpu":
        return mgpu_indexed.forward(q, k, v, lists, q_off, span=span, scale=scale, causal=causal)
    if loop_order == common.KV_MAJOR:
        from pallas_kernels.triton import indexed_block_kv_major as kv_major
        return kv_major.forward(q, k, v, lists, q_off, block_size=span, scale=scale, causal=causal,
                                interpret=interpret)
    return forward_query_major(q, k, v, lists, q_off, span=span, scale=scale, causal=causal, query_tile=query_tile,
                               interpret=interpret)


def backward(q, k, v, o, lse, do, lists, q_off, *, span, scale, causal, loop_order=common.QUERY_MAJOR,
             query_tile=None, interpret=False):
    if loop_order == common.KV_MAJOR:
        from pallas_kernels.triton import indexed_block_kv_major as kv_major
        return kv_major.backward(q, k, v, o, lse, do, lists, q_off, block_size=span, scale=scale, causal=causal,
                                 interpret=interpret)
    return backward_query_major(q, k, v, o, lse, do, lists, q_off, span=span, scale=scale, causal=causal,
                                query_tile=query_tile, interpret=interpret)
