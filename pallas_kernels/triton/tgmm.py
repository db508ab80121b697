"""Grouped transposed matmul (weight gradient) lowered through Pallas-Triton.

``out[j][g] = lhs[rows of g].T @ rhs[j][rows of g]`` for one or more right operands
sharing each lhs tile (the SwiGLU backward gets dW_gate and dW_up from one read of x).

One program per (local group, tk-row block, tn-column block) of the output: it
walks its group's rows ``tm`` at a time (a dynamic-trip-count ``scf.for``, masked
row loads) and writes its output block once -- no atomics, and an empty group
writes zeros. Programs are ordered group-major, then in bands over (k, n) blocks
for L2 reuse of the lhs/rhs row panels.

Shapes: lhs [M, K], rhs[j] [M, N] (one dtype), outputs [G, K, N]; float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import gmm_plan, gmm_segments
from pallas_kernels.common.gmm_plan import Tiles
from pallas_kernels.triton.gmm import swizzle
from sparse_jax import _compat

# H100 round 2 (tune_gmm v2, one right operand): Mixtral M=4096 (512 rows per group) 64-row steps
# into 128x256 output blocks 438 TFLOP/s (64x128x128: 409); DeepSeek M=4096 (16 rows per group,
# bound by writing the 7.5 GB gradient) 32-row steps 49 TFLOP/s = 3.0 TB/s (others 36-41).
# MANY_ROWS_MULTI: the SwiGLU backward's two accumulators keep 128x128 blocks each (two 128x256
# float32 accumulators would not fit the register file; round-1 tile, compile-checked spill-free).
MANY_ROWS = Tiles(tm=64, tn=256, tk=128, num_warps=8, num_stages=3, band=8)
MANY_ROWS_MULTI = Tiles(tm=64, tn=128, tk=128, num_warps=8, num_stages=3, band=8)
FEW_ROWS = Tiles(tm=32, tn=128, tk=128, num_warps=4, num_stages=4, band=8)


def transposed(lhs, rhs, table, *, num_groups: int, tiles: Tiles, out_dtype, interpret: bool = False):
    """lhs [M, K], rhs: tuple of [M, N] -> tuple of [num_groups, K, N] (``out_dtype``).

    Local group g is global group ``OFF + g`` of ``table`` (int32 [6, W] from
    ``gmm_table.schedule_table``), rows [START, END); groups past the table's groups are
    empty. Needs no tile schedule: a program walks its group's rows itself.
    """
    M, K = lhs.shape
    N = rhs[0].shape[1]
    G = num_groups
    W = table.shape[1]
    S = gmm_segments
    tm = tiles.tm
    tk, tn = gmm_plan.pow2_block(K, tiles.tk), gmm_plan.pow2_block(N, tiles.tn)
    kt, nt = gmm_plan.cdiv(K, tk), gmm_plan.cdiv(N, tn)
    P = len(rhs)

    def kernel(tab_ref, x_ref, *refs):
        r_refs, o_refs = refs[:P], refs[P:]
        pid = pl.program_id(0)
        g = pid // (kt * nt)
        kb, nb = swizzle(pid % (kt * nt), kt, nt, tiles.band)
        h = tab_ref[S.SCALARS, S.OFF] + g
        hc = jnp.minimum(h, W - 1)
        start = tab_ref[S.START, hc]
        end = jnp.where(h < W, tab_ref[S.END, hc], start)  # columns past G_total hold empty groups
        ks = kb * tk + lax.broadcasted_iota(jnp.int32, (tk,), 0)
        ns = nb * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0)
        k_ok, n_ok = ks < K, ns < N

        def step(i, accs):
            r0 = start + i * tm
            row_ok = (r0 + lax.broadcasted_iota(jnp.int32, (tm,), 0)) < end
            x_mask = row_ok[:, None] & k_ok[None, :] if K % tk else row_ok[:, None]
            r_mask = row_ok[:, None] & n_ok[None, :] if N % tn else row_ok[:, None]
            x = plgpu.load(x_ref.at[pl.ds(r0, tm), pl.ds(kb * tk, tk)], mask=x_mask, other=0.0)
            out = []
            for acc, r_ref in zip(accs, r_refs):
                r = plgpu.load(r_ref.at[pl.ds(r0, tm), pl.ds(nb * tn, tn)], mask=r_mask, other=0.0)
                out.append(acc + lax.dot_general(x, r, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
            return tuple(out)

        steps = (jnp.maximum(end - start, 0) + tm - 1) // tm
        accs = lax.fori_loop(0, steps, step, tuple(jnp.zeros((tk, tn), jnp.float32) for _ in range(P)))
        for o_ref, acc in zip(o_refs, accs):
            plgpu.store(o_ref.at[g, pl.ds(kb * tk, tk), pl.ds(nb * tn, tn)], acc.astype(o_ref.dtype),
                        mask=k_ok[:, None] & n_ok[None, :] if K % tk or N % tn else None)

    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = gmm_plan.tgmm_cost(M, K, N, G, P, n_tiles=nt, k_tiles=kt, itemsize=itemsize, out_dtype=out_dtype)
    call = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((G, K, N), out_dtype) for _ in range(P)],
        grid=(G * kt * nt,),
        compiler_params=_compat.triton_compiler_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        cost_estimate=cost,
        name=f"tgmm_{P}_{tm}x{tk}x{tn}",
    )
    return tuple(call(table, lhs, *[r.astype(lhs.dtype) for r in rhs]))
