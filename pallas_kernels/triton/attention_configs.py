"""Launch configurations of the Triton block-sparse attention kernels.

A config names the kernel tile (rows x columns of the score tile the MMA
computes), warps and pipeline stages. :func:`forward_config` /
:func:`backward_config` look a problem up in :data:`TUNED` (filled from
``benchmarks/tune_attention.py`` runs on real GPUs) and fall back to a
heuristic. Tiles are *wishes*: ``pallas_kernels.common.attention_tiling``
shrinks them to fit the block mask's logical blocks and short sequences.

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


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward kernel launch: ``block_q`` rows (query positions x packed heads) by
    ``block_kv`` keys per step; ``pack_gqa`` None = decide from the shape;
    ``schedule``: order of query tiles ('sorted' heavy rows first from the tables,
    'reverse' last block first, 'natural'). ``num_splits``: split each table row's
    key blocks over this many programs (flash-decoding) and merge their partial
    softmax states; None picks it when there are too few programs to fill the GPU."""

    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 8
    num_stages: int = 3
    pack_gqa: bool | None = None
    schedule: str = "sorted"
    num_splits: int | None = None  # split-KV: None = decide from the shape, 1 = off

    def __post_init__(self):
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None; got {self.num_splits}")
        _check_pow2(self.block_q, "block_q")
        _check_pow2(self.block_kv, "block_kv")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Backward launches: the dQ kernel walks rows (``block_q_dq`` x ``block_kv_dq``),
    the dK/dV kernel walks columns (``block_kv_dkv`` keys resident, ``block_q_dkv``
    queries per step). ``fused_dq``: no dQ kernel; the dK/dV kernel adds dQ with
    float32 atomics (fewer matmuls, run-to-run bit differences)."""

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

    def __post_init__(self):
        for name in ("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"):
            _check_pow2(getattr(self, name), name)


def _check_pow2(n, name):
    if not (isinstance(n, int) and n > 0 and n & (n - 1) == 0):
        raise ValueError(f"{name} must be a positive power of two; got {n!r}")


# (device family, padded head dim, input itemsize) -> config. Measured entries replace
# the heuristic; see benchmarks/notes/block_sparse_attention_gpu.md for the numbers.
TUNED_FWD: dict[tuple[str, int, int], FwdConfig] = {}
TUNED_BWD: dict[tuple[str, int, int], BwdConfig] = {}

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


def forward_config(head_dim_pad: int, dtype, q_span: int) -> FwdConfig:
    """Config for a forward launch; ``q_span`` = query positions per logical block row."""
    if "fwd" in _OVERRIDE:
        return _OVERRIDE["fwd"]  # type: ignore[return-value]
    itemsize = jnp.dtype(dtype).itemsize
    tuned = TUNED_FWD.get((device_family(), head_dim_pad, itemsize))
    if tuned is not None:
        return tuned
    if q_span <= 16:  # decode: M comes from packed heads, keep the kv tile long
        return FwdConfig(block_q=16, block_kv=128 if head_dim_pad <= 128 else 64, num_warps=4, num_stages=3)
    # Registers: ptxas -v (sm_90a) of the Pallas-generated kernels compiled off-GPU with
    # benchmarks/attention_ptx_local.py; every default is spill-free and emits wgmma.
    # (Counts marked <= were taken before the TTIR combine pass, an upper bound.)
    if itemsize == 4:
        return FwdConfig(block_q=64, block_kv=32 if head_dim_pad >= 256 else 64, num_warps=4, num_stages=2)
    if head_dim_pad <= 64:
        return FwdConfig(block_q=128, block_kv=128, num_warps=8, num_stages=3)  # <= 176 regs
    if head_dim_pad <= 128:
        return FwdConfig(block_q=128, block_kv=64, num_warps=8, num_stages=3)  # 167 regs
    return FwdConfig(block_q=64, block_kv=64, num_warps=8, num_stages=2)  # <= 237 regs


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
        return BwdConfig(128, 64, 8, 3, 64, 128, 8, 2)  # dQ <= 144 regs, dK/dV <= 215 regs
    if head_dim_pad <= 128:
        return BwdConfig(64, 64, 4, 2, 64, 64, 8, 2)  # dQ 182 regs, dK/dV 218 regs
    return BwdConfig(64, 32, 8, 2, 64, 32, 8, 2)  # dQ <= 214, dK/dV <= 222 regs (mma.sync: M=32)


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
