"""experts_by_id (the one-token MoE path) vs the per-token reference: forward, every gradient,
invalid ids, the persistent walk and ragged strips, the layer's switch to it, lowering for cuda and tpu."""

from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from pallas_kernels.common import decode_plan
from pallas_kernels.common.decode_plan import DecodeTiles
from sparse_jax import _compat, moe, ops, reference
from sparse_jax.moe import layer
from tests.conftest import assert_close, kernel_names, randn, tolerance


def _experts(E, D, F, dtype, seed):
    return (randn(seed, (E, D, F), dtype, scale=D ** -0.5), randn(seed + 1, (E, D, F), dtype, scale=D ** -0.5),
            randn(seed + 2, (E, F, D), dtype, scale=F ** -0.5))


def _grads(fn, x, w, ids, experts, ct):
    def loss(x, w, a, b, c):
        return jnp.sum(fn(x, w, ids, a, b, c).astype(jnp.float32) * ct)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, *experts)


_NAMES = ("x", "weights", "w_gate", "w_up", "w_down")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T, E, k, D, F", [(1, 6, 2, 200, 136), (1, 4, 4, 64, 48), (3, 8, 3, 40, 72)],
                         ids=["odd-dims", "topk-equals-E", "three-tokens"])
def test_matches_reference(kernel_backend, dtype, T, E, k, D, F):
    """Forward and gradients wrt x, the routing weights and every expert weight; odd D, F
    (ragged last blocks), duplicated ids across tokens (T = 3), ids -1 and E (skipped)."""
    backend, interpret = kernel_backend
    x = randn(1, (T, D), dtype)
    ids = jnp.asarray(np.random.default_rng(T + E).permuted(np.tile(np.arange(E), (T, 1)), axis=1)[:, :k], jnp.int32)
    if T > 1:
        ids = ids.at[1, 0].set(-1).at[2, k - 1].set(E)
    w = jax.random.uniform(jax.random.key(2), (T, k), jnp.float32)
    experts = _experts(E, D, F, dtype, 10)
    ct = randn(3, (T, D))
    fn = functools.partial(ops.experts_by_id, backend=backend, interpret=interpret)
    y, g = _grads(fn, x, w, ids, experts, ct)
    y_ref, g_ref = _grads(lambda x, w, ids, a, b, c: reference.moe_ffn_from_routing(x.astype(jnp.float32), w, ids,
                                                                                     a, b, c),
                          x, w, ids, experts, ct)
    tol = tolerance(dtype, interpret=interpret)
    assert_close(fn(x, w, ids, *experts), reference.moe_ffn_from_routing(x.astype(jnp.float32), w, ids, *experts),
                 tol, "y")
    np.testing.assert_allclose(float(y), float(y_ref), rtol=5 * tol, atol=5 * tol)
    for n, a, b in zip(_NAMES, g, g_ref):
        assert a.dtype == b.dtype
        assert_close(a, b, 5 * tol, f"d {n}")
    if T > 1:  # the skipped assignments get no weight gradient
        assert float(g[1][1, 0]) == 0.0 and float(g[1][2, k - 1]) == 0.0


