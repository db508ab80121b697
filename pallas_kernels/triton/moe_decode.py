"""Decode expert kernels (one token's k experts by id) lowered through Pallas-Triton.

See :mod:`pallas_kernels.common.decode_plan` for the two passes and their partials. A
program computes one row (the token's x row, or its h row) against a [tk, tn] weight
strip per step. The row is broadcast to 16 MMA rows (the smallest ``tl.dot`` tile): the
tensor cores do 16x the arithmetic of a GEMV, which costs nothing in a launch bound by
streaming the weights, and keeps the loads in Triton's software pipeline (a dot's
operands are pipelined with ``num_stages`` buffers). All rows are equal; ``max`` over
them picks one exactly.

Refs are whole arrays (no BlockSpec): every load and store past an edge is masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import decode_plan, gmm_plan
from pallas_kernels.common.decode_plan import DecodeTiles
from pallas_kernels.triton.gmm import num_sms
from sparse_jax import _compat

ROWS = 16  # the broadcast row count (tl.dot's minimum M)
TILES = DecodeTiles(tn=128, tk=64, num_warps=4, num_stages=4)


def _row_dot(row, w):
    """[tk] x [tk, tn] -> float32 [tn] through a [16, tk] broadcast MMA."""
    a = jnp.broadcast_to(row[None, :], (ROWS, row.shape[0]))
    return jnp.max(jnp.dot(a, w, preferred_element_type=jnp.float32), axis=0)


def gate_up_partials(x, ids, w_gate, w_up, *, top_k: int, tiles: DecodeTiles = TILES, interpret: bool = False):
    """Two float32 [N, S1, F]: partial x @ w_gate[id] and x @ w_up[id] over S1 slices of D."""
    T, D = x.shape
    N = ids.shape[0]
    F = w_gate.shape[2]
    tn, tk = gmm_plan.pow2_block(F, tiles.tn), gmm_plan.pow2_block(D, tiles.tk)
    nf, nk = gmm_plan.cdiv(F, tn), gmm_plan.cdiv(D, tk)
    s1, per = decode_plan.splits(nk, N * nf, num_sms())

    def kernel(ids_ref, x_ref, wg_ref, wu_ref, g_ref, u_ref):
        a, fb, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        e = ids_ref[a]
        t = a // top_k
        cols = fb * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0)
        col_ok = cols < F

        def step(i, accs):
            k0 = (s * per + i) * tk
            ks = k0 + lax.broadcasted_iota(jnp.int32, (tk,), 0)
            k_ok = ks < D
            xr = plgpu.load(x_ref.at[t, pl.ds(k0, tk)], mask=k_ok, other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = plgpu.load(wg_ref.at[e, pl.ds(k0, tk), pl.ds(fb * tn, tn)], mask=w_mask, other=0.0)
            wu = plgpu.load(wu_ref.at[e, pl.ds(k0, tk), pl.ds(fb * tn, tn)], mask=w_mask, other=0.0)
            return accs[0] + _row_dot(xr, wg), accs[1] + _row_dot(xr, wu)

        steps = jnp.minimum(per, nk - s * per)
        g, u = lax.fori_loop(0, steps, step, (jnp.zeros((tn,), jnp.float32), jnp.zeros((tn,), jnp.float32)))
        plgpu.store(g_ref.at[a, s, pl.ds(fb * tn, tn)], g, mask=col_ok)
        plgpu.store(u_ref.at[a, s, pl.ds(fb * tn, tn)], u, mask=col_ok)

    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((N, s1, F), jnp.float32)] * 2,
        grid=(N, nf, s1),
        compiler_params=_compat.triton_compiler_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=4 * N * D * F, transcendentals=0,
                                      bytes_accessed=2 * N * D * F * w_gate.dtype.itemsize + 8 * N * s1 * F),
        name=f"moe_decode_gate_up_{tk}x{tn}",
    )(ids, x, w_gate, w_up)


def down_partials(g_parts, u_parts, weights, ids, w_down, *, top_k: int, out_dtype, tiles: DecodeTiles = TILES,
                  interpret: bool = False):
    """float32 [S2, T, D]: partial sum_j w[t, j] * h[t, j] @ w_down[id] over S2 slices of F.

    g_parts, u_parts: the gate/up partials [N, S1, F]; h = silu(sum g) * (sum u), rounded to
    ``out_dtype`` (x.dtype) before the product.
    """
    N, S1, F = g_parts.shape
    D = w_down.shape[2]
    T = N // top_k
    tn, tf = gmm_plan.pow2_block(D, tiles.tn), gmm_plan.pow2_block(F, tiles.tk)
    nd, nf = gmm_plan.cdiv(D, tn), gmm_plan.cdiv(F, tf)
    s2, per = decode_plan.splits(nf, T * nd, num_sms())
    s1p = gmm_plan.next_pow2(S1)

    def kernel(ids_ref, w_ref, g_ref, u_ref, wd_ref, o_ref):
        t, db, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        cols = db * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0)
        col_ok = cols < D
        part_ok = lax.broadcasted_iota(jnp.int32, (s1p,), 0) < S1
        steps = jnp.minimum(per, nf - s * per)
        y = jnp.zeros((tn,), jnp.float32)
        for j in range(top_k):
            a = t * top_k + j
            e = ids_ref[a]

            def step(i, acc, a=a, e=e):
                f0 = (s * per + i) * tf
                f_ok = (f0 + lax.broadcasted_iota(jnp.int32, (tf,), 0)) < F
                p_mask = part_ok[:, None] & f_ok[None, :]
                g = jnp.sum(plgpu.load(g_ref.at[a, pl.ds(0, s1p), pl.ds(f0, tf)], mask=p_mask, other=0.0), 0)
                u = jnp.sum(plgpu.load(u_ref.at[a, pl.ds(0, s1p), pl.ds(f0, tf)], mask=p_mask, other=0.0), 0)
                h = (gmm_plan.silu(g) * u).astype(out_dtype)
                wd = plgpu.load(wd_ref.at[e, pl.ds(f0, tf), pl.ds(db * tn, tn)],
                                mask=f_ok[:, None] & col_ok[None, :], other=0.0)
                return acc + _row_dot(h, wd)

            acc = lax.fori_loop(0, steps, step, jnp.zeros((tn,), jnp.float32))
            y = y + w_ref[a] * acc
        plgpu.store(o_ref.at[s, t, pl.ds(db * tn, tn)], y, mask=col_ok)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((s2, T, D), jnp.float32),
        grid=(T, nd, s2),
        compiler_params=_compat.triton_compiler_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=2 * N * D * F, transcendentals=N * F * nd,
                                      bytes_accessed=N * D * F * w_down.dtype.itemsize + 8 * N * S1 * F * nd),
        name=f"moe_decode_down_{tf}x{tn}",
    )(ids, weights, g_parts, u_parts, w_down)


def experts_by_id(x, weights, ids, w_gate, w_up, w_down, *, top_k: int, interpret: bool = False):
    """y float32 [T, D] = sum_j weights[t k + j] * SwiGLU_{ids[t k + j]}(x[t]) (decode_plan's math)."""
    g, u = gate_up_partials(x, ids, w_gate, w_up, top_k=top_k, interpret=interpret)
    y = down_partials(g, u, weights, ids, w_down, top_k=top_k, out_dtype=x.dtype, interpret=interpret)
    return jnp.sum(y, axis=0)
