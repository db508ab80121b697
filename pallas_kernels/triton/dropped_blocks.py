"""Dropped-block estimate, forward (Pallas, Triton lowering).

One program owns ``bm`` query rows of one head (inside one query block, so one row of the
``dropped`` table serves it) and walks the pooled keys in tiles of ``bn``, up to the last
dropped block of its row, with an online softmax: logits ``scale q . mean(K_j)`` (softcapped)
plus ``log n_j``, masked to the dropped blocks; values ``mean(V_j)``. Pooled K/V are
[nKb, D] per kv head (1/block_size of the keys), so the whole estimate costs about
1/block_size of dense attention. Semantics and the differentiable reference:
:mod:`sparse_jax.reference.dropped_blocks` (the op's backward differentiates the reference).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.attention_tiling import padded_head_dim
from sparse_jax import _compat
from sparse_jax.reference import dropped_blocks as ref

LOG2E = math.log2(math.e)
BLOCK_N = 64  # pooled keys per tile


def row_tile(block_q: int) -> int | None:
    """Query rows per program: the largest power of two <= 128 dividing ``block_q`` (>= 16,
    the smallest dot tile), or None when no such tile exists."""
    bm = 128
    while bm >= 16:
        if block_q % bm == 0:
            return bm
        bm //= 2
    return None


def _kernel(q_ref, k_ref, v_ref, logn_ref, drop_ref, o_ref, lse_ref, *, bn, n_kp, scale, softcap):
    q = q_ref[...]
    row = drop_ref[...] != 0  # [nKp]
    cols = jnp.arange(n_kp, dtype=jnp.int32)
    hi = jnp.max(jnp.where(row, cols + 1, 0))  # one past the last dropped block
    n_tiles = jax.lax.div(hi + (bn - 1), jnp.int32(bn))
    bm = q.shape[0]

    def body(t, carry):
        m, l, acc = carry
        kt = k_ref[pl.ds(t * bn, bn), :]
        s = plgpu.dot(q, kt, trans_b=True) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        ok = drop_ref[pl.ds(t * bn, bn)] != 0
        s = jnp.where(ok[None, :], s * LOG2E + logn_ref[pl.ds(t * bn, bn)][None, :], -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        vt = v_ref[pl.ds(t * bn, bn), :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(vt.dtype), vt)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32),
            jnp.zeros((bm, o_ref.shape[-1]), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_tiles, body, init)
    live = l > 0
    safe = jnp.where(live, l, 1.0)
    o_ref[...] = acc / safe[:, None]
    lse_ref[...] = jnp.where(live, (m + jnp.log2(safe)) / LOG2E, -jnp.inf)


def forward(q, k, v, dropped, *, block_size, scale: float, softcap: float | None, kv_permutation=None,
            interpret: bool = False):
    """(o float32 [B, Sq, Hq, Dv], lse float32 [B, Hq, Sq]); arguments as in
    :func:`sparse_jax.reference.dropped_blocks.dropped_block_attention` (validated by the op)."""
    bq, bk = block_size
    b, sq, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = hq // hkv
    bm = row_tile(bq)
    if bm is None:
        raise ValueError(f"the Triton dropped-block kernel needs a query block divisible by 16; got {bq}")
    kbar, vbar, logn = ref.pooled_kv(k, v, bk, kv_permutation)
    nkb = kbar.shape[1]
    nqb = -(-sq // bq)
    bn = BLOCK_N
    n_kp = -(-nkb // bn) * bn
    dp, dvp = padded_head_dim(d), padded_head_dim(dv)
    sq_p = nqb * bq
    dt = q.dtype
    qp = jnp.pad(q, ((0, 0), (0, sq_p - sq), (0, 0), (0, dp - d)))
    kp = jnp.pad(kbar.astype(dt), ((0, 0), (0, n_kp - nkb), (0, 0), (0, dp - d)))
    vp = jnp.pad(vbar.astype(dt), ((0, 0), (0, n_kp - nkb), (0, 0), (0, dvp - dv)))
    logn2 = jnp.pad(logn * LOG2E, (0, n_kp - nkb))
    drop = jnp.asarray(dropped, bool)
    ht = drop.shape[1]
    table = jnp.pad(jnp.broadcast_to(drop, (b,) + drop.shape[1:]).astype(jnp.int32),
                    ((0, 0), (0, 0), (0, 0), (0, n_kp - nkb)))
    per_block = bq // bm

    def table_head(h):
        return 0 if ht == 1 else (h // g if ht == hkv else h)

    kernel = functools.partial(_kernel, bn=bn, n_kp=n_kp, scale=float(scale), softcap=softcap)
    o, lse = pl.pallas_call(
        kernel,
        grid=(sq_p // bm, hq, b),
        in_specs=[pl.BlockSpec((None, bm, None, dp), lambda r, h, bb: (bb, r, h, 0)),
                  pl.BlockSpec((None, n_kp, None, dp), lambda r, h, bb: (bb, 0, h // g, 0)),
                  pl.BlockSpec((None, n_kp, None, dvp), lambda r, h, bb: (bb, 0, h // g, 0)),
                  pl.BlockSpec((n_kp,), lambda r, h, bb: (0,)),
                  pl.BlockSpec((None, None, None, n_kp), lambda r, h, bb: (bb, table_head(h), r // per_block, 0))],
        out_specs=[pl.BlockSpec((None, bm, None, dvp), lambda r, h, bb: (bb, r, h, 0)),
                   pl.BlockSpec((None, None, bm), lambda r, h, bb: (bb, h, r))],
        out_shape=[jax.ShapeDtypeStruct((b, sq_p, hq, dvp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hq, sq_p), jnp.float32)],
        compiler_params=_compat.triton_compiler_params(num_warps=8 if bm >= 128 else 4, num_stages=2),
        interpret=interpret,
        name="dropped_block_estimate",
    )(qp, kp, vp, logn2, table)
    return o[:, :sq, :, :dv], lse[:, :, :sq]
