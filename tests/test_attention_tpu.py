"""TPU (Mosaic) block-sparse attention: kernels vs the reference and JAX's splash attention,
Mosaic lowering of every kernel, the coarse tile tables, BlockMask.coarsen and the tile chooser.

On the CPU the kernels run in TPU interpret mode with race detection and NaN-filled
memory (``_compat.tpu_interpret_params``); on a TPU they are compiled. The op-level
case list shared with the GPU kernels lives in ``test_block_sparse_attention.py``;
this file covers what is specific to the TPU lowering: tiles spanning several
logical blocks (aligned and not), per-query-head tables under GQA, the folded
``[B, S, H*D]`` layout, decode shapes, splash parity and lowering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sparse_jax as sj
from pallas_kernels.common import coarse_tables as CT
from pallas_kernels.tpu import configs
from sparse_jax import _block_tables as T
from sparse_jax import _compat, masks
from tests.test_block_sparse_attention import check

ON_TPU = jax.default_backend() == "tpu"


@pytest.fixture(autouse=True)
def _interpret_on_the_host():
    """Off a TPU, TPU interpret mode runs on the CPU device even on a GPU machine (there, the
    interpreter's and splash's float32 dots would otherwise run in tf32)."""
    if ON_TPU:
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield
KB = ("mosaic_tpu", not ON_TPU)


def _inputs(seed, B, Sq, Skv, Hq, Hkv, D, dtype, Dv=None):
    keys = jax.random.split(jax.random.key(seed), 4)
    Dv = D if Dv is None else Dv
    shapes = [(B, Sq, Hq, D), (B, Skv, Hkv, D), (B, Skv, Hkv, Dv), (B, Sq, Hq, Dv)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


# -- kernels vs the reference ---------------------------------------------------------------------
def test_aligned_coarse_tiles_window_ragged_f32():
    """64-blocks in 128 x 256 tiles: sub-blocks of every class inside one tile, ragged ends."""
    S = 350
    q, k, v, do = _inputs(0, 1, S, S, 2, 1, 128, jnp.float32)
    bm = sj.create_block_mask(masks.sliding_window(150, causal=True), None, None, S, S, block_size=64)
    with configs.override(block_q=128, block_kv=256):
        check(KB, q, k, v, do, bm)


def test_unaligned_tiles_documents_gqa2_bf16():
    """96-blocks in 128-tiles (tiles start inside blocks), packed documents + causal, GQA 2."""
    S = 300
    ids = np.sort(np.random.default_rng(0).integers(0, 4, S)).astype(np.int32)
    m = masks.and_masks(masks.document(ids), masks.causal)
    q, k, v, do = _inputs(1, 1, S, S, 4, 2, 128, jnp.bfloat16)
    bm = sj.create_block_mask(m, None, None, S, S, block_size=96)
    with configs.override(block_q=128, block_kv=128):
        check(KB, q, k, v, do, bm)


def test_per_query_head_tables_gqa4_coarse():
    """H = Hq = 4 over one kv head: a different random selection per query head (some rows
    empty for some heads), causal inside; 64-blocks coarsened to 128 tiles, one K/V fetch per group."""
    S = 256
    rng = np.random.default_rng(1)
    sel = rng.random((1, 4, 4, 4)) < 0.45
    sel[:, 1, 2] = False  # query head 1 has nothing in block row 2
    bm = sj.BlockMask.from_block_bool(sel, S, S, block_size=64, mask_fn=masks.causal)
    q, k, v, do = _inputs(2, 1, S, S, 4, 1, 128, jnp.float32)
    with configs.override(block_q=128, block_kv=128):
        check(KB, q, k, v, do, bm)


def test_positions_segments_and_dead_rows():
    """Permuted layout (mask on positions), explicit segment ids also masking full blocks,
    rows whose every key is masked: o = 0, lse = -inf, dq = 0."""
    S = 256
    rng = np.random.default_rng(2)
    perm = rng.permutation(S).astype(np.int32)
    seg = rng.integers(0, 3, S).astype(np.int32)

    def fn(b, h, q, kv):
        return (q % 5 != 2) & (kv <= q)

    bm = sj.BlockMask.from_block_bool(np.ones((2, 2), bool), S, S, block_size=128, mask_fn=fn, classify=False)
    q, k, v, do = _inputs(3, 1, S, S, 2, 1, 128, jnp.float32)
    o, lse, g = check(KB, q, k, v, do, bm, q_positions=perm, kv_positions=perm, segment_ids=seg)
    dead = perm % 5 == 2
    assert np.all(np.asarray(o)[:, dead] == 0)
    assert np.all(np.isneginf(lse[:, :, dead]))
    assert np.all(np.asarray(g[0])[:, dead] == 0)


def test_decode_gqa8_softcap_bf16():
    """8 new queries against a 300-key cache, 8 query heads per kv head, softcap."""
    Sq, Skv = 8, 300
    bm = sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv, block_size=(8, 128))
    q, k, v, do = _inputs(4, 1, Sq, Skv, 8, 1, 128, jnp.bfloat16)
    check(KB, q, k, v, do, bm, softcap=10.0)


# -- parity with JAX's splash attention -----------------------------------------------------------
def _splash():
    from jax.experimental.pallas.ops.tpu import splash_attention as sp
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as spm
    return sp, spm


SPLASH_CASES = {
    "causal": (lambda spm, S: spm.CausalMask((S, S)), masks.causal),
    "local": (lambda spm, S: spm.LocalMask((S, S), (100, 0), 0), masks.sliding_window(101, causal=True)),
    "chunked": (lambda spm, S: spm.ChunkedCausalMask((S, S), 96), masks.chunked(96, causal=True)),
}


@pytest.mark.parametrize("name", list(SPLASH_CASES))
def test_matches_splash_attention(name):
    """Same o as splash attention (no logit scale, [H, S, D] layout there) on the masks it has;
    gradients too for the causal mask."""
    sp, spm = _splash()
    S, H, D = 256, 2, 128
    q, k, v, do = (x[0].swapaxes(0, 1) for x in _inputs(5, 1, S, S, H, H, D, jnp.float32))  # [H, S, D]
    make, ours = SPLASH_CASES[name]
    blocks = sp.BlockSizes(block_q=128, block_kv=128, block_q_dkv=128, block_kv_dkv=128, block_q_dq=128,
                           block_kv_dq=128)
    splash = sp.make_splash_mha_single_device(spm.MultiHeadMask([make(spm, S)] * H), block_sizes=blocks,
                                              interpret=not ON_TPU)
    bm = sj.create_block_mask(ours, None, None, S, S, 128)

    def mine(q, k, v):
        o = sj.block_sparse_attention(*(x.swapaxes(0, 1)[None] for x in (q, k, v)), bm, scale=1.0,
                                      backend="mosaic_tpu", interpret=not ON_TPU)
        return o[0].swapaxes(0, 1)

    if name != "causal":
        np.testing.assert_allclose(jax.jit(mine)(q, k, v), jax.jit(splash)(q, k, v), atol=2e-5, rtol=0)
        return
    o1, vjp1 = jax.vjp(mine, q, k, v)
    o2, vjp2 = jax.vjp(splash, q, k, v)
    np.testing.assert_allclose(o1, o2, atol=2e-5, rtol=0)
    for a, b in zip(vjp1(do), vjp2(do)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


# -- Mosaic lowering (no TPU needed) --------------------------------------------------------------
LOWERING_CASES = {
    "folded_bf16_gqa4_window": dict(S=1024, Hq=8, Hkv=2, D=128, dtype=jnp.bfloat16, block=128,
                                    mask=masks.sliding_window(300, causal=True), kw={}),
    "head_major_f32_segments_positions_softcap": dict(S=640, Hq=2, Hkv=2, D=64, dtype=jnp.float32, block=64,
                                                      mask=masks.causal, kw=dict(softcap=30.0, segments=True,
                                                                                 positions=True)),
    "per_head_tables_unaligned": dict(S=500, Hq=4, Hkv=1, D=128, dtype=jnp.bfloat16, block=96, mask=None,
                                      kw=dict(per_head=True)),
    "decode": dict(S=None, Hq=8, Hkv=1, D=128, dtype=jnp.bfloat16, block=(16, 128), mask=masks.full, kw={}),
}


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_kernels_lower_for_tpu(name):
    """Forward, dQ and dK/dV lower to Mosaic (jax.export for 'tpu', no TPU attached)."""
    c = LOWERING_CASES[name]
    kw = dict(c["kw"])
    Sq = Skv = c["S"]
    if Sq is None:
        Sq, Skv = 1, 777
    if kw.pop("per_head", False):
        sel = np.random.default_rng(0).random((1, c["Hq"], -(-Sq // c["block"]), -(-Skv // c["block"]))) < 0.5
        bm = sj.BlockMask.from_block_bool(sel, Sq, Skv, block_size=c["block"], mask_fn=masks.causal)
    else:
        bm = sj.create_block_mask(c["mask"], None, None, Sq, Skv, c["block"])
    B = 2
    extra = {}
    if kw.pop("segments", False):
        extra["segment_ids"] = jnp.zeros((B, Sq), jnp.int32)
    if kw.pop("positions", False):
        extra["q_positions"] = extra["kv_positions"] = jnp.zeros((B, Sq), jnp.int32)

    def loss(q, k, v):
        o = sj.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu", **extra, **kw)
        return jnp.sum(o.astype(jnp.float32))

    sd = jax.ShapeDtypeStruct
    args = (sd((B, Sq, c["Hq"], c["D"]), c["dtype"]), sd((B, Skv, c["Hkv"], c["D"]), c["dtype"]),
            sd((B, Skv, c["Hkv"], c["D"]), c["dtype"]))
    text = _compat.export(jax.value_and_grad(loss, argnums=(0, 1, 2)), "tpu", *args).mlir_module()
    for kernel in ("fwd", "dq", "dkv"):
        assert f"sparse_jax_block_sparse_attention_{kernel}_tpu" in text, kernel


# -- coarse tables ----------------------------------------------------------------------------
def _decode_element_classes(tables: CT.SlotTables, coarse: CT.Coarse, B: int, Hq: int, Hkv: int, transpose: bool):
    """Element-level classes [B, Hq, Sq, Skv] that the kernel derives from the slot tables."""
    Sq, Skv = coarse.q.length, coarse.kv.length
    out = np.zeros((B, Hq, Sq, Skv), np.int8)
    G = Hq // Hkv
    idx = np.asarray(tables.index).reshape(tables.batch, tables.heads, tables.rows, tables.slots)
    cnt = np.asarray(tables.count).reshape(tables.batch, tables.heads, tables.rows)
    words = np.asarray(tables.words).reshape(tables.batch, tables.heads, tables.rows, tables.slots, -1)
    words = words.view(np.uint32)
    for b in range(B):
        for h in range(Hkv):
            bt, ht = min(b, tables.batch - 1), min(h, tables.heads - 1)
            for r in range(tables.rows):
                for s in range(cnt[bt, ht, r]):
                    other = idx[bt, ht, r, s]
                    qt, kt = (other, r) if transpose else (r, other)
                    for g in range(G):
                        field = g if tables.head_fields > 1 else 0
                        for a in range(coarse.q.n_sub):
                            for c in range(coarse.kv.n_sub):
                                w, shift = coarse.sub_word_and_shift(a, c)
                                x = words[bt, ht, r, s, field * coarse.words_per_head + w]
                                cls = (int(x) >> shift) & 3
                                qi = coarse.q.first(qt) + a
                                ki = coarse.kv.first(kt) + c
                                if qi > coarse.q.last(qt) or ki > coarse.kv.last(kt):
                                    continue  # a sub-block slot this tile does not overlap
                                q0, q1 = max(qi * coarse.q.block, qt * coarse.q.tile), min(
                                    (qi + 1) * coarse.q.block, (qt + 1) * coarse.q.tile, Sq)
                                k0, k1 = max(ki * coarse.kv.block, kt * coarse.kv.tile), min(
                                    (ki + 1) * coarse.kv.block, (kt + 1) * coarse.kv.tile, Skv)
                                out[b, h * G + g, q0:q1, k0:k1] = cls
    return out


def _fine_element_classes(bm: sj.BlockMask, B: int, Hq: int):
    cls = np.asarray(bm.block_classes())
    bq, bkv = bm.block_size
    e = np.repeat(np.repeat(cls, bq, 2), bkv, 3)[:, :, :bm.q_len, :bm.kv_len]
    return np.broadcast_to(np.repeat(e, Hq // e.shape[1], 1) if e.shape[1] not in (1, Hq) else e,
                           (B, Hq, bm.q_len, bm.kv_len))


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_coarse_tables_exact_per_element(data):
    """Slot tables decode to exactly the fine tables' per-element classes, for aligned and
    unaligned tiles, every head layout (H = 1 / Hkv / Hq), rows and columns, host and traced."""
    Sq = data.draw(st.integers(1, 260), "Sq")
    Skv = data.draw(st.integers(1, 260), "Skv")
    bq = data.draw(st.sampled_from([16, 32, 48, 64, 100, 128]), "bq")
    bkv = data.draw(st.sampled_from([32, 64, 96, 128, 200]), "bkv")
    tq = data.draw(st.sampled_from([128, 256]), "tile_q")
    tk = data.draw(st.sampled_from([128, 256, 384]), "tile_kv")
    Hkv, G = data.draw(st.sampled_from([(1, 1), (2, 1), (1, 4), (2, 2)]), "heads")
    Hq = Hkv * G
    H = data.draw(st.sampled_from(sorted({1, Hkv, Hq})), "table_heads")
    B = data.draw(st.sampled_from([1, 2]), "B")
    nq, nk = -(-Sq // bq), -(-Skv // bkv)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), "seed"))
    sel = rng.random((B, H, nq, nk)) < data.draw(st.sampled_from([0.1, 0.5, 0.9]), "density")
    bm = sj.BlockMask.from_block_bool(sel, Sq, Skv, block_size=(bq, bkv),
                                      mask_fn=masks.causal if data.draw(st.booleans(), "mask") else None)
    coarse = CT.Coarse.make(tq, tk, (bq, bkv), Sq, Skv)
    want = _fine_element_classes(bm, B, Hq)
    transpose = data.draw(st.booleans(), "transpose")
    host = CT.build(bm, coarse, num_q_heads=Hq, num_kv_heads=Hkv, transpose=transpose)
    np.testing.assert_array_equal(_decode_element_classes(host, coarse, B, Hq, Hkv, transpose), want)
    if data.draw(st.booleans(), "traced"):
        def arrays(m):
            t = CT.build(m, coarse, num_q_heads=Hq, num_kv_heads=Hkv, transpose=transpose)
            return t.index, t.count, t.words

        index, count, words = jax.jit(arrays)(bm)
        meta = CT.build(jax.tree_util.tree_map(jnp.asarray, bm), coarse, num_q_heads=Hq, num_kv_heads=Hkv,
                        transpose=transpose)
        traced = CT.SlotTables(index, count, words, *[getattr(meta, f) for f in (
            "batch", "heads", "rows", "slots", "head_fields", "words_per_head")])
        np.testing.assert_array_equal(_decode_element_classes(traced, coarse, B, Hq, Hkv, transpose), want)


def test_empty_rows_repeat_previous_index():
    """A tile row with nothing to do points at the previous row's last tile (no new DMA)."""
    sel = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1]], bool)
    bm = sj.BlockMask.from_block_bool(sel, 384, 384, block_size=128)
    t = CT.build(bm, CT.Coarse.make(128, 128, (128, 128), 384, 384), num_q_heads=1, num_kv_heads=1,
                 transpose=False)
    np.testing.assert_array_equal(t.count, [2, 0, 1])
    np.testing.assert_array_equal(t.index.reshape(3, 2), [[0, 1], [1, 1], [2, 2]])


