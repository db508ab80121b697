"""TPU entry points of the grouped matmuls: schedule, tile choice, kernel launches.

Adaptive tile height: a row block that straddles groups is computed once per group
and every visited block re-reads its group's weights from HBM, so the best tile
height depends on the group sizes. The candidates' costs are modelled on device
(:func:`~pallas_kernels.common.gmm_plan.tpu_tile_cost`) and ``lax.switch`` runs the
cheapest -- a TPU conditional is resolved on the chip, no host sync.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Fusion, Tiles
from pallas_kernels.tpu import gmm as gmm_kernel
from pallas_kernels.tpu import tgmm as tgmm_kernel
from sparse_jax import _compat
from sparse_jax.group_metadata import local_group_bounds, metadata_from_rows

FORWARD_TILES = tuple(Tiles(tm, 512, 512) for tm in (128, 256, 512))
TRANSPOSED_TILES = tuple(Tiles(tm, 512, 512) for tm in (128, 256, 512))

# (bf16 TFLOP/s, HBM GB/s) per chip; unknown chips (and lowering without one) use v5e's.
_CHIPS = {"TPU v4": (275.0, 1200.0), "TPU v5 lite": (197.0, 819.0), "TPU v5e": (197.0, 819.0),
          "TPU v5p": (459.0, 2765.0), "TPU v6 lite": (918.0, 1640.0), "TPU v6e": (918.0, 1640.0)}


def _chip() -> tuple[float, float]:
    kind = jax.devices()[0].device_kind if _compat.has_platform("tpu") else ""
    return _CHIPS.get(kind, _CHIPS["TPU v5e"])


def _fit(t: Tiles, m: int, itemsize: int) -> Tiles:
    """Shrink tm to the rows there are (a multiple of the sublane packing)."""
    pack = 8 * (4 // itemsize)
    tm = min(t.tm, max(pack, -(-m // pack) * pack))
    return Tiles(tm, t.tn, t.tk)


def _candidates(default, which: str, m: int, itemsize: int) -> tuple[Tiles, ...]:
    ov = gmm_plan.current_override()
    chosen = getattr(ov, which) if ov is not None else None
    if chosen is not None:
        return chosen if isinstance(chosen, tuple) else (chosen,)
    return tuple(dict.fromkeys(_fit(t, m, itemsize) for t in default))


def _switch(cands, starts, ends, *, block_cost, branch):
    """Run ``branch(tiles)`` for the candidate the cost model picks (no switch for one).

    ``block_cost(tiles) -> (row_flops, block_bytes, steps_per_block)`` of one visited row block.
    """
    if len(cands) == 1:
        return branch(cands[0])
    tflops, gbps = _chip()
    costs = []
    for t in cands:
        row_flops, block_bytes, steps = block_cost(t)
        costs.append(gmm_plan.tpu_tile_cost(starts, ends, t.tm, row_flops=row_flops, block_bytes=block_bytes,
                                            steps_per_block=steps, tflops=tflops, bandwidth_gbps=gbps))
    return lax.switch(jnp.argmin(jnp.stack(costs)), [functools.partial(branch, t) for t in cands])


def forward(xs, ws, group_sizes, group_offset, *, fusion: Fusion, transpose_rhs: bool, out_dtypes,
            row_align: int = 1, interpret=False):
    """xs: fusion.num_lhs arrays [M, K]; ws: fusion.num_rhs arrays [G, K, N] ([G, N, K] transposed).

    ``row_align`` (the caller's promise on group sizes) is unused: BlockSpec tiles visit
    tm-aligned row blocks whatever the group starts.
    """
    del row_align
    M, K = xs[0].shape
    G = ws[0].shape[0]
    N = ws[0].shape[1] if transpose_rhs else ws[0].shape[2]
    itemsize = jnp.dtype(xs[0].dtype).itemsize
    starts, ends = local_group_bounds(group_sizes, M, G, group_offset)

    def branch(t: Tiles):
        meta = metadata_from_rows(starts, ends, num_rows=M, tile_m=t.tm, align="tile", zero_fill=True,
                                  visit_empty=False)
        return gmm_kernel.forward(xs, ws, meta, fusion=fusion, tiles=t, transpose_rhs=transpose_rhs,
                                  out_dtypes=out_dtypes, interpret=interpret)

    def block_cost(t: Tiles):
        tn, tk = gmm_kernel.block_dims(K, N, t)
        steps = gmm_plan.cdiv(N, tn) * gmm_plan.cdiv(K, tk)
        return 2.0 * K * N * fusion.num_terms, K * N * fusion.num_rhs * itemsize, steps

    cands = _candidates(FORWARD_TILES, "forward", M, itemsize)
    return _switch(cands, starts, ends, block_cost=block_cost, branch=branch)


def transposed(lhs, rhs, group_sizes, group_offset, *, num_groups: int, out_dtype, interpret=False):
    """lhs [M, K], rhs: tuple of [M, N] -> tuple of [num_groups, K, N]."""
    M, K = lhs.shape
    N = rhs[0].shape[1]
    itemsize = jnp.dtype(lhs.dtype).itemsize
    starts, ends = local_group_bounds(group_sizes, M, num_groups, group_offset)

    def branch(t: Tiles):
        meta = metadata_from_rows(starts, ends, num_rows=M, tile_m=t.tm, align="tile", zero_fill=False,
                                  visit_empty=True)
        return tgmm_kernel.transposed(lhs, rhs, meta, tiles=t, out_dtype=out_dtype, interpret=interpret)

    def block_cost(t: Tiles):
        tn, tk = gmm_kernel.block_dims(K, N, t)  # (tn, tk) of the [tk, tn] output block
        nt, kt = gmm_plan.cdiv(N, tn), gmm_plan.cdiv(K, tk)
        return 2.0 * K * N * len(rhs), t.tm * (K * nt + N * len(rhs) * kt) * itemsize, nt * kt

    cands = _candidates(TRANSPOSED_TILES, "transposed", M, itemsize)
    return _switch(cands, starts, ends, block_cost=block_cost, branch=branch)
