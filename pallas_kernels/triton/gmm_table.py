"""The grouped-matmul schedule as ONE tiny Pallas-Triton kernel (one program).

Reads ``group_sizes`` and ``group_offset`` and writes the segment table of
:mod:`pallas_kernels.common.gmm_segments` (int32 [6, W]): group row bounds, the split
between the big- and small-tile launches (the cost model of
:func:`pallas_kernels.common.gmm_plan.split_rows`) and cumulative tile counts. The
forward kernels decode their work tiles from it; the weight-gradient kernel reads its
groups' row bounds. It replaces ~20 small XLA kernels (cumsums, compare-all searches,
gathers over the worst-case tile count) that cost ~0.2 ms per call on an H100.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import gmm_segments
from sparse_jax import _compat


def schedule_table(group_sizes, group_offset, *, num_rows: int, num_groups: int, tm0: int, tm1: int | None = None,
                   split=None, interpret: bool = False):
    """group_sizes int32 [G_total], group_offset int32 scalar or None -> int32 [6, W] table.

    See :func:`pallas_kernels.common.gmm_segments.segment_table` for tm0 / tm1 / split.
    """
    gt = group_sizes.shape[0]
    W = gmm_segments.table_width(gt)
    sizes = group_sizes.astype(jnp.int32)
    if gt != W:  # the kernel loads a power-of-two vector (a no-op for 8, 64, 256 experts)
        sizes = jnp.pad(sizes, (0, W - gt))
    off = (jnp.zeros((1,), jnp.int32) if group_offset is None
           else jnp.reshape(jnp.asarray(group_offset, jnp.int32), (1,)))

    def kernel(sizes_ref, off_ref, out_ref):
        rows = gmm_segments.segment_table(sizes_ref[...], off_ref[0], num_rows=num_rows, num_groups=num_groups,
                                          num_groups_total=gt, tm0=tm0, tm1=tm1, split=split)
        for r, v in enumerate(rows):
            out_ref[r, :] = v

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((gmm_segments.NUM_ROWS, W), jnp.int32),
        grid=(1,),
        compiler_params=_compat.triton_compiler_params(num_warps=8 if W >= 256 else 4, num_stages=1),
        interpret=interpret,
        name="gmm_schedule",
    )(sizes, off)
