"""Tile schedules: every row covered exactly once, tiles inside one group, static bounds, on-device build.

GroupMetadata (the TPU kernels' per-slot schedule) and the GPU segment table
(``pallas_kernels.common.gmm_segments``: one schedule kernel, tiles decoded in the matmul).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.common import gmm_plan, gmm_segments
from sparse_jax.group_metadata import GroupMetadata, make_group_metadata


def _np_bounds(sizes, M, G=None, offset=0):
    sizes = np.maximum(np.asarray(sizes), 0)
    offs = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), M)
    G = len(sizes) if G is None else G
    idx = np.minimum(offset + np.arange(G + 1), len(sizes))
    return offs[idx[:-1]], offs[idx[1:]]


def _row_owner(starts, ends, M):
    owner = np.full(M, -1)
    for g, (s, e) in enumerate(zip(starts, ends)):
        owner[s:e] = g
    return owner


@functools.cache
def _builder(M, tm, G, align, with_offset, visit_empty):
    def build(sizes, off):
        return make_group_metadata(sizes, num_rows=M, tile_m=tm, num_groups=G, group_offset=off if with_offset else None,
                                   align=align, zero_fill=not visit_empty, visit_empty=visit_empty)
    return jax.jit(build)


def _tiles(meta: GroupMetadata):
    n = int(meta.num_tiles[0])
    arrs = [np.asarray(a) for a in (meta.tile_group, meta.tile_row, meta.tile_lo, meta.tile_hi)]
    return n, arrs


sizes_st = st.one_of(
    st.lists(st.integers(-2, 30), min_size=5, max_size=5),                      # random, some negative
    st.integers(0, 4).flatmap(lambda g: st.just([0] * g + [61] + [0] * (4 - g))),  # all rows in one group
    st.lists(st.sampled_from([0, 0, 1, 17]), min_size=5, max_size=5),            # many empty groups
    st.floats(1.0, 2.0).map(lambda a: [int(40 / (i + 1) ** a) for i in range(5)]),  # Zipf-skewed
)


@settings(max_examples=30, deadline=None)
@given(sizes=sizes_st, tm=st.sampled_from([4, 16]), align=st.sampled_from(["group", "tile"]),
       offset=st.sampled_from([None, 0, 2, 4]))
def test_forward_schedule_covers_every_row_once(sizes, tm, align, offset):
    M = 61
    G = 5 if offset is None else 3
    meta = _builder(M, tm, G, align, offset is not None, False)(jnp.asarray(sizes, jnp.int32), jnp.int32(offset or 0))
    starts, ends = _np_bounds(sizes, M, G, offset or 0)
    np.testing.assert_array_equal(meta.group_starts, starts)
    np.testing.assert_array_equal(meta.group_ends, ends)
    n, (grp, row, lo, hi) = _tiles(meta)
    assert n <= meta.max_tiles and meta.max_tiles == -(-M // tm) + G + 2
    owner = _row_owner(starts, ends, M)
    covered = np.zeros(M, int)
    for t in range(n):
        assert row[t] <= lo[t] <= hi[t] <= row[t] + tm
        covered[lo[t]:hi[t]] += 1
        assert np.all(owner[lo[t]:hi[t]] == grp[t]), (t, grp[t], owner[lo[t]:hi[t]])
        if align == "group":
            assert row[t] == lo[t]
        else:
            assert row[t] % tm == 0
    np.testing.assert_array_equal(covered, 1)
    if align == "tile":  # visits of one row block are consecutive (its output block stays resident)
        blocks = row[:n] // tm
        assert np.all(np.diff(blocks) >= 0)
    # idle slots: zero-fill group, empty range
    assert np.all(grp[n:] == -1) and np.all(hi[n:] == lo[n:])


@settings(max_examples=20, deadline=None)
@given(sizes=sizes_st, tm=st.sampled_from([4, 16]), align=st.sampled_from(["group", "tile"]))
def test_visit_empty_schedule_visits_every_group_in_order(sizes, tm, align):
    M = 61
    meta = _builder(M, tm, 5, align, False, True)(jnp.asarray(sizes, jnp.int32), jnp.int32(0))
    starts, ends = _np_bounds(sizes, M)
    n, (grp, row, lo, hi) = _tiles(meta)
    assert set(grp[:n]) == set(range(5))
    assert np.all(np.diff(grp[:n]) >= 0)
    covered = np.zeros(M, int)
    for t in range(n):
        covered[lo[t]:hi[t]] += 1
        assert starts[grp[t]] <= lo[t] <= hi[t] <= ends[grp[t]]
    np.testing.assert_array_equal(covered[: ends[-1]], 1)


def test_sum_past_rows_is_cut_and_negative_sizes_are_zero():
    meta = make_group_metadata(jnp.array([-5, 30, 50], jnp.int32), num_rows=64, tile_m=16)
    np.testing.assert_array_equal(meta.group_starts, [0, 0, 30])
    np.testing.assert_array_equal(meta.group_ends, [0, 30, 64])


def test_builds_under_jit_with_traced_sizes_and_offset():
    f = jax.jit(lambda s, o: make_group_metadata(s, num_rows=100, tile_m=32, num_groups=2, group_offset=o))
    meta = f(jnp.array([10, 20, 30, 40], jnp.int32), jnp.int32(1))
    np.testing.assert_array_equal(meta.group_starts, [10, 30])
    assert isinstance(meta, GroupMetadata) and meta.tile_m == 32 and meta.num_rows == 100
    leaves = jax.tree_util.tree_leaves(meta)
    assert len(leaves) == 7 and all(leaf.dtype == jnp.int32 for leaf in leaves)


def test_bad_group_sizes_raise():
    with pytest.raises(ValueError, match="int32"):
        make_group_metadata(jnp.array([1.0, 2.0]), num_rows=4, tile_m=2)
    with pytest.raises(ValueError, match="align"):
        make_group_metadata(jnp.array([1, 2], jnp.int32), num_rows=4, tile_m=2, align="rows")


@functools.cache
def _table_and_tiles(M, G, G_total, tm0, tm1, cost):
    """jit: (sizes, offset) -> (table, per-launch (group, first, end) of every slot t < max_tiles)."""
    split = None if tm1 is None else functools.partial(gmm_plan.split_rows, tm_big=tm0, tm_small=tm1, k=64, n=64,
                                                       num_rhs=1, itemsize=2, cost=cost)

    def build(sizes, off):
        table = gmm_segments.table_xla(sizes, off, num_rows=M, num_groups=G, tm0=tm0, tm1=tm1, split=split)
        out = []
        for launch, tm in ((0, tm0), (1, tm1 or tm0)):
            t = jnp.arange(gmm_segments.max_tiles(M, tm, G, launch), dtype=jnp.int32)
            out.append(jax.vmap(lambda t: gmm_segments.decode(t, launch=launch, tm=tm, num_rows=M,
                                                              row=lambda r: table[r], at=lambda r, i: table[r, i]))(t))
        return table, out
    return jax.jit(build)


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_st, offset=st.sampled_from([None, 0, 2, 4]),
       tiles=st.sampled_from([(16, None, 1e9), (16, 4, 1e3), (8, 2, 1e9)]))  # (tm0, tm1, weight GB/s of the model)
def test_segment_table_covers_every_row_once(sizes, offset, tiles):
    """Zero-fill tiles (launch 0) cover exactly the rows of no local group; every local row is in one
    tile of one launch, of its own group; tiles are group-aligned and at most tm rows; launch 0 takes
    whole groups or full big tiles; slot counts stay under the static bound."""
    M, (tm0, tm1, bw) = 61, tiles
    G = 5 if offset is None else 3
    cost = gmm_plan.CostModel(big_tflops=600.0, small_tflops=300.0, big_gbps=bw, small_gbps=bw)
    table, launches = _table_and_tiles(M, G, 5, tm0, tm1, cost)(jnp.asarray(sizes, jnp.int32), jnp.int32(offset or 0))
    table = np.asarray(table)
    W = gmm_segments.table_width(5)
    assert table.shape == (gmm_segments.NUM_ROWS, W)
    all_starts, all_ends = _np_bounds(sizes, M)
    np.testing.assert_array_equal(table[gmm_segments.START, :5], all_starts)
    np.testing.assert_array_equal(table[gmm_segments.END, :5], all_ends)
    starts, ends = _np_bounds(sizes, M, G, offset or 0)
    owner = _row_owner(starts, ends, M)
    sc = table[gmm_segments.SCALARS]
    counts = (sc[gmm_segments.TOTAL0], sc[gmm_segments.G1])
    covered = np.zeros(M, int)
    for launch, (tm, (grp, first, end)) in enumerate(zip((tm0, tm1 or tm0), launches)):
        n = int(counts[launch])
        assert n <= gmm_segments.max_tiles(M, tm, G, launch)
        grp, first, end = (np.asarray(a)[:n] for a in (grp, first, end))
        for g, f, e in zip(grp, first, end):
            assert 0 <= f <= e <= M and e - f <= tm, (launch, g, f, e)
            assert np.all(owner[f:e] == g), (launch, g, f, e, owner[f:e])
            covered[f:e] += 1
            if g >= 0:  # group-aligned: a tile starts a multiple of tm into its share of the group
                seg = table[gmm_segments.START if launch == 0 else gmm_segments.MID, (offset or 0) + g]
                assert (f - seg) % tm == 0
        if launch == 1:
            assert np.all(grp >= 0), "only launch 0 zero-fills"
    np.testing.assert_array_equal(covered, 1)
    if tm1 is not None:  # launch 0's share of a group: all of it or whole big tiles
        mid, st_ = table[gmm_segments.MID], table[gmm_segments.START]
        for g in range(G):
            h = (offset or 0) + g
            if h < 5:
                big = mid[h] - st_[h]
                assert big == ends[g] - starts[g] or big % tm0 == 0


def test_schedule_kernel_matches_xla_table():
    """The one-program Pallas-Triton schedule kernel (interpreted) writes the table XLA computes:
    G_total=9 padded to W=16, 5 local groups from offset 2, both launches."""
    from pallas_kernels.triton import gmm_table
    sizes, offset, G, (tm0, tm1) = [3, 0, 40, 1, 0, 70, 13, 10, 2], 2, 5, (32, 16)
    cost = gmm_plan.CostModel(big_tflops=600.0, small_tflops=500.0, big_gbps=1e9, small_gbps=1e9)
    split = functools.partial(gmm_plan.split_rows, tm_big=tm0, tm_small=tm1, k=4096, n=14336, num_rhs=1,
                              itemsize=2, cost=cost)
    gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(offset)
    kw = dict(num_rows=150, num_groups=G, tm0=tm0, tm1=tm1, split=split)
    got = jax.jit(lambda g, o: gmm_table.schedule_table(g, o, interpret=True, **kw))(gs, off)
    want = gmm_segments.table_xla(gs, off, **kw)
    np.testing.assert_array_equal(got, want)
    sc = np.asarray(want[gmm_segments.SCALARS])
    assert sc[gmm_segments.G0] > 0 and sc[gmm_segments.G1] > 0, "both launches must get tiles"


def test_split_rows_prefers_small_tiles_for_tails_when_they_are_cheap():
    starts, ends = jnp.array([0, 33], jnp.int32), jnp.array([33, 35], jnp.int32)
    cheap = gmm_plan.CostModel(big_tflops=600.0, small_tflops=500.0, big_gbps=1e9, small_gbps=1e9)
    split = gmm_plan.split_rows(starts, ends, tm_big=32, tm_small=16, k=64, n=64, num_rhs=1, itemsize=2, cost=cheap)
    np.testing.assert_array_equal(split, [32, 33])  # 32 + 16 rows beat 64; the 2-row group goes small