# -- BlockMask.coarsen ----------------------------------------------------------------------------
@st.composite
def _masks(draw, S):
    kind = draw(st.sampled_from(["causal", "window", "chunked", "prefix", "doc"]))
    if kind == "causal":
        return masks.causal
    if kind == "window":
        return masks.sliding_window(draw(st.integers(1, 150)), causal=draw(st.booleans()))
    if kind == "chunked":
        return masks.chunked(draw(st.integers(1, 100)), causal=draw(st.booleans()))
    if kind == "prefix":
        return masks.prefix_lm(draw(st.integers(0, S)))
    ids = np.sort(np.random.default_rng(draw(st.integers(0, 99))).integers(0, 4, S)).astype(np.int32)
    return masks.and_masks(masks.document(ids), masks.causal)


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_coarsen_keeps_allowed_pairs(data):
    S = data.draw(st.integers(8, 200), "S")
    block = data.draw(st.sampled_from([8, 16, 24, 32]), "block")
    fq, fk = data.draw(st.integers(1, 4), "fq"), data.draw(st.integers(1, 4), "fk")
    m = data.draw(_masks(S), "mask")
    bm = sj.create_block_mask(m, None, None, S, S, block)
    cm = bm.coarsen((block * fq, block * fk))
    assert cm.block_size == (block * fq, block * fk)
    np.testing.assert_array_equal(np.asarray(cm.to_dense()), np.asarray(bm.to_dense()))
    # the class rule: FULL iff every (valid) sub-block is full, PARTIAL iff some is non-empty
    fine = np.asarray(bm.block_classes())[0, 0]
    coarse = np.asarray(cm.block_classes())[0, 0]
    for i in range(coarse.shape[0]):
        for j in range(coarse.shape[1]):
            sub = fine[i * fq:(i + 1) * fq, j * fk:(j + 1) * fk]
            want = T.FULL if (sub == T.FULL).all() else (T.PARTIAL if (sub != T.EMPTY).any() else T.EMPTY)
            assert coarse[i, j] == want, (i, j, sub)
    np.testing.assert_array_equal(cm.block_classes(), cm.block_classes_from_columns())
    if data.draw(st.booleans(), "traced"):
        traced = jax.jit(lambda b: b.coarsen((block * fq, block * fk)).block_classes())(bm)
        np.testing.assert_array_equal(np.asarray(traced), cm.block_classes())


