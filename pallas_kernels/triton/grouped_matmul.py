"""GPU entry points of the grouped matmuls: schedule, tile choice, kernel launches.

``forward`` runs a forward :class:`~pallas_kernels.common.gmm_plan.Fusion` (gmm, dual
gmm, SwiGLU) and ``transposed`` the weight-gradient kernel. Each first launches the
one-program schedule kernel (:mod:`pallas_kernels.triton.gmm_table`) on ``group_sizes``:
no XLA op runs between the caller's arrays and the matmul launches, and nothing syncs
with the host.

Adaptive tile height: each group's rows are split between a big-tile launch (full,
compute-bound tiles) and a small-tile launch (the tail of a group, or whole small
groups, where a big tile would mostly compute padding) by the cost model of
:func:`~pallas_kernels.common.gmm_plan.split_rows`, evaluated inside the schedule kernel.
Both launches always run (the second writes into the first's output buffer); a launch
with no tiles costs one launch of early-exiting programs. No ``lax.switch`` (an XLA:GPU
conditional reads its predicate on the host).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Fusion, Tiles
from pallas_kernels.mosaic_gpu import dispatch as mgpu_dispatch
from pallas_kernels.mosaic_gpu import gmm_fwd as mgpu_gmm
from pallas_kernels.mosaic_gpu import gmm_tiles
from pallas_kernels.triton import gmm as gmm_kernel
from pallas_kernels.triton import gmm_table
from pallas_kernels.triton import tgmm as tgmm_kernel

# (big, small) per fusion kind for 2-byte inputs; benchmarks/tune_gmm.py sweeps them. "transposed":
# gmm / dual gmm with transpose_rhs (the input gradients; round 2: its best tile is the forward's
# big tile, 621 TFLOP/s on Mixtral M=4096 -- longer K steps lost).
FORWARD_TILES = {
    "gmm": (gmm_kernel.BIG, gmm_kernel.SMALL),
    "transposed": (gmm_kernel.BIG, gmm_kernel.SMALL),
    "swiglu": (Tiles(128, 128, 64, num_warps=8, num_stages=3),
               Tiles(32, 64, 128, num_warps=4, num_stages=4, split_last_wave=False)),
}
# Small tile of a plain gmm from this many mean rows per group (M / G) up: a 64-row tile holds a
# whole group, so each group's weights are streamed by one tile row (measured only at 64 and 2
# rows per group; the threshold between them is the tile height, not a measured crossover).
WIDE_SMALL = {"gmm": gmm_kernel.SMALL_WIDE}
WIDE_SMALL_MIN_ROWS = 64
# Weight-gradient tiles by mean rows per group (M / G): >= 64 -> MANY_ROWS (MANY_ROWS_MULTI with
# several right operands or 4-byte inputs), fewer -> FEW_ROWS (see transposed_tiles).
TRANSPOSED_TILES = (tgmm_kernel.MANY_ROWS, tgmm_kernel.MANY_ROWS_MULTI, tgmm_kernel.FEW_ROWS)
TRANSPOSED_MIN_ROWS = 64
# Below TRANSPOSED_MIN_ROWS rows per group, one launch per right operand. H100 round 4 (tune_moe
# profile, Qwen2-MoE T=512 fwd+bwd, 32 rows per group): the SwiGLU backward's two-operand launch
# took 2277 us to write 2.35 GB of dW_gate and dW_up (ptxas: 255 registers, 1052 bytes of spills
# with FEW_ROWS' two 128x128 accumulators on 4 warps), the one-operand dW_down launch 447 us for
# 1.17 GB. The shared lhs read it saves is a few MB of L2 traffic.
TRANSPOSED_SPLIT_FEW_ROWS = True
# grouped_swiglu's forward: one fused kernel (gate and up from one read of x, SiLU in registers)
# only at <= 64 mean rows per group with F >= 8192; two gmm + silu*mul otherwise. H100 round 2
# (fused vs two gmm): Mixtral M=512 (64 rows, F=14336) fused 0.683 vs 0.710 ms -- the 63 MB of g/u/x
# traffic it saves, ~0.021 ms at 3 TB/s; Qwen2 M=4096 (64 rows, F=2560) 0.863 vs 0.866 (tie);
# Mixtral M=4096 (512 rows) 1.905 vs 1.798 and DeepSeek M=512 (2 rows, F=2048) 5.115 vs 4.991:
# the fused kernel's tiles (not swept yet) run at 505 vs 575 TFLOP/s compute-bound and stream
# weights ~2% slower. The rule keeps the one measured win and nothing else.
SWIGLU_FUSED_MAX_ROWS = 64
SWIGLU_FUSED_MIN_F = 8192
# One row of big tiles per group (H100 round 3, tune_moe "mid", Mixtral T=512 = 128 rows per
# group): gate and up as two gmm with big tiles only took 0.988 ms against 1.071 under the split
# (whose small-tile tails stream each group's weights a second time), the down gmm 0.487 vs 0.518.
# So from 65 to 128 mean rows per group a plain gmm runs big tiles only. (The fused SwiGLU with
# one 128x256 tile row was as fast, 0.981 ms, but needs 240 KB of shared memory and spills.)
ONE_TILE_ROW_MAX_ROWS = 128


def fuse_swiglu(num_rows: int, num_groups: int, k: int, f: int, *, dtype=jnp.bfloat16, row_align: int = 1) -> bool:
    """Whether grouped_swiglu's forward uses the fused kernel (static shapes; see SWIGLU_FUSED_*).

    Always where the Mosaic GPU forward takes it (aligned groups on Hopper): its fused epilogue
    writes h alone, where two gmm write g and u and an XLA pass reads them back.
    """
    if forward_impl(num_rows, num_groups, k, f, dtype=dtype, fusion=gmm_plan.SWIGLU, row_align=row_align) \
            == "mosaic_gpu":
        return True
    return num_rows <= SWIGLU_FUSED_MAX_ROWS * max(num_groups, 1) and f >= SWIGLU_FUSED_MIN_F


FWD_IMPL_ENV = "SPARSE_JAX_GPU_GMM_FWD"


def forward_impl(num_rows: int, num_groups: int, k: int, n: int, *, dtype, fusion: Fusion, row_align: int,
                 transpose_rhs: bool = False, out_dtypes=None, interpret: bool = False) -> str:
    """'mosaic_gpu' or 'triton': which kernel runs a forward of these static shapes.

    The Mosaic GPU forward (:mod:`pallas_kernels.mosaic_gpu.gmm_fwd`: TMA, warp-specialised)
    takes gmm and SwiGLU forwards over groups aligned to 8 rows (``row_align``) on Hopper.
    ``SPARSE_JAX_GPU_GMM_FWD`` = ``auto`` (default), ``triton`` or ``mosaic_gpu``. It runs only
    under ``mosaic_gpu``: on the H100 (benchmarks/notes/grouped_matmul.md, round 10) Mixtral's down
    projection at T = 512 took 0.416 ms in one process and 0.645-0.653 in two others (Triton
    0.459-0.474 throughout), and its fused SwiGLU took 0.898-0.930 against Triton's 0.850-0.862.
    Under ``auto`` it stays off until that spread is understood. Interpret mode and Triton tile overrides
    (``gmm_plan.override``) run Triton, and so do the forwards it is not built for (the backward's
    transposed and dual gmms, groups without the alignment promise) even under ``mosaic_gpu``:
    that switch insists only on the forwards it could take.
    """
    if mgpu_gmm.not_built_for(fusion=fusion, transpose_rhs=transpose_rhs, row_align=row_align) is not None:
        return "triton"
    sd = jax.ShapeDtypeStruct
    xs = (sd((num_rows, k), dtype),)
    ws = (sd((num_groups, k, n), dtype),) * fusion.num_rhs
    outs = out_dtypes if out_dtypes is not None else [dtype] * fusion.num_out

    def why():
        if os.environ.get(FWD_IMPL_ENV, "auto") == "auto":
            return "auto (opt-in: its H100 timings are bimodal, see the docstring)"
        return mgpu_gmm.unsupported(xs, ws, fusion=fusion, transpose_rhs=transpose_rhs, out_dtypes=outs,
                                    row_align=row_align)
    force = interpret or gmm_plan.current_override() is not None
    return mgpu_dispatch.choose(FWD_IMPL_ENV, why, force_triton=force)


def preferred_row_alignment(dtype, k: int, n: int, *, interpret: bool = False) -> int:
    """Group alignment under which the forwards of a [*, k] x [G, k, n] product should run here.

    8 only when ``SPARSE_JAX_GPU_GMM_FWD=mosaic_gpu`` asks for the Mosaic GPU forward and it takes
    the shapes; 1 otherwise. Under ``auto`` the MoE layer keeps its unpadded dispatch: in the H100
    measurements (round 10) padded dispatch + Mosaic GPU was within run-to-run spread of the
    Triton layer at T = 512 and 5 % slower at T = 2048 with only the down projection on it.
    """
    if os.environ.get(FWD_IMPL_ENV, "auto") != "mosaic_gpu":
        return 1
    a = gmm_tiles.ALIGN
    impl = forward_impl(a, 1, k, n, dtype=dtype, fusion=gmm_plan.GMM, row_align=a, interpret=interpret)
    return a if impl == "mosaic_gpu" else 1


# Few rows (decode): a launch has at most min(M, G + M // tm) row tiles, each streaming a
# tn-column strip of its group's weights. Mixtral at T = 1 has 2 groups x 4096 / 128 = 64 strips
# for the down projection on 132 SMs; narrower strips give more SMs a weight stream. H100 round 3
# (tune_moe, T = 1): 32-column strips lost everywhere (Mixtral gate+up 0.231 vs 0.201 ms), 64
# won where 128 left SMs idle (Qwen2 down, 4 groups x 28 strips: 0.055-0.058 vs 0.063-0.094 ms).
NARROW_MIN_TN = 64


def narrow_for_parallelism(t: Tiles, num_rows: int, num_groups: int, n: int, sms: int) -> Tiles:
    """``t`` with the column strip width that streams a few-row launch fastest.

    Static model of a weight-streaming launch: with fewer work items (the most possible
    row tiles x column strips) than SMs, each busy SM streams one strip (time ~ tn);
    with more, the SMs share the HBM stream (time ~ items / sms x tn). A narrower strip
    must save 10% (else the wider one keeps fewer re-reads of the rows, longer K loops).
    """
    row_tiles = min(num_rows, num_groups + num_rows // t.tm)

    def cost(tn):
        return max(row_tiles * gmm_plan.cdiv(n, tn) / sms, 1.0) * tn
    best = tn = gmm_plan.pow2_block(n, t.tn)
    while tn > NARROW_MIN_TN:
        tn //= 2
        if cost(tn) < 0.9 * cost(best):
            best = tn
    return t if best == gmm_plan.pow2_block(n, t.tn) else t.replace(tn=best)


def _for_itemsize(t: Tiles, itemsize: int) -> Tiles:
    """Halve the K step for 4-byte inputs so the pipeline buffers fit shared memory."""
    if itemsize <= 2:
        return t
    return t.replace(tk=max(16, t.tk * 2 // itemsize))


def forward_tiles(fusion: Fusion, itemsize: int, transpose_rhs: bool = False, num_rows: int = 0,
                  num_groups: int = 1, n: int = 0) -> tuple[tuple[Tiles, ...], str, gmm_plan.CostModel]:
    """(big, small) tiles, split policy and cost model for M = num_rows rows over G = num_groups
    groups and n output columns (static). Without an override, the split's small tile gets the
    strip width of :func:`narrow_for_parallelism` (n > 0)."""
    rows_per_group = num_rows / max(num_groups, 1)
    ov = gmm_plan.current_override()
    policy, cost = "split", gmm_plan.CostModel()
    if ov is not None:
        policy, cost = ov.policy, ov.cost or cost
        if ov.forward is not None:
            tiles = ov.forward if isinstance(ov.forward, tuple) else (ov.forward,)
            return tiles, policy, cost
    kind = "swiglu" if fusion.num_acc == 2 else "transposed" if transpose_rhs else "gmm"
    big, small = FORWARD_TILES[kind]
    if ov is None and kind == "gmm" and WIDE_SMALL_MIN_ROWS < rows_per_group <= ONE_TILE_ROW_MAX_ROWS:
        return (_for_itemsize(big, itemsize),), "big", cost
    if kind in WIDE_SMALL and rows_per_group >= WIDE_SMALL_MIN_ROWS:
        small = WIDE_SMALL[kind]
    if ov is None and n:
        small = narrow_for_parallelism(small, num_rows, num_groups, n, gmm_kernel.num_sms())
    return (_for_itemsize(big, itemsize), _for_itemsize(small, itemsize)), policy, cost


def _few_rows(num_rows: int, num_groups: int) -> bool:
    """Fewer than TRANSPOSED_MIN_ROWS mean rows per group: the weight gradient only writes."""
    return num_rows < TRANSPOSED_MIN_ROWS * num_groups


def transposed_tiles(num_rows: int, num_groups: int, num_rhs: int, itemsize: int) -> Tiles:
    """The weight-gradient kernel's tiles by mean rows per group and number of right operands."""
    many, many_multi, few = TRANSPOSED_TILES
    if _few_rows(num_rows, num_groups):
        t = few
    elif itemsize <= 2:
        t = many if num_rhs == 1 else many_multi
    else:  # 4-byte: K step halved, but the [tm, tn] rhs buffers are not: keep 3 stages under 227 KB
        t = many_multi if num_rhs == 1 else few
    return _for_itemsize(t, itemsize)


