"""Indexed attention on TPUs (Pallas -> Mosaic): token lists and block lists, query-major loop.

Grid ``(B, Hkv, Sq)``: one step per (query token, kv head); the group's G query heads
are the rows of every matmul. A step walks its row's list in chunks of ``BN`` key
rows that it gathers itself from HBM by DMA into a double-buffered VMEM tile:

* token lists (``span == 1``): one row DMA per listed key (``BN = 128`` rows per
  chunk). A one-hot matmul gather would cost ``Skv / D`` times the attention's own
  FLOPs per key (about 250x at 32K keys), so DMA it is; a masked lane re-reads row 0;
* block lists (``span`` = block size): one DMA of the block's rows per chunk; the
  last, ragged block is read from ``Skv - span`` so the copy stays in bounds and
  the rows before the block are masked.

The list itself reaches SMEM as a pipelined per-step block (and once more in VMEM as
a lane vector for the token masks) rather than one scalar-prefetched table: lists
of 4K tokens x 16 blocks x 8 kv heads are 2 MiB, twice the SMEM of v5e/v6e.

Backward: the same walk recomputes P, keeps dQ in registers, and adds dK/dV rows into
float32 HBM accumulators by read-modify-write DMAs. The token axis is "arbitrary"
(sequential on one core) and every chunk waits for its write-back before the next
read, so updates never race and the result is deterministic. Masked token lanes
read-modify-write their own spare row past ``Skv``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import indexed as common
from sparse_jax import _compat

_TOKEN_BN = 128


def _interpret(interpret):
    """``interpret=True`` -> TPU interpret mode with race detection and NaN-filled memory."""
    return _compat.tpu_interpret_params() if interpret is True else (interpret or False)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract, dtype):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_precision(dtype),
                               preferred_element_type=jnp.float32)


class _Walk:
    """Chunk geometry and DMAs of one step's list (shared by forward and backward)."""

    def __init__(self, *, span, BN, kv_len, n_units, causal, b, h, t_abs, count, idx_s, idx_v):
        self.span, self.BN, self.kv_len, self.n_units, self.causal = span, BN, kv_len, n_units, causal
        self.b, self.h, self.t_abs, self.count = b, h, t_abs, count
        self.idx_s, self.idx_v = idx_s, idx_v  # SMEM and VMEM [1, n_pad] copies of the row

    @property
    def num_chunks(self):
        return common.num_chunks(self.count, BN=self.BN, span=self.span)

    def _unit(self, slot):
        u = self.idx_s[0, slot]
        return jnp.where((slot < self.count) & (u >= 0) & (u < self.n_units), u, -1)

    def rows(self, c, lane):
        """Source row of lane ``lane`` (a scalar) of chunk ``c``: tokens only."""
        u = self._unit(c * self.BN + lane)
        return jnp.where(u >= 0, u, 0), u >= 0

    def block_start(self, c):
        """First row of the DMA window of chunk ``c`` (block lists; one block per chunk)."""
        u = self._unit(c)
        return jnp.maximum(jnp.minimum(jnp.maximum(u, 0) * self.span, self.kv_len - self.span), 0), u

    def allowed(self, c):
        """(positions int32 [1, BN], allowed bool [1, BN]) of the chunk's buffer lanes."""
        lanes = jax.lax.broadcasted_iota(jnp.int32, (1, self.BN), 1)
        if self.span == 1:
            units = self.idx_v[:, pl.ds(pl.multiple_of(c * self.BN, self.BN), self.BN)]
            slot = c * self.BN + lanes
            pos = units
            ok = (slot < self.count) & (units >= 0) & (units < self.n_units)
        else:
            start, u = self.block_start(c)
            pos = start + lanes
            ok = (u >= 0) & (pos >= u * self.span) & (pos < u * self.span + self.span)
        ok &= common.key_allowed(pos, self.t_abs, kv_len=self.kv_len, causal=self.causal)
        return pos, ok


