"""Top-k expert choice for a few tokens in one launch, lowered through Pallas-Triton.

The jnp routing (:func:`sparse_jax.moe.routing.select_experts`) is four to five XLA kernels
(softmax, a sort for ``top_k``, the gather of the chosen scores, the normalising sum) of
1-3 us each; at decode they cost as much as a tenth of a small model's weight stream. A
program here takes one token's logits row and does all of it: scores, k passes of
max-then-lowest-index (the ties rule of ``lax.top_k``), the chosen scores, normalisation.

Selection matches ``select_experts``: on scores + bias (bias: selection only), lowest index
first among equal values, distinct experts. Without a bias a softmax router selects on the
logits themselves (the same order; exact, whatever the exp rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import gmm_plan
from sparse_jax import _compat


def topk_route(logits, bias, *, top_k: int, scoring: str, normalize_topk: bool, rows: int | None = None,
               interpret: bool = False):
    """logits float32 [R, E]; bias float32 [E] or None -> (weights float32 [T, k], ids int32 [T, k])
    for the first T = ``rows`` (default R) rows."""
    E = logits.shape[1]
    T = logits.shape[0] if rows is None else rows
    Ep, kp = gmm_plan.next_pow2(max(E, 2)), gmm_plan.next_pow2(max(top_k, 2))
    tiny = float(jnp.finfo(jnp.float32).tiny)

    def kernel(*refs):
        logit_ref, bias_ref, w_ref, id_ref = refs if bias is not None else (refs[0], None, *refs[1:])
        t = pl.program_id(0)
        # Traced zero starts: Pallas rejects a static slice past an edge (E, k need not be powers
        # of two); every access past one is masked.
        row, first = pl.ds(t * 0, Ep), pl.ds(t * 0, kp)
        cols = lax.broadcasted_iota(jnp.int32, (Ep,), 0)
        ok = cols < E
        x = plgpu.load(logit_ref.at[t, row], mask=ok, other=-jnp.inf)
        if scoring == "softmax":
            p = jnp.where(ok, jnp.exp(x - jnp.max(x)), 0.0)
            scores = p / jnp.sum(p)
        else:
            scores = jnp.where(ok, 1.0 / (1.0 + jnp.exp(-x)), 0.0)
        if bias_ref is not None:
            sel = scores + plgpu.load(bias_ref.at[row], mask=ok, other=0.0)
        else:
            sel = x if scoring == "softmax" else scores
        sel = jnp.where(ok, sel, -jnp.inf)
        slots = lax.broadcasted_iota(jnp.int32, (kp,), 0)
        ids = jnp.zeros((kp,), jnp.int32)
        ws = jnp.zeros((kp,), jnp.float32)
        for j in range(top_k):
            best = jnp.max(sel)
            # Lowest index of the maximum; a NaN row picks E - 1 (a valid id, never out of range).
            idx = jnp.minimum(jnp.min(jnp.where(sel == best, cols, Ep)), E - 1)
            chosen = cols == idx
            ids = jnp.where(slots == j, idx, ids)
            ws = jnp.where(slots == j, jnp.sum(jnp.where(chosen, scores, 0.0)), ws)
            sel = jnp.where(chosen, -jnp.inf, sel)
        if normalize_topk:
            ws = ws / jnp.maximum(jnp.sum(ws), tiny)
        keep = slots < top_k
        plgpu.store(w_ref.at[t, first], ws, mask=keep)
        plgpu.store(id_ref.at[t, first], ids, mask=keep)

    args = (logits,) if bias is None else (logits, bias)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((T, top_k), jnp.float32), jax.ShapeDtypeStruct((T, top_k), jnp.int32)],
        grid=(T,),
        compiler_params=_compat.triton_compiler_params(num_warps=1 if Ep <= 256 else 4, num_stages=1),
        interpret=interpret,
        name=f"router_topk_{top_k}of{E}",
    )(*args)
