"""Grouped forward matmul kernels (gmm, dual gmm, fused SwiGLU) lowered through Mosaic TPU.

Megablox-style: the :class:`~sparse_jax.group_metadata.GroupMetadata` schedule
(``align="tile"``) is scalar-prefetched and the grid is (column blocks,
*active tiles* -- a traced size, so idle slots cost nothing, K blocks). A row
block shared by two groups is visited once per group, consecutively, so its output
block stays in VMEM and each visit overwrites only its group's rows; zero-fill
tiles (group -1) write the rows of no local group and fetch nothing new (their
operand block indices repeat).

Shapes: lhs[i] [M, K] (one dtype), rhs[j] [G, K, N] ([G, N, K] with
``transpose_rhs``), outputs [M, N]; float32 accumulation in VMEM scratch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Fusion, Tiles
from sparse_jax import _compat
from sparse_jax.group_metadata import GroupMetadata


def block_dims(k: int, n: int, tiles: Tiles) -> tuple[int, int]:
    """(tn, tk): lane-aligned blocks (or whole dims)."""
    return gmm_plan.tpu_block(n, tiles.tn, 128), gmm_plan.tpu_block(k, tiles.tk, 128)


def forward(xs, ws, meta: GroupMetadata, *, fusion: Fusion, tiles: Tiles, transpose_rhs: bool, out_dtypes,
            interpret=False):
    """Run ``fusion`` over the tiles of ``meta`` (align="tile", zero_fill); ``fusion.num_out`` arrays [M, N]."""
    if meta.align != "tile":
        raise ValueError("the TPU kernels need a tile-aligned schedule (align='tile')")
    M, K = xs[0].shape
    N = ws[0].shape[1] if transpose_rhs else ws[0].shape[2]
    tm = meta.tile_m
    tn, tk = block_dims(K, N, tiles)
    nt, nk = gmm_plan.cdiv(N, tn), gmm_plan.cdiv(K, tk)
    num_out = fusion.num_out
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    terms = [t for p in fusion.passes for t in p]

    def kernel(tg_ref, tr_ref, tlo_ref, thi_ref, *refs):
        x_refs = refs[:fusion.num_lhs]
        w_refs = refs[fusion.num_lhs:fusion.num_lhs + fusion.num_rhs]
        o_refs = refs[fusion.num_lhs + fusion.num_rhs:fusion.num_lhs + fusion.num_rhs + num_out]
        acc_refs = refs[len(refs) - fusion.num_acc:]
        t, kb = pl.program_id(1), pl.program_id(2)
        g = tg_ref[t]

        @pl.when(kb == 0)
        def _zero():
            for a in acc_refs:
                a[...] = jnp.zeros_like(a)

        @pl.when(g >= 0)
        def _accumulate():
            xs_t = [r[...] for r in x_refs]
            ws_t = [r[...] for r in w_refs]
            if K % tk:  # the last K block is ragged: zero its padding in both operands
                kx = kb * tk + lax.broadcasted_iota(jnp.int32, (tm, tk), 1)
                xs_t = [jnp.where(kx < K, x, 0) for x in xs_t]
                wshape = (tn, tk) if transpose_rhs else (tk, tn)
                kw = kb * tk + lax.broadcasted_iota(jnp.int32, wshape, 1 if transpose_rhs else 0)
                ws_t = [jnp.where(kw < K, w, 0) for w in ws_t]
            for i, j, a in terms:
                acc_refs[a][...] += lax.dot_general(xs_t[i], ws_t[j], dims, preferred_element_type=jnp.float32)

        @pl.when(kb == nk - 1)
        def _store():
            rows = tr_ref[t] + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mine = (rows >= tlo_ref[t]) & (rows < thi_ref[t])
            vals = gmm_plan.epilogue(fusion.epilogue, [a[...] for a in acc_refs])
            for o_ref, v in zip(o_refs, vals):
                v = jnp.where(g >= 0, v, 0.0)
                o_ref[...] = jnp.where(mine, v.astype(o_ref.dtype), o_ref[...])

    def x_map(n_i, t, kb, tg, tr, tlo, thi):
        return lax.div(tr[t], jnp.int32(tm)), jnp.where(tg[t] < 0, 0, kb)

    def w_map(n_i, t, kb, tg, tr, tlo, thi):
        g, kb = jnp.maximum(tg[t], 0), jnp.where(tg[t] < 0, 0, kb)
        return (g, n_i, kb) if transpose_rhs else (g, kb, n_i)

    def o_map(n_i, t, kb, tg, tr, tlo, thi):
        return lax.div(tr[t], jnp.int32(tm)), n_i

    w_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    in_specs = [pl.BlockSpec((tm, tk), x_map)] * fusion.num_lhs + [pl.BlockSpec(w_block, w_map)] * fusion.num_rhs
    itemsize = jnp.dtype(xs[0].dtype).itemsize
    cost = gmm_plan.gmm_cost(M, K, N, fusion, lhs_reads=nt, weight_reads=meta.max_tiles, itemsize=itemsize,
                             out_dtypes=out_dtypes)
    call = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((M, N), d) for d in out_dtypes],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(nt, meta.num_tiles[0], nk),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((tm, tn), o_map)] * num_out,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * fusion.num_acc,
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name=f"gmm_{fusion.name}_{tm}x{tn}x{tk}",
    )
    return tuple(call(meta.tile_group, meta.tile_row, meta.tile_lo, meta.tile_hi,
                      *[x.astype(xs[0].dtype) for x in xs], *ws))
