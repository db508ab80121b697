"""Router: expert choice vs a NumPy oracle, ties, bias, group limits, aux losses, capacity drop order."""

from __future__ import annotations

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_jax.moe import capacity, capacity_mask, route

# ---------------------------------------------------------------------------------- NumPy oracles


def _np_scores(logits, scoring):
    # The scores come from jax (float32, as route computes them) so the oracle below
    # tests the *selection* logic on bit-identical values.
    f = jax.nn.softmax if scoring == "softmax" else jax.nn.sigmoid
    return np.asarray(f(jnp.asarray(logits, jnp.float32)), np.float32)


def _np_select(sel, top_k, num_groups=None, topk_groups=None):
    """Top-k per row by (value desc, index asc), with DeepSeek-V3 group limiting. sel float32 [T, E]."""
    T, E = sel.shape
    ids = np.zeros((T, top_k), np.int64)
    for t in range(T):
        row = sel[t].copy()
        if num_groups is not None:
            per = E // num_groups
            top = -np.sort(-row.reshape(num_groups, per), axis=1)[:, :min(2, per)]
            gscore = top[:, 0] if per == 1 else (top[:, 0] + top[:, 1]).astype(np.float32)
            keep = sorted(range(num_groups), key=lambda i: (-gscore[i], i))[:topk_groups]
            allowed = np.zeros(E, bool)
            for gi in keep:
                allowed[gi * per:(gi + 1) * per] = True
            row = np.where(allowed, row, -np.inf)
        ids[t] = sorted(range(E), key=lambda e: (-row[e], e))[:top_k]
    return ids


def _np_capacity_keep(ids, num_experts, cap):
    """Per expert keep the first ``cap`` assignments in flat (token-major) order."""
    used = np.zeros(num_experts, np.int64)
    kept = np.zeros(ids.shape, bool)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if used[e] < cap:
                kept[t, j] = True
                used[e] += 1
    return kept


# -------------------------------------------------------------------------------------- selection

_route = jax.jit(route, static_argnames=("top_k", "scoring", "normalize_topk", "num_groups", "topk_groups"))


@st.composite
def _routing_case(draw):
    groups = draw(st.sampled_from([None, 1, 2, 4]))
    E = draw(st.sampled_from([4, 8]))
    topk_groups = None if groups is None else draw(st.integers(1, groups))
    reachable = E if groups is None else topk_groups * (E // groups)
    top_k = draw(st.integers(1, reachable))
    T = 6  # one shape keeps the compile cache warm; the variety is in values, k, groups
    # Few distinct logit values: many exact ties.
    logits = np.array(draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 0.0, 1.0, 3.0]), min_size=T * E,
                                    max_size=T * E)), np.float32).reshape(T, E)
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    bias = None
    if draw(st.booleans()):
        bias = np.array(draw(st.lists(st.sampled_from([0.0, 0.0, 0.5, -0.25]), min_size=E, max_size=E)),
                        np.float32)
    return logits, top_k, scoring, bias, groups, topk_groups, draw(st.booleans())


@given(_routing_case())
def test_route_matches_numpy_oracle(case):
    logits, top_k, scoring, bias, groups, topk_groups, normalize = case
    r = _route(jnp.asarray(logits), top_k=top_k, scoring=scoring, bias=None if bias is None else jnp.asarray(bias),
               num_groups=groups, topk_groups=topk_groups, normalize_topk=normalize)
    scores = _np_scores(logits, scoring)
    sel = scores if bias is None else (scores + bias).astype(np.float32)
    want_ids = _np_select(sel, top_k, groups, topk_groups)
    ids = np.asarray(r.expert_ids)
    np.testing.assert_array_equal(ids, want_ids)
    assert r.expert_ids.dtype == jnp.int32 and r.weights.dtype == jnp.float32
    # invariants: distinct, in range
    assert all(len(set(row)) == top_k for row in ids.tolist())
    assert ids.min() >= 0 and ids.max() < logits.shape[1]
    want_w = np.take_along_axis(scores.astype(np.float64), want_ids, axis=1)
    if normalize:
        want_w = want_w / want_w.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(r.weights), want_w, rtol=2e-6, atol=1e-7)


