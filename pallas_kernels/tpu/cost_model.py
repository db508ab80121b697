"""Cost model of one TPU attention pass over concrete tile tables, and the tile search built on it.

For a pass ('fwd', 'dq', 'dkv') and its slot tables it counts MXU work of every
computed tile (per query head; with the MXU shape efficiency: a contraction or
output dim below the systolic array side leaves it partly idle), EUP work (an exp
per computed pair, a tanh more with softcap), VPU work (element ops per pair, more
on tiles that need mask work), HBM bytes (the tile-row operands once, the streamed
operands once per *active tile*) and grid steps (rows x slots, padding included):

    time = max(MXU, VPU, EUP, HBM) + steps x step overhead

Rates come from :data:`configs.CHIPS` (published peaks and bandwidths; VPU/EUP
rates and step overhead are estimates). ``benchmarks/roofline_tpu.py`` prints it
for whole configurations; :func:`search` uses it to pick tiles when the BlockMask
tables are concrete: big tiles amortise the per-step cost and K/V re-reads, small
tiles waste less work on fine-grained sparsity, and the best trade-off depends on
the mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels.common import coarse_tables as CT
from pallas_kernels.tpu import configs

# VPU element-ops per computed pair: (fast path, masked path). Forward: scale, subtract the
# max, max / sum reductions, exp's pre-multiply, the cast for the PV matmul; the masked path
# adds the mask function (a band: ~4), the sub-block class select and the -inf select.
VPU_OPS = {"fwd": (6, 13), "dq": (6, 13), "dkv": (7, 14)}

TILE_CANDIDATES = (128, 256, 512, 1024)
# Tile grids finer than this (per batch and head) are not tried once a coarser candidate
# fits: their tables cost host time to build and SMEM to hold, and step overhead dominates.
MAX_TILE_GRID = 1 << 16


def matmuls(kind: str, D: int, Dv: int) -> list[tuple[int, int]]:
    """(FLOPs per pair, the dim that limits MXU occupancy) of each matmul of a pass."""
    if kind == "fwd":
        return [(2 * D, D), (2 * Dv, Dv)]
    if kind == "dq":
        return [(2 * D, D), (2 * Dv, Dv), (2 * D, D)]
    return [(2 * D, D), (2 * Dv, Dv), (2 * Dv, Dv), (2 * D, D)]


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the cost depends on besides the tables."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    itemsize: int
    softcap: bool = False

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class Cost:
    mxu_s: float
    vpu_s: float
    eup_s: float
    hbm_s: float
    overhead_s: float
    computed_pairs: int
    active_tiles: int
    masked_tiles: int
    grid_steps: int
    hbm_bytes: float

    @property
    def bound(self) -> str:
        parts = {"mxu": self.mxu_s, "vpu": self.vpu_s, "eup": self.eup_s, "hbm": self.hbm_s}
        return max(parts, key=parts.get)

    @property
    def total_s(self) -> float:
        return max(self.mxu_s, self.vpu_s, self.eup_s, self.hbm_s) + self.overhead_s


def tile_counts(tables: CT.SlotTables, coarse: CT.Coarse) -> tuple[int, int]:
    """(active tiles whose sub-blocks are all full for every head field, active tiles needing
    mask work), summed over the tables' rows (host tables)."""
    cnt = np.asarray(tables.count)
    words = np.asarray(tables.words).reshape(-1, tables.slots, tables.words_per_slot)
    pattern = np.array([coarse.full_pattern(w) for w in range(coarse.words_per_head)] * tables.head_fields,
                       np.int32)
    used = np.arange(tables.slots)[None, :] < cnt[:, None]
    full = np.all(words == pattern, axis=-1) & used
    return int(full.sum()), int(used.sum() - full.sum())


