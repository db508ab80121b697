"""topk_routing: a few tokens' top-k expert choice and combine weights in one kernel launch.

The routing half of :func:`sparse_jax.ops.moe_decode` as an op of its own, for logits made
elsewhere (``experts_by_id`` is the experts' half; ``moe_decode`` runs the same top-k inside its
expert kernel): the same choice as :func:`sparse_jax.moe.routing.select_experts` without group
limits or jitter. Backends: ``triton``
(``pallas_kernels.triton.router_topk``); ``xla`` and ``mosaic_tpu`` run the jnp routing
itself (on a TPU XLA's own top-k is what runs: there is no Mosaic kernel for it).

The backward recomputes the combine weights from the logits at the chosen ids in jnp
(softmax or sigmoid, gather, normalisation) and takes their VJP: the gradient the jnp
routing gives. ``bias`` gets none (it shifts selection only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_jax import backends


def _jnp_choice(logits, bias, top_k, scoring, normalize_topk, rows):
    from sparse_jax.moe import routing
    _, _, weights, ids = routing.select_experts(logits[:rows], top_k, scoring=scoring, normalize_topk=normalize_topk,
                                                bias=bias)
    return weights, ids


def _forward(static, logits, bias):
    backend, interpret, top_k, scoring, normalize_topk, rows = static
    if backend != backends.TRITON:
        return _jnp_choice(logits, bias, top_k, scoring, normalize_topk, rows)
    from pallas_kernels.triton import router_topk
    return tuple(router_topk.topk_route(logits, bias, top_k=top_k, scoring=scoring, normalize_topk=normalize_topk,
                                        rows=rows, interpret=interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _route(static, logits, bias):
    return _forward(static, logits, bias)


def _route_fwd(static, logits, bias):
    weights, ids = _forward(static, logits, bias)
    return (weights, ids), (logits, ids, bias)


def _route_bwd(static, res, cts):
    from sparse_jax.moe import routing
    logits, ids, bias = res
    _, _, _, scoring, normalize_topk, rows = static
    _, pull = jax.vjp(lambda lg: routing.chosen_weights(routing.router_scores(lg[:rows], scoring), ids,
                                                        normalize_topk), logits)
    (d_logits,) = pull(cts[0])
    return d_logits, None if bias is None else jnp.zeros_like(bias)


_route.defvjp(_route_fwd, _route_bwd)


def topk_routing(logits, top_k: int, *, scoring: str = "softmax", normalize_topk: bool = True, bias=None,
                 num_tokens: int | None = None, backend: str | None = None, interpret: bool = False):
    """logits [T, E] (float; computed on in float32) -> (weights float32 [T, k], expert_ids int32 [T, k]).

    ``num_tokens`` (static, <= the rows of ``logits``): route only the first rows, the rest
    being padding (``router_logits(..., keep_padding=True)``); T is then num_tokens.

    Scores: softmax or sigmoid of the logits; the k experts with the highest scores + ``bias``
    (float [E], selection only), ties to the lower index, distinct per token; weights: the
    scores at those experts, over their sum when ``normalize_topk``. Differentiable in the
    logits. Arguments are checked as :func:`sparse_jax.moe.route` checks them.
    """
    from sparse_jax.moe import routing
    if logits.ndim != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float [T, E] array; got {logits.dtype} {tuple(logits.shape)}")
    routing.check_route_args(logits.shape[1], top_k, scoring, bias, None, None, 0.0, None)
    rows = logits.shape[0] if num_tokens is None else int(num_tokens)
    if not 0 <= rows <= logits.shape[0]:
        raise ValueError(f"num_tokens must be in [0, {logits.shape[0]}] (the rows of logits); got {num_tokens!r}")
    name = backends.resolve(backend, op="topk_routing")
    if rows == 0:
        return jnp.zeros((0, top_k), jnp.float32), jnp.zeros((0, top_k), jnp.int32)
    logits = logits.astype(jnp.float32)
    bias = None if bias is None else bias.astype(jnp.float32)
    return _route((name, bool(interpret), int(top_k), scoring, bool(normalize_topk), rows), logits, bias)
