"""Indexed attention on GPUs (Pallas -> Triton): token lists and block lists, query-major loop.

One program per (query token, batch x kv head). The G query heads of the group share
the token's list, so they are packed into the rows (M) of every MMA: each listed key
row is loaded once per group (NSA's query-group packing; DSA/MLA with G = 64..128).
The inner loop walks the list in chunks of ``BN`` key positions; a chunk's rows are
gathered by computed addresses (token lists) or are whole blocks (block lists,
``span`` = block size); not-allowed positions are read at address 0 and masked to -inf.

Backward: one kernel recomputes P, accumulates dQ in registers and scatters dK, dV
with float32 atomic adds into buffers with ``BN`` spare rows: a masked slot adds to
spare row ``kv_len + lane``, so every address of one atomic is distinct (atomics
need no mask, and Pallas' interpreter, which cannot combine repeated addresses,
runs the same code). Summation order across programs varies: dK/dV are not bitwise
deterministic run to run. The block kernels' kv-major loop order
(``indexed_block_kv_major``) is deterministic.

Entry points ``forward`` / ``backward`` take canonical lists
(:func:`pallas_kernels.common.indexed.canonicalize`) and dispatch on ``loop_order``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import indexed as common
from sparse_jax import _compat


_OVERRIDE: contextvars.ContextVar[dict] = contextvars.ContextVar("indexed_triton_config", default={})


@contextlib.contextmanager
def config_override(**kw):
    """Force launch parameters of the indexed kernels traced inside (tuning): query-major
    ``BN``, ``num_warps``, ``num_stages``; kv-major ``rows`` (MMA rows per step), ``kv_warps``,
    ``kv_stages``; indexer ``BQ``, ``indexer_warps``, ``indexer_stages``."""
    token = _OVERRIDE.set({**_OVERRIDE.get(), **kw})
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def overridden(name: str, default):
    return _OVERRIDE.get().get(name, default)


def _config(G: int, D: int, Dv: int, span: int):
    """(BN, num_warps, num_stages) for the query-major kernels."""
    width = max(D, Dv)
    bn = 64 if width <= 256 else 32
    if span > 1:
        bn = max(bn, min(span, 128)) if span <= 128 else bn
    warps = 4 if common.next_pow2(G) * width <= 64 * 128 else 8
    bn = overridden("BN", bn)
    if span > 1 and not (bn % span == 0 or span % bn == 0):
        raise ValueError(f"BN={bn} and block size {span}: one must divide the other")
    return bn, overridden("num_warps", warps), overridden("num_stages", 2)


def _specs(B, Hkv, Gp, Dp, Dvp, Skv):
    qmap = lambda t, bh: (bh // Hkv, t, bh % Hkv, 0, 0)
    kvmap = lambda t, bh: (bh // Hkv, 0, bh % Hkv, 0)
    rowmap = lambda t, bh: (bh // Hkv, t, bh % Hkv, 0)
    q_spec = pl.BlockSpec((None, None, None, Gp, Dp), qmap)
    o_spec = pl.BlockSpec((None, None, None, Gp, Dvp), qmap)
    k_spec = pl.BlockSpec((None, Skv, None, Dp), kvmap)
    v_spec = pl.BlockSpec((None, Skv, None, Dvp), kvmap)
    return q_spec, o_spec, k_spec, v_spec, rowmap, kvmap


def _chunk(idx_ref, c, count, t_abs, *, n, BN, span, n_units, kv_len, causal):
    def load_units(slots, in_range):
        return plgpu.load(idx_ref.at[slots], mask=in_range & (slots < n), other=-1)
    return common.chunk_positions(load_units, c, count, t_abs, BN=BN, span=span, n_units=n_units,
                                  kv_len=kv_len, causal=causal)


def _rows(ref, rows, width, real_width, mask):
    """Gather rows of a [S, width] ref view: [len(rows), width], zeros where ~mask or past real_width.

    (The column mask matters in interpret mode, which pads blocks with garbage.)
    """
    cols = jnp.arange(width, dtype=jnp.int32)
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask[:, None] & (cols < real_width)[None, :],
                      other=0.0)


def _head_mask(Gp, G, Dp, D):
    return (jnp.arange(Gp) < G)[:, None] & (jnp.arange(Dp) < D)[None, :]


def _fwd_kernel(off_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, G, D, Dv, n, Hkv, BN,
                span, n_units, kv_len, causal, scale):
    t, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // Hkv, bh % Hkv
    Gp, Dp = q_ref.shape
    Dvp = o_ref.shape[-1]
    t_abs = t + off_ref[b]
    count = count_ref[b, t, h]
    q = plgpu.load(q_ref, mask=_head_mask(Gp, G, Dp, D), other=0.0)
    qk_scale = scale * common.LOG2E

    def body(c, carry):
        acc, m, l = carry
        pos, ok = _chunk(idx_ref, c, count, t_abs, n=n, BN=BN, span=span, n_units=n_units, kv_len=kv_len,
                         causal=causal)
        kc = _rows(k_ref, pos, Dp, D, ok)
        s = plgpu.dot(q, kc, trans_b=True) * qk_scale  # [Gp, BN], log2 units
        s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        vc = _rows(v_ref, pos, Dvp, Dv, ok)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(vc.dtype), vc)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((Gp, Dvp), jnp.float32), jnp.full((Gp,), -jnp.inf, jnp.float32),
            jnp.zeros((Gp,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, common.num_chunks(count, BN=BN, span=span), body, init)
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, (m + jnp.log2(l_safe)) * common.LN2, -jnp.inf)


def _bwd_kernel(off_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dk_in, dv_in,
                dq_ref, dk_ref, dv_ref, *, G, D, Dv, n, Hkv, BN, span, n_units, kv_len, causal, scale):
    del dk_in, dv_in  # aliased with dk_ref / dv_ref
    t, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // Hkv, bh % Hkv
    Gp, Dp = q_ref.shape
    Dvp = do_ref.shape[-1]
    t_abs = t + off_ref[b]
    count = count_ref[b, t, h]
    q = plgpu.load(q_ref, mask=_head_mask(Gp, G, Dp, D), other=0.0)
    do = plgpu.load(do_ref, mask=_head_mask(Gp, G, Dvp, Dv), other=0.0)
    head_ok = jnp.arange(Gp) < G
    lse = plgpu.load(lse_ref, mask=head_ok, other=jnp.inf)
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * common.LOG2E)  # empty rows: P = 0
    delta = plgpu.load(delta_ref, mask=head_ok, other=0.0)
    qk_scale = scale * common.LOG2E
    lanes = jnp.arange(BN, dtype=jnp.int32)
    dcols = jnp.arange(Dp, dtype=jnp.int32)
    dvcols = jnp.arange(Dvp, dtype=jnp.int32)

    def body(c, dq):
        pos, ok = _chunk(idx_ref, c, count, t_abs, n=n, BN=BN, span=span, n_units=n_units, kv_len=kv_len,
                         causal=causal)
        kc = _rows(k_ref, pos, Dp, D, ok)
        vc = _rows(v_ref, pos, Dvp, Dv, ok)
        s = plgpu.dot(q, kc, trans_b=True) * qk_scale
        p = jnp.where(ok[None, :], jnp.exp2(s - lse2[:, None]), 0.0)  # [Gp, BN]
        dp = plgpu.dot(do, vc, trans_b=True)
        ds = p * (dp - delta[:, None])
        dq = dq + plgpu.dot(ds.astype(kc.dtype), kc)
        dk = plgpu.dot(ds.astype(q.dtype), q, trans_a=True) * scale  # [BN, Dp]
        dv = plgpu.dot(p.astype(do.dtype), do, trans_a=True)  # [BN, Dvp]
        rows = jnp.where(ok, pos, kv_len + lanes)  # masked lanes add to their own spare row
        plgpu.atomic_add(dk_ref, (rows[:, None], dcols[None, :]), dk)
        plgpu.atomic_add(dv_ref, (rows[:, None], dvcols[None, :]), dv)
        return dq

    dq = jax.lax.fori_loop(0, common.num_chunks(count, BN=BN, span=span), body,
                           jnp.zeros((Gp, Dp), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _static(q, k, v, idx):
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    return B, Sq, Hq, D, Skv, Hkv, Dv, G, idx.shape[-1]


def forward_query_major(q, k, v, lists: common.Lists, q_off, *, span: int, scale: float, causal: bool,
                        interpret: bool = False):
    """o [B, Sq, Hq, Dv] (q.dtype), lse f32 [B, Sq, Hq] (natural log; -inf for empty rows)."""
    B, Sq, Hq, D, Skv, Hkv, Dv, G, n = _static(q, k, v, lists.idx)
    Gp, Dp, Dvp = max(16, common.next_pow2(G)), max(16, common.next_pow2(D)), max(16, common.next_pow2(Dv))
    BN, warps, stages = _config(G, D, Dv, span)
    n_units = Skv if span == 1 else common.cdiv(Skv, span)
    q_spec, o_spec, k_spec, v_spec, rowmap, _ = _specs(B, Hkv, Gp, Dp, Dvp, Skv)
    kernel = functools.partial(_fwd_kernel, G=G, D=D, Dv=Dv, n=n, Hkv=Hkv, BN=BN, span=span, n_units=n_units,
                               kv_len=Skv, causal=causal, scale=scale)
    o, lse = pl.pallas_call(
        kernel, grid=(Sq, B * Hkv),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_spec, k_spec, v_spec, pl.BlockSpec((None, None, None, n), rowmap)],
        out_specs=[o_spec, pl.BlockSpec((None, None, None, Gp), rowmap)],
        out_shape=[jax.ShapeDtypeStruct((B, Sq, Hkv, G, Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, Sq, Hkv, G), jnp.float32)],
        compiler_params=_compat.triton_compiler_params(num_warps=warps, num_stages=stages),
        interpret=interpret, name="indexed_attention_fwd",
    )(q_off, lists.count, q.reshape(B, Sq, Hkv, G, D), k, v, lists.idx)
    return o.reshape(B, Sq, Hq, Dv), lse.reshape(B, Sq, Hq)


def backward_query_major(q, k, v, o, lse, do, lists: common.Lists, q_off, *, span: int, scale: float,
                         causal: bool, interpret: bool = False):
    """(dq, dk, dv) in the input dtypes; lse f32 [B, Sq, Hq] from the forward."""
    B, Sq, Hq, D, Skv, Hkv, Dv, G, n = _static(q, k, v, lists.idx)
    Gp, Dp, Dvp = max(16, common.next_pow2(G)), max(16, common.next_pow2(D)), max(16, common.next_pow2(Dv))
    BN, warps, stages = _config(G, D, Dv, span)
    n_units = Skv if span == 1 else common.cdiv(Skv, span)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, Sq, Hq]
    q_spec, o_spec, _, _, rowmap, kvmap = _specs(B, Hkv, Gp, Dp, Dvp, Skv)
    rows = Skv + BN  # BN spare rows take the masked lanes' atomics
    dk0 = jnp.zeros((B, rows, Hkv, D), jnp.float32)
    dv0 = jnp.zeros((B, rows, Hkv, Dv), jnp.float32)
    kernel = functools.partial(_bwd_kernel, G=G, D=D, Dv=Dv, n=n, Hkv=Hkv, BN=BN, span=span, n_units=n_units,
                               kv_len=Skv, causal=causal, scale=scale)
    g_spec = pl.BlockSpec((None, None, None, Gp), rowmap)
    acc_k = pl.BlockSpec((None, rows, None, Dp), kvmap)
    acc_v = pl.BlockSpec((None, rows, None, Dvp), kvmap)
    dq, dk, dv = pl.pallas_call(
        kernel, grid=(Sq, B * Hkv),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_spec, pl.BlockSpec((None, Skv, None, Dp), kvmap),
                  pl.BlockSpec((None, Skv, None, Dvp), kvmap), pl.BlockSpec((None, None, None, n), rowmap),
                  o_spec, g_spec, g_spec, acc_k, acc_v],
        out_specs=[q_spec, acc_k, acc_v],
        out_shape=[jax.ShapeDtypeStruct((B, Sq, Hkv, G, D), q.dtype), jax.ShapeDtypeStruct(dk0.shape, jnp.float32),
                   jax.ShapeDtypeStruct(dv0.shape, jnp.float32)],
        input_output_aliases={9: 1, 10: 2},
        compiler_params=_compat.triton_compiler_params(num_warps=warps, num_stages=stages),
        interpret=interpret, name="indexed_attention_bwd",
    )(q_off, lists.count, q.reshape(B, Sq, Hkv, G, D), k, v, lists.idx, do.reshape(B, Sq, Hkv, G, Dv),
      lse.reshape(B, Sq, Hkv, G), delta.reshape(B, Sq, Hkv, G), dk0, dv0)
    return dq.reshape(B, Sq, Hq, D), dk[:, :Skv].astype(k.dtype), dv[:, :Skv].astype(v.dtype)


def forward(q, k, v, lists, q_off, *, span, scale, causal, loop_order=common.QUERY_MAJOR, interpret=False):
    """Dispatch on ``loop_order`` ("query" for any list, "kv" for block lists)."""
    if loop_order == common.KV_MAJOR:
        from pallas_kernels.triton import indexed_block_kv_major as kv_major
        return kv_major.forward(q, k, v, lists, q_off, block_size=span, scale=scale, causal=causal,
                                interpret=interpret)
    return forward_query_major(q, k, v, lists, q_off, span=span, scale=scale, causal=causal, interpret=interpret)


def backward(q, k, v, o, lse, do, lists, q_off, *, span, scale, causal, loop_order=common.QUERY_MAJOR,
             interpret=False):
    if loop_order == common.KV_MAJOR:
        from pallas_kernels.triton import indexed_block_kv_major as kv_major
        return kv_major.backward(q, k, v, o, lse, do, lists, q_off, block_size=span, scale=scale, causal=causal,
                                 interpret=interpret)
    return backward_query_major(q, k, v, o, lse, do, lists, q_off, span=span, scale=scale, causal=causal,
                                interpret=interpret)
