"""``permuted_block_sparse_attention``: PBS-Attn (Wang et al., 2025) on top of the block-sparse kernels.

Pipeline (everything under ``jit`` with static table shapes; selection is not differentiated):

1. importance of every key: softmax(Q_last K^T) over the last ``block_size`` queries,
   averaged over those rows and over the query heads of each kv head;
2. keys (values follow) sorted by decreasing importance *within* segments of
   ``segment_size``, per kv head; optionally queries too (:func:`sparse_jax.permutation.query_affinity`);
3. blocks chosen on the permuted layout: mean-pooled block logits softmaxed over the
   candidate blocks (earlier segments when causal, other segments otherwise), kept to a
   cumulative ``threshold``; the block holding token 0 forced; the diagonal segment always
   computed, masked token by token on the original positions (:class:`~sparse_jax.permutation.SegmentCausal`);
4. :func:`sparse_jax.block_sparse_attention` on the permuted layout; output rows back in
   the original order.

Steps 1-3 are :func:`pbs_plan`, step 4 :func:`pbs_attend` (separately callable: to time
the stages, or to reuse one plan).

Two layouts reach the kernel. *Physical* (default): K/V gathered per kv head and heads
folded into the batch (q [B*Hkv, S, G, D], k/v [B*Hkv, S, 1, D]) so the per-head original
positions ride in the op's per-batch ``kv_positions``. *Online* (``online_permutation``):
K/V stay in place and the kernel reads row ``perm[b, h, j]`` for logical key j
(``kv_permutation=``), positions following the rows; no gather, no fold.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import block_mask as bm_lib
from sparse_jax import permutation as perm_lib
from sparse_jax.block_mask import BlockMask
from sparse_jax.ops.attention import block_sparse_attention
from sparse_jax.ops import dropped_blocks as dropped_lib
from sparse_jax.selection import scores as scores_lib
from sparse_jax.selection import tables as tables_lib
from sparse_jax.selection import threshold as thr

__all__ = ["permuted_block_sparse_attention", "pbs_plan", "pbs_attend", "pbs_block_mask", "pbs_select", "pbs_tables",
           "pooled_layout_logits", "segment_layout", "PBSAux"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PBSAux:
    """What ``return_aux=True`` gives back.

    density: float32 scalar, fraction of (query-block, kv-block) pairs computed (over
      the folded tables [B*Hkv, Ht]).
    kv_permutation: int32 [B, Hkv, S]; ``k_perm[b, j, h] = k[b, kv_permutation[b, h, j], h]``.
    q_permutation: int32 [B, Hkv, S] or None (queries in place).
    block_mask: the tables on the permuted layout, batch folded: [B*Hkv, Ht] with Ht = 1
      (gqa="union"/"mean") or G (gqa="per_head"); row b*Hkv + h is kv head h of batch b.
    importance: float32 [B, Hkv, S], the permutation's sort key.
    """

    density: jax.Array
    kv_permutation: jax.Array
    q_permutation: jax.Array | None
    block_mask: BlockMask
    importance: jax.Array


def _has_kv_permutation_keyword() -> bool:
    return "kv_permutation" in inspect.signature(block_sparse_attention).parameters


def _check(q, k, v, block_size, segment_size, threshold):
    """Trace-time validation in the caller's shapes (the kernel sees folded ones)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, S, H, D]; got shape {tuple(x.shape)}")
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"permuted_block_sparse_attention is for self-attention prefill (Sq == Skv); "
                         f"got Sq={q.shape[1]}, Skv={k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    block_size, segment_size = int(block_size), int(segment_size)
    if block_size <= 0 or segment_size <= 0 or segment_size % block_size:
        raise ValueError(f"segment_size ({segment_size}) must be a positive multiple of block_size ({block_size})")
    if not isinstance(threshold, jax.core.Tracer):
        t = np.asarray(threshold, np.float64)
        if t.ndim > 1 or np.any(np.isnan(t)) or np.any(t < 0):
            raise ValueError(f"threshold must be a non-negative scalar or per-head vector; got {threshold!r}")
    return block_size, segment_size


