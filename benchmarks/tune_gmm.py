"""Check and tune the Triton grouped matmuls on one H100, in one process (v2, ~270 s).

    python -m benchmarks.tune_gmm [--budget-s 270] [--phases ...] [--no-peers] [--out DIR]   (DIR: $OUT or /tmp)
    python -m benchmarks.tune_gmm --smoke --budget-s 3000    (CPU: tiny shapes through the interpreter)

Phases, most important first (each skipped when the budget runs short; the JSON in DIR is
rewritten after each; a watchdog prints what there is and exits at budget + 20 s):

1. ``correctness`` (compiled): gmm fwd+bwd bf16 / f32 with odd sizes, empty groups and rows
   past the sum; transpose_rhs + group_offset; gmm_t fwd+bwd; SwiGLU fwd+bwd; forced tiny
   tiles (both launches, a multi-trip persistent loop); full-size Mixtral M=4096 zipf and
   DeepSeek M=4096 zipf with 128 local experts (group_offset=64) on sampled rows vs an f32
   matmul per group, and exact zeros on non-local rows;
2. ``table``: 3 models x M in (512, 4096, 32768) x (uniform, Zipf 1.2), shipped forward vs
   torch._grouped_mm (sharing our arrays through DLPack), lax.ragged_dot (not DeepSeek
   M=32768: OOM) and ragged_dot_mgpu (Mixtral M=4096 uniform); weight GB/s vs the measured
   copy (read + write) and read-only bandwidths;
3. ``schedule``: the schedule kernel alone vs round 1's XLA schedule, and per-kernel GPU
   times from a profiler trace (forward and fwd+bwd breakdowns);
4. ``grads``: fwd+bwd vs torch (and ragged_dot on Mixtral M=4096), plus the input-gradient
   gmm (transpose_rhs) and weight-gradient tgmm alone;
5. ``swiglu``: fused gate+up vs two gmm calls + silu*mul (time and bytes saved);
6. ``sweep``: big tiles on Mixtral M=4096, small tiles on the memory-bound M=512 cases,
   big tiles of the transpose_rhs gmm (the input gradient) on Mixtral M=4096, tgmm tiles;
   the four cost-model throughputs of the split come out of it.

Timing: every number is *pipelined* (n calls issued back to back, one sync, time / n) --
GPU throughput, comparable with torch's CUDA-event numbers (also taken around n calls).
Round 1 synced after every call: host latency and up to +-20% noise on sub-ms cases.
Prints a compact report last and writes ``tune_gmm.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")  # torch peers use the rest

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax  # noqa: E402
from benchmarks import gmm_cases as C  # noqa: E402
from benchmarks.gmm_measure import (Budget, Compiler, block, err_text, hlo_kernels,  # noqa: E402
                                    kernel_breakdown, log, rand, rel, time_jax, torch_gmm)
from benchmarks import timing  # noqa: E402
from pallas_kernels.common import gmm_plan  # noqa: E402
from pallas_kernels.common.gmm_plan import Tiles, Tiling  # noqa: E402
from pallas_kernels.triton import gmm_table  # noqa: E402
from pallas_kernels.triton import grouped_matmul as gpu_entry  # noqa: E402
from sparse_jax import reference  # noqa: E402
from sparse_jax.group_metadata import local_group_bounds, metadata_from_rows  # noqa: E402

KW = dict(backend="triton")
BF16 = jnp.bfloat16
S = jax.ShapeDtypeStruct
I32 = jnp.int32
INTERPRET = False  # --smoke
CHECK_DIMS = (1000, 520, 333)  # correctness M, K, N: none a tile multiple
SAMPLED = (("mixtral-8x7b", 4096, "zipf1.2", None), ("deepseek-v3", 4096, "zipf1.2", (64, 128)))

BIG_CANDIDATES = [Tiles(128, 256, 64, 8, 3), Tiles(128, 256, 64, 8, 4), Tiles(128, 256, 128, 8, 2),
                  Tiles(256, 128, 64, 8, 3), Tiles(128, 256, 64, 8, 3, band=16),
                  Tiles(128, 256, 64, 8, 3, occupancy=0), Tiles(128, 128, 64, 4, 4, occupancy=2)]
SMALL_CANDIDATES = [Tiles(32, 128, 128, 4, 4), Tiles(64, 128, 128, 4, 4), Tiles(16, 128, 128, 4, 4),
                    Tiles(64, 256, 64, 8, 3)]
DLHS_CANDIDATES = [Tiles(128, 256, 64, 8, 3), Tiles(128, 256, 128, 8, 2), Tiles(128, 128, 128, 8, 3),
                   Tiles(128, 128, 128, 4, 3)]  # transpose_rhs: longer K steps = longer contiguous weight reads
TGMM_CANDIDATES = [Tiles(64, 128, 128, 8, 3), Tiles(32, 128, 128, 4, 4), Tiles(64, 256, 128, 8, 3),
                   Tiles(32, 256, 128, 8, 4)]
SWEEP_CASES = {"big": [("mixtral-8x7b", 4096, "uniform")],
               "small": [("mixtral-8x7b", 512, "uniform"), ("deepseek-v3", 512, "uniform")],
               "dlhs": [("mixtral-8x7b", 4096, "uniform")],
               "tgmm": [("mixtral-8x7b", 4096, "uniform"), ("deepseek-v3", 4096, "uniform")]}
GRAD_CASES = [("mixtral-8x7b", 4096), ("deepseek-v3", 4096), ("qwen2-57b-a14b", 4096), ("mixtral-8x7b", 32768),
              ("qwen2-57b-a14b", 32768)]
PART_CASES = [("mixtral-8x7b", 4096), ("deepseek-v3", 4096)]  # dlhs (transpose_rhs gmm) and tgmm alone
SWIGLU_CASES = [("mixtral-8x7b", 512), ("mixtral-8x7b", 4096), ("qwen2-57b-a14b", 4096), ("deepseek-v3", 512)]
SCHED_CASES = [("mixtral-8x7b", 4096, "uniform"), ("deepseek-v3", 4096, "zipf1.2"), ("qwen2-57b-a14b", 512, "zipf1.2")]
PROFILE_CASES = [("mixtral-8x7b", 512, "uniform", "fwd"), ("mixtral-8x7b", 4096, "uniform", "fwd"),
                 ("mixtral-8x7b", 4096, "uniform", "fwd+bwd"), ("deepseek-v3", 512, "uniform", "fwd")]


# --- infrastructure ---------------------------------------------------------------------------------
class Weights:
    """One model's weight sets at a time (DeepSeek's are 7.5 GB each)."""

    def __init__(self):
        self.model, self.arrays = None, {}

    def get(self, model: str, idx: int = 0):
        if model != self.model:
            self.release()
            self.model = model
        if idx not in self.arrays:
            E, K, N = C.MODELS[model]
            self.arrays[idx] = block(rand(100 + idx, (E, K, N), BF16, K ** -0.5))
        return self.arrays[idx]

    def release(self):
        self.model, self.arrays = None, {}
        gc.collect()


WEIGHTS = Weights()


def gmm_fn(tiling: Tiling | None = None, *, transpose_rhs=False, group_offset=None):
    def f(x, w, gs):
        with gmm_plan.override(tiling or Tiling()):
            return sparse_jax.grouped_matmul(x, w, gs, transpose_rhs=transpose_rhs, group_offset=group_offset, **KW)
    return jax.jit(f)


def fwd_bwd_fn(tiling: Tiling | None = None):
    def f(x, w, gs, ct):
        with gmm_plan.override(tiling or Tiling()):
            o, pull = jax.vjp(lambda x, w: sparse_jax.grouped_matmul(x, w, gs, **KW), x, w)
            return (o, *pull(ct))
    return jax.jit(f)


def tgmm_fn(tiling: Tiling | None = None):
    def f(x, d, gs):
        with gmm_plan.override(tiling or Tiling()):
            return sparse_jax.grouped_matmul_t(x, d, gs, **KW)
    return jax.jit(f)


def swiglu_fns():
    """grouped_swiglu's two forwards, forced (the op's default picks one by shape)."""
    def fused(x, a, b, gs):
        return sparse_jax.grouped_swiglu(x, a, b, gs, fused=True, **KW)

    def separate(x, a, b, gs):
        return sparse_jax.grouped_swiglu(x, a, b, gs, fused=False, **KW)
    return jax.jit(fused), jax.jit(separate)


def xla_schedule_fn(M, K, N):
    """Round 1's schedule: XLA ops (cumsum, compare-all search, gathers) for both launches."""
    big, small = gpu_entry.FORWARD_TILES["gmm"]

    def f(gs):
        st, en = local_group_bounds(gs, M)
        split = gmm_plan.split_rows(st, en, tm_big=big.tm, tm_small=small.tm, k=K, n=N, num_rhs=1, itemsize=2)
        a = metadata_from_rows(st, en, num_rows=M, tile_m=big.tm, align="group", zero_fill=True, visit_empty=False,
                               rows_end=split)
        b = metadata_from_rows(st, en, num_rows=M, tile_m=small.tm, align="group", zero_fill=False,
                               visit_empty=False, rows_start=split)
        return a, b
    return jax.jit(f)


