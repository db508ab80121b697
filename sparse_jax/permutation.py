"""Segment-local token permutations for permuted block-sparse attention (PBS-Attn).

Keys (and values with them) are reordered *within* segments of ``segment_size``
positions, so every key stays in its segment and causality between segments is
untouched: a query segment sees all earlier segments whole, and only the diagonal
segment needs a token-level mask, evaluated on the original positions (which travel
with the rows as ``kv_positions`` / ``q_positions``).

Permutations are int32 [..., S] arrays ``perm`` with ``permuted[j] = original[perm[j]]``;
``inverse_permutation(perm)[perm[j]] == j``. The tail segment may be shorter.

:class:`SegmentCausal` is the causal mask of such layouts: it evaluates ``q >= kv`` on
positions and classifies blocks by segment (same segment: partial, earlier: full,
later: empty), which is exact whatever the within-segment order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import masks

__all__ = ["segment_permutation", "inverse_permutation", "permute_heads", "unpermute_rows", "SegmentCausal",
           "segment_causal", "query_affinity"]


def _check_segment(segment_size: int) -> int:
    segment_size = int(segment_size)
    if segment_size <= 0:
        raise ValueError(f"segment_size must be positive; got {segment_size}")
    return segment_size


def segment_permutation(importance, segment_size: int):
    """Order each segment by decreasing ``importance`` (ties: original order).

    importance: float [..., S]. Returns int32 [..., S]: the permutation (a key's new slot
    stays inside its segment). NaNs sort last within their segment.
    """
    segment_size = _check_segment(segment_size)
    x = jnp.asarray(importance, jnp.float32)
    s = x.shape[-1]
    n_seg = -(-s // segment_size)
    pad = n_seg * segment_size - s
    # Padding sorts after every real entry (-inf < any finite; NaN -> -inf first), so the
    # tail segment's real entries fill its first slots and slicing drops the padding.
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    key = jnp.concatenate([-x, jnp.full(x.shape[:-1] + (pad,), jnp.inf, jnp.float32)], axis=-1) if pad else -x
    key = key.reshape(*x.shape[:-1], n_seg, segment_size)
    real = np.arange(n_seg * segment_size).reshape(n_seg, segment_size) < s  # static
    # Among equal keys (and -inf real entries vs padding) stability keeps real entries first.
    key = jnp.where(real, key, jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    order = order + (jnp.arange(n_seg, dtype=jnp.int32) * segment_size)[:, None]
    return order.reshape(*x.shape[:-1], n_seg * segment_size)[..., :s]


def inverse_permutation(perm):
    """inv with inv[..., perm[..., j]] = j (int32, same shape)."""
    perm = jnp.asarray(perm, jnp.int32)
    s = perm.shape[-1]
    ar = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), perm.shape)
    return jnp.put_along_axis(jnp.zeros_like(perm), perm, ar, axis=-1, inplace=False)


def permute_heads(x, perm):
    """Gather rows per head and fold heads into the batch.

    x: [B, S, H, D]; perm: int32 [B, Hp, S] with H a multiple of Hp (heads ``h`` share
    ``perm[:, h // (H // Hp)]``). Returns [B * Hp, S, H // Hp, D] with
    ``out[b * Hp + p, j, g] = x[b, perm[b, p, j], p * (H // Hp) + g]``.
    """
    b, s, h, d = x.shape
    hp = perm.shape[1]
    if perm.shape != (b, hp, s) or h % hp:
        raise ValueError(f"perm must be [B, H', S] with H' dividing H for x {tuple(x.shape)}; "
                         f"got {tuple(perm.shape)}")
    g = h // hp
    xt = x.reshape(b, s, hp, g, d).transpose(0, 2, 1, 3, 4)  # [B, Hp, S, G, D]
    out = jnp.take_along_axis(xt, perm[:, :, :, None, None].astype(jnp.int32), axis=2)
    return out.reshape(b * hp, s, g, d)


def fold_heads(x, hp: int):
    """[B, S, H, D] -> [B * hp, S, H // hp, D] without reordering rows."""
    b, s, h, d = x.shape
    return x.reshape(b, s, hp, h // hp, d).transpose(0, 2, 1, 3, 4).reshape(b * hp, s, h // hp, d)


def unfold_heads(x, b: int):
    """Inverse of :func:`fold_heads`: [B * hp, S, G, D] -> [B, S, hp * G, D]."""
    bh, s, g, d = x.shape
    hp = bh // b
    return x.reshape(b, hp, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hp * g, d)


def unpermute_rows(x, perm):
    """Undo a row permutation exactly: x [N, S, ...] in permuted order, perm int32 [N, S]."""
    inv = inverse_permutation(perm)
    idx = inv.reshape(inv.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def query_affinity(q, k, importance):
    """Sort key for query permutation: each query's affinity to the important keys.

    q: [B, S, Hq, D], k: [B, S, Hkv, D], importance float32 [B, Hkv, S] (sums to ~1 per
    head). Returns float32 [B, Hkv, S]: the group-mean query dotted with the
    importance-weighted mean key. Queries that lean on the same heavy keys end up in
    the same blocks, which makes pooled query blocks more homogeneous (a heuristic; PBS
    leaves queries in place by default).
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    kbar = jnp.einsum("bhs,bshd->bhd", importance, k.astype(jnp.float32))
    qg = q.astype(jnp.float32).reshape(b, s, hkv, hq // hkv, d).mean(3)
    return jnp.einsum("bshd,bhd->bhs", qg, kbar)


@dataclasses.dataclass(frozen=True)
class SegmentCausal(masks.Band):
    """Causal (``q >= kv`` on positions) for layouts permuted within segments of ``segment``.

    Blocks must not straddle segments (block size divides the segment). Same-segment
    blocks are partial (the kernel masks them on positions), earlier segments full, later
    ones empty. The classification is exact for every within-segment order, so it is
    never refined by evaluating the mask on layout indices.
    """

    segment: int = 1

    def classify_blocks(self, geom):
        xp = geom.xp
        qs = geom.q_lo // self.segment
        ks = geom.kv_lo // self.segment
        same = qs[:, None] == ks[None, :]
        earlier = ks[None, :] < qs[:, None]
        may_true = same | earlier
        may_false = same | ~earlier
        return masks.BlockClass(may_true, may_false, xp.ones(may_true.shape, bool))

    def cache_key(self):
        return ("segment_causal", self.segment)


jax.tree_util.register_pytree_node(
    SegmentCausal, lambda m: ((), (m.lo, m.hi, m.segment)), lambda aux, _: SegmentCausal(*aux))


def segment_causal(segment_size: int) -> SegmentCausal:
    """The causal mask of a layout permuted within segments of ``segment_size``."""
    return SegmentCausal(0, None, _check_segment(segment_size))
