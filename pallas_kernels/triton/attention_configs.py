"""Launch configurations of the Triton block-sparse attention kernels.

A config names the kernel tile (rows x columns of the score tile the MMA
computes), warps and pipeline stages. :func:`forward_config` /
:func:`backward_config` look a problem up in :data:`TUNED_FWD` /
:data:`TUNED_BWD` (filled from ``benchmarks/tune_attention.py`` runs on real
GPUs) and fall back to a heuristic built on the same evidence. Tiles are
*wishes*: ``pallas_kernels.common.attention_tiling`` shrinks them to fit the
block mask's logical blocks and short sequences.

Callers may pass an explicit config to ``forward``/``backward`` (the tuning
script does) or install one for a region of code with :func:`override`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp

SCHEDULES = ("sorted", "reverse", "natural")
GRID_ORDERS = ("heads_first", "tiles_first")


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward kernel launch: ``block_q`` rows (query positions x packed heads) by
    ``block_kv`` keys per step; ``pack_gqa`` None = decide from the shape;
    ``schedule``: order of query tiles ('sorted' heavy rows first from the tables,
    'reverse' last block first, 'natural'). ``num_splits``: split each table row's
    key blocks over this many programs (flash-decoding) and merge their partial
    softmax states; None picks it when there are too few programs to fill the GPU.
    ``lazy_rescale``: move the softmax reference max (and rescale the accumulator) only
    when a row's max grew by more than 2**8 — one branch per step instead of a multiply
    per accumulator element. ``grid_order``: 'heads_first' launches the same query tile of
    every head together; 'tiles_first' launches a head's tiles together (they share its
    K/V in L2). ``prefetch_index``: carry the next block index through the table walk so
    Triton's pipeliner prefetches K/V ``num_stages - 1`` steps ahead (see ``walk``)."""

    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 8
    num_stages: int = 3
    pack_gqa: bool | None = None
    schedule: str = "sorted"
    num_splits: int | None = None  # split-KV: None = decide from the shape, 1 = off
    lazy_rescale: bool = False
    grid_order: str = "heads_first"
    prefetch_index: bool = False

    def __post_init__(self):
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None; got {self.num_splits}")
        _check_pow2(self.block_q, "block_q")
        _check_pow2(self.block_kv, "block_kv")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        _check_choice(self.grid_order, GRID_ORDERS, "grid_order")


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Backward launches: the dQ kernel walks rows (``block_q_dq`` x ``block_kv_dq``),
    the dK/dV kernel walks columns (``block_kv_dkv`` keys resident, ``block_q_dkv``
    queries per step). ``fused_dq``: no dQ kernel; the dK/dV kernel adds dQ with
    float32 atomics (fewer matmuls, run-to-run bit differences). ``grid_order`` and
    ``prefetch_index`` as in :class:`FwdConfig` (for both kernels)."""

    block_q_dq: int = 64
    block_kv_dq: int = 64
    warps_dq: int = 4
    stages_dq: int = 2
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    warps_dkv: int = 4
    stages_dkv: int = 2
    pack_gqa: bool | None = None
    fused_dq: bool = False  # dQ by float32 atomics inside the dK/dV kernel (no dQ kernel)
    grid_order: str = "heads_first"
    prefetch_index: bool = False

    def __post_init__(self):
        for name in ("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"):
            _check_pow2(getattr(self, name), name)
        _check_choice(self.grid_order, GRID_ORDERS, "grid_order")


def _check_pow2(n, name):
    if not (isinstance(n, int) and n > 0 and n & (n - 1) == 0):
        raise ValueError(f"{name} must be a positive power of two; got {n!r}")


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


# Measured configs. Forward key: (device family, padded head dim, input itemsize, shape class)
# with shape class 'decode' (<= 16 query positions per table row; block_q is then derived
# from the rows a packed tile needs, see decode_rows), 'masked' (a mask function evaluated
# inside partial blocks, segment ids or a kv permutation: loads that depend on the block
# index besides K/V's) or 'dense' (none of these: dense or block-granular masks).
# Backward key: (device family, padded head dim, input itemsize). Numbers and the runs they
# come from: benchmarks/notes/block_sparse_attention_gpu.md ("Variants and outcomes").
TUNED_FWD: dict[tuple[str, int, int, str], FwdConfig] = {
    # H100 SXM, jax 0.11.2, B=1 H=16 S=8192 D=128 bf16 (round 1, 2026-11-22):
    # dense 1.275 ms = 431 TFLOP/s (2 CTAs/SM: 98 KB smem, 255 regs);
    ("h100", 128, 2, "dense"): FwdConfig(block_q=128, block_kv=64, num_warps=4, num_stages=3),
    # causal 0.824 ms = 339 TFLOP/s ('reverse' 0.814: 1% faster on causal, 'sorted' kept as the
    # general choice); 128x64/4 warps/3 stages was 0.965 ms here (its 3-buffer partial loop
    # needs 131 KB of shared memory: 1 CTA/SM);
    ("h100", 128, 2, "masked"): FwdConfig(block_q=128, block_kv=128, num_warps=8, num_stages=3),
    # decode Sq=1 Skv=16K B=8 Hq=32 Hkv=8: 0.232 ms (2.3 TB/s of K/V; cuDNN 0.255 ms).
    ("h100", 128, 2, "decode"): FwdConfig(block_q=16, block_kv=64, num_warps=4, num_stages=3),
}
TUNED_BWD: dict[tuple[str, int, int], BwdConfig] = {
    # H100, same shape: dense 4.01 ms, causal 2.04 ms for dQ + dK/dV (round 1); the dK/dV
    # kernel with 4 warps runs 2 CTAs/SM, with 8 warps 1 (7.23 ms with dK/dV 64x64/8 warps).
    ("h100", 128, 2): BwdConfig(128, 128, 8, 2, 64, 64, 4, 2),
}

_OVERRIDE: dict[str, object] = {}


@contextlib.contextmanager
def override(fwd: FwdConfig | None = None, bwd: BwdConfig | None = None) -> Iterator[None]:
    """Use these configs for kernels *traced* inside the block (jit caches what it traced)."""
    saved = dict(_OVERRIDE)
    if fwd is not None:
        _OVERRIDE["fwd"] = fwd
    if bwd is not None:
        _OVERRIDE["bwd"] = bwd
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def device_family() -> str:
    """'h100'-like family name of the first GPU, or 'generic' (CPU / abstract lowering)."""
    try:
        kind = jax.devices("gpu")[0].device_kind.lower()
    except RuntimeError:
        return "generic"
    for fam in ("h100", "h200", "h800", "gh200", "b200", "a100", "l40", "4090"):
        if fam in kind:
            return {"h200": "h100", "h800": "h100", "gh200": "h100"}.get(fam, fam)
    return "generic"


def shape_class(q_span: int, masked: bool) -> str:
    """'decode', 'masked' or 'dense' (the last element of a TUNED_FWD key)."""
    if q_span <= 16:
        return "decode"
    return "masked" if masked else "dense"


def decode_rows(q_span: int, group: int) -> int:
    """Tile rows (block_q) of a decode launch: every query position of a table row times the
    packed heads (16 .. 128 rows), so one program reads each K/V tile once per kv head."""
    return int(min(128, max(16, 1 << max(0, (q_span * group - 1).bit_length()))))


def forward_config(head_dim_pad: int, dtype, q_span: int, *, group: int = 1, masked: bool = True) -> FwdConfig:
    """Config for a forward launch; ``q_span`` = query positions per logical block row,
    ``group`` = query heads a packed tile may hold (1 when packing is impossible),
    ``masked`` = the walk loads more than K/V per block (mask function, segments, permutation)."""
    if "fwd" in _OVERRIDE:
        return _OVERRIDE["fwd"]  # type: ignore[return-value]
    itemsize = jnp.dtype(dtype).itemsize
    kind = shape_class(q_span, masked)
    cfg = TUNED_FWD.get((device_family(), head_dim_pad, itemsize, kind)) or _heuristic_fwd(head_dim_pad, itemsize,
                                                                                            kind)
    if kind == "decode":
        cfg = dataclasses.replace(cfg, block_q=decode_rows(q_span, group))
    return cfg


def _heuristic_fwd(head_dim_pad: int, itemsize: int, kind: str) -> FwdConfig:
    # Registers, shared memory and CTAs/SM from ptxas -v / Triton's allocation of the
    # Pallas-generated kernels (benchmarks/attention_ptx_local.py, sm_90a). On the H100, two
    # CTAs of 4 warps per SM (M=128 each, <= 113 KB of shared memory) beat one CTA of 8 warps:
    # the two warpgroups overlap each other's softmax and MMAs (notes: "Occupancy").
    if kind == "decode":
        return FwdConfig(block_q=16, block_kv=64, num_warps=4, num_stages=3)
    if itemsize == 4:
        return FwdConfig(block_q=64, block_kv=32 if head_dim_pad >= 256 else 64, num_warps=4, num_stages=2)
    if head_dim_pad <= 64:
        return FwdConfig(block_q=128, block_kv=128, num_warps=4, num_stages=2)  # 255 regs, 80 KB: 2 CTAs
    if head_dim_pad <= 128:
        # 3 stages give the mask-evaluating loop a 3-deep K/V ring (131 KB: 1 CTA/SM).
        return FwdConfig(block_q=128, block_kv=64, num_warps=4, num_stages=2 if kind == "masked" else 3)
    return FwdConfig(block_q=64, block_kv=64, num_warps=8, num_stages=2)  # 176 regs, 160 KB


def backward_config(head_dim_pad: int, dtype) -> BwdConfig:
    if "bwd" in _OVERRIDE:
        return _OVERRIDE["bwd"]  # type: ignore[return-value]
    itemsize = jnp.dtype(dtype).itemsize
    tuned = TUNED_BWD.get((device_family(), head_dim_pad, itemsize))
    if tuned is not None:
        return tuned
    if itemsize == 4:
        return BwdConfig(32, 32, 4, 2, 32, 32, 4, 2)
    if head_dim_pad <= 64:
        return BwdConfig(64, 64, 4, 2, 64, 64, 4, 2)  # dQ 128 regs (4 CTAs/SM), dK/dV 192 regs (2 CTAs/SM)
    if head_dim_pad <= 128:
        return BwdConfig(128, 128, 8, 2, 64, 64, 4, 2)  # dQ 226 regs, dK/dV 255 regs (2 CTAs/SM)
    return BwdConfig(64, 32, 8, 2, 64, 32, 8, 2)  # dQ 193, dK/dV 170 regs


def num_sms() -> int:
    """Streaming multiprocessors of the first GPU (132, an H100 SXM, when none is attached)."""
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", 132) or 132)
    except RuntimeError:
        return 132


def auto_splits(programs: int, q_positions: int, kv_steps: int) -> int:
    """Split-KV factor: only for short query tiles (decode, chunked prefill) whose
    programs cannot fill the GPU, keeping at least 4 key tiles per split."""
    if q_positions > 64 or programs >= num_sms() or kv_steps < 8:
        return 1
    want = -(-2 * num_sms() // programs)
    return int(max(1, min(want, kv_steps // 4, 64)))
