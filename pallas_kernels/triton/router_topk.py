"""Top-k expert choice for a few tokens in one launch, lowered through Pallas-Triton.

The jnp routing (:func:`sparse_jax.moe.routing.select_experts`) is four to five XLA kernels
(softmax, a sort for ``top_k``, the gather of the chosen scores, the normalising sum) of
1-3 us each; at decode they cost as much as a tenth of a small model's weight stream. A
program here takes one token's logits row and does all of it: scores, k passes of
max-then-lowest-index (the ties rule of ``lax.top_k``), the chosen scores, normalisation.

Selection matches ``select_experts``: on scores + bias (bias: selection only), lowest index
first among equal values, distinct experts. Without a bias a softmax router selects on the
logits themselves (the same order; exact, whatever the exp rounding).

``choose`` (one row's top-k) is shared with the fused decode kernel's routing prologue
(:mod:`pallas_kernels.triton.moe_decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import gmm_plan
from sparse_jax import _compat

TINY = float(jnp.finfo(jnp.float32).tiny)


def choose(logits, bias, *, E: int, top_k: int, scoring: str):
    """One token's top-k inside a kernel: k passes of max-then-lowest-index over a row.

    logits float32 [Ep] (Ep >= E a power of two; entries from E on are ignored), bias
    float32 [Ep] or None. Returns ([id_j], [score_j]) for j < k: int32 and float32 scalars,
    the j-th choice and its (unnormalised) score. Scores: softmax over the first E entries or
    sigmoid; selection on scores + bias, or without a bias on what orders them the same (the
    logits for softmax: exact whatever the exp rounding), so a choice's score is scalar math
    on the pass's maximum and only a biased selection needs a reduction for it.
    """
    Ep = logits.shape[0]
    cols = lax.broadcasted_iota(jnp.int32, (Ep,), 0)
    ok = cols < E
    x = jnp.where(ok, logits, -jnp.inf)
    if scoring == "softmax":
        m = jnp.max(x)
        p = jnp.where(ok, jnp.exp(x - m), 0.0)
        z = jnp.sum(p)
        scores = p / z
    else:
        scores = jnp.where(ok, 1.0 / (1.0 + jnp.exp(-x)), 0.0)
    if bias is not None:
        sel = scores + bias
    else:
        sel = x if scoring == "softmax" else scores
    free = ok  # not chosen yet (a flag, not a -inf score: -inf logits stay choosable, distinctly)
    ids, picked = [], []
    for _ in range(top_k):
        best = jnp.max(jnp.where(free, sel, -jnp.inf))
        # Lowest free index of the maximum; a NaN row picks E - 1 (in range, never garbage).
        idx = jnp.minimum(jnp.min(jnp.where(free & (sel == best), cols, Ep)), E - 1)
        chosen = cols == idx
        if bias is not None:
            score = jnp.sum(jnp.where(chosen, scores, 0.0))
        elif scoring == "softmax":
            score = jnp.exp(best - m) / z
        else:
            score = best
        ids.append(idx)
        picked.append(score)
        free = free & jnp.logical_not(chosen)
    return ids, picked


def normalised(scores, normalize_topk: bool):
    """The combine weights from ``choose``'s scores: over their sum when ``normalize_topk``."""
    if not normalize_topk:
        return list(scores)
    total = jnp.maximum(sum(scores[1:], scores[0]), TINY)
    return [s / total for s in scores]


def topk_route(logits, bias, *, top_k: int, scoring: str, normalize_topk: bool, rows: int | None = None,
               interpret: bool = False):
    """logits float32 [R, E]; bias float32 [E] or None -> (weights float32 [T, k], ids int32 [T, k])
    for the first T = ``rows`` (default R) rows."""
    E = logits.shape[1]
    T = logits.shape[0] if rows is None else rows
    Ep, kp = gmm_plan.next_pow2(max(E, 2)), gmm_plan.next_pow2(max(top_k, 2))

    def kernel(*refs):
        logit_ref, bias_ref, w_ref, id_ref = refs if bias is not None else (refs[0], None, *refs[1:])
        t = pl.program_id(0)
        # Traced zero starts: Pallas rejects a static slice past an edge (E, k need not be powers
        # of two); every access past one is masked.
        row, first = pl.ds(t * 0, Ep), pl.ds(t * 0, kp)
        ok = lax.broadcasted_iota(jnp.int32, (Ep,), 0) < E
        x = plgpu.load(logit_ref.at[t, row], mask=ok, other=0.0)
        b = None if bias_ref is None else plgpu.load(bias_ref.at[row], mask=ok, other=0.0)
        ids, scores = choose(x, b, E=E, top_k=top_k, scoring=scoring)
        slots = lax.broadcasted_iota(jnp.int32, (kp,), 0)
        id_vec, w_vec = jnp.zeros((kp,), jnp.int32), jnp.zeros((kp,), jnp.float32)
        for j, (i, w) in enumerate(zip(ids, normalised(scores, normalize_topk))):
            id_vec, w_vec = jnp.where(slots == j, i, id_vec), jnp.where(slots == j, w, w_vec)
        keep = slots < top_k
        plgpu.store(w_ref.at[t, first], w_vec, mask=keep)
        plgpu.store(id_ref.at[t, first], id_vec, mask=keep)

    args = (logits,) if bias is None else (logits, bias)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((T, top_k), jnp.float32), jax.ShapeDtypeStruct((T, top_k), jnp.int32)],
        grid=(T,),
        compiler_params=_compat.triton_compiler_params(num_warps=1 if Ep <= 256 else 4, num_stages=1),
        interpret=interpret,
        name=f"router_topk_{top_k}of{E}",
    )(*args)
