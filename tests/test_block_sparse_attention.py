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
from tests.conftest import assert_close, randn, tolerance


@pytest.fixture
def kb(kernel_backend):
    """kernel_backend, skipping lowerings whose attention kernels are not in the tree yet."""
    backend, interpret = kernel_backend
    try:
        importlib.import_module(attention_op._KERNEL_MODULES[backend])
    except ModuleNotFoundError:
        pytest.skip(f"no {backend} block-sparse attention kernels yet")
    return backend, interpret


def _covered_on_tpu_by(kb, test_name: str):
    """Skip the Mosaic interpret run of a case tests/test_attention_tpu.py already covers (CPU
    time: every case is a kernel compile per backend)."""
    if kb[0] == "mosaic_tpu" and kb[1]:
        pytest.skip(f"Mosaic: covered by tests/test_attention_tpu.py::{test_name}")


def _inputs(seed, B, Sq, Skv, Hq, Hkv, D, dtype, Dv=None):
    Dv = D if Dv is None else Dv
    q = randn(seed, (B, Sq, Hq, D), dtype)
    k = randn(seed + 1, (B, Skv, Hkv, D), dtype)
    v = randn(seed + 2, (B, Skv, Hkv, Dv), dtype)
    do = randn(seed + 3, (B, Sq, Hq, Dv), dtype)
    return q, k, v, do


# On the CPU (interpret mode) XLA's backend optimisations cost a third of each case's compile
# time and buy nothing for these tiny shapes.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _run(backend, interpret, q, k, v, do, bm, **kw):
    """o, lse and (dq, dk, dv) of the public op, compiled once."""

    def f(q, k, v, do):
        def fn(q, k, v):
            o, lse = sj.block_sparse_attention(q, k, v, bm, backend=backend, interpret=interpret, return_lse=True,
                                               **kw)
            return o, lse
        o, vjp, lse = jax.vjp(fn, q, k, v, has_aux=True)
        return o, lse, vjp(do)

    compiled = jax.jit(f).lower(q, k, v, do).compile(compiler_options=_COMPILER_OPTIONS)
    return compiled(q, k, v, do)


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


def test_lse_is_differentiable_with_empty_rows(kb):
    """A loss that reads lse too (as merging two partial attentions does): gradients of
    sum(o * do) + sum(lse * dlse) match the reference; rows with no allowed key (query head 1
    has an empty block row) keep finite, zero contributions."""
    S = 96
    sel = np.ones((1, 2, 3, 3), bool)
    sel[:, 1, 1] = False
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=masks.causal)
    q, k, v, do = _inputs(70, 1, S, S, 2, 1, 16, jnp.float32)
    dlse = randn(74, (1, 2, S), jnp.float32)

    def grads(backend, interpret):
        def loss(q, k, v):
            o, lse = sj.block_sparse_attention(q, k, v, bm, backend=backend, interpret=interpret, return_lse=True)
            return jnp.sum(o * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got, want = grads(*kb), grads("xla", False)
    tol = tolerance(q.dtype, interpret=kb[1])
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(a)).all(), name
        assert_close(a, b, 2 * tol, name)
    # the lse term matters: without it the gradients differ
    plain = jax.grad(lambda q: jnp.sum(sj.block_sparse_attention(q, k, v, bm, backend="xla") * do))(q)
    assert not np.allclose(np.asarray(plain), np.asarray(want[0]), atol=1e-3)


# -- masks -----------------------------------------------------------------------------------
# Each case below combines several features on one small shape (CPU interpret mode is slow:
# one case is one compile of three kernels per backend).
def test_causal_ragged_softcap_segments_f32(kb):
    """Ragged last block, softcap with a custom scale, explicit segment ids (which apply inside
    full blocks too): causal 64-blocks over 200 positions."""
    _covered_on_tpu_by(kb, "test_positions_segments_and_dead_rows, test_decode_gqa8_softcap_bf16")
    S = 200
    q, k, v, do = _inputs(0, 1, S, S, 2, 2, 32, jnp.float32)
    seg = np.random.default_rng(6).integers(0, 3, S).astype(np.int32)  # unsorted on purpose
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=64)
    check(kb, q * 3.0, k, v, do, bm, softcap=5.0, scale=0.3, segment_ids=seg)


def test_random_blocks_per_batch_window_gqa2(kb):
    """Per-batch tables (blocks at random), a sliding-window mask inside them, 2 query heads per
    kv head sharing one table."""
    S = 128
    sel = _random_blocks(4, (2, 1, 4, 4), 0.6, diagonal=True)
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=masks.sliding_window(40))
    q, k, v, do = _inputs(50, 2, S, S, 4, 2, 32, jnp.float32)
    check(kb, q, k, v, do, bm)


