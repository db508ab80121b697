"""Per-TPU-generation facts and default tile sizes for the block-sparse attention kernels.

Why the defaults are what they are (numbers, sources and the model behind them in
``benchmarks/notes/block_sparse_attention_tpu.md`` and ``benchmarks/roofline_tpu.py``):

* A grid step costs a fixed ~0.35 us of pipeline bookkeeping, so a step must
  carry enough MXU work to hide it: on v5e (197 TFLOP/s bf16) a 512 x 512 x 128
  q/kv tile of one head is ~0.7 us of forward MXU time; on v6e (918 TFLOP/s) the
  same tile is ~0.15 us, so v6e wants twice the rows per step.
* K/V are re-read from HBM once per query tile. Per step the kernel moves
  ``bkv * (D + Dv) * 2`` bytes of K/V and does ``4 * rows * bkv * D`` FLOPs
  (rows = query positions x GQA heads in the tile), an arithmetic intensity of
  ``rows`` FLOP/byte: above the ridge point (v5e ~240, v6e ~560 FLOP/byte) the
  kernel is MXU-bound.
* Lane dims are multiples of 128 (the vreg is 8 x 128); the v6e MXU is 256 x 256,
  so its tiles are multiples of 256 where the logical blocks allow.
* VMEM (128 MiB on v5e / v6e) is not the limit for these tiles; the scoped-VMEM
  limit is raised when the estimate gets near the compiler's default.
* Block tables live in SMEM (1 MiB up to v6e); the wrapper checks their size.

These defaults serve traced tables; with concrete tables the kernels pick tiles
with :mod:`pallas_kernels.tpu.cost_model` instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
    """Facts about one TPU generation, per TensorCore.

    Published: peak, HBM bandwidth (Cloud TPU docs), VMEM / SMEM sizes, MXU shape
    (``jax/_src/tpu_info.py``). Estimates, to calibrate on hardware: the VPU rate
    (8 x 128 lanes x 4 VALU slots per cycle), the EUP rate (one 8 x 128 vreg of
    transcendentals per 2 cycles), the clock where unpublished (v6e: assumed 2x
    v5e's VPU/EUP rates) and the fixed cost of a grid step.
    """

    name: str
    peak_bf16_tflops: float
    hbm_gbps: float
    vmem_bytes: int
    scoped_vmem_default: int
    smem_bytes: int
    mxu: int  # systolic array side
    num_mxu: int
    vpu_ops_per_s: float
    eup_per_s: float
    step_overhead_s: float = 0.35e-6


def _vpu(ghz):
    return 4 * 8 * 128 * ghz * 1e9


def _eup(ghz):
    return 8 * 128 / 2 * ghz * 1e9


CHIPS = {
    "v4": Chip("v4", 137.5, 614.0, 16 * MIB, 16 * MIB, 1 * MIB, 128, 4, _vpu(1.05), _eup(1.05)),
    "v5e": Chip("v5e", 197.0, 819.0, 128 * MIB, 16 * MIB, 1 * MIB, 128, 4, _vpu(1.5), _eup(1.5)),
    "v5p": Chip("v5p", 229.5, 1382.0, 64 * MIB, 16 * MIB, 1 * MIB, 128, 4, _vpu(1.75), _eup(1.75)),
    "v6e": Chip("v6e", 918.0, 1638.0, 128 * MIB, 32 * MIB, 1 * MIB, 256, 2, 2 * _vpu(1.5), 2 * _eup(1.5)),
}


@dataclasses.dataclass(frozen=True)
class TileTargets:
    """Targets the tile chooser aims for (tiles stay multiples of the logical blocks where it can).

    rows: query positions x GQA heads per forward / dQ step; block_q_max caps the
    positions; block_kv: keys per step; dkv_block_q / dkv_block_kv: the dK/dV pass
    (its rows are kv positions, so it prefers a large kv tile and a moderate q tile).
    """

    rows: int
    block_q_max: int
    block_kv: int
    dkv_block_q: int
    dkv_block_kv: int
    align: int  # preferred multiple for tile sides (MXU side)


# Defaults for traced tables (concrete tables get a cost-model search instead). Chosen with
# benchmarks/roofline_tpu.py: with the ~0.35 us step cost, 128-row GQA tiles spend as long
# in step overhead as in the MXU; the search settles on 512 x 512 (v5e) and 1024 x 512
# (v6e) for causal / window / document masks, 1024 x 1024 for dense ones.
DEFAULT_TARGETS = {
    "v4": TileTargets(rows=2048, block_q_max=512, block_kv=512, dkv_block_q=512, dkv_block_kv=512, align=128),
    "v5e": TileTargets(rows=2048, block_q_max=512, block_kv=512, dkv_block_q=512, dkv_block_kv=512, align=128),
    "v5p": TileTargets(rows=2048, block_q_max=512, block_kv=512, dkv_block_q=512, dkv_block_kv=512, align=128),
    "v6e": TileTargets(rows=4096, block_q_max=1024, block_kv=512, dkv_block_q=512, dkv_block_kv=512, align=256),
}

OFF_TPU_GENERATION = "v6e"  # what export / interpret mode assume when no TPU is attached


def generation(device=None) -> str:
    """'v4', 'v5e', 'v5p' or 'v6e' from the device kind (newer chips map to 'v6e')."""
    if device is None:
        try:
            devs = jax.devices("tpu")
        except RuntimeError:
            return OFF_TPU_GENERATION
        device = devs[0]
    kind = getattr(device, "device_kind", "").lower()
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        return "v5e"
    if "v5" in kind:
        return "v5p"
    if "v4" in kind:
        return "v4"
    return "v6e"


@dataclasses.dataclass(frozen=True)
class Override:
    """Explicit tile sizes (multiples of 128), None = default."""

    block_q: int | None = None
    block_kv: int | None = None
    dkv_block_q: int | None = None
    dkv_block_kv: int | None = None
    generation: str | None = None
    vmem_limit_bytes: int | None = None
    search: bool = True  # pick tiles with the cost model when the tables are concrete


_OVERRIDE: contextvars.ContextVar[Override] = contextvars.ContextVar("sparse_jax_tpu_attention", default=Override())


@contextlib.contextmanager
def override(**kwargs):
    """Use explicit tile sizes / generation while tracing inside the ``with`` block.

    >>> with configs.override(block_q=256, block_kv=512):
    ...     o = sparse_jax.block_sparse_attention(q, k, v, bm, backend="mosaic_tpu")

    Read at trace time: a function jitted earlier keeps the tiles it was traced with.
    """
    token = _OVERRIDE.set(dataclasses.replace(_OVERRIDE.get(), **kwargs))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def current_override() -> Override:
    return _OVERRIDE.get()


def _tile(logical: int, target: int, length: int, align: int, explicit: int | None, what: str) -> int:
    """Kernel tile along one axis: a multiple of 128 near ``target``, never longer than needed.

    Logical blocks that divide or are multiples of 128 (or whose lcm with 128 is
    small) get tiles that are whole multiples of them (aligned: the sub-block
    pattern of a tile is static). Other block sizes get plain 128-multiples that
    may start inside a logical block.
    """
    cap = 128 * -(-length // 128)
    if explicit is not None:
        if explicit % 128:
            raise ValueError(f"{what}={explicit} must be a multiple of 128")
        return explicit
    unit = logical * 128 // math.gcd(logical, 128)  # lcm(logical, 128)
    if unit <= max(2 * target, 128):
        aligned_unit = unit * align // math.gcd(unit, align)
        if aligned_unit > target or aligned_unit > -(-length // unit) * unit:
            aligned_unit = unit
        n = max(1, target // aligned_unit)
        return min(n * aligned_unit, unit * -(-length // unit))
    return min(align * max(1, target // align), cap)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Kernel tile sizes (multiples of 128) and the scoped-VMEM limit to ask for (None: default)."""

    block_q: int
    block_kv: int
    vmem_limit_bytes: int | None


def choose_tiles(kind: str, *, logical: tuple[int, int], q_len: int, kv_len: int, group: int,
                 head_dim: int, head_dim_v: int, itemsize: int) -> Tiles:
    """Tiles for pass ``kind`` ('fwd', 'dq' or 'dkv') of one problem."""
    ov = current_override()
    gen = ov.generation or generation()
    t = DEFAULT_TARGETS[gen]
    lq, lk = logical
    if kind == "dkv":
        target_q, target_kv = t.dkv_block_q, t.dkv_block_kv
        exp_q, exp_kv = ov.dkv_block_q or ov.block_q, ov.dkv_block_kv or ov.block_kv
    else:
        target_q = min(t.block_q_max, max(128, t.rows // max(group, 1)))
        target_kv = t.block_kv
        exp_q, exp_kv = ov.block_q, ov.block_kv
    bq = _tile(lq, target_q, q_len, t.align, exp_q, "block_q")
    bkv = _tile(lk, target_kv, kv_len, t.align, exp_kv, "block_kv")
    return Tiles(bq, bkv, vmem_limit(vmem_estimate(kind, bq, bkv, group, head_dim, head_dim_v, itemsize), gen))


def vmem_limit(estimate: int, gen: str) -> int | None:
    """Scoped-VMEM limit to ask for (None: the compiler's default suffices)."""
    ov = current_override()
    if ov.vmem_limit_bytes is not None:
        return ov.vmem_limit_bytes
    chip = CHIPS[gen]
    if estimate <= 0.6 * chip.scoped_vmem_default:
        return None
    return int(min(0.75 * chip.vmem_bytes, max(2 * estimate, chip.scoped_vmem_default)))


def vmem_estimate(kind: str, bq: int, bkv: int, group: int, d: int, dv: int, itemsize: int) -> int:
    """Bytes of VMEM one grid step holds (double-buffered blocks, scratch, f32 temporaries)."""
    lanes = 128
    q = bq * group * d * itemsize
    do_o = bq * group * dv * itemsize
    kv = bkv * (d + dv) * itemsize
    rowstats = 2 * group * bq * 4  # lse / delta rows
    temps = 4 * bq * bkv * 4  # logits, probabilities, mask, dP / dS
    if kind == "fwd":
        return 2 * (q + kv + do_o) + rowstats + group * bq * (2 * lanes + dv) * 4 + temps
    if kind == "dq":
        return 2 * (q + kv + 2 * do_o) + 2 * rowstats + group * bq * d * 4 + temps
    return 2 * (q + do_o + kv) + 2 * (bkv * (d + dv) * itemsize) + 2 * rowstats + bkv * (d + dv) * 4 + temps
