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

import contextlib
import dataclasses
from typing import Iterator

import jax.numpy as jnp


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
    programs: a fixed persistent program count instead (tests use a few).
    """

    tm: int
    tn: int
    tk: int
    num_warps: int = 4
    num_stages: int = 3
    band: int = 8
    occupancy: int = 1
    programs: int = 0

    def __str__(self):
        return f"{self.tm}x{self.tn}x{self.tk}/w{self.num_warps}s{self.num_stages}b{self.band}o{self.occupancy}"

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
    """Throughputs behind the GPU tile-height split (defaults: H100 SXM bf16 estimates;
    ``benchmarks/tune_gmm.py`` prints measured values).

    *_tflops: what the big / small tile configuration sustains on full tiles;
    *_gbps: the weight bytes per second it streams when memory-bound.
    """

    big_tflops: float = 600.0
    small_tflops: float = 300.0
    big_gbps: float = 2000.0
    small_gbps: float = 2500.0


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
    of lambda * bytes-time + (1 - lambda) * flops-time for a few lambda (plus all-big and
    all-small), and the best candidate under the model wins. Everything is [candidates, G]
    elementwise math and small reductions on device: no host sync, no branch.
    """
    s = (ends - starts).astype(jnp.float32)
    w_bytes = float(k * n * num_rhs * itemsize)
    wb, ws = w_bytes / (cost.big_gbps * 1e9), w_bytes / (cost.small_gbps * 1e9)
    row = 2.0 * k * n * num_rhs
    cb, cs = row / (cost.big_tflops * 1e12), row / (cost.small_tflops * 1e12)

    def ceil_to(x, t):
        return jnp.ceil(x / t) * t

    full = jnp.floor(s / tm_big) * tm_big
    rem = s - full
    nonempty = (s > 0).astype(jnp.float32)
    # per option (a, b, c): [memory time big, memory time small, compute big, compute small], each [G]
    opts = jnp.stack([
        jnp.stack([nonempty * wb, 0.0 * s, ceil_to(s, tm_big) * cb, 0.0 * s]),
        jnp.stack([(full > 0) * wb, (rem > 0) * ws, full * cb, ceil_to(rem, tm_small) * cs]),
        jnp.stack([0.0 * s, nonempty * ws, 0.0 * s, ceil_to(s, tm_small) * cs]),
    ])  # [3, 4, G]
    lam = jnp.linspace(0.0, 1.0, 9)[:, None, None]
    mem, flo = opts[:, 0] + opts[:, 1], opts[:, 2] + opts[:, 3]  # [3, G]
    greedy = jnp.argmin(lam * mem[None] + (1 - lam) * flo[None], axis=1)  # [9, G]
    fixed = jnp.broadcast_to(jnp.array([0, 2])[:, None], (2, s.shape[0]))
    cand = jnp.concatenate([greedy, fixed, jnp.ones_like(fixed[:1])])  # [12, G] option per group
    picked = jnp.take_along_axis(opts[None], cand[:, None, None, :], axis=1)[:, 0]  # [12, 4, G]
    tot = picked.sum(-1)  # [12, 4]
    t = jnp.maximum(tot[:, 0], tot[:, 2]) + jnp.maximum(tot[:, 1], tot[:, 3])
    best = cand[jnp.argmin(t)]
    big_rows = jnp.where(best == 0, s, jnp.where(best == 1, full, 0.0))
    return starts + big_rows.astype(jnp.int32)


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


_OVERRIDE: list[Tiling] = []


@contextlib.contextmanager
def override(tiling: Tiling) -> Iterator[None]:
    """Use ``tiling`` for every grouped-matmul kernel traced inside the ``with`` block."""
    _OVERRIDE.append(tiling)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def current_override() -> Tiling | None:
    return _OVERRIDE[-1] if _OVERRIDE else None