def test_coarsen_refuses_inexact_tables():
    sel = np.eye(4, dtype=bool)
    plain = sj.BlockMask.from_block_bool(sel, 128, 128, block_size=32)
    with pytest.raises(ValueError, match="mixes selected and unselected"):
        plain.coarsen(64)
    assert plain.coarsen(32) is plain
    narrowed = sj.BlockMask.from_block_bool(np.tril(np.ones((4, 4), bool)) & ~np.eye(4, k=-1, dtype=bool),
                                            128, 128, block_size=32, mask_fn=masks.causal)
    with pytest.raises(ValueError, match="exactly"):
        narrowed.coarsen(64)
    with pytest.raises(ValueError, match="multiple"):
        plain.coarsen(48)
    full = sj.BlockMask.from_block_bool(np.ones((4, 4), bool), 128, 128, block_size=32)
    assert np.all(np.asarray(full.coarsen(128).block_classes()) == T.FULL)


# -- tile choice, config, errors ------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(logical=st.integers(1, 700), length=st.integers(1, 20000), gen=st.sampled_from(["v5e", "v6e"]),
       group=st.sampled_from([1, 2, 8]), kind=st.sampled_from(["fwd", "dq", "dkv"]))
def test_tile_choice(logical, length, gen, group, kind):
    with configs.override(generation=gen):
        t = configs.choose_tiles(kind, logical=(logical, logical), q_len=length, kv_len=length, group=group,
                                 head_dim=128, head_dim_v=128, itemsize=2)
    for tile in (t.block_q, t.block_kv):
        assert tile % 128 == 0 and tile >= 128
        if logical % 128 == 0 or 128 % logical == 0:  # aligned: a static sub-block pattern per tile
            assert tile % logical == 0 or logical % tile == 0
        assert tile <= max(2048, 2 * length + 1152)
    assert t.vmem_limit_bytes is None or t.vmem_limit_bytes <= configs.CHIPS[gen].vmem_bytes


