"""Pure-jnp MoE FFN reference, per token (no sorting, no capacity): the oracle of the MoE layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_ffn_from_routing(x, weights, expert_ids, w_gate, w_up, w_down):
    """y[t] = sum_k weights[t, k] * FFN_{expert_ids[t, k]}(x[t]) with a SwiGLU FFN.

    x [T, D], weights float [T, k], expert_ids int [T, k] (ids outside [0, E) contribute
    nothing), w_gate/w_up [E, D, F], w_down [E, F, D] -> y [T, D] in x.dtype. The
    routing weights are applied in float32. Experts are visited by a scan (O(E T D F)).
    """
    E = w_gate.shape[0]
    hp = jax.lax.Precision.HIGHEST
    xf = x.astype(jnp.float32)

    def step(acc, e):
        h = jax.nn.silu(jnp.dot(xf, w_gate[e].astype(jnp.float32), precision=hp)) * jnp.dot(
            xf, w_up[e].astype(jnp.float32), precision=hp)
        y_e = jnp.dot(h, w_down[e].astype(jnp.float32), precision=hp)
        coef = jnp.sum(jnp.where(expert_ids == e, weights.astype(jnp.float32), 0.0), axis=-1)
        return acc + coef[:, None] * y_e, None

    acc, _ = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), jnp.arange(E))
    return acc.astype(x.dtype)


def moe_ffn(x, router_weights, w_gate, w_up, w_down, *, top_k, scoring="softmax", normalize_topk=True, bias=None,
            num_groups=None, topk_groups=None, capacity_factor=None, shared_expert=None, return_aux=False,
            jitter=0.0, rng=None, backend=None, interpret=False):
    """Per-token oracle of ``sparse_jax.moe.moe_ffn`` (same signature; backend/interpret ignored).

    Routes through the same ``sparse_jax.moe.route`` and the same capacity rule
    (``capacity_mask``: per expert the first C assignments in token order), then runs
    every expert densely in float32 (:func:`moe_ffn_from_routing`); y is rounded to
    x.dtype once at the end.
    """
    from sparse_jax.moe import _checks, routing  # lazy: sparse_jax.moe imports the ops, which import us

    T, D, E, F = _checks.check_moe_args(
        x, router_weights, w_gate, w_up, w_down, top_k=top_k, scoring=scoring, bias=bias, num_groups=num_groups,
        topk_groups=topk_groups, capacity_factor=capacity_factor, shared_expert=shared_expert, jitter=jitter, rng=rng)
    r = routing.route(routing.router_logits(x, router_weights), top_k, scoring=scoring,
                      normalize_topk=normalize_topk, bias=bias, num_groups=num_groups, topk_groups=topk_groups,
                      jitter=jitter, rng=rng)
    weights, kept = r.weights, None
    if capacity_factor is not None:
        kept = routing.capacity_mask(r.expert_ids, E, routing.capacity(T, top_k, E, capacity_factor))
        weights = jnp.where(kept, weights, 0.0)
    f32 = jnp.float32
    y = moe_ffn_from_routing(x.astype(f32), weights, r.expert_ids, w_gate, w_up, w_down)
    if shared_expert is not None:
        y = y + _dense_swiglu(x, *shared_expert)
    y = y.astype(x.dtype)
    return (y, routing.MoEAux.from_router(r.aux, kept)) if return_aux else y


def _dense_swiglu(x, w_gate, w_up, w_down):
    """silu(x @ w_gate) * (x @ w_up) @ w_down, all in float32 at full precision -> float32 [T, D]."""
    hp, f32 = jax.lax.Precision.HIGHEST, jnp.float32
    xf = x.astype(f32)
    h = jax.nn.silu(jnp.dot(xf, w_gate.astype(f32), precision=hp)) * jnp.dot(xf, w_up.astype(f32), precision=hp)
    return jnp.dot(h, w_down.astype(f32), precision=hp)
