"""moe_decode (routing + experts for a decode step) vs the jnp routing and the per-token
reference: the choice (exactly), weights, logits, y and every gradient; ties; the persistent
walk with the routing prologue; the layer's switch to it; lowering; bad input."""

from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common.decode_plan import DecodeTiles
from sparse_jax import _compat, moe, ops, reference
from sparse_jax.moe import routing
from tests.conftest import assert_close, kernel_names, randn, tolerance


def _experts(E, D, F, dtype, seed):
    return (randn(seed, (E, D, F), dtype, scale=D ** -0.5), randn(seed + 1, (E, D, F), dtype, scale=D ** -0.5),
            randn(seed + 2, (E, F, D), dtype, scale=F ** -0.5))


def _reference(x, rw, wg, wu, wd, *, top_k, scoring, normalize_topk, bias):
    """The jnp routing, then the per-token reference experts (float32)."""
    logits = routing.router_logits(x, rw)
    _, _, w, ids = routing.select_experts(logits, top_k, scoring=scoring, normalize_topk=normalize_topk, bias=bias)
    y = reference.moe_ffn_from_routing(x.astype(jnp.float32), w, ids, wg, wu, wd)
    return y, w, ids, logits


def _loss_and_grads(fn, args, cts):
    """Every output with a cotangent: y, the combine weights and the logits (the aux losses' path)."""
    def loss(x, rw, wg, wu, wd):
        y, w, _, logits = fn(x, rw, wg, wu, wd)
        return sum(jnp.sum(a.astype(jnp.float32) * c) for a, c in zip((y, w, logits), cts))
    return jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)


_NAMES = ("x", "router_weights", "w_gate", "w_up", "w_down")


_CASES = {  # name: (T, E, k, D, F, dtype, scoring, with_bias, normalize)
    "odd-dims-softmax-f32": (1, 64, 4, 136, 72, jnp.float32, "softmax", False, True),
    "odd-dims-sigmoid-bias-bf16": (1, 64, 4, 136, 72, jnp.bfloat16, "sigmoid", True, True),
    "three-tokens-odd-E-bias-unnormalised-f32": (3, 7, 3, 40, 72, jnp.float32, "softmax", True, False),
    "three-tokens-odd-E-bf16": (3, 7, 3, 40, 72, jnp.bfloat16, "softmax", False, True),
    "topk-equals-E-sigmoid": (1, 5, 5, 64, 48, jnp.float32, "sigmoid", False, False),
}