def test_all_ties_pick_lowest_indices():
    T, E, k = 5, 8, 3
    r = route(jnp.zeros((T, E)), k)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), np.tile(np.arange(k), (T, 1)))
    np.testing.assert_allclose(np.asarray(r.weights), np.full((T, k), 1.0 / k), rtol=1e-6)
    # sigmoid saturating to exactly 1.0 for every expert: still distinct lowest ids
    r = route(jnp.full((T, E), 100.0), k, scoring="sigmoid", num_groups=4, topk_groups=2)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), np.tile(np.arange(k), (T, 1)))
    # top_k == E: a permutation of all experts per token
    r = route(jnp.zeros((T, E)), E)
    np.testing.assert_array_equal(np.sort(np.asarray(r.expert_ids), axis=1), np.tile(np.arange(E), (T, 1)))


def test_bias_changes_choice_not_weights():
    T, E, k = 6, 4, 2
    logits = jax.random.normal(jax.random.key(0), (T, E))
    bias = jnp.array([0.0, 0.0, 0.0, 10.0])
    r = route(logits, k, scoring="sigmoid", bias=bias, normalize_topk=False)
    assert np.all(np.asarray(r.expert_ids)[:, 0] == 3)
    np.testing.assert_allclose(np.asarray(r.weights)[:, 0], np.asarray(jax.nn.sigmoid(logits))[:, 3], rtol=1e-6)
    # no gradient flows into the bias
    g = jax.grad(lambda b: route(logits, k, bias=b).weights.sum())(bias)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_group_score_is_sum_of_top2_not_max():
    # group 0: one high expert (0.9) and low rest; group 1: two fairly high (0.6, 0.6).
    # top-2 sum prefers group 1 (1.2 > 0.9 + 0.0); a max rule would pick group 0.
    sel = np.array([[0.9, 0.0, 0.6, 0.6]], np.float32)
    logits = np.log(sel + 1e-30) - np.log1p(-sel + 1e-30)  # sigmoid^-1
    logits[0, 1] = -30.0
    r = route(jnp.asarray(logits), 1, scoring="sigmoid", num_groups=2, topk_groups=1)
    assert int(r.expert_ids[0, 0]) == 2


def test_aux_losses_match_definitions():
    T, E, k = 11, 6, 2
    logits = 2.0 * jax.random.normal(jax.random.key(1), (T, E))
    for scoring in ("softmax", "sigmoid"):
        r = route(logits, k, scoring=scoring)
        lg = np.asarray(logits, np.float64)
        if scoring == "softmax":
            p = np.exp(lg - lg.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
        else:
            s = 1 / (1 + np.exp(-lg))
            p = s / s.sum(1, keepdims=True)
        counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=E)
        np.testing.assert_array_equal(np.asarray(r.aux.tokens_per_expert), counts)
        lb = E * np.sum(counts / (T * k) * p.mean(0))
        np.testing.assert_allclose(float(r.aux.load_balance_loss), lb, rtol=1e-5)
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        np.testing.assert_allclose(float(r.aux.z_loss), np.mean(lse**2), rtol=1e-5)
    # uniform probabilities: the balance loss is exactly 1 whatever the choice
    r = route(jnp.zeros((T, E)), k)
    np.testing.assert_allclose(float(r.aux.load_balance_loss), 1.0, rtol=1e-6)


