"""Block-sparse FlashAttention backward on TPU: a dQ kernel and a dK/dV kernel.

Two kernels instead of one fused pass: a fused pass would have to accumulate dQ
across kv tiles that run as different programs, and TPUs have no atomics, so it
needs a [kv tiles x Sq] partial-dQ buffer. Separately, each kernel owns its
output and keeps it in VMEM for its whole row, at the cost of recomputing the
logits and dP once more (7 matmuls per pair instead of 5).

* dQ: grid ``(B, Hkv, q tiles, slots)`` over the row tables (like the forward);
  per step one K/V fetch serves the G query heads of the group.
  ``dq = scale * sum_kv dS k`` with ``dS = P * (dP - delta)``.
* dK/dV: grid ``(B, Hkv, kv tiles, slots)`` over the column tables (per kv tile,
  the active query tiles); per step one fetch of the group's Q / dO / lse / delta
  blocks, and every query head of the group accumulates into the same dK/dV in
  VMEM. Works in the transposed orientation ``[bkv, bq]`` so that every matmul is
  ``a @ b`` or ``a @ b.T`` and lse / delta are lane rows.
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
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _metas(r):
    return {k: r[k] for k in ("q_pos", "kv_pos", "q_seg", "kv_seg") if k in r}


def _dq_kernel(idx_ref, cnt_ref, words_ref, *refs, P: at.Problem, coarse: Coarse, meta: SlotTables,
               names: tuple[str, ...]):
    r = dict(zip(names, refs))
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bkv = coarse.tile_q, coarse.tile_kv
    G, D = P.group, P.head_dim
    row = meta.row(b, h, i)
    slot = row * meta.slots + j
    ragged_kv = P.kv_len % bkv != 0
    metas = _metas(r)

    @pl.when(j == 0)
    def _init():
        r["acc"][...] = jnp.zeros(r["acc"].shape, jnp.float32)

    @pl.when(j < cnt_ref[row])
    def _step():
        kv_blk = idx_ref[slot]
        base = slot * meta.words_per_slot
        q_start, kv_start = i * bq, kv_blk * bkv
        edge = (kv_blk == coarse.n_kv_tiles - 1) if ragged_kv else None

        def body(g, masked, partial):
            q = at.load_head(P, r["q"], g, D)
            do = at.load_head(P, r["do"], g, P.head_dim_v)
            k = r["k"][...]
            v = r["v"][...]
            if masked and ragged_kv:  # garbage rows past kv_len would turn 0 * x into NaN
                k = jnp.where(lax.broadcasted_iota(jnp.int32, k.shape, 0) + kv_start < P.kv_len, k, 0)
                v = jnp.where(lax.broadcasted_iota(jnp.int32, v.shape, 0) + kv_start < P.kv_len, v, 0)
            s = lax.dot_general(q, k, at.NT, preferred_element_type=jnp.float32, precision=P.precision)
            s, t = at.softcapped(P, s)
            if masked:
                allowed = at.tile_mask(P, coarse, words_ref, base, g if meta.head_fields > 1 else 0, s.shape,
                                       rows_are_q=True, b=b, hq=h * G + g, q_tile=i, kv_tile=kv_blk,
                                       refs=metas, partial=partial, bounds="kv" if ragged_kv else None)
            else:
                allowed = at.fast_mask(P, s.shape, rows_are_q=True, q_start=q_start, kv_start=kv_start,
                                       refs=metas)
            if allowed is not None:
                s = jnp.where(allowed, s, NEG_INF)
            lse = r["lse"][g][:, None]
            delta = r["delta"][g][:, None]
            p = jnp.exp(s - lse)
            dp = lax.dot_general(do, v, at.NT, preferred_element_type=jnp.float32, precision=P.precision)
            ds = p * (dp - delta)
            if t is not None:
                ds = ds * (1.0 - t * t)
            r["acc"][g] = r["acc"][g] + lax.dot_general(ds.astype(k.dtype), k, at.NN,
                                                        preferred_element_type=jnp.float32, precision=P.precision)

        at.dispatch_heads(P, coarse, meta, words_ref, base, edge=edge, body=body)

    @pl.when(j == meta.slots - 1)
    def _finish():
        for g in range(G):
            at.store_head(P, r["dq"], g, D, r["acc"][g] * P.scale)


def _dkv_kernel(idx_ref, cnt_ref, words_ref, *refs, P: at.Problem, coarse: Coarse, meta: SlotTables,
                names: tuple[str, ...]):
    r = dict(zip(names, refs))
    b, h, c, j = (pl.program_id(a) for a in range(4))
    bq, bkv = coarse.tile_q, coarse.tile_kv
    G, D, Dv = P.group, P.head_dim, P.head_dim_v
    row = meta.row(b, h, c)
    slot = row * meta.slots + j
    ragged_q = P.q_len % bq != 0
    metas = _metas(r)

    @pl.when(j == 0)
    def _init():
        r["dk_acc"][...] = jnp.zeros(r["dk_acc"].shape, jnp.float32)
        r["dv_acc"][...] = jnp.zeros(r["dv_acc"].shape, jnp.float32)

    @pl.when(j < cnt_ref[row])
    def _step():
        q_blk = idx_ref[slot]
        base = slot * meta.words_per_slot
        q_start, kv_start = q_blk * bq, c * bkv
        edge = (q_blk == coarse.n_q_tiles - 1) if ragged_q else None

        def body(g, masked, partial):
            q = at.load_head(P, r["q"], g, D)
            do = at.load_head(P, r["do"], g, Dv)
            lse = r["lse"][pl.ds(g, 1), :]  # [1, bq]
            delta = r["delta"][pl.ds(g, 1), :]
            if masked and ragged_q:  # query rows past q_len hold garbage; they must add exactly 0
                ok_cols = lax.broadcasted_iota(jnp.int32, (1, bq), 1) + q_start < P.q_len
                q = jnp.where(lax.broadcasted_iota(jnp.int32, q.shape, 0) + q_start < P.q_len, q, 0)
                do = jnp.where(lax.broadcasted_iota(jnp.int32, do.shape, 0) + q_start < P.q_len, do, 0)
                lse = jnp.where(ok_cols, lse, 0.0)
                delta = jnp.where(ok_cols, delta, 0.0)
            k = r["k"][...]
            v = r["v"][...]
            s = lax.dot_general(k, q, at.NT, preferred_element_type=jnp.float32, precision=P.precision)  # [bkv, bq]
            s, t = at.softcapped(P, s)
            if masked:
                allowed = at.tile_mask(P, coarse, words_ref, base, g if meta.head_fields > 1 else 0, s.shape,
                                       rows_are_q=False, b=b, hq=h * G + g, q_tile=q_blk, kv_tile=c,
                                       refs=metas, partial=partial, bounds="q" if ragged_q else None)
            else:
                allowed = at.fast_mask(P, s.shape, rows_are_q=False, q_start=q_start, kv_start=kv_start,
                                       refs=metas)
            if allowed is not None:
                s = jnp.where(allowed, s, NEG_INF)
            p = jnp.exp(s - lse)
            r["dv_acc"][...] += lax.dot_general(p.astype(do.dtype), do, at.NN, preferred_element_type=jnp.float32,
                                                precision=P.precision)
            dp = lax.dot_general(v, do, at.NT, preferred_element_type=jnp.float32, precision=P.precision)
            ds = p * (dp - delta)
            if t is not None:
                ds = ds * (1.0 - t * t)
            r["dk_acc"][...] += lax.dot_general(ds.astype(q.dtype), q, at.NN, preferred_element_type=jnp.float32,
                                                precision=P.precision)

        at.dispatch_heads(P, coarse, meta, words_ref, base, edge=edge, body=body)

    @pl.when(j == meta.slots - 1)
    def _finish():
        r["dk"][...] = (r["dk_acc"][...] * P.scale).astype(r["dk"].dtype)
        r["dv"][...] = r["dv_acc"][...].astype(r["dv"].dtype)


def _pallas(kernel, P, coarse, tables, grid, in_specs, out_specs, out_shape, scratch, names, args, *, interpret,
            vmem_limit_bytes, name, flops_per_pair):
    meta = at.table_meta(tables)
    work = P.batch * P.num_q_heads * grid[2] * meta.slots * coarse.tile_q * coarse.tile_kv
    return pl.pallas_call(
        functools.partial(kernel, P=P, coarse=coarse, meta=meta, names=names),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=_compat.tpu_compiler_params(dimension_semantics=_SEMANTICS,
                                                    vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=pl.CostEstimate(flops=int(flops_per_pair * work), transcendentals=int(work),
                                      bytes_accessed=int(sum(a.nbytes for a in args))),
        interpret=interpret,
        name=name,
    )(tables.index, tables.count, tables.words, *args)


def call_dq(P: at.Problem, coarse: Coarse, tables: SlotTables, q, k, v, do, lse, delta, metas: dict, *,
            interpret, vmem_limit_bytes=None):
    """dq [B, Sq, Hq, D] (q.dtype). lse/delta: float32 [B, Hkv, G, Sq] (lse +inf on empty rows)."""
    G, D, Dv = P.group, P.head_dim, P.head_dim_v
    bq, bkv = coarse.tile_q, coarse.tile_kv
    meta = at.table_meta(tables)
    grid = (P.batch, P.num_kv_heads, coarse.n_q_tiles, meta.slots)

    def q_index(b, h, i, j, *_):
        return b, h, i

    def kv_index(b, h, i, j, idx_ref, *_):
        return b, h, idx_ref[meta.row(b, h, i) * meta.slots + j]

    in_specs = [at.group_spec(P, bq, D, q_index), at.kv_spec(P, bkv, D, kv_index), at.kv_spec(P, bkv, Dv, kv_index),
                at.group_spec(P, bq, Dv, q_index), at.rowstat_spec(bq, G, q_index), at.rowstat_spec(bq, G, q_index)]
    in_specs += at.meta_specs(metas, rows_are_q=True, q_rows=bq, kv_rows=bkv,
                              q_index=lambda b, h, i, j, *_: (b, i),
                              kv_index=lambda b, h, i, j, idx_ref, *_: (b, idx_ref[meta.row(b, h, i) * meta.slots + j]))
    ql = at.to_layout(P, q)
    names = ("q", "k", "v", "do", "lse", "delta") + tuple(metas) + ("dq", "acc")
    args = (ql, at.to_layout(P, k), at.to_layout(P, v), at.to_layout(P, do), lse, delta, *metas.values())
    dq = _pallas(_dq_kernel, P, coarse, tables, grid, in_specs, at.group_spec(P, bq, D, q_index),
                 jax.ShapeDtypeStruct(ql.shape, q.dtype), [pltpu.VMEM((G, bq, D), jnp.float32)], names, args,
                 interpret=interpret, vmem_limit_bytes=vmem_limit_bytes,
                 name="sparse_jax_block_sparse_attention_dq_tpu", flops_per_pair=4 * D + 2 * Dv)
    return at.from_layout(P, dq, P.num_q_heads, D)


def call_dkv(P: at.Problem, coarse: Coarse, tables: SlotTables, q, k, v, do, lse, delta, metas: dict, *,
             interpret, vmem_limit_bytes=None):
    """(dk [B, Skv, Hkv, D], dv [B, Skv, Hkv, Dv]) in k's / v's dtypes."""
    G, D, Dv = P.group, P.head_dim, P.head_dim_v
    bq, bkv = coarse.tile_q, coarse.tile_kv
    meta = at.table_meta(tables)
    grid = (P.batch, P.num_kv_heads, coarse.n_kv_tiles, meta.slots)

    def q_index(b, h, c, j, idx_ref, *_):
        return b, h, idx_ref[meta.row(b, h, c) * meta.slots + j]

    def kv_index(b, h, c, j, *_):
        return b, h, c

    in_specs = [at.group_spec(P, bq, D, q_index), at.kv_spec(P, bkv, D, kv_index), at.kv_spec(P, bkv, Dv, kv_index),
                at.group_spec(P, bq, Dv, q_index), at.rowstat_spec(bq, G, q_index), at.rowstat_spec(bq, G, q_index)]
    in_specs += at.meta_specs(metas, rows_are_q=False, q_rows=bq, kv_rows=bkv,
                              q_index=lambda b, h, c, j, idx_ref, *_: (b, idx_ref[meta.row(b, h, c) * meta.slots + j]),
                              kv_index=lambda b, h, c, j, *_: (b, c))
    kl, vl = at.to_layout(P, k), at.to_layout(P, v)
    names = ("q", "k", "v", "do", "lse", "delta") + tuple(metas) + ("dk", "dv", "dk_acc", "dv_acc")
    args = (at.to_layout(P, q), kl, vl, at.to_layout(P, do), lse, delta, *metas.values())
    dk, dv = _pallas(_dkv_kernel, P, coarse, tables, grid, in_specs,
                     [at.kv_spec(P, bkv, D, kv_index), at.kv_spec(P, bkv, Dv, kv_index)],
                     [jax.ShapeDtypeStruct(kl.shape, k.dtype), jax.ShapeDtypeStruct(vl.shape, v.dtype)],
                     [pltpu.VMEM((bkv, D), jnp.float32), pltpu.VMEM((bkv, Dv), jnp.float32)], names, args,
                     interpret=interpret, vmem_limit_bytes=vmem_limit_bytes,
                     name="sparse_jax_block_sparse_attention_dkv_tpu", flops_per_pair=4 * D + 4 * Dv)
    return at.from_layout(P, dk, P.num_kv_heads, D), at.from_layout(P, dv, P.num_kv_heads, Dv)