def test_generation_from_device_kind():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert configs.generation(Dev("TPU v5 lite")) == "v5e"
    assert configs.generation(Dev("TPU v5p")) == "v5p"
    assert configs.generation(Dev("TPU v6 lite")) == "v6e"
    assert configs.generation(Dev("TPU v4")) == "v4"


def test_clear_errors():
    S = 128
    bm = sj.create_block_mask(masks.causal, None, None, S, S, 64)
    q, k, v, _ = _inputs(6, 1, S, S, 2, 1, 128, jnp.float16)
    with pytest.raises(ValueError, match="float16"):
        sj.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu", interpret=True)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    with pytest.raises(ValueError, match="kv_permutation"):
        sj.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu", kv_permutation=np.arange(S))
    tiny = sj.create_block_mask(masks.causal, None, None, S, S, 4)
    with configs.override(block_q=128, block_kv=128), pytest.raises(ValueError, match="too fine"):
        sj.block_sparse_attention(q, k, v, tiny, backend="mosaic_tpu", interpret=True)
    with configs.override(block_q=100), pytest.raises(ValueError, match="multiple of 128"):
        sj.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu", interpret=True)


# -- cost model and tile search -------------------------------------------------------------------
def test_tile_search_follows_the_mask():
    """The search keeps big tiles for dense structure and shrinks them for fine random sparsity,
    and its choice is never costlier than the defaults under the same model."""
    from pallas_kernels.tpu import cost_model
    S = 4096
    shape = cost_model.Shape(1, 8, 2, 128, 128, 2)
    dense = sj.create_block_mask(masks.full, None, None, S, S, 128)
    sel = np.random.default_rng(0).random((1, 1, 32, 32)) < 0.05
    sparse = sj.BlockMask.from_block_bool(sel, S, S, block_size=128)
    for gen in ("v5e", "v6e"):
        c_dense, _, cost_dense = cost_model.search("fwd", dense, shape, gen, max_subs=256)
        c_sparse, t_sparse, cost_sparse = cost_model.search("fwd", sparse, shape, gen, max_subs=256)
        assert c_dense.tile_q * c_dense.tile_kv > c_sparse.tile_q * c_sparse.tile_kv
        assert cost_dense.bound == "mxu" and cost_sparse.computed_pairs < cost_dense.computed_pairs / 5
        with configs.override(generation=gen):
            t = configs.choose_tiles("fwd", logical=(128, 128), q_len=S, kv_len=S, group=4, head_dim=128,
                                     head_dim_v=128, itemsize=2)
        co = CT.Coarse.make(t.block_q, t.block_kv, (128, 128), S, S)
        default = cost_model.pass_cost("fwd", CT.build(sparse, co, num_q_heads=8, num_kv_heads=2, transpose=False),
                                       co, shape, gen)
        assert cost_sparse.total_s <= default.total_s


def test_roofline_model_case():
    from benchmarks import roofline_tpu
    case = roofline_tpu.Case("causal", masks.causal, 2048, Hq=8, Hkv=2)
    m = roofline_tpu.model(case, "v5e", "fwd")
    assert m["bound"] in ("mxu", "vpu", "eup", "hbm")
    assert 0.5 <= m["density"] <= 0.75  # causal computes about half the pairs (plus the diagonal tiles)
    assert 0 < m["frac_peak"] <= 1 and m["model_ms"] > m["mxu_ms"]
    assert m["useful_flops"] == pytest.approx(8 * 2048 * 2049 / 2 * 4 * 128, rel=1e-6)