def _row_copies(walk, c, srcs, dsts, sem, *, spare=None):
    """DMA descriptors for chunk ``c``: list over lanes (tokens) or one (blocks).

    srcs/dsts: HBM refs [B, S, Hkv, W] and VMEM views [BN, W]; with ``spare`` (a row
    number) masked token lanes use row ``spare + lane`` instead of row 0.
    """
    if walk.span == 1:
        def make(lane):
            row, ok = walk.rows(c, lane)
            if spare is not None:
                row = jnp.where(ok, row, spare + lane)
            return [pltpu.make_async_copy(s.at[walk.b, pl.ds(row, 1), walk.h], d.at[pl.ds(lane, 1)], sem)
                    for s, d in zip(srcs, dsts)]
        return make
    start, _ = walk.block_start(c)
    return [pltpu.make_async_copy(s.at[walk.b, pl.ds(start, walk.BN), walk.h], d, sem) for s, d in zip(srcs, dsts)]


def _run_copies(walk, descs, action):
    """Start or wait all descriptors of a chunk (``action`` is "start" or "wait")."""
    if walk.span == 1:
        def body(lane, carry):
            for d in descs(lane):
                getattr(d, action)()
            return carry
        jax.lax.fori_loop(0, walk.BN, body, 0)
    else:
        for d in descs:
            getattr(d, action)()


def _walk(off_ref, count_ref, idx_s, idx_v, *, span, BN, kv_len, causal):
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n_units = kv_len if span == 1 else common.cdiv(kv_len, span)
    return _Walk(span=span, BN=BN, kv_len=kv_len, n_units=n_units, causal=causal, b=b, h=h,
                 t_abs=t + off_ref[b], count=count_ref[0, 0], idx_s=idx_s, idx_v=idx_v)


