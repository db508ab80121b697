"""Pure-jnp grouped (ragged) matmul references: the oracle of the gmm kernels and the ``xla`` backend.

Rows of ``lhs`` are sorted by group: group g owns rows [start_g, start_g + size_g) with
start_g = sum(group_sizes[:g]). Nothing of shape [groups, M, K] is materialised:
the groups are visited by a ``lax.scan`` and each contributes its masked rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_bounds(group_sizes):
    """int32 [G] sizes -> (starts [G], ends [G]) (sizes clamped at 0)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)
    return ends - sizes, ends


def _local_groups(group_sizes, num_local, group_offset):
    starts, ends = group_bounds(group_sizes)
    off = jnp.int32(0) if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    g = off + jnp.arange(num_local, dtype=jnp.int32)
    inside = g < group_sizes.shape[0]
    gc = jnp.minimum(g, group_sizes.shape[0] - 1)
    return jnp.where(inside, starts[gc], 0), jnp.where(inside, ends[gc], 0)


def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs=False, group_offset=None, preferred_element_type=None):
    """out[r] = lhs[r] @ rhs[group(r) - group_offset]; rows of non-local groups or past the end are 0.

    lhs [M, K], rhs [G, K, N] ([G, N, K] with transpose_rhs), group_sizes int32 [G_total]
    -> [M, N] in ``preferred_element_type`` (default lhs.dtype); float32 accumulation.
    """
    out_dtype = preferred_element_type or lhs.dtype
    M = lhs.shape[0]
    rows = jnp.arange(M, dtype=jnp.int32)
    starts, ends = _local_groups(group_sizes, rhs.shape[0], group_offset)
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs

    def step(acc, xs):
        w_g, s, e = xs
        prod = jnp.dot(lhs, w_g, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        return acc + jnp.where(((rows >= s) & (rows < e))[:, None], prod, 0.0), None

    acc, _ = jax.lax.scan(step, jnp.zeros((M, w.shape[-1]), jnp.float32), (w, starts, ends))
    return acc.astype(out_dtype)


def grouped_matmul_t(lhs, grad, group_sizes, *, num_groups=None, group_offset=None, preferred_element_type=None):
    """out[g] = lhs[rows of g].T @ grad[rows of g]: the weight gradient of grouped_matmul.

    lhs [M, K], grad [M, N] -> [num_groups, K, N] (default num_groups = len(group_sizes));
    empty groups give zeros.
    """
    out_dtype = preferred_element_type or lhs.dtype
    G = group_sizes.shape[0] if num_groups is None else num_groups
    rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)
    starts, ends = _local_groups(group_sizes, G, group_offset)

    def one(s, e):
        sel = ((rows >= s) & (rows < e))[:, None]
        return jnp.dot(jnp.where(sel, lhs, 0).T, jnp.where(sel, grad, 0), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)

    return jax.lax.map(lambda se: one(*se), (starts, ends)).astype(out_dtype)


def grouped_swiglu(x, w_gate, w_up, group_sizes, *, group_offset=None):
    """silu(x @ w_gate[g]) * (x @ w_up[g]) per group; x [M, K], w_* [G, K, F] -> [M, F] in x.dtype."""
    g = grouped_matmul(x, w_gate, group_sizes, group_offset=group_offset, preferred_element_type=jnp.float32)
    u = grouped_matmul(x, w_up, group_sizes, group_offset=group_offset, preferred_element_type=jnp.float32)
    return (jax.nn.silu(g) * u).astype(x.dtype)
