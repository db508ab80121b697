"""Grouped forward matmul kernels (gmm, dual gmm, fused SwiGLU) lowered through Pallas-Triton.

Work items are (row tile, tn-column block). Row tiles come from the segment table of
:mod:`pallas_kernels.common.gmm_segments` (built by ``gmm_table.schedule_table``): a program
decodes tile t with one compare-and-count over the table's [W] cumulative tile counts and
two scalar loads -- there is no per-slot schedule array and no XLA work before the launch.
The launch is persistent: ``occupancy`` programs per SM each walk the *active* items
``pid, pid + P, ...`` (a dynamic-trip-count loop), so a static worst-case tile count costs
nothing -- with one program per slot a DeepSeek-size schedule would launch ~20k programs
that only find they have no work (about 1 us of SM time each). Items are ordered in bands
of ``band`` row tiles per column block (one band of all of them when they are few,
:func:`row_band`), so the tiles of one group stream the same weight block through L2
together. Row tiles are group-aligned (a tile never straddles groups; stores are
row-masked); zero-fill tiles (launch 0 only) write the rows of no local group.
The K loop is an ``scf.for`` Triton software-pipelines with ``num_stages`` buffers.

Split last wave: when the active items fill some waves of P programs and leave a partial
one, the leftover items are cut along K into pieces (:func:`last_wave_split`, decided in the
kernel from the table): every program takes part in the last wave instead of a few running
whole items while the rest idle. Pieces write float32 partial tiles to a workspace; a second,
small launch (:func:`_fixup`) sums each item's pieces in piece order (deterministic), applies
the epilogue and stores the tile.

Shapes: lhs[i] [M, K] (all one dtype), rhs[j] [G, K, N] ([G, N, K] with
``transpose_rhs``), outputs [M, N]; float32 accumulation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import gmm_plan, gmm_segments
from pallas_kernels.common.gmm_plan import Fusion, Tiles
from sparse_jax import _compat

# Defaults for an H100 (benchmarks/notes/grouped_matmul.md, round 2): big tiles for full,
# compute-bound row tiles (575 TFLOP/s Mixtral M=4096; also the best transpose_rhs tile, 621);
# small tiles for the tails of groups and whole small groups (weight streaming): SMALL for
# few rows per group (DeepSeek M=512, 2 rows: 3033 GB/s, every candidate within 2%), SMALL_WIDE
# from 64 rows per group (Mixtral M=512: 0.340 ms vs 0.369 for SMALL, one tile per group).
# SMALL keeps one K loop: with the split's second loop ptxas spilled its 32-row mma.sync kernels
# (4 bytes for gmm, 16 for the dual gmm; benchmarks/gmm_compile_check.py, round 11).
BIG = Tiles(tm=128, tn=256, tk=64, num_warps=8, num_stages=3, band=8)
SMALL = Tiles(tm=32, tn=128, tk=128, num_warps=4, num_stages=4, band=8, split_last_wave=False)
SMALL_WIDE = Tiles(tm=64, tn=256, tk=64, num_warps=8, num_stages=3, band=8)

# All active row tiles form one band up to ONE_BAND_ROWS x band (row_band). H100 round 11 profiles,
# Mixtral T = 512, uniform router (11 row tiles; group 6's two tiles fell into different bands of 8):
# gate projection 393 -> 363 us, down 367 -> 345, fused SwiGLU 793 -> 737 (GPU time per launch).
ONE_BAND_ROWS = 2

# Split the last wave (module docstring). H100 round 11 (benchmarks/notes/grouped_matmul.md):
# Mixtral's down projection at T = 512 took 0.343 ms over 8 groups of 128 rows (128 items on 132
# programs, one wave) and 0.460 ms over the uniform router's 8 groups of 112-152 rows (176 items:
# one wave and 44 items that each stream 7 MB of weights at one SM's rate).
# Profiles (GPU time of the matmul launch + fixup, split vs not, bands of 8): down 365 + 6 vs 430 us (44 items
# left over: 44 SMs cannot draw the HBM bandwidth, one SM streams ~36 GB/s of the ~3 TB/s); the gate
# projection over the same groups 401 + 8 vs 391 us (88 left over: they already saturate HBM, and
# the pieces' partial tiles add 34 MB of traffic) -- hence SPLIT_MAX_BUSY.
SPLIT_LAST_WAVE = True
MAX_PIECES = 8  # pieces per leftover item
SPLIT_MIN_GAIN = 0.75  # split only if the leftover wave's K steps drop to this fraction or less
SPLIT_MAX_BUSY = 0.6  # ... and only if the leftover items occupy at most this fraction of the programs
# Rows per fixup program. H100 round 11: one program per leftover 128x256 tile (8 warps, a K-piece
# loop) took 46 us to sum 104 pieces (13.6 MB) -- a few SMs each waiting on 128 KB loads one after
# the other; row slices give ~8x the programs and issue every piece's load at once.
FIXUP_ROWS = 16


def swizzle(pid, rows, cols: int, band):
    """Program id -> (row tile, column block): column-major inside bands of ``band`` row tiles."""
    per_band = band * cols
    first = (pid // per_band) * band
    height = jnp.minimum(rows - first, band)
    r = pid % per_band
    return first + r % height, r // height


def row_band(active, band: int):
    """The band of a forward launch with ``active`` row tiles (traced): all of them up to
    ONE_BAND_ROWS x band, so every tile of a group streams a column block together (with two
    bands, a group whose tiles straddle their boundary streams its weights twice)."""
    one = (active <= ONE_BAND_ROWS * band).astype(jnp.int32)
    return one * jnp.maximum(active, 1) + (1 - one) * band


def last_wave_split(items, programs: int, nk: int):
    """Pieces per leftover item (1: no split) for ``items`` work items on ``programs`` programs.

    int32 scalar (traced in the kernels; concrete in tests). Splits only when at least one
    full wave runs (fewer items than programs is the weight-streaming regime, left as is) and
    a partial one of at most SPLIT_MAX_BUSY x programs items is left (more saturate HBM on their
    own); among s = 2..MAX_PIECES with one wave of pieces (R s <= P), the s with the fewest K
    steps per piece, ceil(nk / s), if it cuts the leftover's nk steps to SPLIT_MIN_GAIN or
    less; ties go to the smaller s (fewer partial tiles to write and sum). Two waves of more,
    shorter pieces lost on the H100: 8 x 128-row gate items, 260 pieces of 13 steps 356 us +
    16 us of fixup, 104 of 32 steps 350 + 7.
    """
    rem = items % programs
    eligible = (items > programs) & (rem > 0) & (rem <= int(SPLIT_MAX_BUSY * programs))
    best_s, best = jnp.int32(1), jnp.int32(nk)
    for s in range(2, min(MAX_PIECES, nk) + 1):
        steps = gmm_plan.cdiv(nk, s)
        ok = eligible & (rem * s <= programs) & (steps < best)
        best_s, best = jnp.where(ok, s, best_s), jnp.where(ok, steps, best)
    return jnp.where(best <= int(SPLIT_MIN_GAIN * nk), best_s, 1).astype(jnp.int32)


def num_sms() -> int:
    """Streaming multiprocessors of the GPU (an H100's 132 when lowering without one)."""
    if _compat.has_platform("gpu"):
        return int(getattr(jax.devices("gpu")[0], "core_count", 132) or 132)
    return 132


def _block_dims(k: int, n: int, tiles: Tiles) -> tuple[int, int]:
    return gmm_plan.pow2_block(n, tiles.tn), gmm_plan.pow2_block(k, tiles.tk)


class _Geometry(NamedTuple):
    """Static shapes of one launch, shared by the main kernel and the fixup."""
    M: int
    K: int
    N: int
    tm: int
    tn: int
    tk: int
    nt: int
    nk: int
    W: int
    band: int
    launch: int

    @property
    def clamp_rows(self) -> bool:
        return self.M >= self.tm


class _Item(NamedTuple):
    """A block of rows [row0, row0 + height) x one column block of a work item."""
    g: jax.Array  # local group, -1: zero fill
    lo: jax.Array  # rows [lo, hi) are this item's
    hi: jax.Array
    nb: jax.Array  # column block
    row0: jax.Array  # first row of the block it loads and stores
    cols: jax.Array  # int32 [tn]
    out_mask: jax.Array  # bool [height, tn]
    rows_ds: object
    cols_ds: object


def _block(g, lo, hi, nb, row0, height: int, geo: _Geometry) -> _Item:
    rows = row0 + lax.broadcasted_iota(jnp.int32, (height,), 0)
    row_ok = (rows >= lo) & (rows < hi)
    cols = nb * geo.tn + lax.broadcasted_iota(jnp.int32, (geo.tn,), 0)
    if geo.N % geo.tn:
        out_mask = row_ok[:, None] & (cols < geo.N)[None, :]
    else:
        out_mask = jnp.broadcast_to(row_ok[:, None], (height, geo.tn))
    return _Item(g, lo, hi, nb, row0, cols, out_mask, pl.ds(row0, height), pl.ds(nb * geo.tn, geo.tn))


def _item(tab_ref, w, active, geo: _Geometry) -> _Item:
    """Work item number ``w`` (< active * nt) -> its group and its [tm] x [tn] block."""
    t, nb = swizzle(w, active, geo.nt, row_band(active, geo.band))
    g, lo, hi = gmm_segments.decode(t, launch=geo.launch, tm=geo.tm, num_rows=geo.M,
                                    row=lambda r: tab_ref[r, pl.ds(0, geo.W)], at=lambda r, i: tab_ref[r, i])
    row0 = lo
    if geo.clamp_rows:
        # Keep the row block inside lhs, so its loads need no row mask: the rows outside
        # [lo, hi) it reads belong to other groups and are never stored (row i of the
        # product depends on row i of lhs only). Saves registers in the K loop.
        row0 = jnp.minimum(row0, geo.M - geo.tm)
    return _block(g, lo, hi, nb, row0, geo.tm, geo)


def _store_tile(o_refs, it: _Item, fusion: Fusion, accs):
    """Epilogue of the float32 accumulators, stored to the block's rows and columns."""
    for o_ref, val in zip(o_refs, gmm_plan.epilogue(fusion.epilogue, accs)):
        plgpu.store(o_ref.at[it.rows_ds, it.cols_ds], val.astype(o_ref.dtype), mask=it.out_mask)


def _zero_tile(o_refs, it: _Item):
    for o_ref in o_refs:
        plgpu.store(o_ref.at[it.rows_ds, it.cols_ds], jnp.zeros(it.out_mask.shape, o_ref.dtype), mask=it.out_mask)


def _split_plan(active, programs: int, geo: _Geometry):
    """(pieces per leftover item, items run whole, leftover items) from the active tile count."""
    items = active * geo.nt
    s = last_wave_split(items, programs, geo.nk)
    whole = jnp.where(s > 1, items // programs * programs, items)
    return s, whole, items - whole


def forward(xs, ws, table, *, launch: int, fusion: Fusion, tiles: Tiles, transpose_rhs: bool, out_dtypes,
            interpret: bool = False, existing=None):
    """Run ``fusion`` over launch ``launch``'s tiles of ``table``; returns ``fusion.num_out`` arrays [M, N].

    ``table``: int32 [6, W] from ``gmm_table.schedule_table`` built with tm_{launch} = tiles.tm.
    ``existing`` (outputs of an earlier launch over other rows) are aliased to the outputs:
    rows this launch does not visit keep their values.
    """
    M, K = xs[0].shape
    G = ws[0].shape[0]
    N = ws[0].shape[1] if transpose_rhs else ws[0].shape[2]
    tm = tiles.tm
    tn, tk = _block_dims(K, N, tiles)
    nt, nk = gmm_plan.cdiv(N, tn), gmm_plan.cdiv(K, tk)
    geo = _Geometry(M, K, N, tm, tn, tk, nt, nk, table.shape[1], tiles.band, launch)
    mask_k, mask_n = K % tk != 0, N % tn != 0
    in_dtype = xs[0].dtype
    num_out = fusion.num_out

    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    slots = gmm_segments.max_tiles(M, tm, G, launch) * nt
    persistent = tiles.occupancy > 0
    programs = min(slots, tiles.programs or num_sms() * tiles.occupancy) if persistent else slots
    count = gmm_segments.TOTAL0 if launch == 0 else gmm_segments.G1
    # Static gate: a launch that can hold more items than programs (a tile has >= 1 row, so at
    # most M + 2 row tiles) and has K steps to split; decode-size launches (M < tm) never split.
    split = (SPLIT_LAST_WAVE and tiles.split_last_wave and persistent and nk >= 2 and M >= tm
             and min(M + 2, gmm_segments.max_tiles(M, tm, G, launch)) * nt > programs)
    ws_slots = programs  # pieces of one split: one wave

    def kernel(tab_ref, *refs):
        x_refs = refs[:fusion.num_lhs]
        w_refs = refs[fusion.num_lhs:fusion.num_lhs + fusion.num_rhs]
        n_in = fusion.num_lhs + fusion.num_rhs + (num_out if existing is not None else 0)
        o_refs = refs[n_in:n_in + num_out]
        part_ref = refs[n_in + num_out] if split else None
        active = tab_ref[gmm_segments.SCALARS, count]

        def accumulate(it: _Item, k_lo, k_hi):
            """float32 accumulators [tm, tn] of the item's K steps [k_lo, k_hi)."""
            rows = it.row0 + lax.broadcasted_iota(jnp.int32, (tm,), 0)
            row_ok = (rows >= it.lo) & (rows < it.hi)

            def step(terms, kb, accs):
                """One K step of one pass: load each tile its terms use once, accumulate every term."""
                k0 = pl.multiple_of(kb * tk, tk)
                k_ok = (k0 + lax.broadcasted_iota(jnp.int32, (tk,), 0)) < K
                if geo.clamp_rows:
                    x_mask = jnp.broadcast_to(k_ok[None, :], (tm, tk)) if mask_k else None
                else:
                    x_mask = row_ok[:, None] & k_ok[None, :] if mask_k else row_ok[:, None]
                w_masks = []
                if mask_n:
                    w_masks.append((it.cols < N)[:, None] if transpose_rhs else (it.cols < N)[None, :])
                if mask_k:
                    w_masks.append(k_ok[None, :] if transpose_rhs else k_ok[:, None])
                w_mask = functools.reduce(jnp.logical_and, w_masks) if w_masks else None
                w_idx = (it.g, it.cols_ds, pl.ds(k0, tk)) if transpose_rhs else (it.g, pl.ds(k0, tk), it.cols_ds)
                x_t = {i: plgpu.load(x_refs[i].at[it.rows_ds, pl.ds(k0, tk)], mask=x_mask,
                                     other=None if x_mask is None else 0.0)
                       for i in sorted({i for i, _, _ in terms})}
                w_t = {j: plgpu.load(w_refs[j].at[w_idx], mask=w_mask, other=None if w_mask is None else 0.0)
                       for j in sorted({j for _, j, _ in terms})}
                accs = list(accs)
                for i, j, a in terms:
                    accs[a] = accs[a] + lax.dot_general(x_t[i], w_t[j], dims, preferred_element_type=jnp.float32)
                return tuple(accs)

            accs = tuple(jnp.zeros((tm, tn), jnp.float32) for _ in range(fusion.num_acc))
            for terms in fusion.passes:
                accs = lax.fori_loop(k_lo, k_hi, functools.partial(step, terms), accs)
            return accs

        def whole_item(w):
            it = _item(tab_ref, w, active, geo)

            @pl.when(it.g >= 0)
            def _compute():
                _store_tile(o_refs, it, fusion, accumulate(it, 0, nk))

            @pl.when(it.g < 0)
            def _zero_fill():
                _zero_tile(o_refs, it)

        def piece(q, whole, rem, chunk):
            """Piece q of the leftover: K steps [j chunk, (j + 1) chunk) of item whole + q % rem."""
            j = q // rem
            it = _item(tab_ref, whole + q % rem, active, geo)

            @pl.when(it.g >= 0)  # zero-fill items are left to the fixup
            def _partial():
                accs = accumulate(it, j * chunk, jnp.minimum(nk, (j + 1) * chunk))
                for a, acc in enumerate(accs):
                    plgpu.store(part_ref.at[a * ws_slots + q], acc)

        def walk(count_, fn):
            """fn(i) for this program's share pid, pid + P, ... of ``count_`` (dynamic) indices."""
            trips = jnp.maximum(count_ - pid + programs - 1, 0) // programs

            def body(i, carry):
                fn(pid + i * programs)
                return carry
            lax.fori_loop(0, trips, body, jnp.int32(0))

        pid = pl.program_id(0)
        if not persistent:
            @pl.when(pid < active * nt)
            def _():
                whole_item(pid)
        elif not split:
            walk(active * nt, whole_item)
        else:
            s, whole, rem = _split_plan(active, programs, geo)
            walk(whole, whole_item)
            chunk = (nk + s - 1) // s
            walk(jnp.where(s > 1, rem * s, 0), lambda q: piece(q, whole, rem, chunk))

    out_shape = [jax.ShapeDtypeStruct((M, N), dt) for dt in out_dtypes]
    if split:
        out_shape.append(jax.ShapeDtypeStruct((fusion.num_acc * ws_slots, tm, tn), jnp.float32))
    args = [table, *[x.astype(in_dtype) for x in xs], *ws]
    aliases = {}
    if existing is not None:
        aliases = {len(args) + i: i for i in range(num_out)}
        args += list(existing)
    itemsize = jnp.dtype(in_dtype).itemsize
    cost = gmm_plan.gmm_cost(M, K, N, fusion, lhs_reads=nt, weight_reads=G, itemsize=itemsize, out_dtypes=out_dtypes)
    call = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(programs,),
        input_output_aliases=aliases,
        compiler_params=_compat.triton_compiler_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        cost_estimate=cost,
        name=f"gmm_{fusion.name}_{tm}x{tn}x{tk}",
    )
    outs = tuple(call(*args))
    if not split:
        return outs
    return _fixup(table, outs[-1], outs[:-1], geo=geo, fusion=fusion, programs=programs, ws_slots=ws_slots,
                  count=count, interpret=interpret)


def _fixup(table, partials, outs, *, geo: _Geometry, fusion: Fusion, programs: int, ws_slots: int, count: int,
           interpret: bool):
    """Sum the pieces of each leftover item (piece order), epilogue, store into ``outs`` (aliased).

    ``partials``: float32 [num_acc * ws_slots, tm, tn], piece q of accumulator a at a * ws_slots + q.
    Grid (programs, tm / FIXUP_ROWS): program (r, i) finishes rows [i FIXUP_ROWS, (i + 1) FIXUP_ROWS)
    of leftover item r, loading its pieces' slices back to back (masked past the item's count);
    the rest exit (no split: all do).
    """
    num_out = len(outs)
    fr = FIXUP_ROWS if geo.tm % FIXUP_ROWS == 0 else geo.tm

    def kernel(tab_ref, part_ref, *refs):
        o_refs = refs[num_out:]
        active = tab_ref[gmm_segments.SCALARS, count]
        s, whole, rem = _split_plan(active, programs, geo)
        r, i = pl.program_id(0), pl.program_id(1)

        @pl.when((s > 1) & (r < rem))
        def _():
            it = _item(tab_ref, whole + r, active, geo)
            sl = _block(it.g, it.lo, it.hi, it.nb, it.row0 + i * fr, fr, geo)  # slice i of the item's rows
            any_row = (sl.row0 < it.hi) & (sl.row0 + fr > it.lo)

            @pl.when(any_row & (it.g >= 0))
            def _sum():
                accs = []
                for a in range(fusion.num_acc):
                    acc = jnp.zeros((fr, geo.tn), jnp.float32)
                    for j in range(min(MAX_PIECES, geo.nk)):  # static: the loads issue back to back
                        q = a * ws_slots + jnp.minimum(j, s - 1) * rem + r
                        acc = acc + plgpu.load(part_ref.at[q, pl.ds(i * fr, fr), pl.ds(0, geo.tn)],
                                               mask=jnp.broadcast_to(j < s, (fr, geo.tn)), other=0.0)
                    accs.append(acc)
                _store_tile(o_refs, sl, fusion, accs)

            @pl.when(any_row & (it.g < 0))
            def _zero_fill():
                _zero_tile(o_refs, sl)

    return tuple(pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs],
        grid=(programs, geo.tm // fr),
        input_output_aliases={2 + i: i for i in range(num_out)},
        compiler_params=_compat.triton_compiler_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"gmm_{fusion.name}_fixup_{geo.tm}x{geo.tn}",
    )(table, partials, *outs))
