"""Shared logic of the grouped-matmul kernels (GPU and TPU): fusions, epilogues, tile sizes, cost model.

A grouped "forward" kernel computes, for every row tile of the schedule and every
output column block,

    acc[a] += lhs[i][rows] @ rhs[j][group]      for (i, j, a) in fusion.terms
    outputs = epilogue(acc)

so one kernel body serves the plain gmm (one term), the SwiGLU forward (two
accumulators sharing the x tile, silu(g) * u in registers) and the SwiGLU input
gradient (dg @ w_gate^T + du @ w_up^T into one accumulator). A grouped
"transposed" kernel computes ``out[j][group] = lhs[rows].T @ rhs[j][rows]`` for
one or more right operands sharing the lhs tile.

Only how a tile is loaded, multiplied and stored differs between the backends.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.overrides import Override


@dataclasses.dataclass(frozen=True)
class Fusion:
    """acc[a] += lhs[i] @ rhs[j] for (i, j, a) in each pass; outputs = epilogue(accs).

    Each pass is one K loop whose steps load the operands its terms name once (SwiGLU:
    one x tile feeds both weights); several passes run one after the other into the
    same accumulators (the dual gmm of the SwiGLU backward keeps a single-gmm's
    shared-memory footprint that way).
    """

    name: str
    num_lhs: int
    num_rhs: int
    num_acc: int
    passes: tuple[tuple[tuple[int, int, int], ...], ...]
    epilogue: str  # "none": outputs = accs; "swiglu": [silu(a0) * a1]; "swiglu_save": + [a0, a1]

    @property
    def num_out(self) -> int:
        return {"none": self.num_acc, "swiglu": 1, "swiglu_save": 3}[self.epilogue]

    @property
    def num_terms(self) -> int:
        return sum(len(p) for p in self.passes)


GMM = Fusion("gmm", 1, 1, 1, (((0, 0, 0),),), "none")
DUAL_GMM = Fusion("dual_gmm", 2, 2, 1, (((0, 0, 0),), ((1, 1, 0),)), "none")
SWIGLU = Fusion("swiglu", 1, 2, 2, (((0, 0, 0), (0, 1, 1)),), "swiglu")
SWIGLU_SAVE = Fusion("swiglu_save", 1, 2, 2, (((0, 0, 0), (0, 1, 1)),), "swiglu_save")


def silu(x):
    """x * sigmoid(x), written with exp so every lowering (Triton, Mosaic) takes it."""
    return x / (1.0 + jnp.exp(-x))


def epilogue(name: str, accs):
    """float32 accumulators -> float32 outputs (in registers / VMEM)."""
    if name == "none":
        return list(accs)
    h = silu(accs[0]) * accs[1]
    return [h] if name == "swiglu" else [h, accs[0], accs[1]]


def swiglu_grads(g, u, dh):
    """d/dg, d/du of h = silu(g) * u (float32 math): (dh * u * silu'(g), dh * silu(g))."""
    g, u, dh = (a.astype(jnp.float32) for a in (g, u, dh))
    s = 1.0 / (1.0 + jnp.exp(-g))
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's static tiling. tm: rows per tile; tn/tk: output columns / contraction per step.

    GPU-only: num_warps, num_stages; band (row tiles per L2 swizzle band); occupancy:
    programs per SM of a persistent forward launch (0: one program per tile slot);
    programs: a fixed persistent program count instead (tests use a few); split_last_wave:
    whether a persistent forward may split its partial last wave along K
    (``pallas_kernels.triton.gmm``).
    """

    tm: int
    tn: int
    tk: int
    num_warps: int = 4
    num_stages: int = 3
    band: int = 8
    occupancy: int = 1
    programs: int = 0
    split_last_wave: bool = True

    def __str__(self):
        split = "" if self.split_last_wave else "/nosplit"
        return f"{self.tm}x{self.tn}x{self.tk}/w{self.num_warps}s{self.num_stages}b{self.band}o{self.occupancy}{split}"

    def replace(self, **kw) -> "Tiles":
        return dataclasses.replace(self, **kw)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pow2_block(dim: int, preferred: int, minimum: int = 16) -> int:
    """GPU block size: ``preferred`` (a power of two), shrunk to the power of two covering ``dim``."""
    return max(minimum, min(preferred, next_pow2(dim)))


def tpu_block(dim: int, preferred: int, align: int) -> int:
    """TPU block size: the whole dim if it fits, else the largest multiple of ``align`` <= preferred
    dividing ``dim``, else ``preferred`` rounded to ``align`` (the last block is ragged and masked)."""
    if dim <= preferred:
        return dim
    for b in range(preferred - preferred % align, align - 1, -align):
        if dim % b == 0 and b >= preferred // 4:
            return b
    return max(align, preferred - preferred % align)


# --- adaptive tile height --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
    """Throughputs behind the GPU tile-height split; ``benchmarks/tune_gmm.py`` measures them.

    *_tflops: what the big / small tile configuration sustains on full tiles;
    *_gbps: the weight bytes per second it streams when memory-bound. Defaults: H100 SXM
    round 2 (``tune_gmm`` v2, jax 0.11.2, 2026-11-22; benchmarks/notes/grouped_matmul.md),
    calibrated from pipelined timings of one launch policy at a time: big 128x256x64 w8s3
    575 TFLOP/s (Mixtral M=4096, big only) and 2996 GB/s (DeepSeek M=512, big only); small
    32x128x128 w4s4 228 TFLOP/s (Mixtral M=4096, small only) and 3033 GB/s (DeepSeek M=512).
    The wide small tile (64x256x64, picked at >= 64 rows per group) was only measured
    memory-bound (2766 GB/s, Mixtral M=512); its compute rate is modelled with the 32-row
    tile's 228, which under-rates it, so the split leans to big tiles there.
    """

    big_tflops: float = 575.0
    small_tflops: float = 228.0
    big_gbps: float = 2996.0
    small_gbps: float = 3033.0


def split_rows(starts, ends, *, tm_big: int, tm_small: int, k: int, n: int, num_rhs: int, itemsize: int,
               cost: CostModel = CostModel()):
    """Per group, the row where the big-tile kernel's share ends and the small-tile kernel's begins.

    Each group g (rows [s, e)) is covered (a) all by big tiles, (b) by full big tiles plus
    small tiles for the remainder, or (c) all by small tiles. The two launches run one after
    the other, each bound by its weight bytes (a group's weights are read once per launch
    that touches it: the banded order runs a group's tiles together, so L2 absorbs
    re-reads) or its padded rows x 2KN, so the modelled time of an assignment is

        max(bytes_big / bw_big, flops_big / peak_big) + max(bytes_small / bw_small, flops_small / peak_small).

    That is not separable over groups, so candidate assignments come from per-group argmins
    of lambda * bytes-time + (1 - lambda) * flops-time for 9 lambdas, plus all-(a), all-(c)
    and all-(b); the best candidate under the model wins. starts/ends: int32 [W]. Written
    as [16 candidates, W] elementwise math and reductions with no gather, so it runs inside
    the Pallas-Triton schedule kernel as well as in XLA.
    """
    s = ends - starts
    full = s // tm_big * tm_big
    rem = s - full
    w_bytes = float(k * n * num_rhs * itemsize)
    wb, ws = w_bytes / (cost.big_gbps * 1e9), w_bytes / (cost.small_gbps * 1e9)
    row = 2.0 * k * n * num_rhs
    cb, cs = row / (cost.big_tflops * 1e12), row / (cost.small_tflops * 1e12)

    def f32(x):
        return x.astype(jnp.float32)

    def up(x, t):
        return f32((x + t - 1) // t * t)

    zero = jnp.zeros(s.shape, jnp.float32)
    # per option: (memory big, memory small, compute big, compute small) seconds, each [W]
    opts = ((jnp.where(s > 0, wb, 0.0), zero, up(s, tm_big) * cb, zero),
            (jnp.where(full > 0, wb, 0.0), jnp.where(rem > 0, ws, 0.0), f32(full) * cb, up(rem, tm_small) * cs),
            (zero, jnp.where(s > 0, ws, 0.0), zero, up(s, tm_small) * cs))
    cand = lax.broadcasted_iota(jnp.int32, (16, 1), 0)  # 0-8: lambda = c / 8; 9: all a; 10: all c; 11: all b
    lam = f32(jnp.minimum(cand, 8)) * 0.125
    score = [lam * (o[0] + o[1]) + (1.0 - lam) * (o[2] + o[3]) for o in opts]  # [16, W] each
    greedy = jnp.where((score[0] <= score[1]) & (score[0] <= score[2]), 0, jnp.where(score[1] <= score[2], 1, 2))
    choice = jnp.where(cand == 9, 0, jnp.where(cand == 10, 2, jnp.where(cand == 11, 1, greedy)))

    def total(q):
        return jnp.sum(jnp.where(choice == 0, opts[0][q], jnp.where(choice == 1, opts[1][q], opts[2][q])), axis=1)
    t = jnp.maximum(total(0), total(2)) + jnp.maximum(total(1), total(3))  # [16]
    ids = cand[:, 0]
    t = jnp.where(ids < 12, t, jnp.inf)
    best = jnp.min(jnp.where(t == jnp.min(t), ids, 16))
    best_choice = jnp.sum(jnp.where(cand == best, choice, 0), axis=0)  # [W]
    return starts + jnp.where(best_choice == 0, s, jnp.where(best_choice == 1, full, 0))


def tpu_tile_cost(starts, ends, tm: int, *, row_flops: float, block_bytes: float, steps_per_block: int,
                  tflops: float, bandwidth_gbps: float, step_s: float = 0.35e-6):
    """Modelled seconds of a tm-aligned (megablox-style) schedule on a TPU (device-side scalar).

    Every visited row block moves ``block_bytes`` through HBM (forward: its group's weights,
    there is no L2 to absorb re-reads), computes tm padded rows of ``row_flops`` each and
    takes ``steps_per_block`` grid steps of fixed overhead ``step_s``.
    """
    size = ends - starts
    blocks = jnp.where(size > 0, (ends + tm - 1) // tm - starts // tm, 0).sum().astype(jnp.float32)
    return (blocks * block_bytes / (bandwidth_gbps * 1e9) + blocks * tm * row_flops / (tflops * 1e12)
            + blocks * steps_per_block * step_s)


# --- explicit tilings (tests, tuning) --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tiling:
    """What the kernels use instead of their defaults inside :func:`override`.

    forward: one :class:`Tiles` (fixed) or a tuple of them (adaptive: GPU splits each
    group between the first (big) and second (small); TPU picks one per call).
    transposed: the weight-gradient kernel's tiles (tm = rows per step, tk x tn output block).
    policy: GPU forward with two tiles: "split" (per group, cost model), "big" or "small" only.
    """

    forward: Tiles | tuple[Tiles, ...] | None = None
    transposed: Tiles | None = None
    policy: str = "split"
    cost: CostModel | None = None


_OVERRIDE: Override[Tiling] = Override("sparse_jax_gmm_tiling")


def override(tiling: Tiling):
    """Use ``tiling`` for every grouped-matmul kernel traced inside the ``with`` block."""
    return _OVERRIDE.use(tiling)


def current_override() -> Tiling | None:
    return _OVERRIDE.current()


def gmm_cost(M: int, K: int, N: int, fusion, *, lhs_reads: int, weight_reads: int, itemsize: int,
             out_dtypes) -> pl.CostEstimate:
    """XLA's cost hint for a gmm launch: ``lhs_reads`` passes over the [M, K] rows (one per N
    tile), ``weight_reads`` [K, N] weight matrices per operand (groups or row tiles)."""
    return pl.CostEstimate(
        flops=2 * M * K * N * fusion.num_terms,
        bytes_accessed=(M * K * fusion.num_lhs * lhs_reads + weight_reads * K * N * fusion.num_rhs) * itemsize
        + M * N * sum(jnp.dtype(d).itemsize for d in out_dtypes),
        transcendentals=M * N if fusion.epilogue != "none" else 0)


def tgmm_cost(M: int, K: int, N: int, G: int, P: int, *, n_tiles: int, k_tiles: int, itemsize: int,
              out_dtype) -> pl.CostEstimate:
    """XLA's cost hint for a transposed gmm launch: P [G, K, N] outputs from [M, K] and P [M, N]."""
    return pl.CostEstimate(
        flops=2 * M * K * N * P,
        bytes_accessed=(M * K * n_tiles + M * N * P * k_tiles) * itemsize + G * K * N * P * jnp.dtype(out_dtype).itemsize,
        transcendentals=0)
