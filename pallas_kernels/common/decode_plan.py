"""Shared plan of the decode expert kernels (GPU and TPU): splits, tiles, the reference math.

At decode (one token, k routed experts) the MoE layer is k weight streams. The
general path (sort by expert, group schedule, grouped matmuls, combine) spends
~20 kernel launches on it; the decode kernels read each assignment's expert id
directly and need two:

1. **gate/up**: ``g[a] = x[token(a)] @ w_gate[id[a]]``, ``u[a]`` likewise, for every
   assignment a = t * k + j (no sort: at T = 1 the k ids are distinct, so no expert is
   read twice). The contraction D is split in S1 parts (:func:`splits`) so
   that N x F/tn x S1 programs keep every SM streaming; the parts are float32 partials
   (two [N, S1, F]).
2. **down + combine**: ``y[t] = sum_j w[t, j] * h[t, j] @ w_down[id]``, with
   ``h = silu(g) * u`` (summed over the partials, rounded to x.dtype as the grouped
   path rounds it) formed on the fly; the contraction F is split in S2
   parts, float32 partials [S2, T, D] summed by the caller.

Shapes: x [T, D], weights float32 [N = T k], ids int32 [N] in [0, E), w_gate/w_up
[E, D, F], w_down [E, F, D]. The TPU kernels run the same two passes with grid
reductions instead of splits (one core walks its grid in order).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common import gmm_plan


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """tn: output columns per program; tk: contraction rows per step; GPU: warps, stages."""

    tn: int = 128
    tk: int = 64
    num_warps: int = 4
    num_stages: int = 4


# Enough programs that every SM streams several weight strips (the tail of a wave idles SMs).
# H100 round 4 (tune_moe decode, T = 1): 2 / 4 / 8 programs per SM and seven tile shapes all
# within 2-3 % of one another for Mixtral, Qwen2-MoE and DeepSeek-V3; 4 kept.
PROGRAMS_PER_SM = 4
MIN_STEPS_PER_SPLIT = 4


def splits(num_steps: int, base_programs: int, sms: int) -> tuple[int, int]:
    """(splits, steps per split) of a ``num_steps`` contraction over ``base_programs``
    programs: the smallest power of two reaching PROGRAMS_PER_SM x sms programs, with at
    least MIN_STEPS_PER_SPLIT steps each. Only non-empty splits are counted."""
    s = 1
    while (base_programs * s < PROGRAMS_PER_SM * sms and num_steps // (2 * s) >= MIN_STEPS_PER_SPLIT):
        s *= 2
    per = gmm_plan.cdiv(num_steps, s)
    return gmm_plan.cdiv(num_steps, per), per


def experts_by_id(x, weights, ids, w_gate, w_up, w_down, top_k: int):
    """The decode kernels' math in jnp (gathers the k experts' weights): y float32 [T, D].

    x [T, D]; weights float [T * k]; ids int32 [T * k] in [0, E). float32 accumulation,
    h rounded to x.dtype before the down projection (as every MoE path here does).
    """
    f32 = jnp.float32
    xt = jnp.repeat(x, top_k, axis=0) if top_k > 1 else x                    # [N, D]
    g = jnp.einsum("nd,ndf->nf", xt, jnp.take(w_gate, ids, axis=0), preferred_element_type=f32)
    u = jnp.einsum("nd,ndf->nf", xt, jnp.take(w_up, ids, axis=0), preferred_element_type=f32)
    h = (gmm_plan.silu(g) * u).astype(x.dtype)
    o = jnp.einsum("nf,nfd->nd", h, jnp.take(w_down, ids, axis=0), preferred_element_type=f32)
    y = weights.astype(f32)[:, None] * o
    return y.reshape(x.shape[0], top_k, -1).sum(1)

