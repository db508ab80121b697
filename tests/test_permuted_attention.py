"""Permuted block-sparse attention (PBS): permutations, causality on original positions,
exactness at threshold 1, forward and gradients against dense references, GQA, ragged lengths."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from sparse_jax import permutation as perm_lib
from sparse_jax import reference as ref
ref_attn = importlib.import_module("sparse_jax.reference.attention")  # the module (the package exports a function of that name)
from sparse_jax.ops import permuted_attention as pa
from sparse_jax.selection import synthetic
from tests.conftest import assert_close, tolerance

_STATIC = ("block_size", "segment_size", "threshold", "causal", "permute_queries", "online_permutation",
           "return_aux", "gqa", "max_kv_blocks", "permute_keys", "return_lse", "backend", "interpret")
# One jitted PBS for the whole module: tests sharing shapes and options share compilations.
pbs = jax.jit(sj.permuted_block_sparse_attention, static_argnames=_STATIC)
raw = sj.permuted_block_sparse_attention
STD = dict(b=2, s=200, hq=4, hkv=2, d=16, bs=32, seg=64)  # ragged block and tail segment, GQA 2:1


def randn(seed: int, shape, dtype=jnp.float32):
    """Standard-normal test data from numpy (jax.random compiles a generator per new shape: ~0.5 s
    of CPU each, most of these small tests' cost)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def qkv(seed, b, s, hq, hkv, d, dtype=jnp.float32, structured=True):
    if structured:
        q, k = synthetic.structured_qk(seed, b, s, hq, hkv, d, dtype=dtype)
    else:
        q, k = randn(seed, (b, s, hq, d), dtype), randn(seed + 1, (b, s, hkv, d), dtype)
    return q, k, randn(seed + 2, (b, s, hkv, d), dtype)


def causal(s):
    return np.tril(np.ones((s, s), bool))


def allowed_in_original_order(aux, b, s, hq, hkv):
    """bool [B, Hq, S, S]: the pairs PBS computes, in original (q, kv) coordinates."""
    bm = aux.block_mask
    n, g = b * hkv, hq // hkv
    kperm = aux.kv_permutation.reshape(n, s)
    qperm = None if aux.q_permutation is None else aux.q_permutation.reshape(n, s)
    fn = ref_attn.block_sparse_allowed_fn(bm, n, g, q_positions=qperm, kv_positions=kperm)
    layout = np.asarray(fn(0, s))  # [N, G, S, S] in the permuted layout
    qp = np.broadcast_to(np.arange(s), (n, s)) if qperm is None else np.asarray(qperm)
    kp = np.asarray(kperm)
    out = np.zeros_like(layout)
    for i in range(n):
        out[i][:, qp[i][:, None], kp[i][None, :]] = layout[i]
    return out.reshape(b, hkv, g, s, s).reshape(b, hq, s, s)


# -- permutations ----------------------------------------------------------------------------
@pytest.mark.parametrize("s,seg", [(256, 64), (300, 64), (10, 16)])
def test_segment_permutation(s, seg):
    imp = jnp.asarray(np.random.default_rng(0).random((2, 3, s)), jnp.float32)
    perm = np.asarray(perm_lib.segment_permutation(imp, seg))
    for row_imp, row in zip(np.asarray(imp).reshape(-1, s), perm.reshape(-1, s)):
        assert sorted(row) == list(range(s))  # a permutation
        assert np.all(row // seg == np.arange(s) // seg)  # nothing leaves its segment (tail included)
        for a in range(0, s, seg):
            vals = row_imp[row[a:a + seg]]
            assert np.all(np.diff(vals) <= 0)  # descending importance
    inv = np.asarray(perm_lib.inverse_permutation(perm))
    assert np.array_equal(np.take_along_axis(inv, perm, -1), np.broadcast_to(np.arange(s), perm.shape))


def test_permute_and_unpermute_rows_are_exact():
    x = randn(0, (2, 40, 4, 8))
    perm = perm_lib.segment_permutation(jnp.asarray(np.random.default_rng(1).random((2, 2, 40))), 16)
    px = perm_lib.permute_heads(x, perm)  # [4, 40, 2, 8]
    xn = np.asarray(x)
    for b in range(2):
        for h in range(2):
            assert np.array_equal(np.asarray(px[b * 2 + h]), xn[b, np.asarray(perm[b, h])][:, 2 * h:2 * h + 2])
    back = perm_lib.unpermute_rows(px, perm.reshape(4, 40))
    assert np.array_equal(np.asarray(perm_lib.unfold_heads(back, 2)), xn)  # bit exact


def test_segment_causal_mask_classifies_by_segment():
    m = perm_lib.segment_causal(64)
    bm = sj.BlockMask.from_block_bool(np.ones((1, 1, 10, 10), bool), 300, 300, 32, m, max_kv_blocks=2)
    cls = np.asarray(bm.block_classes())[0, 0]
    seg = np.arange(10) * 32 // 64
    assert np.array_equal(cls == 1, seg[:, None] == seg[None, :])
    assert np.array_equal(cls == 2, seg[None, :] < seg[:, None])


# -- exactness and causality ----------------------------------------------------------------
def test_threshold_one_is_dense_causal():
    # Batch 2, MQA 4:1, ragged last block, segment 96 (3 blocks) with a shorter tail segment.
    # (With permuted queries, exactness is checked against the computed pairs in the next test.)
    q, k, v = qkv(1, 2, 300, 4, 1, 16, structured=False)
    got = pbs(q, k, v, block_size=32, segment_size=96, threshold=1.0, backend="xla")
    want = ref.dense_attention(q, k, v, jnp.asarray(causal(300))[None, None])
    assert_close(got, want, 1e-5, "PBS tau=1 vs dense causal")


@pytest.mark.parametrize("permute_queries", [False, True])
def test_no_future_key_and_forced_blocks(permute_queries):
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(2, b, s, hq, hkv, d)
    o, aux = pbs(q, k, v, block_size=bs, segment_size=seg, threshold=0.6, permute_queries=permute_queries,
                 return_aux=True, backend="xla")
    allowed = allowed_in_original_order(aux, b, s, hq, hkv)
    c = causal(s)
    assert not np.any(allowed & ~c), "a future key was computed"
    same_seg = (np.arange(s)[:, None] // seg) == (np.arange(s)[None, :] // seg)
    assert np.all(allowed[..., same_seg & c]), "the diagonal segment must be computed in full"
    assert np.all(allowed[..., :, :bs][..., c[:, :bs]]), "the first block (the sink) must be computed whole"
    assert float(aux.density) < 0.75  # pruned something
    # The output is exactly attention restricted to those pairs.
    want = ref.dense_attention(q, k, v, jnp.asarray(allowed))
    assert_close(o, want, 1e-5, "PBS forward vs masked dense")


def test_without_key_permutation_keeps_the_layout():
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(11, b, s, hq, hkv, d)
    o, aux = pbs(q, k, v, block_size=bs, segment_size=seg, threshold=0.6, permute_keys=False, return_aux=True,
                 backend="xla")
    assert np.array_equal(np.asarray(aux.kv_permutation), np.broadcast_to(np.arange(s), (b, hkv, s)))
    allowed = allowed_in_original_order(aux, b, s, hq, hkv)
    assert not np.any(allowed & ~causal(s))
    assert_close(o, ref.dense_attention(q, k, v, jnp.asarray(allowed)), 1e-5, "unpermuted PBS vs masked dense")


def test_permutation_sorts_segments_by_importance():
    """Each segment starts with its most important key (the last block's attention)."""
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k = synthetic.structured_qk(3, b, s, hq, hkv, d, patterns=("needle", "vertical"), strength=5.0)
    v = randn(5, (b, s, hkv, d))
    _, aux = pbs(q, k, v, block_size=bs, segment_size=seg, threshold=0.6, return_aux=True, backend="xla")
    imp = np.asarray(aux.importance)
    kp = np.asarray(aux.kv_permutation)
    for h in range(hkv):  # within each segment the first permuted key is the segment's most important one
        np.testing.assert_array_equal(kp[0, h, :bs], np.arange(bs))  # the sink block is pinned
        assert kp[0, h, bs] == bs + np.argmax(imp[0, h, bs:seg])
        for a in range(seg, s, seg):
            assert kp[0, h, a] == a + np.argmax(imp[0, h, a:a + seg])


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("permute_queries", [False, True])
def test_gradients_match_masked_dense_reference(permute_queries):
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(4, b, s, hq, hkv, d)
    w = randn(9, (b, s, hq, d))
    _, aux = pbs(q, k, v, block_size=bs, segment_size=seg, threshold=0.6, permute_queries=permute_queries,
                 return_aux=True, backend="xla")
    allowed = jnp.asarray(allowed_in_original_order(aux, b, s, hq, hkv))

    def loss_pbs(q, k, v):
        return jnp.sum(pbs(q, k, v, block_size=bs, segment_size=seg, threshold=0.6,
                           permute_queries=permute_queries, backend="xla") * w)

    def loss_ref(q, k, v):
        return jnp.sum(ref.dense_attention(q, k, v, allowed) * w)

    got = jax.jit(jax.grad(loss_pbs, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", got, want):
        assert_close(a, r, 1e-4, f"d{name}")


def test_bf16_gqa_forward():
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(6, b, s, hq, hkv, d, jnp.bfloat16, structured=False)
    o = pbs(q, k, v, block_size=bs, segment_size=seg, threshold=1.0, backend="xla")
    want = ref.dense_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                               jnp.asarray(causal(s))[None, None])
    assert o.dtype == jnp.bfloat16
    assert_close(o, want, tolerance(jnp.bfloat16), "bf16 PBS tau=1")


def test_bidirectional_and_gqa_modes():
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(7, b, s, hq, hkv, d)
    full = ref.dense_attention(q, k, v)
    assert_close(pbs(q, k, v, block_size=bs, segment_size=seg, threshold=1.0, causal=False, backend="xla"), full,
                 1e-5, "bidirectional tau=1")
    modes = ("union", "per_head", "mean")
    plans = jax.jit(lambda q, k: [pa.pbs_plan(q, k, block_size=bs, segment_size=seg, threshold=0.6, gqa=m)
                                  for m in modes])(q, k)
    dens = {}
    for mode, aux in zip(modes, plans):
        assert aux.block_mask.shape[1] == (2 if mode == "per_head" else 1)
        dens[mode] = float(aux.density)
    assert dens["per_head"] <= dens["union"] + 1e-6
    o, aux = pbs(q, k, v, block_size=bs, segment_size=seg, threshold=1.0, max_kv_blocks=1, return_aux=True,
                 backend="xla")
    assert aux.block_mask.max_full_kv_blocks == 1
    allowed = allowed_in_original_order(aux, b, s, hq, hkv)
    assert (allowed.sum(-1) <= 2 * bs + seg).all() and not np.any(allowed & ~causal(s))


def test_bad_inputs_raise_at_trace_time():
    q, k, v = qkv(8, 1, 128, 2, 1, 16, structured=False)
    with pytest.raises(ValueError, match="multiple of block_size"):
        raw(q, k, v, block_size=32, segment_size=48)
    with pytest.raises(ValueError, match="Sq == Skv"):
        raw(q[:, :64], k, v, block_size=32, segment_size=64)
    with pytest.raises(ValueError, match="threshold"):
        raw(q, k, v, block_size=32, segment_size=64, threshold=-0.5)
    with pytest.raises(ValueError, match="per-head threshold"):
        raw(q, k, v, block_size=32, segment_size=64, threshold=jnp.ones((3,)))
    with pytest.raises(ValueError, match="gqa"):
        raw(q, k, v, block_size=32, segment_size=64, gqa="sum")


# -- kernels ---------------------------------------------------------------------------------
def _kernel_or_skip(fn):
    try:
        return fn()
    except (ImportError, ModuleNotFoundError, NotImplementedError) as e:
        pytest.skip(f"kernel unavailable: {e}")


def test_pbs_kernel_forward_and_gradients_match_xla(kernel_backend):
    """Physical layout on the kernel: output and every gradient (one compiled forward+backward)."""
    backend, interpret = kernel_backend
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(9, 1, s, hq, hkv, d)
    ct = randn(12, q.shape)
    kw = dict(block_size=bs, segment_size=seg, threshold=0.6)

    def run(backend, interpret):
        o, pull = jax.vjp(lambda q, k, v: pbs(q, k, v, backend=backend, interpret=interpret, **kw), q, k, v)
        return (o, *pull(ct))

    want = jax.jit(run, static_argnums=(0, 1))("xla", False)
    got = _kernel_or_skip(lambda: jax.jit(run, static_argnums=(0, 1))(backend, interpret))
    tol = (2e-5, 1e-4) if interpret else (2e-3, 5e-3)
    assert_close(got[0], want[0], tol[0], f"PBS forward on {backend}")
    for name, a, r in zip("qkv", got[1:], want[1:]):
        assert_close(a, r, tol[1], f"d{name} on {backend}")


def test_pbs_online_permutation_on_kernel(kernel_backend):
    backend, interpret = kernel_backend
    if not pa._has_kv_permutation_keyword():
        pytest.skip("block_sparse_attention has no kv_permutation= yet")
    b, s, hq, hkv, d, bs, seg = STD.values()
    q, k, v = qkv(9, 1, s, hq, hkv, d)
    kw = dict(block_size=bs, segment_size=seg, threshold=0.6, online_permutation=True)
    if backend == "mosaic_tpu":  # no online permutation in the TPU kernel: a clear error
        with pytest.raises(ValueError, match="kv_permutation"):
            pbs(q, k, v, backend=backend, interpret=interpret, **kw)
        return
    want = pbs(q, k, v, backend="xla", **kw)
    got = _kernel_or_skip(lambda: pbs(q, k, v, backend=backend, interpret=interpret, **kw))
    assert_close(got, want, 2e-5 if interpret else 2e-3, f"online PBS on {backend}")


@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_pbs_lowers_for_accelerators(platform, backend):
    from sparse_jax import _compat
    q = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    fn = lambda q, k, v: raw(q, k, v, block_size=128, segment_size=256, backend=backend)  # noqa: E731
    exp = _compat.export(fn, platform, q, k, k)
    assert exp.platforms == (platform,)
    # No integer prefix sums (round 1: jnp.nonzero over constant block flags, constant-folded by
    # XLA for seconds at 32K); the only cumsum left is the threshold's, over float scores.
    import re
    assert not re.findall(r"@cumsum\w*\(%arg0: tensor<[0-9x]*x(?:i1|i32)>", exp.mlir_module())


@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_pbs_with_the_estimate_lowers_fwd_and_bwd(platform, backend):
    """estimate_dropped: the Triton estimate kernel on cuda, the xla estimate beside the Mosaic
    kernels on tpu; forward and backward."""
    from sparse_jax import _compat
    q = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        o = raw(q, k, v, block_size=128, segment_size=256, threshold=0.5, estimate_dropped=True, backend=backend)
        return jnp.sum(o.astype(jnp.float32))

    exp = _compat.export(jax.grad(loss, argnums=(0, 1, 2)), platform, q, k, k)
    text = exp.mlir_module()
    if platform == "cuda":
        assert "dropped_block_estimate" in text
