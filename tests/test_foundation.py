"""Backend dispatch, the compat layer and the pure-jnp references (the oracles themselves)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import sparse_jax as sj
from sparse_jax import _compat, backends
from sparse_jax import reference as ref
from tests.conftest import assert_close, randn


# -- backends ---------------------------------------------------------------------------------
def test_default_backend_follows_platform(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = {"gpu": "triton", "tpu": "mosaic_tpu"}.get(jax.default_backend(), "xla")
    assert backends.default_backend() == expected
    assert backends.resolve(None, op="x") == expected


def test_env_var_overrides_default(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "mosaic_tpu")
    assert backends.resolve(None, op="x") == "mosaic_tpu"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="triton, mosaic_tpu, xla"):
        backends.resolve(None, op="x")


def test_explicit_backend_is_honoured_and_checked(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "xla")
    assert backends.resolve("triton", op="x") == "triton"
    with pytest.raises(ValueError, match="unknown backend 'gpu'.*triton, mosaic_tpu, xla"):
        backends.resolve("gpu", op="x")
    with pytest.raises(ValueError, match="cannot run x with feature; supported: xla"):
        backends.resolve("triton", op="x", supported=("xla",), feature="feature")
    # The default may fall back to xla; an explicit request may not.
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert backends.resolve(None, op="x", supported=("xla",)) == "xla"


def test_ops_reject_unknown_backend():
    q = randn(0, (1, 8, 2, 8))
    bm = sj.create_block_mask(sj.masks.causal, None, None, 8, 8, 8)
    with pytest.raises(ValueError, match="choose one of"):
        sj.block_sparse_attention(q, q, q, bm, backend="cuda")
    x, w = randn(1, (8, 4)), randn(2, (2, 4, 3))
    with pytest.raises(ValueError, match="choose one of"):
        sj.grouped_matmul(x, w, jnp.array([4, 4], jnp.int32), backend="torch")


# -- compat -----------------------------------------------------------------------------------
def _double_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


def _pallas_double(x, interpret=False):
    from jax.experimental import pallas as pl
    return pl.pallas_call(_double_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_export_lowers_pallas_for_absent_platforms(platform):
    x = jnp.ones((8, 128), jnp.float32)
    exp = _compat.export(_pallas_double, platform, x)
    assert exp.platforms == (platform,)
    text = exp.mlir_module()
    assert ("triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)


def test_tpu_interpret_params_detect_races_and_poison():
    p = _compat.tpu_interpret_params()
    assert p.detect_races and p.uninitialized_memory == "nan"


# -- references ---------------------------------------------------------------------------------
def _naive_attention(q, k, v, mask, scale):
    """float64 numpy, one head at a time (the oracle's oracle)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Sq, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros((B, Sq, Hq, v.shape[-1]))
    lse = np.full((B, Hq, Sq), -np.inf)
    for b in range(B):
        for h in range(Hq):
            s = q[b, :, h] @ k[b, :, h // G].T * scale
            m = mask[b % mask.shape[0], h % mask.shape[1]]
            s = np.where(m, s, -np.inf)
            for i in range(Sq):
                if m[i].any():
                    mx = s[i].max()
                    p = np.exp(s[i] - mx)
                    out[b, i, h] = p @ v[b, :, h // G] / p.sum()
                    lse[b, h, i] = mx + np.log(p.sum())
    return out, lse


@pytest.mark.parametrize("G", [1, 3])
def test_dense_reference_matches_naive(G):
    B, Sq, Skv, Hkv, D = 2, 37, 53, 2, 16
    q, k, v = randn(0, (B, Sq, Hkv * G, D)), randn(1, (B, Skv, Hkv, D)), randn(2, (B, Skv, Hkv, D))
    mask = np.random.default_rng(0).random((B, 1, Sq, Skv)) < 0.3
    mask[:, :, 5] = False  # a fully masked row
    o, lse = ref.dense_attention(q, k, v, mask, return_lse=True)
    on, lsen = _naive_attention(q, k, v, mask, 1 / math.sqrt(D))
    np.testing.assert_allclose(np.asarray(o), on, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), lsen, atol=1e-5)
    assert np.all(np.asarray(o)[:, 5] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, 5]))
    g = jax.grad(lambda q: ref.dense_attention(q, k, v, mask).sum())(q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_block_sparse_reference_equals_dense_mask():
    B, S, H, D = 1, 70, 2, 8
    q, k, v = randn(3, (B, S, H, D)), randn(4, (B, S, H, D)), randn(5, (B, S, H, D))
    mask = sj.masks.and_masks(sj.masks.sliding_window(20), sj.masks.prefix_lm(10))
    bm = sj.create_block_mask(mask, None, None, S, S, 16)
    dense = np.asarray(bm.to_dense())
    assert_close(ref.block_sparse_attention(q, k, v, bm), ref.dense_attention(q, k, v, dense), 1e-6)
    # Positions: a permuted layout masked by original position equals the unpermuted result.
    perm = np.random.default_rng(1).permutation(S)
    causal = sj.BlockMask.from_block_bool(np.ones((5, 5), bool), S, S, 16, sj.masks.causal, classify=False)
    out_perm = ref.block_sparse_attention(q[:, perm], k[:, perm], v[:, perm], causal, q_positions=perm,
                                          kv_positions=perm)
    expected = ref.dense_attention(q, k, v, np.tri(S, dtype=bool)[None, None])
    assert_close(out_perm, expected[:, perm], 1e-6)


@st.composite
def group_problems(draw):
    G = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 9), min_size=G, max_size=G))
    extra = draw(st.integers(0, 5))
    return np.asarray(sizes, np.int32), sum(sizes) + extra


