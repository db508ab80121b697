"""Block-sparse FlashAttention forward on TPU (Pallas / Mosaic).

Grid ``(B, Hkv, q tiles, slots)``: one program per (batch, kv head, query tile)
walks the tile row's list of active kv tiles (scalar-prefetched into SMEM; the
K/V index maps follow the list, so skipped tiles cost neither DMA nor compute).
Slots past a row's count repeat the last index (no new DMA) and do no work; the
slot axis is innermost and "arbitrary", so the output block of a row is written
once, at the last slot. Each K/V tile is loaded once for the whole GQA group:
the G query heads of the group sit in one query block and are processed in turn
against it, each with its own running max / sum / accumulator in VMEM.

Online softmax in float32: running max ``m`` and sum ``l`` are kept lane-replicated
``[G, bq, 128]`` (no relayout per step); rows with no allowed key so far keep
``m = -inf`` and contribute nothing; at the end such rows get o = 0, lse = -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.coarse_tables import Coarse, SlotTables
from pallas_kernels.tpu import attention_tiles as at
from sparse_jax import _compat

NEG_INF = float("-inf")


def _kernel(idx_ref, cnt_ref, words_ref, *refs, P: at.Problem, coarse: Coarse, meta: SlotTables,
            names: tuple[str, ...]):
    r = dict(zip(names, refs))
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bkv = coarse.tile_q, coarse.tile_kv
    G, D, Dv = P.group, P.head_dim, P.head_dim_v
    row = meta.row(b, h, i)
    slot = row * meta.slots + j
    ragged_kv = P.kv_len % bkv != 0
    metas = {k: r[k] for k in ("q_pos", "kv_pos", "q_seg", "kv_seg") if k in r}

    @pl.when(j == 0)
    def _init():
        r["m"][...] = jnp.full(r["m"].shape, NEG_INF, jnp.float32)
        r["l"][...] = jnp.zeros(r["l"].shape, jnp.float32)
        r["acc"][...] = jnp.zeros(r["acc"].shape, jnp.float32)

    @pl.when(j < cnt_ref[row])
    def _step():
        kv_blk = idx_ref[slot]
        base = slot * meta.words_per_slot
        q_start, kv_start = i * bq, kv_blk * bkv
        edge = (kv_blk == coarse.n_kv_tiles - 1) if ragged_kv else None

        def body(g, masked, partial):
            q = at.load_head(P, r["q"], g, D)
            k = r["k"][...]
            v = r["v"][...]
            if masked and ragged_kv:  # rows past kv_len hold garbage; p = 0 there, but 0 * NaN = NaN
                v = jnp.where(lax.broadcasted_iota(jnp.int32, v.shape, 0) + kv_start < P.kv_len, v, 0)
            s = lax.dot_general(q, k, at.NT, preferred_element_type=jnp.float32, precision=P.precision)
            s, _ = at.softcapped(P, s)
            if masked:
                allowed = at.tile_mask(P, coarse, words_ref, base, g if meta.head_fields > 1 else 0, s.shape,
                                       rows_are_q=True, b=b, hq=h * G + g, q_tile=i, kv_tile=kv_blk,
                                       refs=metas, partial=partial, bounds="kv" if ragged_kv else None)
            else:
                allowed = at.fast_mask(P, s.shape, rows_are_q=True, q_start=q_start, kv_start=kv_start,
                                       refs=metas)
            if allowed is not None:
                s = jnp.where(allowed, s, NEG_INF)
            m_prev = r["m"][g]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
            p = jnp.exp(s - at.widen(m_use, bkv))
            alpha = jnp.exp(m_prev - m_use)
            r["m"][g] = m_new
            r["l"][g] = alpha * r["l"][g] + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v.dtype), v, at.NN, preferred_element_type=jnp.float32,
                                 precision=P.precision)
            r["acc"][g] = r["acc"][g] * at.widen(alpha, Dv) + pv

        at.dispatch_heads(P, coarse, meta, words_ref, base, edge=edge, body=body)

    @pl.when(j == meta.slots - 1)
    def _finish():
        for g in range(G):
            l = r["l"][g]
            live = l > 0
            inv = jnp.where(live, 1.0 / jnp.where(live, l, 1.0), 0.0)
            at.store_head(P, r["o"], g, Dv, r["acc"][g] * at.widen(inv, Dv))
            lse = jnp.where(live, r["m"][g] + jnp.log(jnp.where(live, l, 1.0)), NEG_INF)  # [bq, 128]
            r["lse"][pl.ds(g, 1), :] = jnp.transpose(lse)[0:1, :]


def call(P: at.Problem, coarse: Coarse, tables: SlotTables, q, k, v, metas: dict, *, interpret,
         vmem_limit_bytes=None):
    """q [B, Sq, Hq, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, Dv] -> (o [B, Sq, Hq, Dv], lse f32 [B, Hq, Sq]).

    ``metas``: positions / segment ids from :func:`attention_tiles.meta_arrays` (rows are queries).
    """
    B, Hkv, G = P.batch, P.num_kv_heads, P.group
    D, Dv = P.head_dim, P.head_dim_v
    bq, bkv = coarse.tile_q, coarse.tile_kv
    meta = at.table_meta(tables)
    grid = (B, Hkv, coarse.n_q_tiles, meta.slots)

    def q_index(b, h, i, j, *_):
        return b, h, i

    def kv_index(b, h, i, j, idx_ref, *_):
        return b, h, idx_ref[meta.row(b, h, i) * meta.slots + j]

    in_specs = [at.group_spec(P, bq, D, q_index), at.kv_spec(P, bkv, D, kv_index), at.kv_spec(P, bkv, Dv, kv_index)]
    in_specs += at.meta_specs(metas, rows_are_q=True, q_rows=bq, kv_rows=bkv,
                              q_index=lambda b, h, i, j, *_: (b, i),
                              kv_index=lambda b, h, i, j, idx_ref, *_: (b, idx_ref[meta.row(b, h, i) * meta.slots + j]))
    out_specs = [at.group_spec(P, bq, Dv, q_index), at.rowstat_spec(bq, G, q_index)]
    scratch = [pltpu.VMEM((G, bq, at.LANES), jnp.float32), pltpu.VMEM((G, bq, at.LANES), jnp.float32),
               pltpu.VMEM((G, bq, Dv), jnp.float32)]
    names = ("q", "k", "v") + tuple(metas) + ("o", "lse", "m", "l", "acc")
    ql = at.to_layout(P, q)
    o_shape = jax.ShapeDtypeStruct(ql.shape[:-1] + (ql.shape[-1] // D * Dv,), q.dtype) if P.folded else \
        jax.ShapeDtypeStruct(ql.shape[:-1] + (Dv,), q.dtype)
    out_shape = [o_shape, jax.ShapeDtypeStruct((B, Hkv, G, P.q_len), jnp.float32)]
    kernel = functools.partial(_kernel, P=P, coarse=coarse, meta=meta, names=names)
    work = B * P.num_q_heads * coarse.n_q_tiles * meta.slots * bq * bkv
    o, lse = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=_compat.tpu_compiler_params(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=pl.CostEstimate(flops=2 * work * (D + Dv), transcendentals=work,
                                      bytes_accessed=int(q.nbytes * 2 + (k.nbytes + v.nbytes) * coarse.n_q_tiles)),
        interpret=interpret,
        name="sparse_jax_block_sparse_attention_fwd_tpu",
    )(tables.index, tables.count, tables.words, ql, at.to_layout(P, k), at.to_layout(P, v), *metas.values())
    return at.from_layout(P, o, P.num_q_heads, Dv), lse.reshape(B, P.num_q_heads, P.q_len)
