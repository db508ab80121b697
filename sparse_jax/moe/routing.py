"""Router: scores, top-k expert choice, auxiliary losses and the capacity rule.

Everything here is per token and jit-friendly (static shapes, no host sync).

Definitions used throughout (T tokens, E experts, k = top_k):

* scores: ``softmax(logits)`` or ``sigmoid(logits)``, float32 [T, E].
* selection scores: scores + ``bias`` (DeepSeek-V3 aux-loss-free balancing). They
  decide *which* experts are chosen; the combine weights are always the plain scores.
* group-limited routing (DeepSeek-V3): experts split into ``num_groups`` contiguous
  groups; a group's score is the sum of its top-2 selection scores (top-1 when a
  group has one expert); the ``topk_groups`` best groups are kept and the k experts
  are chosen among their members only.
* ties: lowest index first, both for groups and experts (``lax.top_k`` is stable);
  a token never gets the same expert twice.
* load-balancing loss (Switch / GShard, normalised so perfect balance gives 1):
  ``E * sum_e f_e * P_e`` with ``f_e`` = (assignments to e) / (T k) counted on the
  top-k choice (before any capacity drop; no gradient) and ``P_e`` = mean over
  tokens of the token's probability for e: the softmax for ``scoring="softmax"``,
  ``sigmoid / sum(sigmoid)`` per token for ``scoring="sigmoid"``.
* router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)**2`` on the un-jittered logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCORINGS = ("softmax", "sigmoid")


class RouterAux(NamedTuple):
    """Auxiliary router outputs. Losses are float32 scalars; counts int32 [E]."""

    load_balance_loss: jax.Array
    z_loss: jax.Array
    tokens_per_expert: jax.Array  # top-k assignments per expert, before capacity


class MoEAux(NamedTuple):
    """What ``moe_ffn(..., return_aux=True)`` returns beside y.

    load_balance_loss, z_loss: float32 scalars (see the module docstring);
    tokens_per_expert: int32 [E] top-k assignments per expert before capacity;
    dropped: int32 scalar, assignments dropped by the capacity (0 when dropless).
    """

    load_balance_loss: jax.Array
    z_loss: jax.Array
    tokens_per_expert: jax.Array
    dropped: jax.Array

    @classmethod
    def from_router(cls, aux: RouterAux, kept=None) -> "MoEAux":
        dropped = jnp.int32(0) if kept is None else jnp.sum(~kept, dtype=jnp.int32)
        return cls(aux.load_balance_loss, aux.z_loss, aux.tokens_per_expert, dropped)


class Routing(NamedTuple):
    """weights float32 [T, k] (combine weights), expert_ids int32 [T, k], aux."""

    weights: jax.Array
    expert_ids: jax.Array
    aux: RouterAux


# Fewer tokens than this are padded with zero rows for the router product (0: never). At one
# token XLA:GPU emits the [1, D] x [D, E] product as a reduction, 9 us for Qwen2-MoE's
# 3584 x 64 router on an H100 (tune_moe profile, round 4) -- a tenth of the layer's floor.
# Padded to 8 rows (tune_moe step, T = 1, ms per layer): Qwen2 0.1157 -> 0.1086, DeepSeek-V3
# 0.2851 -> 0.2818, Mixtral 0.2741 -> 0.2787 (inside its spread); 16 rows: 0.1095 / 0.2828 / 0.2758.
ROUTER_MIN_ROWS = 8


def router_logits(x, router_weights, keep_padding: bool = False):
    """x [T, D] @ router_weights [D, E] -> float32 [T, E], float32 accumulation.

    The product runs in the promoted dtype of the two: keep ``router_weights`` in
    float32 for a float32 router (x is upcast), or in x.dtype for a bf16 one.
    Default matmul precision, so ``jax.default_matmul_precision`` governs it.
    ``keep_padding``: return the padded product [max(T, ROUTER_MIN_ROWS), E] (rows past T are
    zeros' logits) -- a consumer that reads only the first T rows saves XLA's slice kernel.
    """
    if x.ndim != 2 or router_weights.ndim != 2 or x.shape[1] != router_weights.shape[0]:
        raise ValueError(f"router: x [T, D] and router_weights [D, E] expected; got x {tuple(x.shape)}, "
                         f"router_weights {tuple(router_weights.shape)}")
    dtype = jnp.promote_types(x.dtype, router_weights.dtype)
    T = x.shape[0]
    pad = ROUTER_MIN_ROWS - T if 0 < T < ROUTER_MIN_ROWS else 0  # a matrix product, not XLA's matvec reduction
    xp = jnp.pad(x.astype(dtype), ((0, pad), (0, 0)))
    logits = jnp.dot(xp, router_weights.astype(dtype), preferred_element_type=jnp.float32)
    return logits if keep_padding else logits[:T]


def check_route_args(num_experts: int, top_k, scoring, bias, num_groups, topk_groups, jitter, rng) -> None:
    """Raise ValueError for routing arguments that cannot work (all checks are static)."""
    E = num_experts
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts); got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}; got {scoring!r}")
    if bias is not None:
        if tuple(bias.shape) != (E,):
            raise ValueError(f"bias must have shape [E] = ({E},); got {tuple(bias.shape)}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be floating point; got {bias.dtype}")
    if (num_groups is None) != (topk_groups is None):
        raise ValueError("num_groups and topk_groups go together: give both or neither")
    if num_groups is not None:
        if not isinstance(num_groups, (int, np.integer)) or num_groups < 1 or E % num_groups:
            raise ValueError(f"num_groups must be a positive int dividing E = {E}; got {num_groups!r}")
        if not isinstance(topk_groups, (int, np.integer)) or not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups must be an int in [1, num_groups = {num_groups}]; got {topk_groups!r}")
        reachable = topk_groups * (E // num_groups)
        if top_k > reachable:
            raise ValueError(f"top_k = {top_k} exceeds the {reachable} experts in the {topk_groups} kept groups "
                             f"(E = {E}, num_groups = {num_groups})")
    if not jitter >= 0.0:
        raise ValueError(f"jitter must be >= 0; got {jitter!r}")
    if jitter > 0.0 and rng is None:
        raise ValueError("jitter > 0 needs an rng key (rng=jax.random.key(...))")


def _group_limit(sel, num_groups: int, topk_groups: int):
    """Set the selection scores of experts outside each token's best groups to -inf."""
    T, E = sel.shape
    per_group = E // num_groups
    grouped = sel.reshape(T, num_groups, per_group)
    group_score = jax.lax.top_k(grouped, min(2, per_group))[0].sum(-1)  # [T, G]
    _, keep = jax.lax.top_k(group_score, topk_groups)  # [T, topk_groups]
    group_kept = jnp.any(keep[:, :, None] == jnp.arange(num_groups, dtype=keep.dtype), axis=1)  # [T, G]
    return jnp.where(group_kept[:, :, None], grouped, -jnp.inf).reshape(T, E)


class AuxStats(NamedTuple):
    """Sums over tokens from which :class:`RouterAux` follows; they add across token shards.

    counts int32 [E] (assignments per expert), prob_sum float32 [E] (sum over tokens of
    the balancing probabilities), z_sum float32 (sum of logsumexp(logits)**2).
    """

    counts: jax.Array
    prob_sum: jax.Array
    z_sum: jax.Array


def aux_stats(logits, scores, expert_ids, scoring: str, token_mask=None) -> AuxStats:
    """Per-batch sums for the aux losses; tokens with ``token_mask`` False (bool [T]) are left out."""
    E = scores.shape[1]
    if scoring == "softmax":
        probs = scores
    else:
        probs = scores / jnp.maximum(scores.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    z = jax.nn.logsumexp(logits, axis=-1) ** 2
    ids = expert_ids
    if token_mask is not None:
        probs = jnp.where(token_mask[:, None], probs, 0.0)
        z = jnp.where(token_mask, z, 0.0)
        ids = jnp.where(token_mask[:, None], ids, E)
    counts = jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32)
    return AuxStats(counts, probs.sum(0), z.sum())


def aux_from_stats(stats: AuxStats, num_tokens: int, top_k: int) -> RouterAux:
    """RouterAux for ``num_tokens`` tokens from their (possibly summed across shards) stats."""
    E = stats.counts.shape[0]
    frac = stats.counts.astype(jnp.float32) / max(num_tokens * top_k, 1)
    mean_prob = stats.prob_sum / max(num_tokens, 1)
    return RouterAux(E * jnp.sum(frac * mean_prob), stats.z_sum / max(num_tokens, 1), stats.counts)


def select_experts(logits, top_k: int, *, scoring: str = "softmax", normalize_topk: bool = True, bias=None,
                   num_groups: int | None = None, topk_groups: int | None = None, jitter: float = 0.0, rng=None):
    """The per-token part of :func:`route` (arguments already checked).

    -> (logits float32 [T, E], scores float32 [T, E], weights float32 [T, k],
    expert_ids int32 [T, k]).
    """
    logits = logits.astype(jnp.float32)
    noisy = logits
    if jitter > 0.0:
        noisy = logits * jax.random.uniform(rng, logits.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
    scores = jax.nn.softmax(noisy, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(noisy)

    sel = jax.lax.stop_gradient(scores)
    if bias is not None:
        sel = sel + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if num_groups is not None and topk_groups < num_groups:
        sel = _group_limit(sel, num_groups, topk_groups)
    _, expert_ids = jax.lax.top_k(sel, int(top_k))
    expert_ids = expert_ids.astype(jnp.int32)

    return logits, scores, chosen_weights(scores, expert_ids, normalize_topk), expert_ids


def router_scores(logits, scoring: str):
    """float32 [T, E] scores: softmax or sigmoid of the (float32) logits."""
    return jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)


def chosen_weights(scores, expert_ids, normalize_topk: bool):
    """Combine weights float32 [T, k]: the scores at the chosen experts, over their sum if normalised."""
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if normalize_topk:
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return weights


def route(logits, top_k: int, *, scoring: str = "softmax", normalize_topk: bool = True, bias=None,
          num_groups: int | None = None, topk_groups: int | None = None, jitter: float = 0.0,
          rng=None) -> Routing:
    """Choose ``top_k`` experts per token and their combine weights.

    logits [T, E] (any float dtype; computed on in float32) -> :class:`Routing` with
    weights float32 [T, k], expert_ids int32 [T, k] (distinct per token, ordered by
    selection score, ties to the lower index) and :class:`RouterAux`.

    weights = scores at the chosen experts, divided by their sum when
    ``normalize_topk``. ``bias`` float [E] shifts selection only (no gradient).
    ``jitter`` > 0 multiplies the logits by U(1 - jitter, 1 + jitter) noise drawn from
    ``rng`` before scoring (training-time exploration). Gradients flow from the
    weights and the aux losses into ``logits``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [T, E]; got shape {tuple(logits.shape)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    check_route_args(logits.shape[1], top_k, scoring, bias, num_groups, topk_groups, jitter, rng)
    logits, scores, weights, expert_ids = select_experts(
        logits, top_k, scoring=scoring, normalize_topk=normalize_topk, bias=bias, num_groups=num_groups,
        topk_groups=topk_groups, jitter=jitter, rng=rng)
    return routing_of_choice(logits, scores, weights, expert_ids, top_k, scoring)


def routing_of_choice(logits, scores, weights, expert_ids, top_k: int, scoring: str) -> Routing:
    """:class:`Routing` of a choice made from ``logits`` float32 [T, E] (``scores`` [T, E] as the
    selection scored them): the choice and its aux losses (XLA drops them when unused)."""
    return Routing(weights, expert_ids, aux_from_stats(aux_stats(logits, scores, expert_ids, scoring),
                                                       logits.shape[0], top_k))


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments each expert keeps: C = ceil(capacity_factor * T * k / E) (static int)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0; got {capacity_factor!r}")
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_mask(expert_ids, num_experts: int, capacity_: int, *, rank_offset=None, token_mask=None):
    """Which assignments an expert of capacity C keeps -> bool [T, k].

    Drop order: each expert keeps the first C assignments in flat order (t * k + j:
    token order, then the token's choice rank j) and drops the rest.
    ``rank_offset`` int [E]: assignments to each expert that come before this batch
    (earlier token shards); ``token_mask`` bool [T]: tokens that exist (padding does
    not use capacity and is never kept).
    """
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    if token_mask is not None:
        flat = jnp.where(jnp.repeat(token_mask, k), flat, num_experts)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts)
    starts = jnp.cumsum(counts) - counts
    if rank_offset is not None:
        starts = starts - rank_offset
    sorted_ids = flat[order]
    rank_sorted = jnp.arange(T * k, dtype=jnp.int32) - starts[jnp.minimum(sorted_ids, num_experts - 1)]
    kept_sorted = (rank_sorted < capacity_) & (sorted_ids < num_experts)
    kept = jnp.zeros((T * k,), bool).at[order].set(kept_sorted, unique_indices=True)
    return kept.reshape(T, k)
