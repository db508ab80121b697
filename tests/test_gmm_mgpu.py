"""The Mosaic GPU forward gmm (``pallas_kernels.mosaic_gpu.gmm_fwd``) and the padded MoE dispatch that
feeds it: the tile table against a numpy model, the refusal reasons, the dispatch rule, lowering for
cuda on any host (Pallas' GPU interpreter cannot run wgmma), the padded plan's invariants, the layer on
padded rows against the layer on unpadded rows, and on a Hopper GPU the compiled kernel against the
XLA reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.common import gmm_plan
from pallas_kernels.mosaic_gpu import dispatch as mgpu_dispatch
from pallas_kernels.mosaic_gpu import gmm_fwd, gmm_tiles
from pallas_kernels.triton import grouped_matmul as tgm
from sparse_jax import _compat, ops, reference
from sparse_jax.moe.dispatch import padded_rows, plan_dispatch
from sparse_jax.moe.layer import routed_experts

sd = jax.ShapeDtypeStruct
ENV = tgm.FWD_IMPL_ENV
hopper_only = pytest.mark.skipif(not mgpu_dispatch.hopper(), reason="needs a Hopper GPU (Mosaic GPU wgmma)")


# --- the tile table ---------------------------------------------------------------------------------
def _table_model(sizes, offset, M, G, tile_rows):
    """Rows of each tile as the kernel will write them, from plain Python: [(group, row0, rows, bad)]."""
    sizes = [max(int(s), 0) for s in sizes]
    cum = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), M)
    gt = len(sizes)
    lo, hi = cum[min(offset, gt)], cum[min(offset + G, gt)]
    segs = [(-1, 0, lo)] + [(j, cum[min(offset + j, gt)], cum[min(offset + j + 1, gt)]) for j in range(G)]
    segs.append((-1, hi, M))
    bad = any((a % 8) or ((b - a) % 8) for _, a, b in segs)
    if bad:
        return [(-1, r, min(tile_rows, M - r), 1) for r in range(0, M, tile_rows)]
    return [(g, r, min(tile_rows, b - r), 0) for g, a, b in segs for r in range(a, b, tile_rows)]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_tile_table_matches_model(data):
    g_total = data.draw(st.integers(1, 9))
    aligned = data.draw(st.booleans())
    unit = 8 if aligned else 1
    sizes = [unit * s for s in data.draw(st.lists(st.integers(-2, 40), min_size=g_total, max_size=g_total))]
    M = 8 * data.draw(st.integers(1, 60))
    G = data.draw(st.integers(1, g_total))
    offset = data.draw(st.integers(0, g_total))
    tile_rows = data.draw(st.sampled_from([128, 256]))
    table, count = gmm_tiles.tile_table(jnp.asarray(sizes, jnp.int32), jnp.int32(offset), num_rows=M, num_groups=G,
                                        tile_rows=tile_rows)
    table, count = np.asarray(table), int(count)
    assert table.shape == (4, gmm_tiles.max_tiles(M, G, tile_rows))
    got = [tuple(int(v) for v in table[:, t]) for t in range(count)]
    assert got == _table_model(sizes, offset, M, G, tile_rows)
    assert (table[gmm_tiles.ROWS, count:] == 0).all()
    # every row of [0, M) in exactly one tile
    cover = np.zeros(M, int)
    for _, r0, rows, _ in got:
        cover[r0:r0 + rows] += 1
    assert (cover == 1).all()


def test_tile_table_poisons_a_broken_promise():
    table, count = gmm_tiles.tile_table(jnp.asarray([16, 13, 19, 8], jnp.int32), None, num_rows=64, num_groups=4,
                                        tile_rows=128)
    assert int(count) == 1 and tuple(np.asarray(table[:, 0])) == (-1, 0, 64, 1)


# --- refusals and dispatch -----------------------------------------------------------------------
def _why(M=1024, K=512, N=768, G=8, dtype=jnp.bfloat16, fusion=gmm_plan.GMM, transpose_rhs=False, row_align=8,
         out=None):
    xs = (sd((M, K), dtype),)
    ws = (sd((G, K, N), dtype),) * fusion.num_rhs
    return gmm_fwd.unsupported(xs, ws, fusion=fusion, transpose_rhs=transpose_rhs,
                               out_dtypes=out or [dtype] * fusion.num_out, row_align=row_align)


def test_unsupported_names_each_reason():
    assert _why() is None
    assert _why(fusion=gmm_plan.SWIGLU_SAVE) is None
    assert "row_align" in _why(row_align=1)
    assert "fusion dual_gmm" in _why(fusion=gmm_plan.DUAL_GMM)
    assert "transpose_rhs" in _why(transpose_rhs=True)
    assert "dtype float32" in _why(dtype=jnp.float32)
    assert "output dtypes" in _why(out=[jnp.float32])
    assert "M=1020" in _why(M=1020)
    assert "multiples of 64" in _why(N=96)


def test_dispatch_rule(monkeypatch):
    pick = lambda fusion=gmm_plan.GMM, **kw: tgm.forward_impl(  # noqa: E731
        1024, 8, 512, 768, dtype=jnp.bfloat16, fusion=fusion, **{**dict(row_align=8), **kw})
    monkeypatch.setenv(ENV, "auto")
    assert pick() == pick(fusion=gmm_plan.SWIGLU) == "triton"  # opt-in: not run under auto
    assert pick(row_align=1) == "triton"
    assert pick(interpret=True) == "triton"
    assert tgm.preferred_row_alignment(jnp.bfloat16, 512, 768) == 1  # the layer keeps unpadded rows under auto
    monkeypatch.setenv(ENV, "mosaic_gpu")
    assert pick() == pick(fusion=gmm_plan.SWIGLU) == "mosaic_gpu"
    assert tgm.preferred_row_alignment(jnp.bfloat16, 512, 768) == 8
    assert tgm.fuse_swiglu(4096, 8, 512, 768, row_align=8)  # fused wherever Mosaic GPU runs it
    assert pick(row_align=1) == "triton"            # not built for these: no error under mosaic_gpu
    assert pick(transpose_rhs=True) == pick(fusion=gmm_plan.DUAL_GMM) == "triton"
    with pytest.raises(ValueError, match="cannot take K=512, N=96"):
        tgm.forward_impl(1024, 8, 512, 96, dtype=jnp.bfloat16, fusion=gmm_plan.GMM, row_align=8)
    monkeypatch.setenv(ENV, "triton")
    assert pick() == "triton"
    monkeypatch.setenv(ENV, "tpu")
    with pytest.raises(ValueError, match="choose auto, triton or mosaic_gpu"):
        pick()


def test_row_align_is_checked():
    x, w, gs = jnp.zeros((8, 4)), jnp.zeros((1, 4, 4)), jnp.asarray([8], jnp.int32)
    with pytest.raises(ValueError, match="row_align must be a positive"):
        ops.grouped_matmul(x, w, gs, row_align=0)
    with pytest.raises(ValueError, match="row_align must be a positive"):
        ops.grouped_swiglu(x, w, w, gs, row_align=2.0)


# --- lowering for cuda ---------------------------------------------------------------------------
@pytest.mark.parametrize("fusion,M,K,N,G,chunks,offset", [
    (gmm_plan.GMM, 1096, 512, 768, 6, 1, False), (gmm_plan.GMM, 1096, 512, 768, 6, 2, True),
    (gmm_plan.SWIGLU, 1024, 256, 384, 8, 2, False), (gmm_plan.SWIGLU_SAVE, 64, 256, 256, 4, 1, False),
    (gmm_plan.SWIGLU_SAVE, 64, 256, 256, 4, 2, True)])
def test_kernel_lowers_for_cuda(fusion, M, K, N, G, chunks, offset):
    def f(x, gs, *ws):
        with gmm_fwd.override(gmm_fwd.MgpuGmmConfig(chunks=chunks)):
            return gmm_fwd.forward((x,), ws, gs, jnp.int32(1) if offset else None, fusion=fusion)
    gt = G + 2 if offset else G
    exp = _compat.export(f, "cuda", sd((M, K), jnp.bfloat16), sd((gt,), jnp.int32),
                         *[sd((G, K, N), jnp.bfloat16)] * fusion.num_rhs)
    assert "mosaic_gpu" in exp.mlir_module()


def test_ops_lower_for_cuda_with_the_triton_backward(monkeypatch):
    """Under mosaic_gpu the forwards lower to Mosaic GPU and the VJPs to Triton (dual gmm, gmm_t)."""
    monkeypatch.setenv(ENV, "mosaic_gpu")
    M, K, F, G = 512, 256, 384, 4

    def loss(x, wg, wu, wd, gs):
        h = ops.grouped_swiglu(x, wg, wu, gs, row_align=8, backend="triton")
        return jnp.sum(ops.grouped_matmul(h, wd, gs, row_align=8, backend="triton").astype(jnp.float32))
    args = (sd((M, K), jnp.bfloat16), sd((G, K, F), jnp.bfloat16), sd((G, K, F), jnp.bfloat16),
            sd((G, F, K), jnp.bfloat16), sd((G,), jnp.int32))
    text = _compat.export(jax.grad(loss, argnums=(0, 1, 2, 3)), "cuda", *args).mlir_module()
    assert text.count("mosaic_gpu") >= 2 and "__gpu$xla.gpu.triton" in text


# --- the padded plan ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 9), k=st.integers(1, 3), align=st.sampled_from([2, 8]),
       cap=st.booleans(), seed=st.integers(0, 1000))
def test_padded_plan_invariants(T, E, k, align, cap, seed):
    k = min(k, E)
    ids = jax.random.randint(jax.random.key(seed), (T, k), 0, E)
    kept = jax.random.bernoulli(jax.random.key(seed + 1), 0.7, (T, k)) if cap else None
    n_rows = T * k if kept is None else max(int(np.asarray(kept).sum()), 1)
    p = plan_dispatch(ids, E, kept=kept, num_rows=None if kept is None else n_rows, row_align=align)
    gs = np.asarray(p.group_sizes)
    M = p.row_assign.shape[0]
    assert M == padded_rows(n_rows, E, align) and (gs % align == 0).all() and gs.sum() <= M
    valid = np.ones(T * k, bool) if kept is None else np.asarray(kept).reshape(-1)
    counts = np.bincount(np.asarray(ids).reshape(-1)[valid], minlength=E)
    assert (gs == -(-counts // align) * align).all()
    rows = np.asarray(p.assign_row)[valid]
    assert len(set(rows.tolist())) == rows.size                       # one row per kept assignment
    starts = np.concatenate([[0], np.cumsum(gs)[:-1]])
    e = np.asarray(ids).reshape(-1)[valid]
    assert ((rows >= starts[e]) & (rows < starts[e] + counts[e])).all()  # inside its expert's rows
    assert (np.asarray(p.row_assign)[rows] == np.flatnonzero(valid)).all()
    assert np.asarray(p.row_valid).sum() == valid.sum() and np.asarray(p.row_valid)[rows].all()


@pytest.mark.parametrize("backend,interpret", [("xla", False), ("triton", True)])
def test_layer_on_padded_rows_matches_unpadded(backend, interpret):
    """Same result and gradients (x, routing weights, every expert weight) with expert rows padded to 8."""
    T, D, F, E, k = 37, 64, 128, 5, 2
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    ws = tuple(jax.random.normal(kk, s) * 0.1 for kk, s in zip(ks[1:4], ((E, D, F), (E, D, F), (E, F, D))))
    ids = jax.random.randint(ks[4], (T, k), 0, E)
    w = jax.random.uniform(ks[5], (T, k))

    def loss(x, w, *ws, align):
        y = routed_experts(x, w, ids, *ws, row_align=align, backend=backend, interpret=interpret)
        return jnp.sum(y ** 2), y
    (_, y1), g1 = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, *ws, align=1)
    (_, y8), g8 = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, *ws, align=8)
    np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g8, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- compiled on Hopper --------------------------------------------------------------------------
def _aligned(seed, G, total, empty=()):
    rng = np.random.default_rng(seed)
    w = rng.random(G)
    w[list(empty)] = 0
    s = np.floor(w / w.sum() * (total // 8)).astype(int)
    s[np.argmax(w)] += total // 8 - s.sum()
    return jnp.asarray(s * 8, jnp.int32)


@hopper_only
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("case", ["tail_empty", "offset", "few_rows", "fp16"])
def test_compiled_gmm_matches_reference(monkeypatch, case, chunks):
    monkeypatch.setenv(ENV, "mosaic_gpu")
    M, K, N, G, dt, off = 1096, 512, 768, 6, jnp.bfloat16, None
    gs = _aligned(0, G, 1000, empty=(2,))
    if case == "offset":
        gs, off = _aligned(1, G + 3, 1000), jnp.int32(2)
    elif case == "few_rows":
        M, gs = 32, jnp.full((G,), 8, jnp.int32).at[4:].set(0)
    elif case == "fp16":
        dt = jnp.float16
    x = jax.random.normal(jax.random.key(1), (M, K), dt)
    w = (jax.random.normal(jax.random.key(2), (G, K, N)) * K ** -0.5).astype(dt)
    with gmm_fwd.override(gmm_fwd.MgpuGmmConfig(chunks=chunks)):
        out = jax.jit(lambda x, w: ops.grouped_matmul(x, w, gs, group_offset=off, row_align=8))(x, w)
    ref = reference.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), gs, group_offset=off)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


@hopper_only
def test_compiled_swiglu_and_its_vjp(monkeypatch):
    monkeypatch.setenv(ENV, "mosaic_gpu")
    M, K, F, G = 1096, 512, 384, 6
    gs = _aligned(3, G, 1040, empty=(4,))
    x = jax.random.normal(jax.random.key(3), (M, K), jnp.bfloat16)
    wg, wu = ((jax.random.normal(jax.random.key(i), (G, K, F)) * K ** -0.5).astype(jnp.bfloat16) for i in (4, 5))
    dh = jax.random.normal(jax.random.key(6), (M, F), jnp.bfloat16)
    h, vjp = jax.vjp(lambda *a: ops.grouped_swiglu(*a, gs, row_align=8), x, wg, wu)
    h_ref, vjp_ref = jax.vjp(lambda *a: reference.grouped_swiglu(*a, gs), *(a.astype(jnp.float32) for a in (x, wg, wu)))
    np.testing.assert_allclose(np.asarray(h, np.float32), h_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(vjp(dh), vjp_ref(dh.astype(jnp.float32))):
        # bf16 gradients summed over ~170 rows per group: a relative norm, not elementwise (H100: 3e-3)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


@hopper_only
def test_compiled_broken_promise_gives_nan(monkeypatch):
    monkeypatch.setenv(ENV, "mosaic_gpu")
    x = jnp.ones((64, 256), jnp.bfloat16)
    w = jnp.ones((4, 256, 256), jnp.bfloat16)
    out = ops.grouped_matmul(x, w, jnp.asarray([16, 13, 19, 8], jnp.int32), row_align=8)
    assert np.isnan(np.asarray(out, np.float32)).all()
