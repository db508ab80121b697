"""Selection suite: how much attention runtime block selection keeps, and what prefill costs.

Quality (every platform; ``--quick`` = CPU sizes): on structured synthetic q/k
(:func:`sparse_jax.selection.synthetic.structured_qk` with its ``LLM_MIX``: sink, local,
topic, scatter, vertical, slash and needle heads) and on any q/k you hand :func:`evaluate_qk` (e.g. captured from a trained
model; or set ``SPARSE_JAX_SELECTION_QK=/path/a.npz`` holding ``q``, ``k`` [, ``v``]), for
XAttention, pooled top-k, vertical-slash and PBS with and without key permutation, at
several budgets:

* recall: the softmax mass each query row keeps, ``exp(lse_sparse - lse_dense)`` (the
  log-sum-exps of the sparse and the dense causal attention), mean / 10th percentile /
  minimum over rows and heads;
* output error: ``||o_sparse - o_dense|| / ||o_dense||``;
* density: computed block pairs over causal block pairs (1 = dense causal work).

Plots ``selection_recall.png`` and ``selection_error.png`` (against density) go to the
output directory.

Speed (GPU): prefill attention at 32K / 64K (128K: ``tune_selection.py``) (B=1, Hq=32, Hkv=8, D=128, bf16,
structured inputs) end to end — estimate + permute + select + kernel — against dense
cuDNN, with each stage timed alone (``extra["stage_ms"]``, ``extra["share"]``), PBS with
the physical gather and with the online (in-kernel) permutation, and XAttention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax as sj
from benchmarks import flops as W
from benchmarks import timing
from benchmarks.timing import Result
from sparse_jax import masks
from sparse_jax import selection as sel
from sparse_jax.ops import permuted_attention as pa
from sparse_jax.selection import scores as scores_lib
from sparse_jax.selection import synthetic

SUITE = "selection"
QK_ENV = "SPARSE_JAX_SELECTION_QK"


# -- methods -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """One selector at one budget. ``run(q, k, v) -> (o, lse [B, Hq, S], tables)``; ``folded``:
    the tables are PBS's head-folded ones ([B*Hkv, ...] serving G query heads each)."""

    family: str
    param: float
    run: Callable
    folded: bool = False

    @property
    def label(self) -> str:
        return f"{self.family} {self.param:g}"


def _attend(tables, backend, interpret):
    def f(q, k, v):
        return sj.block_sparse_attention(q, k, v, tables, return_lse=True, backend=backend, interpret=interpret)
    return f


