"""Grouped forward matmul kernels (gmm, dual gmm, fused SwiGLU) lowered through Pallas-Triton.

Work items are (row tile, tn-column block). Row tiles come from the segment table of
:mod:`pallas_kernels.common.gmm_segments` (built by ``gmm_table.schedule_table``): a program
decodes tile t with one compare-and-count over the table's [W] cumulative tile counts and
two scalar loads -- there is no per-slot schedule array and no XLA work before the launch.
The launch is persistent: ``occupancy`` programs per SM each walk the *active* items
``pid, pid + P, ...`` (a dynamic-trip-count loop), so a static worst-case tile count costs
nothing -- with one program per slot a DeepSeek-size schedule would launch ~20k programs
that only find they have no work (about 1 us of SM time each). Items are ordered in bands
of ``band`` row tiles per column block, so the tiles of one group stream the same weight
block through L2 together. Row tiles are group-aligned (a tile never straddles groups;
stores are row-masked); zero-fill tiles (launch 0 only) write the rows of no local group.
The K loop is an ``scf.for`` Triton software-pipelines with ``num_stages`` buffers.

Shapes: lhs[i] [M, K] (all one dtype), rhs[j] [G, K, N] ([G, N, K] with
``transpose_rhs``), outputs [M, N]; float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import gmm_plan, gmm_segments
from pallas_kernels.common.gmm_plan import Fusion, Tiles
from sparse_jax import _compat

# Defaults for an H100 (benchmarks/notes/grouped_matmul.md, round 2): big tiles for full,
# compute-bound row tiles (575 TFLOP/s Mixtral M=4096; also the best transpose_rhs tile, 621);
# small tiles for the tails of groups and whole small groups (weight streaming): SMALL for
# few rows per group (DeepSeek M=512, 2 rows: 3033 GB/s, every candidate within 2%), SMALL_WIDE
# from 64 rows per group (Mixtral M=512: 0.340 ms vs 0.369 for SMALL, one tile per group).
BIG = Tiles(tm=128, tn=256, tk=64, num_warps=8, num_stages=3, band=8)
SMALL = Tiles(tm=32, tn=128, tk=128, num_warps=4, num_stages=4, band=8)
SMALL_WIDE = Tiles(tm=64, tn=256, tk=64, num_warps=8, num_stages=3, band=8)


def swizzle(pid, rows: int, cols: int, band: int):
    """Program id -> (row tile, column block): column-major inside bands of ``band`` row tiles."""
    per_band = band * cols
    first = (pid // per_band) * band
    height = jnp.minimum(rows - first, band)
    r = pid % per_band
    return first + r % height, r // height


def num_sms() -> int:
    """Streaming multiprocessors of the GPU (an H100's 132 when lowering without one)."""
    if _compat.has_platform("gpu"):
        return int(getattr(jax.devices("gpu")[0], "core_count", 132) or 132)
    return 132


def _block_dims(k: int, n: int, tiles: Tiles) -> tuple[int, int]:
    return gmm_plan.pow2_block(n, tiles.tn), gmm_plan.pow2_block(k, tiles.tk)


def forward(xs, ws, table, *, launch: int, fusion: Fusion, tiles: Tiles, transpose_rhs: bool, out_dtypes,
            interpret: bool = False, existing=None):
    """Run ``fusion`` over launch ``launch``'s tiles of ``table``; returns ``fusion.num_out`` arrays [M, N].

    ``table``: int32 [6, W] from ``gmm_table.schedule_table`` built with tm_{launch} = tiles.tm.
    ``existing`` (outputs of an earlier launch over other rows) are aliased to the outputs:
    rows this launch does not visit keep their values.
    """
    M, K = xs[0].shape
    G = ws[0].shape[0]
    N = ws[0].shape[1] if transpose_rhs else ws[0].shape[2]
    tm = tiles.tm
    tn, tk = _block_dims(K, N, tiles)
    nt, nk = gmm_plan.cdiv(N, tn), gmm_plan.cdiv(K, tk)
    mask_k, mask_n = K % tk != 0, N % tn != 0
    clamp_rows = M >= tm
    in_dtype = xs[0].dtype
    num_out = fusion.num_out
    W = table.shape[1]

    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    slots = gmm_segments.max_tiles(M, tm, G, launch) * nt
    persistent = tiles.occupancy > 0
    programs = min(slots, tiles.programs or num_sms() * tiles.occupancy) if persistent else slots
    count = gmm_segments.TOTAL0 if launch == 0 else gmm_segments.G1

    def kernel(tab_ref, *refs):
        x_refs = refs[:fusion.num_lhs]
        w_refs = refs[fusion.num_lhs:fusion.num_lhs + fusion.num_rhs]
        o_refs = refs[len(refs) - num_out:]
        active = tab_ref[gmm_segments.SCALARS, count]

        def work_item(w):
            """Row tile x column block number ``w`` (< active * nt)."""
            t, nb = swizzle(w, active, nt, tiles.band)
            g, row0, hi = gmm_segments.decode(t, launch=launch, tm=tm, num_rows=M,
                                              row=lambda r: tab_ref[r, pl.ds(0, W)], at=lambda r, i: tab_ref[r, i])
            lo = row0
            if clamp_rows:
                # Keep the [tm] row block inside lhs, so its loads need no row mask: the rows
                # outside [lo, hi) it reads belong to other groups and are never stored (row i
                # of the product depends on row i of lhs only). Saves registers in the K loop.
                row0 = jnp.minimum(row0, M - tm)
            rows = row0 + lax.broadcasted_iota(jnp.int32, (tm,), 0)
            row_ok = (rows >= lo) & (rows < hi)
            cols = nb * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0)
            out_mask = row_ok[:, None] & (cols < N)[None, :] if mask_n else jnp.broadcast_to(row_ok[:, None], (tm, tn))
            rows_ds, cols_ds = pl.ds(row0, tm), pl.ds(nb * tn, tn)

            def step(terms, kb, accs):
                """One K step of one pass: load each tile its terms use once, accumulate every term."""
                k0 = pl.multiple_of(kb * tk, tk)
                k_ok = (k0 + lax.broadcasted_iota(jnp.int32, (tk,), 0)) < K
                if clamp_rows:
                    x_mask = jnp.broadcast_to(k_ok[None, :], (tm, tk)) if mask_k else None
                else:
                    x_mask = row_ok[:, None] & k_ok[None, :] if mask_k else row_ok[:, None]
                w_masks = []
                if mask_n:
                    w_masks.append((cols < N)[:, None] if transpose_rhs else (cols < N)[None, :])
                if mask_k:
                    w_masks.append(k_ok[None, :] if transpose_rhs else k_ok[:, None])
                w_mask = functools.reduce(jnp.logical_and, w_masks) if w_masks else None
                w_idx = (g, cols_ds, pl.ds(k0, tk)) if transpose_rhs else (g, pl.ds(k0, tk), cols_ds)
                x_t = {i: plgpu.load(x_refs[i].at[rows_ds, pl.ds(k0, tk)], mask=x_mask,
                                     other=None if x_mask is None else 0.0)
                       for i in sorted({i for i, _, _ in terms})}
                w_t = {j: plgpu.load(w_refs[j].at[w_idx], mask=w_mask, other=None if w_mask is None else 0.0)
                       for j in sorted({j for _, j, _ in terms})}
                accs = list(accs)
                for i, j, a in terms:
                    accs[a] = accs[a] + lax.dot_general(x_t[i], w_t[j], dims, preferred_element_type=jnp.float32)
                return tuple(accs)

            @pl.when(g >= 0)
            def _compute():
                accs = tuple(jnp.zeros((tm, tn), jnp.float32) for _ in range(fusion.num_acc))
                for terms in fusion.passes:
                    accs = lax.fori_loop(0, nk, functools.partial(step, terms), accs)
                for o_ref, val in zip(o_refs, gmm_plan.epilogue(fusion.epilogue, accs)):
                    plgpu.store(o_ref.at[rows_ds, cols_ds], val.astype(o_ref.dtype), mask=out_mask)

            @pl.when(g < 0)
            def _zero_fill():
                for o_ref in o_refs:
                    plgpu.store(o_ref.at[rows_ds, cols_ds], jnp.zeros((tm, tn), o_ref.dtype), mask=out_mask)

        pid = pl.program_id(0)
        if persistent:
            trips = jnp.maximum(active * nt - pid + programs - 1, 0) // programs

            def loop_body(i, carry):
                work_item(pid + i * programs)
                return carry

            lax.fori_loop(0, trips, loop_body, jnp.int32(0))
        else:
            @pl.when(pid < active * nt)
            def _():
                work_item(pid)

    out_shape = [jax.ShapeDtypeStruct((M, N), dt) for dt in out_dtypes]
    args = [table, *[x.astype(in_dtype) for x in xs], *ws]
    aliases = {}
    if existing is not None:
        aliases = {len(args) + i: i for i in range(num_out)}
        args += list(existing)
    itemsize = jnp.dtype(in_dtype).itemsize
    cost = gmm_plan.gmm_cost(M, K, N, fusion, lhs_reads=nt, weight_reads=G, itemsize=itemsize, out_dtypes=out_dtypes)
    call = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(programs,),
        input_output_aliases=aliases,
        compiler_params=_compat.triton_compiler_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        cost_estimate=cost,
        name=f"gmm_{fusion.name}_{tm}x{tn}x{tk}",
    )
    return tuple(call(*args))
