"""block_sparse_attention kernels vs the pure-jnp reference: forward, lse and every gradient.

Each case runs the public op with a kernel backend (``kernel_backend`` fixture:
interpret mode on the CPU, compiled on a GPU/TPU) and with ``backend="xla"``
(the reference), on fresh random inputs, and compares o, lse, dq, dk, dv.
Shapes are tiny and odd on purpose (ragged last blocks, padded head dims).
"""

from __future__ import annotations

import hashlib
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from sparse_jax import masks, reference
from sparse_jax.ops import attention as attention_op
from tests.conftest import assert_close, randn, rel_err, tolerance


@pytest.fixture
def kb(kernel_backend):
    """kernel_backend, skipping lowerings whose attention kernels are not in the tree yet."""
    backend, interpret = kernel_backend
    try:
        importlib.import_module(attention_op._KERNEL_MODULES[backend])
    except ModuleNotFoundError:
        pytest.skip(f"no {backend} block-sparse attention kernels yet")
    return backend, interpret


def _inputs(seed, B, Sq, Skv, Hq, Hkv, D, dtype, Dv=None):
    Dv = D if Dv is None else Dv
    q = randn(seed, (B, Sq, Hq, D), dtype)
    k = randn(seed + 1, (B, Skv, Hkv, D), dtype)
    v = randn(seed + 2, (B, Skv, Hkv, Dv), dtype)
    do = randn(seed + 3, (B, Sq, Hq, Dv), dtype)
    return q, k, v, do


def _run(backend, interpret, q, k, v, do, bm, **kw):
    """o, lse and (dq, dk, dv) of the public op, jitted once."""

    @jax.jit
    def f(q, k, v, do):
        def fn(q, k, v):
            o, lse = sj.block_sparse_attention(q, k, v, bm, backend=backend, interpret=interpret, return_lse=True,
                                               **kw)
            return o, lse
        o, vjp, lse = jax.vjp(fn, q, k, v, has_aux=True)
        return o, lse, vjp(do)

    return f(q, k, v, do)


_REFERENCE_CACHE: dict = {}


def _fingerprint(*trees) -> str:
    h = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(trees):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _reference(q, k, v, do, bm, **kw):
    """The xla backend's results, computed once per distinct case (every kernel backend reuses them)."""
    key = (_fingerprint(q, k, v, do, bm, {n: x for n, x in kw.items() if x is not None}),
           repr(bm.mask), tuple(sorted(kw)))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _run("xla", False, q, k, v, do, bm, **kw)
    return _REFERENCE_CACHE[key]


def check(kb, q, k, v, do, bm, *, grads=True, tol=None, **kw):
    """Kernel backend vs the xla reference; returns the kernel's (o, lse, grads)."""
    backend, interpret = kb
    tol = tolerance(q.dtype, interpret=interpret) if tol is None else tol
    o, lse, g = _run(backend, interpret, q, k, v, do, bm, **kw)
    ro, rlse, rg = _reference(q, k, v, do, bm, **kw)
    assert o.dtype == q.dtype and o.shape == q.shape[:3] + (v.shape[-1],)
    assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(o, ro, tol, "o")
    lse, rlse = np.asarray(lse), np.asarray(rlse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse), err_msg="rows with no allowed key")
    assert not np.isnan(lse).any()
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], atol=20 * tol, rtol=0)
    if grads:
        for name, a, b in zip(("dq", "dk", "dv"), g, rg):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close(a, b, 2 * tol, name)
    return o, lse, g


def _random_blocks(seed, shape, density, diagonal=False):
    rng = np.random.default_rng(seed)
    sel = rng.random(shape) < density
    if diagonal:
        n = min(shape[-2:])
        sel[..., np.arange(n), np.arange(n)] = True
    return sel


# -- masks -----------------------------------------------------------------------------------
def test_causal_ragged_f32(kb):
    q, k, v, do = _inputs(0, 1, 200, 200, 2, 2, 32, jnp.float32)
    bm = sj.create_block_mask(masks.causal, None, None, 200, 200, block_size=64)
    check(kb, q, k, v, do, bm)


def test_sliding_window_gqa2(kb):
    q, k, v, do = _inputs(10, 1, 150, 150, 4, 2, 32, jnp.float32)
    bm = sj.create_block_mask(masks.sliding_window(40), None, None, 150, 150, block_size=32)
    check(kb, q, k, v, do, bm)