@given(group_problems(), st.booleans())
def test_grouped_matmul_reference_matches_row_loop(problem, transpose):
    sizes, M = problem
    G, K, N = len(sizes), 5, 3
    rng = np.random.default_rng(int(sizes.sum()) + M)
    lhs = rng.standard_normal((M, K)).astype(np.float32)
    rhs = rng.standard_normal((G, N, K) if transpose else (G, K, N)).astype(np.float32)
    out = np.asarray(ref.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
                                        transpose_rhs=transpose))
    group_of = np.repeat(np.arange(G), sizes)
    expected = np.zeros((M, N), np.float32)
    for r, g in enumerate(group_of):
        w = rhs[g].T if transpose else rhs[g]
        expected[r] = lhs[r] @ w
    np.testing.assert_allclose(out, expected, atol=1e-5)
    grad = rng.standard_normal((M, N)).astype(np.float32)
    wt = np.asarray(ref.grouped_matmul_t(jnp.asarray(lhs), jnp.asarray(grad), jnp.asarray(sizes)))
    for g in range(G):
        rows = group_of == g
        np.testing.assert_allclose(wt[g], lhs[: len(group_of)][rows].T @ grad[: len(group_of)][rows], atol=1e-5)


def test_grouped_matmul_reference_group_offset():
    sizes = jnp.array([3, 2, 4, 1], jnp.int32)
    lhs = randn(0, (12, 4))
    rhs_all = randn(1, (4, 4, 5))
    full = ref.grouped_matmul(lhs, rhs_all, sizes)
    local = ref.grouped_matmul(lhs, rhs_all[1:3], sizes, group_offset=1)
    rows = np.arange(12)
    inside = (rows >= 3) & (rows < 9)
    np.testing.assert_allclose(np.asarray(local)[inside], np.asarray(full)[inside], atol=1e-6)
    assert np.all(np.asarray(local)[~inside] == 0)


def test_moe_reference_matches_per_token_loop():
    T, D, F, E, k = 7, 6, 5, 4, 2
    x = randn(0, (T, D))
    wg, wu, wd = randn(1, (E, D, F)), randn(2, (E, D, F)), randn(3, (E, F, D))
    ids = jnp.array([[0, 1], [2, 3], [3, 0], [1, 1], [0, 2], [3, 2], [1, 0]], jnp.int32)
    w = jax.nn.softmax(randn(4, (T, k)), axis=-1)
    y = ref.moe_ffn_from_routing(x, w, ids, wg, wu, wd)
    xs, wgs, wus, wds = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    silu = lambda z: z / (1 + np.exp(-z))
    expected = np.zeros((T, D))
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            h = silu(xs[t] @ wgs[e]) * (xs[t] @ wus[e])
            expected[t] += float(w[t, j]) * (h @ wds[e])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
