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
# Backward key: (device family, padded head dim, input itemsize, 'dense' | 'masked').
# Every entry is a config compiled and timed on that GPU; numbers and the runs they come from:
# benchmarks/notes/block_sparse_attention_gpu.md ("Round 2 outcomes").
TUNED_FWD: dict[tuple[str, int, int, str], FwdConfig] = {
    # H100 SXM, jax 0.11.2, triton 3.6, B=1 H=16 S=8192 bf16 (round 2, 2026-11-22; cuDNN in the
    # same process 0.857 ms dense, 0.557 ms causal):
    # D=128 dense 1.201 ms = 458 TFLOP/s, 0.71x cuDNN (2 CTAs/SM: 98 KB smem, 255 regs). 2 stages
    # 1.233, lazy rescale 1.265-1.283 (slower here), tiles_first 1.280-1.330 at this length; at
    # S=32K the same config with tiles_first wins (see _long_kv below).
    ("h100", 128, 2, "dense"): FwdConfig(block_q=128, block_kv=64, num_warps=4, num_stages=3),
    # D=128 causal (mask function) 0.667 ms = 419 TFLOP/s, 0.84x cuDNN. 2 stages keep every loop at
    # 98 KB (2 CTAs/SM; 3 stages: 131 KB, 1 CTA, 0.962 ms). 'reverse' timed 0.666 ms (a tie):
    # 'sorted' kept, it orders any mask's rows heavy-first, 'reverse' only suits causal.
    ("h100", 128, 2, "masked"): FwdConfig(block_q=128, block_kv=64, num_warps=4, num_stages=2, lazy_rescale=True),
    # D=64 causal 0.481 ms = 290 TFLOP/s, 0.84x cuDNN (0.406 ms); 128x128/4/2 0.484 (tie), round-1
    # heuristic 128x128/8/3 0.585.
    ("h100", 64, 2, "masked"): FwdConfig(block_q=128, block_kv=64, num_warps=4, num_stages=3),
    # D=256 causal 1.376 ms = 406 TFLOP/s, 0.69x cuDNN (0.948 ms); 64x32/4/2 1.646, the round-1
    # heuristic 64x64/8/2 2.601 (0.36x).
    ("h100", 256, 2, "masked"): FwdConfig(block_q=128, block_kv=64, num_warps=8, num_stages=2),
    # decode Sq=1 Skv=16K B=8 Hq=32 Hkv=8: 0.213 ms (2.5 TB/s of K/V; round 1 cuDNN 0.255 ms).
    # Sq=16 (64-row packed tiles): bkv 64 0.286 ms, bkv 128 0.269 ms (see _decode_block_kv).
    ("h100", 128, 2, "decode"): FwdConfig(block_q=16, block_kv=64, num_warps=4, num_stages=3),
}
TUNED_BWD: dict[tuple[str, int, int, str], BwdConfig] = {
    # H100, B=1 H=16 S=8192 D=128 bf16 (round 2). Dense: dQ 64x64/4/2 tiles_first 1.722 ms (479 TFLOP/s
    # executed) + dK/dV 64x64/4/2 tiles_first 2.136 ms (515); fwd+bwd 5.064 ms, 0.70x cuDNN (3.562).
    ("h100", 128, 2, "dense"): BwdConfig(64, 64, 4, 2, 64, 64, 4, 2, grid_order="tiles_first"),
    # Causal: that pair 2.761 ms fwd+bwd, the round-1 pair (dQ 128x128/8/2, heads_first) 2.634 ms =
    # 0.77x cuDNN (2.038): heads_first keeps the heavy-first spread across heads.
    ("h100", 128, 2, "masked"): BwdConfig(128, 128, 8, 2, 64, 64, 4, 2),
}

# K/V bytes per kv head from which the dense-class forward launches 'tiles_first' (H100): at
# S=32K D=128 bf16 (16 MiB per head, all heads 256 MiB >> 50 MB of L2) tiles_first was faster at
# every density (random .5/.2/.1/.05: 9.30/4.00/2.42/1.28 ms vs 11.90/4.74/2.82/1.51 heads_first;
# dense 18.37 vs 18.78); at S=8192 (4 MiB per head) it was slower or equal. Between: not measured.
TILES_FIRST_KV_BYTES = 16 << 20

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


def overridden(kind: str) -> bool:
    """Whether :func:`override` set a ``kind`` ("fwd" / "bwd") config for what is traced now."""
    return kind in _OVERRIDE


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


def forward_config(head_dim_pad: int, dtype, q_span: int, *, group: int = 1, masked: bool = True,
                   kv_len: int | None = None) -> FwdConfig:
    """Config for a forward launch; ``q_span`` = query positions per logical block row,
    ``group`` = query heads a packed tile may hold (1 when packing is impossible),
    ``masked`` = the walk loads more than K/V per block (mask function, segments, permutation),
    ``kv_len`` = key positions (None: unknown; long K/V switch the dense class to tiles_first)."""
    if "fwd" in _OVERRIDE:
        return _OVERRIDE["fwd"]  # type: ignore[return-value]
    itemsize = jnp.dtype(dtype).itemsize
    kind = shape_class(q_span, masked)
    family = device_family()
    cfg = TUNED_FWD.get((family, head_dim_pad, itemsize, kind)) or _heuristic_fwd(head_dim_pad, itemsize, kind)
    if kind == "decode":
        rows = decode_rows(q_span, group)
        cfg = dataclasses.replace(cfg, block_q=rows, block_kv=_decode_block_kv(rows, cfg.block_kv))
    elif kind == "dense" and family == "h100" and _long_kv(kv_len, head_dim_pad, itemsize):
        cfg = dataclasses.replace(cfg, grid_order="tiles_first")
    return cfg


def _long_kv(kv_len: int | None, head_dim_pad: int, itemsize: int) -> bool:
    return kv_len is not None and 2 * kv_len * head_dim_pad * itemsize >= TILES_FIRST_KV_BYTES


def _decode_block_kv(rows: int, block_kv: int) -> int:
    # 64-row packed tiles (Sq=16 x 4 heads): 128 keys per step 0.269 ms vs 64 keys 0.286 (H100);
    # 16-row tiles: 64 keys 0.232 vs 128 keys 0.246 (round 1). Other row counts: not measured.
    return 128 if rows == 64 else block_kv


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
    if head_dim_pad <= 256:
        # H100 D=256 causal: 128x64/8/2 1.376 ms; 64x32/4/2 (2 CTAs) 1.646; 64x64/8/2 2.601.
        return FwdConfig(block_q=128, block_kv=64, num_warps=8, num_stages=2)
    return FwdConfig(block_q=64, block_kv=64, num_warps=8, num_stages=2)  # not measured


def backward_config(head_dim_pad: int, dtype, *, masked: bool = True) -> BwdConfig:
    """Config of the dQ and dK/dV launches; ``masked`` as in :func:`forward_config`."""
    if "bwd" in _OVERRIDE:
        return _OVERRIDE["bwd"]  # type: ignore[return-value]
    itemsize = jnp.dtype(dtype).itemsize
    tuned = TUNED_BWD.get((device_family(), head_dim_pad, itemsize, "masked" if masked else "dense"))
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
