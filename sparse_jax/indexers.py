"""Indexers: choose, under ``jit``, the keys each query attends to (DeepSeek's lightning indexer, HISA).

Both return ``int32 [B, Sq, topk]`` key indices in descending score order, ``-1`` in
slots past the query's allowed keys; each key appears at most once, so the result
can go to :func:`sparse_jax.indexed_attention` with ``unique_indices=True`` (add a kv-head
axis: ``idx[:, :, None, :]``).

Score of key ``s`` for query ``t``: ``sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s])``.

:func:`lightning_indexer` (flat, exact) never writes the [Sq, Skv] score matrix:

1. a kernel scores [queries x ``tile_size`` keys] tiles with the Hi head logits in
   registers and keeps each tile's best ``tile_candidates`` keys per query;
2. the top ``topk`` of those candidates are taken (``lax.top_k``);
3. a tile all of whose candidates made the cut may hold more winners; there are at
   most ``topk // tile_candidates`` such *saturated* tiles per query, and a second
   kernel re-scores every key of them; the final top ``topk`` is taken over the
   unsaturated tiles' selected candidates plus the saturated tiles' keys.

This is exact: a key of the true top-k that was not its tile's candidate is beaten by
all ``c`` candidates of its tile, which are then all in the true top-k and so all
selected in step 2 -- the tile is saturated and re-scored. Memory is
``O(Sq * (Skv * c / tile + topk + topk * tile / c))``.

:func:`hierarchical_indexer` (HISA, approximate) scores mean-pooled key blocks, keeps
the best ``num_blocks`` blocks per query and runs the token scores inside them only.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.common import indexed as common
from sparse_jax import backends
from sparse_jax.reference import indexed as ref

_KERNEL_MODULES = {
    backends.TRITON: "pallas_kernels.triton.indexer",
    backends.MOSAIC_TPU: "pallas_kernels.tpu.indexer",
}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_POOLED_TILE = 128


def _validate(q_idx, k_idx, weights, topk, op):
    if q_idx.ndim != 4:
        raise ValueError(f"{op}: q_idx must be [B, Sq, Hi, Di]; got shape {tuple(q_idx.shape)}")
    B, Sq, Hi, Di = q_idx.shape
    if k_idx.ndim != 3 or k_idx.shape[0] != B or k_idx.shape[2] != Di:
        raise ValueError(f"{op}: k_idx must be [B, Skv, Di] = [{B}, Skv, {Di}]; got {tuple(k_idx.shape)}")
    if weights.shape != (B, Sq, Hi):
        raise ValueError(f"{op}: weights must be [B, Sq, Hi] = [{B}, {Sq}, {Hi}]; got {tuple(weights.shape)}")
    for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16; got {x.dtype}")
    if q_idx.dtype != k_idx.dtype:
        raise ValueError(f"{op}: q_idx and k_idx must share a dtype; got {q_idx.dtype}, {k_idx.dtype}")
    topk = int(topk)
    if not 1 <= topk <= k_idx.shape[1]:
        raise ValueError(f"{op}: topk must be in [1, Skv={k_idx.shape[1]}]; got {topk}")
    return topk


def _pow2(name, x):
    x = int(x)
    if x < 1 or x & (x - 1):
        raise ValueError(f"{name} must be a power of two; got {x}")
    return x


def _topk(vals, idx, k):
    """Top ``k`` of vals [..., m] carrying idx; pads to k with -inf / -1 when m < k."""
    m = vals.shape[-1]
    if m < k:
        pad = [(0, 0)] * (vals.ndim - 1) + [(0, k - m)]
        vals = jnp.pad(vals, pad, constant_values=-jnp.inf)
        idx = jnp.pad(idx, pad, constant_values=-1)
    v, pos = jax.lax.top_k(vals, k)
    return v, jnp.take_along_axis(idx, pos, axis=-1)


def _finish(vals, idx, return_scores):
    ok = vals > -jnp.inf
    idx = jnp.where(ok, idx, -1).astype(jnp.int32)
    return (idx, jnp.where(ok, vals, -jnp.inf)) if return_scores else idx


def _saturated_tiles(sel_vals, sel_idx, *, n_tiles, tile, cands, E):
    """Tiles all ``cands`` of whose candidates were selected: ids int32 [B, Sq, E] (ascending, -1 last),
    their count int32 [B, Sq], and a bool [B, Sq, k] marking the selections inside them."""
    B, Sq, _ = sel_vals.shape
    ok = sel_vals > -jnp.inf
    tile_of = jnp.where(ok, sel_idx // tile, n_tiles)  # dropped entries count toward a dummy tile
    counts = jnp.zeros((B, Sq, n_tiles + 1), jnp.int32)
    counts = counts.at[jnp.arange(B)[:, None, None], jnp.arange(Sq)[None, :, None], tile_of].add(1)
    sat = counts[..., :n_tiles] >= cands
    order = jnp.where(sat, -jnp.arange(n_tiles, dtype=jnp.int32), -n_tiles - 1)
    top, _ = jax.lax.top_k(order, E)
    tiles = jnp.where(top > -n_tiles - 1, -top, -1)
    in_sat = ok & jnp.take_along_axis(jnp.pad(sat, ((0, 0), (0, 0), (0, 1))), tile_of, axis=-1)
    return tiles, jnp.minimum(jnp.sum(sat, axis=-1, dtype=jnp.int32), E), in_sat


def default_tile_candidates(topk: int, tile: int) -> int:
    """Candidates kept per (query, tile): a quarter of the tile, at least 8, a power of two."""
    return max(8, min(tile, tile // 4))


def lightning_indexer(q_idx, k_idx, weights, topk: int, *, causal: bool = True, q_offset=None,
                      return_scores: bool = False, tile_size: int = 128, tile_candidates: int | None = None,
                      backend: str | None = None, interpret=False):
    """Exact top-``topk`` keys per query under the lightning-indexer score (DeepSeek V3.2).

    Args:
      q_idx: [B, Sq, Hi, Di] indexer queries; k_idx: [B, Skv, Di] the one shared indexer key
        head; weights: [B, Sq, Hi] per-head weights (float32/bfloat16/float16).
      topk: keys kept per query (1 <= topk <= Skv).
      causal: only keys at or before the query's position ``t + q_offset``.
      q_offset: int or int [B] (default ``Skv - Sq``).
      return_scores: also return the scores float32 [B, Sq, topk] (-inf in unused slots).
      tile_size, tile_candidates: kernel tile (keys) and candidates kept per tile (powers of
        two; see the module docstring). ``tile_candidates == tile_size`` keeps every score.
      backend, interpret: see :mod:`sparse_jax.backends` ("xla" runs the chunked reference).

    Returns:
      indices int32 [B, Sq, topk], descending by score, -1 where fewer keys are allowed.
    """
    topk = _validate(q_idx, k_idx, weights, topk, "lightning_indexer")
    # Selection is not differentiable (the kernels have no JVP): the scores are constants to autodiff.
    q_idx, k_idx, weights = jax.lax.stop_gradient((q_idx, k_idx, weights))
    B, Sq, _, _ = q_idx.shape
    Skv = k_idx.shape[1]
    backend = backends.resolve(backend, op="lightning_indexer")
    if backend == backends.XLA:
        return ref.lightning_indexer(q_idx, k_idx, weights, topk, causal=causal, q_offset=q_offset,
                                     return_scores=return_scores)
    tile = _pow2("tile_size", tile_size)
    if tile < 16:
        raise ValueError(f"tile_size must be at least 16 (an MMA dimension); got {tile}")
    cands = _pow2("tile_candidates", default_tile_candidates(topk, tile) if tile_candidates is None
                  else tile_candidates)
    if cands > tile:
        raise ValueError(f"tile_candidates ({cands}) cannot exceed tile_size ({tile})")
    kernels = importlib.import_module(_KERNEL_MODULES[backend])
    t_abs = common.query_positions(ref.query_offsets(q_offset, B, Sq, Skv), B, Sq)
    n_tiles = common.cdiv(Skv, tile)
    vals, idx = kernels.tile_candidates(q_idx, k_idx, weights, t_abs, tile=tile, cands=cands, causal=causal,
                                       interpret=interpret)
    sel_vals, sel_idx = _topk(vals.reshape(B, Sq, -1), idx.reshape(B, Sq, -1), topk)
    E = min(topk // cands, n_tiles)
    if cands == tile or E == 0:
        return _finish(sel_vals, sel_idx, return_scores)
    tiles, count, in_sat = _saturated_tiles(sel_vals, sel_idx, n_tiles=n_tiles, tile=tile, cands=cands, E=E)
    rescored = kernels.list_scores(q_idx, k_idx, weights, t_abs, tiles, count, tile=tile, causal=causal,
                                   interpret=interpret)
    keys = tiles[..., None] * tile + jnp.arange(tile, dtype=jnp.int32)
    pool_vals = jnp.concatenate([jnp.where(in_sat, -jnp.inf, sel_vals), rescored.reshape(B, Sq, -1)], axis=-1)
    pool_idx = jnp.concatenate([sel_idx, keys.reshape(B, Sq, -1)], axis=-1)
    return _finish(*_topk(pool_vals, pool_idx, topk), return_scores)


def hierarchical_indexer(q_idx, k_idx, weights, topk: int, *, block_size: int = 64, num_blocks: int | None = None,
                         causal: bool = True, q_offset=None, return_scores: bool = False,
                         backend: str | None = None, interpret=False):
    """HISA: top ``num_blocks`` mean-pooled key blocks per query, then the top ``topk`` keys inside them.

    Args as :func:`lightning_indexer`, plus ``block_size`` (a power of two) and ``num_blocks``
    (default: enough blocks for 4 x topk keys). Cost ~ ``Skv / block_size + num_blocks *
    block_size`` key scores per query instead of ``Skv``; agrees with the flat indexer
    wherever the true top-k lies in the kept blocks (measure the overlap with
    :func:`topk_overlap`).
    """
    topk = _validate(q_idx, k_idx, weights, topk, "hierarchical_indexer")
    # Selection is not differentiable (the kernels have no JVP): the scores are constants to autodiff.
    q_idx, k_idx, weights = jax.lax.stop_gradient((q_idx, k_idx, weights))
    B, Sq, _, _ = q_idx.shape
    Skv = k_idx.shape[1]
    bs = _pow2("block_size", block_size)
    nb = common.cdiv(Skv, bs)
    m = min(nb, 4 * common.cdiv(topk, bs) if num_blocks is None else int(num_blocks))
    if m < 1 or topk > m * bs:
        raise ValueError(f"hierarchical_indexer: num_blocks * block_size ({m} * {bs}) must hold topk ({topk})")
    backend = backends.resolve(backend, op="hierarchical_indexer")
    if backend == backends.XLA:
        return ref.hierarchical_indexer(q_idx, k_idx, weights, topk, block_size=bs, num_blocks=m, causal=causal,
                                        q_offset=q_offset, return_scores=return_scores)
    kernels = importlib.import_module(_KERNEL_MODULES[backend])
    t_abs = common.query_positions(ref.query_offsets(q_offset, B, Sq, Skv), B, Sq)
    pooled = ref.pool_blocks(k_idx, bs)
    ptile = max(16, min(_POOLED_TILE, common.next_pow2(nb)))
    # A block is allowed when it starts at or before the query: pooled index <= floor(t_abs / bs).
    bvals, bidx = kernels.tile_candidates(q_idx, pooled, weights, jnp.floor_divide(t_abs, bs), tile=ptile,
                                          cands=ptile, causal=causal, interpret=interpret)
    bvals = bvals.reshape(B, Sq, -1)[..., :nb]
    top, blocks = jax.lax.top_k(bvals, m)
    blocks = jnp.sort(jnp.where(top > -jnp.inf, blocks, nb), axis=-1)  # ascending, unused last
    count = jnp.sum(blocks < nb, axis=-1, dtype=jnp.int32)
    blocks = jnp.where(blocks < nb, blocks, -1).astype(jnp.int32)
    scores = kernels.list_scores(q_idx, k_idx, weights, t_abs, blocks, count, tile=bs, causal=causal,
                                 interpret=interpret)
    keys = blocks[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)
    return _finish(*_topk(scores.reshape(B, Sq, -1), keys.reshape(B, Sq, -1), topk), return_scores)


def topk_overlap(a, b):
    """Intersection-over-union of two index lists int [..., k] (-1 = empty), per row: float32 [...]."""
    a, b = jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    sa = jnp.sort(jnp.where(a >= 0, a, big), axis=-1)
    flat_sa, flat_b = sa.reshape(-1, sa.shape[-1]), b.reshape(-1, b.shape[-1])
    pos = jax.vmap(jnp.searchsorted)(flat_sa, flat_b)
    hit = jnp.take_along_axis(flat_sa, jnp.minimum(pos, sa.shape[-1] - 1), axis=-1) == flat_b
    inter = jnp.sum(hit & (flat_b >= 0), axis=-1).reshape(a.shape[:-1])
    union = jnp.sum(a >= 0, axis=-1) + jnp.sum(b >= 0, axis=-1) - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)
