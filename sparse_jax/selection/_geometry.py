"""Block-grid geometry shared by the selection functions (static, numpy).

Queries are aligned to the *end* of the keys (bottom-right): query row ``i`` sits at
absolute position ``i + offset`` with ``offset = kv_len - q_len`` (0 for self-attention
prefill, positive for chunked prefill against a cache). Everything here depends only
on static shapes, so it is computed once with numpy and enters traces as constants of
size [nQb, nKb] (1 MiB of bools at 128K with 128-blocks).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
    """Block layout of a (q_len, kv_len) attention problem with square blocks ``block``."""

    q_len: int
    kv_len: int
    block: int

    def __post_init__(self):
        for name in ("q_len", "kv_len", "block"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

    @property
    def nq(self) -> int:
        return -(-self.q_len // self.block)

    @property
    def nk(self) -> int:
        return -(-self.kv_len // self.block)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    def q_range(self):
        """First/last absolute position of each query block (int64 [nQb])."""
        lo = np.arange(self.nq) * self.block
        hi = np.minimum(lo + self.block, self.q_len) - 1
        return lo + self.offset, hi + self.offset

    def kv_range(self):
        lo = np.arange(self.nk) * self.block
        return lo, np.minimum(lo + self.block, self.kv_len) - 1

    def q_rows(self):
        """Valid query rows per block (int64 [nQb])."""
        lo, hi = self.q_range()
        return hi - lo + 1


def _frozen(a: np.ndarray) -> np.ndarray:
    """Cached arrays are shared by every caller: read-only, so a mutation raises at once."""
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=64)
def causal_blocks(grid: Grid) -> np.ndarray:
    """bool [nQb, nKb]: the block holds at least one (q, kv) pair with kv <= q."""
    q_lo, q_hi = grid.q_range()
    kv_lo, _ = grid.kv_range()
    return _frozen(kv_lo[None, :] <= q_hi[:, None])


@functools.lru_cache(maxsize=64)
def local_blocks(grid: Grid) -> np.ndarray:
    """bool [nQb, nKb]: kv blocks holding some query's own position (the diagonal)."""
    q_lo, q_hi = grid.q_range()
    kv_lo, kv_hi = grid.kv_range()
    return _frozen((kv_lo[None, :] <= q_hi[:, None]) & (kv_hi[None, :] >= q_lo[:, None]))


@functools.lru_cache(maxsize=64)
def sink_blocks(grid: Grid) -> np.ndarray:
    """bool [nQb, nKb]: the first kv block (attention sinks live there)."""
    out = np.zeros((grid.nq, grid.nk), bool)
    out[:, 0] = True
    return _frozen(out)


def allowed_blocks(grid: Grid, causal: bool) -> np.ndarray:
    return causal_blocks(grid) if causal else np.ones((grid.nq, grid.nk), bool)


def forced_blocks(grid: Grid, *, causal: bool, force_sink: bool, force_local: bool) -> np.ndarray:
    """bool [nQb, nKb]: blocks kept whatever the scores say (within the allowed ones)."""
    out = np.zeros((grid.nq, grid.nk), bool)
    if force_sink:
        out |= sink_blocks(grid)
    if force_local:
        out |= local_blocks(grid)
    return out & allowed_blocks(grid, causal)


def max_local_per_row(grid: Grid) -> int:
    """Static bound on the partial (diagonal) blocks a causal row can hold."""
    return max(1, int(local_blocks(grid).sum(-1).max(initial=1)))