@pytest.mark.parametrize("D, F", [(200, 72), (64, 64)], ids=["ragged", "full-blocks"])
@pytest.mark.parametrize("top_k, ids, weights", [
    (3, [4, 0, 2], [0.5, 0.3, 0.2]),
    (2, [1, 3, 3, 0], [0.6, 0.0, 0.7, 0.3]),   # two tokens; a zero weight (skipped) beside a live use of its expert
], ids=["one-token", "two-tokens-zero-weight"])
def test_triton_persistent_walk_matches(top_k, ids, weights, D, F):
    """Programs that walk several items (2 programs on 1 "SM"); tn = tk = td = 16 over F = 72,
    D = 200 (ragged last strip, gate/up step and down step: masked loads) and over F = D = 64
    (every block full: unmasked loads)."""
    from pallas_kernels.triton import moe_decode as kern
    E = 5
    ids, w = jnp.asarray(ids, jnp.int32), jnp.asarray(weights, jnp.float32)
    x = randn(0, (ids.shape[0] // top_k, D))
    wg, wu, wd = _experts(E, D, F, jnp.float32, 4)
    tiles = DecodeTiles(tn=16, tk=16, td=16, programs_per_sm=2)
    programs, per = decode_plan.persistent_schedule(ids.shape[0] * (F // 16), 1, 2)
    assert per >= 5, "the test must walk several items per program"
    with mock.patch.object(kern, "num_sms", lambda: 1):
        y = kern.experts_by_id(x, w, ids, wg, wu, wd, top_k=top_k, tiles=tiles, interpret=True)
    want = decode_plan.experts_by_id(x, w, ids, wg, wu, wd, top_k)
    assert_close(y, want, tolerance(jnp.float32), "walked y")  # interpreted on a GPU: tf32 dots


def test_tpu_ragged_strip_matches():
    """F = 200 over 128-wide strips: the last strip's padding (NaN in TPU interpret mode) is
    zeroed in h and in the w_down rows; a zero-weight assignment adds nothing."""
    from pallas_kernels.tpu import moe_decode as kern
    E, D, F, k = 4, 128, 200, 2
    ids, w = jnp.array([3, 1, 0, 2], jnp.int32), jnp.array([0.25, 0.75, 0.0, 1.0], jnp.float32)
    x = randn(0, (2, D))
    wg, wu, wd = _experts(E, D, F, jnp.float32, 5)
    y = kern.experts_by_id(x, w, ids, wg, wu, wd, top_k=k, interpret=_compat.tpu_interpret_params())
    assert_close(y, decode_plan.experts_by_id(x, w, ids, wg, wu, wd, k), tolerance(jnp.float32), "tpu y")


@given(items=st.integers(1, 3000), sms=st.sampled_from([1, 8, 132]), pps=st.integers(1, 4))
def test_persistent_schedule_balances(items, sms, pps):
    programs, per = decode_plan.persistent_schedule(items, sms, pps)
    assert 1 <= programs <= pps * sms
    assert (per - 1) * programs < items <= per * programs  # every item walked once, no idle round
    counts = [len(range(p, items, programs)) for p in range(programs)]
    assert max(counts) - min(counts) <= 1


def test_layer_uses_the_decode_path_at_one_token(kernel_backend):
    """moe_ffn at T = 1 (capacity dropping, a shared expert, gradients through the router)
    equals the per-token reference, and at T = 1 lowers to the two decode kernels only."""
    backend, interpret = kernel_backend
    E, k, D, F = 6, 2, 32, 48
    x, rw = randn(0, (1, D)), randn(1, (D, E))
    experts = _experts(E, D, F, jnp.float32, 2)
    shared = _experts(1, D, 16, jnp.float32, 7)
    shared = (shared[0][0], shared[1][0], shared[2][0])
    ct = randn(9, (1, D))

    def loss(fn, x, rw, experts, **kw):
        y = fn(x, rw, *experts, top_k=k, shared_expert=shared, capacity_factor=0.4, **kw)
        return jnp.sum(y * ct)

    got = jax.grad(functools.partial(loss, moe.moe_ffn, backend=backend, interpret=interpret),
                   argnums=(0, 1, 2))(x, rw, experts)
    want = jax.grad(functools.partial(loss, reference.moe_ffn), argnums=(0, 1, 2))(x, rw, experts)
    tol = tolerance(jnp.float32, interpret=interpret)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, 5 * tol, "layer grads at T=1")
    assert layer.DECODE_MAX_TOKENS >= 1

    S = jax.ShapeDtypeStruct
    f = functools.partial(moe.moe_ffn, top_k=k, backend="triton")
    shapes = lambda T: (S((T, D), jnp.bfloat16), S((D, E), jnp.float32), S((E, D, F), jnp.bfloat16),  # noqa: E731
                        S((E, D, F), jnp.bfloat16), S((E, F, D), jnp.bfloat16))
    one = " ".join(kernel_names(_compat.export(f, "cuda", *shapes(1))))
    assert "moe_decode_" in one and "gmm_schedule" not in one
    many = " ".join(kernel_names(_compat.export(f, "cuda", *shapes(2))))
    assert "moe_decode_" not in many and "gmm_schedule" in many


@pytest.mark.parametrize("platform, backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_lowers_for_hardware(platform, backend):
    """Forward kernels and the gradient lower for cuda (Triton IR) and tpu (full Mosaic)."""
    S = jax.ShapeDtypeStruct
    E, k, D, F = 8, 2, 512, 1024

    def fn(x, w, ids, a, b, c, ct):
        y, pull = jax.vjp(lambda x, w, a, b, c: ops.experts_by_id(x, w, ids, a, b, c, backend=backend), x, w, a, b, c)
        return y, pull(ct)
    _compat.export(fn, platform, S((1, D), jnp.bfloat16), S((1, k), jnp.float32), S((1, k), jnp.int32),
                   S((E, D, F), jnp.bfloat16), S((E, D, F), jnp.bfloat16), S((E, F, D), jnp.bfloat16),
                   S((1, D), jnp.float32))


@pytest.mark.parametrize("T, k, E", [(0, 2, 4), (1, 0, 4), (2, 2, 0)], ids=["no-tokens", "top-0", "no-experts"])
def test_empty_inputs_give_zeros(kernel_backend, T, k, E):
    """Nothing to stream: zeros [T, D] (and zero gradients), without launching a kernel."""
    backend, interpret = kernel_backend
    D, F = 8, 16
    x, w = jnp.ones((T, D)), jnp.ones((T, k))
    ids = jnp.zeros((T, k), jnp.int32)
    experts = (jnp.ones((E, D, F)), jnp.ones((E, D, F)), jnp.ones((E, F, D)))
    fn = functools.partial(ops.experts_by_id, backend=backend, interpret=interpret)
    y = fn(x, w, ids, *experts)
    assert y.shape == (T, D) and y.dtype == jnp.float32 and not np.any(np.asarray(y))
    g = jax.grad(lambda x: jnp.sum(fn(x, w, ids, *experts)))(x)
    assert g.shape == x.shape and not np.any(np.asarray(g))


@pytest.mark.parametrize("change, match", [
    (dict(x=jnp.zeros((2, 8, 1))), "x must be"),
    (dict(ids=jnp.zeros((1, 3), jnp.int32)), "weights, expert_ids"),
    (dict(ids=jnp.zeros((1, 2), jnp.float32)), "integers"),
    (dict(wd=jnp.zeros((4, 8, 16))), "w_down"),
    (dict(wg=jnp.zeros((4, 8, 16), jnp.bfloat16)), "dtype"),
])
def test_bad_input_raises(change, match):
    a = dict(x=jnp.zeros((1, 8)), w=jnp.ones((1, 2)), ids=jnp.zeros((1, 2), jnp.int32), wg=jnp.zeros((4, 8, 16)),
             wu=jnp.zeros((4, 8, 16)), wd=jnp.zeros((4, 16, 8)))
    a.update(change)
    with pytest.raises(ValueError, match=match):
        ops.experts_by_id(a["x"], a["w"], a["ids"], a["wg"], a["wu"], a["wd"], backend="xla")