def test_document_and_causal_window_16bit(kb):
    """Document mask (segment ids reach the kernel) and a causal window; float16 on Triton,
    bfloat16 on TPUs (no float16 matmuls there, see test_float16_unsupported_on_tpu)."""
    _covered_on_tpu_by(kb, "test_unaligned_tiles_documents_gqa2_bf16")
    S = 160
    ids = np.sort(np.random.default_rng(1).integers(0, 4, S)).astype(np.int32)
    m = masks.and_masks(masks.document(ids), masks.sliding_window(48, causal=True))
    dtype = jnp.bfloat16 if kb[0] == "mosaic_tpu" else jnp.float16
    q, k, v, do = _inputs(20, 1, S, S, 2, 1, 64, dtype)
    bm = sj.create_block_mask(m, None, None, S, S, block_size=32)
    check(kb, q, k, v, do, bm)


def test_prefix_lm_per_head_rectangular(kb):
    """Per-query-head tables (H = Hq with GQA), rectangular blocks, q_len != kv_len."""
    Sq, Skv = 100, 190
    sel = _random_blocks(3, (1, 4, 4, 3), 0.6)
    bm = sj.BlockMask.from_block_bool(sel, Sq, Skv, block_size=(32, 64), mask_fn=masks.prefix_lm(50))
    q, k, v, do = _inputs(40, 1, Sq, Skv, 4, 2, 16, jnp.float32)
    check(kb, q, k, v, do, bm)


def test_user_mask_fn_with_fully_masked_rows(kb):
    """Rows q % 7 == 3 have no allowed key inside partial blocks; empty table rows too."""
    _covered_on_tpu_by(kb, "test_positions_segments_and_dead_rows")
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
    _covered_on_tpu_by(kb, "test_decode_gqa8_softcap_bf16")
    Sq, Skv = 4, 300
    bm = sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv,
                              block_size=(16, 64))
    q, k, v, do = _inputs(70, 2, Sq, Skv, 8, 1, 64, jnp.bfloat16)
    check(kb, q, k, v, do, bm)


def test_decode_single_query_window_split_kv_f32(kb):
    """Sq = 1 against 300 keys in a 200-key window (partial blocks at its edge); on Triton the
    row's key blocks are split over 3 programs (flash-decoding) and merged. Split-KV is
    forward-only machinery; the backward of decode shapes is checked in test_decode_gqa8_bf16."""
    Sq, Skv = 1, 300
    m = masks.and_masks(masks.bottom_right(masks.causal, Sq, Skv), masks.sliding_window(200))
    bm = sj.create_block_mask(m, None, None, Sq, Skv, block_size=(16, 64))
    q, k, v, do = _inputs(165, 1, Sq, Skv, 4, 2, 32, jnp.float32)
    if kb[0] != "triton":  # forward only (decode gradients: tests/test_attention_tpu.py)
        check(kb, q, k, v, do, bm, grads=False)
        return
    from pallas_kernels.triton import attention_configs as cfgs
    with cfgs.override(fwd=cfgs.FwdConfig(block_q=16, block_kv=32, num_warps=4, num_stages=2, num_splits=3)):
        check(kb, q, k, v, do, bm, grads=False)


def test_permuted_layout_positions(kb):
    """Tokens stored in a permuted order: the mask is evaluated at their original positions."""
    _covered_on_tpu_by(kb, "test_positions_segments_and_dead_rows")
    S = 96
    perm = np.random.default_rng(5).permutation(S).astype(np.int32)
    nb = 3
    bm = sj.BlockMask.from_kv_blocks(np.full((1, 1, nb), nb, np.int32),
                                     np.broadcast_to(np.arange(nb, dtype=np.int32), (1, 1, nb, nb)),
                                     q_len=S, kv_len=S, block_size=32, mask_fn=masks.causal)
    q, k, v, do = _inputs(80, 1, S, S, 2, 1, 32, jnp.float32)
    check(kb, q, k, v, do, bm, q_positions=perm, kv_positions=perm)


def test_odd_head_dims_and_block_sizes(kb):
    """D = 72 (padded to 128), Dv = 40, a non-power-of-two block (padded tiles)."""
    S = 130
    q, k, v, do = _inputs(110, 1, S, S, 2, 1, 72, jnp.float32, Dv=40)
    bm = sj.create_block_mask(masks.sliding_window(70), None, None, S, S, block_size=(100, 48))
    check(kb, q, k, v, do, bm)


def test_float16_unsupported_on_tpu():
    q, k, v, _ = _inputs(120, 1, 64, 64, 2, 2, 32, jnp.float16)
    bm = sj.create_block_mask(masks.causal, None, None, 64, 64, block_size=32)
    with pytest.raises(ValueError, match="float16"):
        sj.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu", interpret=True)


