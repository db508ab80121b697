"""Array math behind BlockMask: block geometry, classification, refinement, index lists.

Every function takes ``xp`` (numpy on the host, jax.numpy under tracing) so one
implementation serves static and traced tables; tests check they agree.

Block classes are int8: EMPTY = 0, PARTIAL = 1 (the kernel applies the mask
inside the block), FULL = 2 (every valid pair allowed; no mask work).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.masks import BlockGeometry, Mask

EMPTY, PARTIAL, FULL = 0, 1, 2

# Elements evaluated per refinement chunk (blocks x bq x bkv).
_REFINE_CHUNK_ELEMS = 1 << 22


def geometry(q_len: int, kv_len: int, bq: int, bkv: int, xp) -> BlockGeometry:
    nq, nk = -(-q_len // bq), -(-kv_len // bkv)
    q_lo = xp.arange(nq, dtype=xp.int32) * bq
    kv_lo = xp.arange(nk, dtype=xp.int32) * bkv
    q_hi = xp.minimum(q_lo + bq, q_len) - 1
    kv_hi = xp.minimum(kv_lo + bkv, kv_len) - 1
    return BlockGeometry(q_lo, q_hi, kv_lo, kv_hi, bq, bkv, q_len, kv_len, xp)


def classify(mask: Mask, geom: BlockGeometry, shape4):
    """Class grid int8 [B, H, nQb, nKb] and the 'needs refinement' flags (same shape)."""
    xp = geom.xp
    c = mask.classify_blocks(geom)
    may_true = xp.broadcast_to(c.may_true, shape4)
    may_false = xp.broadcast_to(c.may_false, shape4)
    exact = xp.broadcast_to(c.exact, shape4)
    cls = xp.where(may_true, xp.where(may_false, PARTIAL, FULL), EMPTY).astype(xp.int8)
    return cls, (cls == PARTIAL) & ~exact


def _eval_blocks(mask, b, h, qi, ki, *, bq, bkv, q_len, kv_len):
    """Evaluate ``mask`` over whole blocks. b, h, qi, ki: int32 [n] -> new class int8 [n]."""
    rq = jnp.arange(bq, dtype=jnp.int32)
    rk = jnp.arange(bkv, dtype=jnp.int32)
    q = qi[:, None, None] * bq + rq[None, :, None]
    k = ki[:, None, None] * bkv + rk[None, None, :]
    valid = (q < q_len) & (k < kv_len)
    allowed = mask(b[:, None, None], h[:, None, None], jnp.minimum(q, q_len - 1), jnp.minimum(k, kv_len - 1))
    allowed = jnp.broadcast_to(allowed, valid.shape)
    any_true = jnp.any(allowed & valid, axis=(1, 2))
    any_false = jnp.any(~allowed & valid, axis=(1, 2))
    return jnp.where(any_true, jnp.where(any_false, PARTIAL, FULL), EMPTY).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("bq", "bkv", "q_len", "kv_len"))
def _eval_blocks_jit(mask, b, h, qi, ki, *, bq, bkv, q_len, kv_len):
    return _eval_blocks(mask, b, h, qi, ki, bq=bq, bkv=bkv, q_len=q_len, kv_len=kv_len)


def refine(mask: Mask, cls, todo, geom: BlockGeometry, *, max_blocks: int | None = None):
    """Resolve blocks flagged ``todo`` by evaluating the mask inside them.

    On the host every flagged block is evaluated (exact). Under tracing at most
    ``max_blocks`` are (a static bound); any beyond it stay PARTIAL, which is safe.
    """
    bq, bkv = geom.block_q, geom.block_kv
    per_chunk = max(1, _REFINE_CHUNK_ELEMS // (bq * bkv))
    kw = dict(bq=bq, bkv=bkv, q_len=geom.q_len, kv_len=geom.kv_len)
    if geom.xp is np:
        where = np.nonzero(todo)
        n = where[0].shape[0]
        if n == 0:
            return cls
        cls = cls.copy()
        out = np.empty((n,), np.int8)
        # Pad each chunk to a fixed size so the jitted evaluator compiles once.
        size = min(per_chunk, n)
        for s in range(0, n, size):
            sl = [np.asarray(w[s:s + size], np.int32) for w in where]
            m = sl[0].shape[0]
            if m < size:
                sl = [np.concatenate([a, np.repeat(a[-1:], size - m)]) for a in sl]
            out[s:s + m] = np.asarray(_eval_blocks_jit(mask, *sl, **kw))[:m]
        cls[where] = out
        return cls
    total = int(np.prod(todo.shape))
    cap = total if max_blocks is None else min(total, max_blocks)
    if cap == 0:
        return cls
    flat = todo.reshape(-1)
    (sel,) = jnp.nonzero(flat, size=cap, fill_value=0)
    count = jnp.minimum(jnp.sum(flat), cap)
    # Fill slots (past ``count``) point at block 0 too: they must not scatter over its result.
    dest = jnp.where(jnp.arange(cap) < count, sel, total)
    b, h, qi, ki = jnp.unravel_index(sel, todo.shape)
    n_chunks = -(-cap // per_chunk)
    pad = n_chunks * per_chunk - cap
    args = [jnp.pad(a.astype(jnp.int32), (0, pad)) for a in (b, h, qi, ki)]
    flat_cls = cls.reshape(-1)
    old = jnp.pad(flat_cls[sel], (0, pad))

    # Only the chunks that hold flagged blocks are evaluated (a dynamic trip count), so
    # the cost follows the number of ambiguous blocks, not the static bound.
    def chunk(i, out):
        part = [jax.lax.dynamic_slice(a, (i * per_chunk,), (per_chunk,)) for a in args]
        return jax.lax.dynamic_update_slice(out, _eval_blocks(mask, *part, **kw), (i * per_chunk,))

    new = jax.lax.fori_loop(0, (count + per_chunk - 1) // per_chunk, chunk, old)[:cap]
    return flat_cls.at[dest].set(new, mode="drop").reshape(cls.shape)


def index_lists(flags, max_n: int, xp):
    """Sorted indices of the True entries along the last axis.

    flags: bool [..., n] -> (counts int32 [...], indices int32 [..., max_n]). Slots
    past a row's count repeat its last valid index (0 for an empty row), so a kernel
    that walks a fixed number of slots never fetches a new block for padding.
    Rows with more than ``max_n`` entries keep their first ``max_n`` (callers check).
    """
    n = flags.shape[-1]
    counts = flags.sum(-1).astype(xp.int32)
    key = (~flags).astype(xp.int8)
    if xp is np:
        order = np.argsort(key, axis=-1, kind="stable").astype(np.int32)
    else:
        order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    take = min(max_n, n)
    idx = order[..., :take]
    if take < max_n:
        idx = xp.concatenate([idx, xp.broadcast_to(idx[..., -1:], idx.shape[:-1] + (max_n - take,))], axis=-1)
    clipped = xp.minimum(counts, max_n)
    last = xp.take_along_axis(idx, xp.maximum(clipped - 1, 0)[..., None], axis=-1)
    last = xp.where(clipped[..., None] > 0, last, 0)
    slot = xp.arange(max_n, dtype=xp.int32)
    idx = xp.where(slot < clipped[..., None], idx, last).astype(xp.int32)
    return clipped, idx


def class_from_lists(num, idx, n_cols: int, value: int, xp, out=None):
    """Scatter (counts [..., R], indices [..., R, m]) into a class grid [..., R, n_cols].

    Out-of-range indices and slots past the count are dropped (treated as padding).
    """
    m = idx.shape[-1]
    ok = (xp.arange(m, dtype=xp.int32) < num[..., None]) & (idx >= 0) & (idx < n_cols)
    target = xp.where(ok, idx, n_cols)  # column n_cols is a discard slot
    grid = xp.zeros(idx.shape[:-1] + (n_cols + 1,), bool)
    if xp is np:
        np.put_along_axis(grid, target, True, axis=-1)
    else:
        grid = jnp.put_along_axis(grid, target, True, axis=-1, inplace=False)
    hit = grid[..., :n_cols]
    if out is None:
        out = xp.zeros(hit.shape, xp.int8)
    return xp.where(hit, xp.int8(value), out).astype(xp.int8)