def kernel_schedule_fn(M, E, K, N):
    """This round's schedule: the one-program Pallas kernel (what every forward launches first)."""
    big, small = gpu_entry.FORWARD_TILES["gmm"]
    split = functools.partial(gmm_plan.split_rows, tm_big=big.tm, tm_small=small.tm, k=K, n=N, num_rhs=1,
                              itemsize=2, cost=gmm_plan.CostModel())
    return jax.jit(lambda gs: gmm_table.schedule_table(gs, None, num_rows=M, num_groups=E, tm0=big.tm,
                                                       tm1=small.tm, split=split, interpret=INTERPRET))


# --- phase 1: correctness ---------------------------------------------------------------------------
def correctness_checks():
    """(name, tolerance, kernel fn, reference fn, args (last = cotangent, or None for forward only))."""
    M, K, N = CHECK_DIMS
    gs = jnp.asarray(np.array([0, 3, 1, 0, 2, 1, 1], np.int32) * (M // 10))  # sum 0.8 M: zero rows past it
    checks = []
    for dt, tol in ((BF16, 2e-2), (jnp.float32, 3e-3)):
        checks.append((f"gmm fwd+bwd {jnp.dtype(dt).name} M={M} K={K} N={N} (rows past the sum)", tol,
                       lambda x, w: sparse_jax.grouped_matmul(x, w, gs, **KW),
                       lambda x, w: reference.grouped_matmul(x, w, gs),
                       (rand(1, (M, K), dt), rand(2, (7, K, N), dt, K ** -0.5), rand(3, (M, N), jnp.float32))))
    s9 = jnp.asarray(np.array([4, 0, 30, 1, 0, 25, 13, 10, 2], np.int32) * (M // 100))
    checks.append(("gmm transpose_rhs + group_offset=2 (5 of 9 groups) fwd+bwd bf16", 2e-2,
                   lambda x, w: sparse_jax.grouped_matmul(x, w, s9, transpose_rhs=True, group_offset=2, **KW),
                   lambda x, w: reference.grouped_matmul(x, w, s9, transpose_rhs=True, group_offset=2),
                   (rand(4, (M, K)), rand(5, (5, N, K), BF16, K ** -0.5), rand(6, (M, N), jnp.float32))))
    checks.append(("gmm_t fwd+bwd bf16 (empty groups, group_offset=1, 5 groups)", 2e-2,
                   lambda x, d: sparse_jax.grouped_matmul_t(x, d, s9, num_groups=5, group_offset=1, **KW),
                   lambda x, d: reference.grouped_matmul_t(x, d, s9, num_groups=5, group_offset=1),
                   (rand(7, (M, K)), rand(8, (M, N)), rand(9, (5, K, N), jnp.float32))))
    for fused in (True, False):
        checks.append((f"swiglu fwd+bwd bf16 ({'fused' if fused else 'two gmm'})", 2e-2,
                       lambda x, a, b, fused=fused: sparse_jax.grouped_swiglu(x, a, b, gs, fused=fused, **KW),
                       lambda x, a, b: reference.grouped_swiglu(x, a, b, gs),
                       (rand(10, (M, K)), rand(11, (7, K, N), BF16, K ** -0.5), rand(12, (7, K, N), BF16, K ** -0.5),
                        rand(13, (M, N), jnp.float32))))
    tiny = Tiling(forward=(Tiles(32, 16, 16, band=2, occupancy=0), Tiles(16, 16, 16, band=2, programs=3)),
                  transposed=Tiles(16, 16, 16, band=2),
                  cost=gmm_plan.CostModel(big_tflops=600.0, small_tflops=500.0, big_gbps=1e9, small_gbps=1e9))

    def tiny_gmm(x, w):
        with gmm_plan.override(tiny):
            return sparse_jax.grouped_matmul(x, w, gs, **KW)
    checks.append(("gmm fwd+bwd, tiny tiles, both launches + 3-program persistent loop", 2e-2, tiny_gmm,
                   lambda x, w: reference.grouped_matmul(x, w, gs),
                   (rand(14, (M, K)), rand(15, (7, K, N), BF16, K ** -0.5), rand(16, (M, N), jnp.float32))))
    return checks


def vjp_of(fn, n_in):
    def g(*args):
        o, pull = jax.vjp(fn, *args[:n_in])
        return (o, *pull(args[n_in].astype(o.dtype)))
    return jax.jit(g)


def submit_correctness(comp: Compiler, checks):
    for i, (name, tol, fn, ref, args) in enumerate(checks):
        comp.add(("check", i), vjp_of(fn, len(args) - 1), [S(a.shape, a.dtype) for a in args])
    for model, M, dist, local in SAMPLED:
        E, K, N = C.MODELS[model]
        off, G = local or (None, E)
        comp.add(("sampled", model), gmm_fn(group_offset=off), [S((M, K), BF16), S((G, K, N), BF16), S((E,), I32)])


def correctness(comp: Compiler, checks, budget: Budget) -> list[dict]:
    out = []
    for i, (name, tol, fn, ref, args) in enumerate(checks):
        rec = {"check": name}
        try:
            got = comp.get(("check", i))(*args)
            n_in = len(args) - 1
            o, pull = jax.vjp(ref, *[a.astype(jnp.float32) for a in args[:n_in]])
            want = (o, *pull(args[-1]))
            errs = [rel(a, b) for a, b in zip(got, want)]
            rec.update(errs=errs, ok=bool(max(errs) <= tol))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=err_text(e), traceback=traceback.format_exc()[-1500:])
        out.append(rec)
        log(f"  [{'ok' if rec['ok'] else 'FAIL'}] {name}: {rec.get('errs', rec.get('error'))}")
    for model, M, dist, local in SAMPLED:
        if budget.left() < 150 and not INTERPRET:
            break
        out.append(sampled_check(comp, model, M, dist, local))
        log(f"  [{'ok' if out[-1]['ok'] else 'FAIL'}] {out[-1]['check']}: {out[-1].get('errs', out[-1].get('error'))}")
    return out


def sampled_check(comp, model, M, dist, local) -> dict:
    """Full-size forward: sampled rows of a few groups (smallest to largest) vs f32 x @ w[g];
    rows of no local group must be exactly zero."""
    E, K, N = C.MODELS[model]
    off, G = local or (0, E)
    rec = {"check": f"{C.case_name(model, M, dist)}" + (f" group_offset={off} ({G} local)" if local else "")
           + " sampled rows vs f32"}
    try:
        sizes = C.group_sizes(M, E, dist)
        w = WEIGHTS.get(model)[off:off + G]
        x = rand(20, (M, K))
        out = comp.get(("sampled", model))(x, w, jnp.asarray(sizes))
        offs = np.concatenate([[0], np.cumsum(sizes)])
        loc = [g for g in range(G) if sizes[off + g] > 0]
        by_size = sorted(loc, key=lambda g: sizes[off + g])
        pick = sorted(set(by_size[:3] + by_size[len(by_size) // 2:len(by_size) // 2 + 2] + by_size[-3:]))
        errs = []
        rng = np.random.default_rng(0)
        for g in pick:
            lo, hi = offs[off + g], offs[off + g + 1]
            rows = np.sort(rng.choice(np.arange(lo, hi), size=min(32, hi - lo), replace=False))
            want = jnp.dot(x[rows].astype(jnp.float32), w[g].astype(jnp.float32))
            errs.append(rel(out[rows], want))
        outside = np.concatenate([np.arange(0, offs[off]), np.arange(offs[off + G], M)]).astype(np.int64)
        zero_ok = True
        if outside.size:
            sel = rng.choice(outside, size=min(256, outside.size), replace=False)
            zero_ok = bool(np.all(np.asarray(out[np.sort(sel)], np.float32) == 0))
        rec.update(errs=[max(errs)], groups=[int(g) for g in pick], outside_zero=zero_ok,
                   ok=bool(max(errs) <= 1e-2 and zero_ok))
        del x, w, out
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=err_text(e), traceback=traceback.format_exc()[-1500:])
    return rec


# --- phase 2: main forward table ----------------------------------------------------------------------
def submit_table(comp: Compiler):
    for model in C.MODELS:
        E, K, N = C.MODELS[model]
        for M in C.ROWS:
            comp.add(("fwd", model, M), gmm_fn(), [S((M, K), BF16), S((E, K, N), BF16), S((E,), I32)])


def row(case, impl, t: dict | None, flops, wbytes, **extra) -> dict:
    r = dict(case=case, impl=impl, **extra)
    if t and t.get("ms"):
        s = t["ms"] * 1e-3
        r.update(ms=t["ms"], tflops=flops / s / 1e12 if flops else None, weight_gbps=wbytes / s / 1e9 if wbytes else None,
                 **{k: v for k, v in t.items() if k != "ms"})
    return r


def fail_row(case, impl, e) -> dict:
    return dict(case=case, impl=impl, ms=None, error=err_text(e))


def main_table(comp: Compiler, budget: Budget, peers: bool) -> list[dict]:
    rows = []
    for model in C.MODELS:
        E, K, N = C.MODELS[model]
        w = WEIGHTS.get(model)
        for M in C.ROWS:
            if budget.left() < 90:
                log("  (table cut short by the time budget)")
                return rows
            x = block(rand(1000 + M, (M, K)))
            for dist in C.DISTS:
                sizes = C.group_sizes(M, E, dist)
                gs = jnp.asarray(sizes)
                name = C.case_name(model, M, dist)
                fl, wb = C.gmm_flops(M, K, N), C.weight_bytes(sizes, K, N, 2)
                try:
                    exe = comp.get(("fwd", model, M))
                    rows.append(row(name, "sparse_jax", time_jax(exe, (x, w, gs)), fl, wb, hlo=hlo_kernels(exe)))
                except Exception as e:  # noqa: BLE001
                    rows.append(fail_row(name, "sparse_jax", e))
                if peers:
                    rows += peer_rows(model, M, dist, x, w, sizes, fl, wb)
                log("  " + name + ": " + ", ".join(
                    f"{r['impl']} {r['ms']:.3f}" if r.get("ms") else f"{r['impl']} ERR"
                    for r in rows if r["case"] == name))
            del x
            gc.collect()
    return rows


RAGGED_DOT = jax.jit(jax.lax.ragged_dot)


def peer_rows(model, M, dist, x, w, sizes, fl, wb) -> list[dict]:
    name = C.case_name(model, M, dist)
    out = []
    try:
        out.append(row(name, "torch_grouped_mm", torch_gmm(x, w, sizes), fl, wb))
    except Exception as e:  # noqa: BLE001
        out.append(fail_row(name, "torch_grouped_mm", e))
    if not (model == "deepseek-v3" and M >= 32768):  # ragged_dot materialises too much there (OOM in round 1)
        try:
            out.append(row(name, "ragged_dot", time_jax(RAGGED_DOT, (x, w, jnp.asarray(sizes)), target_s=0.05, reps=1),
                           fl, wb))
        except Exception as e:  # noqa: BLE001
            out.append(fail_row(name, "ragged_dot", e))
        gc.collect()
    if model == "mixtral-8x7b" and M == 4096 and dist == "uniform" and not INTERPRET:
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm
            gs = jnp.asarray(sizes)
            f = jax.jit(lambda x, w: rdm.ragged_dot(x, w, group_sizes=gs, block_m=128, block_n=128, block_k=64,
                                                    max_concurrent_steps=4, grid_block_n=1))
            out.append(row(name, "ragged_dot_mgpu", time_jax(f, (x, w), target_s=0.05, reps=1), fl, wb,
                           note="block 128x128x64, 4 stages (untuned)"))
        except Exception as e:  # noqa: BLE001
            out.append(fail_row(name, "ragged_dot_mgpu", e))
    return out


# --- phase 3: schedule cost ------------------------------------------------------------------------
def submit_schedule(comp: Compiler):
    for model, M, dist in SCHED_CASES:
        E, K, N = C.MODELS[model]
        comp.add(("sched_xla", model, M), xla_schedule_fn(M, K, N), [S((E,), I32)])
        comp.add(("sched_kernel", model, M), kernel_schedule_fn(M, E, K, N), [S((E,), I32)])
    for model, M, dist, what in PROFILE_CASES:
        E, K, N = C.MODELS[model]
        if what == "fwd+bwd":
            comp.add(("fb", model, M), fwd_bwd_fn(), [S((M, K), BF16), S((E, K, N), BF16), S((E,), I32),
                                                      S((M, N), BF16)])


def schedule_phase(comp: Compiler, budget: Budget) -> dict:
    out = {"alone": [], "profile": []}
    for model, M, dist in SCHED_CASES:
        E, K, N = C.MODELS[model]
        gs = jnp.asarray(C.group_sizes(M, E, dist))
        rec = {"case": C.case_name(model, M, dist)}
        for key, label in (("sched_xla", "xla_us"), ("sched_kernel", "kernel_us")):
            try:
                exe = comp.get((key, model, M))
                rec[label] = round(time_jax(exe, (gs,), target_s=0.05)["ms"] * 1e3, 1)
                rec[label.replace("_us", "_hlo")] = hlo_kernels(exe)
            except Exception as e:  # noqa: BLE001
                rec[label] = None
                rec[label + "_error"] = err_text(e)
        out["alone"].append(rec)
        log(f"  schedule {rec['case']}: XLA {rec.get('xla_us')} us {rec.get('xla_hlo')}, "
            f"kernel {rec.get('kernel_us')} us (pipelined calls of the schedule alone)")
    if INTERPRET:
        return out
    for model, M, dist, what in PROFILE_CASES:
        if budget.left() < 60:
            break
        E, K, N = C.MODELS[model]
        gs = jnp.asarray(C.group_sizes(M, E, dist))
        rec = {"case": C.case_name(model, M, dist) + " " + what}
        try:
            w = WEIGHTS.get(model)
            x = rand(1000 + M, (M, K))
            if what == "fwd":
                rec.update(kernel_breakdown(comp.get(("fwd", model, M)), (x, w, gs)))
            else:
                rec.update(kernel_breakdown(comp.get(("fb", model, M)), (x, w, gs, rand(7, (M, N)))))
            del x
        except Exception as e:  # noqa: BLE001
            rec["error"] = err_text(e)
        out["profile"].append(rec)
        log(f"  profile {rec['case']}: busy {rec.get('busy_us')} us, span {rec.get('span_us')} us: "
            f"{rec.get('kernels_us', rec.get('error'))}")
    return out


# --- phase 4: gradients ----------------------------------------------------------------------------
def submit_grads(comp: Compiler):
    for model, M in GRAD_CASES:
        E, K, N = C.MODELS[model]
        comp.add(("fb", model, M), fwd_bwd_fn(), [S((M, K), BF16), S((E, K, N), BF16), S((E,), I32), S((M, N), BF16)])
    for model, M in PART_CASES:
        E, K, N = C.MODELS[model]
        comp.add(("dlhs", model, M), gmm_fn(transpose_rhs=True), [S((M, N), BF16), S((E, K, N), BF16), S((E,), I32)])
        comp.add(("tgmm", model, M), tgmm_fn(), [S((M, K), BF16), S((M, N), BF16), S((E,), I32)])


def grads(comp: Compiler, budget: Budget, peers: bool) -> list[dict]:
    rows = []
    for model, M in sorted(GRAD_CASES, key=lambda c: list(C.MODELS).index(c[0])):
        if budget.left() < 60:
            break
        E, K, N = C.MODELS[model]
        sizes = C.group_sizes(M, E, "uniform")
        gs = jnp.asarray(sizes)
        name = C.case_name(model, M, "uniform")
        fl, wb = C.gmm_flops(M, K, N), C.weight_bytes(sizes, K, N, 2)
        w = WEIGHTS.get(model)
        x, ct = rand(1000 + M, (M, K)), rand(2000 + M, (M, N))
        try:
            rows.append(row(name, "fwd+bwd sparse_jax", time_jax(comp.get(("fb", model, M)), (x, w, gs, ct)), 3 * fl,
                            3 * wb))
        except Exception as e:  # noqa: BLE001
            rows.append(fail_row(name, "fwd+bwd sparse_jax", e))
        if (model, M) in PART_CASES:
            for key, impl, args in (("dlhs", "dlhs (gmm transpose_rhs)", (ct, w, gs)), ("tgmm", "dW (tgmm)", (x, ct, gs))):
                try:
                    rows.append(row(name, impl, time_jax(comp.get((key, model, M)), args), fl, wb))
                except Exception as e:  # noqa: BLE001
                    rows.append(fail_row(name, impl, e))
        if peers:
            try:
                rows.append(row(name, "fwd+bwd torch_grouped_mm", torch_gmm(x, w, sizes, backward=True, ct=ct),
                                3 * fl, 3 * wb))
            except Exception as e:  # noqa: BLE001
                rows.append(fail_row(name, "fwd+bwd torch_grouped_mm", e))
            if model == "mixtral-8x7b" and M == 4096:
                try:
                    def rd(x, w, ct):
                        o, pull = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, gs), x, w)
                        return (o, *pull(ct))
                    rows.append(row(name, "fwd+bwd ragged_dot", time_jax(jax.jit(rd), (x, w, ct), target_s=0.05,
                                                                         reps=1), 3 * fl, 3 * wb))
                except Exception as e:  # noqa: BLE001
                    rows.append(fail_row(name, "fwd+bwd ragged_dot", e))
        del x, ct
        gc.collect()
        log("  " + name + ": " + ", ".join(f"{r['impl']} {r['ms']:.3f}" if r.get("ms") else f"{r['impl']} ERR"
                                          for r in rows if r["case"] == name))
    return rows


# --- phase 5: fused SwiGLU ---------------------------------------------------------------------------
def submit_swiglu(comp: Compiler):
    fused, separate = swiglu_fns()
    for model, M in SWIGLU_CASES:
        E, K, F = C.MODELS[model]
        ab = [S((M, K), BF16), S((E, K, F), BF16), S((E, K, F), BF16), S((E,), I32)]
        comp.add(("swiglu_fused", model, M), fused, ab)
        comp.add(("swiglu_separate", model, M), separate, ab)


def swiglu(comp: Compiler, budget: Budget) -> list[dict]:
    rows = []
    for model, M in sorted(SWIGLU_CASES, key=lambda c: list(C.MODELS).index(c[0])):
        if budget.left() < 40:
            break
        E, K, F = C.MODELS[model]
        sizes = C.group_sizes(M, E, "uniform")
        name = C.case_name(model, M, "uniform")
        args = (rand(1000 + M, (M, K)), WEIGHTS.get(model, 0), WEIGHTS.get(model, 1), jnp.asarray(sizes))
        fl, wb = C.gmm_flops(M, K, F, 2), C.weight_bytes(sizes, K, F, 2, num_rhs=2)
        got = {}
        for v in ("fused", "separate"):
            try:
                got[v] = row(name, f"swiglu {v}", time_jax(comp.get((f"swiglu_{v}", model, M)), args), fl, wb)
            except Exception as e:  # noqa: BLE001
                got[v] = fail_row(name, f"swiglu {v}", e)
            rows.append(got[v])
        if got["fused"].get("ms") and got["separate"].get("ms"):
            got["fused"]["saved_ms"] = got["separate"]["ms"] - got["fused"]["ms"]
        got["fused"]["bytes_saved"] = float((M * K + 4 * M * F) * 2)  # x read once more; g, u written + read
        del args
        if model == "deepseek-v3":
            WEIGHTS.release()
        log(f"  swiglu {name}: " + ", ".join(f"{r['impl']} {r['ms']:.3f}" if r.get("ms") else f"{r['impl']} ERR"
                                             for r in got.values()))
    return rows


# --- phase 6: sweeps ---------------------------------------------------------------------------------
def sweep_jobs():
    big, small = gpu_entry.FORWARD_TILES["gmm"]
    jobs = []  # (key, role, case, tiles label, fn, abstract args)
    for role, cands, policy in (("big", BIG_CANDIDATES, "big"), ("small", SMALL_CANDIDATES, "small")):
        for model, M, dist in SWEEP_CASES[role]:
            E, K, N = C.MODELS[model]
            ab = [S((M, K), BF16), S((E, K, N), BF16), S((E,), I32)]
            variants = [(str(t), Tiling(forward=(t, small) if role == "big" else (big, t), policy=policy))
                        for t in cands]
            # calibration: the other role's default on this case (big on memory-bound, small on compute-bound)
            other = "small" if role == "big" else "big"
            variants.append((f"{other} {small if other == 'small' else big}", Tiling(forward=(big, small),
                                                                                      policy=other)))
            for label, tiling in variants:
                jobs.append((("sweep", role, model, M, label), role, C.case_name(model, M, dist), label,
                             gmm_fn(tiling), ab))
    for model, M, dist in SWEEP_CASES["dlhs"]:
        E, K, N = C.MODELS[model]
        for t in DLHS_CANDIDATES:
            jobs.append((("sweep", "dlhs", model, M, str(t)), "dlhs", C.case_name(model, M, dist), str(t),
                         gmm_fn(Tiling(forward=(t, small), policy="big"), transpose_rhs=True),
                         [S((M, N), BF16), S((E, K, N), BF16), S((E,), I32)]))
    for model, M, dist in SWEEP_CASES["tgmm"]:
        E, K, N = C.MODELS[model]
        for t in TGMM_CANDIDATES:
            jobs.append((("sweep", "tgmm", model, M, str(t)), "tgmm", C.case_name(model, M, dist), str(t),
                         tgmm_fn(Tiling(transposed=t)), [S((M, K), BF16), S((M, N), BF16), S((E,), I32)]))
    return jobs


def sweep(comp: Compiler, budget: Budget, jobs) -> dict:
    rows = []
    for key, role, case, label, fn, ab in jobs:
        comp.add(key, fn, ab)
    for key, role, case, label, fn, ab in jobs:
        if budget.left() < 15:
            break
        try:
            comp.futs[key].result(timeout=max(budget.left() - 15, 1))
        except cf.TimeoutError:
            log("  (sweep: compiles not done within the budget)")
            break
        except Exception:  # noqa: BLE001 - reported below
            pass
        model, M = key[2], key[3]
        E, K, N = C.MODELS[model]
        dist = case.split()[-1]
        sizes = C.group_sizes(M, E, dist)
        gs = jnp.asarray(sizes)
        try:
            exe = comp.get(key)
            if role == "tgmm":
                args = (rand(1000 + M, (M, K)), rand(2000 + M, (M, N)), gs)
            elif role == "dlhs":
                args = (rand(2000 + M, (M, N)), WEIGHTS.get(model), gs)
            else:
                args = (rand(1000 + M, (M, K)), WEIGHTS.get(model), gs)
            r = row(case, label, time_jax(exe, args, reps=2), C.gmm_flops(M, K, N), C.weight_bytes(sizes, K, N, 2),
                    role=role)
            del args
        except Exception as e:  # noqa: BLE001
            r = dict(fail_row(case, label, e), role=role)
        rows.append(r)
        log(f"  sweep {role:5s} {case:30s} {label:30s} "
            + (f"{r['ms']:8.3f} ms {r['tflops']:6.1f} TF/s {r['weight_gbps']:6.0f} GB/s" if r.get("ms")
               else r.get("error", "")))
    return {"rows": rows, "cost_model": calibrate(rows)}


def calibrate(rows) -> dict | None:
    """The split's four throughputs: default big / small tiles on a compute-bound and a memory-bound case."""
    big, small = (str(t) for t in gpu_entry.FORWARD_TILES["gmm"])
    pick = {}
    for r in rows:
        if not r.get("ms"):
            continue
        label = r["impl"].split(" ", 1)[-1]
        if r["role"] == "big" and label in (big, small):
            pick["big_tflops" if label == big else "small_tflops"] = r["tflops"]
        if r["role"] == "small" and label in (big, small) and r["case"].startswith("deepseek"):
            pick["big_gbps" if label == big else "small_gbps"] = r["weight_gbps"]
    return {k: round(v, 0) for k, v in pick.items()} if pick else None


# --- report -------------------------------------------------------------------------------------------
def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"


def print_report(rep: dict):
    ceil = rep.get("ceilings", {})
    copy, read = ceil.get("copy_gbps"), ceil.get("read_gbps")
    env = rep.get("env", {})
    print(f"\n# tune_gmm v2 on {env.get('device')} (jax {env.get('jax')}, torch {env.get('torch')}) in "
          f"{rep.get('seconds', 0):.0f} s; matmul {fmt(ceil.get('matmul_tflops_bf16'), '.0f')} TFLOP/s, "
          f"copy {fmt(copy, '.0f')} GB/s (read+write), read {fmt(read, '.0f')} GB/s; lowering "
          f"{fmt(rep.get('lower_s'), '.0f')} s; skipped: {rep.get('skipped', [])}")
    cs = rep.get("correctness", [])
    bad = [c for c in cs if not c.get("ok")]
    print(f"correctness: {len(cs) - len(bad)}/{len(cs)} ok"
          + "".join(f"\n  FAIL {c['check']}: {c.get('errs', c.get('error'))}" for c in bad))
    sch = rep.get("schedule", {})
    for r in sch.get("alone", []):
        print(f"schedule alone {r['case']:30s} XLA (round 1) {fmt(r.get('xla_us'), '.1f')} us "
              f"{r.get('xla_hlo', '')} | kernel {fmt(r.get('kernel_us'), '.1f')} us")
    for r in sch.get("profile", []):
        print(f"profile {r['case']:36s} busy {fmt(r.get('busy_us'), '.1f')} us span {fmt(r.get('span_us'), '.1f')} us "
              f"{r.get('kernels_us', r.get('error'))}")
    sw = rep.get("sweep", {})
    if sw.get("rows"):
        print(f"sweep (calibrated split cost model: {sw.get('cost_model')}):")
        by = {}
        for r in sw["rows"]:
            by.setdefault((r["role"], r["case"]), []).append(r)
        for (role, case), rs in by.items():
            rs = sorted(rs, key=lambda r: r.get("ms") or 1e9)
            print(f"  {role:5s} {case:30s} " + " | ".join(
                f"{r['impl']} {fmt(r.get('ms'), '.3f')}ms {fmt(r.get('tflops'), '.0f')}TF "
                f"{fmt(r.get('weight_gbps'), '.0f')}GB/s" for r in rs))
    for title, key in (("gradients (TF/s count 3 products; dlhs / dW rows: one product each)", "grads"),
                       ("fused SwiGLU vs two gmm + silu*mul", "swiglu")):
        rows = rep.get(key, [])
        if not rows:
            continue
        print(f"\n{title}:")
        for c in dict.fromkeys(r["case"] for r in rows):
            rs = [r for r in rows if r["case"] == c]
            extra = ""
            for r in rs:
                if r.get("saved_ms") is not None:
                    extra = f" | fused saves {r['saved_ms']:.3f} ms, {r['bytes_saved'] / 1e6:.0f} MB"
            print(f"  {c:30s} " + " | ".join(
                f"{r['impl']} {fmt(r.get('ms'), '.3f')}ms {fmt(r.get('tflops'), '.0f')}TF" for r in rs) + extra)
    rows = rep.get("table", [])
    if rows:
        print("\nforward (ms / TFLOP/s, pipelined; GB/s = bytes of the touched experts' weights / time; "
              "x = torch or ragged_dot time / ours):")
        print(f"{'case':30s} {'sparse_jax':>14s} {'sync':>6s} {'GB/s':>6s} {'%copy':>5s} {'%read':>5s} {'torch':>14s} "
              f"{'ragged_dot':>14s} {'mgpu':>14s} {'xtorch':>6s} {'xragged':>7s}")
        for c in dict.fromkeys(r["case"] for r in rows):
            rs = {r["impl"]: r for r in rows if r["case"] == c}

            def cell(k):
                r = rs.get(k)
                if not r or not r.get("ms"):
                    return f"{'ERR' if r else '-':>14s}"
                return f"{r['ms']:7.3f}/{r['tflops']:5.0f}"
            me, tor, rag = rs.get("sparse_jax", {}), rs.get("torch_grouped_mm", {}), rs.get("ragged_dot", {})
            gb = me.get("weight_gbps")
            print(f"{c:30s} {cell('sparse_jax')} {fmt(me.get('sync_ms'), '6.3f')} {fmt(gb, '6.0f')} "
                  f"{fmt(gb and copy and 100 * gb / copy, '5.0f')} {fmt(gb and read and 100 * gb / read, '5.0f')} "
                  f"{cell('torch_grouped_mm')} {cell('ragged_dot')} {cell('ragged_dot_mgpu')} "
                  f"{fmt(me.get('ms') and tor.get('ms') and tor['ms'] / me['ms'], '6.2f')} "
                  f"{fmt(me.get('ms') and rag.get('ms') and rag['ms'] / me['ms'], '7.2f')}")


def measure_ceilings(smoke: bool) -> dict:
    c = dict(timing.ceilings(quick=smoke))
    try:
        n = (1 << 28) if not smoke else (1 << 20)  # 1 GiB of float32: 20x the L2
        x = block(rand(3, (n,), jnp.float32))
        t = time_jax(jax.jit(jnp.sum), (x,), target_s=0.1)
        c["read_gbps"] = 4 * n / (t["ms"] * 1e-3) / 1e9
        del x
    except Exception as e:  # noqa: BLE001
        c["read_error"] = err_text(e)
    return c


def _smoke():
    """Shrink everything so the whole script runs through the interpreter on a CPU in minutes."""
    global INTERPRET, CHECK_DIMS, SAMPLED
    INTERPRET, CHECK_DIMS = True, (100, 40, 24)
    KW["interpret"] = True
    C.MODELS.clear()
    C.MODELS.update({"mixtral-8x7b": (4, 40, 48), "deepseek-v3": (9, 32, 40), "qwen2-57b-a14b": (5, 24, 16)})
    C.ROWS = (24, 70)
    SAMPLED = (("mixtral-8x7b", 70, "zipf1.2", None), ("deepseek-v3", 70, "zipf1.2", (2, 5)))
    BIG_CANDIDATES[:] = [Tiles(32, 32, 16, 4, 3, programs=2), Tiles(32, 16, 16, 4, 3, occupancy=0)]
    SMALL_CANDIDATES[:] = [Tiles(16, 16, 16, 4, 3, programs=3), Tiles(16, 32, 16, 4, 3)]
    TGMM_CANDIDATES[:] = [Tiles(16, 16, 16), Tiles(16, 32, 16)]
    gpu_entry.FORWARD_TILES["gmm"] = (Tiles(32, 32, 16, 4, 3, programs=2), Tiles(16, 16, 16, 4, 3, programs=3))
    DLHS_CANDIDATES[:] = [Tiles(32, 16, 16, 4, 3, programs=2), Tiles(32, 16, 32, 4, 3)]
    SWEEP_CASES.update(big=[("mixtral-8x7b", 70, "uniform")], small=[("deepseek-v3", 24, "uniform")],
                       dlhs=[("mixtral-8x7b", 70, "uniform")], tgmm=[("deepseek-v3", 70, "zipf1.2")])
    GRAD_CASES[:] = [("mixtral-8x7b", 70), ("deepseek-v3", 70)]
    PART_CASES[:] = [("mixtral-8x7b", 70)]
    SWIGLU_CASES[:] = [("mixtral-8x7b", 24)]
    SCHED_CASES[:] = [("deepseek-v3", 70, "zipf1.2")]
    PROFILE_CASES[:] = []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=270.0)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--phases", default="correctness,table,schedule,grads,swiglu,sweep")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter (CPU plumbing check)")
    args = p.parse_args(argv)
    if args.smoke:
        _smoke()
    budget = Budget(args.budget_s)
    phases = args.phases.split(",")
    peers = not args.no_peers
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_gmm.json")
    rep: dict = {"env": timing.environment(), "argv": sys.argv[1:], "version": 2}
    lock = threading.Lock()
    log(f"tune_gmm v2: {rep['env']['device']}, budget {args.budget_s:.0f} s")

    def save():
        with lock:
            rep["seconds"] = budget.elapsed()
            with open(path, "w") as f:
                json.dump(rep, f, indent=1, default=str)

    def watchdog():  # a hung compile or kernel must not lose what was measured
        time.sleep(max(args.budget_s + 20, 1))
        log("[watchdog: over budget, printing what there is]")
        rep.setdefault("skipped", []).append("watchdog")
        save()
        print_report(rep)
        sys.stdout.flush()
        os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()

    def phase(name, fn, need_s):
        if name not in phases:
            return None
        if budget.left() < need_s:
            log(f"[skip {name}: {budget.left():.0f} s left]")
            rep.setdefault("skipped", []).append(name)
            return None
        log(f"[{name}] at {budget.elapsed():.0f} s")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            rep.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            log(f"  phase {name} failed: {err_text(e)}")
            return None
        finally:
            rep["lower_s"] = comp.lower_s
            save()

    comp = Compiler()
    checks = correctness_checks() if "correctness" in phases else []
    # Lower everything up front (Python), so no lowering competes with the timing loops for the GIL;
    # XLA compiles in the pool meanwhile. Sweeps are lowered later, only if there is time.
    t0 = time.perf_counter()
    if checks:
        submit_correctness(comp, checks)
    for name, submit in (("table", submit_table), ("schedule", submit_schedule), ("grads", submit_grads),
                         ("swiglu", submit_swiglu)):
        if name in phases:
            submit(comp)
    jobs = sweep_jobs() if "sweep" in phases else []
    for key, role, case, label, fn, ab in jobs:  # queued last: compiled while the other phases run
        comp.add(key, fn, ab)
    log(f"[lowered {len(comp.futs)} executables in {time.perf_counter() - t0:.0f} s; compiling]")
    rep["ceilings"] = measure_ceilings(args.smoke)
    log(f"  ceilings {rep['ceilings']}")
    rep["correctness"] = phase("correctness", lambda: correctness(comp, checks, budget), 200) or []
    rep["table"] = phase("table", lambda: main_table(comp, budget, peers), 100) or []
    if rep["table"]:
        rep["seconds"] = budget.elapsed()
        print_report({k: rep[k] for k in ("env", "ceilings", "correctness", "table", "seconds", "lower_s") if k in rep})
    rep["schedule"] = phase("schedule", lambda: schedule_phase(comp, budget), 70) or {}
    rep["grads"] = phase("grads", lambda: grads(comp, budget, peers), 60) or []
    rep["swiglu"] = phase("swiglu", lambda: swiglu(comp, budget), 40) or []
    WEIGHTS.release()
    rep["sweep"] = phase("sweep", lambda: sweep(comp, budget, jobs), 35) or {}
    save()
    print_report(rep)
    print(f"\nJSON: {path}")
    sys.stdout.flush()
    os._exit(0)  # skip waiting for compiles the budget cut


if __name__ == "__main__":
    main()
