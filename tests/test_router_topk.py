"""topk_routing (the decode path's one-launch routing) vs the jnp routing: choices, weights,
gradients, ties, NaN rows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from sparse_jax import ops
from sparse_jax.moe import routing
from tests.conftest import randn

KERNEL = dict(backend="triton", interpret=True)  # the Triton kernel, interpreted (it is GPU-only)


def _jnp(logits, k, **kw):
    _, _, w, ids = routing.select_experts(logits, k, **kw)
    return w, ids


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("T, E, k, normalize", [(1, 64, 4, True), (3, 100, 8, False), (2, 8, 8, True), (1, 5, 1, False)],
                         ids=["qwen2-like", "odd-E", "k-equals-E", "top-1"])
def test_matches_jnp_routing(scoring, with_bias, T, E, k, normalize):
    """Same ids (exactly), weights and d logits as select_experts."""
    logits = randn(T + E, (T, E)) * 2.0
    bias = randn(7, (E,)) * 0.1 if with_bias else None
    kw = dict(scoring=scoring, normalize_topk=normalize, bias=bias)
    w, ids = ops.topk_routing(logits, k, **kw, **KERNEL)
    w_ref, ids_ref = _jnp(logits, k, **kw)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=2e-6, atol=1e-7)
    ct = randn(3, (T, k))

    def loss(fn, lg):
        return jnp.sum(fn(lg)[0] * ct)
    g = jax.grad(functools.partial(loss, lambda lg: ops.topk_routing(lg, k, **kw, **KERNEL)))(logits)
    g_ref = jax.grad(functools.partial(loss, lambda lg: _jnp(lg, k, **kw)))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


@given(seed=st.integers(0, 2 ** 31 - 1), k=st.sampled_from([1, 3, 6]), scoring=st.sampled_from(["softmax", "sigmoid"]),
       levels=st.integers(1, 4))
def test_ties_break_to_the_lower_index(seed, k, scoring, levels):
    """Logits drawn from a few values (many exact ties): the same distinct ids as lax.top_k."""
    logits = jnp.asarray(np.random.default_rng(seed).integers(0, levels, (2, 40)), jnp.float32)
    w, ids = ops.topk_routing(logits, k, scoring=scoring, **KERNEL)
    w_ref, ids_ref = _jnp(logits, k, scoring=scoring)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=2e-6)
    assert all(len(set(row)) == k for row in np.asarray(ids).tolist())


def test_num_tokens_routes_the_first_rows():
    """Padded logits [8, E] with num_tokens = 1: the first row's choice; the padding rows get
    zero gradient."""
    logits = randn(4, (8, 24))
    w, ids = ops.topk_routing(logits, 3, num_tokens=1, **KERNEL)
    w_ref, ids_ref = _jnp(logits[:1], 3)
    assert ids.shape == (1, 3)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=2e-6)
    g = jax.grad(lambda lg: jnp.sum(ops.topk_routing(lg, 3, num_tokens=1, **KERNEL)[0] * jnp.arange(3.0)))(logits)
    g_ref = jax.grad(lambda lg: jnp.sum(_jnp(lg, 3)[0] * jnp.arange(3.0)))(logits[:1])
    np.testing.assert_allclose(g[:1], g_ref, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(g[1:]))


def test_tpu_backend_runs_the_jnp_routing():
    """No Mosaic kernel: backend="mosaic_tpu" is XLA's top-k (what the TPU layer runs)."""
    logits = randn(2, (3, 20))
    w, ids = ops.topk_routing(logits, 4, bias=randn(3, (20,)), backend="mosaic_tpu")
    w_ref, ids_ref = _jnp(logits, 4, bias=randn(3, (20,)))
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)


def test_no_tokens():
    w, ids = ops.topk_routing(jnp.zeros((0, 6)), 2, **KERNEL)
    assert w.shape == ids.shape == (0, 2) and ids.dtype == jnp.int32


def test_nan_row_gives_in_range_ids():
    logits = jnp.full((1, 16), jnp.nan, jnp.float32)
    _, ids = ops.topk_routing(logits, 4, **KERNEL)
    assert np.all((np.asarray(ids) >= 0) & (np.asarray(ids) < 16))


@pytest.mark.parametrize("change, match", [
    (dict(logits=jnp.zeros((2, 3, 4))), "logits must be"),
    (dict(logits=jnp.zeros((2, 4), jnp.int32)), "logits must be"),
    (dict(k=5), "top_k"),
    (dict(bias=jnp.zeros((3,))), "bias"),
    (dict(scoring="relu"), "scoring"),
    (dict(num_tokens=3), "num_tokens"),
])
def test_bad_input_raises(change, match):
    a = dict(logits=jnp.zeros((2, 4)), k=2, bias=None, scoring="softmax", num_tokens=None)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        ops.topk_routing(a["logits"], a["k"], bias=a["bias"], scoring=a["scoring"], num_tokens=a["num_tokens"],
                         backend="xla")