def _fwd_kernel(off_ref, count_ref, idx_s, idx_v, q_ref, k_hbm, v_hbm, o_ref, lse_ref, kbuf, vbuf, sem, *, span,
                BN, kv_len, causal, scale):
    walk = _walk(off_ref, count_ref, idx_s, idx_v, span=span, BN=BN, kv_len=kv_len, causal=causal)
    q = q_ref[...]
    G, Dv = o_ref.shape

    def descs(c, slot):
        return _row_copies(walk, c, (k_hbm, v_hbm), (kbuf.at[slot], vbuf.at[slot]), sem.at[slot])

    n_chunks = walk.num_chunks

    @pl.when(n_chunks > 0)
    def _():
        _run_copies(walk, descs(0, 0), "start")

    def body(c, carry):
        acc, m, l = carry
        slot = jax.lax.rem(c, 2)

        @pl.when(c + 1 < n_chunks)
        def _():
            _run_copies(walk, descs(c + 1, 1 - slot), "start")

        _run_copies(walk, descs(c, slot), "wait")
        _, ok = walk.allowed(c)
        s = _dot(q, kbuf[slot], ((1,), (1,)), q.dtype) * scale  # [G, BN]
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use)
        vc = vbuf[slot]
        acc = acc * alpha + _dot(p.astype(vc.dtype), vc, ((1,), (0,)), vc.dtype)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True)

    init = (jnp.zeros((G, Dv), jnp.float32), jnp.full((G, 1), -jnp.inf, jnp.float32),
            jnp.zeros((G, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, n_chunks, body, init)
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)


def _bwd_kernel(off_ref, count_ref, idx_s, idx_v, q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, dk_in, dv_in,
                dq_ref, dk_hbm, dv_hbm, kbuf, vbuf, dkbuf, dvbuf, sem, *, span, BN, kv_len, causal, scale):
    del dk_in, dv_in  # aliased with dk_hbm / dv_hbm
    walk = _walk(off_ref, count_ref, idx_s, idx_v, span=span, BN=BN, kv_len=kv_len, causal=causal)
    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # empty rows: P = 0
    delta = delta_ref[...]
    spare = kv_len if span == 1 else None

    def body(c, dq):
        reads = _row_copies(walk, c, (k_hbm, v_hbm), (kbuf, vbuf), sem.at[0])
        acc_reads = _row_copies(walk, c, (dk_hbm, dv_hbm), (dkbuf, dvbuf), sem.at[1], spare=spare)
        _run_copies(walk, reads, "start")
        _run_copies(walk, acc_reads, "start")
        _run_copies(walk, reads, "wait")
        _run_copies(walk, acc_reads, "wait")
        _, ok = walk.allowed(c)
        kc, vc = kbuf[...], vbuf[...]
        s = _dot(q, kc, ((1,), (1,)), q.dtype) * scale
        p = jnp.where(ok, jnp.exp(s - lse), 0.0)  # [G, BN]
        dp = _dot(do, vc, ((1,), (1,)), do.dtype)
        ds = p * (dp - delta)
        dkbuf[...] += _dot(ds.astype(q.dtype), q, ((0,), (0,)), q.dtype) * scale
        dvbuf[...] += _dot(p.astype(do.dtype), do, ((0,), (0,)), do.dtype)
        writes = _write_copies(walk, c, (dkbuf, dvbuf), (dk_hbm, dv_hbm), sem.at[2], spare=spare)
        _run_copies(walk, writes, "start")
        _run_copies(walk, writes, "wait")
        return dq + _dot(ds.astype(kc.dtype), kc, ((1,), (0,)), kc.dtype)

    dq = jax.lax.fori_loop(0, walk.num_chunks, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _write_copies(walk, c, srcs, dsts, sem, *, spare=None):
    """VMEM [BN, W] -> HBM [B, S, Hkv, W] rows (the inverse of :func:`_row_copies`)."""
    if walk.span == 1:
        def make(lane):
            row, ok = walk.rows(c, lane)
            row = jnp.where(ok, row, spare + lane)
            return [pltpu.make_async_copy(s.at[pl.ds(lane, 1)], d.at[walk.b, pl.ds(row, 1), walk.h], sem)
                    for s, d in zip(srcs, dsts)]
        return make
    start, _ = walk.block_start(c)
    return [pltpu.make_async_copy(s, d.at[walk.b, pl.ds(start, walk.BN), walk.h], sem) for s, d in zip(srcs, dsts)]


def _geometry(q, k, v, lists, span):
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, n = Hq // Hkv, lists.idx.shape[-1]
    if span == 1:
        # Short lists fit one chunk (the lane slice is then the whole row, any multiple of 8).
        BN = _TOKEN_BN if n > _TOKEN_BN else common.cdiv(n, 8) * 8
        n_pad = common.cdiv(n, BN) * BN
    else:
        if Skv < span:
            raise ValueError(f"mosaic_tpu indexed_block_attention needs kv_len ({Skv}) >= block_size ({span})")
        BN, n_pad = span, n
    idx = lists.idx if n_pad == n else jnp.pad(lists.idx, ((0, 0),) * 3 + ((0, n_pad - n),), constant_values=-1)
    return B, Sq, Hq, D, Skv, Hkv, Dv, G, BN, n_pad, idx


def _list_specs(n_pad):
    return [
        pl.BlockSpec((None, None, None, 1, 1), lambda b, h, t, off: (b, t, h, 0, 0), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, None, 1, n_pad), lambda b, h, t, off: (b, t, h, 0, 0), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, None, 1, n_pad), lambda b, h, t, off: (b, t, h, 0, 0)),
    ]


def _row_spec(*tail):
    return pl.BlockSpec((None, None, None) + tail, lambda b, h, t, off: (b, t, h) + (0,) * len(tail))


