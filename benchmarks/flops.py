"""Work counted for each benchmark, one way for sparse_jax and its peers alike.

Attention counts the (query, key) pairs of *computed* blocks (partial and full blocks of
the BlockMask, ragged edge blocks clipped to their valid rows and columns); a dense
causal kernel is counted over the blocks of a causal mask at the same block size, since
it computes the diagonal blocks whole too. Forward: two matmuls, ``2 * pairs * (D + Dv)``.
Backward (fwd+bwd, FlashAttention-2's count): the forward plus recomputing S, dV, dP, dQ
and dK, ``2 * pairs * (4 D + 3 Dv)`` in all (3.5x the forward when D == Dv).

Grouped matmul: ``2 M K N`` forward (M = rows in groups), three such matmuls fwd+bwd.
MoE FFN: gate, up and down per routed token, ``6 T k D F`` (+ the router, ``2 T D E``),
three times that fwd+bwd.
"""

from __future__ import annotations

import numpy as np


def attention_pairs(block_mask, B: int, Hq: int) -> int:
    """(query, key) pairs in computed blocks, over all B x Hq (query) heads."""
    grid = np.asarray(block_mask.block_classes()) > 0  # [bb, bh, nQb, nKb]
    bq, bkv = block_mask.block_size
    qlen = np.minimum(bq, block_mask.q_len - bq * np.arange(grid.shape[-2])).astype(np.int64)
    kvlen = np.minimum(bkv, block_mask.kv_len - bkv * np.arange(grid.shape[-1])).astype(np.int64)
    per_bh = np.einsum("bhij,i,j->bh", grid.astype(np.int64), qlen, kvlen)
    bb, bh = grid.shape[:2]
    if B % bb or Hq % bh:
        raise ValueError(f"block mask [{bb}, {bh}] does not broadcast to B={B}, Hq={Hq}")
    return int(per_bh.sum()) * (B // bb) * (Hq // bh)


def dense_block_mask(Sq: int, Skv: int, causal: bool, block_size: int = 128):
    """The block mask a dense (causal) kernel effectively computes, for counting its work."""
    from sparse_jax import create_block_mask, masks
    return create_block_mask(masks.causal if causal else masks.full, None, None, Sq, Skv, block_size)


def attention_flops(block_mask, B: int, Hq: int, D: int, Dv: int | None = None, *, backward: bool = False) -> float:
    pairs = attention_pairs(block_mask, B, Hq)
    Dv = D if Dv is None else Dv
    return float(2 * pairs * ((4 * D + 3 * Dv) if backward else (D + Dv)))


def attention_bytes(B, Sq, Skv, Hq, Hkv, D, itemsize, Dv=None, *, backward: bool = False) -> float:
    """Minimum HBM traffic: read q, k, v, write o (and read do, o, write dq, dk, dv backward)."""
    Dv = D if Dv is None else Dv
    q, kv, o = B * Sq * Hq * D, B * Skv * Hkv * (D + Dv), B * Sq * Hq * Dv
    n = q + kv + o
    if backward:
        n += 2 * o + q + kv  # do and o read, dq dk dv written (lse ignored)
    return float(n * itemsize)


def gmm_flops(M: int, K: int, N: int, *, backward: bool = False) -> float:
    return float(2 * M * K * N * (3 if backward else 1))


def gmm_bytes(M, K, N, G, itemsize, *, backward: bool = False) -> float:
    n = M * K + G * K * N + M * N
    return float(n * itemsize * (3 if backward else 1))


def moe_flops(T: int, D: int, F: int, E: int, top_k: int, *, backward: bool = False) -> float:
    fwd = 6 * T * top_k * D * F + 2 * T * D * E
    return float(fwd * (3 if backward else 1))


def moe_bytes(T, D, F, E, top_k, itemsize, *, backward: bool = False) -> float:
    """Weights read once, tokens in and out, the routed copies of h written and read."""
    n = 3 * E * D * F + 2 * T * D + 2 * T * top_k * (D + 3 * F)
    return float(n * itemsize * (2 if backward else 1))
