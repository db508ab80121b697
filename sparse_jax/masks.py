"""Mask functions in FlexAttention's convention: ``mask(b, h, q_idx, kv_idx) -> bool``.

Every mask here is a small immutable object that is

* callable with broadcasting jnp (or numpy) integer arrays, exactly like a
  FlexAttention ``mask_mod``: ``mask(b, h, q_idx, kv_idx)``;
* a pytree (the arrays it reads, e.g. document segment ids, are leaves), so a
  ``BlockMask`` that holds it can cross ``jit`` boundaries;
* able to classify whole blocks without evaluating them element by element
  (:meth:`Mask.classify_blocks`), which is what lets ``create_block_mask``
  build a 128K x 128K table without touching 128K x 128K elements.

Kernels evaluate masks inside partial blocks through :meth:`Mask.evaluate`,
which takes the segment ids of the tile when the mask contains a document
mask, so the kernel never has to gather from an array the mask closed over.

Plain Python functions ``fn(b, h, q_idx, kv_idx)`` are accepted anywhere a
mask is and are wrapped in :class:`FnMask` (their blocks are classified by
evaluating them, which is exact but O(S^2) work).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Mask", "Band", "Chunked", "KVPrefix", "Full", "Document", "FnMask", "And", "Or", "Offset",
    "as_mask", "causal", "full", "sliding_window", "chunked", "prefix_lm", "document",
    "and_masks", "or_masks", "offset", "bottom_right",
]


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """Inclusive index ranges of every block, for block classification.

    q_lo/q_hi: [nQb] first/last *valid* query index of each query block.
    kv_lo/kv_hi: [nKb] the same for key blocks. ``xp`` is numpy or jax.numpy.
    """

    q_lo: Any
    q_hi: Any
    kv_lo: Any
    kv_hi: Any
    block_q: int
    block_kv: int
    q_len: int
    kv_len: int
    xp: Any


@dataclasses.dataclass(frozen=True)
class BlockClass:
    """Three-valued classification of block pairs (arrays broadcastable to [B, H, nQb, nKb]).

    may_true: some allowed pair may exist in the block; may_false: some disallowed
    pair may exist; exact: both flags are exact for that block (where ``exact`` is
    False the block is at worst labelled partial, which is always safe for a kernel).
    """

    may_true: Any
    may_false: Any
    exact: Any


class Mask:
    """Base class. Subclasses implement ``evaluate`` and ``classify_blocks``."""

    # ``True`` when evaluate() needs segment ids (a Document leaf is inside).
    needs_segments: bool = False

    def __call__(self, b, h, q_idx, kv_idx):
        return self.evaluate(b, h, q_idx, kv_idx)

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        """Allowed-ness of (q_idx, kv_idx) pairs, broadcasting. ``q_seg``/``kv_seg`` are
        the segment ids at those positions when the caller (a kernel) already has them."""
        raise NotImplementedError

    def classify_blocks(self, geom: BlockGeometry) -> BlockClass:
        xp = geom.xp
        shape = (geom.q_lo.shape[0], geom.kv_lo.shape[0])
        return BlockClass(xp.ones(shape, bool), xp.ones(shape, bool), xp.zeros(shape, bool))

    # -- helpers shared by all masks ---------------------------------------------------------
    def segment_ids(self):
        """(q_ids, kv_ids) of the Document leaf inside this mask, or None."""
        for leaf in self.leaves():
            if isinstance(leaf, Document):
                return leaf.q_ids, leaf.kv_ids
        return None

    def leaves(self):
        yield self

    def cache_key(self):
        """A hashable key identifying this mask for the table cache (None: do not cache)."""
        return None

    def captures_arrays(self) -> bool:
        """True if evaluate() reads arrays other than its segment-id inputs (kernels can't)."""
        return False

    def __and__(self, other):
        return and_masks(self, other)

    def __or__(self, other):
        return or_masks(self, other)


def _leafless_pytree(cls):
    """Register a mask with no array leaves: all of its fields are static aux data."""
    fields = [f.name for f in dataclasses.fields(cls)]
    jax.tree_util.register_pytree_node(
        cls,
        lambda m: ((), tuple(getattr(m, f) for f in fields)),
        lambda aux, _: cls(*aux),
    )
    return cls


# Stands in for an unbounded band edge; fits int32 so traced (jnp) geometry stays int32.
_UNBOUNDED = 1 << 30


@_leafless_pytree
@dataclasses.dataclass(frozen=True)
class Band(Mask):
    """Allowed iff ``lo <= q_idx - kv_idx <= hi`` (None = unbounded).

    ``causal`` is Band(0, None); a causal sliding window of w is Band(0, w - 1).
    """

    lo: int | None = None
    hi: int | None = None

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        d = q_idx - kv_idx
        out = None
        if self.lo is not None:
            out = d >= self.lo
        if self.hi is not None:
            c = d <= self.hi
            out = c if out is None else out & c
        if out is None:
            out = d == d
        return out

    def classify_blocks(self, geom):
        xp = geom.xp
        dmin = geom.q_lo[:, None] - geom.kv_hi[None, :]
        dmax = geom.q_hi[:, None] - geom.kv_lo[None, :]
        lo = -_UNBOUNDED if self.lo is None else self.lo
        hi = _UNBOUNDED if self.hi is None else self.hi
        may_true = (dmax >= lo) & (dmin <= hi)
        may_false = (dmin < lo) | (dmax > hi)
        return BlockClass(may_true, may_false, xp.ones(may_true.shape, bool))

    def cache_key(self):
        return ("band", self.lo, self.hi)


@_leafless_pytree
@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
    """Allowed iff q and kv fall in the same chunk of ``chunk`` positions (Llama-4 style)."""

    chunk: int

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        return (q_idx // self.chunk) == (kv_idx // self.chunk)

    def classify_blocks(self, geom):
        xp, c = geom.xp, self.chunk
        qa, qb = geom.q_lo // c, geom.q_hi // c
        ka, kb = geom.kv_lo // c, geom.kv_hi // c
        may_true = (qa[:, None] <= kb[None, :]) & (ka[None, :] <= qb[:, None])
        single = (qa[:, None] == qb[:, None]) & (ka[None, :] == kb[None, :]) & (qa[:, None] == ka[None, :])
        return BlockClass(may_true, ~single, xp.ones(may_true.shape, bool))

    def cache_key(self):
        return ("chunked", self.chunk)


@_leafless_pytree
@dataclasses.dataclass(frozen=True)
class KVPrefix(Mask):
    """Allowed iff ``kv_idx < prefix`` (the bidirectional part of a prefix-LM mask)."""

    prefix: int

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        return (kv_idx < self.prefix) & (q_idx == q_idx)

    def classify_blocks(self, geom):
        xp = geom.xp
        may_true = xp.broadcast_to((geom.kv_lo < self.prefix)[None, :], (geom.q_lo.shape[0], geom.kv_lo.shape[0]))
        may_false = xp.broadcast_to((geom.kv_hi >= self.prefix)[None, :], may_true.shape)
        return BlockClass(may_true, may_false, xp.ones(may_true.shape, bool))

    def cache_key(self):
        return ("kvprefix", self.prefix)


@_leafless_pytree
@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every pair allowed."""

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        return (q_idx == q_idx) & (kv_idx == kv_idx)

    def classify_blocks(self, geom):
        xp = geom.xp
        shape = (geom.q_lo.shape[0], geom.kv_lo.shape[0])
        return BlockClass(xp.ones(shape, bool), xp.zeros(shape, bool), xp.ones(shape, bool))

    def cache_key(self):
        return ("full",)


@jax.tree_util.register_pytree_node_class
class Document(Mask):
    """Allowed iff query and key carry the same segment id.

    q_ids: int [S_q] or [B, S_q]; kv_ids: int [S_kv] or [B, S_kv] (defaults to q_ids).
    Blocks are classified from per-block min/max of the ids; that is exact when ids
    are non-decreasing along the sequence (packed documents) and safe otherwise.
    """

    needs_segments = True

    def __init__(self, q_ids, kv_ids=None):
        self.q_ids = q_ids
        self.kv_ids = q_ids if kv_ids is None else kv_ids

    def tree_flatten(self):
        return (self.q_ids, self.kv_ids), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.q_ids, obj.kv_ids = children
        return obj

    @property
    def batch(self) -> int | None:
        nd = max(np.ndim(self.q_ids), np.ndim(self.kv_ids))
        if nd == 1:
            return None
        return (self.q_ids if np.ndim(self.q_ids) == 2 else self.kv_ids).shape[0]

    def _ids_2d(self, ids, xp):
        ids = xp.asarray(ids)
        return ids[None] if ids.ndim == 1 else ids

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        if q_seg is None:
            qi = jnp.asarray(self.q_ids)
            ki = jnp.asarray(self.kv_ids)
            q_seg = qi[q_idx] if qi.ndim == 1 else qi[b, q_idx]
            kv_seg = ki[kv_idx] if ki.ndim == 1 else ki[b, kv_idx]
        return q_seg == kv_seg

    def classify_blocks(self, geom):
        xp = geom.xp
        q_stats = _segment_block_stats(self._ids_2d(self.q_ids, xp), geom.block_q, geom.q_len, xp)
        kv_stats = _segment_block_stats(self._ids_2d(self.kv_ids, xp), geom.block_kv, geom.kv_len, xp)
        (qmin, qmax, qsorted), (kmin, kmax, ksorted) = q_stats, kv_stats
        # [B, 1, nQb, nKb]
        may_true = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        single = (qmin[:, :, None] == qmax[:, :, None]) & (kmin[:, None, :] == kmax[:, None, :])
        full = single & (qmin[:, :, None] == kmin[:, None, :])
        exact = xp.broadcast_to((qsorted & ksorted)[:, None, None], full.shape)
        return BlockClass(may_true[:, None], ~full[:, None], exact[:, None])

    def cache_key(self):
        if isinstance(self.q_ids, jax.core.Tracer) or isinstance(self.kv_ids, jax.core.Tracer):
            return None
        h = hashlib.sha1()
        for a in (self.q_ids, self.kv_ids):
            a = np.asarray(a)
            h.update(str((a.shape, a.dtype)).encode())
            h.update(a.tobytes())
        return ("document", h.hexdigest())

    def __repr__(self):
        return f"Document(q_ids{tuple(np.shape(self.q_ids))}, kv_ids{tuple(np.shape(self.kv_ids))})"


def _segment_block_stats(ids, block, length, xp):
    """Per-block (min, max) of segment ids over valid positions, and whether ids are sorted.

    ids: [B, S] -> min/max [B, nb] and sorted [B] (bool).
    """
    bsz, s = ids.shape
    if s != length:
        raise ValueError(f"segment ids have length {s}, the mask is for length {length}")
    nb = -(-length // block)
    pad = nb * block - length
    lo_fill = np.iinfo(np.int32).max
    ids32 = ids.astype(xp.int32) if hasattr(ids, "astype") else ids
    padded_hi = xp.concatenate([ids32, xp.full((bsz, pad), -lo_fill - 1, xp.int32)], axis=1) if pad else ids32
    padded_lo = xp.concatenate([ids32, xp.full((bsz, pad), lo_fill, xp.int32)], axis=1) if pad else ids32
    bmin = padded_lo.reshape(bsz, nb, block).min(-1)
    bmax = padded_hi.reshape(bsz, nb, block).max(-1)
    is_sorted = xp.all(ids32[:, 1:] >= ids32[:, :-1], axis=1) if s > 1 else xp.ones((bsz,), bool)
    return bmin, bmax, is_sorted


class FnMask(Mask):
    """A user function ``fn(b, h, q_idx, kv_idx) -> bool`` (blocks classified by evaluation)."""

    def __init__(self, fn: Callable):
        _check_mask_signature(fn)
        self.fn = fn

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        return self.fn(b, h, q_idx, kv_idx)

    def cache_key(self):
        return ("fn", self.fn)

    def captures_arrays(self) -> bool:
        i = jnp.int32(0)
        closed = jax.make_jaxpr(lambda b, h, q, k: self.fn(b, h, q, k))(i, i, i, i)
        return bool(closed.consts)

    def __repr__(self):
        return f"FnMask({getattr(self.fn, '__name__', self.fn)!r})"

    def __eq__(self, other):
        return isinstance(other, FnMask) and other.fn is self.fn

    def __hash__(self):
        return hash(self.fn)


jax.tree_util.register_pytree_node(FnMask, lambda m: ((), m.fn), lambda fn, _: FnMask(fn))


def _check_mask_signature(fn):
    if not callable(fn):
        raise TypeError(f"mask_fn must be callable as mask_fn(b, h, q_idx, kv_idx); got {fn!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    required = [p for p in params if p.default is p.empty]
    if not has_var and (len(params) < 4 or len(required) > 4):
        raise TypeError(
            f"mask_fn must take four positional arguments (b, h, q_idx, kv_idx); "
            f"{getattr(fn, '__name__', fn)!r} has signature {sig}")


class _Combine(Mask):
    """Shared machinery of And / Or: children are the pytree children."""

    def __init__(self, *masks: Mask):
        if not masks:
            raise ValueError(f"{type(self).__name__} needs at least one mask")
        self.masks = tuple(as_mask(m) for m in masks)
        docs = [m for m in self.leaves() if isinstance(m, Document)]
        if len(docs) > 1:
            raise ValueError("a mask may contain at most one document() mask; merge the segment ids first")
        self.needs_segments = bool(docs)

    def tree_flatten(self):
        return self.masks, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.masks = tuple(children)
        obj.needs_segments = any(isinstance(m, Document) for m in obj.leaves())
        return obj

    def leaves(self):
        for m in self.masks:
            yield from m.leaves()

    def cache_key(self):
        keys = tuple(m.cache_key() for m in self.masks)
        return None if any(k is None for k in keys) else (type(self).__name__, keys)

    def captures_arrays(self):
        return any(m.captures_arrays() for m in self.masks)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.masks))})"

    def __eq__(self, other):
        return type(other) is type(self) and other.masks == self.masks

    def __hash__(self):
        return hash((type(self).__name__, self.masks))


@jax.tree_util.register_pytree_node_class
class And(_Combine):
    """Allowed iff every child allows."""

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        out = self.masks[0].evaluate(b, h, q_idx, kv_idx, q_seg, kv_seg)
        for m in self.masks[1:]:
            out = out & m.evaluate(b, h, q_idx, kv_idx, q_seg, kv_seg)
        return out

    def classify_blocks(self, geom):
        cs = [m.classify_blocks(geom) for m in self.masks]
        may_true, may_false, exact = cs[0].may_true, cs[0].may_false, cs[0].exact
        n_partial = (cs[0].may_true & cs[0].may_false).astype(np.int32)
        any_empty_exact = ~cs[0].may_true & cs[0].exact
        for c in cs[1:]:
            may_true = may_true & c.may_true
            may_false = may_false | c.may_false
            exact = exact & c.exact
            n_partial = n_partial + (c.may_true & c.may_false).astype(np.int32)
            any_empty_exact = any_empty_exact | (~c.may_true & c.exact)
        # Exact when all children are exact and at most one of them is partial; a
        # child that is exactly empty makes the AND exactly empty whatever the rest.
        exact = (exact & (n_partial <= 1)) | any_empty_exact
        return BlockClass(may_true, may_false, exact)


@jax.tree_util.register_pytree_node_class
class Or(_Combine):
    """Allowed iff some child allows."""

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        out = self.masks[0].evaluate(b, h, q_idx, kv_idx, q_seg, kv_seg)
        for m in self.masks[1:]:
            out = out | m.evaluate(b, h, q_idx, kv_idx, q_seg, kv_seg)
        return out

    def classify_blocks(self, geom):
        cs = [m.classify_blocks(geom) for m in self.masks]
        may_true, may_false, exact = cs[0].may_true, cs[0].may_false, cs[0].exact
        n_partial = (cs[0].may_true & cs[0].may_false).astype(np.int32)
        any_full_exact = ~cs[0].may_false & cs[0].exact
        for c in cs[1:]:
            may_true = may_true | c.may_true
            may_false = may_false & c.may_false
            exact = exact & c.exact
            n_partial = n_partial + (c.may_true & c.may_false).astype(np.int32)
            any_full_exact = any_full_exact | (~c.may_false & c.exact)
        exact = (exact & (n_partial <= 1)) | any_full_exact
        return BlockClass(may_true, may_false, exact)


@jax.tree_util.register_pytree_node_class
class Offset(Mask):
    """Evaluates ``inner`` at (q_idx + q_offset, kv_idx + kv_offset).

    Use it when queries are the last ``q_len`` positions of a ``kv_len`` context
    (decode, chunked prefill): ``offset(causal, q_offset=kv_len - q_len)``.
    """

    def __init__(self, inner: Mask, q_offset: int = 0, kv_offset: int = 0):
        self.inner = as_mask(inner)
        if isinstance(self.inner, Document) or any(isinstance(m, Document) for m in self.inner.leaves()):
            raise ValueError("offset() does not apply to document masks: segment ids are given per position")
        self.q_offset = int(q_offset)
        self.kv_offset = int(kv_offset)

    def tree_flatten(self):
        return (self.inner,), (self.q_offset, self.kv_offset)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.inner = children[0]
        obj.q_offset, obj.kv_offset = aux
        return obj

    def leaves(self):
        yield from self.inner.leaves()

    def evaluate(self, b, h, q_idx, kv_idx, q_seg=None, kv_seg=None):
        return self.inner.evaluate(b, h, q_idx + self.q_offset, kv_idx + self.kv_offset, q_seg, kv_seg)

    def classify_blocks(self, geom):
        shifted = dataclasses.replace(
            geom, q_lo=geom.q_lo + self.q_offset, q_hi=geom.q_hi + self.q_offset,
            kv_lo=geom.kv_lo + self.kv_offset, kv_hi=geom.kv_hi + self.kv_offset)
        return self.inner.classify_blocks(shifted)

    def cache_key(self):
        k = self.inner.cache_key()
        return None if k is None else ("offset", k, self.q_offset, self.kv_offset)

    def captures_arrays(self):
        return self.inner.captures_arrays()

    def __repr__(self):
        return f"Offset({self.inner!r}, q_offset={self.q_offset}, kv_offset={self.kv_offset})"

    def __eq__(self, other):
        return isinstance(other, Offset) and (other.inner, other.q_offset, other.kv_offset) == (
            self.inner, self.q_offset, self.kv_offset)

    def __hash__(self):
        return hash(("offset", self.inner, self.q_offset, self.kv_offset))


def as_mask(mask_fn) -> Mask:
    """Wrap a plain ``fn(b, h, q_idx, kv_idx)`` in :class:`FnMask`; masks pass through."""
    if isinstance(mask_fn, Mask):
        return mask_fn
    return FnMask(mask_fn)


# -- the public constructors ------------------------------------------------------------------
causal = Band(0, None)
"""q_idx >= kv_idx (top-left aligned; use :func:`bottom_right` when q_len < kv_len)."""

full = Full()
"""Every pair allowed."""


def sliding_window(window: int, *, causal: bool = False) -> Mask:
    """|q_idx - kv_idx| < window; with ``causal=True`` only 0 <= q_idx - kv_idx < window."""
    window = int(window)
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    return Band(0, window - 1) if causal else Band(-(window - 1), window - 1)


def chunked(chunk: int, *, causal: bool = False) -> Mask:
    """Attention inside chunks of ``chunk`` positions (optionally causal within the chunk)."""
    chunk = int(chunk)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return And(Chunked(chunk), Band(0, None)) if causal else Chunked(chunk)


def prefix_lm(prefix_len: int) -> Mask:
    """Bidirectional over the first ``prefix_len`` keys, causal elsewhere."""
    return Or(Band(0, None), KVPrefix(int(prefix_len)))


def document(segment_ids, kv_segment_ids=None) -> Mask:
    """Same-segment attention. ids: int [S] or [B, S]; ``kv_segment_ids`` when q and kv differ."""
    return Document(segment_ids, kv_segment_ids)


def and_masks(*masks) -> Mask:
    """Intersection of masks (FlexAttention's ``and_masks``)."""
    return And(*masks) if len(masks) != 1 else as_mask(masks[0])


def or_masks(*masks) -> Mask:
    """Union of masks (FlexAttention's ``or_masks``)."""
    return Or(*masks) if len(masks) != 1 else as_mask(masks[0])


def offset(mask, q_offset: int = 0, kv_offset: int = 0) -> Mask:
    """``mask`` evaluated at shifted positions (see :class:`Offset`)."""
    return Offset(as_mask(mask), q_offset, kv_offset)


def bottom_right(mask, q_len: int, kv_len: int) -> Mask:
    """Align the last query with the last key (decode / chunked prefill)."""
    return Offset(as_mask(mask), q_offset=kv_len - q_len)
