"""The MoE FFN layer: route -> sort by expert -> grouped SwiGLU -> grouped down matmul -> weighted combine.

Nothing leaves the device: the expert counts stay on the device (int32 ``group_sizes``)
and every shape is static (T * k rows, or min(T * k, E * C) with a capacity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax import ops
from sparse_jax.moe._checks import check_experts, check_moe_args
from sparse_jax.moe.dispatch import combine, expand, plan_dispatch
from sparse_jax.moe.routing import (MoEAux, capacity, capacity_mask, route, router_logits, router_scores,
                                    routing_of_choice)


def shared_expert_ffn(x, w_gate, w_up, w_down):
    """Dense SwiGLU on every token: silu(x @ w_gate) * (x @ w_up) @ w_down.

    x [T, D], w_gate/w_up [D, Fs], w_down [Fs, D] -> float32 [T, D]; float32
    accumulation, the hidden activation rounded to x.dtype (as the routed experts do).
    """
    f32 = jnp.float32
    g = jnp.dot(x, w_gate, preferred_element_type=f32)
    u = jnp.dot(x, w_up, preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    return jnp.dot(h, w_down, preferred_element_type=f32)


# Up to this many tokens the layer runs ops.moe_decode (router product, then routing and experts
# in one launch: each assignment streams its expert's weights) instead of sort -> grouped
# matmuls -> combine (~20 launches). At one token the k ids are distinct, so no expert is read
# twice; at two or more, ids repeat (Mixtral: 2 tokens x top-2 of 8) and the grouped path reads
# each expert once. H100, ms per layer in a decode step (benchmarks/notes/moe_decode.md), decode
# path vs grouped: T = 1 (round 13) Mixtral 0.253 vs 0.266, Qwen2-MoE 0.088 vs 0.125,
# DeepSeek-V3 0.247 vs 0.272; T = 2 (round 12) Mixtral 0.508 vs 0.462, Qwen2-MoE 0.207 vs 0.200
# (DeepSeek-V3 0.510 vs 0.535).
DECODE_MAX_TOKENS = 1


def routed_experts(x, weights, expert_ids, w_gate, w_up, w_down, *, kept=None, num_rows=None, row_align=None,
                   backend=None, interpret=False):
    """y[t] = sum_j weights[t, j] * SwiGLU_{expert_ids[t, j]}(x[t]) -> float32 [T, D].

    x [T, D]; weights float [T, k]; expert_ids int32 [T, k] in [0, E) (unchecked:
    traced); kept bool [T, k] or None; num_rows (static) cuts the sorted buffer to
    that many rows (>= the kept assignments); row_align (static) pads each expert's rows
    to start at a multiple of it (None: what the backend's kernels prefer,
    :func:`sparse_jax.ops.preferred_row_alignment`). The building
    block of the layer; at T <= DECODE_MAX_TOKENS the decode path (``num_rows`` and
    ``row_align`` do not apply there).
    """
    E, D, F = w_gate.shape
    k = expert_ids.shape[1]
    if x.shape[0] <= DECODE_MAX_TOKENS:
        if kept is not None:
            weights, expert_ids = jnp.where(kept, weights, 0.0), jnp.where(kept, expert_ids, 0)
        return ops.experts_by_id(x, weights, expert_ids, w_gate, w_up, w_down, backend=backend, interpret=interpret)
    if row_align is None:
        row_align = min(ops.preferred_row_alignment(x.dtype, kk, nn, backend=backend, interpret=interpret)
                        for kk, nn in ((D, F), (F, D)))
    plan = plan_dispatch(expert_ids, E, kept=kept, num_rows=num_rows, row_align=row_align)
    xs = expand(x, plan, k)
    run = dict(row_align=row_align, backend=backend, interpret=interpret)
    h = ops.grouped_swiglu(xs, w_gate, w_up, plan.group_sizes, **run)
    out = ops.grouped_matmul(h, w_down, plan.group_sizes, **run)
    return combine(out, weights, plan, out_dtype=jnp.float32)


def moe_ffn_from_routing(x, weights, expert_ids, w_gate, w_up, w_down, *, kept=None, backend=None,
                         interpret=False):
    """The expert half of the layer for a routing computed elsewhere.

    x [T, D]; weights float [T, k]; expert_ids int [T, k] (ids outside [0, E) and
    assignments with ``kept`` False contribute nothing); w_gate/w_up [E, D, F],
    w_down [E, F, D] -> y [T, D] in x.dtype. Differentiable in x, weights and the
    expert weights.
    """
    check_experts(x, w_gate, w_up, w_down)
    if weights.shape != expert_ids.shape or weights.ndim != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights and expert_ids must both be [T, k] with T = {x.shape[0]}; got "
                         f"{tuple(weights.shape)} and {tuple(expert_ids.shape)}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids must be integers; got {expert_ids.dtype}")
    E = w_gate.shape[0]
    ids = expert_ids.astype(jnp.int32)
    valid = (ids >= 0) & (ids < E)
    if kept is not None:
        valid = valid & kept
    y = routed_experts(x, weights, jnp.where(valid, ids, 0), w_gate, w_up, w_down, kept=valid,
                       backend=backend, interpret=interpret)
    return y.astype(x.dtype)


def moe_ffn(x, router_weights, w_gate, w_up, w_down, *, top_k: int, scoring: str = "softmax",
            normalize_topk: bool = True, bias=None, num_groups: int | None = None, topk_groups: int | None = None,
            capacity_factor: float | None = None, shared_expert=None, return_aux: bool = False,
            jitter: float = 0.0, rng=None, backend: str | None = None, interpret: bool = False):
    """Mixture-of-Experts SwiGLU FFN, dropless by default.

    x [T, D] (float32/bfloat16/float16); router_weights [D, E] (any float dtype: the
    router matmul runs in the promoted dtype of x and router_weights with float32
    accumulation, so float32 router weights give a float32 router); w_gate, w_up
    [E, D, F]; w_down [E, F, D] (dtype of x).
    Returns y [T, D] in x.dtype, or (y, :class:`MoEAux`) with ``return_aux``.

    Routing: :func:`sparse_jax.moe.route` (``scoring``, ``normalize_topk``, ``bias``,
    ``num_groups``/``topk_groups``, ``jitter``/``rng``). The routed outputs are
    weighted in float32 and summed per token, then the optional ``shared_expert`` =
    (w_gate [D, Fs], w_up [D, Fs], w_down [Fs, D]) is added, then y is rounded once.

    ``capacity_factor`` (None = dropless): each expert keeps at most
    C = ceil(capacity_factor * T * top_k / E) assignments, the first C in token order
    (flat index t * top_k + j); dropped assignments contribute nothing and their
    weights are *not* renormalised.

    Differentiable in x, router_weights (through the combine weights and the aux
    losses), every expert weight and the shared expert. ``backend``/``interpret``
    select the grouped-matmul kernels (see :mod:`sparse_jax.backends`).
    """
    T, D, E, F = check_moe_args(x, router_weights, w_gate, w_up, w_down, top_k=top_k, scoring=scoring, bias=bias,
                                num_groups=num_groups, topk_groups=topk_groups, capacity_factor=capacity_factor,
                                shared_expert=shared_expert, jitter=jitter, rng=rng)
    # The decode path: routing and experts in two launches (ops.moe_decode). One token's k ids
    # are distinct, so a capacity (>= 1 per expert) drops nothing there.
    decode = (0 < T <= DECODE_MAX_TOKENS and num_groups is None and jitter == 0.0
              and (capacity_factor is None or T == 1))
    if decode:
        y, weights, ids, logits = ops.moe_decode(x, router_weights, w_gate, w_up, w_down, top_k=top_k, scoring=scoring,
                                                 normalize_topk=normalize_topk, bias=bias, backend=backend,
                                                 interpret=interpret)
        r = routing_of_choice(logits, router_scores(logits, scoring), weights, ids, top_k, scoring)
    else:
        r = route(router_logits(x, router_weights), top_k, scoring=scoring, normalize_topk=normalize_topk, bias=bias,
                  num_groups=num_groups, topk_groups=topk_groups, jitter=jitter, rng=rng)
    kept = num_rows = None
    if capacity_factor is not None:
        cap = capacity(T, top_k, E, capacity_factor)
        kept = capacity_mask(r.expert_ids, E, cap)
        num_rows = max(min(T * top_k, E * cap), 1)
    if T == 0:
        y = jnp.zeros((0, D), jnp.float32)
    elif not decode:
        y = routed_experts(x, r.weights, r.expert_ids, w_gate, w_up, w_down, kept=kept, num_rows=num_rows,
                           backend=backend, interpret=interpret)
    if shared_expert is not None:
        y = y + shared_expert_ffn(x, *shared_expert)
    y = y.astype(x.dtype)
    return (y, MoEAux.from_router(r.aux, kept)) if return_aux else y
