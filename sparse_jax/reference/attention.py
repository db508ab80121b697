"""Pure-jnp attention references: the oracle of every attention test and the ``xla`` backend.

Softmax in float32; rows with no allowed key give zeros and lse = -inf. Work is
done in chunks of query rows under ``jax.checkpoint`` so memory stays
O(chunk x kv_len) forward and backward (compute is dense: O(q_len x kv_len)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_jax import _block_tables as T

_Q_CHUNK = 512


def _softcap(s, softcap):
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _attend(q, k, v, allowed, scale, softcap):
    """q [B, Sq, Hkv, G, D], k/v [B, Skv, Hkv, D], allowed bool [B, Hkv, G, Sq, Skv] (broadcastable).

    Returns o [B, Sq, Hkv, G, Dv] float32 and lse [B, Hkv, G, Sq] float32.
    """
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    s = _softcap(s, softcap)
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -jnp.inf)
    return o, lse


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def attention(q, k, v, allowed_fn, *, scale=None, softcap=None, return_lse=False, q_chunk: int = _Q_CHUNK):
    """Masked attention. q [B, Sq, Hq, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, Dv].

    allowed_fn(q_start, q_stop) -> bool broadcastable to [B, Hq, q_stop - q_start, Skv]
    says which pairs of that query chunk are allowed. Returns o [B, Sq, Hq, Dv] in q's
    dtype (and lse float32 [B, Hq, Sq]).
    """
    _check_qkv(q, k, v)
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg = q.reshape(B, Sq, Hkv, G, D)
    outs, lses = [], []
    for start in range(0, Sq, q_chunk):
        stop = min(start + q_chunk, Sq)

        @jax.checkpoint
        def chunk(qc, k, v, start=start, stop=stop):
            allowed = jnp.broadcast_to(allowed_fn(start, stop), (B, Hq, stop - start, k.shape[1]))
            return _attend(qc, k, v, allowed.reshape(B, Hkv, G, stop - start, k.shape[1]), scale, softcap)

        o, lse = chunk(qg[:, start:stop], k, v)
        outs.append(o)
        lses.append(lse)
    o = jnp.concatenate(outs, axis=1).reshape(B, Sq, Hq, v.shape[-1]).astype(q.dtype)
    lse = jnp.concatenate(lses, axis=-1).reshape(B, Hq, Sq)
    return (o, lse) if return_lse else o


def dense_attention(q, k, v, mask=None, *, scale=None, softcap=None, return_lse=False):
    """Attention with an explicit dense mask bool [B|1, H|1, Sq, Skv] (None: no mask)."""
    if mask is None:
        allowed_fn = lambda a, b: jnp.ones((1, 1, 1, 1), bool)
    else:
        mask = jnp.asarray(mask)
        allowed_fn = lambda a, b: mask[:, :, a:b]
    return attention(q, k, v, allowed_fn, scale=scale, softcap=softcap, return_lse=return_lse)


def _as_rows(x, B, S, name):
    """int [S] or [B, S] -> int32 [B, S]."""
    x = jnp.asarray(x)
    if x.ndim == 1:
        x = jnp.broadcast_to(x[None], (B, x.shape[0]))
    if x.shape != (B, S):
        raise ValueError(f"{name} must be [{S}] or [{B}, {S}]; got {tuple(x.shape)}")
    return x.astype(jnp.int32)


def block_sparse_allowed_fn(block_mask, B, Hq, *, q_positions=None, kv_positions=None, q_segment_ids=None,
                            kv_segment_ids=None, segments_everywhere=False):
    """allowed_fn for :func:`attention` equal to what the block-sparse kernels compute.

    A pair is allowed when its block is listed FULL, or PARTIAL and the mask allows it
    at (q_positions, kv_positions) (default: the layout indices). Segment ids: the
    mask's document leaf compares the ids given here (or its own); with
    ``segments_everywhere`` an id mismatch also masks full blocks (explicit segment_ids).
    """
    bq, bkv = block_mask.block_size
    Sq, Skv = block_mask.q_len, block_mask.kv_len
    cls = jnp.asarray(block_mask.block_classes())  # [Bt, Ht, nQb, nKb]
    Bt, Ht = cls.shape[:2]
    if Ht not in (1, Hq):
        if Hq % Ht:
            raise ValueError(f"block mask has H={Ht}; expected 1, the kv heads, or {Hq} query heads")
        cls = jnp.repeat(cls, Hq // Ht, axis=1)  # per-kv-head tables serve every head of a group
    qp = _as_rows(jnp.arange(Sq) if q_positions is None else q_positions, B, Sq, "q_positions")
    kp = _as_rows(jnp.arange(Skv) if kv_positions is None else kv_positions, B, Skv, "kv_positions")
    mask = block_mask.mask
    own = mask.segment_ids() if mask is not None else None
    qs = ks = None
    if q_segment_ids is not None:
        qs, ks = _as_rows(q_segment_ids, B, Sq, "segment_ids"), _as_rows(kv_segment_ids, B, Skv, "segment_ids")
    elif own is not None:
        qs, ks = _as_rows(own[0], B, Sq, "segment_ids"), _as_rows(own[1], B, Skv, "segment_ids")
    b_idx = jnp.arange(B)[:, None, None, None]
    h_idx = jnp.arange(Hq)[None, :, None, None]

    def allowed_fn(start, stop):
        rows = jnp.arange(start, stop)
        c = cls[:, :, rows // bq][..., jnp.arange(Skv) // bkv]  # [Bt, H, n, Skv]
        c = jnp.broadcast_to(c, (B, Hq, stop - start, Skv))
        ok = c == T.FULL
        if mask is not None:
            qseg = None if qs is None else qs[:, None, start:stop, None]
            kseg = None if ks is None else ks[:, None, None, :]
            m = mask.evaluate(b_idx, h_idx, qp[:, None, start:stop, None], kp[:, None, None, :], qseg, kseg)
            ok = ok | ((c == T.PARTIAL) & m)
        else:
            ok = ok | (c == T.PARTIAL)
        if segments_everywhere and qs is not None:
            ok = ok & (qs[:, None, start:stop, None] == ks[:, None, None, :])
        return ok

    return allowed_fn


def block_sparse_attention(q, k, v, block_mask, *, scale=None, segment_ids=None, q_positions=None,
                           kv_positions=None, softcap=None, return_lse=False):
    """Reference of :func:`sparse_jax.block_sparse_attention` (same arguments)."""
    _check_qkv(q, k, v)
    B, Sq, Hq, _ = q.shape
    if (block_mask.q_len, block_mask.kv_len) != (Sq, k.shape[1]):
        raise ValueError(f"block mask is for q_len={block_mask.q_len}, kv_len={block_mask.kv_len}; "
                         f"q has {Sq} and k has {k.shape[1]} positions")
    qs = ks = None
    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    fn = block_sparse_allowed_fn(block_mask, B, Hq, q_positions=q_positions, kv_positions=kv_positions,
                                 q_segment_ids=qs, kv_segment_ids=ks, segments_everywhere=segment_ids is not None)
    return attention(q, k, v, fn, scale=scale, softcap=softcap, return_lse=return_lse)