def pass_cost(kind: str, tables: CT.SlotTables, coarse: CT.Coarse, shape: Shape, gen: str) -> Cost:
    chip = configs.CHIPS[gen]
    peak = chip.peak_bf16_tflops * 1e12
    B, Hq, Hkv, G = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.group
    D, Dv, isz = shape.head_dim, shape.head_dim_v, shape.itemsize
    n_full, n_masked = tile_counts(tables, coarse)
    bcast = B * Hkv // (tables.batch * tables.heads)  # a table row serves this many (b, kv head)
    tile_pairs = coarse.tile_q * coarse.tile_kv
    pairs_full = n_full * bcast * G * tile_pairs
    pairs_masked = n_masked * bcast * G * tile_pairs
    pairs = pairs_full + pairs_masked
    mxu_s = sum(f * pairs / (peak * min(1.0, dim / chip.mxu)) for f, dim in matmuls(kind, D, Dv))
    fast_ops, masked_ops = VPU_OPS[kind]
    vpu_s = (pairs_full * fast_ops + pairs_masked * masked_ops) / chip.vpu_ops_per_s
    eup_s = pairs * (1 + int(shape.softcap)) / chip.eup_per_s
    Sq, Skv = coarse.q.length, coarse.kv.length
    active = (n_full + n_masked) * bcast
    if kind == "fwd":  # q, o, lse once; K/V per active tile
        fixed = B * Sq * Hq * (D + Dv) * isz + B * Hq * Sq * 4
        per_tile = coarse.tile_kv * (D + Dv) * isz
    elif kind == "dq":  # q, do, dq, lse, delta once; K/V per active tile
        fixed = B * Sq * Hq * (2 * D + Dv) * isz + 2 * B * Hq * Sq * 4
        per_tile = coarse.tile_kv * (D + Dv) * isz
    else:  # k, v, dk, dv once; the group's q, do, lse, delta per active tile
        fixed = 2 * B * Skv * Hkv * (D + Dv) * isz
        per_tile = G * coarse.tile_q * ((D + Dv) * isz + 8)
    hbm_bytes = fixed + active * per_tile
    steps = B * Hkv * tables.rows * tables.slots
    return Cost(mxu_s, vpu_s, eup_s, hbm_bytes / (chip.hbm_gbps * 1e9), steps * chip.step_overhead_s, pairs,
                active, n_masked * bcast, steps, hbm_bytes)


def candidates(kind: str, logical: tuple[int, int], q_len: int, kv_len: int, shape: Shape, gen: str):
    """Tile pairs worth trying: the chooser's tiles for each target side, within a VMEM budget."""
    chip = configs.CHIPS[gen]
    align = configs.DEFAULT_TARGETS[gen].align
    out = []
    for tq in TILE_CANDIDATES:
        for tk in TILE_CANDIDATES:
            bq = configs._tile(logical[0], tq, q_len, min(align, tq), None, "block_q")
            bkv = configs._tile(logical[1], tk, kv_len, min(align, tk), None, "block_kv")
            est = configs.vmem_estimate(kind, bq, bkv, shape.group, shape.head_dim, shape.head_dim_v,
                                        shape.itemsize)
            if est <= 0.5 * chip.vmem_bytes and (bq, bkv) not in out:
                out.append((bq, bkv))
    return out


def search(kind: str, block_mask, shape: Shape, gen: str, *, max_subs: int):
    """Cheapest (coarse, tables, cost) over :func:`candidates` (host tables only)."""
    best = None
    q_len, kv_len = block_mask.q_len, block_mask.kv_len
    for bq, bkv in sorted(candidates(kind, block_mask.block_size, q_len, kv_len, shape, gen),
                          key=lambda t: -t[0] * t[1]):
        coarse = CT.Coarse.make(bq, bkv, block_mask.block_size, q_len, kv_len)
        if coarse.subs > max_subs or (best is not None and coarse.n_q_tiles * coarse.n_kv_tiles > MAX_TILE_GRID):
            continue
        tables = CT.build(block_mask, coarse, num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads,
                          transpose=kind == "dkv")
        if tables.smem_bytes > 0.5 * configs.CHIPS[gen].smem_bytes:
            continue
        cost = pass_cost(kind, tables, coarse, shape, gen)
        if best is None or cost.total_s < best[2].total_s:
            best = (coarse, tables, cost)
    return best