@functools.lru_cache(maxsize=32)
def segment_layout(s: int, block: int, segment: int, causal: bool):
    """Static (numpy) facts of a segment-permuted layout of ``s`` tokens.

    Returns (diag, cand, classes, mask): bool [nb, nb] diagonal-segment blocks (always
    computed), bool [nb, nb] candidate blocks (earlier segments when causal, other segments
    otherwise), int8 [nb, nb] the class a computed block takes (causal: diagonal segment
    PARTIAL, earlier FULL; bidirectional: FULL), and the mask (:class:`SegmentCausal` or None).
    """
    nb = -(-s // block)
    seg = np.arange(nb) * block // segment
    diag = seg[:, None] == seg[None, :]
    cand = (seg[None, :] < seg[:, None]) if causal else ~diag
    mask = perm_lib.segment_causal(segment) if causal else None
    classes = tables_lib.static_classes(s, s, block, mask)
    for a in (diag, cand, classes):
        a.setflags(write=False)
    return diag, cand, classes, mask


def pooled_layout_logits(q, k, kperm, qperm, *, block_size: int, scale: float):
    """Mean-pooled block logits of the permuted layout, float32 [B*Hkv, G, nb, nb].

    q [B, S, Hq, D], k [B, S, Hkv, D]; kperm / qperm int32 [B, Hkv, S] or None (in place).
    Queries in place are pooled without folding q (the fold is a copy of the largest input).
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    if qperm is None:
        pq = scores_lib.pool_blocks(q, block_size)  # [B, nb, Hq, D]
    else:
        pq = scores_lib.pool_blocks(perm_lib.permute_heads(q, qperm), block_size)  # [N, nb, G, D]
    nb = pq.shape[1]
    pq = pq.reshape(b, nb, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b * hkv, g, nb, d)
    kf = perm_lib.permute_heads(k, kperm) if kperm is not None else perm_lib.fold_heads(k, hkv)
    pk = scores_lib.pool_blocks(kf, block_size)[:, :, 0]  # [N, nb, D]
    return jnp.einsum("ngqd,nkd->ngqk", pq, pk, precision=jax.lax.Precision.HIGHEST) * scale


def first_key_block(kperm, block_size: int):
    """int32 [B*Hkv]: the permuted block holding original position 0 (kperm [B, Hkv, S] or None)."""
    if kperm is None:
        return None
    n, s = kperm.shape[0] * kperm.shape[1], kperm.shape[2]
    return jnp.argmin(kperm.reshape(n, s), axis=-1).astype(jnp.int32) // block_size


def pbs_select(logits, first_block, *, s: int, block_size: int, segment_size: int, threshold, causal: bool,
               gqa: str = "union", max_kv_blocks: int | None = None, force_first: bool = True):
    """Block selection from pooled layout logits float32 [N, G, nb, nb] -> bool [N, 1|G, nb, nb].

    Softmax over the candidate blocks, cumulative ``threshold`` per query head (scalar or
    [N, G|1]), the block holding token 0 (``first_block`` int32 [N]; None: block 0)
    forced, GQA reduction, the diagonal segment OR-ed in.
    """
    diag, cand, _, _ = segment_layout(s, block_size, segment_size, causal)
    n, nb = logits.shape[0], diag.shape[0]
    probs = scores_lib.block_softmax(logits, jnp.asarray(cand))
    if force_first:
        fb = jnp.zeros((n,), jnp.int32) if first_block is None else first_block
        sink = (jnp.arange(nb, dtype=jnp.int32)[None, :] == fb[:, None])[:, None, None, :]  # [N, 1, 1, nb]
    else:
        sink = jnp.zeros((1, 1, 1, nb), bool)
    forced = sink & jnp.asarray(cand)

    def select(x):
        return thr.cumulative_threshold(x, threshold, allowed=cand, forced=forced)

    cap = None if max_kv_blocks is None else max(1, min(int(max_kv_blocks), nb))
    # One kv head per folded batch row: "union"/"mean" reduce the G query heads to one table.
    return thr.group_selection(select, probs, 1, gqa, cap, forced) | jnp.asarray(diag)


def pbs_tables(selection, *, s: int, block_size: int, segment_size: int, causal: bool,
               max_kv_blocks: int | None = None) -> BlockMask:
    """Tables of a PBS selection bool [N, Ht, nb, nb] (diagonal segment included).

    Causal: the diagonal segment is partial (:class:`SegmentCausal`; its row and column
    tables are numpy constants), earlier segments full. Bidirectional: every block full.
    Static widths: the diagonal segment's blocks (partial) and ``max_kv_blocks`` (default
    every block) for the rest.
    """
    diag, _, classes, mask = segment_layout(s, block_size, segment_size, causal)
    nb = diag.shape[0]
    n_diag = int(diag.sum(-1).max())
    width_full = nb if max_kv_blocks is None else max(1, min(int(max_kv_blocks), nb))
    if causal:
        return tables_lib.block_mask_from_selection(selection, classes, s, s, block_size, mask, max_kv_blocks=n_diag,
                                                    max_full_kv_blocks=width_full, static_partial=True)
    return tables_lib.block_mask_from_selection(selection, classes, s, s, block_size, None, max_kv_blocks=1,
                                                max_full_kv_blocks=min(nb, width_full + n_diag), static_partial=True)


def pbs_block_mask(q, k, kperm, qperm=None, *, block_size: int, segment_size: int, threshold, causal: bool,
                   gqa: str = "union", max_kv_blocks: int | None = None, force_first: bool = True,
                   scale: float | None = None) -> BlockMask:
    """PBS block selection on a permuted layout: :func:`pooled_layout_logits` ->
    :func:`pbs_select` -> :func:`pbs_tables`.

    q: [B, S, Hq, D], k: [B, S, Hkv, D] in original order; kperm: int32 [B, Hkv, S] (the
    key permutation; None: keys in place), qperm: likewise for queries (None: in place).
    ``threshold``: scalar or [B*Hkv, G|1] (see :func:`_fold_threshold`). Returns tables
    on the head-folded layout [B*Hkv, Ht] (Ht = 1 for gqa "union"/"mean", G for
    "per_head") with :class:`SegmentCausal` (causal) or no mask.
    """
    s, d = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    logits = pooled_layout_logits(q, k, kperm, qperm, block_size=block_size, scale=scale)
    sel = pbs_select(logits, first_key_block(kperm, block_size), s=s, block_size=block_size,
                     segment_size=segment_size, threshold=threshold, causal=causal, gqa=gqa,
                     max_kv_blocks=max_kv_blocks, force_first=force_first)
    return pbs_tables(sel, s=s, block_size=block_size, segment_size=segment_size, causal=causal,
                      max_kv_blocks=max_kv_blocks)


def _fold_threshold(threshold, b: int, hq: int, hkv: int, gqa: str):
    """A per-head threshold [Hq] (or [Hkv] for gqa="mean") -> [B*Hkv, G|1] for the folded layout."""
    t = jnp.asarray(threshold, jnp.float32)
    if t.ndim == 0:
        return t
    n = hkv if gqa == "mean" else hq
    if t.shape != (n,):
        raise ValueError(f"a per-head threshold must be [{n}] ({'kv' if gqa == 'mean' else 'query'} heads "
                         f"with gqa={gqa!r}); got shape {tuple(t.shape)}")
    return jnp.tile(t.reshape(hkv, n // hkv), (b, 1))


def _unfold_tables(bm: BlockMask, batch: int) -> BlockMask:
    """Tables [B*Hkv, Ht, ...] -> [B, Hkv*Ht, ...] (kv head h, group head g -> head h*Ht + g)."""
    def r(x):
        return x.reshape(batch, -1, *x.shape[2:])
    fields = {f: r(getattr(bm, f)) for f in bm_lib._TABLE_FIELDS}
    return dataclasses.replace(bm, **fields)


def pbs_plan(q, k, *, block_size: int = 128, segment_size: int = 256, threshold=0.9, causal: bool = True,
             permute_keys: bool = True, permute_queries: bool = False, gqa: str = "union",
             max_kv_blocks: int | None = None, importance_rows: int | None = None, force_first: bool = True,
             scale: float | None = None) -> PBSAux:
    """Estimate, permute and select: everything before the kernel (not differentiated).

    Arguments as in :func:`permuted_block_sparse_attention` (``permute_keys=False`` keeps
    keys in place: PBS's selection without the permutation, an ablation). Inputs are
    validated by the caller.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rows = block_size if importance_rows is None else int(importance_rows)
    threshold = _fold_threshold(threshold, b, hq, hkv, gqa)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    if permute_keys or permute_queries:
        importance = scores_lib.last_block_importance(q, k, rows=rows, causal=causal, scale=scale)
    else:
        importance = jnp.zeros((b, hkv, s), jnp.float32)
    if permute_keys:
        key = importance
        if force_first:
            # The sink stays whole: the first block's keys keep their slots, so the forced block
            # is the original first block (sorted in with the rest, the sink's keys that the last
            # queries ignore would leave it for tail blocks the threshold may drop).
            key = importance.at[..., :min(block_size, s)].set(jnp.inf)
        kperm = perm_lib.segment_permutation(key, segment_size)  # [B, Hkv, S]
    else:
        kperm = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, hkv, s))
    qperm = None
    if permute_queries:
        qperm = perm_lib.segment_permutation(perm_lib.query_affinity(q, k, importance), segment_size)
    tables = pbs_block_mask(q, k, kperm if permute_keys else None, qperm, block_size=block_size,
                            segment_size=segment_size, threshold=threshold, causal=causal, gqa=gqa,
                            max_kv_blocks=max_kv_blocks, force_first=force_first, scale=scale)
    return PBSAux(density=jnp.asarray(tables.density, jnp.float32), kv_permutation=kperm, q_permutation=qperm,
                  block_mask=tables, importance=importance)


