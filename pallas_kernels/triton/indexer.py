"""Lightning-indexer kernels on GPUs (Pallas -> Triton).

``score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s])`` is never written for
all (t, s): the Hi per-head logits live only in registers, and

* :func:`tile_candidates` computes a [BQ queries x BK keys] tile per program (heads
  looped, one MMA each) and writes the tile's best ``c`` keys per query
  (``c == BK``: the whole tile, i.e. plain fused scores);
* :func:`list_scores` scores, per query, the keys of a short per-query list of
  key tiles (the hierarchical indexer's second stage, and the flat indexer's
  re-scoring of saturated tiles); the query's Hi heads are the MMA rows.

Masked scores (keys past ``Skv``, after the query, unused list slots) are -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import indexed as common
from pallas_kernels.triton.indexed_attention import overridden
from sparse_jax import _compat

_BQ = 64


def _tile_kernel(t_abs_ref, q_ref, k_ref, w_ref, vals_ref, idx_ref, *, Hi, Di, Sq, Skv, BQ, BK, c, causal):
    j, i = pl.program_id(0), pl.program_id(1)
    Dip = k_ref.shape[-1]
    rows = i * BQ + jnp.arange(BQ, dtype=jnp.int32)
    row_ok = rows < Sq
    t_abs = plgpu.load(t_abs_ref.at[jnp.where(row_ok, rows, 0)], mask=row_ok, other=-1)
    keys = j * BK + jnp.arange(BK, dtype=jnp.int32)
    dcols = jnp.arange(Dip, dtype=jnp.int32)
    key_ok = keys < Skv
    kt = plgpu.load(k_ref.at[jnp.where(key_ok, keys, 0)[:, None], dcols[None, :]],
                    mask=key_ok[:, None] & (dcols < Di)[None, :], other=0.0)
    allowed = row_ok[:, None] & key_ok[None, :]
    if causal:
        allowed &= keys[None, :] <= t_abs[:, None]
    # Heads run only if some pair of the tile is allowed (causal: tiles after every query are skipped).
    live = j * BK < Skv
    if causal:
        live &= jnp.max(jnp.where(row_ok, t_abs, -1)) >= j * BK
    # Not jnp.where(live, Hi, 0): Pallas-Triton (jax 0.11/0.12) types a scalar select of two
    # Python literals like its predicate (i1), and scf.for then rejects the mixed bounds.
    n_heads = Hi * live.astype(jnp.int32)
    safe_rows = jnp.where(row_ok, rows, 0)

    def head(h, acc):
        qh = plgpu.load(q_ref.at[safe_rows[:, None], h, dcols[None, :]],
                        mask=row_ok[:, None] & (dcols < Di)[None, :], other=0.0)
        wh = plgpu.load(w_ref.at[safe_rows, h], mask=row_ok, other=0.0).astype(jnp.float32)
        return acc + jnp.maximum(plgpu.dot(qh, kt, trans_b=True), 0.0) * wh[:, None]

    s = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((BQ, BK), jnp.float32))
    s = jnp.where(allowed, s, -jnp.inf)
    # The last query block may overhang Sq: its rows would land in the next batch's rows.
    store = lambda ref, x: plgpu.store(ref, x, mask=jnp.broadcast_to(row_ok[:, None], x.shape))
    if c == BK:
        store(vals_ref, s)
        store(idx_ref, jnp.broadcast_to(keys[None, :], (BQ, BK)))
        return
    col = jnp.arange(BK, dtype=jnp.int32)
    out_col = jnp.arange(c, dtype=jnp.int32)

    def pick(r, carry):  # r-th best key of every row: the lowest index among the maxima
        s, vals, idx = carry
        m = jnp.max(s, axis=1)
        am = jnp.min(jnp.where(s == m[:, None], col[None, :], BK), axis=1)
        s = jnp.where(col[None, :] == am[:, None], -jnp.inf, s)
        vals = jnp.where(out_col[None, :] == r, m[:, None], vals)
        idx = jnp.where(out_col[None, :] == r, (j * BK + am)[:, None], idx)
        return s, vals, idx

    _, vals, idx = jax.lax.fori_loop(0, c, pick, (s, jnp.full((BQ, c), -jnp.inf, jnp.float32),
                                                 jnp.zeros((BQ, c), jnp.int32)))
    store(vals_ref, vals)
    store(idx_ref, idx)


def tile_candidates(q, k, w, t_abs, *, tile: int, cands: int, causal: bool, interpret: bool = False):
    """Per (query, key tile of ``tile`` keys): the best ``cands`` keys.

    q [B, Sq, Hi, Di], k [B, Skv, Di], w [B, Sq, Hi], t_abs int32 [B, Sq]. Returns values
    f32 [B, Sq, nT, cands] (descending; -inf where masked) and key indices int32 (same
    shape). ``cands == tile`` returns every score of the tile (in key order).
    """
    B, Sq, Hi, Di = q.shape
    Skv = k.shape[1]
    BQ, BK, c = overridden("BQ", _BQ), tile, cands
    nT = common.cdiv(Skv, BK)
    Dip = max(16, common.next_pow2(Di))
    kernel = functools.partial(_tile_kernel, Hi=Hi, Di=Di, Sq=Sq, Skv=Skv, BQ=BQ, BK=BK, c=c, causal=causal)
    out = pl.BlockSpec((None, BQ, None, c), lambda j, i, b: (b, i, j, 0))
    vals, idx = pl.pallas_call(
        kernel, grid=(nT, common.cdiv(Sq, BQ), B),
        in_specs=[pl.BlockSpec((None, Sq), lambda j, i, b: (b, 0)),
                  pl.BlockSpec((None, Sq, Hi, Dip), lambda j, i, b: (b, 0, 0, 0)),
                  pl.BlockSpec((None, Skv, Dip), lambda j, i, b: (b, 0, 0)),
                  pl.BlockSpec((None, Sq, Hi), lambda j, i, b: (b, 0, 0))],
        out_specs=[out, out],
        out_shape=[jax.ShapeDtypeStruct((B, Sq, nT, c), jnp.float32), jax.ShapeDtypeStruct((B, Sq, nT, c), jnp.int32)],
        compiler_params=_compat.triton_compiler_params(num_warps=overridden("indexer_warps", 4),
                                                       num_stages=overridden("indexer_stages", 2)),
        interpret=interpret, name="lightning_indexer_tiles",
    )(t_abs, q, k, w)
    return vals, idx


def _list_kernel(t_abs_ref, count_ref, q_ref, w_ref, k_ref, list_ref, out_ref, *, Hi, Di, Skv, BK, E, causal):
    # out_ref rows are BKp >= 16 wide (a Triton dot needs N >= 16); lanes >= BK are masked.
    t, b = pl.program_id(0), pl.program_id(1)
    Hip, Dip = q_ref.shape
    t_abs = t_abs_ref[b, t]
    heads = jnp.arange(Hip, dtype=jnp.int32)
    dcols = jnp.arange(Dip, dtype=jnp.int32)
    q = plgpu.load(q_ref, mask=(heads < Hi)[:, None] & (dcols < Di)[None, :], other=0.0)
    w = plgpu.load(w_ref, mask=heads < Hi, other=0.0).astype(jnp.float32)
    BKp = out_ref.shape[-1]
    lanes = jnp.arange(BKp, dtype=jnp.int32)

    def body(e, carry):
        u = list_ref[e]
        keys = u * BK + lanes
        ok = (u >= 0) & (lanes < BK) & (keys < Skv)
        if causal:
            ok &= keys <= t_abs
        kt = plgpu.load(k_ref.at[jnp.where(ok, keys, 0)[:, None], dcols[None, :]],
                        mask=ok[:, None] & (dcols < Di)[None, :], other=0.0)
        s = jnp.sum(jnp.maximum(plgpu.dot(q, kt, trans_b=True), 0.0) * w[:, None], axis=0)  # [BK]
        out_ref[e, :] = jnp.where(ok, s, -jnp.inf)
        return carry

    count = count_ref[b, t]
    jax.lax.fori_loop(0, count, body, 0)

    def blank(e, carry):
        out_ref[e, :] = jnp.full((BKp,), -jnp.inf, jnp.float32)
        return carry

    jax.lax.fori_loop(count, E, blank, 0)


def list_scores(q, k, w, t_abs, tiles, count, *, tile: int, causal: bool, interpret: bool = False):
    """Scores of the keys of per-query tile lists.

    tiles int32 [B, Sq, E] (tile ``u`` holds keys ``u*tile ... u*tile + tile - 1``; only the
    first ``count[b, t]`` slots are read, -1 = unused), count int32 [B, Sq]. Returns
    f32 [B, Sq, E, tile] (-inf where masked or unused).
    """
    B, Sq, Hi, Di = q.shape
    Skv, E = k.shape[1], tiles.shape[-1]
    Hip, Dip = max(16, common.next_pow2(Hi)), max(16, common.next_pow2(Di))
    BKp = max(16, tile)
    kernel = functools.partial(_list_kernel, Hi=Hi, Di=Di, Skv=Skv, BK=tile, E=E, causal=causal)
    out = pl.pallas_call(
        kernel, grid=(Sq, B),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(),
                  pl.BlockSpec((None, None, Hip, Dip), lambda t, b: (b, t, 0, 0)),
                  pl.BlockSpec((None, None, Hip), lambda t, b: (b, t, 0)),
                  pl.BlockSpec((None, Skv, Dip), lambda t, b: (b, 0, 0)),
                  pl.BlockSpec((None, None, E), lambda t, b: (b, t, 0))],
        out_specs=pl.BlockSpec((None, None, E, BKp), lambda t, b: (b, t, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Sq, E, BKp), jnp.float32),
        compiler_params=_compat.triton_compiler_params(num_warps=4, num_stages=2),
        interpret=interpret, name="lightning_indexer_lists",
    )(t_abs, count, q, w, k, tiles)
    return out if BKp == tile else out[..., :tile]
