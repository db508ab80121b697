"""Grouped transposed matmul (weight gradient) lowered through Mosaic TPU.

``out[j][g] = lhs[rows of g].T @ rhs[j][rows of g]`` for one or more right operands
sharing each lhs tile. Grid (column blocks, K blocks, *active tiles* of a
``visit_empty`` tile-aligned schedule): the tiles of a group are consecutive, so its
output block stays in VMEM while they accumulate into scratch; it is written when
the group changes. An empty group has one empty tile and writes zeros.

Shapes: lhs [M, K], rhs[j] [M, N] (one dtype), outputs [G, K, N]; float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Tiles
from sparse_jax import _compat
from sparse_jax.group_metadata import GroupMetadata


def transposed(lhs, rhs, meta: GroupMetadata, *, tiles: Tiles, out_dtype, interpret=False):
    """lhs [M, K], rhs: tuple of [M, N], ``meta`` (align="tile", visit_empty) -> tuple of [G, K, N]."""
    if meta.align != "tile":
        raise ValueError("the TPU kernels need a tile-aligned schedule (align='tile')")
    M, K = lhs.shape
    N = rhs[0].shape[1]
    G = meta.num_groups
    tm = meta.tile_m
    tn, tk = gmm_plan.tpu_block(N, tiles.tn, 128), gmm_plan.tpu_block(K, tiles.tk, 128)
    nt, kt = gmm_plan.cdiv(N, tn), gmm_plan.cdiv(K, tk)
    P = len(rhs)

    def kernel(tg_ref, tr_ref, tlo_ref, thi_ref, x_ref, *refs):
        r_refs, o_refs, acc_refs = refs[:P], refs[P:2 * P], refs[2 * P:]
        t, last = pl.program_id(2), pl.num_programs(2) - 1
        g = tg_ref[t]

        @pl.when((t == 0) | (tg_ref[jnp.maximum(t - 1, 0)] != g))
        def _zero():
            for a in acc_refs:
                a[...] = jnp.zeros_like(a)

        @pl.when(thi_ref[t] > tlo_ref[t])
        def _accumulate():
            rows = tr_ref[t] + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            mine = (rows >= tlo_ref[t]) & (rows < thi_ref[t])
            x = jnp.where(mine, x_ref[...], 0)  # padding rows may hold anything, NaN included
            for r_ref, a in zip(r_refs, acc_refs):
                r = jnp.where(mine, r_ref[...], 0)
                a[...] += lax.dot_general(x, r, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        @pl.when((t == last) | (tg_ref[jnp.minimum(t + 1, last)] != g))
        def _store():
            for o_ref, a in zip(o_refs, acc_refs):
                o_ref[...] = a[...].astype(o_ref.dtype)

    def x_map(n_i, k_i, t, tg, tr, tlo, thi):
        return lax.div(tr[t], jnp.int32(tm)), k_i

    def r_map(n_i, k_i, t, tg, tr, tlo, thi):
        return lax.div(tr[t], jnp.int32(tm)), n_i

    def o_map(n_i, k_i, t, tg, tr, tlo, thi):
        return tg[t], k_i, n_i

    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = gmm_plan.tgmm_cost(M, K, N, G, P, n_tiles=nt, k_tiles=kt, itemsize=itemsize, out_dtype=out_dtype)
    call = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((G, K, N), out_dtype) for _ in range(P)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(nt, kt, meta.num_tiles[0]),
            in_specs=[pl.BlockSpec((tm, tk), x_map)] + [pl.BlockSpec((tm, tn), r_map)] * P,
            out_specs=[pl.BlockSpec((None, tk, tn), o_map)] * P,
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)] * P,
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name=f"tgmm_{P}_{tm}x{tk}x{tn}",
    )
    return tuple(call(meta.tile_group, meta.tile_row, meta.tile_lo, meta.tile_hi, lhs,
                      *[r.astype(lhs.dtype) for r in rhs]))
