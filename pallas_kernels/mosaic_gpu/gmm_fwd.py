"""Forward grouped matmul on Hopper through Mosaic GPU (Pallas ``plgpu``): gmm and fused SwiGLU.

Why a second GPU lowering: MoE's grouped matmuls stream the active experts' weights, and
Pallas' Triton pipeline (cp.async, no warp specialisation) reads them at ~1.9-2.4 TB/s where
CUTLASS grouped GEMMs reach ~2.6 (benchmarks/notes/grouped_matmul.md). This kernel feeds
wgmma from TMA with a dedicated memory warpgroup:

* persistent: one CTA per SM walks work items (row tile, column block) ``w = cta + i * CTAs``;
  items run column-block-major over the tiles, so the tiles of one group read the same weight
  block at about the same time (the second read is an L2 hit);
* three warpgroups per CTA: the memory warpgroup TMA-loads, per K step, the tile's two 64-row
  halves of lhs and each weight's [tk, tn] block into a ring of ``stages`` slots that runs on
  across items; each compute warpgroup multiplies its 64-row half (wgmma, one step in flight)
  and frees the slot; a half with no rows of the group skips its matmuls;
* the epilogue (SwiGLU's silu(g) * u in float32 for the fused forms) writes the tile to shared
  memory and TMA-stores only the group's rows: 64, then 32/16/8-row pieces at static offsets.

Groups must start at multiples of 8 rows (:mod:`pallas_kernels.mosaic_gpu.gmm_tiles`): the
caller declares it with ``row_align`` (the MoE layer's padded dispatch). A group that breaks
the promise gives NaN rows, never rows of another group. Rows outside the local groups are
zeros (the gmm contract of :mod:`sparse_jax.ops.grouped_matmul`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import gmm_plan
from pallas_kernels.common.gmm_plan import Fusion
from pallas_kernels.common.overrides import Override
from pallas_kernels.mosaic_gpu import gmm_tiles
from pallas_kernels.triton.gmm import num_sms

HALF = 64                         # wgmma's M: rows per chunk (a compute warpgroup holds 1 or 2)
COMPUTE_WGS = 2
SMEM_BUDGET = 220 * 1024          # of the 227 KB a CTA may hold, leaving room for barriers and alignment
MAX_STAGES = 6                    # deeper rings only where slots are small (few-row launches, narrow tn)
FUSIONS = ("gmm", "swiglu", "swiglu_save")


@dataclasses.dataclass(frozen=True)
class MgpuGmmConfig:
    """Launch parameters. ``chunks``: 64-row chunks per compute warpgroup, so a tile has
    128 x chunks rows (None: 2, so a group of up to 256 rows reads each weight block once);
    ``tn``: output columns per item per weight (None: the widest with 128 float32 accumulator
    registers per thread -- 256 / chunks for a gmm, 128 / chunks for SwiGLU -- that divides N,
    narrowed while items leave SMs idle); ``tk``: K step; ``stages``: ring slots (None: as many
    as fit :data:`SMEM_BUDGET`, at most :data:`MAX_STAGES`)."""

    chunks: int | None = None
    tn: int | None = None
    tk: int = 64
    stages: int | None = None
    compute_regs: int = 232
    memory_regs: int = 40
    oob_empty_chunks: bool = True


_OVERRIDE: Override[MgpuGmmConfig] = Override("mgpu_gmm_config")


def override(cfg: MgpuGmmConfig):
    """Use ``cfg`` for every Mosaic GPU gmm traced inside the ``with`` block (tuning)."""
    return _OVERRIDE.use(cfg)


def not_built_for(*, fusion: Fusion, transpose_rhs: bool, row_align: int) -> str | None:
    """The part of :func:`unsupported` that no shape or dtype changes: what this kernel is not
    built for (the backward's transposed and dual gmms, groups without the alignment promise)."""
    if row_align % gmm_tiles.ALIGN:
        return f"row_align={row_align} (groups must start at multiples of {gmm_tiles.ALIGN} rows)"
    if fusion.name not in FUSIONS:
        return f"fusion {fusion.name} (gmm and SwiGLU forwards only)"
    if transpose_rhs:
        return "transpose_rhs (forward weights [G, K, N] only)"
    return None


def unsupported(xs, ws, *, fusion: Fusion, transpose_rhs: bool, out_dtypes, row_align: int) -> str | None:
    """Why this kernel cannot run the problem (None when it can); the caller falls back to Triton."""
    why = not_built_for(fusion=fusion, transpose_rhs=transpose_rhs, row_align=row_align)
    if why is not None:
        return why
    x = xs[0]
    M, K = x.shape
    N = ws[0].shape[2]
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {x.dtype} (bf16 / fp16 only)"
    if any(jnp.dtype(d) != x.dtype for d in out_dtypes):
        return f"output dtypes {[str(jnp.dtype(d)) for d in out_dtypes]} (the input dtype only)"
    if M % gmm_tiles.ALIGN:
        return f"M={M} (a multiple of {gmm_tiles.ALIGN})"
    if K % 64 or N % 64:
        return f"K={K}, N={N} (multiples of 64)"
    return None


@dataclasses.dataclass(frozen=True)
class _Spec:
    fusion: Fusion
    M: int
    K: int
    N: int
    G: int
    dtype: object
    chunks: int
    tn: int
    tk: int
    stages: int
    ctas: int
    cfg: MgpuGmmConfig

    @property
    def nw(self) -> int:
        return self.fusion.num_rhs

    @property
    def n_out(self) -> int:
        return self.fusion.num_out

    @property
    def k_steps(self) -> int:
        return self.K // self.tk

    @property
    def n_blocks(self) -> int:
        return self.N // self.tn

    @property
    def tile_rows(self) -> int:
        return COMPUTE_WGS * HALF * self.chunks


def _choose_tn(fusion: Fusion, M: int, N: int, G: int, chunks: int, tile_rows: int, cfg: MgpuGmmConfig,
               sms: int) -> int:
    if cfg.tn is not None:
        if N % cfg.tn:
            raise ValueError(f"tn={cfg.tn} must divide N={N}")
        return cfg.tn
    tn = 256 // (fusion.num_rhs * chunks)
    while N % tn:
        tn //= 2
    # few rows (decode): the busiest possible tiles x column blocks should cover the SMs
    tiles = min(-(-M // tile_rows) + G, max(M // gmm_tiles.ALIGN, 1))
    while tn > 64 and tiles * (N // tn) < sms:
        tn //= 2
    return tn


def _spec(xs, ws, fusion: Fusion, group_count: int) -> _Spec:
    cfg = _OVERRIDE.current() or MgpuGmmConfig()
    M, K = xs[0].shape
    N = ws[0].shape[2]
    chunks = cfg.chunks or 2
    if chunks not in (1, 2):
        raise ValueError(f"chunks={chunks} (1 or 2 64-row chunks per warpgroup)")
    tile_rows = COMPUTE_WGS * HALF * chunks
    tn = _choose_tn(fusion, M, N, group_count, chunks, tile_rows, cfg, num_sms())
    if K % cfg.tk:
        raise ValueError(f"tk={cfg.tk} must divide K={K}")
    itemsize = jnp.dtype(xs[0].dtype).itemsize
    out_bytes = tile_rows * fusion.num_out * tn * itemsize
    stage = (tile_rows * cfg.tk + fusion.num_rhs * cfg.tk * tn) * itemsize
    fit = (SMEM_BUDGET - out_bytes) // stage
    stages = cfg.stages or min(MAX_STAGES, fit)
    if stages < 2 or stages > fit:
        raise ValueError(f"{stages} ring slots of {stage} bytes and {out_bytes} bytes of outputs overflow "
                         "shared memory")
    ctas = min(num_sms(), gmm_tiles.max_tiles(M, group_count, tile_rows) * (N // tn))
    return _Spec(fusion, M, K, N, group_count, xs[0].dtype, chunks, tn, cfg.tk, stages, ctas, cfg)


def _epilogue(S: _Spec, accs, bad):
    """float32 accumulators -> outputs in S.dtype (:func:`gmm_plan.epilogue`, shared with the other
    backends); NaN when a group broke the alignment promise."""
    accs = [a * jnp.where(bad != 0, jnp.float32(jnp.nan), jnp.float32(1.0)) for a in accs]
    return [o.astype(S.dtype) for o in gmm_plan.epilogue(S.fusion.epilogue, accs)]


def _store_rows(o_smem, out_ref, base, rows, col):
    """TMA-store the first ``rows`` (a multiple of 8, 0..64) rows of o_smem [64, tn] to out_ref at row ``base``.

    Pieces of 64, then 32/16/8 rows at static shared-memory offsets (a swizzled buffer slices
    only at multiples of 8 rows, and a TMA box has a static shape).
    """
    tn = o_smem.shape[1]

    def put(off: int, p: int):
        dst = out_ref.at[pl.ds(pl.multiple_of(base + off, gmm_tiles.ALIGN), p), pl.ds(col, tn)]
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(off, p)], dst)

    pl.when(rows == HALF)(lambda: put(0, HALF))
    for p in (HALF // 2, HALF // 4, HALF // 8):
        for off in range(0, HALF, 2 * p):
            cond = (rows < HALF) & ((rows & p) != 0) & ((rows & ~(2 * p - 1)) == off)
            pl.when(cond)(functools.partial(put, off, p))


def _kernel(S: _Spec, table_ref, count_ref, *refs):
    nw, n_out, C = S.nw, S.n_out, S.chunks
    x_ref, w_refs = refs[0], refs[1:1 + nw]
    out_refs = refs[1 + nw:1 + nw + n_out]
    x_smem, w_smem, o_smem, filled, consumed = refs[1 + nw + n_out:]
    stages, tk, tn, KS = S.stages, S.tk, S.tn, S.k_steps

    cta = lax.axis_index("sm")
    n_tiles = count_ref[0]
    n_items = n_tiles * S.n_blocks
    n_mine = lax.div(jnp.maximum(n_items - cta, 0) + S.ctas - 1, S.ctas)
    wg = lax.axis_index("wg")

    def item(i):
        w = cta + i * S.ctas
        t = lax.rem(w, n_tiles)
        return (table_ref[gmm_tiles.GROUP, t], table_ref[gmm_tiles.ROW0, t], table_ref[gmm_tiles.ROWS, t],
                table_ref[gmm_tiles.BAD, t], lax.div(w, n_tiles) * tn)

    def chunk_rows(rows, q):
        """Rows of the tile in its 64-row chunk q (0..64, a multiple of 8)."""
        return jnp.clip(rows - q * HALF, 0, HALF)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(S.cfg.compute_regs, action="increase")
        # this warpgroup's chunks: wg, wg + 2, ... (rows are a prefix of the tile, so the chunks
        # with rows are a prefix of these)
        mine = [wg + COMPUTE_WGS * c for c in range(C)]

        def store(per_chunk, row0, rows, col):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read o_smem
            for c, outs in enumerate(per_chunk):
                for j, o in enumerate(outs):
                    o_smem[wg, c, j] = o
            plgpu.commit_smem()
            for c in range(len(per_chunk)):
                r = chunk_rows(rows, mine[c])
                for j in range(n_out):
                    _store_rows(o_smem.at[wg, c, j], out_refs[j], row0 + mine[c] * HALF, r, col)

        def matmuls(active: int, s, row0, rows, bad, col):
            """The K loop over this warpgroup's first ``active`` chunks, then their epilogue."""
            def mma(*acc_refs):
                def k_step(k, _):
                    slot = lax.rem(s + k, stages)
                    plgpu.barrier_wait(filled.at[slot])
                    for c in range(active):
                        for j in range(nw):
                            plgpu.wgmma(acc_refs[c * nw + j], x_smem.at[slot, mine[c]], w_smem.at[slot, j])
                    plgpu.wgmma_wait(active * nw)  # the previous step's matmuls are done: free its slot

                    @pl.when(k > 0)
                    def _():
                        plgpu.barrier_arrive(consumed.at[lax.rem(s + k - 1, stages)])
                    return ()

                lax.fori_loop(0, KS, k_step, ())
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(consumed.at[lax.rem(s + KS - 1, stages)])
                return [r[...] for r in acc_refs]

            accs = pl.run_scoped(mma, *[plgpu.ACC((HALF, tn), jnp.float32)] * (active * nw))
            store([_epilogue(S, accs[c * nw:(c + 1) * nw], bad) for c in range(active)], row0, rows, col)

        def body(i, s):
            g, row0, rows, bad, col = item(i)
            compute = g >= 0
            active = sum((chunk_rows(rows, q) > 0).astype(jnp.int32) for q in mine)

            for a in range(1, C + 1):
                pl.when(compute & (active == a))(functools.partial(matmuls, a, s, row0, rows, bad, col))

            @pl.when(compute & (active == 0))
            def _():  # no rows of the group here: keep the ring's rhythm, skip the matmuls
                @pl.loop(0, KS)
                def _(k):
                    slot = lax.rem(s + k, stages)
                    plgpu.barrier_wait(filled.at[slot])
                    plgpu.barrier_arrive(consumed.at[slot])

            @pl.when(~compute & (active > 0))
            def _():  # rows outside the local groups: zeros (NaN under a broken promise)
                zeros = pl.run_scoped(lambda *r: [a[...] for a in r], *[plgpu.ACC((HALF, tn), jnp.float32)] * nw)
                store([_epilogue(S, zeros, bad)] * C, row0, rows, col)

            return s + jnp.where(compute, KS, 0)

        lax.fori_loop(0, n_mine, body, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(S.cfg.memory_regs, action="decrease")

        def body(i, s):
            g, row0, rows, _, col = item(i)

            @pl.when(g >= 0)
            def _():
                # a chunk without rows of the group reads the box at row M: out of bounds, so TMA
                # fills zeros without touching memory (and still completes the slot's bytes)
                if S.cfg.oob_empty_chunks:
                    src = [pl.multiple_of(jnp.where(rows > q * HALF, row0 + q * HALF, S.M), gmm_tiles.ALIGN)
                           for q in range(COMPUTE_WGS * C)]
                else:
                    src = [pl.multiple_of(row0 + q * HALF, gmm_tiles.ALIGN) for q in range(COMPUTE_WGS * C)]

                @pl.loop(0, KS)
                def _(k):
                    step = s + k
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])

                    ks = pl.ds(k * tk, tk)
                    for q in range(COMPUTE_WGS * C):
                        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(src[q], HALF), ks], x_smem.at[slot, q], filled.at[slot])
                    for j in range(nw):
                        plgpu.copy_gmem_to_smem(w_refs[j].at[g, ks, pl.ds(col, tn)], w_smem.at[slot, j],
                                                filled.at[slot])

            return s + jnp.where(g >= 0, KS, 0)

        lax.fori_loop(0, n_mine, body, jnp.int32(0))


def forward(xs, ws, group_sizes, group_offset, *, fusion: Fusion):
    """xs: (x [M, K],); ws: fusion.num_rhs arrays [G, K, N] -> tuple of fusion.num_out arrays [M, N] in x.dtype.

    Groups (of ``group_sizes`` int32 [G_total], local ones [group_offset, + G)) must start at
    multiples of 8 rows; see the module docstring. Check :func:`unsupported` first.
    """
    x = xs[0]
    M, K = x.shape
    G = ws[0].shape[0]
    S = _spec(xs, ws, fusion, G)
    table, count = gmm_tiles.tile_table(group_sizes, group_offset, num_rows=M, num_groups=G, tile_rows=S.tile_rows)
    itemsize = jnp.dtype(x.dtype).itemsize
    swizzle = min(128, S.tk * itemsize)
    x_tiled = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    o_swizzle = min(128, S.tn * itemsize)
    o_tiled = (plgpu.TilingTransform((8, o_swizzle // itemsize)), plgpu.SwizzleTransform(o_swizzle))
    w_tiled = o_tiled
    scratch = (
        plgpu.SMEM((S.stages, COMPUTE_WGS * S.chunks, HALF, S.tk), x.dtype, transforms=x_tiled),
        plgpu.SMEM((S.stages, S.nw, S.tk, S.tn), x.dtype, transforms=w_tiled),
        plgpu.SMEM((COMPUTE_WGS, S.chunks, S.n_out, HALF, S.tn), x.dtype, transforms=o_tiled),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS * S.chunks + S.nw, num_barriers=S.stages),  # filled (one per copy)
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=S.stages),          # slot consumed
    )
    call = plgpu.kernel(
        functools.partial(_kernel, S),
        out_type=tuple(jax.ShapeDtypeStruct((M, S.N), x.dtype) for _ in range(S.n_out)),
        scratch_types=scratch,
        grid=(S.ctas,),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    return tuple(call(table, count.reshape(1), x, *ws))
