"""Block-list attention on GPUs, kv-major loop (FSA's inverted order), forward and backward.

For small GQA groups a query-major tile holds G (< 16) useful rows of its M >= 16.
Here one program owns one key block of one (batch, kv head) and walks the (token,
slot) pairs that listed it (:func:`pallas_kernels.common.indexed.pair_table`), BT
pairs at a time: the BT x G query rows of those tokens form the MMA's M dimension
and the block's K/V tile is loaded once.

Forward: each pair's softmax over its block is local; the program writes the pair's
normalised output and log-sum-exp to per-(token, slot) buffers and
:func:`~pallas_kernels.common.indexed.merge_partials` combines a token's slots. The
buffers cost ``Sq * n * Hq * (Dv + 1)`` values of HBM traffic each way (outputs in the inputs'
16-bit type), which is what this order pays for full MMA rows.

Backward: the same program accumulates the block's dK and dV in registers (no atomics:
deterministic) and writes each pair's dQ contribution to a per-(token, slot) buffer,
summed afterwards (deterministic too).

Buffers are addressed by pair row ``token * n + slot``; ``BT`` spare rows past
``Sq * n`` take the stores of masked lanes, so no two lanes of one store share an
address (Pallas' interpreter writes masked lanes back too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import indexed as common
from pallas_kernels.triton.indexed_attention import overridden
from sparse_jax import _compat

# MMA rows per step (BT pairs x Gp heads). H100 round 1, forward: 128 rows beat 64 by 1.05x (G=16) and
# 1.19x (G=4); the backward ran best at 32 (4 warps, spilling) -- 64 with 8 warps is unmeasured.
_M_FWD, _M_BWD = 128, 64


def _config(G: int, D: int, Dv: int, block_size: int, backward: bool = False):
    """(Gp, BT pairs per step, num_warps, num_stages)."""
    Gp = common.next_pow2(G)
    M = max(overridden("bwd_rows", _M_BWD) if backward else overridden("rows", _M_FWD), Gp, 16)
    work = max(D, Dv) * common.next_pow2(block_size)
    # The backward holds dK, dV [block, D] f32 and a step's dQ [M, D] f32 at once: 4 warps spill
    # (ptxas, sm_90a: 255 registers + ~200 B spilled at D=128, block 64, M=64).
    warps = 4 if work <= 128 * 64 and not backward else 8
    if backward:
        return Gp, M // Gp, overridden("kv_bwd_warps", warps), overridden("kv_bwd_stages", 2)
    return Gp, M // Gp, overridden("kv_warps", warps), overridden("kv_stages", 2)


class _Pairs:
    """The pairs of block ``j`` of one (batch, kv head), as M = BT x Gp MMA rows."""

    def __init__(self, tok_ref, slot_ref, start_ref, j, *, G, Gp, BT, n, spare):
        self.begin, self.end = start_ref[j], start_ref[j + 1]
        self.G, self.Gp, self.BT, self.n, self.spare = G, Gp, BT, n, spare
        self.tok_ref, self.slot_ref = tok_ref, slot_ref
        self.num_chunks = (self.end - self.begin + BT - 1) // BT

    def rows(self, c):
        """(tok [M], g [M], ok [M], buffer row [M]) of chunk ``c``."""
        r = jnp.arange(self.BT * self.Gp, dtype=jnp.int32)
        pr, g = c * self.BT + r // self.Gp, r % self.Gp
        p_ok = self.begin + pr < self.end
        at = jnp.where(p_ok, self.begin + pr, 0)
        tok = plgpu.load(self.tok_ref.at[at], mask=p_ok, other=0)
        slot = plgpu.load(self.slot_ref.at[at], mask=p_ok, other=0)
        ok = p_ok & (g < self.G)
        buf_row = jnp.where(p_ok, tok * self.n + slot, self.spare + r // self.Gp)
        return tok, g, ok, buf_row


def _gather(ref, tok, g, width, real_width, ok):
    cols = jnp.arange(width, dtype=jnp.int32)
    return plgpu.load(ref.at[tok[:, None], g[:, None], cols[None, :]],
                      mask=ok[:, None] & (cols < real_width)[None, :], other=0.0)


def _block_rows(ref, j, bs, BSp, width, real_width, kv_len):
    r = jnp.arange(BSp, dtype=jnp.int32)
    pos = j * bs + r
    ok = (r < bs) & (pos < kv_len)
    cols = jnp.arange(width, dtype=jnp.int32)
    x = plgpu.load(ref.at[jnp.where(ok, pos, 0)[:, None], cols[None, :]],
                   mask=ok[:, None] & (cols < real_width)[None, :], other=0.0)
    return x, pos, ok


def _scores(q, kb, tok, ok, key_pos, key_ok, off, *, scale, causal):
    s = plgpu.dot(q, kb, trans_b=True) * (scale * common.LOG2E)  # [M, BSp], log2 units
    allowed = ok[:, None] & key_ok[None, :]
    if causal:
        allowed &= key_pos[None, :] <= (tok + off)[:, None]
    return s, allowed


def _fwd_kernel(off_ref, tok_ref, slot_ref, start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, G, Gp, BT, D, Dv,
                n, bs, Hkv, kv_len, spare, causal, scale):
    j, bh = pl.program_id(0), pl.program_id(1)
    off = off_ref[bh // Hkv]
    Dp, Dvp = k_ref.shape[-1], v_ref.shape[-1]
    BSp = max(16, common.next_pow2(bs))  # a Triton dot needs K, N >= 16
    kb, key_pos, key_ok = _block_rows(k_ref, j, bs, BSp, Dp, D, kv_len)
    vb, _, _ = _block_rows(v_ref, j, bs, BSp, Dvp, Dv, kv_len)
    pairs = _Pairs(tok_ref, slot_ref, start_ref, j, G=G, Gp=Gp, BT=BT, n=n, spare=spare)
    dcols = jnp.arange(Dvp, dtype=jnp.int32)

    def body(c, carry):
        tok, g, ok, buf_row = pairs.rows(c)
        q = _gather(q_ref, tok, g, Dp, D, ok)
        s, allowed = _scores(q, kb, tok, ok, key_pos, key_ok, off, scale=scale, causal=causal)
        s = jnp.where(allowed, s, -jnp.inf)
        m = jnp.max(s, axis=1)
        m_use = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp2(s - m_use[:, None])
        l = jnp.sum(p, axis=1)
        l_safe = jnp.where(l > 0, l, 1.0)
        o = plgpu.dot(p.astype(vb.dtype), vb) / l_safe[:, None]
        lse = jnp.where(l > 0, (m_use + jnp.log2(l_safe)) * common.LN2, -jnp.inf)
        plgpu.store(o_ref.at[buf_row[:, None], g[:, None], dcols[None, :]], o.astype(o_ref.dtype),
                    mask=(g < G)[:, None] & (dcols < Dv)[None, :])
        plgpu.store(lse_ref.at[buf_row, g], lse, mask=g < G)
        return carry

    jax.lax.fori_loop(0, pairs.num_chunks, body, 0)


def _bwd_kernel(off_ref, tok_ref, slot_ref, start_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dq_ref, dk_ref, dv_ref, *, G, Gp, BT, D, Dv, n, bs, Hkv, kv_len, spare, causal, scale):
    j, bh = pl.program_id(0), pl.program_id(1)
    off = off_ref[bh // Hkv]
    Dp, Dvp = k_ref.shape[-1], v_ref.shape[-1]
    BSp = max(16, common.next_pow2(bs))  # a Triton dot needs K, N >= 16
    kb, key_pos, key_ok = _block_rows(k_ref, j, bs, BSp, Dp, D, kv_len)
    vb, _, _ = _block_rows(v_ref, j, bs, BSp, Dvp, Dv, kv_len)
    pairs = _Pairs(tok_ref, slot_ref, start_ref, j, G=G, Gp=Gp, BT=BT, n=n, spare=spare)
    dcols = jnp.arange(Dp, dtype=jnp.int32)

    def body(c, carry):
        dk, dv = carry
        tok, g, ok, buf_row = pairs.rows(c)
        q = _gather(q_ref, tok, g, Dp, D, ok)
        do = _gather(do_ref, tok, g, Dvp, Dv, ok)
        lse = plgpu.load(lse_ref.at[tok, g], mask=ok, other=jnp.inf)
        lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * common.LOG2E)
        delta = plgpu.load(delta_ref.at[tok, g], mask=ok, other=0.0)
        s, allowed = _scores(q, kb, tok, ok, key_pos, key_ok, off, scale=scale, causal=causal)
        p = jnp.where(allowed, jnp.exp2(s - lse2[:, None]), 0.0)  # [M, BSp]
        dp = plgpu.dot(do, vb, trans_b=True)
        ds = p * (dp - delta[:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        dq = plgpu.dot(ds.astype(kb.dtype), kb) * scale  # [M, Dp]
        plgpu.store(dq_ref.at[buf_row[:, None], g[:, None], dcols[None, :]], dq,
                    mask=(g < G)[:, None] & (dcols < D)[None, :])
        return dk, dv

    dk, dv = jax.lax.fori_loop(0, pairs.num_chunks, body,
                               (jnp.zeros((BSp, Dp), jnp.float32), jnp.zeros((BSp, Dvp), jnp.float32)))
    for ref, val, width, real in ((dk_ref, dk * scale, Dp, D), (dv_ref, dv, Dvp, Dv)):
        cols = jnp.arange(width, dtype=jnp.int32)
        # Masked lanes keep their own (next-block / past-the-end) rows: no two lanes share an address.
        plgpu.store(ref.at[key_pos[:, None], cols[None, :]], val.astype(ref.dtype),
                    mask=key_ok[:, None] & (cols < real)[None, :])


def _partial_dtype(dtype):
    """Per-slot outputs (each normalised, |o| <= max |v|) are stored in the inputs' 16-bit type:
    half the HBM traffic of the partial buffers, which bound this loop order; float32 inputs keep
    float32. Log-sum-exps and dQ partials stay float32."""
    return dtype if jnp.dtype(dtype).itemsize == 2 else jnp.float32


def _prep(q, k, v, lists, block_size):
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, n = Hq // Hkv, lists.idx.shape[-1]
    nkb = common.cdiv(Skv, block_size)
    table = common.pair_table(lists.idx, nkb)
    return B, Sq, Hq, D, Skv, Hkv, Dv, G, n, nkb, table


def _common_specs(B, Sq, Hkv, Skv, P, nkb, Gp, Dp, Dvp):
    kvmap = lambda j, bh: (bh // Hkv, 0, bh % Hkv, 0)
    tabmap = lambda j, bh: (bh // Hkv, bh % Hkv, 0)
    qmap = lambda j, bh: (bh // Hkv, 0, bh % Hkv, 0, 0)
    return dict(
        table=[pl.BlockSpec((None, None, P), tabmap), pl.BlockSpec((None, None, P), tabmap),
               pl.BlockSpec((None, None, nkb + 1), tabmap)],
        q=pl.BlockSpec((None, Sq, None, Gp, Dp), qmap),
        k=pl.BlockSpec((None, Skv, None, Dp), kvmap),
        v=pl.BlockSpec((None, Skv, None, Dvp), kvmap),
        qmap=qmap, kvmap=kvmap,
        rows=lambda R, width: pl.BlockSpec((None, R, None, Gp, width), qmap),
        rows1=lambda R: pl.BlockSpec((None, R, None, Gp), lambda j, bh: (bh // Hkv, 0, bh % Hkv, 0)),
    )


def forward(q, k, v, lists: common.Lists, q_off, *, block_size: int, scale: float, causal: bool,
            interpret: bool = False):
    """o [B, Sq, Hq, Dv] (q.dtype), lse f32 [B, Sq, Hq]."""
    B, Sq, Hq, D, Skv, Hkv, Dv, G, n, nkb, table = _prep(q, k, v, lists, block_size)
    Gp, BT, warps, stages = _config(G, D, Dv, block_size)
    Dp, Dvp = max(16, common.next_pow2(D)), max(16, common.next_pow2(Dv))
    P, R = Sq * n, Sq * n + BT
    sp = _common_specs(B, Sq, Hkv, Skv, P, nkb, Gp, Dp, Dvp)
    kernel = functools.partial(_fwd_kernel, G=G, Gp=Gp, BT=BT, D=D, Dv=Dv, n=n, bs=block_size, Hkv=Hkv,
                               kv_len=Skv, spare=P, causal=causal, scale=scale)
    o_part, lse_part = pl.pallas_call(
        kernel, grid=(nkb, B * Hkv),
        in_specs=[pl.BlockSpec(), *sp["table"], sp["q"], sp["k"], sp["v"]],
        out_specs=[sp["rows"](R, Dvp), sp["rows1"](R)],
        out_shape=[jax.ShapeDtypeStruct((B, R, Hkv, G, Dv), _partial_dtype(q.dtype)),
                   jax.ShapeDtypeStruct((B, R, Hkv, G), jnp.float32)],
        compiler_params=_compat.triton_compiler_params(num_warps=warps, num_stages=stages),
        interpret=interpret, name="indexed_block_attention_kv_major_fwd",
    )(q_off, table.tok, table.slot, table.start, q.reshape(B, Sq, Hkv, G, D), k, v)
    valid = common.slot_valid_for_merge(lists.idx, q_off, span=block_size, kv_len=Skv, causal=causal)
    o_part = o_part[:, :P].reshape(B, Sq, n, Hkv, G, Dv).transpose(0, 1, 3, 2, 4, 5)
    lse_part = lse_part[:, :P].reshape(B, Sq, n, Hkv, G).transpose(0, 1, 3, 2, 4)
    o, lse = common.merge_partials(o_part.astype(jnp.float32), lse_part, valid)  # [B, Sq, Hkv, G, Dv], [B, Sq, Hkv, G]
    return o.reshape(B, Sq, Hq, Dv).astype(q.dtype), lse.reshape(B, Sq, Hq)


def backward(q, k, v, o, lse, do, lists: common.Lists, q_off, *, block_size: int, scale: float, causal: bool,
             interpret: bool = False):
    """(dq, dk, dv), deterministic."""
    B, Sq, Hq, D, Skv, Hkv, Dv, G, n, nkb, table = _prep(q, k, v, lists, block_size)
    Gp, BT, warps, stages = _config(G, D, Dv, block_size, backward=True)
    Dp, Dvp = max(16, common.next_pow2(D)), max(16, common.next_pow2(Dv))
    P, R = Sq * n, Sq * n + BT
    sp = _common_specs(B, Sq, Hkv, Skv, P, nkb, Gp, Dp, Dvp)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    kernel = functools.partial(_bwd_kernel, G=G, Gp=Gp, BT=BT, D=D, Dv=Dv, n=n, bs=block_size, Hkv=Hkv,
                               kv_len=Skv, spare=P, causal=causal, scale=scale)
    g_spec = sp["rows1"](Sq)
    dq_part, dk, dv = pl.pallas_call(
        kernel, grid=(nkb, B * Hkv),
        in_specs=[pl.BlockSpec(), *sp["table"], sp["q"], sp["k"], sp["v"],
                  pl.BlockSpec((None, Sq, None, Gp, Dvp), sp["qmap"]), g_spec, g_spec],
        out_specs=[sp["rows"](R, Dp), sp["k"], sp["v"]],
        out_shape=[jax.ShapeDtypeStruct((B, R, Hkv, G, D), jnp.float32), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compat.triton_compiler_params(num_warps=warps, num_stages=stages),
        interpret=interpret, name="indexed_block_attention_kv_major_bwd",
    )(q_off, table.tok, table.slot, table.start, q.reshape(B, Sq, Hkv, G, D), k, v,
      do.reshape(B, Sq, Hkv, G, Dv), lse.reshape(B, Sq, Hkv, G), delta.reshape(B, Sq, Hkv, G))
    valid = common.slot_valid_for_merge(lists.idx, q_off, span=block_size, kv_len=Skv, causal=causal)
    dq_part = dq_part[:, :P].reshape(B, Sq, n, Hkv, G, D)
    dq = jnp.sum(jnp.where(valid.transpose(0, 1, 3, 2)[..., None, None], dq_part, 0.0), axis=2)
    return dq.reshape(B, Sq, Hq, D).astype(q.dtype), dk, dv
