"""The Mosaic GPU block-list forward (``pallas_kernels.mosaic_gpu.indexed_block_fwd``): which problems
it takes, the dispatch rule, lowering for cuda on any host (Pallas' GPU interpreter cannot run
wgmma), and on a Hopper GPU the compiled kernel (with the Triton backward) against the dense-mask
oracle of ``test_indexed_attention``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from pallas_kernels.common import indexed as common
from pallas_kernels.mosaic_gpu import dispatch as mgpu_dispatch
from pallas_kernels.mosaic_gpu import indexed_block_fwd as mib
from pallas_kernels.triton import indexed_attention as triton_entry
from sparse_jax import _compat
from tests.test_indexed_attention import _block_lists, _qkvdo, check, dense_mask

ENV = triton_entry.FWD_IMPL_ENV
sd = jax.ShapeDtypeStruct


@pytest.fixture
def env(monkeypatch):
    def set_(value):
        monkeypatch.setenv(ENV, value)
    return set_


def _shapes(G=64, Hkv=1, D=128, dtype=jnp.bfloat16, Sq=16, Skv=1024):
    return (sd((1, Sq, G * Hkv, D), dtype), sd((1, Skv, Hkv, D), dtype), sd((1, Skv, Hkv, D), dtype))


def test_unsupported_names_each_reason():
    why = lambda *a, span=64, **kw: mib.unsupported(*_shapes(*a, **kw), span=span)  # noqa: E731
    for G, Hkv in ((64, 1), (128, 1), (256, 2), (8, 4), (16, 4), (32, 2)):
        assert why(G, Hkv) is None
    assert why(64, 1, 64) is None
    assert "dtype" in why(dtype=jnp.float32)
    assert "head dims" in why(D=96)
    for G in (4, 12, 48, 192):
        assert "query heads per kv head" in why(G)
    assert "block size" in why(span=16)
    assert "overflow shared memory" in why(span=128)  # G=64: two rings of 128-key steps
    assert why(128, span=128) is None
    assert "multiple of the block size" in why(Skv=1000)


def test_tile_tokens():
    assert [mib.tile_tokens(G) for G in (8, 16, 32, 64, 128, 256)] == [8, 4, 2, 1, 1, 1]


def test_dispatch_rule(env):
    q, k, v = _shapes()
    pick = lambda **kw: triton_entry.forward_impl(q, k, v, **{**dict(span=64, interpret=False), **kw})  # noqa: E731
    env("auto")
    assert pick() == ("mosaic_gpu" if mgpu_dispatch.hopper() else "triton")
    assert pick(interpret=True) == "triton"
    assert pick(span=1) == "triton"            # token lists: rows are gathers, not block copies
    with triton_entry.config_override(BN=32):
        assert pick() == "triton"
    env("mosaic_gpu")
    assert pick() == "mosaic_gpu"
    with pytest.raises(ValueError, match="cannot take block size 16"):
        pick(span=16)
    env("triton")
    assert pick() == "triton"
    env("tpu")
    with pytest.raises(ValueError, match="choose auto, triton or mosaic_gpu"):
        pick()


@pytest.mark.parametrize("G,Hkv,span,Sq,order", [(64, 2, 64, 33, "query"), (128, 1, 64, 16, "query"),
                                                 (128, 2, 32, 8, "query"), (256, 1, 128, 8, "query"),
                                                 (16, 2, 64, 23, None), (8, 1, 32, 9, "kv"), (32, 1, 64, 5, "query")])
def test_lowers_for_cuda_forward_and_backward(env, G, Hkv, span, Sq, order):
    """Both layouts (G=64: a token per warpgroup, odd Sq leaves one idle; G % 128 == 0: two warpgroups
    per token), query tiles below 64 heads (ragged last tile), several blocks per step (span 32)
    and one (span 128); the backward stays Triton in the requested loop order."""
    env("mosaic_gpu")
    q, k, v = _shapes(G, Hkv, Sq=Sq)
    idx = jnp.zeros((1, Sq, Hkv, 5), jnp.int32)
    fn = lambda q, k, v: sj.indexed_block_attention(q, k, v, idx, block_size=span, loop_order=order,  # noqa: E731
                                                    backend="triton")
    assert "mosaic_gpu" in _compat.export(fn, "cuda", q, k, v).mlir_module()
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
    text = _compat.export(jax.grad(loss, argnums=(0, 1, 2)), "cuda", q, k, v).mlir_module()
    assert "mosaic_gpu" in text
    assert ("kv_major_bwd" if order == "kv" or (order is None and G < 32) else "indexed_attention_bwd") in text


def test_separate_layout_with_long_steps_overflows_shared_memory_clearly(env):
    """Two rings of 128-key steps do not fit 227 KB: the launch config error names shared memory."""
    q, k, v = _shapes(64)
    lists = common.Lists(jnp.zeros((1, 16, 1, 4), jnp.int32), jnp.full((1, 16, 1), 4, jnp.int32))
    fn = lambda q, k, v: mib.forward(q, k, v, lists, jnp.zeros((1,), jnp.int32), span=64, scale=0.1,  # noqa: E731
                                     causal=True, config=mib.MgpuIndexedConfig(step_keys=128))
    with pytest.raises(Exception, match="shared memory"):
        _compat.export(fn, "cuda", q, k, v)


# -- compiled, on a Hopper GPU ----------------------------------------------------------------------
hopper_only = pytest.mark.skipif(not mgpu_dispatch.hopper(), reason="needs a Hopper GPU (Mosaic GPU wgmma)")

CASES = {
    # name: (B, Sq, Skv, G, Hkv, D, span, n, dtype, causal)
    "separate_odd_sq": (2, 37, 1024, 64, 2, 128, 64, 6, jnp.bfloat16, True),
    "shared": (1, 24, 2048, 128, 1, 128, 64, 9, jnp.bfloat16, True),
    "shared_span32_fp16_d64": (1, 16, 512, 128, 2, 64, 32, 7, jnp.float16, True),
    "separate_span32_noncausal": (1, 12, 1024, 64, 1, 128, 32, 9, jnp.bfloat16, False),
    "shared_span128_g256": (1, 10, 1024, 256, 1, 128, 128, 4, jnp.bfloat16, True),
    "tile4_g16_ragged": (2, 23, 1024, 16, 2, 128, 64, 5, jnp.bfloat16, True),
    "tile8_g8_span32_fp16_d64": (1, 21, 512, 8, 2, 64, 32, 6, jnp.float16, True),
    "tile2_g32_noncausal": (1, 9, 1024, 32, 1, 128, 64, 4, jnp.bfloat16, False),
}


@hopper_only
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_matches_dense_mask(env, case):
    """Random lists with repeats, -1, out-of-range and int32-overflow entries, an empty first row,
    per-batch query offsets (early tokens see few blocks; causal diagonal blocks), forward and the
    gradients through the Triton backward."""
    env("mosaic_gpu")
    B, Sq, Skv, G, Hkv, D, span, n, dtype, causal = CASES[case]
    q, k, v, do = _qkvdo(31, B, Sq, Skv, G * Hkv, Hkv, D, D, dtype)
    idx = _block_lists(32, B, Sq, Hkv, n, Skv // span)
    off = np.array([Skv - Sq, 100][:B], np.int32)
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv, span=span, causal=causal, q_offset=off)
    fn = lambda q, k, v: sj.indexed_block_attention(q, k, v, jnp.asarray(idx), block_size=span, causal=causal,  # noqa: E731
                                                    q_offset=jnp.asarray(off), return_lse=True, backend="triton")
    check(fn, q, k, v, do, mask, tol=2e-2, oracle_f32=True)
