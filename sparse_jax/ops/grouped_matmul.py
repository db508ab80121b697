"""Grouped (ragged) matmuls: validation and backend dispatch.

The ``xla`` backend is the pure-jnp reference; kernel backends live in
``pallas_kernels.<lowering>`` and are wired in with their custom VJPs.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax import backends
from sparse_jax import reference

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_group_sizes(group_sizes, expected: int | None, what: str):
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D int32 [G]; got shape {tuple(group_sizes.shape)}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32; got {group_sizes.dtype}")
    if expected is not None and group_sizes.shape[0] != expected:
        raise ValueError(f"group_sizes has {group_sizes.shape[0]} entries but {what} has {expected} groups")


def _check_float(name, x, ndim):
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims; got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")


def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, group_offset=None,
                   preferred_element_type=None, backend: str | None = None, interpret: bool = False):
    """Ragged matmul: out[r] = lhs[r] @ rhs[group(r)] with rows sorted by group.

    lhs [M, K]; rhs [G, K, N] ([G, N, K] with transpose_rhs); group_sizes int32 [G]
    (or [G_total] with ``group_offset``: rhs then holds groups [offset, offset + G)).
    Returns [M, N] in ``preferred_element_type`` (default lhs.dtype); rows past
    sum(group_sizes), and rows of groups not held locally, are zeros.
    """
    _check_float("lhs", lhs, 2)
    _check_float("rhs", rhs, 3)
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(f"contracting dims differ: lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)} "
                         f"(transpose_rhs={transpose_rhs})")
    _check_group_sizes(group_sizes, None if group_offset is not None else rhs.shape[0], "rhs")
    backend = backends.resolve(backend, op="grouped_matmul", supported=(backends.XLA,))
    return reference.grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, group_offset=group_offset,
                                    preferred_element_type=preferred_element_type)


def grouped_matmul_t(lhs, grad, group_sizes, *, num_groups: int | None = None, group_offset=None,
                     preferred_element_type=None, backend: str | None = None, interpret: bool = False):
    """Weight gradient of grouped_matmul: out[g] = lhs[rows of g].T @ grad[rows of g].

    lhs [M, K], grad [M, N], group_sizes int32 [G] -> [G, K, N]; empty groups are zeros.
    """
    _check_float("lhs", lhs, 2)
    _check_float("grad", grad, 2)
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"lhs {tuple(lhs.shape)} and grad {tuple(grad.shape)} must have the same rows")
    _check_group_sizes(group_sizes, None, "")
    backend = backends.resolve(backend, op="grouped_matmul_t", supported=(backends.XLA,))
    return reference.grouped_matmul_t(lhs, grad, group_sizes, num_groups=num_groups, group_offset=group_offset,
                                      preferred_element_type=preferred_element_type)


def grouped_swiglu(x, w_gate, w_up, group_sizes, *, group_offset=None, backend: str | None = None,
                   interpret: bool = False):
    """silu(x @ w_gate[g]) * (x @ w_up[g]) per group. x [M, K], w_* [G, K, F] -> [M, F] (x.dtype)."""
    _check_float("x", x, 2)
    _check_float("w_gate", w_gate, 3)
    _check_float("w_up", w_up, 3)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must match")
    if x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w_gate {tuple(w_gate.shape)} disagree on K")
    _check_group_sizes(group_sizes, None if group_offset is not None else w_gate.shape[0], "w_gate")
    backend = backends.resolve(backend, op="grouped_swiglu", supported=(backends.XLA,))
    return reference.grouped_swiglu(x, w_gate, w_up, group_sizes, group_offset=group_offset)
