"""Cheap estimates of where attention mass lies, per block or per key.

Layouts follow the ops: q [B, Sq, Hq, D], k [B, Skv, Hkv, D] (Hq a multiple of Hkv;
query head ``h`` reads kv head ``h // (Hq // Hkv)``). Queries sit at the end of the keys
(absolute position ``i + Skv - Sq``). Scores are float32.

* :func:`pooled_block_logits` / :func:`pooled_block_scores`: mean- or max-pooled q and k
  per block, one logit per block pair (MoBA / SeerAttention / PBS). O(S^2 D / b^2).
* :func:`antidiagonal_block_scores`: XAttention's estimate, the softmax mass of each
  block measured on the sums of its antidiagonals (stride ``s``), at 1/s of the QK^T
  FLOPs. Triton kernel on GPU (``pallas_kernels/triton/block_scores.py``), chunked jnp
  elsewhere (this file; also the reference the kernel is tested against).
* :func:`last_block_importance`: per key, the attention the last queries pay it
  (PBS's permutation key; MInference's vertical estimate).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import backends
from sparse_jax.selection import _geometry as geo

__all__ = ["pool_blocks", "pooled_block_logits", "pooled_block_scores", "block_softmax",
           "antidiagonal_block_scores", "antidiagonal_block_scores_xla", "last_block_importance",
           "last_queries_probs"]

_HIGHEST = jax.lax.Precision.HIGHEST


def check_qk(q, k):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, S, H, D]; got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    for name, x in (("q", q), ("k", k)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array; got {x.dtype}")


def check_causal_lengths(q_len: int, kv_len: int, causal: bool):
    if causal and q_len > kv_len:
        raise ValueError(f"causal selection needs q_len <= kv_len (queries are the last positions); "
                         f"got q_len={q_len}, kv_len={kv_len}")


def pool_blocks(x, block: int, mode: str = "mean"):
    """[B, S, H, D] -> float32 [B, nb, H, D]: mean or max over each block's valid rows."""
    if mode not in ("mean", "max"):
        raise ValueError(f"pooling must be 'mean' or 'max'; got {mode!r}")
    b, s, h, d = x.shape
    nb = -(-s // block)
    pad = nb * block - s
    xf = x.astype(jnp.float32)
    if mode == "mean":
        xf = jnp.pad(xf, ((0, 0), (0, pad), (0, 0), (0, 0)))
        counts = np.minimum(block, s - np.arange(nb) * block).astype(np.float32)
        return xf.reshape(b, nb, block, h, d).sum(2) / counts[None, :, None, None]
    xf = jnp.pad(xf, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=-jnp.inf)
    return xf.reshape(b, nb, block, h, d).max(2)


def pooled_block_logits(q, k, *, block_size: int = 128, pooling: str = "mean", scale: float | None = None):
    """float32 [B, Hq, nQb, nKb]: scale * pool(q_block) . pool(k_block)."""
    check_qk(q, k)
    hq, hkv = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pq = pool_blocks(q, block_size, pooling)  # [B, nq, Hq, D]
    pk = pool_blocks(k, block_size, pooling)  # [B, nk, Hkv, D]
    b, nq, _, d = pq.shape
    pq = pq.reshape(b, nq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", pq, pk, precision=_HIGHEST) * scale
    return s.reshape(b, hq, nq, pk.shape[1])


def block_softmax(logits, allowed):
    """Softmax of ``logits`` [..., nKb] over ``allowed`` (broadcastable bool); 0 elsewhere."""
    x = jnp.where(allowed, logits, -jnp.inf)
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(allowed, jnp.exp(x - m), 0.0)
    z = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(z > 0, z, 1.0)


def pooled_block_scores(q, k, *, block_size: int = 128, pooling: str = "mean", causal: bool = True,
                        scale: float | None = None, allowed=None):
    """float32 [B, Hq, nQb, nKb]: softmax over the allowed blocks of the pooled logits.

    ``allowed`` (bool [nQb, nKb]) overrides the default candidates (causal blocks, or all).
    """
    check_qk(q, k)
    grid = geo.Grid(q.shape[1], k.shape[1], block_size)
    check_causal_lengths(grid.q_len, grid.kv_len, causal)
    if allowed is None:
        allowed = geo.allowed_blocks(grid, causal)
    logits = pooled_block_logits(q, k, block_size=block_size, pooling=pooling, scale=scale)
    return block_softmax(logits, jnp.asarray(allowed))


# -- XAttention's antidiagonal estimate --------------------------------------------------------
def _check_stride(block_size: int, stride: int):
    if stride <= 0 or block_size % stride:
        raise ValueError(f"stride ({stride}) must be a positive divisor of block_size ({block_size})")


def strided_views(q, k, stride: int, pad_to: int):
    """Reshaped q, k of XAttention, float32, padded with zeros to multiples of ``pad_to`` tokens.

    Returns qr [B, Hq, Mq, stride*D] with qr[i] = concat_j q[i*s + s-1-j] and kr [B, Hkv, Mk,
    stride*D] with kr[m] = concat_j k[m*s + j], so qr[i] . kr[m] sums the antidiagonal of
    the s x s tile (i, m) of QK^T.
    """
    def prep(x, reverse):
        b, s, h, d = x.shape
        n = -(-s // pad_to) * pad_to
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n - s), (0, 0), (0, 0)))
        x = x.reshape(b, n // stride, stride, h, d)
        if reverse:
            x = x[:, :, ::-1]
        return x.transpose(0, 3, 1, 2, 4).reshape(b, h, n // stride, stride * d)
    return prep(q, True), prep(k, False)


def antidiagonal_block_scores_xla(q, k, *, block_size: int = 128, stride: int = 8, causal: bool = True,
                                  scale: float | None = None, rows_per_chunk: int = 512, max_chunks: int = 64):
    """Pure-jnp :func:`antidiagonal_block_scores`, in static chunks of reshaped query rows.

    Memory O(B Hq rows_per_chunk Skv / stride); each chunk only multiplies the keys its
    rows can see (causal: about half the square). At most ``max_chunks`` chunks are
    unrolled (the chunk grows for longer inputs).
    """
    check_qk(q, k)
    _check_stride(block_size, stride)
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    check_causal_lengths(sq, skv, causal)
    grid = geo.Grid(sq, skv, block_size)
    scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) / stride
    r = block_size // stride  # reshaped rows (and columns) per block
    qr, kr = strided_views(q, k, stride, block_size)
    mq, mk = qr.shape[2], kr.shape[2]
    chunk = max(r, min(-(-rows_per_chunk // r) * r, mq))
    if -(-mq // chunk) > max_chunks:
        chunk = -(-mq // max_chunks // r) * r
    qr = qr.reshape(b, hkv, hq // hkv, mq, stride * d)
    reach = (stride - 1 + grid.offset) // stride  # row i sees reshaped keys m <= i + reach
    outs = []
    for start in range(0, mq, chunk):
        stop = min(start + chunk, mq)
        n_cols = mk if not causal else min(mk, -(-(stop - 1 + reach + 1) // r) * r)
        row = np.arange(start, stop)
        col = np.arange(n_cols)
        ok = (col * stride < skv)[None, :]
        if causal:
            ok = ok & (col[None, :] <= row[:, None] + reach)
        s = jnp.einsum("bhgid,bhmd->bhgim", qr[:, :, :, start:stop], kr[:, :, :n_cols], precision=_HIGHEST)
        p = block_softmax(s * scale, ok)
        p = p * (row * stride < sq)[:, None]  # padded query rows carry no mass
        p = p.reshape(*p.shape[:-1], n_cols // r, r).sum(-1)
        p = p.reshape(*p.shape[:3], (stop - start) // r, r, n_cols // r).sum(4)
        outs.append(jnp.pad(p, ((0, 0),) * 4 + ((0, mk // r - n_cols // r),)))
    out = jnp.concatenate(outs, axis=3).reshape(b, hq, mq // r, mk // r)
    return normalize_rows(out[:, :, :grid.nq, :grid.nk], grid, stride)


def normalize_rows(block_sums, grid: geo.Grid, stride: int):
    """Divide summed probabilities by the reshaped rows of each query block (rows sum to 1)."""
    rows = np.maximum(1, -(-grid.q_rows() // stride)).astype(np.float32)
    return block_sums / rows[:, None]


def antidiagonal_block_scores(q, k, *, block_size: int = 128, stride: int = 8, causal: bool = True,
                              scale: float | None = None, backend: str | None = None, interpret: bool = False):
    """XAttention block importance: float32 [B, Hq, nQb, nKb], rows summing to 1.

    Each s x s tile of QK^T is summarised by the sum of its antidiagonal (every row and
    every column of the tile is hit once, so both vertical and slash lines register);
    those sums, scaled by ``scale / stride`` (scale defaults to 1/sqrt(D)), are
    softmaxed per reshaped query row over the allowed reshaped keys (causal: key group
    m visible to row group i when m*s <= i*s + s - 1 + (Skv - Sq)), and the
    probabilities are summed per (query block, kv block) and divided by the reshaped
    rows of the block.

    backend: "triton" runs the fused Pallas kernel (block_size / stride a power of two
    <= 256 and a launch config within shared memory for D; otherwise the jnp version); "xla" (and "mosaic_tpu", which has no kernel for
    this yet) the chunked jnp version. Lengths need not be multiples of
    the block or the stride (zero padding, masked).
    """
    check_qk(q, k)
    _check_stride(block_size, stride)
    name = backends.resolve(backend, op="antidiagonal_block_scores")
    check_causal_lengths(q.shape[1], k.shape[1], causal)
    if name == backends.TRITON:
        from pallas_kernels.triton import block_scores as kernel
        if kernel.supported(block_size, stride) and kernel.launch_config(q.shape[-1], q.dtype,
                                                                         block_size // stride) is not None:
            sums = kernel.antidiagonal_block_sums(q, k, block_size=block_size, stride=stride, causal=causal,
                                                  scale=scale, interpret=interpret)
            return normalize_rows(sums, geo.Grid(q.shape[1], k.shape[1], block_size), stride)
    return antidiagonal_block_scores_xla(q, k, block_size=block_size, stride=stride, causal=causal, scale=scale)


# -- per-key importance from the last queries ----------------------------------------------------
def last_queries_probs(q_last, k, *, q_positions, scale: float | None = None, causal: bool = True):
    """Softmax probabilities of a few queries over all keys, float32 [B, Hq, R, Skv].

    q_last: [B, R, Hq, D] at absolute positions ``q_positions`` int [R].
    """
    b, rq, hq, d = q_last.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qg = q_last.astype(jnp.float32).reshape(b, rq, hkv, hq // hkv, d)
    s = jnp.einsum("brhgd,bkhd->bhgrk", qg, k.astype(jnp.float32), precision=_HIGHEST) * scale
    ok = jnp.ones((rq, k.shape[1]), bool)
    if causal:
        ok = jnp.arange(k.shape[1])[None, :] <= jnp.asarray(q_positions)[:, None]
    return block_softmax(s, ok).reshape(b, hq, rq, k.shape[1])


def _dot_f32(a, b, spec):
    """einsum with float32 results: 16-bit inputs multiply exactly into a float32 accumulator
    (tensor cores); float32 inputs at HIGHEST precision."""
    prec = _HIGHEST if a.dtype == jnp.float32 or b.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, precision=prec, preferred_element_type=jnp.float32)


def last_block_importance(q, k, *, rows: int = 128, causal: bool = True, scale: float | None = None,
                          per_kv_head: bool = True):
    """How much attention the last ``rows`` queries pay each key (PBS's permutation key).

    The softmax of Q_last K^T, averaged over those rows (and over the query heads of a
    group when ``per_kv_head``). Returns float32 [B, Hkv, Skv] (or [B, Hq, Skv]). Work
    is done one kv head at a time (memory O(B G rows Skv)). Causal: keys before the last
    ``rows`` positions are visible to all of them, so only the trailing [rows, rows]
    square is masked (no [rows, Skv] mask in the program).
    """
    check_qk(q, k)
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    check_causal_lengths(sq, skv, causal)
    rows = max(1, min(int(rows), sq))
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q_last = q[:, sq - rows:].reshape(b, rows, hkv, g, d).transpose(2, 0, 1, 3, 4)  # [Hkv, B, R, G, D]
    kh = k.transpose(2, 0, 1, 3)  # [Hkv, B, Skv, D]
    head = skv - rows if causal else skv  # keys every row sees
    # Row r (absolute position skv - rows + r) sees tail key c (position skv - rows + c) iff c <= r.
    tail_ok = np.tril(np.ones((rows, rows), bool))

    def one(args):
        qh, kk = args  # [B, R, G, D], [B, Skv, D]
        parts = [_dot_f32(qh, kk[:, :head], "brgd,bkd->bgrk") * scale] if head > 0 else []
        if causal:
            t = _dot_f32(qh, kk[:, head:], "brgd,bkd->bgrk") * scale
            parts.append(jnp.where(tail_ok, t, -jnp.inf))
        m = jnp.max(jnp.stack([jnp.max(x, axis=-1) for x in parts]), axis=0)[..., None]  # [B, G, R, 1]
        z = sum(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True) for x in parts)
        axes = 2 if not per_kv_head else (1, 2)
        # Normalise and average each part on its own (XLA fuses the exp into the reduction),
        # concatenating only the [B, (G,) Skv] results.
        return jnp.concatenate([jnp.mean(jnp.exp(x - m) / z, axis=axes) for x in parts], axis=-1)

    out = jax.lax.map(one, (q_last, kh))  # [Hkv, B, (G,) Skv]
    if per_kv_head:
        return out.transpose(1, 0, 2)
    return out.transpose(1, 0, 2, 3).reshape(b, hq, skv)
