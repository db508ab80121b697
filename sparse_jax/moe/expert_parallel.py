"""Expert parallelism: the MoE layer under ``shard_map`` with experts sharded over a mesh axis.

Layout over the P devices of ``axis_name``: tokens are split into P contiguous
shards (padded to a multiple of P), expert e lives on device e // (E / P). Per
device:

1. route the local tokens (router, bias and shared expert replicated); the aux
   losses are psum'd sums, the capacity rule ranks assignments globally (counts of
   earlier shards via all_gather), so both equal the single-device layer's;
2. sort the local assignments by expert and pack a send buffer [P, Cp, D]: slot
   (q, i) holds the i-th row bound for device q. Cp, the rows per device pair, is
   static (no host sync). The default Cp = T_local * min(k, E / P) can hold every
   assignment (exact, dropless); ``exchange_capacity_factor`` f sets
   Cp = ceil(f * T_local * k / P) instead (less memory and traffic) and
   assignments past a pair's Cp are dropped (first in expert-then-token order kept,
   counted in ``aux.dropped``);
3. exchange the per-(pair, expert) counts (``all_to_all``) and the rows:
   ``exchange="padded"`` (default) ships whole [Cp, D] blocks with ``all_to_all``
   and runs everywhere; ``exchange="ragged"`` ships only the real rows with
   ``ragged_all_to_all`` (GPU/TPU only: XLA:CPU lacks it) into the same static
   layout. Sort the received rows by local expert; grouped SwiGLU and down matmuls
   over the global ``group_sizes`` with ``group_offset`` = device * E / P, so each
   device runs only its experts;
4. unsort, exchange back the same way, float32 weighted combine into token order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_jax import _compat, ops
from sparse_jax.moe._checks import check_moe_args
from sparse_jax.moe.dispatch import DispatchPlan, combine, expand, inverse_permutation, permute, sort_by_expert
from sparse_jax.moe.layer import shared_expert_ffn
from sparse_jax.moe.routing import (AuxStats, MoEAux, aux_from_stats, aux_stats, capacity, capacity_mask,
                                    router_logits, select_experts)


def _send_plan(expert_ids, kept, num_experts: int, num_devices: int, pair_capacity: int):
    """Plan packing local assignments into the [P * Cp] send buffer -> (plan, sent int32 [P, E / P]).

    expert_ids int32 [T, k], kept bool [T, k]. sent[q, e] = rows for device q's local
    expert e (after the Cp truncation).
    """
    T, k = expert_ids.shape
    El = num_experts // num_devices
    order, position, group_sizes = sort_by_expert(expert_ids, num_experts, kept)
    excl = (jnp.cumsum(group_sizes) - group_sizes).reshape(num_devices, El)
    dev_start = excl[:, 0]
    chunk_excl = excl - dev_start[:, None]
    chunk_incl = chunk_excl + group_sizes.reshape(num_devices, El)
    sent = jnp.minimum(chunk_incl, pair_capacity) - jnp.minimum(chunk_excl, pair_capacity)

    dest = jnp.minimum(expert_ids.reshape(-1) // El, num_devices - 1)
    slot = position - dev_start[dest]
    assign_valid = kept.reshape(-1) & (slot < pair_capacity)
    assign_row = dest * pair_capacity + slot

    rows = jnp.arange(num_devices * pair_capacity, dtype=jnp.int32)
    q, i = rows // pair_capacity, rows % pair_capacity
    row_valid = i < sent.sum(1)[q]
    row_assign = order[jnp.minimum(dev_start[q] + i, T * k - 1)]
    return DispatchPlan(row_assign, row_valid, assign_row, assign_valid, group_sizes), sent


def _receive_order(recv_counts, pair_capacity: int):
    """Received rows [P * Cp] (source-major, expert-sorted within a source) -> sort by local expert.

    recv_counts int32 [P, El] -> (perm, inverse, local group sizes int32 [El]).
    """
    incl = jnp.cumsum(recv_counts, axis=1)  # [P, El]
    i = jnp.arange(pair_capacity, dtype=jnp.int32)
    local_expert = jnp.sum(i[None, :, None] >= incl[:, None, :], axis=-1)  # [P, Cp]; El marks padding
    perm = jnp.argsort(local_expert.reshape(-1), stable=True).astype(jnp.int32)
    return perm, inverse_permutation(perm), recv_counts.sum(0).astype(jnp.int32)


def _exchange(rows, send_counts, recv_counts, *, axis_name, pair_capacity: int, ragged: bool):
    """[P * Cp, D] rows, slot block q bound for device q -> the blocks received, block s from device s.

    send_counts / recv_counts int32 [P]: real rows per block. The padded exchange ships
    whole blocks; the ragged one only the real rows (the rest of the result is zeros).
    """
    if not ragged:
        return jax.lax.all_to_all(rows, axis_name, 0, 0, tiled=True)
    num_devices = send_counts.shape[0]
    starts = jnp.arange(num_devices, dtype=jnp.int32) * pair_capacity
    mine = jnp.full((num_devices,), jax.lax.axis_index(axis_name) * pair_capacity, jnp.int32)
    return jax.lax.ragged_all_to_all(rows, jnp.zeros_like(rows), starts, send_counts.astype(jnp.int32), mine,
                                     recv_counts.astype(jnp.int32), axis_name=axis_name)


def _ep_body(x, router_weights, w_gate, w_up, w_down, bias, shared, rng, *, axis_name, num_devices, num_tokens,
             top_k, route_kw, cap, pair_capacity, ragged, backend, interpret):
    """One device's share of the layer (inside shard_map). x [T_local, D] -> (y [T_local, D], MoEAux)."""
    T_l = x.shape[0]
    El = w_gate.shape[0]
    E = El * num_devices
    d = jax.lax.axis_index(axis_name)
    token_mask = None
    if num_tokens != T_l * num_devices:
        token_mask = d * T_l + jnp.arange(T_l) < num_tokens
    if rng is not None:
        rng = jax.random.fold_in(rng, d)

    logits, scores, weights, ids = select_experts(router_logits(x, router_weights), top_k, bias=bias, rng=rng,
                                                  **route_kw)
    stats = jax.lax.psum(aux_stats(logits, scores, ids, route_kw["scoring"], token_mask), axis_name)
    aux = aux_from_stats(AuxStats(*stats), num_tokens, top_k)

    real = jnp.ones((T_l, top_k), bool) if token_mask is None else jnp.broadcast_to(token_mask[:, None], ids.shape)
    kept = real
    if cap is not None:
        local_counts = jnp.bincount(jnp.where(real, ids, E).reshape(-1), length=E)
        earlier = jnp.arange(num_devices)[:, None] < d
        offset = jnp.sum(jnp.where(earlier, jax.lax.all_gather(local_counts, axis_name), 0), axis=0)
        kept = capacity_mask(ids, E, cap, rank_offset=offset, token_mask=token_mask)

    plan, sent = _send_plan(ids, kept, E, num_devices, pair_capacity)
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
    recv_counts = a2a(sent)
    exchange = functools.partial(_exchange, axis_name=axis_name, pair_capacity=pair_capacity, ragged=ragged)
    recv = exchange(expand(x, plan, top_k), sent.sum(1), recv_counts.sum(1))
    perm, inv, local_sizes = _receive_order(recv_counts, pair_capacity)
    xs = permute(recv, perm, inv)
    offset = d * El
    sizes = jax.lax.dynamic_update_slice(jnp.zeros((E,), jnp.int32), local_sizes, (offset,))
    h = ops.grouped_swiglu(xs, w_gate, w_up, sizes, group_offset=offset, backend=backend, interpret=interpret)
    out = ops.grouped_matmul(h, w_down, sizes, group_offset=offset, backend=backend, interpret=interpret)
    back = exchange(permute(out, inv, perm), recv_counts.sum(1), sent.sum(1))
    y = combine(back, weights, plan, out_dtype=jnp.float32)
    if shared is not None:
        y = y + shared_expert_ffn(x, *shared)
    dropped = jax.lax.psum(jnp.sum(real & ~plan.assign_valid.reshape(ids.shape), dtype=jnp.int32), axis_name)
    return y.astype(x.dtype), MoEAux(aux.load_balance_loss, aux.z_loss, aux.tokens_per_expert, dropped)


