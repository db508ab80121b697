"""The decode expert kernel (a few tokens' k experts by id, one launch) lowered through Mosaic TPU.

Work items and their math: :mod:`pallas_kernels.common.decode_plan`. The expert ids and
routing weights are scalar-prefetched, so each weight block's index map reads its
assignment's expert: no sort, no group schedule. Grid (N, F/tn): step (a, f) takes the
[D, tn] strip blocks of w_gate and w_up (the whole contraction, so h is final in the step)
and the [tn, D] rows of w_down, and adds its partial into the assignment's [1, D] float32
output block, which stays in VMEM while the core walks that assignment's strips in order.
The caller sums each token's k outputs.

A ragged last strip is zeroed in h and in the w_down rows (whatever the padding holds).
VMEM: two buffers of 3 D tn weight elements (11 MB at D = 7168, tn = 128 in bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.decode_plan import DecodeTiles
from sparse_jax import _compat

TILES = DecodeTiles(tn=128)
_VMEM_HEADROOM = 4 << 20


def experts_by_id(x, weights, ids, w_gate, w_up, w_down, *, top_k: int, tiles: DecodeTiles | None = None,
                  interpret=False):
    """y float32 [T, D] = sum_j weights[t k + j] * SwiGLU_{ids[t k + j]}(x[t]).

    x [T, D]; weights float32 [N = T k]; ids int32 [N] (a zero weight or an id outside
    [0, E) skips the assignment);
    w_gate/w_up [E, D, F], w_down [E, F, D] in x.dtype.
    """
    tiles = tiles or TILES  # read at call time: benchmarks patch TILES
    T, D = x.shape
    N, E, F = ids.shape[0], w_gate.shape[0], w_gate.shape[2]
    tn = gmm_plan.tpu_block(F, tiles.tn, 128)
    nf = gmm_plan.cdiv(F, tn)
    ragged = F % tn != 0

    def kernel(ids_ref, w_ref, x_ref, wg_ref, wu_ref, wd_ref, o_ref):
        a, fb = pl.program_id(0), pl.program_id(1)

        @pl.when(fb == 0)
        def _zero():
            o_ref[...] = jnp.zeros_like(o_ref)

        @pl.when((w_ref[a] != 0) & (ids_ref[a] >= 0) & (ids_ref[a] < E))
        def _add():
            xr = x_ref[...]
            g = jnp.dot(xr, wg_ref[...], preferred_element_type=jnp.float32)
            u = jnp.dot(xr, wu_ref[...], preferred_element_type=jnp.float32)
            h = gmm_plan.silu(g) * u
            wd = wd_ref[...]
            if ragged:
                h = jnp.where(fb * tn + lax.broadcasted_iota(jnp.int32, h.shape, 1) < F, h, 0.0)
                wd = jnp.where(fb * tn + lax.broadcasted_iota(jnp.int32, wd.shape, 0) < F, wd, 0)
            o_ref[...] += w_ref[a] * jnp.dot(h.astype(x.dtype), wd, preferred_element_type=jnp.float32)

    def expert(ids, a):  # a skipped assignment's blocks still load: from a valid expert
        return jnp.clip(ids[a], 0, E - 1)

    strip = pl.BlockSpec((None, D, tn), lambda a, f, ids, w: (expert(ids, a), 0, f))
    vmem = 2 * 3 * D * tn * w_gate.dtype.itemsize + 4 * 8 * D * (x.dtype.itemsize + 4) + _VMEM_HEADROOM
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((N, 1, D), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(N, nf),
            in_specs=[pl.BlockSpec((None, 1, D), lambda a, f, ids, w: (lax.div(a, jnp.int32(top_k)), 0, 0)),
                      strip, strip,
                      pl.BlockSpec((None, tn, D), lambda a, f, ids, w: (expert(ids, a), f, 0))],
            out_specs=pl.BlockSpec((None, 1, D), lambda a, f, ids, w: (a, 0, 0)),
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary"), vmem_limit_bytes=max(vmem, 32 << 20)),
        interpret=interpret,
        name=f"moe_decode_{tn}",
    )(ids, weights, x.reshape(T, 1, D), w_gate, w_up, w_down)
    return jnp.sum(y.reshape(T, top_k, D), axis=1)
