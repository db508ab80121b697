"""Backward block-sparse FlashAttention kernels (Pallas, Triton lowering).

Two kernels, FlashAttention-2 style (no atomics, deterministic):

* dQ: grid (batch x head programs, query tiles); walks the *row* tables like the
  forward pass, recomputing P = exp2(S·log2e·scale - lse2) from the saved lse and
  accumulating dQ += dS·K.
* dK/dV: grid (batch x kv heads, key tiles); walks the *column* (transposed)
  tables, and for GQA loops over the query heads of the group inside the kernel,
  so dK/dV of a kv head are accumulated in registers (no [B, Skv, Hq, D]
  intermediate). Scores are computed transposed (K·Qᵀ) so dV += Pᵀ·dO and
  dK += dSᵀ·Q need no transposes of P.

Row statistics come head-major ([B*Hq*Sq], contiguous per head): ``lse2`` (log2
units, +inf for rows with no allowed key so their P is 0) and
``delta = rowsum(dO * O)``.

``BwdConfig.fused_dq`` instead accumulates dQ inside the dK/dV kernel with
float32 atomics (5 instead of 7 matmuls per block pair; not bit-deterministic).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import attention_tiling as tiling_lib
from pallas_kernels.triton import attention_blocks as blk
from pallas_kernels.triton.attention_configs import BwdConfig
from sparse_jax import _compat

NEG_INF = float("-inf")
POS_INF = float("inf")


def _program(cfg: BwdConfig):
    """(head-program, tile) ids of the 2-D grid of either kernel (see ``grid``)."""
    if cfg.grid_order == "tiles_first":
        return pl.program_id(1), pl.program_id(0)
    return pl.program_id(0), pl.program_id(1)


def _grid(cfg: BwdConfig, programs: int, tiles: int):
    return (tiles, programs) if cfg.grid_order == "tiles_first" else (programs, tiles)


def _dq_kernel(*refs, P: blk.Problem, names, tq, tk, pk, cfg: BwdConfig):
    refs = dict(zip(names, refs))
    n_qb = P.n_q_blocks
    bh, t = _program(cfg)
    b = blk.div(bh, pk.programs_per_batch)
    head0 = blk.mod(bh, pk.programs_per_batch) * pk.heads
    hkv = blk.div(head0, P.group)
    slot, sub = blk.div(t, tq.n_sub), blk.mod(t, tq.n_sub)
    qblk = refs["order"][blk.table_row(P, b, head0, hkv, slot, n_qb)] if "order" in refs else slot
    row = blk.table_row(P, b, head0, hkv, qblk, n_qb)

    qt = blk.q_tile(P, tq, pk, b, head0, qblk, sub)
    blk.load_q_meta(P, qt, b, refs)
    q = blk.load_rows(refs["q"], qt.base, qt.rel, qt.valid, P.head_dim, P.head_dim_pad)
    do = blk.load_rows(refs["do"], qt.base, qt.rel, qt.valid, P.head_dim_v, P.head_dim_v_pad)
    lse2, delta = _row_stats(P, refs, b, qt)
    c = blk.log2_factor(P)

    def body(kvblk, kv_sub, dq, kind):
        kt = blk.kv_tile(P, tk, b, hkv, kvblk, kv_sub, refs.get("perm"), bounds=blk.kind_needs_bounds(kind, tk))
        blk.load_kv_meta(P, kt, b, hkv, refs)
        k = blk.load_rows(refs["k"], kt.base, kt.rel, kt.valid, P.head_dim, P.head_dim_pad)
        v = blk.load_rows(refs["v"], kt.base, kt.rel, kt.valid, P.head_dim_v, P.head_dim_v_pad)
        s, tanh_s = blk.scores(P, plgpu.dot(q, k, trans_b=True))
        x = s * c - lse2[:, None]
        allowed = blk.logit_mask(P, kind, b, qt, kt, transposed=False)
        if allowed is not None:
            x = jnp.where(allowed, x, NEG_INF)
        p = jnp.exp2(x)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        if tanh_s is not None:
            ds = ds * (1.0 - tanh_s * tanh_s)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    active = None
    if tq.n_sub_last < tq.n_sub:
        active = qblk * P.block_q + sub * tq.tile < P.q_len
    walk = blk.Walk(tk, P.max_full_kv, P.max_kv, split_tail=True)
    dq = jnp.zeros((q.shape[0], P.head_dim_pad), jnp.float32)
    dq = blk.walk(walk, (refs["full_num"], refs["full_idx"]), (refs["num"], refs["idx"]), row, dq, body,
                  active=active, prefetch_index=cfg.prefetch_index)
    blk.store_rows(refs["dq"], qt.base, qt.rel, qt.valid, dq * P.scale, P.head_dim)


def _row_stats(P: blk.Problem, refs, b, qt):
    """lse2 and delta of a query tile (head-major [B, Hq, Sq] layout: contiguous per head)."""
    idx = (b * P.num_q_heads + qt.head) * P.q_len + qt.pos
    return (blk.load_vec(refs["lse2"], idx, qt.valid, POS_INF), blk.load_vec(refs["delta"], idx, qt.valid, 0.0))


def _dkdv_kernel(*refs, P: blk.Problem, names, tq, tk, pk, cfg: BwdConfig, interpret: bool):
    refs = dict(zip(names, refs))
    fused_dq = cfg.fused_dq
    n_kb = P.n_kv_blocks
    bh, t = _program(cfg)
    b, hkv = blk.div(bh, P.num_kv_heads), blk.mod(bh, P.num_kv_heads)
    kvblk, sub = blk.div(t, tk.n_sub), blk.mod(t, tk.n_sub)

    kt = blk.kv_tile(P, tk, b, hkv, kvblk, sub, refs.get("perm"), bounds=tk.needs_bounds)
    blk.load_kv_meta(P, kt, b, hkv, refs)
    k = blk.load_rows(refs["k"], kt.base, kt.rel, kt.valid, P.head_dim, P.head_dim_pad)
    v = blk.load_rows(refs["v"], kt.base, kt.rel, kt.valid, P.head_dim_v, P.head_dim_v_pad)
    c = blk.log2_factor(P)

    def body(head0, qblk, q_sub, carry, kind):
        dk, dv = carry
        qt = blk.q_tile(P, tq, pk, b, head0, qblk, q_sub)
        blk.load_q_meta(P, qt, b, refs)
        q = blk.load_rows(refs["q"], qt.base, qt.rel, qt.valid, P.head_dim, P.head_dim_pad)
        do = blk.load_rows(refs["do"], qt.base, qt.rel, qt.valid, P.head_dim_v, P.head_dim_v_pad)
        lse2, delta = _row_stats(P, refs, b, qt)
        s, tanh_s = blk.scores(P, plgpu.dot(k, q, trans_b=True))  # [N, M]
        x = s * c - lse2[None, :]
        allowed = blk.logit_mask(P, kind, b, qt, kt, transposed=True)
        if allowed is not None:
            x = jnp.where(allowed, x, NEG_INF)
        p = jnp.exp2(x)
        dv = dv + plgpu.dot(p.astype(do.dtype), do)
        dp = plgpu.dot(v, do, trans_b=True)
        ds = p * (dp - delta[None, :])
        if tanh_s is not None:
            ds = ds * (1.0 - tanh_s * tanh_s)
        ds = ds.astype(q.dtype)
        dk = dk + plgpu.dot(ds, q)
        if fused_dq:  # dQ += dSᵀᵀ·K straight into the float32 accumulator (FA2-style atomics)
            _atomic_add_rows(refs["dq_acc_out"], qt.base, qt.rel, qt.valid, plgpu.dot(ds, k, trans_a=True),
                             P.head_dim, interpret)
        return dk, dv

    walk = blk.Walk(tq, P.max_full_q, P.max_q, split_tail=False)

    def group(hg, carry):  # the query heads hg*heads .. of this kv head's group
        head0 = hkv * P.group + hg * pk.heads
        col = blk.table_row(P, b, head0, hkv, kvblk, n_kb)
        return blk.walk(walk, (refs["full_q_num"], refs["full_q_idx"]), (refs["q_num"], refs["q_idx"]), col,
                        carry, functools.partial(body, head0), prefetch_index=cfg.prefetch_index)

    carry = (jnp.zeros((k.shape[0], P.head_dim_pad), jnp.float32),
             jnp.zeros((v.shape[0], P.head_dim_v_pad), jnp.float32))
    n_groups = P.group // pk.heads
    if n_groups == 1:
        dk, dv = group(0, carry)
    else:
        dk, dv = jax.lax.fori_loop(0, n_groups, group, carry)
    blk.store_rows(refs["dk"], kt.out_base, kt.out_rel, kt.in_range, dk * P.scale, P.head_dim)
    blk.store_rows(refs["dv"], kt.out_base, kt.out_rel, kt.in_range, dv, P.head_dim_v)


def _atomic_add_rows(ref, base, rel, valid, value, d: int, interpret: bool):
    cols = jnp.arange(value.shape[-1], dtype=jnp.int32)
    mask = blk._row_mask(valid, d, value.shape[-1])
    idx = ((base + rel)[:, None], cols[None, :])
    if mask is None:
        plgpu.atomic_add(ref, idx, value)
    elif interpret:  # the interpreter has no masked atomics: masked lanes add zeros to a row inside ref
        rows, cc = jnp.clip(base + rel, 0, ref.shape[0] - 1), jnp.clip(cols, 0, ref.shape[1] - 1)
        plgpu.atomic_add(ref, (rows[:, None], cc[None, :]), jnp.where(mask, value, 0.0))
    else:
        plgpu.atomic_add(ref, idx, value, mask=jnp.broadcast_to(mask, value.shape))


def plan_dq(P: blk.Problem, cfg: BwdConfig):
    pk = tiling_lib.head_packing(P.num_q_heads, P.num_kv_heads, P.table_heads, cfg.pack_gqa,
                                 q_span=min(P.block_q, P.q_len), tile_m=cfg.block_q_dq)
    tq = tiling_lib.q_tiling(P.block_q, P.q_len, cfg.block_q_dq, pk)
    tk = tiling_lib.fit_tile(P.block_kv, P.kv_len, cfg.block_kv_dq)
    return tq, tk, pk


def plan_dkdv(P: blk.Problem, cfg: BwdConfig):
    pk = tiling_lib.head_packing(P.num_q_heads, P.num_kv_heads, P.table_heads, cfg.pack_gqa,
                                 q_span=min(P.block_q, P.q_len), tile_m=cfg.block_q_dkv)
    tq = tiling_lib.q_tiling(P.block_q, P.q_len, cfg.block_q_dkv, pk)
    tk = tiling_lib.fit_tile(P.block_kv, P.kv_len, cfg.block_kv_dkv)
    return tq, tk, pk


def dq_call(P: blk.Problem, cfg: BwdConfig, inputs: dict, *, dtype, interpret):
    tq, tk, pk = plan_dq(P, cfg)
    names = list(inputs) + ["dq"]
    kernel = functools.partial(_dq_kernel, P=P, names=names, tq=tq, tk=tk, pk=pk, cfg=cfg)
    out_shape = jax.ShapeDtypeStruct(inputs["q"].shape, dtype)
    return pl.pallas_call(
        kernel, grid=_grid(cfg, P.batch * pk.programs_per_batch, tq.n_tiles), out_shape=out_shape,
        interpret=interpret,
        name="block_sparse_attention_dq",
        compiler_params=_compat.triton_compiler_params(num_warps=cfg.warps_dq, num_stages=cfg.stages_dq),
    )(*inputs.values())


def dkdv_call(P: blk.Problem, cfg: BwdConfig, inputs: dict, *, k_dtype, v_dtype, interpret):
    """dK, dV (and with ``cfg.fused_dq`` the float32 dQ·(1/scale) accumulated with atomics into
    ``inputs['dq_acc']``, which must be zeros [B*Sq*Hq, D])."""
    tq, tk, pk = plan_dkdv(P, cfg)
    names = list(inputs) + ["dk", "dv"] + (["dq_acc_out"] if cfg.fused_dq else [])
    kernel = functools.partial(_dkdv_kernel, P=P, names=names, tq=tq, tk=tk, pk=pk, cfg=cfg,
                               interpret=bool(interpret))
    out_shape = [jax.ShapeDtypeStruct(inputs["k"].shape, k_dtype), jax.ShapeDtypeStruct(inputs["v"].shape, v_dtype)]
    aliases = {}
    if cfg.fused_dq:
        out_shape.append(jax.ShapeDtypeStruct(inputs["dq_acc"].shape, jnp.float32))
        aliases = {list(inputs).index("dq_acc"): 2}
    return pl.pallas_call(
        kernel, grid=_grid(cfg, P.batch * P.num_kv_heads, tk.n_tiles), out_shape=out_shape, interpret=interpret,
        name="block_sparse_attention_dkdv", input_output_aliases=aliases,
        compiler_params=_compat.triton_compiler_params(num_warps=cfg.warps_dkv, num_stages=cfg.stages_dkv),
    )(*inputs.values())