def default_methods(block_size: int, segment_size: int, backend: str, interpret, seq_len: int,
                    quick: bool = False, taus: tuple | None = None) -> list[Method]:
    """The grid of selectors and budgets compared (GQA tables shared per kv head everywhere)."""
    nb = -(-seq_len // block_size)
    out: list[Method] = []

    def xattn(tau):
        def run(q, k, v):
            bm = sel.xattention(q, k, block_size=block_size, stride=min(8, block_size), threshold=tau, gqa="union",
                                backend=backend, interpret=interpret)
            return (*_attend(bm, backend, interpret)(q, k, v), bm)
        return Method("xattention", tau, run)

    def topk(frac):
        def run(q, k, v):
            n = max(3, int(round(frac * nb)))
            bm = sel.topk_blocks(q, k, block_size=block_size, num_blocks=n, gqa="union")
            return (*_attend(bm, backend, interpret)(q, k, v), bm)
        return Method("topk", frac, run)

    def vslash(frac):
        def run(q, k, v):
            s = q.shape[1]
            bm = sel.vertical_slash(q, k, vertical_size=max(1, int(frac * s / 8)), slash_size=max(1, int(frac * s / 4)),
                                    last_q=min(64, s), block_size=block_size, gqa="union")
            return (*_attend(bm, backend, interpret)(q, k, v), bm)
        return Method("vertical_slash", frac, run)

    def pbs(tau, permute):
        def run(q, k, v):
            plan = pa.pbs_plan(q, k, block_size=block_size, segment_size=segment_size, threshold=tau,
                               permute_keys=permute)
            o, lse = pa.pbs_attend(q, k, v, plan, return_lse=True, backend=backend, interpret=interpret)
            return o, lse, plan.block_mask
        return Method("pbs" if permute else "pbs_no_perm", tau, run, folded=True)

    def pbs_estimate(tau):
        # Output with the dropped-block estimate; recall (from lse) of the computed pairs only,
        # since the merged lse counts the pseudo-keys' mass too.
        def run(q, k, v):
            plan = pa.pbs_plan(q, k, block_size=block_size, segment_size=segment_size, threshold=tau)
            _, lse = pa.pbs_attend(q, k, v, plan, return_lse=True, backend=backend, interpret=interpret)
            o = pa.pbs_attend(q, k, v, plan, estimate_dropped=True, backend=backend, interpret=interpret)
            return o, lse, plan.block_mask
        return Method("pbs_estimate", tau, run, folded=True)

    if taus is None:
        taus = (0.8, 0.9, 0.95) if quick else (0.7, 0.8, 0.9, 0.95, 0.98)
    out += [xattn(t) for t in taus]
    out += [pbs(t, True) for t in taus] + [pbs(t, False) for t in taus] + [pbs_estimate(t) for t in taus]
    out += [topk(f) for f in ((0.1, 0.25) if quick else (0.03, 0.06, 0.12, 0.25))]
    out += [vslash(f) for f in ((0.05, 0.15) if quick else (0.02, 0.05, 0.1, 0.2))]
    return out


# -- quality -------------------------------------------------------------------------------------
def _causal_pairs_fraction(bm, b, h) -> float:
    """Computed pairs over the pairs of the dense causal kernel at the same block size."""
    dense = W.dense_block_mask(bm.q_len, bm.kv_len, True, bm.block_size[0])
    return W.attention_pairs(bm, b, h) / W.attention_pairs(dense, b, h)


def evaluate_qk(q, k, v=None, *, name: str = "qk", block_size: int = 128, segment_size: int = 256,
                methods: list[Method] | None = None, backend: str | None = None, interpret=False,
                quick: bool = False) -> list[dict]:
    """Recall / output error / density of every method on one (q, k[, v]) (causal self-attention).

    q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] (random if None). The hook for
    trained-model q/k: call it per layer with the projected, RoPE'd q and k. Returns one
    dict per method.
    """
    b, s, hq, d = q.shape
    if v is None:
        v = timing.random_normal(99, k.shape, q.dtype)
    methods = methods or default_methods(block_size, segment_size, backend, interpret, s, quick)
    dense_tables = sj.create_block_mask(masks.causal, None, None, s, s, block_size)
    o_d, lse_d = jax.jit(_attend(dense_tables, backend, interpret))(q, k, v)
    o_d = np.asarray(o_d, np.float64)
    rows = []
    hkv = k.shape[2]
    for m in methods:
        o, lse, tables = jax.jit(m.run)(q, k, v)
        tb, th = (b * hkv, hq // hkv) if m.folded else (b, hq)
        keep = np.exp(np.minimum(np.asarray(lse, np.float64) - np.asarray(lse_d, np.float64), 0.0))
        err = float(np.linalg.norm(np.asarray(o, np.float64) - o_d) / np.linalg.norm(o_d))
        rows.append(dict(case=name, method=m.family, param=m.param, S=s, block_size=block_size,
                         density=_causal_pairs_fraction(tables, tb, th), recall_mean=float(keep.mean()),
                         recall_p10=float(np.percentile(keep, 10)), recall_min=float(keep.min()), out_err=err))
    return rows


def plot_quality(rows: list[dict], out_dir: str) -> list[str]:
    """recall_mean / out_err against density, one line per method, one panel per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    cases = sorted({r["case"] for r in rows})
    for metric, fname, ylabel in (("recall_mean", "selection_recall.png", "mean softmax mass kept"),
                                  ("out_err", "selection_error.png", "relative output error")):
        fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
        for ax, case in zip(axes[0], cases):
            for fam in sorted({r["method"] for r in rows if r["case"] == case}):
                pts = sorted((r["density"], r[metric]) for r in rows if r["case"] == case and r["method"] == fam)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam,
                        linestyle="-" if fam.startswith("pbs") else "--")
            ax.set_xlabel("density (computed / causal pairs)")
            ax.set_ylabel(ylabel)
            ax.set_title(case, fontsize=9)
            if metric == "out_err":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def synthetic_case(seed: int, s: int, hq: int, hkv: int, d: int, dtype):
    """q, k from :data:`synthetic.LLM_MIX` (kv head h gets mix[h % 8]) and a random v."""
    q, k = synthetic.structured_qk(seed, 1, s, hq, hkv, d, patterns=synthetic.LLM_MIX, dtype=dtype)
    return q, k, timing.random_normal(seed + 7, k.shape, dtype)


def quality_results(rows: list[dict]) -> list[Result]:
    return [Result(SUITE, f"quality {r['case']}", f"sparse_jax/{r['method']}", dict(S=r["S"], param=r["param"]),
                   None, extra={**r, "summary": False}) for r in rows]


# -- speed (GPU) ---------------------------------------------------------------------------------
def _time(fn, args, quick):
    t = timing.time_fn(fn, lambda i: args, warmup=1 if quick else 2, iters=2 if quick else 5, rotations=1)
    return t.median_s * 1e3


def speed_case(s: int, *, hq=32, hkv=8, d=128, block=128, segment=256, tau=0.9, dtype=jnp.bfloat16,
               backend="triton", interpret=False, quick=False, log=print, xattention: bool = True,
               on_result: Callable | None = None) -> list[Result]:
    """End-to-end prefill attention at one length: PBS (physical / online), XAttention, dense cuDNN.

    ``on_result(Result)`` is called as each row is made (a suite's ``ctx.record``, so rows
    survive a time-out later in the case)."""
    name = f"prefill S={s} Hq={hq} Hkv={hkv} D={d}"
    shape = dict(B=1, S=s, Hq=hq, Hkv=hkv, D=d, dtype=jnp.dtype(dtype).name, block=block, segment=segment, tau=tau)
    q, k, v = synthetic_case(0, s, hq, hkv, d, dtype)
    dense_flops = W.attention_flops(W.dense_block_mask(s, s, True, block), 1, hq, d)
    out: list[Result] = []
    kw = dict(backend=backend, interpret=interpret)

    def keep(r):
        out.append(r)
        if on_result is not None:
            on_result(r)

    def record(impl, ms, flops=None, **extra):
        keep(Result(SUITE, name, impl, shape, ms, flops=flops, extra=extra))
        log(f"{name} {impl}: {ms:.2f} ms {extra.get('note', '')}")

    cudnn_ms = None
    if jax.default_backend() == "gpu":
        try:
            f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
            cudnn_ms = _time(f, (q, k, v), quick)
            record("cudnn", cudnn_ms, dense_flops, note="dense causal")
        except Exception as e:  # noqa: BLE001
            keep(Result(SUITE, name, "cudnn", shape, None, error=f"{type(e).__name__}: {e}"[:300]))

    dense_bm = W.dense_block_mask(s, s, True, block)
    ours_dense = _time(jax.jit(lambda q, k, v: sj.block_sparse_attention(q, k, v, dense_bm, **kw)), (q, k, v), quick)
    record("sparse_jax/dense_causal", ours_dense, dense_flops, note="our kernel, all causal blocks")

    pkw = dict(block_size=block, segment_size=segment, threshold=tau)
    plan_fn = jax.jit(lambda q, k: pa.pbs_plan(q, k, **pkw))
    perm_fn = jax.jit(lambda q, k: sj.permutation.segment_permutation(
        scores_lib.last_block_importance(q, k, rows=block), segment))
    plan = plan_fn(q, k)
    density = _causal_pairs_fraction(plan.block_mask, hkv, hq // hkv)
    flops = W.attention_flops(plan.block_mask, hkv, hq // hkv, d)
    t_perm = _time(perm_fn, (q, k), quick)
    t_plan = _time(plan_fn, (q, k), quick)
    for online in (False, True):
        att_fn = jax.jit(lambda q, k, v, p: pa.pbs_attend(q, k, v, p, online_permutation=online, **kw))
        tot_fn = jax.jit(lambda q, k, v: sj.permuted_block_sparse_attention(q, k, v, online_permutation=online,
                                                                              **pkw, **kw))
        t_att = _time(att_fn, (q, k, v, plan), quick)
        t_tot = _time(tot_fn, (q, k, v), quick)
        stages = dict(importance_permutation=t_perm, selection=t_plan - t_perm, attention=t_att)
        record("sparse_jax/pbs_online" if online else "sparse_jax/pbs", t_tot, flops, density=density,
               stage_ms=stages, share={k_: v_ / t_tot for k_, v_ in stages.items()},
               speedup_vs_cudnn=None if cudnn_ms is None else cudnn_ms / t_tot,
               note=f"density {density:.3f}, plan {t_plan / t_tot:.0%} of total")

    if xattention:
        xkw = dict(block_size=block, stride=8, threshold=tau, gqa="union", **kw)
        sc_fn = jax.jit(lambda q, k: scores_lib.antidiagonal_block_scores(q, k, block_size=block, stride=8, **kw))
        sel_fn = jax.jit(lambda q, k: sel.xattention(q, k, **xkw))
        bm = sel_fn(q, k)
        att_fn = jax.jit(lambda q, k, v, bm: sj.block_sparse_attention(q, k, v, bm, **kw))
        tot_fn = jax.jit(lambda q, k, v: sj.block_sparse_attention(q, k, v, sel.xattention(q, k, **xkw), **kw))
        t_sc, t_sel = _time(sc_fn, (q, k), quick), _time(sel_fn, (q, k), quick)
        t_att, t_tot = _time(att_fn, (q, k, v, bm), quick), _time(tot_fn, (q, k, v), quick)
        xd = _causal_pairs_fraction(bm, 1, hq)
        stages = dict(scores=t_sc, selection=t_sel - t_sc, attention=t_att)
        record("sparse_jax/xattention", t_tot, W.attention_flops(bm, 1, hq, d), density=xd, stage_ms=stages,
               share={k_: v_ / t_tot for k_, v_ in stages.items()},
               speedup_vs_cudnn=None if cudnn_ms is None else cudnn_ms / t_tot,
               note=f"density {xd:.3f}, scores {t_sc / t_tot:.0%} of total")
    return out


# -- suite entry ----------------------------------------------------------------------------------
def _quality_sizes(ctx):
    if ctx.quick or ctx.platform == "cpu":
        return dict(sizes=(2048,), hq=8, hkv=8, d=64, block=64, segment=128, dtype=jnp.float32)
    return dict(sizes=(8192,), hq=16, hkv=8, d=128, block=128, segment=256, dtype=jnp.bfloat16)


# The quality grid of the all-suites GPU run (each method is a compile + a dense comparison,
# ~3 s on an H100): two budgets per family around the operating point.
SUITE_QUALITY = {"xattention 0.9", "xattention 0.95", "pbs 0.9", "pbs 0.95", "pbs_no_perm 0.9", "pbs_estimate 0.9",
                 "topk 0.12", "vertical_slash 0.1"}
SPEED_SIZES = (32768, 65536)  # 128K: benchmarks/tune_selection.py (a case costs ~2 min of compiles there)
_SPEED_EST_S = {32768: 35.0, 65536: 60.0}
_QUALITY_EST_S = 30.0


def _quality(ctx, cfg, backend, interpret) -> list[Result]:
    rows = []
    for s in cfg["sizes"]:
        q, k, v = synthetic_case(0, s, cfg["hq"], cfg["hkv"], cfg["d"], cfg["dtype"])
        methods = None
        if not ctx.quick and ctx.platform != "cpu":
            methods = [m for m in default_methods(cfg["block"], cfg["segment"], backend, interpret, s)
                       if m.label in SUITE_QUALITY]
        rows += evaluate_qk(q, k, v, name=f"synthetic S={s}", block_size=cfg["block"], segment_size=cfg["segment"],
                            backend=backend, interpret=interpret, quick=ctx.quick, methods=methods)
    path = os.environ.get(QK_ENV)
    if path:
        data = np.load(path)
        q, k = jnp.asarray(data["q"]), jnp.asarray(data["k"])
        v = jnp.asarray(data["v"]) if "v" in data else None
        rows += evaluate_qk(q, k, v, name=os.path.basename(path), block_size=cfg["block"],
                            segment_size=cfg["segment"], backend=backend, interpret=interpret, quick=ctx.quick)
    results = [ctx.record(r) for r in quality_results(rows)]
    os.makedirs(ctx.out, exist_ok=True)
    with open(os.path.join(ctx.out, "selection_quality.json"), "w") as f:
        json.dump(rows, f, indent=1)
    try:
        plot_quality(rows, ctx.out)
    except Exception as e:  # noqa: BLE001 - plots are a convenience
        ctx.log(f"plots failed: {e}")
    return results


def run(ctx) -> list[Result]:
    """GPU: prefill speed at 32K first (PBS / XAttention vs cuDNN), then the quality grid at 8K,
    then speed at 64K, each only if the suite's time left covers its estimate. CPU: quality."""
    results: list[Result] = []
    cfg = _quality_sizes(ctx)
    interpret = ctx.backend != "xla" and ctx.platform == "cpu"
    backend = "xla" if ctx.platform == "cpu" else ctx.backend

    def enough(what, need):
        left = ctx.time_left()
        if left is not None and left < need:
            ctx.log(f"skipping {what}: {left:.0f} s left, needs ~{need:.0f} s")
            results.append(ctx.record(Result(SUITE, what, f"sparse_jax/{ctx.backend}", {}, None,
                                             extra=dict(summary=False),
                                             error=f"skipped: {left:.0f} s left in the suite, needs ~{need:.0f} s")))
            return False
        return True

    speed = ctx.platform == "gpu" and not ctx.quick

    def speed_at(s):
        if enough(f"prefill S={s}", _SPEED_EST_S[s]):
            results.extend(speed_case(s, backend=ctx.backend, log=ctx.log, xattention=True, on_result=ctx.record))

    if speed:
        speed_at(SPEED_SIZES[0])
    if not speed or enough("quality", _QUALITY_EST_S):
        results += _quality(ctx, cfg, backend, interpret)
    if speed:
        for s in SPEED_SIZES[1:]:
            speed_at(s)
    return results