def test_document_and_causal_window_bf16(kb):
    S = 160
    ids = np.sort(np.random.default_rng(1).integers(0, 4, S)).astype(np.int32)
    m = masks.and_masks(masks.document(ids), masks.sliding_window(48, causal=True))
    q, k, v, do = _inputs(20, 1, S, S, 2, 1, 64, jnp.bfloat16)
    bm = sj.create_block_mask(m, None, None, S, S, block_size=32)
    check(kb, q, k, v, do, bm)


def test_prefix_lm_rectangular_blocks(kb):
    q, k, v, do = _inputs(30, 1, 130, 130, 2, 2, 16, jnp.float32)
    bm = sj.create_block_mask(masks.prefix_lm(50), None, None, 130, 130, block_size=(32, 64))
    check(kb, q, k, v, do, bm)


def test_random_blocks_per_head_rectangular(kb):
    """Per-query-head tables (H = Hq with GQA), no mask function, q_len != kv_len."""
    Sq, Skv = 100, 190
    sel = _random_blocks(3, (1, 4, 4, 6), 0.4)
    bm = sj.BlockMask.from_block_bool(sel, Sq, Skv, block_size=32)
    q, k, v, do = _inputs(40, 1, Sq, Skv, 4, 2, 32, jnp.float32)
    check(kb, q, k, v, do, bm)


def test_random_blocks_with_mask_fn_batched(kb):
    """Per-batch tables, blocks selected at random, causal applied inside them."""
    S = 128
    sel = _random_blocks(4, (2, 1, 4, 4), 0.5, diagonal=True)
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=masks.causal)
    q, k, v, do = _inputs(50, 2, S, S, 2, 1, 32, jnp.float32)
    check(kb, q, k, v, do, bm)


def test_user_mask_fn_with_fully_masked_rows(kb):
    """Rows q % 7 == 3 have no allowed key inside partial blocks; empty table rows too."""
    S = 96

    def fn(b, h, q, kv):
        return (q % 7 != 3) & (kv <= q)

    sel = np.tril(np.ones((3, 3), bool))
    sel[2] = False  # the last query block has no blocks at all
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=fn)
    q, k, v, do = _inputs(60, 1, S, S, 2, 2, 32, jnp.float32)
    o, lse, g = check(kb, q, k, v, do, bm)
    dead = (np.arange(S) % 7 == 3) | (np.arange(S) >= 64)
    assert np.all(np.asarray(o)[:, dead] == 0)
    assert np.all(np.isneginf(lse[:, :, dead]))
    assert np.all(np.isfinite(lse[:, :, ~dead]))
    assert np.all(np.asarray(g[0])[:, dead] == 0)


def test_decode_gqa8_bf16(kb):
    """Sq = 4 queries at the end of a 300-key context, 8 query heads per kv head."""
    Sq, Skv = 4, 300
    bm = sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv,
                              block_size=(16, 64))
    q, k, v, do = _inputs(70, 2, Sq, Skv, 8, 1, 64, jnp.bfloat16)
    check(kb, q, k, v, do, bm)


def test_decode_single_query_f32(kb):
    Sq, Skv = 1, 200
    bm = sj.create_block_mask(masks.full, None, None, Sq, Skv, block_size=(16, 64))
    q, k, v, do = _inputs(75, 1, Sq, Skv, 4, 2, 32, jnp.float32)
    check(kb, q, k, v, do, bm)


def test_permuted_layout_positions(kb):
    """Tokens stored in a permuted order: the mask is evaluated at their original positions."""
    S = 96
    perm = np.random.default_rng(5).permutation(S).astype(np.int32)
    nb = 3
    bm = sj.BlockMask.from_kv_blocks(np.full((1, 1, nb), nb, np.int32),
                                     np.broadcast_to(np.arange(nb, dtype=np.int32), (1, 1, nb, nb)),
                                     q_len=S, kv_len=S, block_size=32, mask_fn=masks.causal)
    q, k, v, do = _inputs(80, 1, S, S, 2, 1, 32, jnp.float32)
    check(kb, q, k, v, do, bm, q_positions=perm, kv_positions=perm)


def test_explicit_segment_ids_mask_full_blocks(kb):
    """Explicit (unsorted) segment ids apply inside full blocks too."""
    S = 128
    seg = np.random.default_rng(6).integers(0, 3, S).astype(np.int32)
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=32)
    q, k, v, do = _inputs(90, 1, S, S, 2, 2, 32, jnp.float32)
    check(kb, q, k, v, do, bm, segment_ids=seg)


