"""The dropped-block estimate (mean key / mean value per skipped block) and the lse merge:
reference vs brute force, the Triton kernel vs the reference (forward and gradients), and
PBS with ``estimate_dropped`` where the estimate is exact (keys constant inside blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from sparse_jax import masks
from sparse_jax.ops import dropped_blocks as db
from sparse_jax.reference import dropped_blocks as ref
from tests.conftest import assert_close, tolerance


def randn(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def brute_force(q, k, v, dropped, bs, scale, perm=None):
    """Per-query loops in numpy: one pseudo-key per dropped block."""
    q, k, v, dropped = (np.asarray(x, np.float64) for x in (q, k, v, dropped))
    b, s, hq, _ = q.shape
    skv, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    nb = -(-skv // bs)
    o = np.zeros((b, s, hq, dv))
    lse = np.full((b, hq, s), -np.inf)
    for bi in range(b):
        for h in range(hq):
            hk = h // g
            hd = {1: 0, hkv: hk, hq: h}[dropped.shape[1]]
            rows = np.arange(skv) if perm is None else np.asarray(perm)[bi, hk]
            kb = np.stack([k[bi, rows[j * bs:(j + 1) * bs], hk].mean(0) for j in range(nb)])
            vb = np.stack([v[bi, rows[j * bs:(j + 1) * bs], hk].mean(0) for j in range(nb)])
            n = np.array([min(bs, skv - j * bs) for j in range(nb)])
            for t in range(s):
                js = np.nonzero(dropped[min(bi, dropped.shape[0] - 1), hd, t // bs])[0]
                if len(js):
                    logit = q[bi, t, h] @ kb[js].T * scale + np.log(n[js])
                    p = np.exp(logit - logit.max())
                    o[bi, t, h] = p @ vb[js] / p.sum()
                    lse[bi, h, t] = logit.max() + np.log(p.sum())
    return o, lse


def _table(seed, shape, p=0.5):
    t = np.random.default_rng(seed).random(shape) < p
    t[..., 0, :] = False  # the first query block has nothing dropped: o = 0, lse = -inf
    return jnp.asarray(t)


@pytest.mark.parametrize("heads", ["one", "kv", "q"])
def test_reference_matches_brute_force(heads):
    """Ragged last block (S=200, blocks of 32), GQA 2:1, tables per batch/kv head/query head."""
    b, s, hq, hkv, d, bs = 2, 200, 4, 2, 16, 32
    q, k, v = randn(0, (b, s, hq, d)), randn(1, (b, s, hkv, d)), randn(2, (b, s, hkv, 24))
    h = {"one": 1, "kv": hkv, "q": hq}[heads]
    drop = _table(3, (b, h, 7, 7))
    o, lse = ref.dropped_block_attention(q, k, v, drop, block_size=bs, scale=0.3)
    wo, wl = brute_force(q, k, v, drop, bs, 0.3)
    np.testing.assert_allclose(np.asarray(o), wo, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(wl))
    fin = np.isfinite(wl)
    np.testing.assert_allclose(np.asarray(lse)[fin], wl[fin], atol=1e-5)


def test_reference_with_a_permuted_layout_and_chunking(monkeypatch):
    """Blocks of a permuted key layout; chunks smaller than the problem give the same result."""
    b, s, hq, hkv, d, bs = 1, 96, 2, 2, 8, 16
    q, k, v = randn(4, (b, s, hq, d)), randn(5, (b, s, hkv, d)), randn(6, (b, s, hkv, d))
    perm = jnp.asarray(np.stack([np.random.default_rng(i).permutation(s) for i in range(hkv)])[None], jnp.int32)
    drop = _table(7, (b, hkv, 6, 6))
    whole = ref.dropped_block_attention(q, k, v, drop, block_size=bs, kv_permutation=perm)
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 1)  # one query block per chunk
    chunked = ref.dropped_block_attention(q, k, v, drop, block_size=bs, kv_permutation=perm)
    wo, _ = brute_force(q, k, v, drop, bs, 1 / np.sqrt(d), perm)
    np.testing.assert_allclose(np.asarray(whole[0]), wo, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(whole[0]), atol=1e-6)


def _triton_or_skip(kernel_backend):
    backend, interpret = kernel_backend
    if backend != "triton":
        pytest.skip("the dropped-block estimate has a Triton kernel only (TPUs run the xla reference)")
    return backend, interpret


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_forward_and_gradients_match_reference(kernel_backend, dtype):
    """Triton kernel (forward) + reference VJP vs the reference: o, lse and dq/dk/dv of a loss
    reading both outputs; a permuted layout, GQA 2:1, D=24 and Dv=40 (padded), ragged blocks."""
    backend, interpret = _triton_or_skip(kernel_backend)
    b, s, hq, hkv, d, dv, bs = 1, 150, 4, 2, 24, 40, 32
    q, k, v = randn(10, (b, s, hq, d), dtype), randn(11, (b, s, hkv, d), dtype), randn(12, (b, s, hkv, dv), dtype)
    perm = jnp.asarray(np.stack([np.random.default_rng(i).permutation(s) for i in range(hkv)])[None], jnp.int32)
    drop = _table(13, (b, hkv, 5, 5))
    do, dl = randn(14, (b, s, hq, dv)), randn(15, (b, hq, s))

    def run(backend):
        def loss(q, k, v):
            o, lse = db.dropped_block_attention(q, k, v, drop, block_size=bs, softcap=4.0, kv_permutation=perm,
                                                backend=backend, interpret=interpret)
            return jnp.sum(o * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dl), (o, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (o, lse)), grads = run(backend)
    (_, (wo, wl)), wgrads = run("xla")
    tol = tolerance(dtype, interpret=interpret)
    assert o.dtype == lse.dtype == jnp.float32
    assert_close(o, wo, tol, "o")
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(wl)))
    fin = np.isfinite(np.asarray(wl))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(wl)[fin], atol=20 * tol)
    for name, a, w in zip(("dq", "dk", "dv"), grads, wgrads):
        assert a.dtype == w.dtype == dtype, name
        assert_close(a, w, 2 * tol, name)


def test_merge_equals_attention_over_the_union():
    """Two block-sparse attentions over complementary tables merge into the dense one, with
    rows empty in one part or in both."""
    b, s, h, d, bs = 1, 64, 2, 16, 16
    q, k, v = randn(20, (b, s, h, d)), randn(21, (b, s, h, d)), randn(22, (b, s, h, d))
    sel = np.random.default_rng(23).random((1, h, 4, 4)) < 0.5
    sel[:, :, 1] = True  # query block 1: everything in part one, nothing in part two
    sel[:, :, 2] = False
    allowed = np.ones((1, h, 4, 4), bool)
    allowed[:, :, 3] = False  # query block 3 empty in both
    part = [sj.BlockMask.from_block_bool(x & allowed, s, s, block_size=bs) for x in (sel, ~sel)]
    (o1, l1), (o2, l2) = (sj.block_sparse_attention(q, k, v, p, backend="xla", return_lse=True) for p in part)
    o, lse = db.merge_attention(o1, l1, o2, l2)
    want, wl = sj.block_sparse_attention(q, k, v, sj.BlockMask.from_block_bool(allowed, s, s, block_size=bs),
                                         backend="xla", return_lse=True)
    np.testing.assert_allclose(np.asarray(o), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(wl)))
    assert np.all(np.asarray(o)[:, 48:] == 0)


def test_dropped_block_table_is_the_skipped_visible_blocks():
    s, bs = 128, 32
    sel = np.zeros((1, 1, 4, 4), bool)
    sel[..., 3, 0] = sel[..., 2, 2] = True
    bm = sj.BlockMask.from_block_bool(sel, s, s, block_size=bs, mask_fn=masks.causal)
    want = np.tril(np.ones((4, 4), bool), -1)  # strictly below the diagonal: fully visible
    want[3, 0] = False
    np.testing.assert_array_equal(np.asarray(db.dropped_block_table(bm))[0, 0], want)
    dense = sj.create_block_mask(masks.causal, None, None, s, s, block_size=bs)
    assert not np.asarray(db.dropped_block_table(dense)).any()


def test_bad_inputs_raise():
    q, k, v = randn(0, (1, 64, 2, 8)), randn(1, (1, 64, 1, 8)), randn(2, (1, 64, 1, 8))
    good = jnp.zeros((1, 1, 2, 2), bool)
    with pytest.raises(ValueError, match="dropped must be bool"):
        db.dropped_block_attention(q, k, v, jnp.zeros((1, 1, 3, 2), bool), block_size=32)
    with pytest.raises(ValueError, match="dropped must be bool"):
        db.dropped_block_attention(q, k, v, good.astype(jnp.int32), block_size=32)
    with pytest.raises(ValueError, match="incompatible"):
        db.dropped_block_attention(q, k[..., :4], v, good, block_size=32)
    with pytest.raises(ValueError, match="divisible by 16"):
        db.dropped_block_attention(q, k, v, jnp.zeros((1, 1, 8, 8), bool), block_size=8, backend="triton")
    with pytest.raises(ValueError, match="cannot run"):
        db.dropped_block_attention(q, k, v, good, block_size=32, backend="mosaic_tpu")


# -- PBS with the estimate ------------------------------------------------------------------
def _segment_constant_keys(seed, b, s, hkv, d, seg):
    """Keys equal inside every segment: any within-segment permutation keeps every block's
    keys equal, so the mean-key estimate is exact there."""
    per = randn(seed, (b, -(-s // seg), hkv, d))
    return jnp.repeat(per, seg, axis=1)[:, :s]


def test_pbs_estimate_is_exact_when_blocks_are_flat():
    """Keys constant inside blocks: PBS + estimate at a low threshold equals dense causal
    attention (o, dq, dv), PBS alone does not."""
    b, s, hq, hkv, d, bs, seg = 1, 256, 4, 2, 16, 32, 64
    q = randn(30, (b, s, hq, d)) * 2.0
    k = _segment_constant_keys(31, b, s, hkv, d, seg)
    v = randn(32, (b, s, hkv, d))
    ct = randn(33, (b, s, hq, d))
    kw = dict(block_size=bs, segment_size=seg, threshold=0.3, backend="xla")

    def run(fn):
        o, pull = jax.vjp(fn, q, v)
        return (o, *pull(ct))

    dense = run(lambda q, v: sj.reference.dense_attention(q, k, v, jnp.tril(jnp.ones((s, s), bool))[None, None]))
    est = run(lambda q, v: sj.permuted_block_sparse_attention(q, k, v, estimate_dropped=True, **kw))
    plain = run(lambda q, v: sj.permuted_block_sparse_attention(q, k, v, **kw))
    _, aux = sj.permuted_block_sparse_attention(q, k, v, return_aux=True, **kw)
    assert float(aux.density) < 0.8  # blocks were dropped
    for name, a, w in zip(("o", "dq", "dv"), est, dense):
        assert_close(a, w, 1e-5, f"{name} with the estimate")
    assert not np.allclose(np.asarray(plain[0]), np.asarray(dense[0]), atol=1e-3)


def test_pbs_estimate_on_kernel_matches_xla(kernel_backend):
    """Physical and online layouts: output and every gradient on the kernel backend vs xla."""
    backend, interpret = kernel_backend
    b, s, hq, hkv, d, bs, seg = 1, 200, 4, 2, 16, 32, 64
    q, k, v = randn(40, (b, s, hq, d)), randn(41, (b, s, hkv, d)), randn(42, (b, s, hkv, d))
    ct = randn(43, q.shape)
    online = [False, True] if backend == "triton" else [False]
    for on in online:
        kw = dict(block_size=bs, segment_size=seg, threshold=0.5, estimate_dropped=True, online_permutation=on)

        def run(backend, interpret):
            o, pull = jax.vjp(lambda q, k, v: sj.permuted_block_sparse_attention(
                q, k, v, backend=backend, interpret=interpret, **kw), q, k, v)
            return (o, *pull(ct))

        want = jax.jit(run, static_argnums=(0, 1))("xla", False)
        got = jax.jit(run, static_argnums=(0, 1))(backend, interpret)
        tol = (2e-5, 1e-4) if interpret else (2e-3, 5e-3)
        assert_close(got[0], want[0], tol[0], f"forward, online={on}")
        for name, a, w in zip("qkv", got[1:], want[1:]):
            assert_close(a, w, tol[1], f"d{name}, online={on}")


def test_estimate_is_exact_for_any_block_mask_when_blocks_are_flat():
    """add_dropped_estimate on a causal BlockMask with random blocks (diagonal kept), keys equal
    inside every kv block: equals dense causal attention (what XAttention's layer uses)."""
    b, s, hq, hkv, d, bs = 1, 160, 4, 2, 16, 32
    q, v = randn(50, (b, s, hq, d)) * 2.0, randn(51, (b, s, hkv, d))
    k = _segment_constant_keys(52, b, s, hkv, d, bs)
    sel = np.random.default_rng(53).random((1, hq, 5, 5)) < 0.3
    sel[..., np.arange(5), np.arange(5)] = True
    bm = sj.BlockMask.from_block_bool(sel, s, s, block_size=bs, mask_fn=masks.causal)
    o, lse = sj.block_sparse_attention(q, k, v, bm, backend="xla", return_lse=True)
    got, _ = db.add_dropped_estimate(q, k, v, o, lse, bm, backend="xla")
    want = sj.reference.dense_attention(q, k, v, jnp.tril(jnp.ones((s, s), bool))[None, None])
    assert_close(got, want, 1e-5, "sparse + estimate vs dense causal")
    assert not np.allclose(np.asarray(o), np.asarray(want), atol=1e-3)


def test_dynamic_layer_with_the_estimate():
    from flax import nnx
    from sparse_jax.nn import DynamicSparseAttention

    def layer(est):
        return DynamicSparseAttention(32, 4, 2, selection="topk", num_blocks=2, block_size=32, estimate_dropped=est,
                                      backend="xla", rngs=nnx.Rngs(0))

    x = randn(60, (1, 192, 32))
    plain, est = layer(False)(x), layer(True)(x)
    assert np.isfinite(np.asarray(est)).all()
    assert not np.allclose(np.asarray(plain), np.asarray(est), atol=1e-4)  # blocks were dropped and put back
    with pytest.raises(ValueError, match="segment_ids"):
        layer(True)(x, segment_ids=jnp.zeros((1, 192), jnp.int32))
