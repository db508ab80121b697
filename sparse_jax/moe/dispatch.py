"""Token permutation for MoE: sort assignments by expert, gather rows, weighted combine.

An *assignment* is one (token t, choice j) pair, flat index a = t * k + j. A
:class:`DispatchPlan` maps assignments to rows of the expert-sorted buffer and back.
Both directions are gathers, and so are their VJPs (custom_vjp), so no
D-wide scatter is ever emitted:

* :func:`expand`  rows[r] = x[token(r)]            VJP: dx[t] = sum_j g[row(t, j)]
* :func:`combine` y[t] = sum_j w[t, j] * rows[row(t, j)] in float32
                   VJP: drows[r] = w[a(r)] * gy[token(r)], dw[t, j] = <gy[t], rows[row(t, j)]>

The only scatters are on int32 index vectors of length T * k (inverse permutations).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_jax.ops.grouped_matmul import check_row_align


class DispatchPlan(NamedTuple):
    """Where each assignment goes. M rows, N = T * k assignments.

    row_assign int32 [M]: the assignment feeding row r (arbitrary where not row_valid).
    row_valid bool [M] or None (all valid).
    assign_row int32 [N]: the row holding assignment a (arbitrary where not assign_valid).
    assign_valid bool [N] or None (all valid).
    group_sizes int32 [G]: rows per expert (the grouped matmuls' groups). Unpadded plans: the
      valid rows are the first sum(group_sizes). Padded plans (``row_align`` > 1): each size is
      rounded up to the alignment and the rows past an expert's assignments are padding
      (row_valid False; they hold some token's copy, so everything computed on them is finite).
    """

    row_assign: jax.Array
    row_valid: jax.Array | None
    assign_row: jax.Array
    assign_valid: jax.Array | None
    group_sizes: jax.Array


def inverse_permutation(perm):
    """int32 [N] permutation -> its inverse (an index scatter of N ints)."""
    n = perm.shape[0]
    return jnp.zeros((n,), jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)


def sort_by_expert(expert_ids, num_experts: int, kept=None):
    """Stable sort of the flat assignments by expert; dropped ones (``kept`` False) go last.

    expert_ids int32 [T, k], kept bool [T, k] or None -> (order int32 [N] (sorted
    position -> assignment), position int32 [N] (assignment -> sorted position),
    group_sizes int32 [E] counting kept assignments only).
    """
    key = expert_ids.reshape(-1)
    if kept is not None:
        key = jnp.where(kept.reshape(-1), key, num_experts)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(key, length=num_experts).astype(jnp.int32)
    return order, inverse_permutation(order), group_sizes


def padded_rows(num_rows: int, num_experts: int, row_align: int) -> int:
    """Static rows of a padded buffer: every expert with rows adds at most row_align - 1, rounded up."""
    pad = (row_align - 1) * min(num_experts, num_rows)
    return -(-(num_rows + pad) // row_align) * row_align


def _padded_plan(position, group_sizes, expert_ids, kept, n_rows: int, row_align: int) -> DispatchPlan:
    """Each expert's rows start at a multiple of ``row_align`` (see :func:`plan_dispatch`)."""
    n = position.shape[0]
    E = group_sizes.shape[0]
    m = padded_rows(n_rows, E, row_align)
    padded = -(-group_sizes // row_align) * row_align
    start = jnp.cumsum(group_sizes) - group_sizes
    pad_start = jnp.cumsum(padded) - padded
    key = expert_ids.reshape(-1)
    valid = jnp.ones((n,), bool) if kept is None else kept.reshape(-1)
    e = jnp.clip(key, 0, E - 1)
    assign_row = jnp.where(valid, pad_start[e] + position - start[e], m).astype(jnp.int32)
    # padding rows read assignment 0 (any token: finite); scatters of N ints, out-of-range rows dropped
    row_assign = jnp.zeros((m,), jnp.int32).at[assign_row].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    row_valid = jnp.zeros((m,), bool).at[assign_row].set(True, mode="drop")
    return DispatchPlan(row_assign, row_valid, jnp.minimum(assign_row, m - 1), None if kept is None else valid,
                        padded)


def plan_dispatch(expert_ids, num_experts: int, *, kept=None, num_rows: int | None = None,
                  row_align: int = 1) -> DispatchPlan:
    """Plan for a single device: rows sorted by expert (stable: token order within an expert).

    ``num_rows`` (default T * k) truncates the buffer; it must be at least the number of
    kept assignments (e.g. min(T * k, E * capacity) with a capacity).
    ``row_align`` > 1 pads: each expert's rows start at a multiple of it (the buffer grows to
    :func:`padded_rows`; ``group_sizes`` are the padded sizes), which lets Hopper's TMA
    forward run (:func:`sparse_jax.ops.preferred_row_alignment`). Same gathers, same VJPs.
    """
    check_row_align(row_align)
    T, k = expert_ids.shape
    n = T * k
    m = n if num_rows is None else num_rows
    if kept is None and m != n:
        raise ValueError(f"num_rows = {m} < T * k = {n} drops assignments; pass ``kept`` to say which")
    order, position, group_sizes = sort_by_expert(expert_ids, num_experts, kept)
    if row_align > 1:
        return _padded_plan(position, group_sizes, expert_ids, kept, m, row_align)
    if kept is None:
        return DispatchPlan(order, None, position, None, group_sizes)
    row_valid = jnp.arange(m, dtype=jnp.int32) < group_sizes.sum()
    return DispatchPlan(order[:m], row_valid, position, kept.reshape(-1), group_sizes)


def _take(x, idx):
    return jnp.take(x, idx, axis=0, mode="clip")


def _gather_assignments(rows, assign_row, assign_valid, k: int):
    """rows [M, D] -> float32 [T, k, D] with invalid assignments zeroed."""
    g = _take(rows, assign_row).astype(jnp.float32)
    if assign_valid is not None:
        g = jnp.where(assign_valid[:, None], g, 0.0)
    return g.reshape(-1, k, rows.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _expand(x, row_token, assign_row, assign_valid, k):
    return _take(x, row_token)


def _expand_fwd(x, row_token, assign_row, assign_valid, k):
    return _take(x, row_token), (assign_row, assign_valid)


def _expand_bwd(k, res, g):
    assign_row, assign_valid = res
    if k == 1 and assign_valid is None:
        dx = _take(g, assign_row)
    else:
        dx = _gather_assignments(g, assign_row, assign_valid, k).sum(1)
    return dx.astype(g.dtype), None, None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


def expand(x, plan: DispatchPlan, top_k: int):
    """Rows of the expert-sorted buffer: x [T, D] -> [M, D] (x.dtype), row r = x[token(r)].

    Invalid rows hold some token's copy; the grouped matmuls never read them (they lie
    past sum(group_sizes)), and their cotangents are ignored.
    """
    row_token = plan.row_assign // top_k if top_k > 1 else plan.row_assign
    return _expand(x, row_token, plan.assign_row, plan.assign_valid, top_k)


def permute(x, perm, inverse):
    """x[perm] for a permutation ``perm`` with ``inverse`` = inverse_permutation(perm); VJP g[inverse]."""
    return _expand(x, perm, inverse, None, 1)


@jax.custom_vjp
def _combine(rows, weights, plan):
    T, k = weights.shape
    g = _gather_assignments(rows, plan.assign_row, plan.assign_valid, k)
    # A broadcast-multiply-reduce (not an einsum) so XLA fuses gather, scale and sum
    # into one pass instead of emitting a batched dot with a contraction of k.
    return jnp.sum(weights.astype(jnp.float32)[:, :, None] * g, axis=1)


def _combine_fwd(rows, weights, plan):
    return _combine(rows, weights, plan), (rows, weights, plan)


def _combine_bwd(res, gy):
    rows, weights, plan = res
    T, k = weights.shape
    gy = gy.astype(jnp.float32)
    # d rows[r] = w[a(r)] * gy[token(a(r))]
    w_row = _take(weights.reshape(-1), plan.row_assign)
    d_rows = _take(gy, plan.row_assign // k) * w_row[:, None]
    if plan.row_valid is not None:
        d_rows = jnp.where(plan.row_valid[:, None], d_rows, 0.0)
    # d w[t, j] = <gy[t], rows[row(t, j)]>
    g = _gather_assignments(rows, plan.assign_row, plan.assign_valid, k)
    d_w = jnp.sum(gy[:, None, :] * g, axis=-1)
    return d_rows.astype(rows.dtype), d_w.astype(weights.dtype), None


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(rows, weights, plan: DispatchPlan, out_dtype=None):
    """Weighted sum back to token order: y[t] = sum_j weights[t, j] * rows[row(t, j)].

    rows [M, D] (expert outputs, any float dtype), weights float [T, k] -> y [T, D] in
    ``out_dtype`` (default rows.dtype). Weighting and summation run in float32; dropped
    assignments contribute nothing. Differentiable in rows and weights.
    """
    y = _combine(rows, weights, plan)
    return y.astype(out_dtype or rows.dtype)
