"""The MoE layer for a few tokens by expert id (no sort, no group schedule): two ops.

* ``experts_by_id``: the expert half for a routing computed elsewhere -- one kernel launch
  for the whole SwiGLU expert (gate/up, silu, down, routing weight) instead of the grouped
  path's ~20 (sort, scatters, schedule, gathers, two grouped matmuls, combine).
* ``moe_decode``: router product, top-k and experts -- the decode path of
  :func:`sparse_jax.moe.moe_ffn` (one token). On Triton two launches: the router's split
  partial products (:mod:`pallas_kernels.triton.router_product`), then the expert kernel
  with a routing prologue (every program adds the partials and chooses the experts itself);
  elsewhere the router product, ``topk_routing`` and ``experts_by_id``.

Every assignment streams its expert's weights itself, so an expert chosen by two
assignments is read twice: it pays only where the ids are distinct (one token).
Kernels: :mod:`pallas_kernels.common.decode_plan` and its per-backend lowerings.

The backward (training at one token is rare) is the VJP of the plan's jnp math, which
gathers each assignment's expert weights: exact, not fast, and O(T k D F) memory -- meant
for the few tokens this op is for (the layer uses it at T <= ``DECODE_MAX_TOKENS``).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from sparse_jax import _compat, backends
from pallas_kernels.common import decode_plan

_KERNEL_MODULES = {backends.TRITON: "pallas_kernels.triton.moe_decode",
                   backends.MOSAIC_TPU: "pallas_kernels.tpu.moe_decode"}


def _forward(backend, interpret, top_k, x, weights, ids, w_gate, w_up, w_down):
    if backend == backends.XLA:
        return decode_plan.experts_by_id(x, weights, ids, w_gate, w_up, w_down, top_k)
    kernel = importlib.import_module(_KERNEL_MODULES[backend])
    if interpret and backend == backends.MOSAIC_TPU:
        interpret = _compat.tpu_interpret_params()
    return kernel.experts_by_id(x, weights, ids, w_gate, w_up, w_down, top_k=top_k, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _experts(backend, interpret, top_k, x, weights, ids, w_gate, w_up, w_down):
    return _forward(backend, interpret, top_k, x, weights, ids, w_gate, w_up, w_down)


def _experts_fwd(backend, interpret, top_k, x, weights, ids, w_gate, w_up, w_down):
    y = _forward(backend, interpret, top_k, x, weights, ids, w_gate, w_up, w_down)
    return y, (x, weights, ids, w_gate, w_up, w_down)


def _experts_bwd(backend, interpret, top_k, res, gy):
    x, weights, ids, w_gate, w_up, w_down = res
    math = functools.partial(decode_plan.experts_by_id, top_k=top_k)
    _, pull = jax.vjp(lambda x, w, a, b, c: math(x, w, ids, a, b, c), x, weights, w_gate, w_up, w_down)
    dx, dw, da, db, dc = pull(gy)
    return dx, dw, None, da, db, dc


_experts.defvjp(_experts_fwd, _experts_bwd)


def experts_by_id(x, weights, expert_ids, w_gate, w_up, w_down, *, backend: str | None = None,
                  interpret: bool = False):
    """y[t] = sum_j weights[t, j] * SwiGLU_{expert_ids[t, j]}(x[t]) -> float32 [T, D].

    x [T, D] (float32/bfloat16/float16); weights float [T, k]; expert_ids int [T, k]
    (ids outside [0, E) contribute nothing); w_gate/w_up [E, D, F], w_down [E, F, D] in
    x.dtype. float32 accumulation; the hidden activation is rounded to x.dtype (as
    the grouped path rounds it). Differentiable in x, weights and the expert weights.
    """
    if x.ndim != 2 or weights.ndim != 2 or weights.shape != expert_ids.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [T, D] and weights, expert_ids [T, k]; got {tuple(x.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(expert_ids.shape)}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids must be integers; got {expert_ids.dtype}")
    E, D, F = w_gate.shape
    if x.shape[1] != D or w_up.shape != (E, D, F) or w_down.shape != (E, F, D):
        raise ValueError(f"expected w_gate/w_up [E, {x.shape[1]}, F] and w_down [E, F, {x.shape[1]}]; got "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if not all(w.dtype == x.dtype for w in (w_gate, w_up, w_down)):
        raise ValueError(f"expert weights must have x's dtype {x.dtype}")
    name = backends.resolve(backend, op="experts_by_id", supported=(backends.TRITON, backends.MOSAIC_TPU,
                                                                     backends.XLA))
    k = expert_ids.shape[1]
    if 0 in (x.shape[0], k, D, F, E):  # nothing to stream (a kernel grid cannot be empty)
        return jnp.zeros((x.shape[0], D), jnp.float32)
    # Invalid ids are the kernels' business (no XLA pass over ids and weights at decode).
    return _experts(name, bool(interpret), k, x, weights.reshape(-1).astype(jnp.float32),
                    expert_ids.reshape(-1).astype(jnp.int32), w_gate, w_up, w_down)


# ------------------------------------------------------------------------------ moe_decode
def _decode_forward(static, x, router_weights, bias, w_gate, w_up, w_down):
    backend, interpret, top_k, scoring, normalize_topk = static
    if backend == backends.TRITON:
        from pallas_kernels.triton import moe_decode, router_product
        partials = router_product.partial_logits(x, router_weights, interpret=interpret)
        return moe_decode.routed_experts(x, partials, bias, w_gate, w_up, w_down, top_k=top_k, scoring=scoring,
                                         normalize_topk=normalize_topk, interpret=interpret)
    from sparse_jax.moe import routing
    from sparse_jax.ops.router_topk import topk_routing
    logits = routing.router_logits(x, router_weights)
    weights, ids = topk_routing(logits, top_k, scoring=scoring, normalize_topk=normalize_topk, bias=bias,
                                backend=backend)
    y = _forward(backend, interpret, top_k, x, weights.reshape(-1), ids.reshape(-1), w_gate, w_up, w_down)
    return y, weights, ids, logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(static, x, router_weights, bias, w_gate, w_up, w_down):
    return _decode_forward(static, x, router_weights, bias, w_gate, w_up, w_down)


def _decode_fwd(static, *args):
    out = _decode_forward(static, *args)
    return out, (args, out[2])


def _decode_bwd(static, res, cts):
    """The VJP of the jnp math at the chosen ids: router product, combine weights, experts."""
    from sparse_jax.moe import routing
    (x, router_weights, bias, w_gate, w_up, w_down), ids = res
    _, _, top_k, scoring, normalize_topk = static
    gy, gw, _, g_logits = cts

    def math(x, rw, wg, wu, wd):
        logits = routing.router_logits(x, rw)
        w = routing.chosen_weights(routing.router_scores(logits, scoring), ids, normalize_topk)
        y = decode_plan.experts_by_id(x, w.reshape(-1), ids.reshape(-1), wg, wu, wd, top_k)
        return y, w, logits

    _, pull = jax.vjp(math, x, router_weights, w_gate, w_up, w_down)
    dx, drw, dg, du, dd = pull((gy, gw, g_logits))
    return dx, drw, None if bias is None else jnp.zeros_like(bias), dg, du, dd


_decode.defvjp(_decode_fwd, _decode_bwd)


def moe_decode(x, router_weights, w_gate, w_up, w_down, *, top_k: int, scoring: str = "softmax",
               normalize_topk: bool = True, bias=None, backend: str | None = None, interpret: bool = False):
    """The routed MoE for a few tokens: routing and experts by id.

    x [T, D] (float32/bfloat16/float16); router_weights [D, E] (any float dtype: the product
    runs in the promoted dtype with float32 accumulation, as ``router_logits``; a float32
    product at full precision on Triton, at XLA's default elsewhere); w_gate/w_up
    [E, D, F], w_down [E, F, D] in x.dtype; bias float [E] or None (selection only).
    Returns (y float32 [T, D], weights float32 [T, k], expert_ids int32 [T, k], logits
    float32 [T, E]): the choice of :func:`sparse_jax.ops.topk_routing` on the logits and
    y[t] = sum_j weights[t, j] * SwiGLU_{expert_ids[t, j]}(x[t]) as ``experts_by_id``.
    Differentiable in x, router_weights (through the weights and the logits) and the expert
    weights; meant for the tokens of one decode step (each assignment streams its expert).
    Arguments are checked as :func:`sparse_jax.moe.moe_ffn` checks them.
    """
    from sparse_jax.moe import routing
    from sparse_jax.moe._checks import check_moe_args
    check_moe_args(x, router_weights, w_gate, w_up, w_down, top_k=top_k, scoring=scoring, bias=bias, num_groups=None,
                   topk_groups=None, capacity_factor=None, shared_expert=None, jitter=0.0, rng=None)
    name = backends.resolve(backend, op="moe_decode", supported=(backends.TRITON, backends.MOSAIC_TPU, backends.XLA))
    T, D = x.shape
    if 0 in (T, D, w_gate.shape[2]):  # nothing to route or stream (a kernel grid cannot be empty)
        logits = routing.router_logits(x, router_weights)
        weights, ids = routing.select_experts(logits, top_k, scoring=scoring, normalize_topk=normalize_topk,
                                              bias=bias)[2:]
        return jnp.zeros((T, D), jnp.float32), weights, ids, logits
    bias = None if bias is None else bias.astype(jnp.float32)
    return _decode((name, bool(interpret), int(top_k), scoring, bool(normalize_topk)), x, router_weights, bias,
                   w_gate, w_up, w_down)