@pytest.mark.parametrize("T, E, k, D, F, dtype, scoring, with_bias, normalize", list(_CASES.values()), ids=list(_CASES))
def test_matches_reference(kernel_backend, T, E, k, D, F, dtype, scoring, with_bias, normalize):
    backend, interpret = kernel_backend
    x, rw = randn(1, (T, D), dtype), randn(2, (D, E), dtype, scale=3 * D ** -0.5)
    experts = _experts(E, D, F, dtype, 10)
    bias = randn(4, (E,)) * 0.1 if with_bias else None
    kw = dict(top_k=k, scoring=scoring, normalize_topk=normalize, bias=bias)
    fn = functools.partial(ops.moe_decode, **kw, backend=backend, interpret=interpret)
    ref = functools.partial(_reference, **kw)
    got, want = fn(x, rw, *experts), ref(x, rw, *experts)
    np.testing.assert_array_equal(got[2], want[2])
    tol = tolerance(dtype, interpret=interpret)
    for name, a, b in zip(("y", "weights", "ids", "logits"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, tol, name)
    cts = (randn(5, (T, D)), randn(6, (T, k)), randn(7, (T, E)))
    (l, g), (l_ref, g_ref) = (_loss_and_grads(f, (x, rw, *experts), cts) for f in (fn, ref))
    np.testing.assert_allclose(float(l), float(l_ref), rtol=5 * tol, atol=5 * tol)
    for n, a, b in zip(_NAMES, g, g_ref):
        assert a.dtype == b.dtype, n
        assert_close(a, b, 5 * tol, f"d {n}")
    if bias is not None:
        db = jax.grad(lambda b: jnp.sum(ops.moe_decode(x, rw, *experts, top_k=k, scoring=scoring, bias=b,
                                                       backend=backend, interpret=interpret)[0]))(bias)
        assert not np.any(np.asarray(db))  # selection only


def test_ties_choose_the_lower_index(kernel_backend):
    """Identical router columns (exactly tied logits): the lowest ids, as lax.top_k."""
    backend, interpret = kernel_backend
    E, k, D, F = 12, 3, 32, 16
    col = randn(0, (D, 1))
    rw = jnp.concatenate([col * 0.5, jnp.tile(col, (1, 6)), col * 0.25, jnp.tile(col, (1, 4))], axis=1)
    x = randn(1, (2, D)).at[1].set(-randn(1, (D,)))  # token 1: the negated row, so ties sit at the bottom
    x = x.at[1].set(jnp.sign(x[0] @ col[:, 0]) * x[0])
    y, w, ids, _ = ops.moe_decode(x, rw, *_experts(E, D, F, jnp.float32, 3), top_k=k, backend=backend,
                                  interpret=interpret)
    want = routing.select_experts(routing.router_logits(x, rw), k)[3]
    np.testing.assert_array_equal(ids, want)
    assert all(len(set(r)) == k for r in np.asarray(ids).tolist())


@pytest.mark.parametrize("T", [1, 2])
def test_triton_walk_routes_every_item(T):
    """One "SM", 16-wide strips: each program walks several items of different assignments (and
    tokens), each re-deriving its choice; weights, ids and logits are written once each."""
    from pallas_kernels.triton import moe_decode as kern, router_product
    E, k, D, F = 9, 3, 48, 64
    x, rw = randn(0, (T, D)), randn(1, (D, E))
    wg, wu, wd = _experts(E, D, F, jnp.float32, 2)
    parts = router_product.partial_logits(x, rw, interpret=True)
    tiles = DecodeTiles(tn=16, tk=16, td=16, programs_per_sm=2)
    with mock.patch.object(kern, "num_sms", lambda: 1):
        y, w, ids, logits = kern.routed_experts(x, parts, None, wg, wu, wd, top_k=k, scoring="sigmoid",
                                                normalize_topk=False, tiles=tiles, interpret=True)
    y_ref, w_ref, ids_ref, logits_ref = _reference(x, rw, wg, wu, wd, top_k=k, scoring="sigmoid",
                                                   normalize_topk=False, bias=None)
    np.testing.assert_array_equal(ids, ids_ref)
    for name, a, b in (("y", y, y_ref), ("weights", w, w_ref), ("logits", logits, logits_ref)):
        assert_close(a, b, tolerance(jnp.float32), name)


def test_layer_uses_it_at_one_token(kernel_backend):
    """moe_ffn at T = 1 (bias, capacity, a shared expert, aux losses; gradients through the router)
    equals the jnp path, and lowers to the two decode launches: no top-k sort, no grouped matmul."""
    backend, interpret = kernel_backend
    E, k, D, F = 6, 2, 32, 48
    x, rw = randn(0, (1, D)), randn(1, (D, E))
    experts = _experts(E, D, F, jnp.float32, 2)
    shared = tuple(a[0] for a in _experts(1, D, 16, jnp.float32, 7))
    bias = randn(3, (E,)) * 0.1
    ct = randn(9, (1, D))

    def loss(fn, x, rw, experts, **kw):
        y, aux = fn(x, rw, *experts, top_k=k, scoring="sigmoid", bias=bias, shared_expert=shared,
                    capacity_factor=0.4, return_aux=True, **kw)
        return jnp.sum(y * ct) + aux.load_balance_loss + 0.1 * aux.z_loss, aux

    (l, aux), got = jax.value_and_grad(functools.partial(loss, moe.moe_ffn, backend=backend, interpret=interpret),
                                       argnums=(0, 1, 2), has_aux=True)(x, rw, experts)
    with mock.patch.object(moe.layer, "DECODE_MAX_TOKENS", 0):  # the grouped path, jnp routing
        (l_ref, aux_ref), want = jax.value_and_grad(functools.partial(loss, moe.moe_ffn, backend="xla"),
                                                    argnums=(0, 1, 2), has_aux=True)(x, rw, experts)
    tol = tolerance(jnp.float32, interpret=interpret)
    np.testing.assert_allclose(float(l), float(l_ref), rtol=5 * tol)
    np.testing.assert_array_equal(aux.tokens_per_expert, aux_ref.tokens_per_expert)
    assert int(aux.dropped) == 0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, 5 * tol, "layer grads at T=1")

    S = jax.ShapeDtypeStruct
    shapes = (S((1, D), jnp.bfloat16), S((D, E), jnp.float32), S((E, D, F), jnp.bfloat16),
              S((E, D, F), jnp.bfloat16), S((E, F, D), jnp.bfloat16))
    exported = _compat.export(functools.partial(moe.moe_ffn, top_k=k, backend="triton"), "cuda", *shapes)
    names = kernel_names(exported)
    assert len(names) == 2 and any(n.startswith("router_partials_") for n in names), names
    assert any(n.startswith("moe_decode_routed_") for n in names), names
    assert "stablehlo.sort" not in exported.mlir_module()
    grouped = " ".join(kernel_names(_compat.export(
        functools.partial(moe.moe_ffn, top_k=k, num_groups=3, topk_groups=2, backend="triton"), "cuda", *shapes)))
    assert "router_partials_" not in grouped and "moe_decode_" in grouped  # jnp routing, experts by id


