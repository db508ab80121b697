"""Trace-time validation of MoE layer arguments (shared by the layer, EP and the reference)."""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax.moe.routing import check_route_args

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _shape(a):
    return tuple(getattr(a, "shape", ()))


def check_experts(x, w_gate, w_up, w_down) -> tuple[int, int, int, int]:
    """x [T, D], w_gate/w_up [E, D, F], w_down [E, F, D], one float dtype -> (T, D, E, F)."""
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be [T, D]; got shape {_shape(x)}")
    T, D = x.shape
    if getattr(w_gate, "ndim", None) != 3 or _shape(w_up) != _shape(w_gate):
        raise ValueError(f"w_gate and w_up must both be [E, D, F]; got {_shape(w_gate)} and {_shape(w_up)}")
    E, D_w, F = w_gate.shape
    if D_w != D:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} must be [E, D, F] with D = {D} (from x {tuple(x.shape)})")
    if _shape(w_down) != (E, F, D):
        raise ValueError(f"w_down must be [E, F, D] = {(E, F, D)}; got {_shape(w_down)}")
    if E < 1:
        raise ValueError("need at least one expert")
    for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if a.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, bfloat16 or float16; got {a.dtype}")
    if not x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype:
        raise ValueError(f"x and the expert weights must share one dtype; got x {x.dtype}, w_gate {w_gate.dtype}, "
                         f"w_up {w_up.dtype}, w_down {w_down.dtype}")
    return T, D, E, F


def check_shared_expert(shared_expert, D: int, dtype) -> None:
    if shared_expert is None:
        return
    if not isinstance(shared_expert, (tuple, list)) or len(shared_expert) != 3:
        raise ValueError("shared_expert must be a tuple (w_gate [D, Fs], w_up [D, Fs], w_down [Fs, D])")
    sg, su, sd = shared_expert
    if getattr(sg, "ndim", None) != 2 or sg.shape[0] != D or _shape(su) != _shape(sg):
        raise ValueError(f"shared expert w_gate and w_up must be [D, Fs] with D = {D}; got {_shape(sg)}, {_shape(su)}")
    if _shape(sd) != (sg.shape[1], D):
        raise ValueError(f"shared expert w_down must be [Fs, D] = {(sg.shape[1], D)}; got {_shape(sd)}")
    if any(a.dtype != dtype for a in shared_expert):
        raise ValueError(f"shared expert weights must have dtype {dtype} (that of x)")


def check_moe_args(x, router_weights, w_gate, w_up, w_down, *, top_k, scoring, bias, num_groups, topk_groups,
                   capacity_factor, shared_expert, jitter, rng) -> tuple[int, int, int, int]:
    """Validate everything ``moe_ffn`` takes -> (T, D, E, F)."""
    T, D, E, F = check_experts(x, w_gate, w_up, w_down)
    if _shape(router_weights) != (D, E):
        raise ValueError(f"router_weights must be [D, E] = {(D, E)}; got {_shape(router_weights)}")
    if not jnp.issubdtype(router_weights.dtype, jnp.floating):
        raise ValueError(f"router_weights must be floating point; got {router_weights.dtype}")
    check_route_args(E, top_k, scoring, bias, num_groups, topk_groups, jitter, rng)
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless); got {capacity_factor!r}")
    check_shared_expert(shared_expert, D, x.dtype)
    return T, D, E, F
