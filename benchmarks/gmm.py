"""Suite "gmm": the grouped-matmul kernel beside ragged_dot, ragged_dot_mgpu and torch._grouped_mm,
ordered and sized for the all-suites run (``python -m benchmarks.run``).

The cases and rows are ``benchmarks.moe_gmm``'s (its ``_case``: same names, plots and
``extra``); this module only picks which ones and in what order, most important first,
so a short budget still reports the headline numbers:

1. forward, uniform group sizes: Mixtral-8x7B, DeepSeek-V3, Qwen2-57B-A14B expert shapes
   at M = 512, 4096, 32768 rows (Mixtral M=4096 also fwd+bwd, the one gradient case);
2. forward, Zipf(1.2) group sizes at M = 4096 (load imbalance, empty groups);
3. the fused SwiGLU (two weights, one kernel) vs two gmm calls at Mixtral M = 4096.

A case is skipped (recorded with the reason) when the suite's time left is below its
estimate. ``python -m benchmarks.run --suite moe_gmm`` is the full sweep (all M x
distributions x SwiGLU x fwd+bwd).
"""

from __future__ import annotations

import gc

from benchmarks import gmm_cases as C
from benchmarks import moe_gmm
from benchmarks.timing import Result

SUITE = "gmm"
# Rough H100 seconds of one case (ours + three peers incl. compiles; 7.5 GB DeepSeek weights).
_EST_S = {512: 5.0, 4096: 6.0, 32768: 10.0}
_BWD_EST_S = 10.0


def plan(quick: bool) -> list[dict]:
    """The ordered case list: dicts of model, M, dist, backward, swiglu."""
    models = list(moe_gmm.QUICK_MODELS if quick else C.MODELS)
    rows = moe_gmm.QUICK_ROWS if quick else C.ROWS
    mid = rows[len(rows) // 2] if not quick else rows[-1]
    first = models[0]
    out = [dict(model=m, M=M, dist="uniform", backward=(m == first and M == mid), swiglu=False)
           for m in models for M in rows]
    out += [dict(model=m, M=mid, dist="zipf1.2", backward=False, swiglu=False) for m in models]
    out.append(dict(model=first, M=mid, dist="uniform", backward=False, swiglu=True, swiglu_only=True))
    return out


def _skip(ctx, case, reason):
    E, K, N = (moe_gmm.QUICK_MODELS if ctx.quick else C.MODELS)[case["model"]]
    from benchmarks.peers import gmm_case_name
    name = gmm_case_name(case["M"], K, N, E) + f" {case['dist']}" + (" swiglu" if case.get("swiglu") else "")
    return ctx.record(Result(SUITE, name, f"sparse_jax/{ctx.backend}", dict(M=case["M"], K=K, N=N, G=E,
                                                                         dist=case["dist"]),
                             None, error=f"skipped: {reason}", extra=dict(model=case["model"], summary=False)))


def run(ctx) -> list[Result]:
    models = moe_gmm.QUICK_MODELS if ctx.quick else C.MODELS
    peers = not ctx.quick and ctx.platform == "gpu"
    out: list[Result] = []
    current = None
    for case in ctx.progress(plan(ctx.quick), desc="gmm"):
        est = _EST_S.get(case["M"], 3.0) + (_BWD_EST_S if case["backward"] else 0.0)
        left = ctx.time_left()
        if left is not None and left < est:
            out.append(_skip(ctx, case, f"{left:.0f} s left in the suite's budget, case needs ~{est:.0f} s"))
            continue
        if current != case["model"]:
            gc.collect()  # drop the previous model's weights before making the next ones
            current = case["model"]
        E, K, N = models[case["model"]]
        if case.get("swiglu_only"):
            out += _swiglu_only(ctx, case["model"], E, K, N, case["M"])
            continue
        out += moe_gmm._case(ctx, case["model"], E, K, N, case["M"], case["dist"], swiglu=case["swiglu"],
                             backward=case["backward"], peers=peers)
    return out


def _swiglu_only(ctx, model, E, K, N, M):
    """moe_gmm's SwiGLU rows without re-timing the plain forward (already in step 1)."""
    n0 = len(ctx.results)
    rows = moe_gmm._case(ctx, model, E, K, N, M, "uniform", swiglu=True, backward=False, peers=False)
    # _case times the plain gmm first; keep only the SwiGLU rows (the plain one was recorded in step 1).
    plain = [r for r in ctx.results[n0:] if not r.name.endswith("swiglu")]
    ctx.results[:] = [r for r in ctx.results if not any(r is p for p in plain)]
    return [r for r in rows if r.name.endswith("swiglu")]