def forward(xs, ws, group_sizes, group_offset, *, fusion: Fusion, transpose_rhs: bool, out_dtypes,
            row_align: int = 1, interpret: bool = False):
    """xs: fusion.num_lhs arrays [M, K]; ws: fusion.num_rhs arrays [G, K, N] ([G, N, K] transposed).

    ``row_align``: the caller's promise that every group size is a multiple of it (8 lets the
    Mosaic GPU forward run, see :func:`forward_impl`).
    """
    M, K = xs[0].shape
    G = ws[0].shape[0]
    N = ws[0].shape[1] if transpose_rhs else ws[0].shape[2]
    if forward_impl(M, G, K, N, dtype=xs[0].dtype, fusion=fusion, row_align=row_align, transpose_rhs=transpose_rhs,
                    out_dtypes=out_dtypes, interpret=interpret) == "mosaic_gpu":
        return mgpu_gmm.forward(xs, ws, group_sizes, group_offset, fusion=fusion)
    itemsize = jnp.dtype(xs[0].dtype).itemsize
    tiles, policy, cost = forward_tiles(fusion, itemsize, transpose_rhs, M, G, N)
    run = dict(fusion=fusion, transpose_rhs=transpose_rhs, out_dtypes=out_dtypes, interpret=interpret)
    sched = dict(num_rows=M, num_groups=G, interpret=interpret)
    if len(tiles) == 1 or policy in ("big", "small"):
        t = tiles[-1] if policy == "small" else tiles[0]
        table = gmm_table.schedule_table(group_sizes, group_offset, tm0=t.tm, **sched)
        return gmm_kernel.forward(xs, ws, table, launch=0, tiles=t, **run)
    big, small = tiles
    if M < big.tm:  # no group can fill a big tile: skip its (empty) launch
        table = gmm_table.schedule_table(group_sizes, group_offset, tm0=small.tm, **sched)
        return gmm_kernel.forward(xs, ws, table, launch=0, tiles=small, **run)
    split = functools.partial(gmm_plan.split_rows, tm_big=big.tm, tm_small=small.tm, k=K, n=N,
                              num_rhs=fusion.num_rhs, itemsize=itemsize, cost=cost)
    table = gmm_table.schedule_table(group_sizes, group_offset, tm0=big.tm, tm1=small.tm, split=split, **sched)
    outs = gmm_kernel.forward(xs, ws, table, launch=0, tiles=big, **run)
    return gmm_kernel.forward(xs, ws, table, launch=1, tiles=small, existing=outs, **run)


