"""Masks and BlockMask tables: exactness against dense evaluation, transposes, traced == host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import sparse_jax as sj
from sparse_jax import _block_tables as T
from sparse_jax import masks

BLOCKS = st.sampled_from([16, 32, 48, 64, 128, 256])


def dense_of(mask, q_len, kv_len, b=0, h=0):
    m = masks.as_mask(mask)
    return np.broadcast_to(np.asarray(m(b, h, np.arange(q_len)[:, None], np.arange(kv_len)[None, :])),
                           (q_len, kv_len))


def expected_classes(dense, bq, bkv):
    q_len, kv_len = dense.shape
    nq, nk = -(-q_len // bq), -(-kv_len // bkv)
    d = np.zeros((nq * bq, nk * bkv), bool)
    v = np.zeros_like(d)
    d[:q_len, :kv_len] = dense
    v[:q_len, :kv_len] = True
    d = d.reshape(nq, bq, nk, bkv).transpose(0, 2, 1, 3)
    v = v.reshape(nq, bq, nk, bkv).transpose(0, 2, 1, 3)
    any_t = (d & v).any((2, 3))
    any_f = (~d & v).any((2, 3))
    return np.where(any_t, np.where(any_f, T.PARTIAL, T.FULL), T.EMPTY)


@st.composite
def leaf_masks(draw, q_len, kv_len):
    kind = draw(st.sampled_from(["causal", "window", "cwindow", "chunked", "prefix", "doc", "docrand", "fn", "full"]))
    if kind == "causal":
        return masks.causal
    if kind == "window":
        return masks.sliding_window(draw(st.integers(1, 200)))
    if kind == "cwindow":
        return masks.sliding_window(draw(st.integers(1, 200)), causal=True)
    if kind == "chunked":
        return masks.chunked(draw(st.integers(1, 150)), causal=draw(st.booleans()))
    if kind == "prefix":
        return masks.prefix_lm(draw(st.integers(0, 300)))
    if kind == "full":
        return masks.full
    if kind in ("doc", "docrand"):
        n_docs = draw(st.integers(1, 6))
        rng = np.random.default_rng(draw(st.integers(0, 2**31)))
        if q_len != kv_len:
            ids_q = np.sort(rng.integers(0, n_docs, q_len)) if kind == "doc" else rng.integers(0, n_docs, q_len)
            ids_k = np.sort(rng.integers(0, n_docs, kv_len)) if kind == "doc" else rng.integers(0, n_docs, kv_len)
            return masks.document(ids_q.astype(np.int32), ids_k.astype(np.int32))
        ids = rng.integers(0, n_docs, q_len)
        return masks.document((np.sort(ids) if kind == "doc" else ids).astype(np.int32))
    a, b, c = (draw(st.integers(1, 7)) for _ in range(3))
    return masks.FnMask(lambda bb, hh, q, k, a=a, b=b, c=c: (q * a + k * b) % (c + 1) == 0)


@st.composite
def any_mask(draw, q_len, kv_len):
    shape = draw(st.sampled_from(["leaf", "and", "or", "offset"]))
    if shape == "leaf":
        return draw(leaf_masks(q_len, kv_len))
    if shape == "offset":
        inner = draw(st.sampled_from([masks.causal, masks.sliding_window(37, causal=True), masks.chunked(50)]))
        return masks.offset(inner, q_offset=draw(st.integers(-100, 300)))
    parts = [draw(leaf_masks(q_len, kv_len)) for _ in range(draw(st.integers(2, 3)))]
    if sum(isinstance(p, masks.Document) for p in parts) > 1:
        parts = [p for p in parts if not isinstance(p, masks.Document)] + [
            next(p for p in parts if isinstance(p, masks.Document))]
    if len(parts) == 1:
        return parts[0]
    return masks.and_masks(*parts) if shape == "and" else masks.or_masks(*parts)


@st.composite
def problems(draw):
    q_len = draw(st.integers(1, 300))
    kv_len = draw(st.sampled_from([q_len, draw(st.integers(1, 300))]))
    return q_len, kv_len, draw(BLOCKS), draw(BLOCKS), draw(any_mask(q_len, kv_len))


@given(problems())
def test_tables_are_exact(problem):
    q_len, kv_len, bq, bkv, mask = problem
    bm = sj.create_block_mask(mask, None, None, q_len, kv_len, (bq, bkv))
    dense = dense_of(mask, q_len, kv_len)
    np.testing.assert_array_equal(np.asarray(bm.to_dense())[0, 0], dense)
    np.testing.assert_array_equal(bm.block_classes()[0, 0], expected_classes(dense, bq, bkv))
    np.testing.assert_array_equal(bm.block_classes(), bm.block_classes_from_columns())
    # Padding slots repeat the row's last index.
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_q_num_blocks, bm.full_q_indices)):
        for r in range(num.shape[-1]):
            n = int(num[0, 0, r])
            row = idx[0, 0, r]
            assert list(row[:n]) == sorted(set(row[:n].tolist()))
            assert (row[n:] == (row[n - 1] if n else 0)).all()


@given(problems())
def test_traced_builders_match_host(problem):
    q_len, kv_len, bq, bkv, mask = problem
    host = sj.create_block_mask(mask, None, None, q_len, kv_len, (bq, bkv))
    nq, nk = host.num_q_blocks, host.num_kv_blocks
    leaves, treedef = jax.tree_util.tree_flatten(mask)

    @jax.jit
    def traced(sel, *leaves):
        m = jax.tree_util.tree_unflatten(treedef, leaves)
        return sj.BlockMask.from_block_bool(sel, q_len, kv_len, (bq, bkv), m)

    bt = traced(jnp.ones((nq, nk), bool), *leaves)
    np.testing.assert_array_equal(np.asarray(bt.block_classes()), host.block_classes())
    np.testing.assert_array_equal(np.asarray(bt.block_classes_from_columns()), host.block_classes())
    assert bt.kv_indices.shape[-1] == nk and bt.q_indices.shape[-1] == nq  # static worst case


def test_traced_refine_keeps_block_zero():
    """Regression: the traced refine pads its list of ambiguous blocks with block 0; the padding
    must not scatter block 0's stale class over its refined one (found by hypothesis in CI)."""
    always = masks.FnMask(lambda b, h, q, k: (q + k) % 1 == 0)
    m = masks.or_masks(masks.causal, always)  # the causal diagonal is ambiguous until evaluated
    leaves, treedef = jax.tree_util.tree_flatten(m)
    build = jax.jit(lambda sel, *leaves: sj.BlockMask.from_block_bool(
        sel, 17, 17, 16, jax.tree_util.tree_unflatten(treedef, leaves)))
    traced = build(jnp.ones((2, 2), bool), *leaves)
    np.testing.assert_array_equal(np.asarray(traced.block_classes()), np.full((1, 1, 2, 2), T.FULL))
    host = sj.create_block_mask(m, None, None, 17, 17, 16)
    np.testing.assert_array_equal(np.asarray(traced.block_classes()), host.block_classes())


