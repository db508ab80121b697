"""moe_ffn vs the per-token reference: forward and every gradient, capacity drop order, dispatch VJPs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import moe, reference
from sparse_jax.moe import dispatch
from tests.conftest import assert_close, randn, tolerance

_SMALL = dict(D=16, F=24)


def _problem(T, E, k, *, D=16, F=24, Fs=None, dtype=jnp.float32, seed=0, router="random"):
    ks = iter(jax.random.split(jax.random.key(seed), 12))
    x = randn(next(ks), (T, D), dtype)
    if router == "zeros":  # every logit equal: ties everywhere
        rw = jnp.zeros((D, E), jnp.float32)
    elif router == "skewed":  # expert E - 1 wins for every token
        x = x.at[:, 0].set(4.0)
        rw = 0.05 * randn(next(ks), (D, E)).at[0, E - 1].set(5.0)
    else:
        rw = randn(next(ks), (D, E))
    w_gate = randn(next(ks), (E, D, F), dtype, scale=D ** -0.5)
    w_up = randn(next(ks), (E, D, F), dtype, scale=D ** -0.5)
    w_down = randn(next(ks), (E, F, D), dtype, scale=F ** -0.5)
    shared = None
    if Fs:
        shared = (randn(next(ks), (D, Fs), dtype, scale=D ** -0.5), randn(next(ks), (D, Fs), dtype, scale=D ** -0.5),
                  randn(next(ks), (Fs, D), dtype, scale=Fs ** -0.5))
    return (x, rw, w_gate, w_up, w_down), shared


def _loss_and_grads(fn, args, shared, ct, **kw):
    """Gradients of <y, ct> + aux losses wrt x, router, the expert weights and the shared expert."""

    def loss(args, shared):
        y, aux = fn(*args, shared_expert=shared, return_aux=True, **kw)
        return jnp.sum(y.astype(jnp.float32) * ct) + aux.load_balance_loss + 1e-3 * aux.z_loss, (y, aux)

    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(args, shared)
    return y, aux, grads


_NAMES = ("x", "router", "w_gate", "w_up", "w_down")

CASES = {
    "softmax": dict(T=13, E=6, k=2),
    "sigmoid-unnormalised-shared": dict(T=13, E=6, k=2, Fs=20, kw=dict(scoring="sigmoid", normalize_topk=False)),
    "groups-bias": dict(T=9, E=8, k=3, kw=dict(scoring="sigmoid", num_groups=4, topk_groups=2), bias=True),
    "capacity": dict(T=13, E=4, k=2, kw=dict(capacity_factor=0.5)),
    "one-expert": dict(T=5, E=1, k=1),
    "one-token-topk-equals-E": dict(T=1, E=4, k=4),
    "skewed": dict(T=11, E=4, k=1, router="skewed"),
    "ties": dict(T=6, E=5, k=2, router="zeros"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_moe_ffn_matches_reference(name):
    c = CASES[name]
    args, shared = _problem(c["T"], c["E"], c["k"], Fs=c.get("Fs"), router=c.get("router", "random"))
    kw = dict(c.get("kw", {}), top_k=c["k"], backend="xla")
    if c.get("bias"):
        kw["bias"] = 0.3 * jnp.arange(c["E"], dtype=jnp.float32)
    ct = randn(99, (c["T"], args[0].shape[1]))
    y, aux, (g, gs) = _loss_and_grads(moe.moe_ffn, args, shared, ct, **kw)
    y_ref, aux_ref, (g_ref, gs_ref) = _loss_and_grads(reference.moe_ffn, args, shared, ct, **kw)
    tol = tolerance(jnp.float32)
    assert_close(y, y_ref, tol, "y")
    for n, a, b in zip(_NAMES, g, g_ref):
        assert_close(a, b, 5 * tol, f"d {n}")
    if shared is not None:
        for i, (a, b) in enumerate(zip(gs, gs_ref)):
            assert_close(a, b, 5 * tol, f"d shared[{i}]")
    for a, b in zip(aux, aux_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    if name == "skewed":
        assert int(aux.tokens_per_expert[-1]) == c["T"]
    if name == "capacity":
        assert int(aux.dropped) > 0


def test_capacity_drop_order_is_token_order():
    """Independent of capacity_mask: drop per expert all but the first C assignments in token order."""
    T, E, k, cf = 10, 3, 2, 0.6
    args, _ = _problem(T, E, k, seed=3)
    y, aux = moe.moe_ffn(*args, top_k=k, capacity_factor=cf, return_aux=True, backend="xla")
    r = moe.route(moe.router_logits(args[0], args[1]), k)
    ids = np.asarray(r.expert_ids)
    C = int(np.ceil(cf * T * k / E))
    used, kept = np.zeros(E, int), np.zeros_like(ids, bool)
    for t in range(T):
        for j in range(k):
            if used[ids[t, j]] < C:
                kept[t, j] = True
                used[ids[t, j]] += 1
    want = reference.moe_ffn_from_routing(args[0], jnp.where(jnp.asarray(kept), r.weights, 0.0), r.expert_ids,
                                          *args[2:])
    assert_close(y, want, tolerance(jnp.float32), "capacity y")
    assert int(aux.dropped) == int((~kept).sum()) > 0


def test_bfloat16():
    T, E, k = 24, 8, 2
    args, shared = _problem(T, E, k, D=32, F=48, Fs=32, dtype=jnp.bfloat16, seed=5)
    ct = randn(7, (T, 32))
    y, _, (g, gs) = _loss_and_grads(moe.moe_ffn, args, shared, ct, top_k=k, backend="xla")
    y_ref, _, (g_ref, gs_ref) = _loss_and_grads(reference.moe_ffn, args, shared, ct, top_k=k)
    assert y.dtype == jnp.bfloat16
    tol = tolerance(jnp.bfloat16)
    assert_close(y, y_ref, tol, "y")
    for n, a, b in zip(_NAMES, g, g_ref):
        assert a.dtype == b.dtype
        assert_close(a, b, tol, f"d {n}")


def test_kernel_backend(kernel_backend):
    """Forward and gradients through the gmm kernels (interpret mode on the CPU)."""
    backend, interpret = kernel_backend
    T, E, k = 20, 4, 2
    args, shared = _problem(T, E, k, D=32, F=64, Fs=32, seed=11)
    ct = randn(8, (T, 32))
    y, _, (g, gs) = _loss_and_grads(moe.moe_ffn, args, shared, ct, top_k=k, backend=backend, interpret=interpret,
                                    capacity_factor=0.75)
    y_ref, _, (g_ref, gs_ref) = _loss_and_grads(reference.moe_ffn, args, shared, ct, top_k=k, capacity_factor=0.75)
    tol = tolerance(jnp.float32, interpret=interpret)
    assert_close(y, y_ref, tol, "y")
    for n, a, b in zip(_NAMES, g, g_ref):
        assert_close(a, b, 5 * tol, f"d {n}")


def test_from_routing_skips_invalid_ids():
    T, E, k = 9, 4, 3
    args, _ = _problem(T, E, k, seed=4)
    x, _, wg, wu, wd = args
    ids = jnp.array(np.random.default_rng(0).integers(-1, E + 1, (T, k)), jnp.int32)
    w = jax.random.uniform(jax.random.key(2), (T, k))
    kept = jax.random.bernoulli(jax.random.key(3), 0.7, (T, k))
    y = moe.moe_ffn_from_routing(x, w, ids, wg, wu, wd, kept=kept, backend="xla")
    want = reference.moe_ffn_from_routing(x, jnp.where(kept, w, 0.0), ids, wg, wu, wd)
    assert_close(y, want, tolerance(jnp.float32), "y")


def test_jit_without_concrete_values():
    """The whole layer (and its gradient) traces from shapes alone: no host round trip."""
    T, E, k, D, F = 64, 8, 2, 16, 32
    s = jax.ShapeDtypeStruct
    shapes = (s((T, D), jnp.bfloat16), s((D, E), jnp.float32), s((E, D, F), jnp.bfloat16),
              s((E, D, F), jnp.bfloat16), s((E, F, D), jnp.bfloat16))
    f = functools.partial(moe.moe_ffn, top_k=k, capacity_factor=1.0, backend="xla")
    jax.jit(f).lower(*shapes)
    jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))).lower(*shapes)


def test_dispatch_vjps_are_gathers():
    """expand/combine gradients equal autodiff of plain indexing, and contain no scatter."""
    T, E, k, D = 7, 3, 2, 5
    ids = jnp.array(np.random.default_rng(1).integers(0, E, (T, k)), jnp.int32)
    kept = jnp.array(np.random.default_rng(2).random((T, k)) < 0.7)
    x = randn(0, (T, D))
    w = jax.random.uniform(jax.random.key(1), (T, k))
    for kept_ in (None, kept):
        plan = dispatch.plan_dispatch(ids, E, kept=kept_)
        rows = randn(3, (T * k, D))

        def custom(x, rows, w):
            return jnp.sum(jnp.sin(dispatch.expand(x, plan, k))) + jnp.sum(jnp.cos(dispatch.combine(rows, w, plan)))

        def plain(x, rows, w):
            xs = x[plan.row_assign // k]
            g = rows[plan.assign_row].reshape(T, k, D)
            if kept_ is not None:  # invalid rows carry values but no gradient; dropped ones nothing
                xs = jnp.where(plan.row_valid[:, None], xs, jax.lax.stop_gradient(xs))
                g = jnp.where(kept_.reshape(T, k, 1), g, 0.0)
            return jnp.sum(jnp.sin(xs)) + jnp.sum(jnp.cos(jnp.einsum("tk,tkd->td", w, g)))

        got = jax.grad(custom, argnums=(0, 1, 2))(x, rows, w)
        want = jax.grad(plain, argnums=(0, 1, 2))(x, rows, w)
        for a, b in zip(got, want):
            assert_close(a, b, 1e-6, "dispatch grads")
        jaxpr = str(jax.make_jaxpr(jax.grad(custom, argnums=(0, 1, 2)))(x, rows, w))
        assert "scatter-add" not in jaxpr and "scatter_add" not in jaxpr


@pytest.mark.parametrize("change, match", [
    (dict(x=jnp.zeros((4, 8, 2))), "x must be"),
    (dict(router_weights=jnp.zeros((8, 3))), "router_weights"),
    (dict(w_gate=jnp.zeros((4, 8, 5))), "w_gate and w_up"),
    (dict(w_down=jnp.zeros((4, 5, 8))), "w_down"),
    (dict(x=jnp.zeros((4, 8), jnp.bfloat16)), "dtype"),
    (dict(x=jnp.zeros((4, 8), jnp.int32)), "float32"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(top_k=5), "top_k"),
    (dict(shared_expert=(jnp.zeros((8, 3)), jnp.zeros((8, 3)), jnp.zeros((4, 8)))), "shared expert w_down"),
    (dict(shared_expert=(jnp.zeros((8, 3)),)), "shared_expert"),
])
def test_moe_ffn_rejects_bad_arguments(change, match):
    T, D, E, F = 4, 8, 4, 6
    a = dict(x=jnp.zeros((T, D)), router_weights=jnp.zeros((D, E)), w_gate=jnp.zeros((E, D, F)),
             w_up=jnp.zeros((E, D, F)), w_down=jnp.zeros((E, F, D)), top_k=2)
    a.update(change)
    for fn in (moe.moe_ffn, reference.moe_ffn):
        with pytest.raises(ValueError, match=match):
            fn(**a)
