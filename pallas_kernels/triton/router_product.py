"""The router product of a few tokens in one launch, split over D, lowered through Pallas-Triton.

At decode the router product x [T, D] @ W [D, E] is a few hundred KB of weights (Qwen2-MoE:
3584 x 64 bf16, 459 KB) and no arithmetic. XLA:GPU runs it as a GEMM on rows padded to 8, a
split-K reduction and the padding: three launches, 5.1-5.7 us of GPU time on an H100. Here
S programs per (token, expert block) each stream ``rows`` rows of W and write a float32
partial product: partials [T, S, E]. The logits are their sum over S; the fused
decode kernel (:mod:`pallas_kernels.triton.moe_decode`) adds them in its routing prologue,
so the product costs one launch and the reduction none.

H100 round 13 (benchmarks/notes/moe_decode.md), GPU time alone at T = 1: 32 splits of 128 rows
(shipped) 1.5 / 1.7 / 2.6 us for Mixtral / Qwen2-MoE / DeepSeek-V3; 16 splits 2.0 / 2.3 / 3.3;
64 splits 1.4 / 1.5 / 2.4, but the decode kernel's prologue then reads twice the partials (the
whole op: 32 and 64 splits within 0.4 us of each other).

The products run in the promoted dtype of x and W with float32 accumulation (as
:func:`sparse_jax.moe.routing.router_logits`), float32 at full precision (no TF32: the
router decides which experts run). The products are row-vector products on the tensor cores
(:mod:`pallas_kernels.triton.row_vector`), as in the decode kernel: its loads then ride
Triton's software pipeline.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import gmm_plan
from pallas_kernels.triton import row_vector
from sparse_jax import _compat

MAX_SPLITS = 32  # partials per logit at most: the decode kernel's prologue reads all of them
STEP_ROWS = 128  # D rows per pipelined step
EXPERT_BLOCK = 64  # expert columns per program: 128-byte runs of a bf16 router row


@dataclasses.dataclass(frozen=True)
class RouterSplit:
    """rows: D rows per split (a multiple of tk); tk: rows per pipelined step; be: expert
    columns per program; splits: S = cdiv(D, rows)."""

    rows: int
    tk: int
    be: int
    splits: int


def plan(D: int, E: int) -> RouterSplit:
    """The split of a [D, E] router: at most MAX_SPLITS splits of a power-of-two row count."""
    rows = gmm_plan.pow2_block(D, gmm_plan.next_pow2(gmm_plan.cdiv(D, MAX_SPLITS)))
    return RouterSplit(rows, min(rows, STEP_ROWS), gmm_plan.pow2_block(E, EXPERT_BLOCK), gmm_plan.cdiv(D, rows))


def partial_logits(x, router_weights, *, interpret: bool = False):
    """x [T, D] (float), router_weights [D, E] (float) -> float32 partials [T, S, E] whose sum
    over S is x @ router_weights (S = ``plan(D, E).splits``; a token's S x E
    partials are contiguous, one load for a kernel that adds them)."""
    T, D = x.shape
    E = router_weights.shape[1]
    dtype = jnp.promote_types(x.dtype, router_weights.dtype)
    sp = plan(D, E)
    rows, tk, be = sp.rows, sp.tk, sp.be
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    ragged_d, ragged_e = D % tk != 0, E % be != 0

    def kernel(x_ref, w_ref, o_ref):
        s, t, eb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        cols = pl.ds(eb * be, be)
        e_ok = (eb * be + lax.broadcasted_iota(jnp.int32, (be,), 0)) < E if ragged_e else None
        steps = jnp.minimum(rows, D - s * rows + tk - 1) // tk  # the last split may be short

        def step(i, acc):
            k0 = pl.multiple_of(s * rows + i * tk, tk)
            k_ok = (k0 + lax.broadcasted_iota(jnp.int32, (tk,), 0)) < D if ragged_d else None
            xr = plgpu.load(x_ref.at[t, pl.ds(k0, tk)], mask=k_ok, other=None if k_ok is None else 0)
            mask = row_vector.block_mask(k_ok, e_ok, (tk, be))
            w = plgpu.load(w_ref.at[pl.ds(k0, tk), cols], mask=mask, other=None if mask is None else 0)
            return acc + jnp.dot(row_vector.rows(xr.astype(dtype)), w.astype(dtype), precision=precision,
                                 preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, steps, step, jnp.zeros((row_vector.ROWS, be), jnp.float32))
        plgpu.store(o_ref.at[t, s, cols], jnp.max(acc, axis=0), mask=e_ok)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((T, sp.splits, E), jnp.float32),
        grid=(sp.splits, T, gmm_plan.cdiv(E, be)),
        compiler_params=_compat.triton_compiler_params(num_warps=4, num_stages=3),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=2 * T * D * E, transcendentals=0,
                                      bytes_accessed=D * E * router_weights.dtype.itemsize + 4 * sp.splits * T * E),
        name=f"router_partials_{sp.splits}x{rows}",
    )(x, router_weights)
