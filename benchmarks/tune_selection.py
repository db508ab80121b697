#!/usr/bin/env python3
"""Runtime block selection and PBS on one GPU: compiled correctness, the score kernel's launch
configs, and end-to-end prefill stage timings against dense cuDNN. One self-contained run.

    PYTHONPATH=. python benchmarks/tune_selection.py [--budget-s 280]
    PYTHONPATH=. python benchmarks/tune_selection.py --smoke      # CPU: tiny shapes, interpret mode

Phases, in this order (``--phases``; each skipped once the budget is spent; the JSON is
rewritten after each):
  correctness: compiled antidiagonal score kernel vs its jnp reference (bf16 / f32, strides
     1 / 4 / 8 / 16, causal / not, chunked prefill, odd lengths, GQA); PBS forward (physical
     and online permutation) and gradients vs the xla backend;
  prefill: 32K / 64K / 128K (``--sizes``; B=1, Hq=32, Hkv=8, D=128, bf16, structured
     synthetic q/k, tau=0.9): dense cuDNN, our dense causal kernel, PBS (physical gather,
     online permutation) and XAttention end to end, and each stage alone
     (importance+permutation, selection, kernel);
  sweep: score-kernel launch configs at S=32K, Hq=32, Hkv=8, D=128, stride 8 (TFLOP/s of
     the causal antidiagonal GEMM);
  quality: 32K (Hq=16, Hkv=8): recall / output error / density per method.

Writes ``$OUT/tune_selection.json`` (OUT defaults to /tmp) and prints a compact table last.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import selection as bench_sel  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.triton import block_scores as K  # noqa: E402
from sparse_jax.selection import scores as scores_lib  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
START = time.monotonic()
ARGS = None
REPORT: dict = {"meta": {}, "correctness": [], "score_sweep": [], "prefill": [], "quality": [], "best": {},
                "errors": []}


def left() -> float:
    return ARGS.budget_s - (time.monotonic() - START)


def log(msg):
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tune_selection.json"), "w") as f:
        json.dump(REPORT, f, indent=1, default=str)


def guard(section, need_s=5.0):
    def deco(fn):
        def run(*a, **kw):
            if left() < need_s:
                log(f"skip {section}: budget spent")
                REPORT["errors"].append({"section": section, "error": "skipped: budget"})
                return None
            t0 = time.monotonic()
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001
                log(f"{section} FAILED: {type(e).__name__}: {str(e)[:300]}")
                REPORT["errors"].append({"section": section, "error": f"{type(e).__name__}: {e}"[:2000],
                                         "traceback": traceback.format_exc()[-3000:]})
            finally:
                log(f"{section}: {time.monotonic() - t0:.1f}s")
                save()
        return run
    return deco


def rel(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    d = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (d if d > 0 else 1.0))


def rand(seed, shape, dtype):
    return timing.random_normal(seed, shape, dtype)


def bench(fn, args, reps=None):
    reps = reps or (2 if ARGS.smoke else 5)
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


# -- phase 1 ---------------------------------------------------------------------------------------
@guard("correctness")
def correctness():
    interp = ARGS.smoke
    s_odd = 200 if ARGS.smoke else 1000
    cases = [  # (Sq, Skv, Hq, Hkv, D, dtype, block, stride, causal)
        (s_odd, s_odd, 4, 2, 64, jnp.bfloat16, 64 if ARGS.smoke else 128, 8, True),
        (s_odd, s_odd, 4, 2, 128, jnp.float32, 64 if ARGS.smoke else 128, 16, True),
        (s_odd // 2, s_odd, 2, 1, 64, jnp.bfloat16, 64, 4, True),
        (256, 256, 2, 2, 32, jnp.float32, 32, 1, False),
    ]
    for sq, skv, hq, hkv, d, dt, blk, st, causal in cases:
        q, k = rand(1, (1, sq, hq, d), dt), rand(2, (1, skv, hkv, d), dt)
        want = scores_lib.antidiagonal_block_scores_xla(q, k, block_size=blk, stride=st, causal=causal)
        got = jax.jit(lambda q, k: scores_lib.antidiagonal_block_scores(
            q, k, block_size=blk, stride=st, causal=causal, backend="triton", interpret=interp))(q, k)
        err = rel(got, want)
        REPORT["correctness"].append(dict(what="antidiagonal scores", sq=sq, skv=skv, hq=hq, hkv=hkv, d=d,
                                          dtype=jnp.dtype(dt).name, block=blk, stride=st, causal=causal,
                                          rel_err=err, ok=err < 2e-2))
        log(f"scores Sq={sq} Skv={skv} {jnp.dtype(dt).name} stride={st} causal={causal}: rel err {err:.2e}")
    s = 256 if ARGS.smoke else 2048
    q, k, v = bench_sel.synthetic_case(3, s, 4, 2, 64, jnp.bfloat16)
    kw = dict(block_size=64, segment_size=128, threshold=0.9)
    want = sj.permuted_block_sparse_attention(q, k, v, backend="xla", **kw)
    for online in (False, True):
        got = jax.jit(lambda q, k, v: sj.permuted_block_sparse_attention(
            q, k, v, backend="triton", interpret=interp, online_permutation=online, **kw))(q, k, v)
        err = rel(got, want)
        REPORT["correctness"].append(dict(what="pbs forward", online=online, S=s, rel_err=err, ok=err < 2e-2))
        log(f"pbs forward online={online}: rel err {err:.2e}")
    w = rand(9, q.shape, jnp.float32)

    def grads(backend):
        loss = lambda q, k, v: jnp.sum(sj.permuted_block_sparse_attention(  # noqa: E731
            q, k, v, backend=backend, interpret=interp and backend == "triton", **kw).astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, a, r in zip("qkv", grads("triton"), grads("xla")):
        err = rel(a, r)
        REPORT["correctness"].append(dict(what=f"pbs d{name}", S=s, rel_err=err, ok=err < 3e-2))
        log(f"pbs d{name}: rel err {err:.2e}")


# -- phase 2 ---------------------------------------------------------------------------------------
@guard("score sweep", need_s=30)
def score_sweep():
    s, hq, hkv, d, blk, st = (1024, 4, 2, 64, 128, 8) if ARGS.smoke else (32768, 32, 8, 128, 128, 8)
    q, k = rand(4, (1, s, hq, d), jnp.bfloat16), rand(5, (1, s, hkv, d), jnp.bfloat16)
    flop = 2 * (s / st) ** 2 / 2 * st * d * hq  # causal antidiagonal GEMM
    grid = [(64, 64, 4, 2)] if ARGS.smoke else [
        (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2),
        (64, 32, 4, 3), (128, 32, 4, 3)]
    best = None
    for bm, bn, nw, ns in grid:
        if left() < 40:
            break
        cfg = K.ScoreConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        fn = jax.jit(lambda q, k: K.partials(q, k, block_size=blk, stride=st, scale=1 / math.sqrt(d), causal=True,
                                             interpret=ARGS.smoke, config=cfg)[:2])
        try:
            t = bench(fn, (q, k))
        except Exception as e:  # noqa: BLE001
            REPORT["score_sweep"].append(dict(block_m=bm, block_n=bn, warps=nw, stages=ns, error=str(e)[:300]))
            continue
        row = dict(block_m=bm, block_n=bn, warps=nw, stages=ns, ms=t * 1e3, tflops=flop / t / 1e12)
        REPORT["score_sweep"].append(row)
        log(f"score kernel bm={bm} bn={bn} w={nw} st={ns}: {t * 1e3:.2f} ms, {flop / t / 1e12:.0f} TFLOP/s")
        if best is None or t < best["ms"] / 1e3:
            best = row
    full = jax.jit(lambda q, k: scores_lib.antidiagonal_block_scores(q, k, block_size=blk, stride=st,
                                                                       backend="triton", interpret=ARGS.smoke))
    t_full = bench(full, (q, k))
    REPORT["best"]["score_kernel"] = best
    REPORT["best"]["score_with_epilogue_ms"] = t_full * 1e3
    log(f"scores incl. epilogue (default config): {t_full * 1e3:.2f} ms")


# -- phase 3 ---------------------------------------------------------------------------------------
@guard("prefill", need_s=40)
def prefill():
    sizes = (512, 1024) if ARGS.smoke else tuple(ARGS.sizes)
    hq, hkv, d, blk, seg = (4, 2, 64, 64, 128) if ARGS.smoke else (32, 8, 128, 128, 256)
    for s in sizes:
        if left() < (20 if ARGS.smoke else 60 + s / 2048):
            log(f"skip prefill S={s}: budget")
            REPORT["errors"].append({"section": f"prefill S={s}", "error": "skipped: budget"})
            break
        rows = bench_sel.speed_case(s, hq=hq, hkv=hkv, d=d, block=blk, segment=seg, backend="triton",
                                    interpret=ARGS.smoke, quick=ARGS.smoke, log=log,
                                    xattention=(s <= 65536) or left() > 150)
        REPORT["prefill"] += [r.to_json() for r in rows]
        save()


# -- phase 4 ---------------------------------------------------------------------------------------
@guard("quality", need_s=45)
def quality():
    s, hq, hkv, d, blk, seg = (512, 8, 8, 32, 64, 128) if ARGS.smoke else (32768, 16, 8, 128, 128, 256)
    q, k, v = bench_sel.synthetic_case(0, s, hq, hkv, d, jnp.bfloat16)
    rows = bench_sel.evaluate_qk(q, k, v, name=f"synthetic S={s}", block_size=blk, segment_size=seg,
                                 backend="triton", interpret=ARGS.smoke, quick=True)
    REPORT["quality"] = rows
    try:
        bench_sel.plot_quality(rows, OUT)
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")


def table():
    print("\n== correctness ==")
    for r in REPORT["correctness"]:
        print(f"  {'ok ' if r.get('ok') else 'BAD'} {r['what']:<22} rel_err={r['rel_err']:.2e} "
              + " ".join(f"{k}={r[k]}" for k in ("sq", "skv", "dtype", "stride", "causal", "online", "S") if k in r))
    if REPORT["best"].get("score_kernel"):
        b = REPORT["best"]["score_kernel"]
        print(f"\n== score kernel best: ScoreConfig(block_m={b['block_m']}, block_n={b['block_n']}, "
              f"num_warps={b['warps']}, num_stages={b['stages']})  {b['ms']:.2f} ms  {b['tflops']:.0f} TFLOP/s; "
              f"with epilogue (default cfg) {REPORT['best'].get('score_with_epilogue_ms', float('nan')):.2f} ms")
    print("\n== prefill (ms; speed-up vs cuDNN dense causal; stage shares) ==")
    for r in REPORT["prefill"]:
        e = r.get("extra") or {}
        ms = "error" if r["time_ms"] is None else f"{r['time_ms']:.2f}"
        sp = e.get("speedup_vs_cudnn")
        line = f"  S={r['shape']['S']:>6} {r['impl']:<26} {ms:>9} ms" + (f"  x{sp:.2f}" if sp else "       ")
        line += "  " + " ".join(f"{k}={v:.0%}" for k, v in (e.get("share") or {}).items())
        if "density" in e:
            line += f"  density={e['density']:.3f}"
        print(line)
    if REPORT["quality"]:
        print(f"\n== quality ({REPORT['quality'][0]['case']}): method param density recall_mean recall_p10 out_err ==")
        for r in REPORT["quality"]:
            print(f"  {r['method']:<15} {r['param']:<6g} {r['density']:.3f} {r['recall_mean']:.4f} "
                  f"{r['recall_p10']:.4f} {r['out_err']:.3e}")
    if REPORT["errors"]:
        print("\n== errors ==")
        for e in REPORT["errors"]:
            print(f"  {e['section']}: {e['error'][:200]}")


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=280.0)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode")
    p.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 131072], help="prefill lengths")
    p.add_argument("--phases", default="correctness,prefill,sweep,quality")
    ARGS = p.parse_args()
    REPORT["meta"] = dict(timing.environment(), budget_s=ARGS.budget_s, smoke=ARGS.smoke)
    log(f"devices: {jax.devices()}")
    phases = ARGS.phases.split(",")
    for name, fn in (("correctness", correctness), ("prefill", prefill), ("sweep", score_sweep),
                     ("quality", quality)):
        if name in phases:
            fn()
    save()
    table()


if __name__ == "__main__":
    main()
