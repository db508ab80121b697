"""Indexed attention (token lists, block lists): kernels vs a dense-mask oracle, forward and gradients.

The oracle is :func:`sparse_jax.reference.attention.dense_attention` with the boolean mask
the lists stand for, built here in NumPy (set semantics: a listed key is allowed
once; -1 / out-of-range / after the query are not). The gather-based references in
``sparse_jax.reference.indexed`` (the ``xla`` backend) are checked against it too.
Kernel cases are tiny: interpret mode runs every grid step in Python.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_jax as sj
from pallas_kernels.common import indexed as common
from sparse_jax import _compat
from sparse_jax.reference import dense_attention
from sparse_jax.reference import indexed as ref_indexed
from tests import triton_store_lint
from tests.conftest import assert_close, tolerance


def _qkvdo(seed, B, Sq, Skv, Hq, Hkv, D, Dv, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(B, Sq, Hq, D), (B, Skv, Hkv, D), (B, Skv, Hkv, Dv), (B, Sq, Hq, Dv)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def _offsets(q_offset, B, Sq, Skv):
    if q_offset is None:
        return np.full(B, Skv - Sq)
    return np.broadcast_to(np.asarray(q_offset), (B,))


def dense_mask(units, *, Hq, Skv, span=1, causal=True, q_offset=None):
    """bool [B, Hq, Sq, Skv]: the keys the lists allow (NumPy, independent of the library)."""
    units = np.asarray(units)
    B, Sq, Hkv, n = units.shape
    G = Hq // Hkv
    off = _offsets(q_offset, B, Sq, Skv)
    n_units = Skv if span == 1 else -(-Skv // span)
    mask = np.zeros((B, Hq, Sq, Skv), bool)
    for b in range(B):
        for t in range(Sq):
            for h in range(Hkv):
                for u in units[b, t, h]:
                    if 0 <= u < n_units:
                        for pos in range(u * span, min(u * span + span, Skv)):
                            if not causal or pos <= t + off[b]:
                                mask[b, h * G:(h + 1) * G, t, pos] = True
    return mask


def check(fn, q, k, v, do, mask, *, tol, scale=None, oracle_f32=False):
    """fn(q, k, v) -> (o, lse): compare o, lse (finite pattern too) and dq, dk, dv with the oracle.

    Kernel and oracle, forward and backward, are one jitted function: one compilation (most of
    an interpret-mode test's time) instead of one per eager op. ``oracle_f32``: the oracle runs on
    float32 copies of half-precision inputs (its gradients come back in the inputs' dtype).
    """
    def dense(q, k, v):
        if oracle_f32:
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return dense_attention(q, k, v, jnp.asarray(mask), scale=scale, return_lse=True)

    @jax.jit
    def both(q, k, v, do):
        out = []
        for f in (fn, dense):
            (o, lse), vjp = jax.vjp(f, q, k, v)
            out.append((o, lse, vjp((do.astype(o.dtype), jnp.zeros_like(lse)))))
        return out

    (o, lse, grads), (ro, rlse, rgrads) = both(q, k, v, do)
    assert o.shape == ro.shape and o.dtype == q.dtype
    assert_close(o, ro, tol, "o")
    empty = ~np.asarray(mask).any(-1)  # [B, Hq, Sq]
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert np.all(np.asarray(o, np.float32).transpose(0, 2, 1, 3)[empty] == 0), "empty rows must be 0"
    np.testing.assert_allclose(np.where(empty, 0, lse), np.where(empty, 0, rlse), rtol=tol, atol=tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert g.dtype == r.dtype
        assert_close(g, r, tol, name)


def _token_lists(seed, B, Sq, Skv, Hkv, n, *, dup=True, holes=True):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-3, Skv + 3, size=(B, Sq, Hkv, n))  # -1, < -1 and >= Skv included
    idx[..., -1] = rng.choice([2**31 - 1, -(2**31), 2**30], size=(B, Sq, Hkv))  # address overflow bait
    if dup:
        idx[..., 1] = idx[..., 0]  # a repeated key in every row
    if holes:
        idx[0, 0] = -1  # a row with no valid index
        idx[-1, -1, 0, 1:] = -1  # a row with a single slot in use
    return idx.astype(np.int32)


def _backend_kwargs(kernel_backend):
    backend, interpret = kernel_backend
    return dict(backend=backend, interpret=interpret)


# ---------------------------------------------------------------------------------- token lists
def test_token_lists_match_dense_mask(kernel_backend):
    """GQA 4, one token per program. Mosaic: duplicates, -1 / out-of-range slots, an empty row, causal
    bottom-right, f32. Triton (whose padded-row and duplicate paths the query-tile test covers):
    ``unique_indices=True`` on duplicate-free lists (no sort), bf16, explicit scale, not causal."""
    backend, interpret = kernel_backend
    B, Sq, Skv, Hkv, G, D, Dv, n = 2, 3, 20, 1, 4, 16, 8, 6
    if backend == "mosaic_tpu":
        q, k, v, do = _qkvdo(0, B, Sq, Skv, G * Hkv, Hkv, D, Dv)
        idx = _token_lists(1, B, Sq, Skv, Hkv, n)
        kw, dtype, causal, scale = {}, jnp.float32, True, None
    else:
        q, k, v, do = _qkvdo(4, B, Sq, Skv, G * Hkv, Hkv, 32, 16, jnp.bfloat16)
        rng = np.random.default_rng(5)
        idx = np.stack([rng.permutation(Skv + 4)[:n] - 2 for _ in range(B * Sq)]).reshape(B, Sq, 1, n)
        idx = idx.astype(np.int32)
        kw, dtype, causal, scale = dict(unique_indices=True, scale=0.2), jnp.bfloat16, False, 0.2
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv, causal=causal)
    fn = lambda q, k, v: sj.indexed_attention(q, k, v, jnp.asarray(idx), causal=causal, return_lse=True, **kw,
                                              backend=backend, interpret=interpret)
    check(fn, q, k, v, do, mask, tol=tolerance(dtype, interpret=interpret), scale=scale)


def test_token_query_tiles_padded_heads_and_dims():
    """Query tiles (T=2 over Sq=5: a ragged last tile) with G=3 heads (padded MMA rows), D=24 / Dv=12
    (padded columns), two batches and kv heads, per-batch q_offset, causal per row inside a tile."""
    B, Sq, Skv, Hkv, G, D, Dv, n = 2, 5, 24, 2, 3, 24, 12, 5
    q, k, v, do = _qkvdo(3, B, Sq, Skv, G * Hkv, Hkv, D, Dv)
    idx = _token_lists(4, B, Sq, Skv, Hkv, n)
    idx[1, 1:3, 0, :3] = [5, 9, 11]  # two tokens of one tile share keys
    off = np.array([0, 7], np.int32)
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv, q_offset=off)
    fn = lambda q, k, v: sj.indexed_attention(q, k, v, jnp.asarray(idx), query_tile=2, return_lse=True,
                                              q_offset=jnp.asarray(off), backend="triton", interpret=True)
    check(fn, q, k, v, do, mask, tol=tolerance(jnp.float32))


def test_token_reference_matches_dense_mask():
    """The gather-based reference (the xla backend) against the dense-mask oracle, chunked queries."""
    B, Sq, Skv, Hkv, G, D, Dv, n = 2, 5, 24, 2, 2, 8, 4, 5
    q, k, v, do = _qkvdo(6, B, Sq, Skv, G * Hkv, Hkv, D, Dv)
    idx = _token_lists(7, B, Sq, Skv, Hkv, n)
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv)
    fn = lambda q, k, v: sj.indexed_attention(q, k, v, jnp.asarray(idx), return_lse=True, backend="xla")
    old = ref_indexed._ELEMS_PER_CHUNK
    try:
        ref_indexed._ELEMS_PER_CHUNK = 4 * Hkv * n * D  # 4 query rows per chunk: a padded last chunk
        check(fn, q, k, v, do, mask, tol=1e-5)
    finally:
        ref_indexed._ELEMS_PER_CHUNK = old


# ---------------------------------------------------------------------------------- block lists
def _block_lists(seed, B, Sq, Hkv, n, n_blocks):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-2, n_blocks + 2, size=(B, Sq, Hkv, n))
    idx[:, ::2, :, 1] = rng.choice([2**31 - 1, -(2**31), 2**26], size=idx[:, ::2, :, 1].shape)  # int32 overflow
    idx[..., -1] = idx[..., 0]  # repeats count once
    idx[0, 0] = -1
    return idx.astype(np.int32)


@pytest.mark.parametrize("G,loop_order,query_tile", [(3, "kv", None), (4, "query", 8), (16, None, 1)])
def test_block_lists_match_dense_mask(kernel_backend, G, loop_order, query_tile):
    """Ragged last block, causal partial blocks, repeats, out-of-range blocks; kv-major with G=3 (rows
    padded to 4 per token), two batches and kv heads, per-batch q_offset; query-major with an 8-token
    query tile (over Sq=3) and with one token per program (Mosaic: query-major, one case)."""
    backend, interpret = kernel_backend
    if backend == "mosaic_tpu":
        if G != 4:
            pytest.skip("mosaic_tpu runs the query-major loop only: one group size is enough in interpret mode")
        loop_order = "query"
    B, Hkv = (2, 2) if G == 3 else (1, 1)
    Sq, Skv, D, Dv, bs, n = 3, 29, 16, 8, 8, 4
    q, k, v, do = _qkvdo(8 + G, B, Sq, Skv, G * Hkv, Hkv, D, Dv)
    idx = _block_lists(9, B, Sq, Hkv, n, -(-Skv // bs))
    off = np.array([3, 20][:B], np.int32)
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv, span=bs, q_offset=off)
    fn = lambda q, k, v: sj.indexed_block_attention(q, k, v, jnp.asarray(idx), block_size=bs, loop_order=loop_order,
                                                    query_tile=query_tile, q_offset=jnp.asarray(off),
                                                    return_lse=True, backend=backend, interpret=interpret)
    check(fn, q, k, v, do, mask, tol=tolerance(jnp.float32, interpret=interpret))


def test_block_reference_matches_dense_mask():
    B, Sq, Skv, Hkv, G, D, Dv, bs, n = 1, 4, 21, 1, 2, 8, 8, 4, 3
    q, k, v, do = _qkvdo(12, B, Sq, Skv, G * Hkv, Hkv, D, Dv)
    idx = _block_lists(13, B, Sq, Hkv, n, -(-Skv // bs))
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv, span=bs)
    fn = lambda q, k, v: sj.indexed_block_attention(q, k, v, jnp.asarray(idx), block_size=bs, return_lse=True,
                                                    backend="xla")
    check(fn, q, k, v, do, mask, tol=1e-5)


@pytest.mark.gpu
def test_kv_major_backward_is_deterministic():
    """Compiled only: interpret mode runs programs one after another, so it would pass trivially."""
    B, Sq, Skv, Hkv, G, D, bs, n = 1, 256, 2048, 2, 2, 64, 64, 8
    q, k, v, do = _qkvdo(14, B, Sq, Skv, G * Hkv, Hkv, D, D, jnp.bfloat16)
    idx = jnp.asarray(_block_lists(15, B, Sq, Hkv, n, Skv // bs))
    f = lambda q, k, v: jnp.sum(sj.indexed_block_attention(q, k, v, idx, block_size=bs, loop_order="kv",
                                                           backend="triton").astype(jnp.float32) * do)
    g1, g2 = jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(f, (0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------- shared logic
def test_canonical_lists():
    idx = jnp.asarray([[[[5, -1, 3, 5, 9, 2, -7]]]], jnp.int32)  # [1, 1, 1, 7]
    off = jnp.asarray([4], jnp.int32)
    lists = common.canonicalize(idx, off, span=1, n_units=8, causal=True, unique=False)
    np.testing.assert_array_equal(np.asarray(lists.idx)[0, 0, 0], [2, 3, -1, -1, -1, -1, -1])
    assert int(lists.count[0, 0, 0]) == 2
    lists = common.canonicalize(idx, off, span=1, n_units=8, causal=False, unique=True)
    np.testing.assert_array_equal(np.asarray(lists.idx)[0, 0, 0], [5, -1, 3, 5, -1, 2, -1])
    assert int(lists.count[0, 0, 0]) == 7
    # Blocks of 4: block 1 starts at 4 <= t_abs = 4, block 2 starts after it.
    lists = common.canonicalize(jnp.asarray([[[[2, 1, 0, 1]]]]), off, span=4, n_units=3, causal=True, unique=False)
    np.testing.assert_array_equal(np.asarray(lists.idx)[0, 0, 0], [0, 1, -1, -1])


def test_pair_table_and_merge():
    idx = jnp.asarray([[[[1, -1]], [[0, 1]], [[1, 0]]]], jnp.int32)  # [B=1, Sq=3, Hkv=1, n=2]
    table = common.pair_table(idx, 2)
    np.testing.assert_array_equal(np.asarray(table.start)[0, 0], [0, 2, 5])
    pairs = sorted(zip(np.asarray(table.tok)[0, 0, :5].tolist(), np.asarray(table.slot)[0, 0, :5].tolist()))
    assert pairs == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    o_part = jnp.asarray([[[1.0]], [[3.0]]])[None]  # [1, n=2, G=1, Dv=1]
    lse_part = jnp.log(jnp.asarray([[1.0], [3.0]]))[None]
    o, lse = common.merge_partials(o_part, lse_part, jnp.asarray([[True, True]]))
    np.testing.assert_allclose(np.asarray(o), [[[2.5]]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), [[np.log(4.0)]], rtol=1e-6)
    o, lse = common.merge_partials(jnp.full_like(o_part, jnp.nan), lse_part, jnp.asarray([[False, False]]))
    assert float(o[0, 0, 0]) == 0 and float(lse[0, 0]) == -np.inf


@functools.lru_cache(maxsize=None)
def _tile_fn(T):
    def f(raw):
        B = raw.shape[0]
        lists = common.canonicalize(raw, jnp.zeros((B,), jnp.int32), span=1, n_units=9, causal=False, unique=False)
        return common.tile_lists(lists, T)
    return jax.jit(f)


@settings(max_examples=12)
@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_tile_lists_are_unions_with_membership(T, data):
    """Every (token, unit) of the canonical lists appears in its tile's union with the token's bit, and
    nothing else does; unions are ascending, unique, compacted (fixed shapes: one compile per T)."""
    B, Sq, n = 2, 7, 4
    units = 9
    raw = np.asarray(data.draw(st.lists(st.integers(-2, units + 1), min_size=B * Sq * n, max_size=B * Sq * n)),
                     np.int32).reshape(B, Sq, 1, n)
    tiles = _tile_fn(T)(jnp.asarray(raw))
    idx, count = np.asarray(tiles.idx), np.asarray(tiles.count)
    bits = np.ones_like(idx) if tiles.bits is None else np.asarray(tiles.bits)
    for b in range(B):
        for i in range(idx.shape[1]):
            want = {}
            for j in range(T):
                t = i * T + j
                if t < Sq:
                    for u in set(raw[b, t, 0].tolist()):
                        if 0 <= u < units:
                            want[u] = want.get(u, 0) | (1 << j if T > 1 else 1)
            c = int(count[b, i, 0])
            got = dict(zip(idx[b, i, 0, :c].tolist(), bits[b, i, 0, :c].tolist()))
            assert got == want and list(idx[b, i, 0, :c]) == sorted(want)
            assert np.all(idx[b, i, 0, c:] == -1)


def test_store_lint_flags_overhanging_stores():
    """The lint catches round 1's GPU bug (a 16-row block over 4 heads stored without a mask) and passes
    every indexed kernel (fwd + bwd, all loop orders, query tiles) at shapes that pad every dimension."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def bad(x_ref, o_ref):
        o_ref[...] = plgpu.load(x_ref, mask=(jnp.arange(16) < 4)[:, None], other=0.0) * 2

    def good(x_ref, o_ref):
        m = (jnp.arange(16) < 4)[:, None]
        plgpu.store(o_ref, plgpu.load(x_ref, mask=m, other=0.0) * 2, mask=m)

    def call(kernel):
        spec = pl.BlockSpec((16, 8), lambda i: (0, 0))
        return lambda x: pl.pallas_call(kernel, grid=(1,), in_specs=[spec], out_specs=spec,
                                        out_shape=jax.ShapeDtypeStruct((4, 8), jnp.float32), interpret=True)(x)
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    assert [f.primitive for f in triton_store_lint.check(call(bad), x)] == ["swap"]
    assert triton_store_lint.check(call(good), x) == []

    sd = jax.ShapeDtypeStruct
    B, Sq, Skv, Hq, Hkv, D, Dv = 2, 5, 40, 6, 2, 24, 20
    args = (sd((B, Sq, Hq, D), jnp.float32), sd((B, Skv, Hkv, D), jnp.float32), sd((B, Skv, Hkv, Dv), jnp.float32),
            sd((B, Sq, Hq, Dv), jnp.float32))
    tok, blk = jnp.zeros((B, Sq, Hkv, 7), jnp.int32), jnp.zeros((B, Sq, Hkv, 3), jnp.int32)
    kw = dict(backend="triton", interpret=True)
    ops = [lambda q, k, v: sj.indexed_attention(q, k, v, tok, **kw),
           lambda q, k, v: sj.indexed_attention(q, k, v, tok, query_tile=4, **kw),
           lambda q, k, v: sj.indexed_block_attention(q, k, v, blk, block_size=8, loop_order="query", **kw),
           lambda q, k, v: sj.indexed_block_attention(q, k, v, blk, block_size=8, loop_order="kv", **kw)]
    for op in ops:
        def fwd_bwd(q, k, v, do, op=op):
            o, pull = jax.vjp(op, q, k, v)
            return pull(do)
        assert triton_store_lint.check(fwd_bwd, *args) == []


def test_loop_order_heuristic():
    assert common.choose_loop_order(1) == "kv" and common.choose_loop_order(8) == "kv"
    assert common.choose_loop_order(16) == "kv" and common.choose_loop_order(32) == "query"
    assert common.choose_loop_order(1, "query") == "query"
    with pytest.raises(ValueError, match="loop_order"):
        common.choose_loop_order(4, "rows")


# ---------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_at_trace_time():
    q = jnp.zeros((1, 4, 4, 8)); k = jnp.zeros((1, 8, 2, 8))
    idx = jnp.zeros((1, 4, 2, 3), jnp.int32)
    with pytest.raises(ValueError, match="integer"):
        sj.indexed_attention(q, k, k, idx.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"\[B, Sq, Hkv, n\]"):
        sj.indexed_attention(q, k, k, idx[:, :, :1])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sj.indexed_attention(q[:, :, :3], k, k, idx)
    with pytest.raises(ValueError, match="dtype"):
        sj.indexed_attention(q.astype(jnp.bfloat16), k, k, idx)
    with pytest.raises(ValueError, match="q_offset"):
        sj.indexed_attention(q, k, k, idx, q_offset=jnp.zeros((3,), jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="block_size"):
        sj.indexed_block_attention(q, k, k, idx, block_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        sj.indexed_attention(q, k, k, idx, backend="cuda")
    with pytest.raises(ValueError, match="query-major"):
        sj.indexed_block_attention(q, k, k, idx, block_size=4, loop_order="kv", backend="mosaic_tpu")
    for bad in (3, 0, 32):
        with pytest.raises(ValueError, match="query_tile"):
            sj.indexed_attention(q, k, k, idx, query_tile=bad, backend="xla")
    # A tile past the Triton kernel's rows per program (shared memory) is refused at trace time.
    sd = jax.ShapeDtypeStruct
    big = (sd((1, 8, 128, 16), jnp.bfloat16), sd((1, 64, 1, 16), jnp.bfloat16), sd((1, 64, 1, 16), jnp.bfloat16))
    blocks = jnp.zeros((1, 8, 1, 2), jnp.int32)
    with pytest.raises(ValueError, match="rows per program"):
        jax.eval_shape(lambda q, k, v: sj.indexed_block_attention(q, k, v, blocks, block_size=16, query_tile=8,
                                                                  loop_order="query", backend="triton"), *big)
    jax.eval_shape(lambda q, k, v: sj.indexed_block_attention(q, k, v, blocks, block_size=16, query_tile=4,
                                                              loop_order="query", backend="triton"), *big)


# ---------------------------------------------------------------------------------- lowering
@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_lowering(platform, backend):
    """Forward + backward of both variants lower for a platform that is not attached."""
    B, Sq, Skv, Hq, Hkv, D = 1, 64, 256, 8, 2, 128
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Sq, Hq, D), jnp.bfloat16), sd((B, Skv, Hkv, D), jnp.bfloat16), sd((B, Skv, Hkv, D), jnp.bfloat16))
    tok = jnp.zeros((B, Sq, Hkv, 32), jnp.int32)
    blk = jnp.zeros((B, Sq, Hkv, 4), jnp.int32)
    fns = [lambda q, k, v: sj.indexed_attention(q, k, v, tok, backend=backend),
           lambda q, k, v: sj.indexed_block_attention(q, k, v, blk, block_size=64, loop_order="query",
                                                      backend=backend)]
    if backend == "triton":
        fns.append(lambda q, k, v: sj.indexed_block_attention(q, k, v, blk, block_size=64, loop_order="kv",
                                                              backend=backend))
    for fn in fns:
        loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))
        text = _compat.export(jax.value_and_grad(loss, argnums=(0, 1, 2)), platform, *args).mlir_module()
        assert ("indexed_attention" in text) or ("indexed_block_attention" in text)


