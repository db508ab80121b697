"""The Mosaic GPU block-sparse forward: which problems it takes, the dispatch rule, lowering for
cuda on any host (Pallas' GPU interpreter cannot run wgmma, so on the CPU the kernel is checked
by lowering), and on a Hopper GPU the compiled kernel against the xla reference."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from pallas_kernels.mosaic_gpu import attention_fwd as mg
from pallas_kernels.mosaic_gpu import dispatch as mgpu_dispatch
from pallas_kernels.triton import block_sparse_attention as gpu_entry
from sparse_jax import _compat, masks

ENV = gpu_entry.FWD_IMPL_ENV


def _qkv(S=1024, Hq=4, Hkv=2, D=128, dtype=jnp.bfloat16, B=1, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, S, Hq, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32).astype(dtype)
    return q, k, v


def _why(q, k, v, bm, **kw):
    args = dict(softcap=None, has_segments=False, has_perm=False)
    args.update(kw)
    return mg.unsupported(q, k, v, bm, **args)


@pytest.fixture
def env(monkeypatch):
    def set_(value):
        monkeypatch.setenv(ENV, value)
    return set_


def test_unsupported_names_each_reason():
    q, k, v = _qkv()
    causal = sj.create_block_mask(masks.causal, None, None, 1024, 1024, 128)
    assert _why(q, k, v, causal) is None
    assert "dtype" in _why(*(x.astype(jnp.float32) for x in (q, k, v)), causal)
    assert "head dims" in _why(*_qkv(D=96), causal)
    assert "head dims" in _why(*_qkv(D=256), causal)  # would overflow shared memory
    assert "block size" in _why(q, k, v, sj.create_block_mask(masks.causal, None, None, 1024, 1024, 64))
    odd = _qkv(S=1000)
    assert "lengths" in _why(*odd, sj.create_block_mask(masks.causal, None, None, 1000, 1000, 128))
    assert "softcap" in _why(q, k, v, causal, softcap=30.0)
    assert "segment" in _why(q, k, v, causal, has_segments=True)
    assert "segment" in _why(q, k, v, causal, has_perm=True)
    chunked = sj.create_block_mask(masks.chunked(256), None, None, 1024, 1024, 128)
    assert "mask" in _why(q, k, v, chunked)
    window = sj.create_block_mask(masks.sliding_window(300, causal=True), None, None, 1024, 1024, 128)
    assert _why(q, k, v, window) is None


def test_dispatch_rule(env):
    q, k, v = _qkv()
    bm = sj.create_block_mask(masks.causal, None, None, 1024, 1024, 128)
    kw = dict(softcap=None, has_segments=False, has_perm=False, config=None)
    hopper = mgpu_dispatch.hopper()
    env("auto")
    assert gpu_entry.forward_impl(q, k, v, bm, interpret=False, **kw) == ("mosaic_gpu" if hopper else "triton")
    assert gpu_entry.forward_impl(q, k, v, bm, interpret=True, **kw) == "triton"
    env("triton")
    assert gpu_entry.forward_impl(q, k, v, bm, interpret=False, **kw) == "triton"
    env("mosaic_gpu")
    assert gpu_entry.forward_impl(q, k, v, bm, interpret=False, **kw) == "mosaic_gpu"
    with pytest.raises(ValueError, match="cannot take softcap"):
        gpu_entry.forward_impl(q, k, v, bm, interpret=False, **{**kw, "softcap": 5.0})
    from pallas_kernels.triton import attention_configs as cfgs
    with cfgs.override(fwd=cfgs.FwdConfig(128, 64, 4, 2)):
        assert gpu_entry.forward_impl(q, k, v, bm, interpret=False, **kw) == "triton"
    env("cudnn")
    with pytest.raises(ValueError, match="choose auto, triton or mosaic_gpu"):
        gpu_entry.forward_impl(q, k, v, bm, interpret=False, **kw)


def _lowered_text(fn, *args):
    return _compat.export(fn, "cuda", *args).mlir_module()


@pytest.mark.parametrize("case", ["dense", "causal", "window", "random", "batch_tables"])
def test_lowers_for_cuda_forward_and_backward(env, case):
    env("mosaic_gpu")
    S = 1024
    q, k, v = _qkv(S=S, B=2 if case == "batch_tables" else 1)
    if case == "random":
        blocks = np.asarray(jax.random.uniform(jax.random.key(1), (1, 2, S // 128, S // 128)) < 0.4)
        bm = sj.BlockMask.from_block_bool(blocks, S, S, 128)
    elif case == "batch_tables":
        blocks = np.asarray(jax.random.uniform(jax.random.key(2), (2, 1, S // 128, S // 128)) < 0.5)
        bm = sj.BlockMask.from_block_bool(blocks, S, S, 128, masks.causal)
    else:
        mask = {"dense": masks.full, "causal": masks.causal,
                "window": masks.sliding_window(300, causal=True)}[case]
        bm = sj.create_block_mask(mask, None, None, S, S, 128)
    fwd = _lowered_text(lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, backend="triton"), q, k, v)
    assert "mosaic_gpu" in fwd
    grad = _lowered_text(jax.grad(lambda q, k, v: jnp.sum(sj.block_sparse_attention(
        q, k, v, bm, backend="triton").astype(jnp.float32)), argnums=(0, 1, 2)), q, k, v)
    assert "mosaic_gpu" in grad and "triton" in grad  # Mosaic GPU forward, Triton backward


@pytest.mark.parametrize("permute_queries", [False, True])
def test_pbs_lowers_with_positions(env, permute_queries):
    """PBS's physical layout hands the kernel kv positions (and q positions when queries move)."""
    env("mosaic_gpu")
    q, k, v = _qkv(S=2048, Hq=4, Hkv=2)
    text = _lowered_text(lambda q, k, v: sj.permuted_block_sparse_attention(
        q, k, v, block_size=128, segment_size=512, threshold=0.8, permute_queries=permute_queries,
        backend="triton"), q, k, v)
    assert "mosaic_gpu" in text


