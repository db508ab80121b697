"""Decode expert kernels (one token's k experts by id) lowered through Mosaic TPU.

The two passes of :mod:`pallas_kernels.common.decode_plan`, with the expert ids (and
the routing weights) scalar-prefetched so each weight block's index map reads its
assignment's expert: no sort, no group schedule. A TPU core walks its grid in order, so
the contractions are grid reductions into VMEM accumulators instead of split partials:

1. grid (N, F/tn, D/tk): h[a] = silu(x[t] @ w_gate[id]) * (x[t] @ w_up[id]), x.dtype.
2. grid (T, D/tn, k, F/tf): y[t] = sum_j w[t, j] * h[t, j] @ w_down[id], float32.

A ragged last contraction block is zeroed in both operands (the gmm kernels' rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.decode_plan import DecodeTiles
from sparse_jax import _compat

TILES = DecodeTiles(tn=512, tk=512)


def _masked(row, ws, k0, K):
    """Zero the contraction positions >= K of row [1, tk] and of each w [tk, tn] in ``ws``
    (ragged last block)."""
    if K % row.shape[1] == 0:
        return row, ws
    kr = k0 + lax.broadcasted_iota(jnp.int32, row.shape, 1)
    kw = k0 + lax.broadcasted_iota(jnp.int32, ws[0].shape, 0)
    return jnp.where(kr < K, row, 0), [jnp.where(kw < K, w, 0) for w in ws]


def gate_up(x, ids, w_gate, w_up, *, top_k: int, tiles: DecodeTiles = TILES, interpret=False):
    """h [N, 1, F] (x.dtype) = silu(x[a // k] @ w_gate[ids[a]]) * (x[a // k] @ w_up[ids[a]])."""
    T, D = x.shape
    N, F = ids.shape[0], w_gate.shape[2]
    tn, tk = gmm_plan.tpu_block(F, tiles.tn, 128), gmm_plan.tpu_block(D, tiles.tk, 128)
    nf, nk = gmm_plan.cdiv(F, tn), gmm_plan.cdiv(D, tk)

    def kernel(ids_ref, x_ref, wg_ref, wu_ref, o_ref, g_acc, u_acc):
        kb = pl.program_id(2)

        @pl.when(kb == 0)
        def _zero():
            g_acc[...] = jnp.zeros_like(g_acc)
            u_acc[...] = jnp.zeros_like(u_acc)

        xr, (wg, wu) = _masked(x_ref[...], [wg_ref[...], wu_ref[...]], kb * tk, D)
        g_acc[...] += jnp.dot(xr, wg, preferred_element_type=jnp.float32)
        u_acc[...] += jnp.dot(xr, wu, preferred_element_type=jnp.float32)

        @pl.when(kb == nk - 1)
        def _store():
            o_ref[...] = (gmm_plan.silu(g_acc[...]) * u_acc[...]).astype(o_ref.dtype)

    w_spec = pl.BlockSpec((None, tk, tn), lambda a, f, kb, ids: (ids[a], kb, f))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((N, 1, F), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(N, nf, nk),
            in_specs=[pl.BlockSpec((None, 1, tk), lambda a, f, kb, ids: (lax.div(a, jnp.int32(top_k)), 0, kb)), w_spec, w_spec],
            out_specs=pl.BlockSpec((None, 1, tn), lambda a, f, kb, ids: (a, 0, f)),
            scratch_shapes=[pltpu.VMEM((1, tn), jnp.float32)] * 2,
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"moe_decode_gate_up_{tk}x{tn}",
    )(ids, x.reshape(T, 1, D), w_gate, w_up)


def down(h, weights, ids, w_down, *, top_k: int, tiles: DecodeTiles = TILES, interpret=False):
    """y float32 [T, 1, D] = sum_j weights[t k + j] * h[t k + j] @ w_down[ids[t k + j]]."""
    N, _, F = h.shape
    D = w_down.shape[2]
    T = N // top_k
    tn, tf = gmm_plan.tpu_block(D, tiles.tn, 128), gmm_plan.tpu_block(F, tiles.tk, 128)
    nd, nf = gmm_plan.cdiv(D, tn), gmm_plan.cdiv(F, tf)

    def kernel(ids_ref, w_ref, h_ref, wd_ref, o_ref, acc):
        t, j, fb = pl.program_id(0), pl.program_id(2), pl.program_id(3)

        @pl.when((j == 0) & (fb == 0))
        def _zero():
            acc[...] = jnp.zeros_like(acc)

        hr, (wd,) = _masked(h_ref[...], [wd_ref[...]], fb * tf, F)
        acc[...] += w_ref[t * top_k + j] * jnp.dot(hr, wd, preferred_element_type=jnp.float32)

        @pl.when((j == top_k - 1) & (fb == nf - 1))
        def _store():
            o_ref[...] = acc[...]

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((T, 1, D), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(T, nd, top_k, nf),
            in_specs=[pl.BlockSpec((None, 1, tf), lambda t, d, j, fb, ids, w: (t * top_k + j, 0, fb)),
                      pl.BlockSpec((None, tf, tn), lambda t, d, j, fb, ids, w: (ids[t * top_k + j], fb, d))],
            out_specs=pl.BlockSpec((None, 1, tn), lambda t, d, j, fb, ids, w: (t, 0, d)),
            scratch_shapes=[pltpu.VMEM((1, tn), jnp.float32)],
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name=f"moe_decode_down_{tf}x{tn}",
    )(ids, weights, h, w_down)


def experts_by_id(x, weights, ids, w_gate, w_up, w_down, *, top_k: int, interpret=False):
    """y float32 [T, D] = sum_j weights[t k + j] * SwiGLU_{ids[t k + j]}(x[t]) (decode_plan's math)."""
    h = gate_up(x, ids, w_gate, w_up, top_k=top_k, interpret=interpret)
    return down(h, weights, ids, w_down, top_k=top_k, interpret=interpret).reshape(x.shape)