def test_backward_splits_large_groups_into_head_chunks(monkeypatch, kernel_backend):
    """Groups wider than one backward program takes (H100: 256 heads overflow shared memory) run the
    backward in head chunks accumulating into the same dK/dV; checked with a 2-head limit over G=6."""
    backend, interpret = kernel_backend
    if backend != "triton":
        pytest.skip("the head chunks are the Triton backward's")
    from pallas_kernels.triton import indexed_attention as tri
    monkeypatch.setattr(tri, "BWD_MAX_GROUP", 2)
    assert tri._head_chunk(6, 1) == 2 and tri._head_chunk(6, 2) == 6 and tri._head_chunk(2, 1) == 2
    B, Sq, Skv, Hkv, G, D, bs, n = 1, 5, 40, 2, 6, 16, 8, 3
    q, k, v, do = _qkvdo(21, B, Sq, Skv, G * Hkv, Hkv, D, D)
    idx = _block_lists(22, B, Sq, Hkv, n, Skv // bs)
    mask = dense_mask(idx, Hq=G * Hkv, Skv=Skv, span=bs)
    fn = lambda q, k, v: sj.indexed_block_attention(q, k, v, jnp.asarray(idx), block_size=bs, loop_order="query",  # noqa: E731
                                                    return_lse=True, backend=backend, interpret=interpret)
    check(fn, q, k, v, do, mask, tol=tolerance(jnp.float32, interpret=interpret))