def test_auto_on_cpu_keeps_triton_lowering(env):
    """Without a Hopper GPU attached, ``auto`` lowers the Triton forward."""
    if mgpu_dispatch.hopper():
        pytest.skip("a Hopper GPU is attached")
    env("auto")
    q, k, v = _qkv()
    bm = sj.create_block_mask(masks.causal, None, None, 1024, 1024, 128)
    text = _lowered_text(lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, backend="triton"), q, k, v)
    assert "mosaic_gpu" not in text


# -- compiled, on a Hopper GPU ----------------------------------------------------------------------
hopper_only = pytest.mark.skipif(not mgpu_dispatch.hopper(), reason="needs a Hopper GPU (Mosaic GPU wgmma)")


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    assert np.array_equal(fin, np.isfinite(x)), "infinities differ"
    return np.linalg.norm(x[fin] - ref[fin]) / max(np.linalg.norm(ref[fin]), 1e-30)


@hopper_only
@pytest.mark.parametrize("case", ["causal", "window", "band_empty_rows", "random_empty_block", "fp16_d64_batch2"])
def test_compiled_matches_reference(env, case):
    env("mosaic_gpu")
    S, B, D, dtype = 2048, 1, 128, jnp.bfloat16
    if case == "fp16_d64_batch2":
        B, D, dtype = 2, 64, jnp.float16
    q, k, v = _qkv(S=S, Hq=8, Hkv=2, D=D, dtype=dtype, B=B)
    if case == "random_empty_block":
        blocks = np.array(jax.random.uniform(jax.random.key(3), (1, 2, S // 128, S // 128)) < 0.3)
        blocks[:, :, 5, :] = False
        bm = sj.BlockMask.from_block_bool(blocks, S, S, 128)
    else:
        mask = {"causal": masks.causal, "window": masks.sliding_window(300, causal=True),
                "band_empty_rows": masks.Band(200, None), "fp16_d64_batch2": masks.causal}[case]
        bm = sj.create_block_mask(mask, None, None, S, S, 128)
    o, lse = jax.jit(lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, return_lse=True))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_r, lse_r = sj.block_sparse_attention(*f32, bm, return_lse=True, backend="xla")
    assert not np.isnan(np.asarray(o, np.float32)).any()
    assert _rel(o.astype(jnp.float32), o_r) < 2e-2
    assert _rel(lse, lse_r) < 1e-3
    empty = np.isinf(np.asarray(lse_r)).transpose(0, 2, 1)
    assert np.all(np.asarray(o, np.float32)[empty] == 0)
    w = jax.random.normal(jax.random.key(9), o.shape, jnp.float32)
    grad = lambda backend, *a: jax.grad(lambda q, k, v: jnp.sum(sj.block_sparse_attention(  # noqa: E731
        q, k, v, bm, backend=backend).astype(jnp.float32) * w), argnums=(0, 1, 2))(*a)
    for got, want in zip(jax.jit(lambda *a: grad(None, *a))(q, k, v), grad("xla", *f32)):
        assert _rel(got.astype(jnp.float32), want) < 3e-2


@hopper_only
@pytest.mark.parametrize("estimate_dropped", [False, True])
def test_compiled_pbs_matches_triton_forward(env, estimate_dropped):
    """PBS on the Mosaic GPU forward equals PBS on the Triton forward (same plan), also when the
    dropped-block estimate merges through the forward's lse."""
    q, k, v = _qkv(S=4096, Hq=8, Hkv=2)
    kw = dict(block_size=128, segment_size=1024, threshold=0.8, estimate_dropped=estimate_dropped)
    outs = {}
    for impl in ("triton", "mosaic_gpu"):
        env(impl)
        outs[impl] = jax.jit(lambda q, k, v: sj.permuted_block_sparse_attention(q, k, v, **kw))(q, k, v)
    assert _rel(outs["mosaic_gpu"].astype(jnp.float32), outs["triton"].astype(jnp.float32)) < 1e-2
    assert os.environ[ENV] == "mosaic_gpu"