def pbs_attend(q, k, v, plan: PBSAux, *, causal: bool = True, online_permutation: bool = False,
               scale: float | None = None, softcap: float | None = None, return_lse: bool = False,
               estimate_dropped: bool = False, backend: str | None = None, interpret=False):
    """The kernel stage of PBS: attention on the permuted layout a :func:`pbs_plan` describes.

    Physical path: gather K/V per kv head into the head-folded layout; online path: pass
    the permutation to the kernel. Output [B, S, Hq, Dv] in the original order (and the
    log-sum-exp float32 [B, Hq, S] over the computed pairs with ``return_lse``).
    ``estimate_dropped``: add every skipped block back as its mean key and value
    (:mod:`sparse_jax.ops.dropped_blocks`); lse then covers those pseudo-keys too.
    """
    if online_permutation and not _has_kv_permutation_keyword():
        raise NotImplementedError("online_permutation needs sparse_jax.block_sparse_attention(..., kv_permutation=); "
                                  "this version lacks it")
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kperm, qperm = plan.kv_permutation, plan.q_permutation
    tables = jax.tree_util.tree_map(jax.lax.stop_gradient, plan.block_mask)
    kw = dict(scale=scale, softcap=softcap, backend=backend, interpret=interpret, return_lse=True)
    if online_permutation and qperm is None:
        # Unfolded: q in place, K/V read through the permutation, tables per (b, head).
        unfolded = _unfold_tables(tables, b)
        o, lse = block_sparse_attention(q, k, v, unfolded, kv_permutation=kperm, **kw)
        if estimate_dropped:
            o, lse = dropped_lib.add_dropped_estimate(q, k, v, o, lse, unfolded, kv_permutation=kperm, scale=scale,
                                                      softcap=softcap, backend=backend, interpret=interpret)
        return (o, lse) if return_lse else o
    kperm_f = kperm.reshape(b * hkv, s)
    qperm_f = None if qperm is None else qperm.reshape(b * hkv, s)
    qf = perm_lib.permute_heads(q, qperm) if qperm is not None else perm_lib.fold_heads(q, hkv)
    if online_permutation:  # queries move per kv head: fold K/V (no gather) and permute in-kernel
        kf, vf = perm_lib.fold_heads(k, hkv), perm_lib.fold_heads(v, hkv)
        extra = dict(kv_permutation=kperm_f[:, None, :], q_positions=qperm_f)
    else:
        kf, vf = perm_lib.permute_heads(k, kperm), perm_lib.permute_heads(v, kperm)
        extra = dict(kv_positions=kperm_f if causal else None, q_positions=qperm_f if causal else None)
    of, lse = block_sparse_attention(qf, kf, vf, tables, **extra, **kw)  # [N, S, G, Dv], [N, G, S]
    if estimate_dropped:
        of, lse = dropped_lib.add_dropped_estimate(qf, kf, vf, of, lse, tables,
                                                   kv_permutation=extra.get("kv_permutation"), scale=scale,
                                                   softcap=softcap, backend=backend, interpret=interpret)
    lse = jnp.swapaxes(lse, 1, 2)[..., None]  # [N, S, G, 1]: rows like the output's
    if qperm_f is not None:
        of = perm_lib.unpermute_rows(of, qperm_f)
        lse = perm_lib.unpermute_rows(lse, qperm_f) if return_lse else lse
    o = perm_lib.unfold_heads(of, b)
    if not return_lse:
        return o
    return o, jnp.swapaxes(perm_lib.unfold_heads(lse, b)[..., 0], 1, 2)


