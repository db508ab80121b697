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
