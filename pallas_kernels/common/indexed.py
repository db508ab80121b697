"""Shared logic of the indexed-attention kernels (token lists and block lists), every backend.

Vocabulary. A *list* ``idx int32 [B, Sq, Hkv, n]`` names, per query token and kv head,
``n`` *units*: single key tokens (``span = 1``) or key blocks of ``span`` consecutive
tokens. Unit ``u`` covers key positions ``u * span ... u * span + span - 1``.

The ops canonicalise every list once (:func:`canonicalize`) before any kernel runs:
out-of-range units and, under causality, units entirely after the query become -1;
unless the caller promises uniqueness the list is sorted with its valid units first
and repeated units turned into -1 (set semantics: a key counts once however often it
is listed). Kernels still mask every key they touch (clamped address, -inf score)
so a hand-made list cannot make them read out of bounds.

Kernels walk ``count[b, t, h]`` leading slots of a row (``n`` when the list was not
compacted), in chunks of ``BN`` key positions; :func:`chunk_positions` is the one
definition of which key positions a chunk holds and which of them are allowed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

QUERY_MAJOR, KV_MAJOR = "query", "kv"
LOOP_ORDERS = (QUERY_MAJOR, KV_MAJOR)

# Query heads per kv head from which packing a group's heads into the MMA's M
# dimension (NSA's loop, query-major) beats FSA's inverted loop (kv-major).
# Triton's dot needs M >= 16: below that a query-major tile is mostly padding. H100 round 2
# (G=16, 16 blocks of 64): kv-major ran fwd+bwd 3.5x (random) / 1.4x (correlated) faster than
# query-major, so G=16 goes kv-major; G >= 32 is untimed and stays query-major.
QUERY_MAJOR_MIN_GROUP = 32


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_loop_order(group_size: int, loop_order: str | None = None) -> str:
    """Loop order of the block-list kernels for ``group_size`` query heads per kv head.

    ``None`` picks query-major (NSA: one token's G heads form the MMA rows, its blocks
    are the inner loop) when ``G >= QUERY_MAJOR_MIN_GROUP`` and kv-major otherwise (FSA:
    one program per key block, the tokens that selected it stacked into the MMA rows;
    partial outputs merged afterwards).
    """
    if loop_order is None:
        return QUERY_MAJOR if group_size >= QUERY_MAJOR_MIN_GROUP else KV_MAJOR
    if loop_order not in LOOP_ORDERS:
        raise ValueError(f"loop_order must be one of {LOOP_ORDERS} or None; got {loop_order!r}")
    return loop_order


def query_positions(q_offset, B: int, Sq: int):
    """Absolute positions int32 [B, Sq] of the queries: ``t + q_offset[b]``."""
    return jnp.arange(Sq, dtype=jnp.int32)[None, :] + q_offset[:, None]


def unit_allowed(units, t_abs, *, span: int, n_units: int, causal: bool):
    """Which units may hold an allowed key: in range and (causal) starting at or before the query.

    units int [..., n]; t_abs int [...] (broadcast against units[..., 0]).
    """
    ok = (units >= 0) & (units < n_units)
    if causal:
        ok &= units * span <= t_abs[..., None]  # the unit's first key is not after the query
    return ok


def key_allowed(pos, t_abs, *, kv_len: int, causal: bool):
    """Which key positions (already known to come from a valid unit) are allowed (``t_abs`` may be
    None when ``causal`` is False)."""
    ok = (pos >= 0) & (pos < kv_len)
    if causal:
        ok &= pos <= t_abs
    return ok


@dataclasses.dataclass(frozen=True)
class Lists:
    """Canonical lists: ``idx int32 [B, Sq, Hkv, n]`` (-1 = unused) and ``count int32 [B, Sq, Hkv]``."""

    idx: jax.Array
    count: jax.Array


jax.tree_util.register_dataclass(Lists, data_fields=["idx", "count"], meta_fields=[])


def canonicalize(indices, q_offset, *, span: int, n_units: int, causal: bool, unique: bool) -> Lists:
    """Canonical form of user lists (see the module docstring).

    ``unique=False``: sorted ascending with the valid units first, duplicates -> -1, and
    ``count`` = valid units per row, so kernels stop early. ``unique=True`` (the caller
    promises no unit repeats in a row): one elementwise pass, ``count = n``.
    """
    B, Sq, _, n = indices.shape
    t_abs = query_positions(q_offset, B, Sq)[:, :, None]  # [B, Sq, 1]
    idx = indices.astype(jnp.int32)
    ok = unit_allowed(idx, t_abs, span=span, n_units=n_units, causal=causal)
    if unique:
        idx = jnp.where(ok, idx, -1)
        return Lists(idx, jnp.full(idx.shape[:3], n, jnp.int32))
    big = jnp.iinfo(jnp.int32).max
    srt = jnp.sort(jnp.where(ok, idx, big), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(srt[..., :1], bool), srt[..., 1:] == srt[..., :-1]], axis=-1)
    keep = (srt != big) & ~dup
    srt = jnp.sort(jnp.where(keep, srt, big), axis=-1)  # repeats join the unused slots at the end
    return Lists(jnp.where(srt != big, srt, -1), jnp.sum(keep, axis=-1, dtype=jnp.int32))


def chunk_positions(load_units, c, count, *, BN: int, span: int, n_units: int, kv_len: int):
    """Key positions of chunk ``c`` (``BN`` of them) of a row and which are real keys.

    ``load_units(slots, in_range)`` returns the units at integer slots (int32 [BN]),
    -1 where ``in_range`` is False (each backend reads its own memory). Returns
    (pos int32 [BN] clamped to 0 where not ok, ok bool [BN], slots int32 [BN] clamped to
    0 where out of range, in_range bool [BN]). Causality is per query row: see
    :func:`key_allowed`.
    """
    flat = c * BN + jnp.arange(BN, dtype=jnp.int32)
    if span == 1:
        slot, off = flat, None
    else:
        slot, off = flat // span, flat % span
    in_range = slot < count
    slot = jnp.where(in_range, slot, 0)
    units = load_units(slot, in_range)
    ok = in_range & (units >= 0) & (units < n_units)
    pos = units if off is None else units * span + off
    ok &= key_allowed(pos, None, kv_len=kv_len, causal=False)
    return jnp.where(ok, pos, 0), ok, slot, in_range


MAX_QUERY_TILE = 16  # tokens per query tile: one bit each in an int32 membership word


@dataclasses.dataclass(frozen=True)
class TileLists:
    """Lists of tiles of ``T`` consecutive query tokens (the query-tile loop of the kernels).

    ``idx int32 [B, nT, Hkv, U]``: the union of the tile's canonical lists, ascending, -1 after
    ``count int32 [B, nT, Hkv]`` valid units; ``bits int32 [B, nT, Hkv, U]``: bit ``j`` set when
    token ``tile * T + j`` listed the unit. ``T == 1``: the canonical lists themselves, ``bits``
    None (every valid unit belongs to the one token).
    """

    idx: jax.Array
    count: jax.Array
    bits: jax.Array | None
    T: int


jax.tree_util.register_dataclass(TileLists, data_fields=["idx", "count", "bits"], meta_fields=["T"])


def _segmented_or(first, bits):
    """Inclusive OR of ``bits`` over runs that start where ``first`` is True (last axis)."""
    def op(a, b):
        fa, va = a
        fb, vb = b
        return fa | fb, jnp.where(fb, vb, va | vb)
    return jax.lax.associative_scan(op, (first, bits), axis=-1)[1]


def tile_lists(lists: Lists, T: int) -> TileLists:
    """Union lists of tiles of ``T`` consecutive tokens (see :class:`TileLists`).

    Tokens past ``Sq`` (the last tile may be ragged) list nothing. The union is a set: a unit
    listed twice by one token still counts once for it (also under ``unique=True``).
    """
    if not 1 <= T <= MAX_QUERY_TILE or T & (T - 1):
        raise ValueError(f"query tile must be a power of two in [1, {MAX_QUERY_TILE}]; got {T}")
    if T == 1:
        return TileLists(lists.idx, lists.count, None, 1)
    B, Sq, Hkv, n = lists.idx.shape
    nT = cdiv(Sq, T)
    slot_ok = jnp.arange(n, dtype=jnp.int32) < lists.count[..., None]
    idx = jnp.where(slot_ok, lists.idx, -1)
    idx = jnp.pad(idx, ((0, 0), (0, nT * T - Sq), (0, 0), (0, 0)), constant_values=-1)
    idx = idx.reshape(B, nT, T, Hkv, n).transpose(0, 1, 3, 2, 4).reshape(B, nT, Hkv, T * n)
    bit = jnp.repeat(jnp.left_shift(1, jnp.arange(T, dtype=jnp.int32)), n)  # [T * n]
    big = jnp.iinfo(jnp.int32).max
    key, bit = jax.lax.sort((jnp.where(idx >= 0, idx, big), jnp.broadcast_to(bit, idx.shape)), dimension=3,
                            num_keys=1)
    change = key[..., 1:] != key[..., :-1]
    first = jnp.concatenate([jnp.ones_like(key[..., :1], bool), change], axis=-1)
    last = jnp.concatenate([change, jnp.ones_like(key[..., :1], bool)], axis=-1)
    union_bits = _segmented_or(first, bit)
    keep = last & (key != big)
    key, union_bits = jax.lax.sort((jnp.where(keep, key, big), union_bits), dimension=3, num_keys=1)
    valid = key != big
    return TileLists(jnp.where(valid, key, -1), jnp.sum(valid, axis=-1, dtype=jnp.int32),
                     jnp.where(valid, union_bits, 0), T)


def num_chunks(count, *, BN: int, span: int):
    """Chunks of ``BN`` positions a row of ``count`` units needs (``lax.div``: Mosaic lowers ``//`` via sign)."""
    return jax.lax.div(count * span + BN - 1, BN)


@dataclasses.dataclass(frozen=True)
class PairTable:
    """Block lists transposed to per-block lists of (token, slot) pairs, for the kv-major loop.

    ``tok, slot int32 [B, Hkv, P]`` (P = Sq * n) sorted by block, the pairs of unused
    slots last; ``start int32 [B, Hkv, n_blocks + 1]``: the pairs of block j are
    ``start[j]:start[j + 1]``.
    """

    tok: jax.Array
    slot: jax.Array
    start: jax.Array


jax.tree_util.register_dataclass(PairTable, data_fields=["tok", "slot", "start"], meta_fields=[])


def pair_table(idx, n_blocks: int) -> PairTable:
    """Transpose canonical block lists ``idx [B, Sq, Hkv, n]`` (see :class:`PairTable`)."""
    B, Sq, Hkv, n = idx.shape
    flat = jnp.transpose(idx, (0, 2, 1, 3)).reshape(B, Hkv, Sq * n)
    key = jnp.where(flat >= 0, flat, n_blocks)  # unused slots sort after every block
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    counts = jax.vmap(jax.vmap(lambda x: jnp.bincount(x, length=n_blocks + 1)))(key)[..., :n_blocks]
    start = jnp.concatenate([jnp.zeros((B, Hkv, 1), jnp.int32), jnp.cumsum(counts, axis=-1, dtype=jnp.int32)],
                            axis=-1)
    return PairTable(order // n, order % n, start)


def merge_partials(o_part, lse_part, valid):
    """Combine per-slot partial softmaxes.

    o_part f32 [..., n, G, Dv] (each normalised over its own keys), lse_part f32 [..., n, G]
    (natural log), valid bool [..., n] (slots never written hold garbage). Returns
    o f32 [..., G, Dv] and lse f32 [..., G] (-inf where nothing was valid).
    """
    lse_part = jnp.where(valid[..., None], lse_part, -jnp.inf)
    m = jnp.max(lse_part, axis=-2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m_safe[..., None, :])  # [..., n, G]; 0 where invalid
    l = jnp.sum(w, axis=-2)
    o = jnp.einsum("...ng,...ngd->...gd", w, jnp.where(valid[..., None, None], o_part, 0.0))
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return o, lse


def slot_valid_for_merge(idx, q_offset, *, span: int, kv_len: int, causal: bool):
    """bool [B, Sq, Hkv, n]: canonical slots whose block holds at least one allowed key."""
    B, Sq = idx.shape[:2]
    t_abs = query_positions(q_offset, B, Sq)[:, :, None, None]
    ok = (idx >= 0) & (idx * span < kv_len)
    if causal:
        ok &= idx * span <= t_abs
    return ok