def forward(q, k, v, lists: common.Lists, q_off, *, span: int, scale: float, causal: bool,
            loop_order: str = common.QUERY_MAJOR, query_tile: int | None = None, interpret=False):
    """o [B, Sq, Hq, Dv] (q.dtype), lse f32 [B, Sq, Hq]. ``query_tile`` is ignored: one token per grid step."""
    del query_tile
    if loop_order != common.QUERY_MAJOR:
        raise ValueError("mosaic_tpu indexed attention runs the query-major loop only")
    B, Sq, Hq, D, Skv, Hkv, Dv, G, BN, n_pad, idx = _geometry(q, k, v, lists, span)
    kernel = functools.partial(_fwd_kernel, span=span, BN=BN, kv_len=Skv, causal=causal, scale=scale)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, Hkv, Sq),
            in_specs=[*_list_specs(n_pad), _row_spec(G, D), pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[_row_spec(G, Dv), _row_spec(G, 1)],
            scratch_shapes=[pltpu.VMEM((2, BN, D), k.dtype), pltpu.VMEM((2, BN, Dv), v.dtype),
                            pltpu.SemaphoreType.DMA((2,))]),
        out_shape=[jax.ShapeDtypeStruct((B, Sq, Hkv, G, Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, Sq, Hkv, G, 1), jnp.float32)],
        compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "parallel")),
        interpret=_interpret(interpret), name="indexed_attention_fwd",
    )(q_off, lists.count[..., None, None], idx[:, :, :, None, :], idx[:, :, :, None, :], q.reshape(B, Sq, Hkv, G, D), k, v)
    return o.reshape(B, Sq, Hq, Dv), lse.reshape(B, Sq, Hq)


def backward(q, k, v, o, lse, do, lists: common.Lists, q_off, *, span: int, scale: float, causal: bool,
             loop_order: str = common.QUERY_MAJOR, query_tile: int | None = None, interpret=False):
    """(dq, dk, dv); dK/dV accumulate in float32 HBM buffers, deterministically (``query_tile`` ignored)."""
    del query_tile
    if loop_order != common.QUERY_MAJOR:
        raise ValueError("mosaic_tpu indexed attention runs the query-major loop only")
    B, Sq, Hq, D, Skv, Hkv, Dv, G, BN, n_pad, idx = _geometry(q, k, v, lists, span)
    rows = Skv + BN if span == 1 else Skv
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    dk0 = jnp.zeros((B, rows, Hkv, D), jnp.float32)
    dv0 = jnp.zeros((B, rows, Hkv, Dv), jnp.float32)
    kernel = functools.partial(_bwd_kernel, span=span, BN=BN, kv_len=Skv, causal=causal, scale=scale)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    dq, dk, dv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, Hkv, Sq),
            in_specs=[*_list_specs(n_pad), _row_spec(G, D), _row_spec(G, Dv), _row_spec(G, 1), _row_spec(G, 1),
                      any_spec, any_spec, any_spec, any_spec],
            out_specs=[_row_spec(G, D), any_spec, any_spec],
            scratch_shapes=[pltpu.VMEM((BN, D), k.dtype), pltpu.VMEM((BN, Dv), v.dtype),
                            pltpu.VMEM((BN, D), jnp.float32), pltpu.VMEM((BN, Dv), jnp.float32),
                            pltpu.SemaphoreType.DMA((3,))]),
        out_shape=[jax.ShapeDtypeStruct((B, Sq, Hkv, G, D), q.dtype), jax.ShapeDtypeStruct(dk0.shape, jnp.float32),
                   jax.ShapeDtypeStruct(dv0.shape, jnp.float32)],
        input_output_aliases={10: 1, 11: 2},
        compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="indexed_attention_bwd",
    )(q_off, lists.count[..., None, None], idx[:, :, :, None, :], idx[:, :, :, None, :], q.reshape(B, Sq, Hkv, G, D), do.reshape(B, Sq, Hkv, G, Dv),
      lse.reshape(B, Sq, Hkv, G, 1), delta.reshape(B, Sq, Hkv, G, 1), k, v, dk0, dv0)
    return dq.reshape(B, Sq, Hq, D), dk[:, :Skv].astype(k.dtype), dv[:, :Skv].astype(v.dtype)