def _check_exchange(exchange: str, mesh) -> None:
    if exchange not in ("padded", "ragged"):
        raise ValueError(f"exchange must be 'padded' or 'ragged'; got {exchange!r}")
    if exchange == "ragged" and any(d.platform == "cpu" for d in mesh.devices.flat):
        raise ValueError("exchange='ragged' needs GPUs or TPUs: XLA:CPU has no ragged-all-to-all; "
                         "use exchange='padded'")


def _placed(a, mesh, spec, explicit: bool):
    """Explicit-sharding meshes need inputs already laid out as shard_map's specs say."""
    if a is None or not explicit:
        return a
    return jax.tree.map(lambda leaf: jax.sharding.reshard(leaf, NamedSharding(mesh, spec)), a)


def moe_ffn_ep(x, router_weights, w_gate, w_up, w_down, *, mesh, axis_name: str, top_k: int,
               scoring: str = "softmax", normalize_topk: bool = True, bias=None, num_groups: int | None = None,
               topk_groups: int | None = None, capacity_factor: float | None = None, shared_expert=None,
               return_aux: bool = False, jitter: float = 0.0, rng=None,
               exchange_capacity_factor: float | None = None, exchange: str = "padded",
               backend: str | None = None, interpret: bool = False):
    """:func:`sparse_jax.moe.moe_ffn` with experts sharded over ``mesh`` axis ``axis_name``.

    Same arguments and result as ``moe_ffn`` (see the module docstring for the
    layout), plus ``mesh``, ``axis_name`` (its size P must divide E) and
    ``exchange_capacity_factor`` (None = exact) and ``exchange`` ("padded" or
    "ragged"). Tokens are split over ``axis_name``
    (T need not divide by P: padded); y comes back split over it the same way.
    Other mesh axes hold replicas. With ``jitter`` each device draws its own noise
    (``fold_in(rng, device)``), so jittered results differ from ``moe_ffn``'s.
    """
    T, D, E, F = check_moe_args(x, router_weights, w_gate, w_up, w_down, top_k=top_k, scoring=scoring, bias=bias,
                                num_groups=num_groups, topk_groups=topk_groups, capacity_factor=capacity_factor,
                                shared_expert=shared_expert, jitter=jitter, rng=rng)
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    num_devices = mesh.shape[axis_name]
    if E % num_devices:
        raise ValueError(f"E = {E} experts cannot be split evenly over {num_devices} devices of axis {axis_name!r}")
    _check_exchange(exchange, mesh)
    if exchange_capacity_factor is not None and not exchange_capacity_factor > 0:
        raise ValueError(f"exchange_capacity_factor must be > 0 (or None); got {exchange_capacity_factor!r}")
    El = E // num_devices
    T_l = max(1, -(-T // num_devices))
    pair_capacity = T_l * min(top_k, El)
    if exchange_capacity_factor is not None:
        pair_capacity = max(1, min(pair_capacity, math.ceil(exchange_capacity_factor * T_l * top_k / num_devices)))
    cap = capacity(T, top_k, E, capacity_factor) if capacity_factor is not None else None

    xp = jnp.pad(x, ((0, T_l * num_devices - T), (0, 0)))
    route_kw = dict(scoring=scoring, normalize_topk=normalize_topk, num_groups=num_groups, topk_groups=topk_groups,
                    jitter=jitter)
    body = functools.partial(_ep_body, axis_name=axis_name, num_devices=num_devices, num_tokens=T, top_k=top_k,
                             route_kw=route_kw, cap=cap, pair_capacity=pair_capacity,
                             ragged=exchange == "ragged", backend=backend,
                             interpret=interpret)
    split, repl = P(axis_name), P()
    in_specs = (split, repl, split, split, split, repl, repl, repl)
    args = (xp, router_weights, w_gate, w_up, w_down, bias, None if shared_expert is None else tuple(shared_expert),
            rng)
    explicit = dict(zip(mesh.axis_names, mesh.axis_types))[axis_name] == jax.sharding.AxisType.Explicit
    args = tuple(_placed(a, mesh, s, explicit) for a, s in zip(args, in_specs))
    fn = _compat.shard_map(body, mesh=mesh, in_specs=in_specs,
                           out_specs=(split, MoEAux(repl, repl, repl, repl)))
    y, aux = fn(*args)
    if y.shape[0] != T:
        if explicit:  # an explicit split of 13 rows over 4 devices cannot exist: gather first
            y = jax.sharding.reshard(y, NamedSharding(mesh, P()))
        y = y[:T]
    return (y, aux) if return_aux else y
