"""Pure-jnp references of indexed attention (token / block lists) and of the indexers.

Gather-based and memory-sane: work is split into chunks of queries under
``jax.checkpoint`` (and ``lax.map``), so memory is O(chunk x n x D) for the attention
and O(chunk x Skv) for the indexer scores, forward and backward. These are the
oracles of the kernel tests and the ``xla`` backend of the public ops.

Semantics (the kernels implement the same):

* ``indices int32 [B, Sq, Hkv, n]``: query ``t`` of kv-head group ``h`` attends to the
  *set* of listed keys (block variant: of keys in the listed blocks). A key listed
  twice counts once. ``-1``, negative values, values ``>= Skv`` (blocks: ``>=
  cdiv(Skv, block_size)``) and, when ``causal``, keys after the query are ignored.
* The query's absolute position is ``t + q_offset[b]``; ``q_offset=None`` means
  ``Skv - Sq`` (bottom-right aligned, the last query sees every key).
* Softmax in float32; a row with no allowed key gives ``o = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_ELEMS_PER_CHUNK = 1 << 22  # gathered (query, key, feature) elements per chunk


def query_offsets(q_offset, B: int, Sq: int, Skv: int):
    """``q_offset`` (None, int, or int [B]) -> int32 [B]; None means ``Skv - Sq``."""
    if q_offset is None:
        return jnp.full((B,), Skv - Sq, jnp.int32)
    off = jnp.asarray(q_offset)
    if not jnp.issubdtype(off.dtype, jnp.integer):
        raise ValueError(f"q_offset must be an integer or integer array; got {off.dtype}")
    if off.ndim == 0:
        return jnp.full((B,), off, jnp.int32)
    if off.shape != (B,):
        raise ValueError(f"q_offset must be a scalar or [B={B}]; got shape {tuple(off.shape)}")
    return off.astype(jnp.int32)


def first_occurrence(units):
    """bool [..., n]: the slot holds the first occurrence of its value in the row."""
    order = jnp.argsort(units, axis=-1, stable=True)
    srt = jnp.take_along_axis(units, order, axis=-1)
    dup_sorted = jnp.concatenate([jnp.zeros_like(srt[..., :1], bool), srt[..., 1:] == srt[..., :-1]], axis=-1)
    inverse = jnp.argsort(order, axis=-1)
    return ~jnp.take_along_axis(dup_sorted, inverse, axis=-1)


def _allowed_tokens(indices, off, Skv, causal):
    """bool [B, Sq, Hkv, n]: listed keys that are in range, not in the future, counted once."""
    Sq = indices.shape[1]
    t_abs = (jnp.arange(Sq, dtype=jnp.int32)[None, :] + off[:, None])[:, :, None, None]
    ok = (indices >= 0) & (indices < Skv)
    if causal:
        ok &= indices <= t_abs
    return ok & first_occurrence(jnp.where(ok, indices, -1)) if indices.shape[-1] > 1 else ok


def _chunk_rows(Sq: int, per_row: int) -> int:
    return max(1, min(Sq, _ELEMS_PER_CHUNK // max(per_row, 1)))


def map_query_chunks(fn, chunk: int, Sq: int, *arrays):
    """Apply ``fn`` to chunks (axis 1) of each array under checkpoint; concatenate along axis 1."""
    n_chunks = -(-Sq // chunk)
    pad = n_chunks * chunk - Sq

    def split(x):
        if pad:
            fill = -1 if jnp.issubdtype(x.dtype, jnp.integer) else 0
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = x.reshape((x.shape[0], n_chunks, chunk) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    outs = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(a) for a in arrays))

    def join(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((y.shape[0], n_chunks * chunk) + y.shape[3:])[:, :Sq]

    return jax.tree_util.tree_map(join, outs)


def _gather_kv(x, idx):
    """x [B, Skv, Hkv, D], idx int [B, Qc, Hkv, n] (in range) -> [B, Qc, Hkv, n, D]."""
    B, Qc, Hkv, n = idx.shape
    xt = jnp.transpose(x, (0, 2, 1, 3))  # [B, Hkv, Skv, D]
    it = jnp.transpose(idx, (0, 2, 1, 3)).reshape(B, Hkv, Qc * n, 1)
    g = jnp.take_along_axis(xt, it, axis=2)  # [B, Hkv, Qc*n, D]
    return jnp.transpose(g.reshape(B, Hkv, Qc, n, x.shape[-1]), (0, 2, 1, 3, 4))


def _check(q, k, v, indices, name):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    B, Sq, Hq, _ = q.shape
    Hkv = k.shape[2]
    if indices.ndim != 4 or indices.shape[:3] != (B, Sq, Hkv):
        raise ValueError(f"{name} must be [B, Sq, Hkv, n] = [{B}, {Sq}, {Hkv}, n]; got {tuple(indices.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")


def indexed_attention(q, k, v, indices, *, scale=None, causal=True, q_offset=None, return_lse=False):
    """Reference of :func:`sparse_jax.indexed_attention`.

    q [B, Sq, Hq, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, Dv], indices int [B, Sq, Hkv, n].
    Returns o [B, Sq, Hq, Dv] in q's dtype (and lse float32 [B, Hq, Sq]).
    """
    _check(q, k, v, indices, "indices")
    B, Sq, Hq, D = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, n = Hq // Hkv, indices.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    off = query_offsets(q_offset, B, Sq, Skv)
    indices = indices.astype(jnp.int32)
    keep = _allowed_tokens(indices, off, Skv, causal)
    safe = jnp.where(keep, indices, 0)

    def chunk(qc, sc, kc):
        kg = _gather_kv(k, sc).astype(jnp.float32)
        vg = _gather_kv(v, sc).astype(jnp.float32)
        s = jnp.einsum("bqhgd,bqhnd->bqhgn", qc.astype(jnp.float32), kg, precision=jax.lax.Precision.HIGHEST)
        s = jnp.where(kc[:, :, :, None, :], s * scale, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1)
        o = jnp.einsum("bqhgn,bqhnd->bqhgd", p, vg, precision=jax.lax.Precision.HIGHEST)
        o = o / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m[..., 0], -jnp.inf)
        return o, lse

    rows = _chunk_rows(Sq, Hkv * n * max(D, Dv, G))
    o, lse = map_query_chunks(chunk, rows, Sq, q.reshape(B, Sq, Hkv, G, D), safe, keep)
    o = o.reshape(B, Sq, Hq, Dv).astype(q.dtype)
    lse = jnp.transpose(lse.reshape(B, Sq, Hq), (0, 2, 1))
    return (o, lse) if return_lse else o


def expand_block_indices(block_indices, *, block_size: int, kv_len: int, causal: bool, q_offset=None):
    """Block lists -> token lists int32 [B, Sq, Hkv, n * block_size] (-1 for dropped blocks).

    Blocks out of range, repeated, or (causal) starting after the query become -1;
    the keys of a kept block are listed in order (the token reference masks those past
    ``kv_len`` or the query).
    """
    B, Sq = block_indices.shape[:2]
    n_blocks = -(-kv_len // block_size)
    off = query_offsets(q_offset, B, Sq, kv_len)
    t_abs = (jnp.arange(Sq, dtype=jnp.int32)[None, :] + off[:, None])[:, :, None, None]
    blk = block_indices.astype(jnp.int32)
    ok = (blk >= 0) & (blk < n_blocks)
    if causal:
        ok &= blk * block_size <= t_abs
    ok &= first_occurrence(jnp.where(ok, blk, -1))
    tok = jnp.where(ok, blk, -1)[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    tok = jnp.where(ok[..., None], tok, -1)
    return tok.reshape(blk.shape[:3] + (blk.shape[3] * block_size,))


def indexed_block_attention(q, k, v, block_indices, *, block_size: int = 64, scale=None, causal=True,
                            q_offset=None, return_lse=False):
    """Reference of :func:`sparse_jax.indexed_block_attention` (token reference over the listed blocks)."""
    _check(q, k, v, block_indices, "block_indices")
    tok = expand_block_indices(block_indices, block_size=block_size, kv_len=k.shape[1], causal=causal,
                               q_offset=q_offset)
    return indexed_attention(q, k, v, tok, scale=scale, causal=causal, q_offset=q_offset, return_lse=return_lse)


# ----------------------------------------------------------------------------- indexers


def lightning_scores(q_idx, k_idx, weights):
    """Indexer scores float32 [B, Sq, Skv]: ``sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])`` (no mask)."""
    logits = jnp.einsum("bthd,bsd->bths", q_idx.astype(jnp.float32), k_idx.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bths,bth->bts", jax.nn.relu(logits), weights.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _topk_masked(scores, allowed, topk):
    """Top-k of allowed entries (ties: lower index first); -1 where fewer than topk are allowed."""
    s = jnp.where(allowed, scores, -jnp.inf)
    vals, idx = jax.lax.top_k(s, topk)
    ok = vals > -jnp.inf
    return jnp.where(ok, idx.astype(jnp.int32), -1), jnp.where(ok, vals, -jnp.inf)


def lightning_indexer(q_idx, k_idx, weights, topk: int, *, causal=True, q_offset=None, return_scores=False):
    """Reference flat lightning indexer: exact top-``topk`` keys per query (chunked over queries).

    q_idx [B, Sq, Hi, Di], k_idx [B, Skv, Di], weights [B, Sq, Hi]. Returns indices
    int32 [B, Sq, topk] in descending score order, -1 past the allowed keys (and the
    scores float32 [B, Sq, topk], -inf there, if ``return_scores``).
    """
    B, Sq, Hi, _ = q_idx.shape
    Skv = k_idx.shape[1]
    off = query_offsets(q_offset, B, Sq, Skv)
    topk = int(topk)
    if topk > Skv:
        raise ValueError(f"topk ({topk}) exceeds the number of keys ({Skv})")

    def chunk(qc, wc, tc):
        s = lightning_scores(qc, k_idx, wc)
        allowed = jnp.ones(s.shape, bool)
        if causal:
            allowed = jnp.arange(Skv)[None, None, :] <= tc[:, :, None]
        return _topk_masked(s, allowed, topk)

    t_abs = jnp.arange(Sq, dtype=jnp.int32)[None, :] + off[:, None]
    rows = _chunk_rows(Sq, Skv * Hi)
    idx, vals = map_query_chunks(chunk, rows, Sq, q_idx, weights, t_abs)
    return (idx, vals) if return_scores else idx


def pool_blocks(k_idx, block_size: int):
    """Mean of each block's keys [B, Skv, Di] -> [B, cdiv(Skv, block_size), Di] (ragged last block)."""
    B, Skv, Di = k_idx.shape
    nb = -(-Skv // block_size)
    pad = nb * block_size - Skv
    x = jnp.pad(k_idx.astype(jnp.float32), ((0, 0), (0, pad), (0, 0))).reshape(B, nb, block_size, Di)
    cnt = jnp.minimum(block_size, Skv - jnp.arange(nb) * block_size).astype(jnp.float32)
    return (jnp.sum(x, axis=2) / cnt[None, :, None]).astype(k_idx.dtype)


def hierarchical_indexer(q_idx, k_idx, weights, topk: int, *, block_size: int = 64, num_blocks: int = 64,
                         causal=True, q_offset=None, return_scores=False):
    """Reference HISA indexer: top ``num_blocks`` pooled blocks, then top ``topk`` keys inside them.

    Block scores use the mean key of each block. Candidate keys are visited in ascending
    block order (ties go to the lower key index, as in the flat indexer). Same outputs
    as :func:`lightning_indexer`.
    """
    B, Sq, Hi, _ = q_idx.shape
    Skv = k_idx.shape[1]
    nb = -(-Skv // block_size)
    num_blocks = min(int(num_blocks), nb)
    if topk > num_blocks * block_size:
        raise ValueError(f"topk ({topk}) exceeds the keys of num_blocks * block_size "
                         f"({num_blocks} * {block_size})")
    off = query_offsets(q_offset, B, Sq, Skv)
    t_abs = jnp.arange(Sq, dtype=jnp.int32)[None, :] + off[:, None]
    pooled = pool_blocks(k_idx, block_size)

    def chunk(qc, wc, tc):
        sb = lightning_scores(qc, pooled, wc)  # [B, c, nb]
        allowed = jnp.ones(sb.shape, bool)
        if causal:
            allowed = (jnp.arange(nb) * block_size)[None, None, :] <= tc[:, :, None]
        blocks, _ = _topk_masked(sb, allowed, num_blocks)
        blocks = jnp.sort(jnp.where(blocks >= 0, blocks, nb), axis=-1)  # ascending; unused last
        keys = blocks[..., None] * block_size + jnp.arange(block_size)
        keys = keys.reshape(keys.shape[:2] + (-1,))  # [B, c, m * bs]
        ok = (blocks[..., None] < nb) & jnp.ones((block_size,), bool)
        ok = ok.reshape(keys.shape) & (keys < Skv)
        if causal:
            ok &= keys <= tc[:, :, None]
        safe = jnp.where(ok, keys, 0)
        kg = jnp.take_along_axis(k_idx[:, None].astype(jnp.float32),
                                 safe[..., None], axis=2)  # [B, c, m*bs, Di]
        logits = jnp.einsum("bthd,btsd->bths", qc.astype(jnp.float32), kg, precision=jax.lax.Precision.HIGHEST)
        s = jnp.einsum("bths,bth->bts", jax.nn.relu(logits), wc.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        pos, vals = _topk_masked(s, ok, topk)
        idx = jnp.where(pos >= 0, jnp.take_along_axis(keys, jnp.maximum(pos, 0), axis=-1), -1)
        return idx, vals

    rows = _chunk_rows(Sq, max(nb, num_blocks * block_size) * Hi)
    idx, vals = map_query_chunks(chunk, rows, Sq, q_idx, weights, t_abs)
    return (idx, vals) if return_scores else idx


def same_topk(got, want, scores, *, atol: float = 0.0) -> bool:
    """Whether index lists ``got`` select a top-k as good as ``want`` (host-side NumPy check).

    got, want: int [..., topk] (-1 = unused, any order); scores: float [..., Skv] (the exact
    indexer scores). True when every row has the same number of valid entries, no duplicate,
    and the sorted scores of got's keys equal those of want's within ``atol``. ``atol = 0``
    asks for equally scored sets (the same sets unless scores tie); a positive ``atol``
    accepts swaps between near-ties, e.g. of float32 dots that ran in tf32 on a GPU.
    """
    import numpy as np
    got, want, scores = np.asarray(got), np.asarray(want), np.asarray(scores, np.float64)
    if got.shape != want.shape or np.any((got >= 0).sum(-1) != (want >= 0).sum(-1)):
        return False
    flat = got.reshape(-1, got.shape[-1])
    if any(len(set(r[r >= 0].tolist())) != int((r >= 0).sum()) for r in flat):
        return False

    def chosen(idx):
        s = np.take_along_axis(scores, np.maximum(idx, 0), axis=-1)
        return np.sort(np.where(idx >= 0, s, -np.inf), axis=-1)
    a, b = chosen(got), chosen(want)
    fin = np.isfinite(a) & np.isfinite(b)
    return bool(np.array_equal(np.isfinite(a), np.isfinite(b)) and np.all(np.abs(a - b)[fin] <= atol))