@pytest.mark.parametrize("platform, backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_lowers_for_hardware(platform, backend):
    """Forward and gradient lower for cuda (Triton IR) and tpu (Mosaic experts, XLA routing)."""
    S = jax.ShapeDtypeStruct
    E, k, D, F = 64, 4, 512, 256

    def fn(x, rw, a, b, c, ct):
        out, pull = jax.vjp(lambda *args: ops.moe_decode(*args, top_k=k, backend=backend)[0], x, rw, a, b, c)
        return out, pull(ct)
    _compat.export(fn, platform, S((1, D), jnp.bfloat16), S((D, E), jnp.bfloat16), S((E, D, F), jnp.bfloat16),
                   S((E, D, F), jnp.bfloat16), S((E, F, D), jnp.bfloat16), S((1, D), jnp.float32))


def test_no_tokens(kernel_backend):
    backend, interpret = kernel_backend
    D, E, F, k = 8, 4, 16, 2
    y, w, ids, logits = ops.moe_decode(jnp.ones((0, D)), jnp.ones((D, E)), jnp.ones((E, D, F)), jnp.ones((E, D, F)),
                                       jnp.ones((E, F, D)), top_k=k, backend=backend, interpret=interpret)
    assert (y.shape, w.shape, ids.shape, logits.shape) == ((0, D), (0, k), (0, k), (0, E))


@pytest.mark.parametrize("change, match", [
    (dict(x=jnp.zeros((8,))), "x must be"),
    (dict(rw=jnp.zeros((7, 4))), "router_weights must be \\[D, E\\] = \\(8, 4\\); got \\(7, 4\\)"),
    (dict(rw=jnp.zeros((8, 5))), "router_weights must be \\[D, E\\] = \\(8, 4\\); got \\(8, 5\\)"),
    (dict(rw=jnp.zeros((8, 4), jnp.int32)), "floating"),
    (dict(wd=jnp.zeros((4, 8, 16))), "w_down"),
    (dict(k=5), "top_k"),
    (dict(bias=jnp.zeros((3,))), "bias"),
])
def test_bad_input_raises(change, match):
    a = dict(x=jnp.zeros((1, 8)), rw=jnp.zeros((8, 4)), wg=jnp.zeros((4, 8, 16)), wu=jnp.zeros((4, 8, 16)),
             wd=jnp.zeros((4, 16, 8)), k=2, bias=None)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        ops.moe_decode(a["x"], a["rw"], a["wg"], a["wu"], a["wd"], top_k=a["k"], bias=a["bias"], backend="xla")
