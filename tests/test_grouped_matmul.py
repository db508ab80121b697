"""Grouped matmul kernels (gmm, transposed gmm, fused SwiGLU) vs the pure-jnp references.

Forward and every gradient, on fresh random inputs, for hypothesis-drawn group sizes
(empty groups, one group holding every row, Zipf skew, sums below and past M,
negative entries); shapes are not multiples of the tiles. Each (backend, op, dtype)
compiles once -- group sizes are traced data -- with small tiles forced through
``gmm_plan.override`` so a few dozen rows already span many tiles, K steps and
column blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import sparse_jax
from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Tiles, Tiling
from sparse_jax import _compat, reference
from tests.conftest import assert_close, randn, tolerance

# Per backend: rows, contraction, columns (none a tile multiple) and the forced tiles
# (GPU: 3 persistent programs, so each walks several work items).
SHAPES = {
    "triton": dict(M=50, K=40, N=24, fwd=Tiles(16, 16, 16, band=2, programs=3), t=Tiles(16, 16, 16, band=2)),
    "mosaic_tpu": dict(M=50, K=136, N=144, fwd=Tiles(16, 128, 128), t=Tiles(16, 128, 128)),
}
G = 4
# Each Mosaic-interpret example costs ~1 s of CPU (a Triton-interpret one ~0): few examples, with
# the strategy's edge cases (one group holds every row, all empty, sparse, Zipf) drawn often.
HYP = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HYP_FEW = settings(HYP, max_examples=3)


def _sizes(num_groups, M):
    return st.one_of(
        st.lists(st.integers(-2, 22), min_size=num_groups, max_size=num_groups),
        st.integers(0, num_groups - 1).map(lambda g: [M if i == g else 0 for i in range(num_groups)]),
        st.lists(st.sampled_from([0, 0, 3, 16]), min_size=num_groups, max_size=num_groups),
        st.just([int(M / (i + 1) ** 1.2 / 2.2) for i in range(num_groups)]),
        st.just([0] * num_groups),
    )


def _tiling(backend):
    s = SHAPES[backend]
    return Tiling(forward=s["fwd"], transposed=s["t"])


def _rows_of(sizes, M, G_local, offset):
    """bool [M]: rows owned by a local group."""
    sz = np.maximum(np.asarray(sizes), 0)
    offs = np.minimum(np.concatenate([[0], np.cumsum(sz)]), M)
    lo = offs[min(offset, len(sz))]
    hi = offs[min(offset + G_local, len(sz))]
    r = np.arange(M)
    return (r >= lo) & (r < hi)


def _f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


def _check(outs, refs, dtype, interpret, names):
    for o, r, name in zip(outs, refs, names):
        assert o.shape == r.shape, (name, o.shape, r.shape)
        assert_close(o, r, tolerance(dtype, interpret=interpret), name)


# --- grouped_matmul --------------------------------------------------------------------------------
@functools.cache
def _gmm_vjp(backend, interpret, transpose_rhs, with_offset, op="kernel"):
    def f(lhs, rhs, gs, off, ct):
        def fn(l, r):
            kw = dict(transpose_rhs=transpose_rhs, group_offset=off if with_offset else None)
            if op == "reference":
                return reference.grouped_matmul(l, r, gs, **kw)
            return sparse_jax.grouped_matmul(l, r, gs, backend=backend, interpret=interpret, **kw)
        with gmm_plan.override(_tiling(backend)):
            out, vjp = jax.vjp(fn, lhs, rhs)
            return (out, *vjp(ct.astype(out.dtype)))
    return jax.jit(f)


def _run_gmm(kernel_backend, dtype, transpose_rhs, sizes, seed, g_local=G, offset=None):
    backend, interpret = kernel_backend
    s = SHAPES[backend]
    M, K, N = s["M"], s["K"], s["N"]
    lhs = randn(seed, (M, K), dtype)
    rhs = randn(seed + 1, (g_local, N, K) if transpose_rhs else (g_local, K, N), dtype)
    ct = randn(seed + 2, (M, N))
    gs = jnp.asarray(sizes, jnp.int32)
    off = jnp.int32(offset or 0)
    got = _gmm_vjp(backend, interpret, transpose_rhs, offset is not None)(lhs, rhs, gs, off, ct)
    want = _gmm_vjp(backend, interpret, transpose_rhs, offset is not None, "reference")(*_f32(lhs, rhs), gs, off, ct)
    _check(got, want, dtype, interpret, ["out", "d lhs", "d rhs"])
    outside = ~_rows_of(sizes, M, g_local, offset or 0)
    assert np.all(np.asarray(got[0], np.float32)[outside] == 0), "rows of no local group must be exactly zero"
    assert np.all(np.asarray(got[1], np.float32)[outside] == 0), "their lhs gradient too"


@HYP
@given(sizes=_sizes(6, 50), offset=st.sampled_from([0, 2, 3, 5]), seed=st.integers(0, 1000))
def test_gmm_f32_group_offset(kernel_backend, sizes, offset, seed):
    """3 local groups of 6 (offset 5: one past G_total); rows of other groups are zeros."""
    _run_gmm(kernel_backend, jnp.float32, False, sizes, seed, g_local=3, offset=offset)


@HYP_FEW
@given(sizes=_sizes(G, 50), seed=st.integers(0, 1000))
def test_gmm_bf16_transpose_rhs(kernel_backend, sizes, seed):
    _run_gmm(kernel_backend, jnp.bfloat16, True, sizes, seed)


def test_gmm_float16_and_preferred_element_type(kernel_backend):
    backend, interpret = kernel_backend
    s = SHAPES[backend]
    lhs, rhs = randn(3, (s["M"], s["K"]), jnp.float16), randn(4, (G, s["K"], s["N"]), jnp.float16)
    gs = jnp.array([7, 0, 30, 9], jnp.int32)
    @jax.jit
    def fwd(lhs, rhs):
        with gmm_plan.override(_tiling(backend)):
            return sparse_jax.grouped_matmul(lhs, rhs, gs, preferred_element_type=jnp.float32, backend=backend,
                                             interpret=interpret)
    out = fwd(lhs, rhs)
    assert out.dtype == jnp.float32
    assert_close(out, reference.grouped_matmul(*_f32(lhs, rhs), gs), tolerance(jnp.float16, interpret=interpret))


# --- grouped_matmul_t ------------------------------------------------------------------------------
@functools.cache
def _tgmm_vjp(backend, interpret, op="kernel"):
    def f(lhs, grad, gs, off, ct):
        def fn(l, g):
            kw = dict(num_groups=3, group_offset=off)
            if op == "reference":
                return reference.grouped_matmul_t(l, g, gs, **kw)
            return sparse_jax.grouped_matmul_t(l, g, gs, backend=backend, interpret=interpret, **kw)
        with gmm_plan.override(_tiling(backend)):
            out, vjp = jax.vjp(fn, lhs, grad)
            return (out, *vjp(ct))
    return jax.jit(f)


@HYP_FEW
@given(sizes=_sizes(5, 50), offset=st.sampled_from([0, 2, 4]), seed=st.integers(0, 1000))
def test_gmm_t(kernel_backend, sizes, offset, seed):
    backend, interpret = kernel_backend
    s = SHAPES[backend]
    M, K, N = s["M"], s["K"], s["N"]
    lhs, grad, ct = randn(seed, (M, K)), randn(seed + 1, (M, N)), randn(seed + 2, (3, K, N))
    gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(offset)
    got = _tgmm_vjp(backend, interpret)(lhs, grad, gs, off, ct)
    want = _tgmm_vjp(backend, interpret, "reference")(lhs, grad, gs, off, ct)
    _check(got, want, jnp.float32, interpret, ["out", "d lhs", "d grad"])
    sz = np.maximum(np.asarray(sizes), 0)
    offs = np.minimum(np.concatenate([[0], np.cumsum(sz)]), M)
    for g in range(3):
        gg = min(offset + g, len(sz))
        if gg >= len(sz) or offs[gg + 1] == offs[gg]:
            assert np.all(np.asarray(got[0][g]) == 0), f"empty group {g} must give an exactly zero gradient"


# --- grouped_swiglu --------------------------------------------------------------------------------
@functools.cache
def _swiglu_vjp(backend, interpret, op="kernel", fused=None):
    def f(x, wg, wu, gs, off, ct):
        def fn(x, wg, wu):
            if op == "reference":
                return reference.grouped_swiglu(x, wg, wu, gs, group_offset=off)
            return sparse_jax.grouped_swiglu(x, wg, wu, gs, group_offset=off, fused=fused, backend=backend,
                                             interpret=interpret)
        with gmm_plan.override(_tiling(backend)):
            out, vjp = jax.vjp(fn, x, wg, wu)
            return (out, *vjp(ct.astype(out.dtype)))
    return jax.jit(f)


@HYP_FEW
@given(sizes=_sizes(5, 50), offset=st.sampled_from([0, 1]), seed=st.integers(0, 1000))
def test_swiglu(kernel_backend, sizes, offset, seed):
    backend, interpret = kernel_backend
    s = SHAPES[backend]
    M, K, F = s["M"], s["K"], s["N"]
    x, wg, wu = randn(seed, (M, K)), randn(seed + 1, (4, K, F), scale=0.3), randn(seed + 2, (4, K, F), scale=0.3)
    ct = randn(seed + 3, (M, F))
    gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(offset)
    got = _swiglu_vjp(backend, interpret)(x, wg, wu, gs, off, ct)
    want = _swiglu_vjp(backend, interpret, "reference")(x, wg, wu, gs, off, ct)
    _check(got, want, jnp.float32, interpret, ["out", "d x", "d w_gate", "d w_up"])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_gmm"])
def test_swiglu_bf16(kernel_backend, fused):
    """Both forwards (forced; the default picks one by shape) and their shared backward."""
    backend, interpret = kernel_backend
    s = SHAPES[backend]
    M, K, F = s["M"], s["K"], s["N"]
    x, wg, wu = (randn(i, shp, jnp.bfloat16, scale=sc) for i, shp, sc in
                 ((5, (M, K), 1.0), (6, (4, K, F), 0.3), (7, (4, K, F), 0.3)))
    gs = jnp.array([11, 0, 25, 6, 0], jnp.int32)
    ct = randn(8, (M, F))
    got = _swiglu_vjp(backend, interpret, fused=fused)(x, wg, wu, gs, jnp.int32(1), ct)
    want = _swiglu_vjp(backend, interpret, "reference")(*_f32(x, wg, wu), gs, jnp.int32(1), ct)
    _check(got, want, jnp.bfloat16, interpret, ["out", "d x", "d w_gate", "d w_up"])


def test_swiglu_fusion_rule():
    """GPU default path at the measured H100 points (notes, round 2): fused only where it won."""
    from pallas_kernels.triton.grouped_matmul import fuse_swiglu
    assert fuse_swiglu(512, 8, 4096, 14336)          # Mixtral M=512: fused 0.683 vs 0.710 ms
    assert not fuse_swiglu(4096, 8, 4096, 14336)     # Mixtral M=4096: 1.905 vs 1.798
    assert not fuse_swiglu(512, 256, 7168, 2048)     # DeepSeek M=512: 5.115 vs 4.991
    assert not fuse_swiglu(4096, 64, 3584, 2560)     # Qwen2 M=4096: 0.863 vs 0.866 (tie)


def test_gpu_tile_rules():
    """Shipped GPU tile choices at the measured points (notes: round 3 of the MoE layer)."""
    from pallas_kernels.common.gmm_plan import GMM, SWIGLU
    from pallas_kernels.triton import gmm as kern
    from pallas_kernels.triton import grouped_matmul as gm
    tiles, policy, _ = gm.forward_tiles(GMM, 2, num_rows=1024, num_groups=8)  # Mixtral T=512: one big-tile row
    assert (tiles, policy) == ((kern.BIG,), "big")
    tiles, policy, _ = gm.forward_tiles(GMM, 2, num_rows=512, num_groups=8)   # Mixtral M=512: split, wide small tile
    assert policy == "split" and tiles == (kern.BIG, kern.SMALL_WIDE)
    assert gm.forward_tiles(GMM, 2, num_rows=4096, num_groups=8)[1] == "split"
    assert gm.forward_tiles(SWIGLU, 2, num_rows=1024, num_groups=8)[1] == "split"  # the fused kernel keeps the split
    # few rows: 64-column strips where 128 would leave SMs idle, never 32
    assert gm.narrow_for_parallelism(kern.SMALL, 4, 64, 3584, 132).tn == 64     # Qwen2 down, T=1
    assert gm.narrow_for_parallelism(kern.SMALL, 2, 8, 4096, 132).tn == 64      # Mixtral down, T=1
    assert gm.narrow_for_parallelism(kern.SMALL, 1024, 8, 14336, 132).tn == 128  # plenty of items
    assert all(gm.narrow_for_parallelism(kern.SMALL, m, 256, 2048, 132).tn >= 64 for m in (1, 8, 64, 256))
    # the narrowing reaches the launch's small tile through forward_tiles (Mixtral down at T=1)
    assert gm.forward_tiles(GMM, 2, num_rows=2, num_groups=8, n=4096)[0][1].tn == 64


def test_one_tile_row_rule_matches_reference(kernel_backend):
    """No override, 65-128 rows per group: the big-tiles-only path (bf16, odd group sizes)."""
    backend, interpret = kernel_backend
    lhs, rhs = randn(11, (300, 48), jnp.bfloat16), randn(12, (3, 48, 40), jnp.bfloat16)
    gs = jnp.array([130, 70, 100], jnp.int32)  # 100 rows per group on average
    out = jax.jit(lambda l, r, g: sparse_jax.grouped_matmul(l, r, g, backend=backend, interpret=interpret))(lhs, rhs, gs)
    assert_close(out, reference.grouped_matmul(*_f32(lhs, rhs), gs), tolerance(jnp.bfloat16, interpret=interpret))


def test_swiglu_default_path_lowers_to_its_kernels():
    """The rule reaches the lowering: fused = one forward launch after the schedule, two gmm = two pairs."""
    S = jax.ShapeDtypeStruct

    def launches(M, F):
        fn = lambda x, a, b, g: sparse_jax.grouped_swiglu(x, a, b, g, backend="triton")  # noqa: E731
        text = _compat.export(fn, "cuda", S((M, 64), jnp.bfloat16), S((8, 64, F), jnp.bfloat16),
                              S((8, 64, F), jnp.bfloat16), S((8,), jnp.int32)).mlir_module()
        return text.count("__gpu$xla.gpu.triton")
    assert launches(256, 8192) == 3   # 32 rows per group, F >= 8192: schedule + big + small
    assert launches(256, 1024) == 6   # narrow F: (schedule + big + small) per gmm


def test_swiglu_weight_gradients_split_at_few_rows():
    """Few rows per group: one weight-gradient launch per operand (a shared launch spilled and ran
    2.5x slower per byte on the H100); many rows: dW_gate and dW_up share one launch."""
    S = jax.ShapeDtypeStruct

    def tgmm_launches(M):
        def fn(x, a, b, g, ct):
            _, pull = jax.vjp(lambda x, a, b: sparse_jax.grouped_swiglu(x, a, b, g, backend="triton"), x, a, b)
            return pull(ct)
        text = _compat.export(fn, "cuda", S((M, 64), jnp.bfloat16), S((8, 64, 256), jnp.bfloat16),
                              S((8, 64, 256), jnp.bfloat16), S((8,), jnp.int32),
                              S((M, 256), jnp.bfloat16)).mlir_module()
        return text.count("tgmm_1_"), text.count("tgmm_2_")
    few, many = tgmm_launches(8 * 32), tgmm_launches(8 * 128)
    assert few[0] > 0 and few[1] == 0 and many[0] == 0 and many[1] > 0, (few, many)


# --- split last wave (GPU) -------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(items=st.integers(0, 2000), programs=st.integers(1, 200), nk=st.integers(1, 400))
def test_last_wave_split_schedule(items, programs, nk):
    """Every item's K steps run exactly once: whole items in full waves, leftover items as pieces."""
    from pallas_kernels.triton.gmm import MAX_PIECES, SPLIT_MAX_BUSY, SPLIT_MIN_GAIN, last_wave_split
    s = int(last_wave_split(jnp.int32(items), programs, nk))
    assert 1 <= s <= min(MAX_PIECES, nk)
    rem = items % programs
    if s == 1:
        return
    assert items > programs and 0 < rem <= SPLIT_MAX_BUSY * programs  # only a partial last wave, not too full
    assert rem * s <= programs  # one wave of pieces
    chunk = -(-nk // s)
    assert chunk <= SPLIT_MIN_GAIN * nk
    cover = np.zeros((rem, nk), np.int32)
    for q in range(rem * s):  # the kernel's piece q: item q % rem, K steps [j chunk, (j + 1) chunk)
        j = q // rem
        cover[q % rem, j * chunk:min(nk, (j + 1) * chunk)] += 1
    assert np.all(cover == 1)


def test_last_wave_split_cases():
    """Mixtral T = 512 on 132 SMs: uniform router 176 down items (224 K steps), 616 gate items (64 K
    steps); 8 x 128 rows: 448 gate items."""
    from pallas_kernels.triton.gmm import last_wave_split
    assert int(last_wave_split(176, 132, 224)) == 3    # 44 leftover -> 132 pieces of 75 steps
    assert int(last_wave_split(616, 132, 64)) == 1     # 88 leftover already saturate HBM (measured: split lost)
    assert int(last_wave_split(448, 132, 64)) == 2     # 52 leftover -> 104 pieces of 32 steps (not 260 of 13)
    assert int(last_wave_split(128, 132, 224)) == 1    # one partial wave only: the weight-streaming regime
    assert int(last_wave_split(264, 132, 224)) == 1    # full waves
    assert int(last_wave_split(256, 132, 32)) == 1     # 124 leftover: no s wins


def _leftover_groups(table, programs: int, *, tm: int, M: int, nt: int, nk: int, band: int):
    """Local group (-1: zero fill) of each item of a launch-0 schedule's split leftover, as the
    Triton forward orders its items ([] when it does not split)."""
    from pallas_kernels.common import gmm_segments
    from pallas_kernels.triton import gmm as gmm_kernel
    active = int(table[gmm_segments.SCALARS, gmm_segments.TOTAL0])
    items = active * nt
    if int(gmm_kernel.last_wave_split(items, programs, nk)) == 1:
        return []
    groups = []
    for w in range(items // programs * programs, items):
        t, _ = gmm_kernel.swizzle(jnp.int32(w), active, nt, gmm_kernel.row_band(jnp.int32(active), band))
        g, _, _ = gmm_segments.decode(t, launch=0, tm=tm, num_rows=M, row=lambda r: table[r], at=lambda r, i: table[r, i])
        groups.append(int(g))
    return groups


@pytest.mark.parametrize("op,programs,sizes", [("gmm_offset", 7, [19, 25, 8, 17, 22]),
                                               ("swiglu_fused", 5, [25, 12, 10, 18, 7])])
def test_split_last_wave_matches_reference(kernel_backend, op, programs, sizes, monkeypatch):
    """Sizes chosen so the leftover wave is split and holds computed items (checked on the schedule
    table) and, with a group offset, zero-fill items of other experts' rows; forward and gradients."""
    backend, interpret = kernel_backend
    if backend != "triton":
        pytest.skip("the GPU forward's schedule")
    from pallas_kernels.common import gmm_segments
    from pallas_kernels.triton import gmm as gmm_kernel
    monkeypatch.setattr(gmm_kernel, "FIXUP_ROWS", 8)  # two row slices per 16-row tile
    M, K, N = 70, 72, 40
    tiles = Tiles(16, 16, 16, band=2, programs=programs)  # nk = 5, nt = 3
    offset = 1 if op == "gmm_offset" else 0
    table = gmm_segments.table_xla(jnp.asarray(sizes), offset, num_rows=M, num_groups=3 if offset else 5, tm0=16)
    left = _leftover_groups(table, programs, tm=16, M=M, nt=3, nk=5, band=2)
    assert any(g >= 0 for g in left), left  # the pieces of a computed item are summed by the fixup
    assert any(g < 0 for g in left) or not offset, left  # and the fixup zero-fills
    gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(offset)
    tiling = Tiling(forward=tiles, transposed=SHAPES["triton"]["t"], policy="big")
    if op == "gmm_offset":
        lhs, rhs, ct = randn(1, (M, K)), randn(2, (3, K, N)), randn(3, (M, N))

        def fn(kernel, l, r):
            if kernel:
                return sparse_jax.grouped_matmul(l, r, gs, group_offset=off, backend=backend, interpret=interpret)
            return reference.grouped_matmul(l, r, gs, group_offset=off)
        args = (lhs, rhs)
    else:
        x, wg, wu, ct = randn(4, (M, K)), randn(5, (5, K, N), scale=0.3), randn(6, (5, K, N), scale=0.3), randn(7, (M, N))

        def fn(kernel, x, wg, wu):
            if kernel:
                return sparse_jax.grouped_swiglu(x, wg, wu, gs, fused=True, backend=backend, interpret=interpret)
            return reference.grouped_swiglu(x, wg, wu, gs)
        args = (x, wg, wu)

    @functools.partial(jax.jit, static_argnums=0)
    def fwd_bwd(kernel, ct, *a):
        with gmm_plan.override(tiling):
            out, vjp = jax.vjp(functools.partial(fn, kernel), *a)
            return (out, *vjp(ct))
    got, want = fwd_bwd(True, ct, *args), fwd_bwd(False, ct, *args)
    _check(got, want, jnp.float32, interpret, ["out"] + [f"d arg{i}" for i in range(len(args))])
    if op == "gmm_offset":
        outside = ~_rows_of(sizes, M, 3, offset)
        assert np.all(np.asarray(got[0])[outside] == 0), "zero-fill rows of the leftover wave"


def test_split_last_wave_lowers_with_fixup():
    """Mixtral's down projection at T = 512 lowers to the matmul launch plus its fixup launch."""
    S = jax.ShapeDtypeStruct
    fn = lambda x, w, g: sparse_jax.grouped_matmul(x, w, g, backend="triton")  # noqa: E731
    text = _compat.export(fn, "cuda", S((1024, 14336), jnp.bfloat16), S((8, 14336, 4096), jnp.bfloat16),
                          S((8,), jnp.int32)).mlir_module()
    assert text.count("gmm_gmm_fixup") >= 1 and text.count("__gpu$xla.gpu.triton") == 3


# --- adaptive tile height --------------------------------------------------------------------------
def test_adaptive_tiles_match_reference(kernel_backend):
    """GPU: rows split between a big- and a small-tile launch; TPU: lax.switch over tile heights."""
    backend, interpret = kernel_backend
    s = SHAPES[backend]
    M, K, N = 70, s["K"], s["N"]
    if backend == "triton":
        # one program per tile slot for the big launch, a 2-program persistent small launch
        tiles = (Tiles(32, 16, 16, band=2, occupancy=0), Tiles(16, 16, 16, band=2, programs=2))
        cost = gmm_plan.CostModel(big_tflops=600.0, small_tflops=500.0, big_gbps=1e9, small_gbps=1e9)
    else:
        tiles, cost = (Tiles(16, 128, 128), Tiles(32, 128, 128)), None
    lhs, rhs, ct = randn(1, (M, K)), randn(2, (G, K, N)), randn(3, (M, N))
    gs = jnp.array([33, 0, 20, 3], jnp.int32)  # 33 = 32 + 1: a big tile plus a small tail
    if backend == "triton":
        from sparse_jax.group_metadata import local_group_bounds
        st_, en = local_group_bounds(gs, M)
        split = gmm_plan.split_rows(st_, en, tm_big=32, tm_small=16, k=K, n=N, num_rhs=1, itemsize=4, cost=cost)
        assert int(split[0]) == 32, "the test must exercise both launches"

    def fn(l, r):
        return sparse_jax.grouped_matmul(l, r, gs, backend=backend, interpret=interpret)

    @jax.jit
    def fwd_bwd(lhs, rhs, ct):
        with gmm_plan.override(Tiling(forward=tiles, transposed=s["t"], cost=cost)):
            out, vjp = jax.vjp(fn, lhs, rhs)
            return (out, *vjp(ct))
    got = fwd_bwd(lhs, rhs, ct)
    ref, rvjp = jax.vjp(lambda l, r: reference.grouped_matmul(l, r, gs), lhs, rhs)
    _check(got, (ref, *rvjp(ct)), jnp.float32, interpret, ["out", "d lhs", "d rhs"])


def test_default_tiles_small_problem(kernel_backend):
    """No override: the shipped tile choice, on a problem far smaller than its tiles."""
    backend, interpret = kernel_backend
    lhs, rhs = randn(9, (37, 48), jnp.bfloat16), randn(10, (3, 48, 40), jnp.bfloat16)
    gs = jnp.array([5, 30, 1], jnp.int32)
    out = jax.jit(lambda l, r, g: sparse_jax.grouped_matmul(l, r, g, backend=backend, interpret=interpret))(lhs, rhs, gs)
    assert_close(out, reference.grouped_matmul(*_f32(lhs, rhs), gs), tolerance(jnp.bfloat16, interpret=interpret))


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu", "xla"])
def test_bad_input_raises_at_trace_time(backend):
    lhs, rhs = jnp.zeros((8, 16)), jnp.zeros((2, 16, 4))
    gs = jnp.array([4, 4], jnp.int32)
    gmm = functools.partial(sparse_jax.grouped_matmul, backend=backend, interpret=True)
    with pytest.raises(ValueError, match="entries"):
        gmm(lhs, rhs, jnp.array([4, 2, 2], jnp.int32))
    with pytest.raises(ValueError, match="int32"):
        gmm(lhs, rhs, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match="int32"):
        gmm(lhs, rhs, gs.astype(jnp.int16))
    with pytest.raises(ValueError, match="contracting"):
        gmm(lhs, jnp.zeros((2, 12, 4)), gs)
    with pytest.raises(ValueError, match="contracting"):
        gmm(lhs, rhs, gs, transpose_rhs=True)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        gmm(lhs.astype(jnp.int32), rhs, gs)
    with pytest.raises(ValueError, match="scalar"):
        gmm(lhs, rhs, gs, group_offset=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="at least"):
        gmm(lhs, jnp.zeros((3, 16, 4)), gs, group_offset=0)
    with pytest.raises(ValueError, match="same rows"):
        sparse_jax.grouped_matmul_t(lhs, jnp.zeros((7, 4)), gs, backend=backend)
    with pytest.raises(ValueError, match="disagree on K"):
        sparse_jax.grouped_swiglu(lhs, jnp.zeros((2, 12, 4)), jnp.zeros((2, 12, 4)), gs, backend=backend)
    with pytest.raises(ValueError, match="must match"):
        sparse_jax.grouped_swiglu(lhs, rhs, jnp.zeros((2, 16, 5)), gs, backend=backend)


def test_degenerate_shapes():
    out = sparse_jax.grouped_matmul(jnp.zeros((0, 8)), jnp.ones((2, 8, 4)), jnp.array([0, 0], jnp.int32),
                                    backend="triton", interpret=True)
    assert out.shape == (0, 4)
    dw = sparse_jax.grouped_matmul_t(jnp.ones((5, 8)), jnp.ones((5, 4)), jnp.array([2, 3], jnp.int32), num_groups=0,
                                     backend="triton", interpret=True)
    assert dw.shape == (0, 8, 4)


# --- lowering for absent platforms -----------------------------------------------------------------
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_export_lowers_forward_and_backward(platform):
    """Full-size Mixtral-like bf16 shapes lower (Pallas -> Triton IR / Mosaic) with the default tiles."""
    backend = "triton" if platform == "cuda" else "mosaic_tpu"
    M, K, F, E = 512, 1024, 1536, 8
    S = jax.ShapeDtypeStruct

    def loss(x, wg, wu, wd, gs):
        h = sparse_jax.grouped_swiglu(x, wg, wu, gs, backend=backend)
        return jnp.sum(sparse_jax.grouped_matmul(h, wd, gs, backend=backend).astype(jnp.float32))

    args = (S((M, K), jnp.bfloat16), S((E, K, F), jnp.bfloat16), S((E, K, F), jnp.bfloat16),
            S((E, F, K), jnp.bfloat16), S((E,), jnp.int32))
    exp = _compat.export(jax.grad(loss, argnums=(0, 1, 2, 3)), platform, *args)
    text = exp.mlir_module()
    assert text.count("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") >= 5


def test_gpu_forward_lowers_to_kernel_launches_only():
    """The schedule is one kernel: no XLA op (cumsum, search, gather) runs before the matmul launches."""
    import collections
    import re
    S = jax.ShapeDtypeStruct

    def fwd(x, w, gs):
        return sparse_jax.grouped_matmul(x, w, gs, backend="triton")
    text = _compat.export(fwd, "cuda", S((256, 64), jnp.bfloat16), S((8, 64, 128), jnp.bfloat16),
                          S((8,), jnp.int32)).mlir_module()
    ops = collections.Counter(re.findall(r'= "?([a-z_]+\.[a-z_]+)', text))
    assert ops.pop("stablehlo.custom_call") == 3, ops  # schedule kernel + big-tile + small-tile launches
    assert set(ops) <= {"stablehlo.constant", "stablehlo.broadcast_in_dim", "sdy.sharding_constraint"}, ops

