"""Reference (and semantics) of block-sparse attention with an online K/V permutation.

``kv_permutation`` int [B, Hkv, Skv] (or [Hkv, Skv] / [Skv], broadcast): logical key
position j of kv head h reads K/V row ``perm[b, h, j]`` ("S2O"-style online
permutation: the block mask is laid out over logical positions, so a permutation
that gathers related keys makes the mask sparser). The mask function and document
ids see the *original* row: its position ``kv_positions[b, perm]`` (default
``perm`` itself) and its segment id. Entries outside [0, Skv) make the logical
position padding (never attended, no gradient). Gradients are the transpose of
the gather (a scatter-add), so repeated entries behave exactly like ``k[perm]``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sparse_jax.masks import Mask
from sparse_jax.reference.attention import attention as _attention
from sparse_jax.reference.attention import block_sparse_allowed_fn


def normalize(perm, batch: int, num_kv_heads: int, kv_len: int):
    """int [Skv] / [Hkv, Skv] / [B|1, Hkv, Skv] -> int32 [B, Hkv, Skv]; errors at trace time."""
    perm = jnp.asarray(perm)
    if not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(f"kv_permutation must be an integer array; got {perm.dtype}")
    full = (batch, num_kv_heads, kv_len)
    shape = tuple(perm.shape)
    ok = (shape == (kv_len,) or shape == (num_kv_heads, kv_len)
          or (len(shape) == 3 and shape[0] in (1, batch) and shape[1:] == full[1:]))
    if not ok:
        raise ValueError(f"kv_permutation must be [B, Hkv, Skv] = {list(full)} (or [Hkv, Skv] / [Skv]); "
                         f"got shape {list(shape)}")
    return jnp.broadcast_to(perm.astype(jnp.int32), full)


def sanitize(perm, kv_len: int):
    """Out-of-range entries -> -1 (padding)."""
    return jnp.where((perm >= 0) & (perm < kv_len), perm, -1)


def permuted_rows(x, perm):
    """Per-row ints x [B, Skv] seen through the permutation: [B, Hkv, Skv] = x[b, perm[b, h, j]]
    (values at padding entries are arbitrary)."""
    return jnp.take_along_axis(jnp.asarray(x, jnp.int32)[:, None, :], jnp.maximum(perm, 0), axis=2)


def gather_kv(x, perm):
    """x [B, Skv, Hkv, D] -> x_perm [B, Skv, Hkv, D] with x_perm[b, j, h] = x[b, perm[b, h, j], h]."""
    idx = jnp.maximum(perm, 0).transpose(0, 2, 1)[..., None]  # [B, Skv, Hkv, 1]
    return jnp.take_along_axis(x, idx, axis=1)


class _FoldedHeads(Mask):
    """``inner`` evaluated for batch*kv-head folded programs: b' = b*Hkv + hk, h' = g."""

    def __init__(self, inner: Mask, num_kv_heads: int, group: int):
        self.inner, self.num_kv_heads, self.group = inner, num_kv_heads, group
        self.needs_segments = inner.needs_segments

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        return self.inner.evaluate(b // self.num_kv_heads, (b % self.num_kv_heads) * self.group + h, q_idx,
                                   kv_idx, q_seg, kv_seg)


def _fold_table(x, batch, num_kv_heads, group):
    """Table [Bt, Ht, ...] (Ht in 1, Hkv, Hkv*G) -> [B*Hkv, 1 or G, ...]."""
    x = jnp.asarray(x)
    bt, ht = x.shape[:2]
    rest = x.shape[2:]
    if ht == num_kv_heads * group and group > 1:
        x = jnp.broadcast_to(x.reshape(bt, num_kv_heads, group, *rest), (batch, num_kv_heads, group, *rest))
        return x.reshape(batch * num_kv_heads, group, *rest)
    x = jnp.broadcast_to(x, (batch, num_kv_heads, *rest))
    return x.reshape(batch * num_kv_heads, 1, *rest)


def attention(q, k, v, block_mask, kv_permutation, *, scale=None, segment_ids=None, q_positions=None,
              kv_positions=None, softcap=None, return_lse=False):
    """Reference of ``block_sparse_attention(..., kv_permutation=...)`` (same arguments).

    Folds (batch, kv head) into one batch axis so each folded batch has its own
    permuted keys, positions and segment ids, then runs the dense reference.
    """
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    perm = sanitize(normalize(kv_permutation, B, Hkv, Skv), Skv)
    valid = (perm >= 0).reshape(B * Hkv, Skv)

    def fold_q(x):  # [B, Sq, Hq, ...] -> [B*Hkv, Sq, G, ...]
        x = x.reshape(B, Sq, Hkv, G, *x.shape[3:])
        return jnp.moveaxis(x, 2, 1).reshape(B * Hkv, Sq, G, *x.shape[4:])

    def fold_kv(x):  # [B, Skv, Hkv, D] -> [B*Hkv, Skv, 1, D]
        return jnp.moveaxis(gather_kv(x, perm), 2, 1).reshape(B * Hkv, Skv, 1, x.shape[-1])

    def rows(x, n):  # int [B|1, S] | [S] -> [B, S]
        x = jnp.asarray(x, jnp.int32)
        return jnp.broadcast_to(x if x.ndim == 2 else x[None], (B, n))

    qp = rows(jnp.arange(Sq) if q_positions is None else q_positions, Sq)
    kp = perm if kv_positions is None else permuted_rows(rows(kv_positions, Skv), perm)
    mask = block_mask.mask
    own = mask.segment_ids() if mask is not None else None
    seg = segment_ids if segment_ids is not None else own
    qs = ks = None
    if seg is not None:
        s_q, s_kv = seg if isinstance(seg, (tuple, list)) else (seg, seg)
        qs = jnp.repeat(rows(s_q, Sq), Hkv, axis=0)
        ks = permuted_rows(rows(s_kv, Skv), perm).reshape(B * Hkv, Skv)
    tables = {f.name: _fold_table(getattr(block_mask, f.name), B, Hkv, G)
              for f in dataclasses.fields(block_mask) if f.name.endswith(("num_blocks", "indices"))}
    folded = dataclasses.replace(block_mask, **tables,
                                 mask=None if mask is None else _FoldedHeads(mask, Hkv, G))
    fn = block_sparse_allowed_fn(
        folded, B * Hkv, G, q_positions=jnp.repeat(qp, Hkv, axis=0), kv_positions=kp.reshape(B * Hkv, Skv),
        q_segment_ids=qs, kv_segment_ids=ks, segments_everywhere=segment_ids is not None)

    def allowed(start, stop):
        return fn(start, stop) & valid[:, None, None, :]

    o, lse = _attention(fold_q(q), fold_kv(k), fold_kv(v), allowed, scale=scale, softcap=softcap,
                                     return_lse=True)
    o = jnp.moveaxis(o.reshape(B, Hkv, Sq, G, -1), 1, 2).reshape(B, Sq, Hq, -1)
    lse = lse.reshape(B, Hq, Sq)
    return (o, lse) if return_lse else o
