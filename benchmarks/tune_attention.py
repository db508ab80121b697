#!/usr/bin/env python3
"""Block-sparse attention on one GPU (Pallas-Triton): compiled correctness, a launch-config
sweep, baselines in the same process, and PTX/SASS evidence. One self-contained run.

    PYTHONPATH=. python benchmarks/tune_attention.py [--budget-s 300]
    PYTHONPATH=. python benchmarks/tune_attention.py --smoke      # CPU: tiny shapes, interpret mode

Phases (each skipped once the budget is spent; results JSON rewritten after each):
  1. correctness, compiled: forward o / lse and dq, dk, dv vs the float32 reference for
     causal, document+window, decode GQA, odd head dim f32, kv_permutation, softcap, fused dQ;
  2. forward sweep, B=1 H=16 S=8192 D=128 bf16, dense-equivalent (all blocks full) and causal
     (block_q x block_kv x warps x stages, schedules), cuDNN and JAX Pallas ``mha`` beside it;
  3. backward sweep (dQ kernel, dK/dV kernel, fused-atomic dQ) at the same shape;
  4. PTX evidence of the best forward/backward: wgmma / ex2 / cp.async counts, registers and
     spills from ptxas -v, HGMMA count from the SASS (a subprocess with --xla_dump_to);
  5. sparsity scaling at S=32768 (densities 1, .5, .2, .1, .05; random blocks + diagonal);
  6. D=64 and D=256 sweeps; 7. GQA packing on/off (prefill G=8, decode Sq=1/16);
  8. torch FlexAttention on the same random 11%-dense 128-block mask (if torch is there).

Writes ``$OUT/tune_attention.json`` (OUT defaults to /tmp) and prints a compact table last,
with the best configs as Python literals for pallas_kernels/triton/attention_configs.py.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import flops as W  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.triton import attention_configs as cfgs  # noqa: E402
from pallas_kernels.triton import block_sparse_attention as K  # noqa: E402
from pallas_kernels.triton.attention_configs import BwdConfig, FwdConfig  # noqa: E402
from sparse_jax import masks  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
START = time.monotonic()
ARGS = None
REPORT: dict = {"meta": {}, "correctness": [], "fwd": [], "bwd": [], "baselines": [], "sparsity": [],
                "gqa": [], "flex": [], "evidence": {}, "best": {}, "errors": []}


# -- plumbing ------------------------------------------------------------------------------------
def left() -> float:
    return ARGS.budget_s - (time.monotonic() - START)


def log(msg):
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tune_attention.json"), "w") as f:
        json.dump(REPORT, f, indent=1, default=str)


def guard(section):
    """Run a phase; record its exception instead of dying."""
    def deco(fn):
        def run(*a, **kw):
            if left() < 5:
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


def bench(fn, arg_sets, *, reps=None, inner=None):
    """Median seconds per call; ``inner`` calls are queued between syncs to hide dispatch."""
    reps = reps or (3 if ARGS.smoke else 7)
    inner = inner or (1 if ARGS.smoke else 5)
    for a in arg_sets[:2]:
        jax.block_until_ready(fn(*a))
    ts = []
    for r in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(*arg_sets[(r * inner + i) % len(arg_sets)])
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner)
    return float(np.median(ts))


def compile_all(jobs):
    """jobs: list of (key, fn, example_args) -> {key: compiled or Exception}; lowering is
    sequential (tracing), XLA/Triton compilation runs in threads."""
    lowered = {}
    for key, fn, args in jobs:
        try:
            lowered[key] = jax.jit(fn).lower(*args)
        except Exception as e:  # noqa: BLE001
            lowered[key] = e
    out = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1 if ARGS.smoke else 8) as ex:
        futs = {k: ex.submit(lambda l: l.compile(), l) for k, l in lowered.items() if not isinstance(l, Exception)}
        for k, l in lowered.items():
            if isinstance(l, Exception):
                out[k] = l
        for k, f in futs.items():
            try:
                out[k] = f.result()
            except Exception as e:  # noqa: BLE001
                out[k] = e
    return out


def rand(seed, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def qkv_sets(B, Sq, Skv, Hq, Hkv, D, dtype, n=3, with_do=False):
    sets = []
    for i in range(n):
        s = [rand(10 * i + 1, (B, Sq, Hq, D), dtype), rand(10 * i + 2, (B, Skv, Hkv, D), dtype),
             rand(10 * i + 3, (B, Skv, Hkv, D), dtype)]
        if with_do:
            s.append(rand(10 * i + 4, (B, Sq, Hq, D), dtype))
        sets.append(tuple(s))
    return sets


def kernel_kw(D, **extra):
    return dict(scale=1.0 / math.sqrt(D), softcap=None, segments_everywhere=False, interpret=ARGS.smoke, **extra)


def tflops(flop, sec):
    return flop / sec / 1e12 if sec else None


def rel(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    d = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (d if d > 0 else 1.0))


# -- shapes --------------------------------------------------------------------------------------
def main_shape():
    if ARGS.smoke:
        return dict(B=1, S=256, H=2, D=64)
    return dict(B=1, S=8192, H=16, D=128)


def dense_mask(S, causal, block=128):
    m = masks.causal if causal else masks.full
    return sj.create_block_mask(m, None, None, S, S, block_size=block)


def random_mask(S, density, seed, block=128, width=None):
    nb = S // block
    rng = np.random.default_rng(seed)
    sel = rng.random((nb, nb)) < density
    sel[np.arange(nb), np.arange(nb)] = True
    return sj.BlockMask.from_block_bool(sel, S, S, block_size=block, max_kv_blocks=width, max_q_blocks=width,
                                        max_full_kv_blocks=width, max_full_q_blocks=width)


# -- phase 1: correctness ------------------------------------------------------------------------
def _grads(backend, q, k, v, do, bm, **kw):
    def fn(q, k, v):
        return sj.block_sparse_attention(q, k, v, bm, backend=backend, interpret=ARGS.smoke and backend == "triton",
                                         return_lse=True, **kw)

    @jax.jit
    def run(q, k, v, do):
        o, vjp, lse = jax.vjp(fn, q, k, v, has_aux=True)
        return o, lse, vjp(do)

    return run(q, k, v, do)


def correctness_cases():
    s = ARGS.smoke
    doc_S = 320 if s else 1000
    ids = np.sort(np.random.default_rng(0).integers(0, 5, doc_S)).astype(np.int32)
    cases = [
        ("causal bf16 D128 GQA2", 1, 256 if s else 1024, 256 if s else 1024, 4, 2, 128, jnp.bfloat16,
         lambda Sq, Skv: sj.create_block_mask(masks.causal, None, None, Sq, Skv, 128), {}, None),
        ("doc+window fp16 D64 ragged", 2, doc_S, doc_S, 2, 1, 64, jnp.float16,
         lambda Sq, Skv: sj.create_block_mask(masks.and_masks(masks.document(ids),
                                                              masks.sliding_window(200, causal=True)),
                                              None, None, Sq, Skv, (64, 128)), {}, None),
        ("decode Sq=8 GQA8 bf16", 2, 8, 1500 if s else 4000, 16, 2, 128, jnp.bfloat16,
         lambda Sq, Skv: sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv,
                                              (16, 128)), {}, None),
        ("window f32 D72 Dv72", 1, 300, 300, 2, 2, 72, jnp.float32,
         lambda Sq, Skv: sj.create_block_mask(masks.sliding_window(90), None, None, Sq, Skv, 64), {}, None),
        ("kv_permutation causal bf16", 2, 512, 512, 4, 2, 64, jnp.bfloat16,
         lambda Sq, Skv: sj.BlockMask.from_block_bool(np.tril(np.ones((4, 4), bool)), Sq, Skv, 128,
                                                      mask_fn=masks.causal),
         {"kv_permutation": np.stack([np.stack([np.random.default_rng(10 * b + h).permutation(512)
                                                for h in range(2)]) for b in range(2)]).astype(np.int32)}, None),
        ("softcap + segments bf16 D256", 1, 384, 384, 2, 1, 256, jnp.bfloat16,
         lambda Sq, Skv: sj.create_block_mask(masks.causal, None, None, Sq, Skv, 128),
         {"softcap": 20.0, "segment_ids": np.repeat(np.arange(3), 128).astype(np.int32)}, None),
        ("fused dQ + packed GQA4 bf16", 1, 512, 512, 8, 2, 128, jnp.bfloat16,
         lambda Sq, Skv: sj.create_block_mask(masks.causal, None, None, Sq, Skv, 128), {},
         (FwdConfig(128, 64, 8, 3, pack_gqa=True), BwdConfig(64, 64, 4, 2, 64, 128, 8, 2, pack_gqa=True,
                                                             fused_dq=True))),
    ]
    return cases


@guard("correctness")
def phase_correctness():
    for name, B, Sq, Skv, Hq, Hkv, D, dtype, mk, kw, override in correctness_cases():
        if left() < 60:
            break
        row = dict(case=name, shape=(B, Sq, Skv, Hq, Hkv, D), dtype=jnp.dtype(dtype).name)
        try:
            bm = mk(Sq, Skv)
            q, k, v, do = qkv_sets(B, Sq, Skv, Hq, Hkv, D, dtype, n=1, with_do=True)[0]
            fwd, bwd = override if override else (None, None)
            with cfgs.override(fwd=fwd, bwd=bwd):
                o, lse, g = _grads("triton", q, k, v, do, bm, **kw)
            ro, rlse, rg = _grads("xla", q, k, v, do, bm, **kw)
            tol = 2e-3 if dtype == jnp.float32 else 2e-2
            lse, rlse = np.asarray(lse), np.asarray(rlse)
            fin = np.isfinite(rlse)
            row.update(
                o=rel(o, ro), dq=rel(g[0], rg[0]), dk=rel(g[1], rg[1]), dv=rel(g[2], rg[2]),
                lse_max_abs=float(np.max(np.abs(lse[fin] - rlse[fin]), initial=0.0)),
                lse_inf_match=bool(np.array_equal(np.isneginf(lse), np.isneginf(rlse))),
                nan=bool(any(np.isnan(np.asarray(x, np.float32)).any() for x in (o, lse, *g))), tol=tol)
            row["ok"] = bool(row["o"] <= tol and max(row["dq"], row["dk"], row["dv"]) <= 2 * tol
                             and row["lse_inf_match"] and not row["nan"] and row["lse_max_abs"] < 50 * tol)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500], traceback=traceback.format_exc()[-2000:])
        REPORT["correctness"].append(row)
        log(f"correctness {name}: {'ok' if row.get('ok') else 'FAIL'} "
            + " ".join(f"{k}={row[k]:.1e}" for k in ("o", "dq", "dk", "dv") if k in row))
        save()


# -- phase 2/3: sweeps ---------------------------------------------------------------------------
# Local ptxas -v (sm_90a) of these, from benchmarks/attention_ptx_local.py: '*' marks configs that
# spilled there (kept to show what spilling costs; numbers in the notes).
FWD_128 = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
           (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (256, 64, 8, 2), (128, 32, 8, 3),
           (128, 64, 4, 3)]  # * last
FWD_64 = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (256, 64, 8, 3),
          (128, 128, 4, 3)]  # * last
FWD_256 = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)]  # * last 3
# (block_q_dq, block_kv_dq, warps_dq, stages_dq) and (block_q_dkv, block_kv_dkv, warps_dkv, stages_dkv)
DQ_128 = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3),
          (64, 32, 4, 3)]
DKDV_128 = [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 4, 2), (16, 128, 4, 3),
            (64, 128, 8, 2), (64, 64, 4, 2)]  # * last
DQ_64 = [(128, 64, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 3)]
DKDV_64 = [(64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 4, 3), (128, 128, 8, 2)]  # * last
DQ_256 = [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
DKDV_256 = [(64, 32, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]

SMOKE_FWD = [(64, 64, 4, 2), (32, 32, 4, 2)]
SMOKE_DQ = [(64, 64, 4, 2)]
SMOKE_DKDV = [(64, 64, 4, 2)]


def fwd_cfg(t, **kw):
    return FwdConfig(block_q=t[0], block_kv=t[1], num_warps=t[2], num_stages=t[3], **kw)


def bwd_cfg(dq, dkdv, **kw):
    return BwdConfig(*dq, *dkdv, **kw)


def sweep_fwd(tag, shape, causal, configs, block=128):
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    dtype = jnp.bfloat16
    bm = dense_mask(S, causal, block)
    flop = W.attention_flops(bm, B, H, D)
    sets = qkv_sets(B, S, S, H, H, D, dtype)
    jobs = []
    for cfg in configs:
        fn = (lambda cfg: lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, config=cfg,
                                                     **kernel_kw(D))[0])(cfg)
        jobs.append((cfg, fn, sets[0]))
    compiled = compile_all(jobs)
    rows = []
    for cfg, c in compiled.items():
        row = dict(tag=tag, S=S, H=H, D=D, causal=causal, config=dataclasses.asdict(cfg))
        if isinstance(c, Exception):
            row["error"] = f"{type(c).__name__}: {c}"[:800]
        else:
            try:
                t = bench(c, sets)
                row.update(ms=t * 1e3, tflops=tflops(flop, t))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:800]
        rows.append(row)
        REPORT["fwd"].append(row)
    ok = sorted([r for r in rows if "ms" in r], key=lambda r: r["ms"])
    if ok:
        log(f"fwd {tag}: best {ok[0]['config']} {ok[0]['tflops']:.0f} TFLOP/s; worst {ok[-1]['tflops']:.0f}")
    return ok


def sweep_bwd(tag, shape, causal, pairs, block=128):
    """pairs: list of BwdConfig. Times the backward entry point (delta prep + kernels)."""
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    dtype = jnp.bfloat16
    bm = dense_mask(S, causal, block)
    flop_bwd = W.attention_flops(bm, B, H, D, backward=True) - W.attention_flops(bm, B, H, D)
    sets = qkv_sets(B, S, S, H, H, D, dtype, with_do=True)
    fwd = jax.jit(lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, **kernel_kw(D)))
    full_sets = []
    for q, k, v, do in sets:
        o, lse = fwd(q, k, v)
        full_sets.append((q, k, v, o, lse, do))
    jobs = []
    for cfg in pairs:
        fn = (lambda cfg: lambda q, k, v, o, lse, do: K.backward(q, k, v, o, lse, do, bm, None, None, None, None,
                                                                  config=cfg, **kernel_kw(D)))(cfg)
        jobs.append((cfg, fn, full_sets[0]))
    compiled = compile_all(jobs)
    rows = []
    for cfg, c in compiled.items():
        row = dict(tag=tag, S=S, H=H, D=D, causal=causal, config=dataclasses.asdict(cfg))
        if isinstance(c, Exception):
            row["error"] = f"{type(c).__name__}: {c}"[:800]
        else:
            try:
                t = bench(c, full_sets)
                row.update(ms=t * 1e3, tflops_bwd=tflops(flop_bwd, t))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:800]
        rows.append(row)
        REPORT["bwd"].append(row)
    ok = sorted([r for r in rows if "ms" in r], key=lambda r: r["ms"])
    if ok:
        log(f"bwd {tag}: best {ok[0]['config']} {ok[0]['tflops_bwd']:.0f} TFLOP/s (bwd-only count)")
    return ok


def baseline_rows(shape, causal, backward):
    """cuDNN (and JAX Pallas mha) in this process, same FLOP count as ours."""
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    if ARGS.smoke:
        return []
    bm = dense_mask(S, causal)
    flop = W.attention_flops(bm, B, H, D, backward=backward)
    out = []
    impls = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")}
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as pallas_attention
        impls["jax_pallas_mha"] = lambda q, k, v: pallas_attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(D),
                                                                       causal=causal)
    except Exception:  # noqa: BLE001
        pass
    for name, f in impls.items():
        row = dict(impl=name, S=S, H=H, D=D, causal=causal, backward=backward)
        try:
            if backward:
                def g(q, k, v, do, f=f):
                    _, pb = jax.vjp(f, q, k, v)
                    return pb(do)
                fn, sets = jax.jit(g), qkv_sets(B, S, S, H, H, D, jnp.bfloat16, with_do=True)
            else:
                fn, sets = jax.jit(f), qkv_sets(B, S, S, H, H, D, jnp.bfloat16)
            t = bench(fn, sets)
            row.update(ms=t * 1e3, tflops=tflops(flop, t))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:600]
        out.append(row)
        REPORT["baselines"].append(row)
    return out


@guard("fwd sweep D=128")
def phase_fwd():
    shape = main_shape()
    configs = [fwd_cfg(t) for t in (SMOKE_FWD if ARGS.smoke else FWD_128)]
    dense = sweep_fwd("dense", shape, False, configs)
    baseline_rows(shape, False, False)
    top = [FwdConfig(**{k: v for k, v in r["config"].items()}) for r in dense[:4]] or configs[:2]
    variants = []
    for c in top:
        variants.append(c)
        variants.append(dataclasses.replace(c, schedule="reverse"))
    variants.append(dataclasses.replace(top[0], schedule="natural"))
    causal = sweep_fwd("causal", shape, True, variants)
    baseline_rows(shape, True, False)
    if dense:
        REPORT["best"]["fwd_dense_d128"] = dense[0]
    if causal:
        REPORT["best"]["fwd_causal_d128"] = causal[0]


@guard("bwd sweep D=128")
def phase_bwd():
    shape = main_shape()
    dqs = SMOKE_DQ if ARGS.smoke else DQ_128
    dkdvs = SMOKE_DKDV if ARGS.smoke else DKDV_128
    pairs = [bwd_cfg(dq, dkdvs[0]) for dq in dqs] + [bwd_cfg(dqs[0], kv) for kv in dkdvs[1:]]
    pairs += [bwd_cfg(dqs[0], kv, fused_dq=True) for kv in dkdvs[:3]]  # (64, 64, 8, 2) fused: 255 regs, no spill
    rows = sweep_bwd("dense", shape, False, pairs)
    # Best dQ and best dK/dV combined (each was timed with the other's first entry).
    split = [r for r in rows if not r["config"]["fused_dq"]]
    best_dq = min((r for r in split if tuple(list(r["config"].values())[4:8]) == dkdvs[0]),
                  key=lambda r: r["ms"], default=None)
    best_kv = min((r for r in split if tuple(list(r["config"].values())[:4]) == dqs[0]),
                  key=lambda r: r["ms"], default=None)
    finals = []
    if best_dq and best_kv:
        c = dict(best_dq["config"])
        for key in ("block_q_dkv", "block_kv_dkv", "warps_dkv", "stages_dkv"):
            c[key] = best_kv["config"][key]
        finals.append(BwdConfig(**c))
    fused = [r for r in rows if r["config"]["fused_dq"]]
    if fused:
        finals.append(BwdConfig(**min(fused, key=lambda r: r["ms"])["config"]))
    if finals:
        final_dense = sweep_bwd("dense-final", shape, False, finals)
        final_causal = sweep_bwd("causal-final", shape, True, finals)
        if final_dense:
            REPORT["best"]["bwd_dense_d128"] = final_dense[0]
        if final_causal:
            REPORT["best"]["bwd_causal_d128"] = final_causal[0]
    baseline_rows(shape, False, True)
    baseline_rows(shape, True, True)


@guard("other head dims")
def phase_head_dims():
    for D, fwd_list, dq_list, kv_list in ((64, FWD_64, DQ_64, DKDV_64), (256, FWD_256, DQ_256, DKDV_256)):
        if left() < 40:
            break
        shape = dict(main_shape(), D=D)
        if ARGS.smoke:
            fwd_list, dq_list, kv_list = SMOKE_FWD, SMOKE_DQ, SMOKE_DKDV
        best = sweep_fwd(f"causal D={D}", shape, True, [fwd_cfg(t) for t in fwd_list])
        if best:
            REPORT["best"][f"fwd_causal_d{D}"] = best[0]
        pairs = [bwd_cfg(dq, kv_list[0]) for dq in dq_list] + [bwd_cfg(dq_list[0], kv) for kv in kv_list[1:]]
        bb = sweep_bwd(f"causal D={D}", shape, True, pairs)
        if bb:
            REPORT["best"][f"bwd_causal_d{D}"] = bb[0]
        baseline_rows(shape, True, False)


@guard("sparsity scaling")
def phase_sparsity():
    best = REPORT["best"].get("fwd_dense_d128")
    cfg = FwdConfig(**best["config"]) if best else FwdConfig()
    S = 1024 if ARGS.smoke else 32768
    B, H, D = 1, (2 if ARGS.smoke else 16), (64 if ARGS.smoke else 128)
    nb = S // 128
    sets = qkv_sets(B, S, S, H, H, D, jnp.bfloat16, n=2)
    fn = jax.jit(lambda q, k, v, bm: K.forward(q, k, v, bm, None, None, None, None, config=cfg, **kernel_kw(D))[0])
    base = None
    for d in (1.0, 0.5, 0.2, 0.1, 0.05):
        if left() < 15:
            break
        bm = random_mask(S, d, seed=int(d * 1000), width=nb)
        t = bench(lambda q, k, v, bm=bm: fn(q, k, v, bm), sets)
        flop = W.attention_flops(bm, B, H, D)
        base = t if d == 1.0 else base
        row = dict(S=S, density_target=d, density=float(bm.density), ms=t * 1e3, tflops=tflops(flop, t),
                   ratio_to_dense=(t / base) if base else None,
                   goal=(float(bm.density) + 0.05) if d < 1 else None)
        REPORT["sparsity"].append(row)
        log(f"sparsity d={bm.density:.3f}: {t * 1e3:.2f} ms, {row['tflops']:.0f} TFLOP/s, "
            f"ratio {row['ratio_to_dense'] or 1:.3f} (goal <= {row['goal'] or 1:.3f})")
    if not ARGS.smoke:
        for causal in (False, True):
            f = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                               implementation="cudnn"))
            try:
                t = bench(f, sets)
                REPORT["baselines"].append(dict(impl="cudnn", S=S, H=H, D=D, causal=causal, backward=False,
                                                ms=t * 1e3, tflops=tflops(W.attention_flops(dense_mask(S, causal),
                                                                                            B, H, D), t)))
            except Exception as e:  # noqa: BLE001
                REPORT["baselines"].append(dict(impl="cudnn", S=S, causal=causal, error=str(e)[:500]))


@guard("gqa / decode")
def phase_gqa():
    best = REPORT["best"].get("fwd_causal_d128")
    base = FwdConfig(**best["config"]) if best else FwdConfig()
    s = ARGS.smoke
    # prefill G=8
    B, S, Hq, Hkv, D = 1, (256 if s else 8192), (8 if s else 32), (1 if s else 4), (64 if s else 128)
    bm = dense_mask(S, True)
    flop = W.attention_flops(bm, B, Hq, D)
    sets = qkv_sets(B, S, S, Hq, Hkv, D, jnp.bfloat16, n=2)
    for pack in (False, True):
        cfg = dataclasses.replace(base, pack_gqa=pack)
        fn = jax.jit(lambda q, k, v, cfg=cfg: K.forward(q, k, v, bm, None, None, None, None, config=cfg,
                                                         **kernel_kw(D))[0])
        row = dict(case=f"prefill causal S={S} Hq={Hq} Hkv={Hkv}", pack=pack, config=dataclasses.asdict(cfg))
        try:
            t = bench(fn, sets)
            row.update(ms=t * 1e3, tflops=tflops(flop, t))
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e)[:600]
        REPORT["gqa"].append(row)
    # decode: Sq in (1, 16) against a long context, bandwidth bound
    B, Skv, Hq, Hkv = (2, 2048, 8, 2) if s else (8, 16384, 32, 8)
    for Sq in (1, 16):
        bm = sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv, (16, 128))
        sets = qkv_sets(B, Sq, Skv, Hq, Hkv, D, jnp.bfloat16, n=2)
        kv_bytes = 2 * B * Skv * Hkv * D * 2
        for pack, bkv, warps, splits in ((True, 128, 4, None), (True, 128, 4, 1), (True, 64, 4, None),
                                         (True, 128, 8, None), (False, 128, 4, None), (True, 128, 4, 32)):
            cfg = FwdConfig(block_q=16, block_kv=bkv, num_warps=warps, num_stages=3, pack_gqa=pack,
                            num_splits=splits)
            fn = jax.jit(lambda q, k, v, cfg=cfg, bm=bm: K.forward(q, k, v, bm, None, None, None, None, config=cfg,
                                                                    **kernel_kw(D))[0])
            row = dict(case=f"decode Sq={Sq} Skv={Skv} B={B} Hq={Hq} Hkv={Hkv}", pack=pack,
                       config=dataclasses.asdict(cfg))
            try:
                t = bench(fn, sets)
                row.update(ms=t * 1e3, kv_gbps=kv_bytes / t / 1e9)
            except Exception as e:  # noqa: BLE001
                row["error"] = str(e)[:600]
            REPORT["gqa"].append(row)
        if not s:
            f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
            row = dict(case=f"decode Sq={Sq} Skv={Skv} B={B} Hq={Hq} Hkv={Hkv}", impl="cudnn (no mask)")
            try:
                t = bench(f, sets)
                row.update(ms=t * 1e3, kv_gbps=kv_bytes / t / 1e9)
            except Exception as e:  # noqa: BLE001
                row["error"] = str(e)[:600]
            REPORT["gqa"].append(row)
    for r in REPORT["gqa"]:
        log(f"gqa {r.get('case')} pack={r.get('pack')} {r.get('impl', '')}: "
            f"{r.get('ms', float('nan')):.3f} ms {r.get('error', '')[:80]}")


@guard("flex same mask")
def phase_flex():
    if ARGS.smoke:
        return
    try:
        from benchmarks import peers_torch
    except Exception as e:  # noqa: BLE001
        REPORT["flex"].append(dict(error=f"no torch peers: {e}"))
        return
    B, S, H, D = 1, 8192, 16, 128
    bm = random_mask(S, 0.11, seed=11)
    best = REPORT["best"].get("fwd_dense_d128")
    cfg = FwdConfig(**best["config"]) if best else FwdConfig()
    bbest = REPORT["best"].get("bwd_dense_d128")
    bcfg = BwdConfig(**bbest["config"]) if bbest else None
    for backward in (False, True):
        flop = W.attention_flops(bm, B, H, D, backward=backward)
        row = dict(S=S, density=float(bm.density), backward=backward)
        try:
            with cfgs.override(fwd=cfg, bwd=bcfg):
                f = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, backend="triton")  # noqa: E731
                if backward:
                    def g(q, k, v, do):
                        _, pb = jax.vjp(f, q, k, v)
                        return pb(do)
                    fn, sets = jax.jit(g), qkv_sets(B, S, S, H, H, D, jnp.bfloat16, with_do=True)
                else:
                    fn, sets = jax.jit(f), qkv_sets(B, S, S, H, H, D, jnp.bfloat16)
                t = bench(fn, sets)
            row.update(ours_ms=t * 1e3, ours_tflops=tflops(flop, t))
        except Exception as e:  # noqa: BLE001
            row["ours_error"] = str(e)[:600]
        if left() > 40:
            try:
                tf = peers_torch.time_flex(B, S, S, H, H, D, jnp.bfloat16, bm, backward=backward)
                row.update(flex_ms=tf.ms, flex_tflops=tflops(flop, tf.median_s))
                if "ours_ms" in row:
                    row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
            except Exception as e:  # noqa: BLE001
                row["flex_error"] = str(e)[:600]
        REPORT["flex"].append(row)
        log(f"flex same mask bwd={backward}: {row}")


# -- phase 4: evidence (subprocess with an XLA dump) ---------------------------------------------
def _find_tool(name):
    cands = [shutil.which(name)]
    for pat in (f"{sys.prefix}/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/{name}",
                f"{sys.prefix}/lib/python3*/site-packages/triton/backends/nvidia/bin/{name}",
                f"/usr/local/cuda*/bin/{name}", f"/usr/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/{name}"):
        cands += glob.glob(pat)
    for c in cands:
        if c and os.path.exists(c):
            return c
    return None


def evidence_child(spec):
    """Runs in the subprocess: compile and run the best forward and backward once."""
    cfg = FwdConfig(**spec["fwd"]) if spec.get("fwd") else FwdConfig()
    bcfg = BwdConfig(**spec["bwd"]) if spec.get("bwd") else None
    shape = main_shape()
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    bm = dense_mask(S, True)
    q, k, v, do = qkv_sets(B, S, S, H, H, D, jnp.bfloat16, n=1, with_do=True)[0]
    o, lse = jax.jit(lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, config=cfg,
                                               **kernel_kw(D)))(q, k, v)
    jax.block_until_ready(jax.jit(lambda *a: K.backward(*a, bm, None, None, None, None, config=bcfg,
                                                       **kernel_kw(D)))(q, k, v, o, lse, do))


def _ptx_stats(text):
    funcs = re.findall(r"\.entry\s+([\w$.]+)", text)
    return dict(entries=funcs[:20],
                wgmma=len(re.findall(r"wgmma\.mma_async", text)), mma_sync=len(re.findall(r"\bmma\.sync", text)),
                ex2_approx=len(re.findall(r"ex2\.approx", text)), cp_async=len(re.findall(r"cp\.async", text)),
                cp_async_bulk=len(re.findall(r"cp\.async\.bulk", text)), ld_global=len(re.findall(r"ld\.global", text)),
                atom_red=len(re.findall(r"\b(?:atom|red)\.global", text)),
                bar_sync=len(re.findall(r"bar\.sync|barrier\.sync", text)),
                local_mem=len(re.findall(r"\.local\b", text)))


@guard("evidence")
def phase_evidence():
    if ARGS.smoke:
        return
    spec = {"fwd": (REPORT["best"].get("fwd_causal_d128") or {}).get("config"),
            "bwd": (REPORT["best"].get("bwd_causal_d128") or {}).get("config")}
    dump = tempfile.mkdtemp(prefix="bsa_dump_")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip())
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--evidence-child", json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=max(30, min(150, left() - 20)))
    ev = {"child_rc": p.returncode, "child_tail": (p.stdout + p.stderr)[-1500:], "dump": dump}
    REPORT["evidence"] = parse_dump(dump, ev)
    for name, st in REPORT["evidence"]["kernels"].items():
        log(f"evidence {name}: {st}")


def parse_dump(dump, ev):
    """PTX / ptxas / SASS statistics of the kernels in an XLA dump directory."""
    ptx_files = sorted(glob.glob(os.path.join(dump, "*.ptx")))
    ev["ptx_files"] = [os.path.basename(f) for f in ptx_files][:30]
    ev["dump_files"] = len(os.listdir(dump))
    # Kernel names may be mangled: keep entries named like ours, else any entry with an MMA.
    kernels = {}
    for f in ptx_files:
        text = open(f).read()
        entries = list(re.finditer(r"\.entry\s+([\w$.]+)", text))
        for i, m in enumerate(entries):
            body = text[m.start():entries[i + 1].start() if i + 1 < len(entries) else len(text)]
            st = _ptx_stats(body)
            ours = any(t in m.group(1) for t in ("block_sparse", "attention", "pallas"))
            if ours or st["wgmma"] or st["mma_sync"]:
                kernels[m.group(1)] = dict(st, file=os.path.basename(f), named_ours=ours)
    # Where the PTX lacks our kernels (dumped elsewhere), count tokens in any text file that names them.
    ev["other_files"] = {}
    for f in glob.glob(os.path.join(dump, "*")):
        if f.endswith((".ll", ".txt", ".mlir", ".ttir", ".ttgir")) and os.path.getsize(f) < 50_000_000:
            text = open(f, errors="replace").read()
            if "block_sparse_attention" in text:
                ev["other_files"][os.path.basename(f)] = _ptx_stats(text)
    if len(ev["other_files"]) > 20:
        ev["other_files"] = dict(list(ev["other_files"].items())[:20])
    ptxas = _find_tool("ptxas")
    ev["ptxas"] = ptxas
    for f in ptx_files:
        if not ptxas or not any(k.get("file") == os.path.basename(f) for k in kernels.values()):
            continue
        cubin = f + ".cubin"
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f, "-o", cubin], capture_output=True, text=True,
                           timeout=120)
        log_text = r.stdout + r.stderr
        ev["ptxas_rc"] = r.returncode
        ev["ptxas_log"] = (ev.get("ptxas_log", "") + "\n".join(
            l for l in log_text.splitlines() if any(t in l for t in ("registers", "spill", "entry", "error"))))[-6000:]
        for name in kernels:
            if kernels[name]["file"] != os.path.basename(f):
                continue
            reg = re.search(re.escape(name) + r"[\s\S]*?Used (\d+) registers", log_text)
            sp = re.search(re.escape(name) + r"[\s\S]*?(\d+) bytes spill stores, (\d+) bytes spill loads", log_text)
            if reg:
                kernels[name]["registers"] = int(reg.group(1))
            if sp:
                kernels[name]["spill_stores"], kernels[name]["spill_loads"] = int(sp.group(1)), int(sp.group(2))
        tool = _find_tool("cuobjdump") or _find_tool("nvdisasm")
        if tool and os.path.exists(cubin):
            args = [tool, "-sass", cubin] if tool.endswith("cuobjdump") else [tool, cubin]
            sass = subprocess.run(args, capture_output=True, text=True, timeout=120).stdout
            ev["sass_tool"] = tool
            for key, pat in (("sass_hgmma", r"HGMMA"), ("sass_hmma", r"\bHMMA"), ("sass_mufu_ex2", r"MUFU\.EX2"),
                             ("sass_ldgsts", r"LDGSTS"), ("sass_stl", r"\bSTL\b"), ("sass_ldl", r"\bLDL\b")):
                ev[key] = ev.get(key, 0) + len(re.findall(pat, sass))
    ev["kernels"] = kernels
    return ev


# -- report ------------------------------------------------------------------------------------
def final_table():
    lines = []
    ceil = REPORT["meta"].get("ceilings", {}).get("matmul_tflops_bf16")
    lines.append(f"device {REPORT['meta'].get('env', {}).get('device')}  jax {jax.__version__}  "
                 f"matmul ceiling {ceil and round(ceil)} TFLOP/s")
    lines.append("correctness: " + ", ".join(f"{r['case']}={'ok' if r.get('ok') else 'FAIL'}"
                                             for r in REPORT["correctness"]))
    lines.append(f"{'what':44s} {'ms':>8s} {'TFLOP/s':>8s} {'%ceil':>6s}")

    def row(what, ms, tf):
        pct = f"{100 * tf / ceil:5.0f}%" if (tf and ceil) else "     -"
        lines.append(f"{what:44s} {ms if ms is not None else float('nan'):8.3f} {tf or float('nan'):8.0f} {pct}")

    for key, r in REPORT["best"].items():
        tf = r.get("tflops") or r.get("tflops_bwd")
        row(f"ours {key} {tuple(list(r['config'].values())[:4])}", r.get("ms"), tf)
    for r in REPORT["baselines"]:
        if "ms" in r:
            row(f"{r['impl']} S={r['S']} D={r['D']} {'causal' if r['causal'] else 'dense'}"
                f"{' fwd+bwd' if r.get('backward') else ''}", r["ms"], r.get("tflops"))
    for r in REPORT["sparsity"]:
        row(f"sparsity d={r['density']:.3f} ratio={r['ratio_to_dense'] or 1:.3f} goal={r['goal'] or 1:.3f}",
            r["ms"], r["tflops"])
    for r in REPORT["flex"]:
        if "ours_ms" in r:
            row(f"same-mask ours bwd={r['backward']} vs flex x{r.get('speedup_vs_flex', float('nan')):.2f}",
                r["ours_ms"], r.get("ours_tflops"))
    for r in REPORT["gqa"]:
        if "ms" in r:
            c = r.get("config") or {}
            lines.append(f"{r['case'][:40]:40s} pack={r.get('pack')} splits={c.get('num_splits')} "
                         f"bkv={c.get('block_kv')} {r.get('impl', '')} {r['ms']:.3f} ms "
                         f"{r.get('tflops') or r.get('kv_gbps') or 0:.0f} {'TFLOP/s' if 'tflops' in r else 'GB/s'}")
    ev = REPORT.get("evidence") or {}
    for name, st in (ev.get("kernels") or {}).items():
        lines.append(f"ptx {name[:40]}: wgmma={st['wgmma']} mma.sync={st['mma_sync']} ex2={st['ex2_approx']} "
                     f"cp.async={st['cp_async']} regs={st.get('registers')} spills={st.get('spill_stores')}")
    if ev:
        lines.append(f"sass HGMMA={ev.get('sass_hgmma')} HMMA={ev.get('sass_hmma')} "
                     f"MUFU.EX2={ev.get('sass_mufu_ex2')} LDGSTS={ev.get('sass_ldgsts')}")
    lines.append("best configs (for attention_configs.TUNED_*):")
    for key, r in REPORT["best"].items():
        kind = "FwdConfig" if key.startswith("fwd") else "BwdConfig"
        lines.append(f"  {key}: {kind}(**{r['config']})")
    lines.append(f"errors: {len(REPORT['errors'])}  total {time.monotonic() - START:.0f}s  "
                 f"json {os.path.join(OUT, 'tune_attention.json')}")
    return "\n".join(lines)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, interpret mode")
    ap.add_argument("--evidence-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phases", default="correctness,fwd,bwd,evidence,sparsity,head_dims,gqa,flex")
    ARGS = ap.parse_args()
    if ARGS.evidence_child is not None:
        ARGS.smoke = False
        evidence_child(json.loads(ARGS.evidence_child))
        return
    if ARGS.smoke:
        ARGS.budget_s = max(ARGS.budget_s, 900.0)
    REPORT["meta"]["env"] = timing.environment()
    REPORT["meta"]["argv"] = sys.argv
    try:
        REPORT["meta"]["ceilings"] = timing.ceilings(quick=ARGS.smoke)
    except Exception as e:  # noqa: BLE001
        REPORT["meta"]["ceilings"] = {"error": str(e)}
    log(f"env {REPORT['meta']['env'].get('device')} ceilings {REPORT['meta']['ceilings']}")
    phases = {"correctness": phase_correctness, "fwd": phase_fwd, "bwd": phase_bwd, "evidence": phase_evidence,
              "sparsity": phase_sparsity, "head_dims": phase_head_dims, "gqa": phase_gqa, "flex": phase_flex}
    for name in ARGS.phases.split(","):
        phases[name]()
    save()
    print("\n" + final_table(), flush=True)


if __name__ == "__main__":
    main()
