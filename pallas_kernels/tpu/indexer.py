"""Lightning-indexer kernels on TPUs (Pallas -> Mosaic); same contract as ``pallas_kernels.triton.indexer``.

:func:`tile_candidates` works on transposed tiles, keys on sublanes and queries on
lanes: ``S^T = k_tile @ q_h^T`` is [BK, BQ], the per-query head weight is then a lane
row that broadcasts over sublanes, and the per-query top-c picks reduce over
sublanes. Heads are a loop of MXU matmuls (BK x Di x BQ each).

:func:`list_scores` runs one grid step per query: the query's Hi heads are the
matmul rows; listed key tiles arrive by DMA (keys are zero-padded to whole tiles
when ``Skv`` is ragged, so every copy stays in bounds).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import indexed as common
from sparse_jax import _compat


def _interpret(interpret):
    return _compat.tpu_interpret_params() if interpret is True else (interpret or False)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _tile_kernel(t_ref, q_ref, k_ref, w_ref, vals_ref, idx_ref, *, Hi, Skv, BK, c, causal):
    j = pl.program_id(2)
    BQ = q_ref.shape[1]
    kt = k_ref[...]
    keys = j * BK + jax.lax.broadcasted_iota(jnp.int32, (BK, BQ), 0)
    allowed = keys < Skv
    if causal:
        allowed &= keys <= t_ref[...]  # [1, BQ] query positions
    live = j * BK < Skv
    if causal:
        live &= jnp.max(t_ref[...]) >= j * BK
    n_heads = jnp.where(live, Hi, 0)

    def head(h, acc):
        st = jax.lax.dot_general(kt, q_ref[h], (((1,), (1,)), ((), ())), precision=_precision(kt.dtype),
                                 preferred_element_type=jnp.float32)  # [BK, BQ]
        return acc + jnp.maximum(st, 0.0) * w_ref[pl.ds(h, 1), :].astype(jnp.float32)

    s = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((BK, BQ), jnp.float32))
    s = jnp.where(allowed, s, -jnp.inf)
    if c == BK:
        vals_ref[...] = s
        idx_ref[...] = keys
        return
    row = jax.lax.broadcasted_iota(jnp.int32, (BK, BQ), 0)

    def pick(r, s):  # r-th best key per query (lane): the lowest index among the maxima
        m = jnp.max(s, axis=0, keepdims=True)
        am = jnp.min(jnp.where(s == m, row, BK), axis=0, keepdims=True)
        vals_ref[pl.ds(r, 1), :] = m
        idx_ref[pl.ds(r, 1), :] = j * BK + am
        return jnp.where(row == am, -jnp.inf, s)

    jax.lax.fori_loop(0, c, pick, s)


def tile_candidates(q, k, w, t_abs, *, tile: int, cands: int, causal: bool, interpret=False):
    """See :func:`pallas_kernels.triton.indexer.tile_candidates`."""
    B, Sq, Hi, Di = q.shape
    Skv = k.shape[1]
    BK, c = tile, cands
    nT = common.cdiv(Skv, BK)
    BQ = 128 if Sq > 128 else common.cdiv(Sq, 8) * 8
    Sqp = common.cdiv(Sq, BQ) * BQ
    pad = Sqp - Sq
    qt = jnp.pad(jnp.transpose(q, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))  # [B, Hi, Sqp, Di]
    wt = jnp.pad(jnp.transpose(w, (0, 2, 1)), ((0, 0), (0, 0), (0, pad)))  # [B, Hi, Sqp]
    tt = jnp.pad(t_abs, ((0, 0), (0, pad)), constant_values=-1)[:, None, :]  # [B, 1, Sqp]
    if Skv < BK:  # one ragged tile shorter than a block: pad the keys (masked by position)
        k = jnp.pad(k, ((0, 0), (0, BK - Skv), (0, 0)))
    kernel = functools.partial(_tile_kernel, Hi=Hi, Skv=Skv, BK=BK, c=c, causal=causal)
    out = pl.BlockSpec((None, None, c, BQ), lambda b, i, j: (b, j, 0, i))
    vals, idx = pl.pallas_call(
        kernel, grid=(B, Sqp // BQ, nT),
        in_specs=[pl.BlockSpec((None, 1, BQ), lambda b, i, j: (b, 0, i)),
                  pl.BlockSpec((None, Hi, BQ, Di), lambda b, i, j: (b, 0, i, 0)),
                  pl.BlockSpec((None, BK, Di), lambda b, i, j: (b, j, 0)),
                  pl.BlockSpec((None, Hi, BQ), lambda b, i, j: (b, 0, i))],
        out_specs=[out, out],
        out_shape=[jax.ShapeDtypeStruct((B, nT, c, Sqp), jnp.float32),
                   jax.ShapeDtypeStruct((B, nT, c, Sqp), jnp.int32)],
        compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "parallel")),
        interpret=_interpret(interpret), name="lightning_indexer_tiles",
    )(tt, qt, k, wt)
    tr = lambda x: jnp.transpose(x, (0, 3, 1, 2))[:, :Sq]
    return tr(vals), tr(idx)


def _list_kernel(meta_ref, tiles_ref, q_ref, w_ref, k_hbm, out_ref, kbuf, sem, *, Skv, BK, causal):
    b = pl.program_id(0)
    count, t_abs = meta_ref[0, 0], meta_ref[0, 1]
    q, w = q_ref[...], w_ref[...].astype(jnp.float32)
    out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (1, BK), 1)

    def body(e, carry):
        u = tiles_ref[0, e]
        start = jnp.maximum(u, 0) * BK
        copy = pltpu.make_async_copy(k_hbm.at[b, pl.ds(start, BK)], kbuf, sem)
        copy.start()
        copy.wait()
        s = jax.lax.dot_general(q, kbuf[...], (((1,), (1,)), ((), ())), precision=_precision(q.dtype),
                                preferred_element_type=jnp.float32)  # [Hi, BK]
        s = jnp.sum(jnp.maximum(s, 0.0) * w, axis=0, keepdims=True)  # [1, BK]
        pos = start + lanes
        ok = (u >= 0) & (pos < Skv)
        if causal:
            ok &= pos <= t_abs
        out_ref[pl.ds(e, 1), :] = jnp.where(ok, s, -jnp.inf)
        return carry

    jax.lax.fori_loop(0, count, body, 0)


def list_scores(q, k, w, t_abs, tiles, count, *, tile: int, causal: bool, interpret=False):
    """See :func:`pallas_kernels.triton.indexer.list_scores`."""
    B, Sq, Hi, Di = q.shape
    Skv, E = k.shape[1], tiles.shape[-1]
    BK = tile
    if Skv % BK:  # keep every tile's DMA window inside the array
        k = jnp.pad(k, ((0, 0), (0, common.cdiv(Skv, BK) * BK - Skv), (0, 0)))
    meta = jnp.stack([count, t_abs], axis=-1)[:, :, None, :]  # [B, Sq, 1, 2]
    kernel = functools.partial(_list_kernel, Skv=Skv, BK=BK, causal=causal)
    smem = lambda shape: pl.BlockSpec((None, None) + shape, lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM)
    return pl.pallas_call(
        kernel, grid=(B, Sq),
        in_specs=[smem((1, 2)), smem((1, E)),
                  pl.BlockSpec((None, None, Hi, Di), lambda b, t: (b, t, 0, 0)),
                  pl.BlockSpec((None, None, Hi, 1), lambda b, t: (b, t, 0, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, None, E, BK), lambda b, t: (b, t, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Sq, E, BK), jnp.float32),
        scratch_shapes=[pltpu.VMEM((BK, Di), k.dtype), pltpu.SemaphoreType.DMA],
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary")),
        interpret=_interpret(interpret), name="lightning_indexer_lists",
    )(meta, tiles[:, :, None, :], q, w[..., None], k)