def test_softcap(kb):
    q, k, v, do = _inputs(100, 1, 128, 128, 2, 1, 32, jnp.float32, )
    q = q * 3.0
    bm = sj.create_block_mask(masks.causal, None, None, 128, 128, block_size=64)
    check(kb, q, k, v, do, bm, softcap=5.0, scale=0.3)


def test_odd_head_dims_and_block_sizes(kb):
    """D = 72 (padded to 128), Dv = 40, a non-power-of-two block (padded tiles)."""
    S = 130
    q, k, v, do = _inputs(110, 1, S, S, 2, 1, 72, jnp.float32, Dv=40)
    bm = sj.create_block_mask(masks.sliding_window(70), None, None, S, S, block_size=(100, 48))
    check(kb, q, k, v, do, bm)


def test_float16_forward(kb):
    q, k, v, do = _inputs(120, 1, 64, 64, 2, 2, 32, jnp.float16)
    bm = sj.create_block_mask(masks.causal, None, None, 64, 64, block_size=32)
    if kb[0] == "mosaic_tpu":  # TPUs have no float16 matmul path: a clear error instead
        with pytest.raises(ValueError, match="float16"):
            check(kb, q, k, v, do, bm, grads=False)
        return
    check(kb, q, k, v, do, bm, grads=False)


# -- kv_permutation ----------------------------------------------------------------------------
def _perm_case(seed, B, S, Hkv, invalid=False):
    rng = np.random.default_rng(seed)
    perm = np.stack([np.stack([rng.permutation(S) for _ in range(Hkv)]) for _ in range(B)]).astype(np.int32)
    if invalid:
        perm[0, 0, 5] = -3
        perm[-1, -1, 17] = S + 4
    return perm


def test_kv_permutation_causal_gqa(kb):
    backend, _ = kb
    if backend not in attention_op._KV_PERMUTATION_BACKENDS:
        pytest.skip(f"{backend} has no kv_permutation")
    S = 96
    perm = _perm_case(7, 2, S, 2, invalid=True)
    sel = _random_blocks(8, (1, 1, 3, 3), 0.7, diagonal=True)
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=masks.causal)
    q, k, v, do = _inputs(130, 2, S, S, 4, 2, 32, jnp.float32)
    check(kb, q, k, v, do, bm, kv_permutation=perm)


def test_kv_permutation_full_blocks_and_documents(kb):
    backend, _ = kb
    if backend not in attention_op._KV_PERMUTATION_BACKENDS:
        pytest.skip(f"{backend} has no kv_permutation")
    S = 64
    perm = _perm_case(9, 1, S, 1)
    ids = np.sort(np.random.default_rng(2).integers(0, 3, S)).astype(np.int32)
    bm = sj.BlockMask.from_block_bool(np.ones((2, 2), bool), S, S, block_size=32)
    q, k, v, do = _inputs(140, 1, S, S, 2, 1, 16, jnp.float32)
    check(kb, q, k, v, do, bm, kv_permutation=perm, segment_ids=ids)


def test_kv_permutation_reference_matches_physical_permutation():
    """The xla reference of kv_permutation equals permuting K/V by hand and masking densely."""
    B, S, Hq, Hkv, D = 1, 64, 2, 2, 16
    perm = _perm_case(11, B, S, Hkv)
    q, k, v, _ = _inputs(150, B, S, S, Hq, Hkv, D, jnp.float32)
    sel = _random_blocks(12, (1, 1, 2, 2), 0.8, diagonal=True)
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=masks.causal)
    o = sj.block_sparse_attention(q, k, v, bm, backend="xla", kv_permutation=perm)
    cls = np.repeat(np.repeat(np.asarray(bm.block_classes())[0, 0], 32, 0), 32, 1)  # [S, S] logical
    outs = []
    for h in range(Hkv):
        p = perm[0, h]
        allowed = (cls == 2) | ((cls == 1) & (np.arange(S)[:, None] >= p[None, :]))
        outs.append(reference.dense_attention(q[:, :, h:h + 1], k[:, p, h:h + 1], v[:, p, h:h + 1],
                                              allowed[None, None]))
    assert_close(o, jnp.concatenate(outs, axis=2), 1e-5, "o")