def test_route_gradients():
    logits = jax.random.normal(jax.random.key(2), (7, 5))

    @jax.jit
    def f(lg):
        r = route(lg, 2, scoring="softmax")
        return jnp.sum(r.weights * jnp.arange(2.0)) + r.aux.load_balance_loss + 0.1 * r.aux.z_loss

    jax.test_util.check_grads(f, (logits,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    assert float(jnp.abs(jax.grad(f)(logits)).sum()) > 0


def test_jitter():
    logits = jax.random.normal(jax.random.key(3), (64, 8))
    with pytest.raises(ValueError, match="rng"):
        route(logits, 2, jitter=0.1)
    a = route(logits, 2, jitter=0.5, rng=jax.random.key(0))
    b = route(logits, 2, jitter=0.5, rng=jax.random.key(0))
    c = route(logits, 2, jitter=0.5, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a.weights), np.asarray(b.weights))
    assert not np.array_equal(np.asarray(a.weights), np.asarray(c.weights))
    # aux z-loss is on the un-jittered logits
    np.testing.assert_allclose(float(a.aux.z_loss), float(route(logits, 2).aux.z_loss), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=9), "top_k"),
    (dict(top_k=2, scoring="relu"), "scoring"),
    (dict(top_k=2, bias=jnp.zeros(7)), "bias"),
    (dict(top_k=2, num_groups=3, topk_groups=1), "num_groups"),
    (dict(top_k=2, num_groups=4), "topk_groups"),
    (dict(top_k=2, num_groups=4, topk_groups=5), "topk_groups"),
    (dict(top_k=3, num_groups=4, topk_groups=1), "exceeds"),
    (dict(top_k=2, jitter=-1.0), "jitter"),
])
def test_route_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        route(jnp.zeros((4, 8)), **kwargs)
    with pytest.raises(ValueError, match="logits"):
        route(jnp.zeros((4, 8), jnp.int32), 2)


# --------------------------------------------------------------------------------------- capacity

@settings(max_examples=15)
@given(st.sampled_from([5, 12]), st.integers(1, 5), st.integers(1, 3), st.floats(0.1, 2.0), st.integers(0, 2**31 - 1))
def test_capacity_mask_drop_order(T, E, k, cf, seed):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:  # skewed: every token's first choice is expert 0
        ids = np.stack([np.r_[0, 1 + rng.permutation(E - 1)][:k] for _ in range(T)]).astype(np.int32)
    else:
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    cap = capacity(T, k, E, cf)
    kept = np.asarray(capacity_mask(jnp.asarray(ids), E, cap))
    np.testing.assert_array_equal(kept, _np_capacity_keep(ids, E, cap))
    assert np.all(np.bincount(ids[kept], minlength=E) <= cap)


def test_capacity_mask_offset_and_padding():
    ids = jnp.array([[0, 1], [0, 2], [1, 0], [0, 1]], jnp.int32)
    # expert 0 already has 1 assignment from an earlier shard; capacity 2 -> only one more fits
    kept = capacity_mask(ids, 3, 2, rank_offset=jnp.array([1, 0, 0]))
    np.testing.assert_array_equal(np.asarray(kept), [[True, True], [False, True], [True, False], [False, False]])
    # padded token 0 neither uses capacity nor is kept
    kept = capacity_mask(ids, 3, 1, token_mask=jnp.array([False, True, True, True]))
    np.testing.assert_array_equal(np.asarray(kept), [[False, False], [True, True], [True, False], [False, False]])


def test_capacity_formula():
    assert capacity(10, 2, 4, 1.0) == 5
    assert capacity(10, 2, 3, 1.0) == 7
    assert capacity(1, 1, 8, 0.01) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(10, 2, 4, 0.0)


def test_router_padding_is_exact(monkeypatch):
    """ROUTER_MIN_ROWS pads few tokens with zero rows: the same logits as the plain product."""
    from sparse_jax.moe import routing
    x, rw = jax.random.normal(jax.random.key(0), (3, 40)), jax.random.normal(jax.random.key(1), (40, 6))
    monkeypatch.setattr(routing, "ROUTER_MIN_ROWS", 0)
    want = routing.router_logits(x, rw)
    monkeypatch.setattr(routing, "ROUTER_MIN_ROWS", 8)
    got = routing.router_logits(x, rw)
    assert got.shape == (3, 6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
