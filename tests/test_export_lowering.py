"""Kernels lower for hardware that is not attached: jax.export for 'cuda' (Pallas -> Triton IR)
and 'tpu' (full Mosaic lowering), on the CPU.

Triton's own compilation (register allocation, shared-memory limits) only happens on a
GPU; these tests catch everything before that: unsupported primitives, non-power-of-two
shapes, bad block shapes, dtype mismatches in the kernel bodies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from sparse_jax import _compat, masks


@pytest.fixture(autouse=True)
def _triton_forward(monkeypatch):
    """These cases check the Triton lowering: keep the forward off the Mosaic GPU kernel, which
    ``auto`` picks on a Hopper host (its own lowering: tests/test_attention_mgpu.py)."""
    from pallas_kernels.triton import block_sparse_attention as gpu_entry
    monkeypatch.setenv(gpu_entry.FWD_IMPL_ENV, "triton")


def _fwd_bwd(bm, **kw):
    """A loss whose export lowers the forward and both backward kernels."""

    def loss(q, k, v, do):
        o = sj.block_sparse_attention(q, k, v, bm, backend="triton", **kw)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _specs(B, Sq, Skv, Hq, Hkv, D, dtype, Dv=None):
    Dv = D if Dv is None else Dv
    return (jax.ShapeDtypeStruct((B, Sq, Hq, D), dtype), jax.ShapeDtypeStruct((B, Skv, Hkv, D), dtype),
            jax.ShapeDtypeStruct((B, Skv, Hkv, Dv), dtype), jax.ShapeDtypeStruct((B, Sq, Hq, Dv), dtype))


def _triton_calls(exported) -> int:
    return exported.mlir_module().count("__gpu$xla.gpu.triton")


# == Triton (GPU) ==================================================================================
@pytest.mark.parametrize("D,dtype", [(128, jnp.bfloat16), (64, jnp.float16), (256, jnp.bfloat16),
                                     (72, jnp.float32)])
def test_triton_causal_fwd_bwd_lowers(D, dtype):
    S = 384
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=128)
    exp = _compat.export(_fwd_bwd(bm), "cuda", *_specs(1, S, S, 4, 2, D, dtype))
    assert _triton_calls(exp) >= 3  # forward, dQ, dK/dV


def test_triton_decode_gqa_packed_lowers():
    Sq, Skv = 4, 1000
    bm = sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv,
                              block_size=(16, 128))
    exp = _compat.export(_fwd_bwd(bm), "cuda", *_specs(2, Sq, Skv, 16, 2, 128, jnp.bfloat16))
    assert _triton_calls(exp) >= 3


def test_triton_document_softcap_segments_lowers():
    S = 256
    ids = np.sort(np.random.default_rng(0).integers(0, 3, S)).astype(np.int32)
    m = masks.and_masks(masks.document(ids), masks.sliding_window(100, causal=True))
    bm = sj.create_block_mask(m, None, None, S, S, block_size=(64, 128))
    exp = _compat.export(_fwd_bwd(bm, softcap=30.0), "cuda", *_specs(1, S, S, 2, 2, 128, jnp.bfloat16))
    assert _triton_calls(exp) >= 3


def test_triton_kv_permutation_positions_lowers():
    S = 256
    perm = np.stack([np.random.default_rng(i).permutation(S) for i in range(2)])[None].astype(np.int32)
    sel = np.tril(np.ones((2, 2), bool))
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=128, mask_fn=masks.causal)
    pos = np.arange(S, dtype=np.int32)
    exp = _compat.export(_fwd_bwd(bm, kv_permutation=perm, q_positions=pos, kv_positions=pos), "cuda",
                         *_specs(1, S, S, 4, 2, 64, jnp.bfloat16))
    assert _triton_calls(exp) >= 3


def test_triton_fused_dq_and_configs_lower():
    from pallas_kernels.triton import attention_configs as cfgs
    S = 512
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=128)
    fwd = cfgs.FwdConfig(block_q=128, block_kv=128, num_warps=8, num_stages=3, pack_gqa=True)
    bwd = cfgs.BwdConfig(128, 64, 8, 2, 64, 128, 8, 2, pack_gqa=True, fused_dq=True)
    with cfgs.override(fwd=fwd, bwd=bwd):
        exp = _compat.export(_fwd_bwd(bm), "cuda", *_specs(1, S, S, 8, 2, 128, jnp.bfloat16))
    assert _triton_calls(exp) >= 2  # forward and the fused dK/dV/dQ kernel


def test_triton_round2_switches_lower():
    """Lazy rescale (a branch in the loop), index prefetch (a carried index), tiles-first grids."""
    from pallas_kernels.triton import attention_configs as cfgs
    S = 512
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=128)
    fwd = cfgs.FwdConfig(128, 64, 4, 2, lazy_rescale=True, prefetch_index=True, grid_order="tiles_first")
    bwd = cfgs.BwdConfig(128, 128, 8, 2, 64, 64, 4, 2, prefetch_index=True, grid_order="tiles_first")
    with cfgs.override(fwd=fwd, bwd=bwd):
        mod = _compat.export(_fwd_bwd(bm), "cuda", *_specs(1, S, S, 4, 2, 128, jnp.bfloat16)).mlir_module()
    assert mod.count("__gpu$xla.gpu.triton") >= 3  # forward, dQ, dK/dV


# == Mosaic (TPU) ==================================================================================
# TPU lowering cases go below this line (owned by the TPU kernels).
