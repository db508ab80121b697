"""Every Pallas-Triton kernel family keeps each unmasked lane inside its ref (interpret mode).

Compiled on a GPU, a lane outside its block reads or writes foreign memory (a neighbouring
block, another buffer); interpret mode clamps such accesses and hides them.
:mod:`tests.pallas_bounds_check` instruments every access; these cases run each kernel
family forward and backward at shapes that pad every dimension, with list / table entries
out of range, on purpose. The whole suite can run the same way:
``SPARSE_JAX_BOUNDS_CHECK=1 python -m pytest tests`` (slow; see conftest).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

import sparse_jax as sj
from sparse_jax import masks
from tests.conftest import COMPILED_GPU, randn
from tests.pallas_bounds_check import bounds_checked

KW = dict(backend="triton", interpret=True)
# What is checked is interpret-mode semantics, the same on every device: the CPU runs it.
pytestmark = pytest.mark.skipif(COMPILED_GPU, reason="device-independent interpret-mode check; runs on the CPU")


def _fwd_bwd(op):
    def f(*args):
        out, pull = jax.vjp(op, *args)
        return out, pull(jax.tree_util.tree_map(jnp.ones_like, out))
    return f


def _run_checked(fn, *args):
    with bounds_checked() as found:
        jax.block_until_ready(jax.jit(fn)(*args))
        jax.effects_barrier()
    return found


def test_checker_flags_unmasked_lanes_outside_the_ref_only():
    def call(kernel):
        return pl.pallas_call(kernel, grid=(1,), out_shape=jax.ShapeDtypeStruct((10, 8), jnp.float32), interpret=True)

    def store_past_end(x_ref, o_ref):
        o_ref[pl.ds(x_ref[0, 0].astype(jnp.int32), 8), :] = jnp.ones((8, 8))  # rows 3..10 of 10

    def masked_store_past_end(x_ref, o_ref):
        s = x_ref[0, 0].astype(jnp.int32)
        m = jnp.broadcast_to((s + jnp.arange(8) < 10)[:, None], (8, 8))
        plgpu.store(o_ref.at[pl.ds(s, 8), :], jnp.ones((8, 8)), mask=m)

    def gather_past_end(x_ref, o_ref):
        o_ref[...] = x_ref[jnp.arange(10) + x_ref[0, 0].astype(jnp.int32), :]  # rows 3..12

    x = jnp.full((10, 8), 3.0)
    bad = _run_checked(call(store_past_end), x)
    assert [(v.primitive, v.lanes, v.example) for v in bad] == [("swap", 8, (10, 0))]
    assert _run_checked(call(masked_store_past_end), x) == []
    bad = _run_checked(call(gather_past_end), x)
    assert [(v.primitive, v.lanes) for v in bad] == [("get", 24)] and bad.checked >= 2


B, SQ, SKV, HQ, HKV, D, DV = 1, 100, 228, 6, 2, 24, 20


def _qkv(seed, sq=SQ):
    return (randn(seed, (B, sq, HQ, D)), randn(seed + 1, (B, SKV, HKV, D)), randn(seed + 2, (B, SKV, HKV, DV)))


@pytest.mark.parametrize("case", ["block_sparse", "pbs_estimate", "indexed_tokens", "indexed_blocks_kv",
                                  "indexed_blocks_query", "swiglu_moe", "indexers"])
def test_kernels_stay_inside_their_refs(case):
    if case == "block_sparse":
        bm = sj.create_block_mask(masks.Offset(masks.causal, SKV - SQ), None, None, SQ, SKV, block_size=(32, 64))
        fn, args = _fwd_bwd(lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, return_lse=True, **KW)), _qkv(0)
    elif case == "pbs_estimate":
        fn = _fwd_bwd(lambda q, k, v: sj.permuted_block_sparse_attention(
            q, k, v, block_size=32, segment_size=64, threshold=0.7, estimate_dropped=True, **KW))
        args = _qkv(3, sq=SKV)
    elif case.startswith("indexed"):
        tok = jax.random.randint(jax.random.key(6), (B, SQ, HKV, 7), -3, SKV + 5)  # some out of range
        blk = jax.random.randint(jax.random.key(7), (B, SQ, HKV, 3), -2, SKV // 8 + 3)
        op = {"indexed_tokens": lambda q, k, v: sj.indexed_attention(q, k, v, tok, query_tile=4, **KW),
              "indexed_blocks_kv": lambda q, k, v: sj.indexed_block_attention(q, k, v, blk, block_size=8,
                                                                            loop_order="kv", **KW),
              "indexed_blocks_query": lambda q, k, v: sj.indexed_block_attention(q, k, v, blk, block_size=8,
                                                                               loop_order="query", **KW)}[case]
        fn, args = _fwd_bwd(op), _qkv(8)
    elif case == "swiglu_moe":
        gs = jnp.array([100, 0, 50, 7, 143], jnp.int32)  # an empty group, ragged tails
        x, wg, wu = randn(9, (300, 64), jnp.bfloat16), randn(10, (5, 64, 96), jnp.bfloat16), randn(11, (5, 64, 96),
                                                                                               jnp.bfloat16)
        wd = randn(12, (5, 96, 40), jnp.bfloat16)
        fn = _fwd_bwd(lambda x, a, b, c: sj.grouped_matmul(sj.grouped_swiglu(x, a, b, gs, **KW), c, gs, **KW))
        args = (x, wg, wu, wd)
    else:
        qi, ki, wi = randn(13, (B, 100, 3, 16)), randn(14, (B, 228, 16)), randn(15, (B, 100, 3))
        fn = lambda q, k, w: (sj.lightning_indexer(q, k, w, 16, **KW),  # noqa: E731
                              sj.hierarchical_indexer(q, k, w, 16, block_size=16, num_blocks=4, **KW))
        args = (qi, ki, wi)
    found = _run_checked(fn, *args)
    assert found.checked > 0 and found.unchecked == 0
    assert not found, "\n".join(str(v) for v in found[:8])