# -- GQA packing and launch configs ------------------------------------------------------------
@pytest.mark.parametrize("pack,fused_dq", [(False, False), (True, True)])
def test_gqa8_packing_and_fused_dq(kb, pack, fused_dq):
    """Triton launch variants: GQA heads packed into one tile; dQ by atomics in the dK/dV kernel."""
    backend, interpret = kb
    if backend != "triton":
        pytest.skip("Triton launch configs")
    from pallas_kernels.triton import attention_configs as cfgs
    S = 48
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=32)
    q, k, v, do = _inputs(160, 1, S, S, 8, 1, 16, jnp.float32)
    fwd = cfgs.FwdConfig(block_q=64 if pack else 32, block_kv=16, pack_gqa=pack, schedule="reverse")
    bwd = cfgs.BwdConfig(32, 16, 4, 2, 64 if pack else 16, 32, 4, 2, pack_gqa=pack, fused_dq=fused_dq)
    with cfgs.override(fwd=fwd, bwd=bwd):
        check(kb, q, k, v, do, bm)


@pytest.mark.parametrize("splits", [3, None])
def test_split_kv_decode(kb, splits):
    """Split-KV (flash-decoding): each split walks a share of the row, states merged after."""
    backend, interpret = kb
    if backend != "triton":
        pytest.skip("Triton launch configs")
    from pallas_kernels.triton import attention_configs as cfgs
    Sq, Skv = 4, 300
    m = masks.and_masks(masks.bottom_right(masks.causal, Sq, Skv), masks.sliding_window(200))
    bm = sj.create_block_mask(m, None, None, Sq, Skv, block_size=(16, 64))
    q, k, v, do = _inputs(165, 1, Sq, Skv, 4, 2, 32, jnp.float32)
    fwd = cfgs.FwdConfig(block_q=16, block_kv=32, num_warps=4, num_stages=2, num_splits=splits)
    if splits is None:  # the automatic choice splits this shape (few programs, many key tiles)
        from pallas_kernels.triton import attention_fwd, block_sparse_attention as K
        P = K.problem(q, k, v, bm, None, None, None, None, scale=1.0, softcap=None, segments_everywhere=False,
                      kv_permutation=None)
        assert attention_fwd.num_splits(P, fwd) > 1
    with cfgs.override(fwd=fwd):
        check(kb, q, k, v, do, bm)


# -- the xla backend and bad inputs ----------------------------------------------------------------
def test_xla_backend_matches_dense_reference():
    S = 80
    q, k, v, _ = _inputs(170, 2, S, S, 2, 1, 16, jnp.float32)
    bm = sj.create_block_mask(masks.sliding_window(20, causal=True), None, None, S, S, block_size=16)
    o = sj.block_sparse_attention(q, k, v, bm, backend="xla")
    ro = reference.dense_attention(q, k, v, bm.to_dense())
    assert_close(o, ro, 1e-6, "o")


def test_bad_inputs():
    S = 64
    q, k, v, _ = _inputs(180, 1, S, S, 2, 1, 16, jnp.float32)
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=32)
    with pytest.raises(ValueError, match="kv_permutation must be"):
        sj.block_sparse_attention(q, k, v, bm, backend="xla", kv_permutation=np.zeros((1, 2, S), np.int32))
    with pytest.raises(ValueError, match="integer"):
        sj.block_sparse_attention(q, k, v, bm, backend="xla", kv_permutation=np.zeros((1, 1, S), np.float32))
    with pytest.raises(ValueError, match="kv_permutation"):
        sj.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu", kv_permutation=np.arange(S))
    with pytest.raises(ValueError, match="share a dtype"):
        sj.block_sparse_attention(q, k.astype(jnp.bfloat16), v, bm, backend="triton")
    with pytest.raises(ValueError, match="block mask is for"):
        sj.block_sparse_attention(q[:, :32], k, v, bm, backend="triton")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sj.block_sparse_attention(q[:, :, :1], k[:, :, [0, 0]], v[:, :, [0, 0]], bm, backend="triton")


def test_triton_lowering_needs_group_tables_for_packing():
    from pallas_kernels.common import attention_tiling
    with pytest.raises(ValueError, match="one block table per kv head group"):
        attention_tiling.head_packing(8, 2, 8, True, q_span=4, tile_m=64)


def test_tile_fitting():
    from pallas_kernels.common.attention_tiling import fit_tile
    t = fit_tile(128, 8192, 64)
    assert (t.tile, t.n_sub, t.padded, t.ragged) == (64, 2, False, False)
    t = fit_tile(48, 130, 128)
    assert (t.tile, t.n_sub, t.padded) == (16, 3, False) or (t.tile, t.padded) == (64, True)
    t = fit_tile(100, 130, 64)
    assert t.tile == 64 and t.n_sub == 2 and t.padded and t.ragged and t.n_sub_last == 1
    t = fit_tile(128, 4, 128, min_tile=1)
    assert t.tile == 4 and t.n_sub == 1