@given(st.integers(1, 200), st.integers(1, 200), BLOCKS, BLOCKS, st.data())
def test_from_block_bool_and_kv_blocks_roundtrip(q_len, kv_len, bq, bkv, data):
    nq, nk = -(-q_len // bq), -(-kv_len // bkv)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    sel = rng.random((2, 3, nq, nk)) < 0.4
    bm = sj.BlockMask.from_block_bool(sel, q_len, kv_len, (bq, bkv))
    np.testing.assert_array_equal(bm.block_classes(), np.where(sel, T.FULL, T.EMPTY))
    assert bm.shape == (2, 3, q_len, kv_len)
    back = sj.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                       q_len=q_len, kv_len=kv_len, block_size=(bq, bkv))
    np.testing.assert_array_equal(back.block_classes(), bm.block_classes())
    traced = jax.jit(lambda n, i, fn, fi: sj.BlockMask.from_kv_blocks(
        n, i, fn, fi, q_len=q_len, kv_len=kv_len, block_size=(bq, bkv)))(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    np.testing.assert_array_equal(np.asarray(traced.block_classes()), bm.block_classes())
    np.testing.assert_array_equal(np.asarray(traced.block_classes_from_columns()), bm.block_classes())


def test_from_block_bool_vmaps():
    sel = np.random.default_rng(0).random((4, 8, 8)) < 0.5

    def build(s):
        return sj.BlockMask.from_block_bool(s, 256, 256, 32, masks.causal).kv_num_blocks

    out = jax.vmap(build)(jnp.asarray(sel))
    host = np.stack([np.asarray(build(s)) for s in sel])
    np.testing.assert_array_equal(np.asarray(out), host)


def test_from_kv_blocks_duplicates_and_padding():
    num = np.array([[[3, 0]]], np.int32)
    idx = np.array([[[[2, 2, 0, 5], [7, 7, 7, 7]]]], np.int32)  # duplicate 2; slot past count ignored
    bm = sj.BlockMask.from_kv_blocks(num, idx, q_len=64, kv_len=128, block_size=32)
    np.testing.assert_array_equal(bm.block_classes()[0, 0], [[2, 0, 2, 0], [0, 0, 0, 0]])
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) == 2
    with pytest.raises(ValueError, match="outside"):
        sj.BlockMask.from_kv_blocks(np.array([[[1, 0]]], np.int32), np.array([[[[9], [0]]]], np.int32),
                                    q_len=64, kv_len=128, block_size=32)