def permuted_block_sparse_attention(q, k, v, *, block_size: int = 128, segment_size: int = 256, threshold=0.9,
                                    causal: bool = True, permute_queries: bool = False,
                                    online_permutation: bool = False, return_aux: bool = False,
                                    gqa: str = "union", max_kv_blocks: int | None = None,
                                    importance_rows: int | None = None, force_first: bool = True,
                                    permute_keys: bool = True, scale: float | None = None,
                                    softcap: float | None = None, return_lse: bool = False,
                                    estimate_dropped: bool = False, backend: str | None = None, interpret=False):
    """Permuted block-sparse attention for self-attention prefill.

    Args:
      q: [B, S, Hq, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] (one float dtype; GQA with
        Hq a multiple of Hkv: permutations are per kv head, K/V are never repeated).
      block_size: square block of the tables (kernel granularity).
      segment_size: keys move only inside segments of this many positions (a multiple of
        ``block_size``); any S works, the tail segment is shorter.
      threshold: fraction of each query block's pooled-score mass (over the candidate
        blocks) to keep; float or per query head [Hq] ([Hkv] with gqa="mean"). >= 1 keeps
        every candidate: exact dense (causal) attention.
      causal: causal self-attention (keys never leave their segment, the diagonal segment
        is masked on original positions). False: bidirectional.
      permute_queries: also sort queries within segments (by affinity to the important
        keys); the output is un-permuted exactly.
      online_permutation: pass the key permutation to the kernel (``kv_permutation=``)
        instead of gathering K/V (triton and xla backends).
      return_aux: also return a :class:`PBSAux` (density, permutations, tables, importance).
      gqa: how a group's query heads share tables: "union" (default; one table per kv
        head, the union of its heads' selections), "mean" or "per_head".
      max_kv_blocks: static cap on selected (non-diagonal-segment) blocks per row.
      importance_rows: queries used for the importance (default ``block_size``: the last block).
      force_first: keep the first ``block_size`` keys (the attention sink) in place and
        always compute their block.
      permute_keys: False keeps keys in place (the same selection without permutation).
      scale: logit scale (default 1/sqrt(D)); softcap: as in block_sparse_attention.
      return_lse: also return the float32 [B, Hq, S] log-sum-exp over the computed pairs
        (exp(lse_sparse - lse_dense) is the softmax mass each row kept).
      estimate_dropped: put every skipped block back as one pseudo-key (its mean key with
        logit + log(rows), its mean value; :mod:`sparse_jax.ops.dropped_blocks`): keeps the
        mass of attention spread thinly over many dropped blocks, at ~1/block_size of dense
        attention's work. Exact when logits are constant inside each block; the permutation
        makes dropped blocks homogeneous, which is where it helps (notes: pbs_attention.md).
      backend / interpret: as in :func:`sparse_jax.block_sparse_attention`.

    Returns:
      o [B, S, Hq, Dv] in q's dtype, then lse if asked, then the aux record if asked.
      Gradients flow to q, k, v through the gathers and the kernel (and the estimate); the
      selection itself is treated as a constant.
    """
    block_size, segment_size = _check(q, k, v, block_size, segment_size, threshold)
    if gqa not in thr.GQA_MODES:
        raise ValueError(f"gqa must be one of {thr.GQA_MODES}; got {gqa!r}")
    plan = pbs_plan(q, k, block_size=block_size, segment_size=segment_size, threshold=threshold, causal=causal,
                    permute_keys=permute_keys, permute_queries=permute_queries, gqa=gqa,
                    max_kv_blocks=max_kv_blocks, importance_rows=importance_rows, force_first=force_first,
                    scale=scale)
    out = pbs_attend(q, k, v, plan, causal=causal, online_permutation=online_permutation, scale=scale,
                     softcap=softcap, return_lse=return_lse, estimate_dropped=estimate_dropped, backend=backend,
                     interpret=interpret)
    out = out if isinstance(out, tuple) else (out,)
    if return_aux:
        out = out + (plan,)
    return out if len(out) > 1 else out[0]
