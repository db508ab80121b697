"""GroupMetadata: every row covered exactly once, tiles inside one group, static bounds, on-device build."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.common import gmm_plan
from sparse_jax.group_metadata import GroupMetadata, local_group_bounds, make_group_metadata, metadata_from_rows


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


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_st, bw=st.sampled_from([1e3, 1e9]), small=st.sampled_from([100.0, 600.0]))
def test_split_rows_partitions_each_group(sizes, bw, small):
    """Big-tile share: whole group, or full big tiles; the small-tile kernel gets the rest."""
    M, tb, ts = 61, 16, 4
    starts, ends = local_group_bounds(jnp.asarray(sizes, jnp.int32), M)
    cost = gmm_plan.CostModel(big_tflops=600.0, small_tflops=small, big_gbps=bw, small_gbps=bw)
    split = np.asarray(gmm_plan.split_rows(starts, ends, tm_big=tb, tm_small=ts, k=64, n=64, num_rhs=1, itemsize=2,
                                           cost=cost))
    starts, ends = np.asarray(starts), np.asarray(ends)
    assert np.all((starts <= split) & (split <= ends))
    big = split - starts
    assert np.all((big == ends - starts) | (big % tb == 0))
    # the two schedules together cover each row once
    covered = np.zeros(M, int)
    for rs, re, tm, zero in ((starts, split, tb, True), (split, ends, ts, False)):
        meta = metadata_from_rows(jnp.asarray(starts), jnp.asarray(ends), num_rows=M, tile_m=tm, align="group",
                                  zero_fill=zero, visit_empty=False, rows_start=jnp.asarray(rs),
                                  rows_end=jnp.asarray(re))
        n, (_, _, lo, hi) = _tiles(meta)
        for t in range(n):
            covered[lo[t]:hi[t]] += 1
    np.testing.assert_array_equal(covered, 1)


def test_split_rows_prefers_small_tiles_for_tails_when_they_are_cheap():
    starts, ends = jnp.array([0, 33], jnp.int32), jnp.array([33, 35], jnp.int32)
    cheap = gmm_plan.CostModel(big_tflops=600.0, small_tflops=500.0, big_gbps=1e9, small_gbps=1e9)
    split = gmm_plan.split_rows(starts, ends, tm_big=32, tm_small=16, k=64, n=64, num_rhs=1, itemsize=2, cost=cheap)
    np.testing.assert_array_equal(split, [32, 33])  # 32 + 16 rows beat 64; the 2-row group goes small
