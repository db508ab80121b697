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

import jax.numpy as jnp

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Fusion, Tiles
from pallas_kernels.triton import gmm as gmm_kernel
from pallas_kernels.triton import gmm_table
from pallas_kernels.triton import tgmm as tgmm_kernel

# (big, small) per fusion kind for 2-byte inputs; benchmarks/tune_gmm.py sweeps them. "transposed":
# gmm / dual gmm with transpose_rhs (the input gradients): its weight tiles are read in
# tk-element rows N elements apart, so it may want longer K steps than the forward.
FORWARD_TILES = {
    "gmm": (gmm_kernel.BIG, gmm_kernel.SMALL),
    "transposed": (gmm_kernel.BIG, gmm_kernel.SMALL),
    "swiglu": (Tiles(128, 128, 64, num_warps=8, num_stages=3), Tiles(32, 64, 128, num_warps=4, num_stages=4)),
}
TRANSPOSED_TILES = (tgmm_kernel.DEFAULT, tgmm_kernel.FEW_ROWS)  # by mean rows per group: >= 64, < 64


def _for_itemsize(t: Tiles, itemsize: int) -> Tiles:
    """Halve the K step for 4-byte inputs so the pipeline buffers fit shared memory."""
    if itemsize <= 2:
        return t
    return t.replace(tk=max(16, t.tk * 2 // itemsize))


def forward_tiles(fusion: Fusion, itemsize: int, transpose_rhs: bool = False
                  ) -> tuple[tuple[Tiles, ...], str, gmm_plan.CostModel]:
    ov = gmm_plan.current_override()
    policy, cost = "split", gmm_plan.CostModel()
    if ov is not None:
        policy, cost = ov.policy, ov.cost or cost
        if ov.forward is not None:
            tiles = ov.forward if isinstance(ov.forward, tuple) else (ov.forward,)
            return tiles, policy, cost
    kind = "swiglu" if fusion.num_acc == 2 else "transposed" if transpose_rhs else "gmm"
    return tuple(_for_itemsize(t, itemsize) for t in FORWARD_TILES[kind]), policy, cost


def forward(xs, ws, group_sizes, group_offset, *, fusion: Fusion, transpose_rhs: bool, out_dtypes,
            interpret: bool = False):
    """xs: fusion.num_lhs arrays [M, K]; ws: fusion.num_rhs arrays [G, K, N] ([G, N, K] transposed)."""
    M, K = xs[0].shape
    G = ws[0].shape[0]
    N = ws[0].shape[1] if transpose_rhs else ws[0].shape[2]
    itemsize = jnp.dtype(xs[0].dtype).itemsize
    tiles, policy, cost = forward_tiles(fusion, itemsize, transpose_rhs)
    run = dict(fusion=fusion, transpose_rhs=transpose_rhs, out_dtypes=out_dtypes, interpret=interpret)
    sched = dict(num_rows=M, num_groups=G, interpret=interpret)
    if len(tiles) == 1 or policy in ("big", "small"):
        t = tiles[-1] if policy == "small" else tiles[0]
        table = gmm_table.schedule_table(group_sizes, group_offset, tm0=t.tm, **sched)
        return gmm_kernel.forward(xs, ws, table, launch=0, tiles=t, **run)
    big, small = tiles
    split = functools.partial(gmm_plan.split_rows, tm_big=big.tm, tm_small=small.tm, k=K, n=N,
                              num_rhs=fusion.num_rhs, itemsize=itemsize, cost=cost)
    table = gmm_table.schedule_table(group_sizes, group_offset, tm0=big.tm, tm1=small.tm, split=split, **sched)
    outs = gmm_kernel.forward(xs, ws, table, launch=0, tiles=big, **run)
    return gmm_kernel.forward(xs, ws, table, launch=1, tiles=small, existing=outs, **run)


def transposed(lhs, rhs, group_sizes, group_offset, *, num_groups: int, out_dtype, interpret: bool = False):
    """lhs [M, K], rhs: tuple of [M, N] -> tuple of [num_groups, K, N]."""
    M = lhs.shape[0]
    ov = gmm_plan.current_override()
    if ov is not None and ov.transposed is not None:
        tiles = ov.transposed
    else:
        many, few = TRANSPOSED_TILES
        tiles = _for_itemsize(many if M >= 64 * num_groups else few, jnp.dtype(lhs.dtype).itemsize)
    table = gmm_table.schedule_table(group_sizes, group_offset, num_rows=M, num_groups=num_groups, tm0=1,
                                     interpret=interpret)
    return tgmm_kernel.transposed(lhs, rhs, table, num_groups=num_groups, tiles=tiles, out_dtype=out_dtype,
                                  interpret=interpret)
