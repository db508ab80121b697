#!/usr/bin/env python3
"""PBS prefill on one GPU, v2: compiled correctness, end-to-end prefill with every planning
stage timed, density/recall of segment sizes x thresholds, the score kernel's launch configs.
One self-contained run (<= ``--budget-s``, default 250 s; about 270 s wall with start-up).

    PYTHONPATH=. python benchmarks/tune_selection.py
    PYTHONPATH=. python benchmarks/tune_selection.py --smoke      # CPU: tiny shapes, interpret mode

Phases, in order (``--phases``; each skipped once the budget is spent; the JSON is rewritten
after each):
  correctness: the compiled antidiagonal score kernel vs its jnp reference (bf16/f32,
     strides 16/8/4/1, causal/not, chunked prefill, odd lengths, GQA); PBS forward (physical
     and online permutation) and gradients vs the xla backend.
  prefill: S = 32K/64K/128K (B=1, Hq=32, Hkv=8, D=128, bf16, synthetic LLM-mix q/k, tau=0.9,
     block 128): cuDNN dense causal; our dense causal kernel; PBS (segment 256; also 1024 at
     the largest size: ``--segments``) with each planning stage jitted alone (importance, permutation, pooled
     logits, softmax+threshold+GQA union, tables), the whole plan, the kernel stage with the
     physical gather and with the online permutation, and the end-to-end physical path;
     XAttention (scores + selection + kernel) up to 64K. Model: plan + density x dense kernel.
     ``--prefill-taus 0.9 0.7``: the first tau gets every stage, the others only the end-to-end
     total (tau is traced, so they reuse its compile; their density is in the quality table).
     ``--estimate``: PBS with the dropped-block estimate end to end at every tau, and the
     estimate kernel alone on the first tau's plan.
  quality: density and recall (mean softmax mass kept per row, exact: the softmax of every
     sampled query block against all keys) for segment sizes x taus, with and without key
     permutation, at 32K (all query blocks) and 128K (48 sampled query blocks); the plan time
     of each segment size at 128K; the modelled 128K end-to-end time for each point.
  sweep: score-kernel launch configs at S=32K (TFLOP/s of the causal antidiagonal GEMM).
  estimate_quality (not in the default phases): whole-sequence output error and recall of PBS
     with and without ``estimate_dropped`` at ``--estimate-sizes`` x ``--estimate-taus``.

Writes ``$OUT/tune_selection.json`` (OUT defaults to /tmp) and prints compact tables last.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import flops as W  # noqa: E402
from benchmarks import pbs_density_study as study  # noqa: E402
from benchmarks import selection as bench_sel  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun  # noqa: E402
from pallas_kernels.triton import block_scores as K  # noqa: E402
from sparse_jax import permutation as perm_lib  # noqa: E402
from sparse_jax import selection as sel  # noqa: E402
from sparse_jax.ops import dropped_blocks as dropped_lib  # noqa: E402
from sparse_jax.ops import permuted_attention as pa  # noqa: E402
from sparse_jax.selection import scores as scores_lib  # noqa: E402

ARGS = None
REPORT: dict = {"meta": {}, "correctness": [], "prefill": [], "quality": [], "plan_ms_by_segment": {}, "model": [],
                "score_sweep": [], "best": {}, "errors": []}
RUN = TuneRun("tune_selection", REPORT)
OUT = RUN.out


left, log, save = RUN.left, RUN.log, RUN.save


def guard(section, need_s=5.0):
    """Run a phase if ``need_s`` of budget is left; record its exception instead of dying."""
    return RUN.guard(section, need_s)


def rel(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    d = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (d if d > 0 else 1.0))


def ms(fn, args, iters=None):
    """Median ms of fn(*args) (compiled and warmed first)."""
    iters = iters or (2 if ARGS.smoke else 5)
    return timing.time_fn(fn, lambda i: args, warmup=1, iters=iters, rotations=1).median_s * 1e3


def shape_cfg():
    if ARGS.smoke:
        return dict(hq=4, hkv=2, d=64, block=64)
    return dict(hq=32, hkv=8, d=128, block=128)


# -- correctness -----------------------------------------------------------------------------------
@guard("correctness")
def correctness():
    interp = ARGS.smoke
    s_odd = 200 if ARGS.smoke else 1000
    cases = [  # (Sq, Skv, Hq, Hkv, D, dtype, block, stride, causal)
        (s_odd, s_odd, 4, 2, 128, jnp.bfloat16, 128, 8, True),
        (s_odd, s_odd, 4, 2, 64, jnp.float32, 128, 16, True),
        (s_odd // 2, s_odd, 2, 1, 64, jnp.bfloat16, 64, 4, True),
        (256, 256, 2, 2, 32, jnp.float32, 32, 1, False),
    ]
    for sq, skv, hq, hkv, d, dt, blk, st, causal in cases:
        q, k = timing.random_normal(1, (1, sq, hq, d), dt), timing.random_normal(2, (1, skv, hkv, d), dt)
        want = scores_lib.antidiagonal_block_scores_xla(q, k, block_size=blk, stride=st, causal=causal)
        got = jax.jit(lambda q, k: scores_lib.antidiagonal_block_scores(
            q, k, block_size=blk, stride=st, causal=causal, backend="triton", interpret=interp))(q, k)
        err = rel(got, want)
        REPORT["correctness"].append(dict(what="antidiagonal scores", sq=sq, skv=skv, d=d, dtype=jnp.dtype(dt).name,
                                          block=blk, stride=st, causal=causal, rel_err=err, ok=err < 2e-2))
        log(f"scores Sq={sq} Skv={skv} D={d} {jnp.dtype(dt).name} stride={st} causal={causal}: rel err {err:.2e}")
    s = 256 if ARGS.smoke else 2048
    q, k, v = bench_sel.synthetic_case(3, s, 8, 2, 64, jnp.bfloat16)
    kw = dict(block_size=64, segment_size=128, threshold=0.9)
    want = sj.permuted_block_sparse_attention(q, k, v, backend="xla", **kw)
    for online in (False, True):
        got = jax.jit(lambda q, k, v: sj.permuted_block_sparse_attention(
            q, k, v, backend="triton", interpret=interp, online_permutation=online, **kw))(q, k, v)
        err = rel(got, want)
        REPORT["correctness"].append(dict(what="pbs forward", online=online, S=s, rel_err=err, ok=err < 2e-2))
        log(f"pbs forward online={online}: rel err {err:.2e}")
    w = timing.random_normal(9, q.shape, jnp.float32)

    def grads(backend):
        loss = lambda q, k, v: jnp.sum(sj.permuted_block_sparse_attention(  # noqa: E731
            q, k, v, backend=backend, interpret=interp and backend == "triton", **kw).astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, a, r in zip("qkv", grads("triton"), grads("xla")):
        err = rel(a, r)
        REPORT["correctness"].append(dict(what=f"pbs d{name}", S=s, rel_err=err, ok=err < 3e-2))
        log(f"pbs d{name}: rel err {err:.2e}")


# -- prefill ---------------------------------------------------------------------------------------
def plan_stages(q, k, *, block, seg, tau):
    """Each planning stage jitted alone on its real inputs: {stage: ms}, and the plan."""
    s, d = q.shape[1], q.shape[3]
    scale = 1 / math.sqrt(d)
    f_imp = jax.jit(lambda q, k: scores_lib.last_block_importance(q, k, rows=block))
    f_perm = jax.jit(lambda imp: perm_lib.segment_permutation(imp, seg))
    f_logits = jax.jit(lambda q, k, p: pa.pooled_layout_logits(q, k, p, None, block_size=block, scale=scale))
    f_select = jax.jit(lambda lg, p: pa.pbs_select(lg, pa.first_key_block(p, block), s=s, block_size=block,
                                                   segment_size=seg, threshold=tau, causal=True))
    f_tables = jax.jit(lambda x: pa.pbs_tables(x, s=s, block_size=block, segment_size=seg, causal=True))
    f_plan = jax.jit(lambda q, k: pa.pbs_plan(q, k, block_size=block, segment_size=seg, threshold=tau))
    imp = f_imp(q, k)
    kperm = f_perm(imp)
    logits = f_logits(q, k, kperm)
    chosen = f_select(logits, kperm)
    out = dict(importance=ms(f_imp, (q, k)), permutation=ms(f_perm, (imp,)), pooled_logits=ms(f_logits, (q, k, kperm)),
               select=ms(f_select, (logits, kperm)), tables=ms(f_tables, (chosen,)))
    out["sum_of_stages"] = sum(out.values())
    out["plan"] = ms(f_plan, (q, k))
    return out, f_plan(q, k)


def prefill_one(s):
    c = shape_cfg()
    hq, hkv, d, blk = c["hq"], c["hkv"], c["d"], c["block"]
    tau = ARGS.prefill_taus[0]
    q, k, v = bench_sel.synthetic_case(0, s, hq, hkv, d, jnp.bfloat16)
    kw = dict(backend="triton", interpret=ARGS.smoke)
    big = s >= 65536
    it = 3 if big else None
    row = dict(S=s, Hq=hq, Hkv=hkv, D=d, block=blk, tau=tau)
    REPORT["prefill"].append(row)
    if jax.default_backend() == "gpu":
        f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        row["cudnn_ms"] = ms(f, (q, k, v), it)
        log(f"S={s} cuDNN dense causal: {row['cudnn_ms']:.2f} ms")
    dense_bm = W.dense_block_mask(s, s, True, blk)
    row["dense_ms"] = ms(jax.jit(lambda q, k, v: sj.block_sparse_attention(q, k, v, dense_bm, **kw)), (q, k, v), it)
    log(f"S={s} our dense causal kernel: {row['dense_ms']:.2f} ms")
    save()
    row["pbs"] = {}
    segs = [128] if ARGS.smoke else ARGS.segments if s == max(ARGS.sizes) else ARGS.segments[:1]
    for i, seg in enumerate(segs):
        if i and left() < 60 + s / 4096:
            log(f"skip S={s} segment {seg}: budget")
            break
        r = row["pbs"][seg] = {}
        stages, plan = plan_stages(q, k, block=blk, seg=seg, tau=tau)
        r["stages_ms"] = stages
        r["density"] = bench_sel._causal_pairs_fraction(plan.block_mask, hkv, hq // hkv)
        for online in (False, True):
            att = jax.jit(lambda q, k, v, p, o=online: pa.pbs_attend(q, k, v, p, online_permutation=o, **kw))
            r["attend_online_ms" if online else "attend_ms"] = ms(att, (q, k, v, plan), it)
        # tau traced: the extra taus (--prefill-taus) reuse this compile and cost only run time
        tot = jax.jit(lambda q, k, v, t, seg=seg: sj.permuted_block_sparse_attention(
            q, k, v, block_size=blk, segment_size=seg, threshold=t, **kw))
        r["total_ms"] = ms(tot, (q, k, v, jnp.float32(tau)), it)
        r["total_ms_by_tau"] = {str(t): ms(tot, (q, k, v, jnp.float32(t)), it) for t in ARGS.prefill_taus[1:]}
        if ARGS.estimate:  # PBS + the dropped-block estimate, end to end, and the estimate alone
            tot_e = jax.jit(lambda q, k, v, t, seg=seg: sj.permuted_block_sparse_attention(
                q, k, v, block_size=blk, segment_size=seg, threshold=t, estimate_dropped=True, **kw))
            r["total_estimate_ms_by_tau"] = {str(t): ms(tot_e, (q, k, v, jnp.float32(t)), it)
                                             for t in ARGS.prefill_taus}
            qf = perm_lib.fold_heads(q, hkv)
            kf, vf = perm_lib.permute_heads(k, plan.kv_permutation), perm_lib.permute_heads(v, plan.kv_permutation)
            dropped = dropped_lib.dropped_block_table(plan.block_mask)
            f_est = jax.jit(lambda q, k, v, dr: dropped_lib.dropped_block_attention(q, k, v, dr, block_size=blk, **kw))
            r["estimate_kernel_ms"] = ms(f_est, (qf, kf, vf, dropped), it)
            r["estimate_dropped_share"] = float(jnp.mean(dropped))
            log(f"S={s} seg={seg} estimate kernel {r['estimate_kernel_ms']:.2f} ms; PBS + estimate by tau: "
                + ", ".join(f"{t_}: {v_:.2f}" for t_, v_ in r["total_estimate_ms_by_tau"].items()))
        r["total_online_model_ms"] = stages["plan"] + r["attend_online_ms"]
        r["plan_share"] = stages["plan"] / r["total_ms"]
        r["model_ms"] = stages["plan"] + r["density"] * row["dense_ms"]
        if "cudnn_ms" in row:
            r["speedup_vs_cudnn"] = row["cudnn_ms"] / r["total_ms"]
            r["model_ms_at_cudnn_parity"] = stages["plan"] + r["density"] * row["cudnn_ms"]
        REPORT["plan_ms_by_segment"].setdefault(str(s), {})[str(seg)] = stages["plan"]
        log(f"S={s} PBS seg={seg}: total {r['total_ms']:.2f} ms (plan {stages['plan']:.2f} = "
            f"{r['plan_share']:.0%}; kernel stage {r['attend_ms']:.2f}, online {r['attend_online_ms']:.2f}) "
            f"density {r['density']:.3f}; stages " + " ".join(f"{k_}={v_:.2f}" for k_, v_ in stages.items())
            + "".join(f"; total at tau {t_}: {v_:.2f}" for t_, v_ in r["total_ms_by_tau"].items()))
        save()
    if s <= 65536 and left() > 50:
        xkw = dict(block_size=blk, stride=8, threshold=tau, gqa="union", **kw)
        f_sc = jax.jit(lambda q, k: scores_lib.antidiagonal_block_scores(q, k, block_size=blk, stride=8, **kw))
        f_sel = jax.jit(lambda q, k: sel.xattention(q, k, **xkw))
        f_tot = jax.jit(lambda q, k, v: sj.block_sparse_attention(q, k, v, sel.xattention(q, k, **xkw), **kw))
        bm = f_sel(q, k)
        row["xattention"] = dict(scores_ms=ms(f_sc, (q, k), it), selection_ms=ms(f_sel, (q, k), it),
                                 total_ms=ms(f_tot, (q, k, v), it), density=bench_sel._causal_pairs_fraction(bm, 1, hq))
        log(f"S={s} XAttention: {row['xattention']}")


@guard("estimate_quality", need_s=30)
def estimate_quality():
    """Output error and recall of PBS with and without the dropped-block estimate (synthetic LLM
    mix, segment 1024, whole-sequence comparison against dense causal attention)."""
    c = shape_cfg()
    sizes = (1024,) if ARGS.smoke else tuple(ARGS.estimate_sizes)
    seg = 128 if ARGS.smoke else 1024
    taus = tuple(ARGS.estimate_taus)
    for s in sizes:
        if left() < 20 + s / 2048:
            log(f"skip estimate quality S={s}: budget")
            break
        q, k, v = bench_sel.synthetic_case(0, s, c["hq"], c["hkv"], c["d"], jnp.bfloat16)
        methods = [m for m in bench_sel.default_methods(c["block"], seg, "triton", ARGS.smoke, s, taus=taus)
                   if m.family in ("pbs", "pbs_estimate")]
        rows = bench_sel.evaluate_qk(q, k, v, name=f"synthetic S={s}", block_size=c["block"], segment_size=seg,
                                     methods=methods, backend="triton", interpret=ARGS.smoke)
        REPORT.setdefault("estimate_quality", []).extend(rows)
        for r in rows:
            log(f"S={s} {r['method']} tau {r['param']}: density {r['density']:.3f} out_err {r['out_err']:.4f} "
                f"recall {r['recall_mean']:.3f}")
        save()


@guard("prefill", need_s=40)
def prefill():
    sizes = (512, 1024) if ARGS.smoke else tuple(ARGS.sizes)
    for s in sizes:
        need = 20 if ARGS.smoke else 30 + s / 2048
        if left() < need:
            log(f"skip prefill S={s}: budget")
            REPORT["errors"].append({"section": f"prefill S={s}", "error": "skipped: budget"})
            break
        try:
            prefill_one(s)
        except Exception as e:  # noqa: BLE001 - record and go on to the next size
            log(f"prefill S={s} FAILED: {type(e).__name__}: {str(e)[:300]}")
            REPORT["errors"].append({"section": f"prefill S={s}", "error": f"{type(e).__name__}: {e}"[:2000],
                                     "traceback": traceback.format_exc()[-3000:]})
        save()


# -- quality ---------------------------------------------------------------------------------------
def quality_one(s, n_blocks):
    c = shape_cfg()
    hq, hkv, d, blk = c["hq"], c["hkv"], c["d"], c["block"]
    g = hq // hkv
    q, k, v = bench_sel.synthetic_case(0, s, hq, hkv, d, jnp.bfloat16)
    nqb = -(-s // blk)
    qb = np.arange(nqb) if n_blocks is None or n_blocks >= nqb else np.unique(
        np.linspace(1, nqb - 1, n_blocks).round().astype(int))
    t0 = time.monotonic()
    mass = np.asarray(study.block_row_mass(q, k, blk, qb))  # to the host once, not once per point
    log(f"quality S={s}: exact block mass of {len(qb)} query blocks in {time.monotonic() - t0:.1f}s")
    segs = [64, 128] if ARGS.smoke else ARGS.quality_segments
    for seg in segs:
        for permute in ((True, False) if seg == segs[0] else (True,)):
            if left() < 25:
                log(f"skip quality S={s} seg={seg}: budget")
                return
            f_plan = jax.jit(lambda q, k, tau, seg=seg, permute=permute: pa.pbs_plan(
                q, k, block_size=blk, segment_size=seg, threshold=tau, permute_keys=permute))
            for tau in ARGS.taus:
                plan = f_plan(q, k, jnp.float32(tau))
                rec = study.plan_recall(mass, plan, blk, g, qb)
                r = dict(S=s, segment=seg, permute=permute, tau=tau, q_blocks=len(qb),
                         density=bench_sel._causal_pairs_fraction(plan.block_mask, hkv, g),
                         recall_mean=float(rec.mean()), recall_p10=float(np.percentile(rec, 10)),
                         recall_min=float(rec.min()),
                         recall_per_kv_head=[round(float(x), 4) for x in rec.reshape(hkv, g, -1).mean((1, 2))])
                REPORT["quality"].append(r)
                log(f"quality S={s} seg={seg} perm={permute} tau={tau}: density {r['density']:.3f} "
                    f"recall {r['recall_mean']:.4f} (p10 {r['recall_p10']:.3f})")
            if s == max(ARGS.quality_sizes) and permute and str(seg) not in REPORT["plan_ms_by_segment"].get(str(s), {}):
                t = ms(f_plan, (q, k, jnp.float32(0.9)), 3)
                REPORT["plan_ms_by_segment"].setdefault(str(s), {})[str(seg)] = t
                log(f"plan S={s} seg={seg}: {t:.2f} ms")
            save()
    if s == (1024 if ARGS.smoke else 32768):  # cross-check: recall through the kernel's lse
        kw = dict(backend="triton", interpret=ARGS.smoke)
        seg = segs[0]
        plan = jax.jit(lambda q, k: pa.pbs_plan(q, k, block_size=blk, segment_size=seg, threshold=0.9))(q, k)
        _, lse = jax.jit(lambda q, k, v, p: pa.pbs_attend(q, k, v, p, return_lse=True, **kw))(q, k, v, plan)
        dense_bm = W.dense_block_mask(s, s, True, blk)
        _, lse_d = jax.jit(lambda q, k, v: sj.block_sparse_attention(q, k, v, dense_bm, return_lse=True, **kw))(q, k, v)
        keep = np.exp(np.minimum(np.asarray(lse, np.float64) - np.asarray(lse_d, np.float64), 0.0))
        rec = study.plan_recall(mass, plan, blk, g, qb)
        REPORT["best"]["lse_crosscheck"] = dict(S=s, segment=seg, recall_lse=float(keep.mean()),
                                                recall_block_mass=float(rec.mean()))
        log(f"recall through the kernel's lse {keep.mean():.4f} vs block-mass recall {rec.mean():.4f}")


@guard("quality", need_s=30)
def quality():
    sizes = (1024,) if ARGS.smoke else tuple(ARGS.quality_sizes)
    for s in sizes:
        quality_one(s, None if s <= 32768 else 48)
    model()


def model():
    """Modelled end-to-end time at the largest size for every quality point: plan(segment) +
    density x dense kernel (ours, and cuDNN's as the parity target)."""
    s = max(r["S"] for r in REPORT["quality"]) if REPORT["quality"] else None
    pre = {r["S"]: r for r in REPORT["prefill"]}
    if s is None or s not in pre:
        return
    plan_ms = REPORT["plan_ms_by_segment"].get(str(s), {})
    base = pre[s]
    for r in REPORT["quality"]:
        if r["S"] != s or not r["permute"] or str(r["segment"]) not in plan_ms:
            continue
        p = plan_ms[str(r["segment"])]
        m = dict(S=s, segment=r["segment"], tau=r["tau"], density=r["density"], recall=r["recall_mean"], plan_ms=p,
                 model_ms=p + r["density"] * base["dense_ms"])
        if "cudnn_ms" in base:
            m["speedup_model"] = base["cudnn_ms"] / m["model_ms"]
            m["model_ms_at_cudnn_parity"] = p + r["density"] * base["cudnn_ms"]
            m["speedup_at_parity"] = base["cudnn_ms"] / m["model_ms_at_cudnn_parity"]
        REPORT["model"].append(m)


# -- score kernel sweep ----------------------------------------------------------------------------
@guard("score sweep", need_s=25)
def score_sweep():
    s, hq, hkv, d, blk, st = (1024, 4, 2, 64, 128, 8) if ARGS.smoke else (32768, 32, 8, 128, 128, 8)
    q, k = timing.random_normal(4, (1, s, hq, d), jnp.bfloat16), timing.random_normal(5, (1, s, hkv, d), jnp.bfloat16)
    flop = 2 * (s / st) ** 2 / 2 * st * d * hq  # causal antidiagonal GEMM
    configs = K.sweep_configs(d, 2, blk // st)
    default = K.default_config(d, 2, blk // st)
    configs = [default] + [c for c in configs if c != default]
    if ARGS.smoke:
        configs = configs[:2]
    best = None
    for cfg in configs:
        if left() < 12:
            break
        fn = jax.jit(lambda q, k, cfg=cfg: K.partials(q, k, block_size=blk, stride=st, scale=1 / math.sqrt(d),
                                                      causal=True, interpret=ARGS.smoke, config=cfg)[:2])
        row = dict(block_m=cfg.block_m, block_n=cfg.block_n, warps=cfg.num_warps, stages=cfg.num_stages, flat=cfg.flat,
                   default=cfg == default, smem_model=K.smem_bytes(cfg, d, 2))
        try:
            t = ms(fn, (q, k))
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e)[:300]
            REPORT["score_sweep"].append(row)
            log(f"score kernel {cfg}: FAILED {str(e)[:200]}")
            continue
        row.update(ms=t, tflops=flop / t / 1e9)
        REPORT["score_sweep"].append(row)
        log(f"score kernel {cfg}: {t:.2f} ms, {row['tflops']:.0f} TFLOP/s")
        if best is None or t < best["ms"]:
            best = row
    REPORT["best"]["score_kernel"] = best
    full = jax.jit(lambda q, k: scores_lib.antidiagonal_block_scores(q, k, block_size=blk, stride=st, backend="triton",
                                                                       interpret=ARGS.smoke))
    REPORT["best"]["score_with_epilogue_ms"] = ms(full, (q, k))


# -- report ----------------------------------------------------------------------------------------
def table():
    print("\n== correctness ==")
    for r in REPORT["correctness"]:
        print(f"  {'ok ' if r.get('ok') else 'BAD'} {r['what']:<20} rel_err={r['rel_err']:.2e} "
              + " ".join(f"{k}={r[k]}" for k in ("sq", "skv", "d", "dtype", "stride", "causal", "online", "S") if k in r))
    print(f"\n== prefill (ms; B=1 Hq=32 Hkv=8 D=128 bf16 causal, tau={ARGS.prefill_taus[0]}) ==")
    for row in REPORT["prefill"]:
        print(f"  S={row['S']:>6}  cuDNN {row.get('cudnn_ms', float('nan')):8.2f}  our dense {row.get('dense_ms', float('nan')):8.2f}")
        for seg, r in row.get("pbs", {}).items():
            st = r.get("stages_ms", {})
            print(f"    PBS seg={seg:<5} total {r.get('total_ms', float('nan')):8.2f}  x{r.get('speedup_vs_cudnn', float('nan')):.2f} "
                  f"density {r.get('density', float('nan')):.3f}  plan {st.get('plan', float('nan')):.2f} "
                  f"({r.get('plan_share', float('nan')):.0%})  kernel stage {r.get('attend_ms', float('nan')):.2f} "
                  f"online {r.get('attend_online_ms', float('nan')):.2f}  model {r.get('model_ms', float('nan')):.2f}"
                  f" (at cuDNN parity {r.get('model_ms_at_cudnn_parity', float('nan')):.2f})")
            print("      stages: " + " ".join(f"{k}={v:.2f}" for k, v in st.items()))
            for t, v in r.get("total_ms_by_tau", {}).items():
                x = row.get("cudnn_ms", float("nan")) / v
                print(f"      total at tau {t}: {v:.2f} ms  x{x:.2f} (density: quality table)")
        if "xattention" in row:
            x = row["xattention"]
            print(f"    XAttention total {x['total_ms']:.2f} (scores {x['scores_ms']:.2f}, selection "
                  f"{x['selection_ms']:.2f}) density {x['density']:.3f}")
    if REPORT["quality"]:
        print("\n== quality: S seg perm tau density recall_mean recall_p10 ==")
        for r in REPORT["quality"]:
            print(f"  {r['S']:>6} {r['segment']:>5} {str(r['permute']):<5} {r['tau']:.2f} {r['density']:.3f} "
                  f"{r['recall_mean']:.4f} {r['recall_p10']:.3f}")
    if REPORT["model"]:
        print("\n== model at the largest size: seg tau density recall plan_ms model_ms x_cudnn | at cuDNN parity ==")
        for m in REPORT["model"]:
            print(f"  {m['segment']:>5} {m['tau']:.2f} {m['density']:.3f} {m['recall']:.4f} {m['plan_ms']:.2f} "
                  f"{m['model_ms']:.2f} x{m.get('speedup_model', float('nan')):.2f} | "
                  f"{m.get('model_ms_at_cudnn_parity', float('nan')):.2f} x{m.get('speedup_at_parity', float('nan')):.2f}")
    if REPORT["score_sweep"]:
        print("\n== score kernel (S=32K, stride 8): bm bn warps stages flat ms TFLOP/s ==")
        for r in REPORT["score_sweep"]:
            print(f"  {r['block_m']:>4} {r['block_n']:>4} {r['warps']} {r['stages']} {str(r['flat']):<5} "
                  + (f"{r['ms']:.2f} {r['tflops']:.0f}" if "ms" in r else f"ERROR {r['error'][:120]}")
                  + ("  (default)" if r.get("default") else ""))
        print(f"  scores incl. epilogue (default): {REPORT['best'].get('score_with_epilogue_ms', float('nan')):.2f} ms")
    if "lse_crosscheck" in REPORT["best"]:
        print(f"\n== recall cross-check: {REPORT['best']['lse_crosscheck']}")
    if REPORT["errors"]:
        print("\n== errors ==")
        for e in REPORT["errors"]:
            print(f"  {e['section']}: {e['error'][:200]}")


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=250.0)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode")
    p.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 131072], help="prefill lengths")
    p.add_argument("--segments", type=int, nargs="+", default=[256, 1024],
                   help="PBS segment sizes timed end to end in prefill (the second and later only at the largest size)")
    p.add_argument("--quality-sizes", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--quality-segments", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--taus", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.95])
    p.add_argument("--prefill-taus", type=float, nargs="+", default=[0.9],
                   help="prefill thresholds: the first gets every stage timed, the others only the end-to-end total")
    p.add_argument("--estimate", action="store_true",
                   help="prefill: also time PBS with estimate_dropped=True at every --prefill-taus value")
    p.add_argument("--estimate-sizes", type=int, nargs="+", default=[32768, 65536],
                   help="estimate_quality phase: lengths (whole-sequence output error vs dense)")
    p.add_argument("--estimate-taus", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--phases", default="correctness,prefill,quality,sweep")
    ARGS = p.parse_args()
    RUN.budget_s = ARGS.budget_s
    if ARGS.smoke:
        ARGS.quality_sizes = [1024]
        ARGS.taus = [0.8, 0.9]
    REPORT["meta"] = dict(timing.environment(), budget_s=ARGS.budget_s, smoke=ARGS.smoke, args=vars(ARGS))
    log(f"devices: {jax.devices()}")
    phases = ARGS.phases.split(",")
    for name, fn in (("correctness", correctness), ("prefill", prefill), ("quality", quality), ("sweep", score_sweep),
                     ("estimate_quality", estimate_quality)):
        if name in phases:
            fn()
    save()
    table()


if __name__ == "__main__":
    main()
