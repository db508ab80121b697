"""Forward block-sparse FlashAttention kernel (Pallas, Triton lowering).

Grid: (batch x head programs, query tiles), or (query tiles, batch x head programs)
with ``grid_order='tiles_first'`` (the tiles of one head run side by side and share
its K/V in L2). A program owns one query tile (of one head, or of the G heads of a
GQA group when packed), walks its row of the block tables (full blocks with no mask
work, the ragged last block bound-checked, partial blocks with the mask) and keeps
the online softmax in float32 with exp2 (log2(e)·scale folded into the exponent's FMA).

``lazy_rescale``: the running max used for the exponent is only moved (and the
accumulator rescaled) when some row's max grew by more than 2**RESCALE_LOG2 since the
last move — a block-uniform branch. Exact: o = acc / l and lse = m + log2(l) hold for
any reference max; p <= 2**RESCALE_LOG2 keeps every term finite in f32 / bf16 / fp16.

Inputs are the flattened operands q2 [B*Sq*Hq, D], k2/v2 [B*Skv*Hkv, D|Dv];
outputs o2 [B*Sq*Hq, Dv] (input dtype) and lse [B*Sq*Hq] float32 (natural log,
-inf for rows with no allowed key, whose output is 0), both in query-row order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import attention_tiling as tiling_lib
from pallas_kernels.triton import attention_blocks as blk
from pallas_kernels.triton import attention_configs as configs
from pallas_kernels.triton.attention_configs import FwdConfig
from sparse_jax import _compat

NEG_INF = float("-inf")
RESCALE_LOG2 = 8.0  # lazy rescale threshold: p = exp2(s - m_ref) stays <= 256


def _kernel(*refs, P: blk.Problem, names, tq, tk, pk, cfg: FwdConfig, n_splits: int):
    refs = dict(zip(names, refs))
    schedule = cfg.schedule
    n_qb = P.n_q_blocks
    if cfg.grid_order == "tiles_first":
        t, bh = pl.program_id(0), pl.program_id(1)
    else:
        bh, t = pl.program_id(0), pl.program_id(1)
    b = blk.div(bh, pk.programs_per_batch)
    head0 = blk.mod(bh, pk.programs_per_batch) * pk.heads
    hkv = blk.div(head0, P.group)
    slot, sub = blk.div(t, tq.n_sub), blk.mod(t, tq.n_sub)
    if schedule == "sorted" and n_qb > 1:
        qblk = refs["order"][blk.table_row(P, b, head0, hkv, slot, n_qb)]
    elif schedule == "reverse":
        qblk = n_qb - 1 - slot
    else:
        qblk = slot
    row = blk.table_row(P, b, head0, hkv, qblk, n_qb)

    qt = blk.q_tile(P, tq, pk, b, head0, qblk, sub)
    blk.load_q_meta(P, qt, b, refs)
    q = blk.load_rows(refs["q"], qt.base, qt.rel, qt.valid, P.head_dim, P.head_dim_pad)
    m_rows = q.shape[0]
    c = blk.log2_factor(P)

    def body(kvblk, kv_sub, carry, kind):
        acc, m, l = carry
        kt = blk.kv_tile(P, tk, b, hkv, kvblk, kv_sub, refs.get("perm"), bounds=blk.kind_needs_bounds(kind, tk))
        blk.load_kv_meta(P, kt, b, hkv, refs)
        k = blk.load_rows(refs["k"], kt.base, kt.rel, kt.valid, P.head_dim, P.head_dim_pad)
        s, _ = blk.scores(P, plgpu.dot(q, k, trans_b=True))
        allowed = blk.logit_mask(P, kind, b, qt, kt, transposed=False)
        if allowed is not None:
            s = jnp.where(allowed, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * c)
        if cfg.lazy_rescale:
            # Move the reference max only when some row outgrew it by 2**RESCALE_LOG2 (one
            # branch for the whole tile); otherwise p = exp2(s - m) <= 2**RESCALE_LOG2.
            grow = jnp.max(jnp.where(m_new > m + RESCALE_LOG2, 1, 0)) > 0

            def rescale(state):
                acc, l, m = state
                m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
                alpha = jnp.exp2(m - m_use)
                return acc * alpha[:, None], l * alpha, m_new

            acc, l, m = jax.lax.cond(grow, rescale, lambda state: state, (acc, l, m))
            m_use = m if allowed is None else jnp.where(m == NEG_INF, 0.0, m)
            p = jnp.exp2(s * c - m_use[:, None])
            l = l + jnp.sum(p, axis=1)
            v = blk.load_rows(refs["v"], kt.base, kt.rel, kt.valid, P.head_dim_v, P.head_dim_v_pad)
            return acc + plgpu.dot(p.astype(v.dtype), v), m, l
        # A row with nothing allowed yet keeps m = -inf; exponentiate against 0 then.
        m_use = m_new if allowed is None else jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s * c - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = blk.load_rows(refs["v"], kt.base, kt.rel, kt.valid, P.head_dim_v, P.head_dim_v_pad)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((m_rows, P.head_dim_v_pad), jnp.float32),
             jnp.full((m_rows,), NEG_INF, jnp.float32),
             jnp.zeros((m_rows,), jnp.float32))
    active = None
    if tq.n_sub_last < tq.n_sub:  # trailing tiles of a ragged last block hold no query
        active = qblk * P.block_q + sub * tq.tile < P.q_len
    walk = blk.Walk(tk, P.max_full_kv, P.max_kv, split_tail=True)
    split = (pl.program_id(2), n_splits) if n_splits > 1 else None
    acc, m, l = blk.walk(walk, (refs["full_num"], refs["full_idx"]), (refs["num"], refs["idx"]), row, carry,
                         body, active=active, split=split, prefetch_index=cfg.prefetch_index)

    has = l > 0
    o = acc * (1.0 / jnp.where(has, l, 1.0))[:, None]
    lse = jnp.where(has, (m + jnp.log2(jnp.where(has, l, 1.0))) * blk.LN2, NEG_INF)
    # lse in the query-row layout [B, Sq, Hq]: indices of masked lanes never alias valid ones.
    # With split-KV each split writes its own slab [split, B*Sq*Hq] (float32 o, merged later).
    out_base = qt.base if split is None else split[0] * (P.batch * P.q_len * P.num_q_heads) + qt.base
    blk.store_rows(refs["o"], out_base, qt.rel, qt.valid, o, P.head_dim_v)
    blk.store_vec(refs["lse"], out_base + qt.rel, qt.valid, lse)


def plan(P: blk.Problem, cfg: FwdConfig):
    """(query tiling, key tiling, head packing) of a forward launch."""
    pk = tiling_lib.head_packing(P.num_q_heads, P.num_kv_heads, P.table_heads, cfg.pack_gqa,
                                 q_span=min(P.block_q, P.q_len), tile_m=cfg.block_q)
    tq = tiling_lib.q_tiling(P.block_q, P.q_len, cfg.block_q, pk)
    tk = tiling_lib.fit_tile(P.block_kv, P.kv_len, cfg.block_kv)
    return tq, tk, pk


def num_splits(P: blk.Problem, cfg: FwdConfig) -> int:
    tq, tk, pk = plan(P, cfg)
    if cfg.num_splits is not None:
        return cfg.num_splits
    programs = P.batch * pk.programs_per_batch * tq.n_tiles
    return configs.auto_splits(programs, tq.tile, P.n_kv_blocks * tk.n_sub)


def call(P: blk.Problem, cfg: FwdConfig, inputs: dict, *, dtype, interpret):
    """Launch the forward kernel. ``inputs``: named flat arrays (see block_sparse_attention).

    Returns (o [R, Dv] dtype, lse [R]) with R = B*Sq*Hq in query-row order, or with split-KV
    (o float32 [splits, R, Dv], lse [splits, R]) partial states for :func:`merge_splits`.
    """
    tq, tk, pk = plan(P, cfg)
    splits = num_splits(P, cfg)
    names = list(inputs)
    out_names = ["o", "lse"]
    kernel = functools.partial(_kernel, P=P, names=names + out_names, tq=tq, tk=tk, pk=pk, cfg=cfg,
                               n_splits=splits)
    rows = P.batch * P.q_len * P.num_q_heads
    o_shape = lambda n: (n, P.head_dim_v)  # noqa: E731
    grid = (P.batch * pk.programs_per_batch, tq.n_tiles)
    if cfg.grid_order == "tiles_first":
        grid = grid[::-1]
    if splits > 1:
        out_shape = [jax.ShapeDtypeStruct(o_shape(splits * rows), jnp.float32),
                     jax.ShapeDtypeStruct((splits * rows,), jnp.float32)]
        grid = grid + (splits,)
    else:
        out_shape = [jax.ShapeDtypeStruct(o_shape(rows), dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)]
    o, lse = pl.pallas_call(
        kernel, grid=grid, out_shape=out_shape, interpret=interpret, name="block_sparse_attention_fwd",
        compiler_params=_compat.triton_compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(*inputs.values())
    if splits > 1:
        o, lse = merge_splits(o.reshape(splits, rows, -1), lse.reshape(splits, rows))
        o = o.astype(dtype)
    return o, lse


def merge_splits(o, lse):
    """Merge split-KV partial states: o float32 [n, R, Dv] (each normalised by its own sum),
    lse [n, R] (natural log, -inf for a split that saw nothing) -> (o [R, Dv], lse [R])."""
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)  # 0 for empty splits
    l = jnp.sum(w, axis=0)
    has = l > 0
    o = jnp.sum(w[..., None] * o, axis=0) / jnp.where(has, l, 1.0)[:, None]
    return o, jnp.where(has, m_safe + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