def transposed(lhs, rhs, group_sizes, group_offset, *, num_groups: int, out_dtype, interpret: bool = False):
    """lhs [M, K], rhs: tuple of [M, N] -> tuple of [num_groups, K, N].

    Several right operands share one launch (each lhs tile read once) from
    TRANSPOSED_MIN_ROWS rows per group; below that the kernel only writes gradients, and
    one launch per operand is faster (see TRANSPOSED_SPLIT_FEW_ROWS).
    """
    M = lhs.shape[0]
    ov = gmm_plan.current_override()
    if ov is not None and ov.transposed is not None:
        tiles = ov.transposed
    else:
        tiles = transposed_tiles(M, num_groups, len(rhs), jnp.dtype(lhs.dtype).itemsize)
    table = gmm_table.schedule_table(group_sizes, group_offset, num_rows=M, num_groups=num_groups, tm0=1,
                                     interpret=interpret)
    run = dict(num_groups=num_groups, tiles=tiles, out_dtype=out_dtype, interpret=interpret)
    if len(rhs) > 1 and TRANSPOSED_SPLIT_FEW_ROWS and _few_rows(M, num_groups):
        return tuple(tgmm_kernel.transposed(lhs, (r,), table, **run)[0] for r in rhs)
    return tgmm_kernel.transposed(lhs, rhs, table, **run)