# -- kv_permutation ----------------------------------------------------------------------------
def _perm_case(seed, B, S, Hkv, invalid=False):
    rng = np.random.default_rng(seed)
    perm = np.stack([np.stack([rng.permutation(S) for _ in range(Hkv)]) for _ in range(B)]).astype(np.int32)
    if invalid:
        perm[0, 0, 5] = -3
        perm[-1, -1, 17] = S + 4
    return perm


def test_kv_permutation_causal_gqa_documents(kb):
    """Permuted K/V rows (with invalid entries), causal on the logical order, GQA, and segment
    ids gathered through the permutation (they apply inside full blocks too)."""
    backend, _ = kb
    if backend not in attention_op._KV_PERMUTATION_BACKENDS:
        pytest.skip(f"{backend} has no kv_permutation")
    S = 96
    perm = _perm_case(7, 2, S, 2, invalid=True)
    ids = np.sort(np.random.default_rng(2).integers(0, 3, S)).astype(np.int32)
    sel = _random_blocks(8, (1, 1, 3, 3), 0.7, diagonal=True)
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=32, mask_fn=masks.causal)
    q, k, v, do = _inputs(130, 2, S, S, 4, 2, 32, jnp.float32)
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


# -- Triton launch variants ----------------------------------------------------------------------
def test_triton_launch_variants(kb):
    """Triton switches in one launch: the 8 query heads of a group packed into one tile, the
    softmax reference max moved lazily (logits grow along the keys, so some steps rescale
    and others skip), the next block index carried through the walk, query tiles of a head
    launched side by side, dQ by atomics in the dK/dV kernel."""
    backend, interpret = kb
    if backend != "triton":
        pytest.skip("Triton launch configs")
    from pallas_kernels.triton import attention_configs as cfgs
    S = 48
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=32)
    q, k, v, do = _inputs(160, 1, S, S, 8, 1, 16, jnp.float32)
    k = k * (1.0 + jnp.arange(S, dtype=jnp.float32) / 4.0)[None, :, None, None]  # growing logits
    fwd = cfgs.FwdConfig(block_q=64, block_kv=16, pack_gqa=True, schedule="reverse", lazy_rescale=True,
                         prefetch_index=True, grid_order="tiles_first")
    bwd = cfgs.BwdConfig(32, 16, 4, 2, 64, 32, 4, 2, pack_gqa=True, fused_dq=True, prefetch_index=True,
                         grid_order="tiles_first")
    with cfgs.override(fwd=fwd, bwd=bwd):
        check(kb, q * 3.0, k, v, do, bm)


def test_triton_config_choices():
    """Split-KV and decode tiles are chosen from the shape; TUNED keys are well formed."""
    from pallas_kernels.triton import attention_configs as cfgs
    from pallas_kernels.triton import attention_fwd, block_sparse_attention as K
    Sq, Skv = 4, 300
    bm = sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv, block_size=(16, 64))
    q, k, v, _ = _inputs(165, 1, Sq, Skv, 4, 2, 32, jnp.float32)
    P = K.problem(q, k, v, bm, None, None, None, None, scale=1.0, softcap=None, segments_everywhere=False,
                  kv_permutation=None)
    fwd = cfgs.FwdConfig(block_q=16, block_kv=32, num_warps=4, num_stages=2)
    assert attention_fwd.num_splits(P, fwd) > 1  # few programs, many key tiles: split
    assert attention_fwd.num_splits(P, cfgs.FwdConfig(block_q=16, block_kv=32, num_splits=1)) == 1
    # decode tiles hold every query position of a table row times the packed heads
    assert cfgs.decode_rows(1, 4) == 16 and cfgs.decode_rows(16, 4) == 64 and cfgs.decode_rows(16, 16) == 128
    assert cfgs.forward_config(128, jnp.bfloat16, 16, group=4).block_q == 64
    assert cfgs.shape_class(1, True) == "decode" and cfgs.shape_class(128, False) == "dense"
    for key, c in cfgs.TUNED_FWD.items():
        assert len(key) == 4 and key[3] in ("decode", "masked", "dense") and isinstance(c, cfgs.FwdConfig)
    with pytest.raises(ValueError, match="grid_order"):
        cfgs.FwdConfig(grid_order="rows")
    # masks.full needs no evaluation: even in blocks marked partial the kernel skips the mask
    S = 64
    bm = sj.BlockMask.from_block_bool(np.ones((2, 2), bool), S, S, block_size=32, mask_fn=masks.full,
                                      classify=False)
    q, k, v, _ = _inputs(166, 1, S, S, 2, 1, 16, jnp.float32)
    assert K.problem(q, k, v, bm, None, None, None, None, scale=1.0, softcap=None, segments_everywhere=False,
                     kv_permutation=None).mask is None
    o = sj.block_sparse_attention(q, k, v, bm, backend="triton", interpret=True)
    assert_close(o, sj.block_sparse_attention(q, k, v, bm, backend="xla"), tolerance(jnp.float32), "o")


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
