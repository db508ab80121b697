"""The grouped-matmul benchmark cases, shared by ``benchmarks/moe_gmm.py`` and ``benchmarks/tune_gmm.py``.

Expert FFN shapes of three MoE models (one gmm: [M, K] x [E, K, N]); M = tokens x top_k
rows sorted by expert, spread uniformly or Zipf(1.2) over the experts.
"""

from __future__ import annotations

import numpy as np

# name -> (E, K, N): the up/gate projection of one expert FFN.
MODELS = {
    "mixtral-8x7b": (8, 4096, 14336),
    "deepseek-v3": (256, 7168, 2048),
    "qwen2-57b-a14b": (64, 3584, 2560),
}
ROWS = (512, 4096, 32768)
DISTS = ("uniform", "zipf1.2")


def group_sizes(M: int, E: int, dist: str, seed: int = 0) -> np.ndarray:
    """int32 [E] summing to M: equal shares (remainder to the first experts), or Zipf(1.2)
    shares in a random expert order (largest-remainder rounding)."""
    if dist == "uniform":
        sizes = np.full(E, M // E, np.int64)
        sizes[: M % E] += 1
        return sizes.astype(np.int32)
    if not dist.startswith("zipf"):
        raise ValueError(f"unknown distribution {dist!r}")
    a = float(dist[4:] or 1.2)
    p = 1.0 / np.arange(1, E + 1) ** a
    p = p / p.sum()
    raw = p * M
    sizes = np.floor(raw).astype(np.int64)
    short = M - sizes.sum()
    sizes[np.argsort(raw - sizes)[::-1][:short]] += 1
    return np.random.default_rng(seed).permutation(sizes).astype(np.int32)


def weight_bytes(sizes, K: int, N: int, itemsize: int, num_rhs: int = 1) -> float:
    """Bytes of the weights a gmm must read: the non-empty groups' [K, N] matrices."""
    return float(np.count_nonzero(np.asarray(sizes)) * K * N * itemsize * num_rhs)


def gmm_flops(M: int, K: int, N: int, num_products: int = 1) -> float:
    return 2.0 * M * K * N * num_products


def case_name(model: str, M: int, dist: str) -> str:
    return f"{model} M={M} {dist}"