def test_batch_and_head_dependent_masks():
    fn = lambda b, h, q, k: (q >= k) & ((k + b + h) % 3 != 0)
    bm = sj.create_block_mask(fn, 2, 3, 70, 90, (16, 32))
    assert bm.shape == (2, 3, 70, 90)
    dense = np.asarray(bm.to_dense())
    for b in range(2):
        for h in range(3):
            np.testing.assert_array_equal(dense[b, h], dense_of(fn, 70, 90, b, h))


def test_batched_document_ids_set_batch():
    ids = np.array([[0] * 40 + [1] * 60, [0] * 10 + [1] * 90], np.int32)
    bm = sj.create_block_mask(masks.and_masks(masks.document(ids), masks.causal), None, 1, 100, 100, 32)
    assert bm.shape[0] == 2
    dense = np.asarray(bm.to_dense())
    for b in range(2):
        exp = (ids[b][:, None] == ids[b][None, :]) & np.tri(100, dtype=bool)
        np.testing.assert_array_equal(dense[b, 0], exp)


def test_gqa_union():
    rng = np.random.default_rng(1)
    sel = rng.random((1, 8, 6, 6)) < 0.3
    bm = sj.BlockMask.from_block_bool(sel, 96, 96, 16, masks.causal)
    u = sj.gqa_union(bm, 2)
    assert u.shape[:2] == (1, 2)
    cls, ucls = bm.block_classes(), u.block_classes()
    for g in range(2):
        heads = cls[0, 4 * g:4 * g + 4]
        np.testing.assert_array_equal(ucls[0, g] > 0, (heads > 0).any(0))
        np.testing.assert_array_equal(ucls[0, g] == T.FULL, (heads == T.FULL).all(0))
    no_mask = sj.gqa_union(sj.BlockMask.from_block_bool(sel, 96, 96, 16), 4)
    np.testing.assert_array_equal(no_mask.block_classes()[0] == T.FULL, sel[0].reshape(4, 2, 6, 6).any(1))


def test_cache_returns_same_object():
    a = sj.create_block_mask(masks.sliding_window(64, causal=True), None, None, 1000, 1000, 64)
    b = sj.create_block_mask(masks.sliding_window(64, causal=True), None, None, 1000, 1000, 64)
    assert a is b


def test_large_causal_never_materialises_s_squared():
    bm = sj.create_block_mask(masks.causal, None, None, 131072, 131072, 128)
    assert bm.num_q_blocks == 1024 and bm.max_kv_blocks == 1 and bm.max_full_kv_blocks == 1023
    assert abs(bm.density - (1024 * 1025 / 2) / 1024**2) < 1e-9


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positive"):
        sj.create_block_mask(masks.causal, None, None, 64, 64, 0)
    with pytest.raises(ValueError, match="positive"):
        sj.create_block_mask(masks.causal, None, None, 64, 64, (32, -1))
    with pytest.raises(TypeError, match="four positional"):
        sj.create_block_mask(lambda q, k: q >= k, None, None, 64, 64, 32)
    with pytest.raises(ValueError, match="batch"):
        sj.create_block_mask(masks.document(np.zeros((3, 64), np.int32)), 2, None, 64, 64, 32)
    with pytest.raises(ValueError, match="segment ids"):
        sj.create_block_mask(masks.document(np.zeros((50,), np.int32)), None, None, 64, 64, 32)
    with pytest.raises(ValueError, match="too small"):
        sj.create_block_mask(masks.full, None, None, 64, 64, 32, max_full_kv_blocks=1)
    with pytest.raises(ValueError, match="block_bool"):
        sj.BlockMask.from_block_bool(np.ones((3, 3), bool), 64, 64, 32)
    with pytest.raises(ValueError, match="window"):
        masks.sliding_window(0)


def test_pytree_and_jit_boundary():
    ids = np.sort(np.random.default_rng(0).integers(0, 4, 128)).astype(np.int32)
    bm = sj.create_block_mask(masks.and_masks(masks.document(ids), masks.causal), None, None, 128, 128, 32)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert any(np.array_equal(np.asarray(l), ids) for l in leaves)  # segment ids are leaves
    out = jax.jit(lambda m: m)(bm)
    np.testing.assert_array_equal(np.asarray(out.kv_indices), bm.kv_indices)
    assert out.block_size == bm.block_size and out.q_len == 128


def test_repr_and_picture(tmp_path):
    bm = sj.create_block_mask(masks.causal, None, None, 256, 256, 64)
    text = repr(bm)
    assert "density" in text and "BlockMask" in text
    assert bm.to_string().splitlines() == ["+...", "#+..", "##+.", "###+"]
    bm.save_png(str(tmp_path / "mask.png"))
    assert (tmp_path / "mask.png").stat().st_size > 0
