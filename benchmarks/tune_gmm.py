"""Check and tune the Triton grouped matmuls on one GPU, in one process (about 5 minutes).

    python -m benchmarks.tune_gmm [--budget-s 300] [--phases ...] [--no-peers] [--out DIR]   (DIR: $OUT or /tmp)
    python -m benchmarks.tune_gmm --smoke --budget-s 3000    (CPU: tiny shapes through the interpreter)

Phases (each skipped when the time budget runs short; the JSON is rewritten after each):

1. correctness, compiled: gmm (+ grads), transpose_rhs + group_offset, gmm_t (+ grads),
   SwiGLU fwd + bwd, float32, odd sizes and empty groups, forced tiny tiles with a
   multi-trip persistent loop, and full-size Mixtral / DeepSeek forwards vs ``lax.ragged_dot``;
2. forward tile sweep: big-tile configs on compute-bound cases, small-tile configs on
   memory-bound ones; each winner also on the other cases, which calibrates the cost model
   of the adaptive split;
3. main table: every model x M x distribution with the adaptive split (best big + best
   small + calibrated cost model), big-only, small-only and the shipped defaults, beside
   ragged_dot, ragged_dot_mgpu (uniform cases) and torch._grouped_mm, plus the cost of
   building the schedule alone;
4. gradients: grouped_matmul fwd + bwd vs ragged_dot's and torch._grouped_mm's (M >= 4096);
5. fused SwiGLU vs two gmm calls + silu * mul;
6. weight-gradient (gmm_t) tile sweep.

Our kernels are lowered one after another and compiled by a thread pool (XLA compiles the
Triton custom calls in C++), then timed one by one with ``benchmarks.timing.time_fn``.
Prints a compact table last and writes ``tune_gmm.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.62")  # leave torch peers room

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax  # noqa: E402
from benchmarks import gmm_cases as C  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.common import gmm_plan  # noqa: E402
from pallas_kernels.common.gmm_plan import Tiles, Tiling  # noqa: E402
from pallas_kernels.triton import grouped_matmul as gpu_entry  # noqa: E402
from sparse_jax import reference  # noqa: E402
from sparse_jax.group_metadata import local_group_bounds, metadata_from_rows  # noqa: E402

KW = dict(backend="triton")
BF16 = jnp.bfloat16
S = jax.ShapeDtypeStruct
INTERPRET = False  # --smoke: tiny shapes through the Pallas interpreter (CPU plumbing check)
CHECK_DIMS = (1000, 520, 333)  # correctness M, K, N: none a tile multiple

BIG_CANDIDATES = [
    Tiles(128, 256, 64, 8, 3), Tiles(128, 256, 64, 8, 3, occupancy=0), Tiles(128, 256, 64, 8, 4),
    Tiles(128, 128, 64, 4, 4), Tiles(128, 128, 64, 8, 3, occupancy=2), Tiles(256, 128, 64, 8, 3),
]
SMALL_CANDIDATES = [
    Tiles(32, 128, 128, 4, 4), Tiles(16, 128, 128, 4, 4), Tiles(64, 128, 128, 4, 4),
    Tiles(32, 128, 64, 4, 4, occupancy=2), Tiles(64, 128, 64, 4, 4, occupancy=2), Tiles(32, 256, 64, 4, 3),
    Tiles(32, 128, 128, 4, 4, occupancy=0),
]
TGMM_CANDIDATES = [
    Tiles(64, 128, 128, 8, 3), Tiles(64, 256, 128, 8, 3), Tiles(32, 128, 128, 4, 4), Tiles(128, 128, 128, 8, 3),
    Tiles(64, 128, 64, 4, 4), Tiles(64, 256, 64, 8, 4),
]

SWEEP_CASES = {  # (model, M, distribution)
    "big": [("mixtral-8x7b", 4096, "uniform"), ("qwen2-57b-a14b", 32768, "zipf1.2")],      # compute-bound
    "small": [("mixtral-8x7b", 512, "uniform"), ("deepseek-v3", 4096, "zipf1.2")],         # weight streaming
    "tgmm": [("mixtral-8x7b", 4096, "uniform"), ("deepseek-v3", 4096, "uniform"), ("qwen2-57b-a14b", 32768, "zipf1.2")],
}


# --- infrastructure --------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def err_text(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 400 else s[:400] + "..."


def compile_all(jobs: dict, threads: int = 12) -> dict:
    """{key: (jitted fn, abstract args)} -> {key: compiled executable or the exception}.

    Lowering (Python: tracing, Pallas -> Triton IR) runs here; XLA compiles in a thread pool.
    """
    lowered, out = {}, {}
    for key, (fn, args) in jobs.items():
        try:
            lowered[key] = fn.lower(*args)
        except Exception as e:  # noqa: BLE001
            out[key] = e
    with cf.ThreadPoolExecutor(threads) as ex:
        futs = {key: ex.submit(low.compile) for key, low in lowered.items()}
        for key, f in futs.items():
            try:
                out[key] = f.result()
            except Exception as e:  # noqa: BLE001
                out[key] = e
    return out


def time_compiled(exe, args, *, iters: int = 20) -> timing.Timing:
    big = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(args)) > (300 << 20)
    sets = [args] if big else [args, tuple(jnp.array(a, copy=True) if a.dtype != jnp.int32 else a for a in args)]
    return timing.time_fn(exe, lambda i: sets[i % len(sets)], warmup=2, iters=iters, rotations=len(sets))


def rand(seed, shape, dtype=BF16, scale=1.0):
    return timing.random_normal(seed, shape, dtype, scale)


def rel(a, b) -> float:
    a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    d = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (d if d > 0 else 1.0))


def gmm_fn(tiling: Tiling | None, *, transpose_rhs=False):
    def f(x, w, gs):
        with gmm_plan.override(tiling or Tiling()):
            return sparse_jax.grouped_matmul(x, w, gs, transpose_rhs=transpose_rhs, **KW)
    return jax.jit(f)


def policy_tiling(policy: str, big: Tiles, small: Tiles, cost=None) -> Tiling:
    return Tiling(forward=(big, small), policy=policy, cost=cost)


# --- phase 1: correctness ---------------------------------------------------------------------------
def correctness(budget: Budget) -> list[dict]:
    out = []
    M, K, N = CHECK_DIMS
    sizes = np.array([0, 3, 1, 0, 2, 1, 1], np.int32) * (M // 10)  # sum 0.8 M: zero rows past it
    gs = jnp.asarray(sizes)
    tol = {BF16: 2e-2, jnp.float32: 3e-3}

    def vjp_of(fn, n_in):
        def g(*args):
            ins, ct = args[:n_in], args[n_in]
            o, pull = jax.vjp(fn, *ins)
            return (o, *pull(ct.astype(o.dtype)))
        return jax.jit(g)

    checks = []
    for dt in (BF16, jnp.float32):
        x, w, ct = rand(1, (M, K), dt), rand(2, (7, K, N), dt, K ** -0.5), rand(3, (M, N), jnp.float32)
        checks.append((f"gmm fwd+bwd {jnp.dtype(dt).name} M={M} K={K} N={N} (rows past the sum)", dt,
                       lambda x, w: sparse_jax.grouped_matmul(x, w, gs, **KW),
                       lambda x, w: reference.grouped_matmul(x, w, gs), (x, w, ct)))
    sizes9 = jnp.asarray(np.array([4, 0, 30, 1, 0, 25, 13, 10, 2], np.int32) * (M // 100))
    x, wt, ct = rand(4, (M, K)), rand(5, (5, N, K), BF16, K ** -0.5), rand(6, (M, N), jnp.float32)
    checks.append(("gmm transpose_rhs + group_offset=2 (5 of 9 groups) fwd+bwd bf16", BF16,
                   lambda x, w: sparse_jax.grouped_matmul(x, w, sizes9, transpose_rhs=True, group_offset=2,
                                                          **KW),
                   lambda x, w: reference.grouped_matmul(x, w, sizes9, transpose_rhs=True, group_offset=2),
                   (x, wt, ct)))
    x, d, ct = rand(7, (M, K)), rand(8, (M, N)), rand(9, (7, K, N), jnp.float32)
    checks.append(("gmm_t fwd+bwd bf16 (empty groups)", BF16,
                   lambda x, d: sparse_jax.grouped_matmul_t(x, d, gs, **KW),
                   lambda x, d: reference.grouped_matmul_t(x, d, gs), (x, d, ct)))
    x, wg, wu, ct = rand(10, (M, K)), rand(11, (7, K, N), BF16, K ** -0.5), rand(12, (7, K, N), BF16, K ** -0.5), \
        rand(13, (M, N), jnp.float32)
    checks.append(("swiglu fwd+bwd bf16", BF16,
                   lambda x, a, b: sparse_jax.grouped_swiglu(x, a, b, gs, **KW),
                   lambda x, a, b: reference.grouped_swiglu(x, a, b, gs), (x, wg, wu, ct)))
    tiny = Tiling(forward=(Tiles(32, 16, 16, band=2, occupancy=0), Tiles(16, 16, 16, band=2, programs=3)),
                  transposed=Tiles(16, 16, 16, band=2),
                  cost=gmm_plan.CostModel(big_tflops=600.0, small_tflops=500.0, big_gbps=1e9, small_gbps=1e9))

    def tiny_gmm(x, w):
        with gmm_plan.override(tiny):
            return sparse_jax.grouped_matmul(x, w, gs, **KW)
    x, w, ct = rand(14, (M, K)), rand(15, (7, K, N), BF16, K ** -0.5), rand(16, (M, N), jnp.float32)
    checks.append(("gmm fwd+bwd, tiny tiles, split + 3-program persistent loop", BF16, tiny_gmm,
                   lambda x, w: reference.grouped_matmul(x, w, gs), (x, w, ct)))

    jobs = {}
    for i, (name, dt, fn, ref, args) in enumerate(checks):
        n_in = len(args) - 1
        jobs[i] = (vjp_of(fn, n_in), [S(a.shape, a.dtype) for a in args])
    exes = compile_all(jobs)
    for i, (name, dt, fn, ref, args) in enumerate(checks):
        rec = {"check": name}
        try:
            exe = exes[i]
            if isinstance(exe, Exception):
                raise exe
            got = exe(*args)
            n_in = len(args) - 1
            f32 = [a.astype(jnp.float32) for a in args[:n_in]]
            o, pull = jax.vjp(ref, *f32)
            want = (o, *pull(args[-1]))
            errs = [rel(a, b) for a, b in zip(got, want)]
            rec.update(errs=errs, ok=bool(max(errs) <= tol[dt]))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=err_text(e), traceback=traceback.format_exc()[-2000:])
        out.append(rec)
        log(f"  [{'ok' if rec['ok'] else 'FAIL'}] {name}: {rec.get('errs', rec.get('error'))}")

    # full-size forwards with the shipped tiles vs XLA's ragged_dot (an independent implementation)
    for model, M2, dist in ((m, C.ROWS[1], "zipf1.2") for m in list(C.MODELS)[:2]):
        if budget.left() < 200 or INTERPRET:
            break
        E, K2, N2 = C.MODELS[model]
        g2 = jnp.asarray(C.group_sizes(M2, E, dist))
        x, w = rand(20, (M2, K2)), rand(21, (E, K2, N2), BF16, K2 ** -0.5)
        rec = {"check": f"{C.case_name(model, M2, dist)} fwd vs lax.ragged_dot"}
        try:
            got = gmm_fn(None)(x, w, g2)
            want = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g, preferred_element_type=jnp.float32))(x, w, g2)
            rec.update(errs=[rel(got, want)], ok=rel(got, want) <= 1e-2)
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=err_text(e))
        out.append(rec)
        log(f"  [{'ok' if rec['ok'] else 'FAIL'}] {rec['check']}: {rec.get('errs', rec.get('error'))}")
        del x, w
        gc.collect()
    return out


# --- phase 2 / 3: forward ----------------------------------------------------------------------------
def case_inputs(model, M, seed=0):
    E, K, N = C.MODELS[model]
    return rand(seed + 1, (M, K)), rand(seed + 2, (E, K, N), BF16, K ** -0.5)


def measure(exe, args, flops, wbytes, **extra) -> dict:
    try:
        if isinstance(exe, Exception):
            raise exe
        t = time_compiled(exe, args)
        return dict(extra, ms=t.ms, spread=t.spread, tflops=flops / t.median_s / 1e12,
                    weight_gbps=wbytes / t.median_s / 1e9)
    except Exception as e:  # noqa: BLE001
        return dict(extra, ms=None, error=err_text(e))


def sweep_forward(budget: Budget) -> dict:
    """Big-tile configs on compute-bound cases, small-tile configs on memory-bound ones (fixed policy)."""
    groups = {"big": (SWEEP_CASES["big"], BIG_CANDIDATES), "small": (SWEEP_CASES["small"], SMALL_CANDIDATES)}
    rows, best = [], {}
    for role, (cases, cands) in groups.items():
        scores = {str(t): [] for t in cands}
        for model, M, dist in cases:
            if budget.left() < 150:
                break
            E, K, N = C.MODELS[model]
            sizes = C.group_sizes(M, E, dist)
            jobs = {str(t): (gmm_fn(Tiling(forward=t)), [S((M, K), BF16), S((E, K, N), BF16), S((E,), jnp.int32)])
                    for t in cands}
            exes = compile_all(jobs)
            x, w = case_inputs(model, M)
            args = (x, w, jnp.asarray(sizes))
            for t in cands:
                r = measure(exes[str(t)], args, C.gmm_flops(M, K, N), C.weight_bytes(sizes, K, N, 2),
                            role=role, case=C.case_name(model, M, dist), tiles=str(t))
                rows.append(r)
                if r.get("ms"):
                    scores[str(t)].append(r["tflops"] if role == "big" else r["weight_gbps"])
                log(f"  sweep {role:5s} {r['case']:32s} {str(t):28s} "
                    + (f"{r['ms']:8.3f} ms {r['tflops']:6.1f} TF/s {r['weight_gbps']:6.0f} GB/s" if r.get("ms")
                       else r.get("error", "")))
            del x, w, args
            gc.collect()
        full = {k: v for k, v in scores.items() if v and len(v) == max(len(s) for s in scores.values())}
        if full:
            key = max(full, key=lambda k: geomean(full[k]))
            best[role] = next(t for t in cands if str(t) == key)
    out = {"rows": rows, "best_big": str(best.get("big")), "best_small": str(best.get("small")), "_best": best}
    if "big" in best and "small" in best and budget.left() > 150:
        cost = calibrate(best, rows)
        if cost is not None:
            best["cost"] = cost
            out["cost_model"] = dataclasses.asdict(cost)
            log(f"  calibrated {cost}")
    return out


def geomean(v):
    return math.prod(v) ** (1 / len(v))


def calibrate(best: dict, rows: list) -> gmm_plan.CostModel | None:
    """The split's cost model from measurements: each winner on the other role's cases too."""
    extra = {"big": (SWEEP_CASES["small"], best["big"]), "small": (SWEEP_CASES["big"], best["small"])}
    for role, (cases, t) in extra.items():
        for model, M, dist in cases:
            E, K, N = C.MODELS[model]
            sizes = C.group_sizes(M, E, dist)
            exe = compile_all({0: (gmm_fn(Tiling(forward=t)), [S((M, K), BF16), S((E, K, N), BF16),
                                                                S((E,), jnp.int32)])})[0]
            x, w = case_inputs(model, M)
            rows.append(measure(exe, (x, w, jnp.asarray(sizes)), C.gmm_flops(M, K, N),
                                C.weight_bytes(sizes, K, N, 2), role=f"{role}-cross", case=C.case_name(model, M, dist),
                                tiles=str(t)))
            del x, w
            gc.collect()

    def pick(tiles, cases, field):
        names = {C.case_name(*c) for c in cases}
        v = [r[field] for r in rows if r.get("ms") and r["tiles"] == str(tiles) and r["case"] in names]
        return geomean(v) if v else None
    vals = dict(big_tflops=pick(best["big"], SWEEP_CASES["big"], "tflops"),
                small_tflops=pick(best["small"], SWEEP_CASES["big"], "tflops"),
                big_gbps=pick(best["big"], SWEEP_CASES["small"], "weight_gbps"),
                small_gbps=pick(best["small"], SWEEP_CASES["small"], "weight_gbps"))
    if any(v is None or v <= 0 for v in vals.values()):
        return None
    return gmm_plan.CostModel(**{k: float(f"{v:.4g}") for k, v in vals.items()})


def main_table(budget: Budget, best: dict, peers: bool) -> list[dict]:
    big = best.get("big", gpu_entry.FORWARD_TILES["gmm"][0])
    small = best.get("small", gpu_entry.FORWARD_TILES["gmm"][1])
    variants = {"split": policy_tiling("split", big, small, best.get("cost")),
                "big": policy_tiling("big", big, small), "small": policy_tiling("small", big, small),
                "shipped": None}
    rows = []
    for model in C.MODELS:
        E, K, N = C.MODELS[model]
        for M in C.ROWS:
            if budget.left() < 110:
                log("  (main table cut short by the time budget)")
                return rows
            abstract = [S((M, K), BF16), S((E, K, N), BF16), S((E,), jnp.int32)]
            jobs = {v: (gmm_fn(t), abstract) for v, t in variants.items()}

            def schedule(gs, M=M, K=K, N=N):
                st, en = local_group_bounds(gs, M)
                split = gmm_plan.split_rows(st, en, tm_big=big.tm, tm_small=small.tm, k=K, n=N, num_rhs=1,
                                            itemsize=2)
                a = metadata_from_rows(st, en, num_rows=M, tile_m=big.tm, align="group", zero_fill=True,
                                       visit_empty=False, rows_end=split)
                b = metadata_from_rows(st, en, num_rows=M, tile_m=small.tm, align="group", zero_fill=False,
                                       visit_empty=False, rows_start=split)
                return a, b
            jobs["schedule only"] = (jax.jit(schedule), [S((E,), jnp.int32)])
            exes = compile_all(jobs)
            x, w = case_inputs(model, M)
            for dist in C.DISTS:
                sizes = C.group_sizes(M, E, dist)
                gs = jnp.asarray(sizes)
                name = C.case_name(model, M, dist)
                fl, wb = C.gmm_flops(M, K, N), C.weight_bytes(sizes, K, N, 2)
                for v in variants:
                    r = measure(exes[v], (x, w, gs), fl, wb, case=name, impl=f"sparse_jax/{v}")
                    rows.append(r)
                r = measure(exes["schedule only"], (gs,), fl, wb, case=name, impl="schedule only")
                rows.append(r)
                if peers:
                    rows += peer_rows(M, K, N, sizes, name, wb, everyone=dist == "uniform")
                mine = [r for r in rows if r["case"] == name]
                log("  " + name + ": " + ", ".join(
                    f"{r['impl'].replace('sparse_jax/', '')} {r['ms']:.3f}" if r.get("ms") else f"{r['impl']} ERR"
                    for r in mine))
            del x, w
            gc.collect()
    return rows


def peer_rows(M, K, N, sizes, name, wbytes, *, everyone: bool, backward: bool = False) -> list[dict]:
    """``benchmarks.peers.gmm_peers`` (ragged_dot, ragged_dot_mgpu, torch._grouped_mm) when ``everyone``,
    else only torch._grouped_mm and ragged_dot (Mosaic GPU compiles cost seconds per shape)."""
    from benchmarks import peers
    rows = []
    fl = C.gmm_flops(M, K, N) * (3 if backward else 1)

    def add(impl, ms, error=None, note=None):
        rows.append(dict(case=name, impl=impl, ms=ms, error=error, note=note,
                         tflops=fl / (ms * 1e-3) / 1e12 if ms else None,
                         weight_gbps=wbytes / (ms * 1e-3) / 1e9 if ms and wbytes else None))
    try:
        if everyone:
            for p in peers.gmm_peers(M, K, N, sizes, BF16, backward=backward, name=name, suite="gmm"):
                add(p.impl, p.time_ms, p.error, p.extra.get("note"))
            return rows
        gs = jnp.asarray(sizes)

        def make(i):
            x, w = rand(60 + i, (M, K)), rand(70 + i, (len(sizes), K, N), BF16, K ** -0.5)
            return (x, w, rand(80 + i, (M, N))) if backward else (x, w)

        def rd(x, w, *ct):
            f = lambda x, w: jax.lax.ragged_dot(x, w, gs)  # noqa: E731
            if not backward:
                return f(x, w)
            o, pull = jax.vjp(f, x, w)
            return pull(ct[0])
        try:
            add("ragged_dot", timing.time_fn(jax.jit(rd), make, warmup=2, iters=10, rotations=1).ms)
        except Exception as e:  # noqa: BLE001
            add("ragged_dot", None, err_text(e))
        gc.collect()
        try:
            from benchmarks import peers_torch
            t = peers_torch.time_grouped_mm(M, K, N, sizes, BF16, backward=backward)
            add("torch_grouped_mm", t.ms)
            peers_torch.free_memory()
        except Exception as e:  # noqa: BLE001
            add("torch_grouped_mm", None, err_text(e))
    except Exception as e:  # noqa: BLE001
        add("peers", None, err_text(e))
    return rows


# --- phase 4: weight gradient ------------------------------------------------------------------------
def sweep_transposed(budget: Budget) -> list[dict]:
    rows = []
    for model, M, dist in SWEEP_CASES["tgmm"]:
        if budget.left() < 25:
            break
        E, K, N = C.MODELS[model]
        sizes = C.group_sizes(M, E, dist)

        def tg(t):
            def f(x, d, gs):
                with gmm_plan.override(Tiling(transposed=t)):
                    return sparse_jax.grouped_matmul_t(x, d, gs, **KW)
            return jax.jit(f)
        jobs = {str(t): (tg(t), [S((M, K), BF16), S((M, N), BF16), S((E,), jnp.int32)]) for t in TGMM_CANDIDATES}
        exes = compile_all(jobs)
        x, d = rand(31, (M, K)), rand(32, (M, N))
        for t in TGMM_CANDIDATES:
            r = measure(exes[str(t)], (x, d, jnp.asarray(sizes)), C.gmm_flops(M, K, N),
                        C.weight_bytes(sizes, K, N, 2), case=C.case_name(model, M, dist), tiles=str(t))
            rows.append(r)
            log(f"  tgmm {r['case']:32s} {str(t):28s} "
                + (f"{r['ms']:8.3f} ms {r['tflops']:6.1f} TF/s" if r.get("ms") else r.get("error", "")))
        del x, d
        gc.collect()
    return rows


# --- phase 5: gradients ----------------------------------------------------------------------------
def grads(budget: Budget, best: dict, peers: bool) -> list[dict]:
    rows = []
    tiling = None
    if "big" in best and "small" in best:
        tiling = Tiling(forward=(best["big"], best["small"]), cost=best.get("cost"))
    for model in C.MODELS:
        E, K, N = C.MODELS[model]
        for M in C.ROWS[1:]:
            if budget.left() < 45:
                return rows
            dist = "uniform"
            sizes = C.group_sizes(M, E, dist)
            name = C.case_name(model, M, dist)

            def fb(x, w, gs, ct):
                def fn(x, w):
                    return sparse_jax.grouped_matmul(x, w, gs, **KW)
                with gmm_plan.override(tiling or Tiling()):
                    o, pull = jax.vjp(fn, x, w)
                    return (o, *pull(ct))
            exes = compile_all({"fb": (jax.jit(fb), [S((M, K), BF16), S((E, K, N), BF16), S((E,), jnp.int32),
                                                     S((M, N), BF16)])})
            x, w = case_inputs(model, M)
            ct = rand(40, (M, N))
            r = measure(exes["fb"], (x, w, jnp.asarray(sizes), ct), 3 * C.gmm_flops(M, K, N),
                        C.weight_bytes(sizes, K, N, 2), case=name + " fwd+bwd", impl="sparse_jax")
            rows.append(r)
            del x, w, ct
            gc.collect()
            if peers:
                rows += peer_rows(M, K, N, sizes, name + " fwd+bwd", None, everyone=False, backward=True)
            log("  " + name + " fwd+bwd: " + ", ".join(
                f"{r['impl']} {r['ms']:.3f}" if r.get("ms") else f"{r['impl']} ERR"
                for r in rows if r["case"] == name + " fwd+bwd"))
    return rows


# --- phase 6: fused SwiGLU ---------------------------------------------------------------------------
def swiglu(budget: Budget) -> list[dict]:
    rows = []
    for model in C.MODELS:
        E, K, F = C.MODELS[model]
        for M in C.ROWS:
            if budget.left() < 35:
                return rows
            sizes = C.group_sizes(M, E, "uniform")
            name = C.case_name(model, M, "uniform")

            def fused(x, a, b, gs):
                return sparse_jax.grouped_swiglu(x, a, b, gs, **KW)

            def separate(x, a, b, gs):
                g = sparse_jax.grouped_matmul(x, a, gs, **KW)
                u = sparse_jax.grouped_matmul(x, b, gs, **KW)
                return (jax.nn.silu(g.astype(jnp.float32)) * u).astype(x.dtype)
            ab = [S((M, K), BF16), S((E, K, F), BF16), S((E, K, F), BF16), S((E,), jnp.int32)]
            exes = compile_all({"fused": (jax.jit(fused), ab), "separate": (jax.jit(separate), ab)})
            x, a = case_inputs(model, M)
            b = rand(50, (E, K, F), BF16, K ** -0.5)
            gs = jnp.asarray(sizes)
            wb = C.weight_bytes(sizes, K, F, 2, num_rhs=2)
            for v in ("fused", "separate"):
                rows.append(measure(exes[v], (x, a, b, gs), C.gmm_flops(M, K, F, 2), wb, case=name,
                                    impl=f"swiglu/{v}"))
            # bytes the fusion avoids: x read once more, g and u written and read back
            rows[-1]["bytes_saved"] = float((M * K + 4 * M * F) * 2)
            log("  swiglu " + name + ": " + ", ".join(
                f"{r['impl']} {r['ms']:.3f}" if r.get("ms") else f"{r['impl']} ERR" for r in rows[-2:]))
            del x, a, b
            gc.collect()
    return rows


# --- report -------------------------------------------------------------------------------------------
def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"


def print_tables(rep: dict):
    ceil = rep.get("ceilings", {})
    copy = ceil.get("copy_gbps")
    print(f"\n# tune_gmm on {rep['env'].get('device')} (jax {rep['env'].get('jax')}, torch {rep['env'].get('torch')}) "
          f"in {rep.get('seconds', 0):.0f} s; matmul {fmt(ceil.get('matmul_tflops_bf16'), '.0f')} TFLOP/s, "
          f"copy {fmt(copy, '.0f')} GB/s")
    bad = [c for c in rep.get("correctness", []) if not c.get("ok")]
    print(f"correctness: {len(rep.get('correctness', [])) - len(bad)}/{len(rep.get('correctness', []))} ok"
          + "".join(f"\n  FAIL {c['check']}: {c.get('errs', c.get('error'))}" for c in bad))
    sw = rep.get("sweep", {})
    if sw:
        print(f"best big tiles: {sw.get('best_big')}   best small tiles: {sw.get('best_small')}   "
              f"measured cost model: {sw.get('cost_model')}")
        for role in ("big", "small"):
            by_case = {}
            for r in sw.get("rows", []):
                if r.get("role") == role and r.get("ms"):
                    by_case.setdefault(r["case"], []).append(r)
            for case, rs in by_case.items():
                rs.sort(key=lambda r: r["ms"])
                print(f"  {role:5s} {case:32s} " + " | ".join(
                    f"{r['tiles']} {r['tflops']:.0f}TF {r['weight_gbps']:.0f}GB/s" for r in rs[:3]))
    ts = [r for r in rep.get("tgmm_sweep", []) if r.get("ms")]
    if ts:
        by_case = {}
        for r in ts:
            by_case.setdefault(r["case"], []).append(r)
        for case, rs in by_case.items():
            rs.sort(key=lambda r: r["ms"])
            print(f"  tgmm  {case:32s} " + " | ".join(f"{r['tiles']} {r['tflops']:.0f}TF" for r in rs[:3]))
    for title, key in (("gradients (fwd+bwd)", "grads"), ("fused SwiGLU vs two gmm", "swiglu")):
        rows = rep.get(key, [])
        if not rows:
            continue
        print(f"\n{title}:")
        cases = list(dict.fromkeys(r["case"] for r in rows))
        for c in cases:
            rs = [r for r in rows if r["case"] == c]
            print(f"  {c:40s} " + " | ".join(
                f"{r['impl']} {fmt(r.get('ms'), '.3f')}ms {fmt(r.get('tflops'), '.0f')}TF" for r in rs))
    rows = rep.get("table", [])
    if rows:
        print("\nforward (ms / TFLOP/s; GB/s = weight bytes read / time; x = speed-up of our best):")
        hdr = f"{'case':34s} {'split':>14s} {'big':>14s} {'small':>14s} {'shipped':>14s} {'sched':>7s} " \
              f"{'torch':>14s} {'ragged_dot':>14s} {'mgpu':>14s} {'bestGB/s':>8s} {'%copy':>5s} {'xtorch':>6s} " \
              f"{'xragged':>7s}"
        print(hdr)
        for c in dict.fromkeys(r["case"] for r in rows):
            rs = {r["impl"]: r for r in rows if r["case"] == c}

            def cell(k):
                r = rs.get(k)
                if not r or not r.get("ms"):
                    return f"{'ERR' if r else '-':>14s}"
                return f"{r['ms']:7.3f}/{r['tflops']:5.0f}"
            ours = [rs[k] for k in rs if k.startswith("sparse_jax/") and rs[k].get("ms")]
            best = min(ours, key=lambda r: r["ms"]) if ours else None
            tor, rag = rs.get("torch_grouped_mm"), rs.get("ragged_dot")
            sched = rs.get("schedule only", {}).get("ms")
            print(f"{c:34s} {cell('sparse_jax/split')} {cell('sparse_jax/big')} {cell('sparse_jax/small')} "
                  f"{cell('sparse_jax/shipped')} {fmt(sched, '7.3f')} {cell('torch_grouped_mm')} "
                  f"{cell('ragged_dot')} {cell('ragged_dot_mgpu')} "
                  f"{fmt(best and best['weight_gbps'], '8.0f')} "
                  f"{fmt(best and copy and 100 * best['weight_gbps'] / copy, '5.0f')} "
                  f"{fmt(best and tor and tor.get('ms') and tor['ms'] / best['ms'], '6.2f')} "
                  f"{fmt(best and rag and rag.get('ms') and rag['ms'] / best['ms'], '7.2f')}")


def _smoke():
    """Shrink everything so the whole script runs through the interpreter on a CPU in minutes."""
    global INTERPRET, CHECK_DIMS
    INTERPRET, CHECK_DIMS = True, (100, 40, 24)
    KW["interpret"] = True
    C.MODELS.clear()
    C.MODELS.update({"tiny-a": (4, 40, 48), "tiny-b": (9, 32, 40)})
    C.ROWS = (24, 70)
    BIG_CANDIDATES[:] = [Tiles(32, 32, 16, 4, 3, programs=2), Tiles(32, 16, 16, 4, 3, occupancy=0)]
    SMALL_CANDIDATES[:] = [Tiles(16, 16, 16, 4, 3, programs=3), Tiles(16, 32, 16, 4, 3)]
    TGMM_CANDIDATES[:] = [Tiles(16, 16, 16), Tiles(16, 32, 16)]
    SWEEP_CASES.update(big=[("tiny-a", 70, "uniform")], small=[("tiny-b", 24, "zipf1.2")],
                       tgmm=[("tiny-b", 70, "zipf1.2")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--phases", default="correctness,sweep,table,grads,swiglu,tgmm")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter (CPU plumbing check)")
    args = p.parse_args(argv)
    if args.smoke:
        _smoke()
    budget = Budget(args.budget_s)
    phases = args.phases.split(",")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_gmm.json")
    rep: dict = {"env": timing.environment(), "argv": sys.argv[1:]}
    log(f"tune_gmm: {rep['env']['device']}, budget {args.budget_s:.0f} s")

    def save():
        rep["seconds"] = budget.elapsed()
        with open(path, "w") as f:
            json.dump({k: v for k, v in rep.items() if not k.startswith("_")}, f, indent=1, default=str)

    def phase(name, fn, need_s):
        if name not in phases and name != "ceilings":
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
            save()

    rep["ceilings"] = phase("ceilings", lambda: timing.ceilings(quick=args.smoke), 0) or {}
    if "correctness" in phases:
        rep["correctness"] = phase("correctness", lambda: correctness(budget), 250) or []
    best = {}
    sw = phase("sweep", lambda: sweep_forward(budget), 200)
    if sw:
        best = sw.pop("_best")
        rep["sweep"] = sw
    rep["table"] = phase("table", lambda: main_table(budget, best, not args.no_peers), 110) or []
    rep["grads"] = phase("grads", lambda: grads(budget, best, not args.no_peers), 45) or []
    rep["swiglu"] = phase("swiglu", lambda: swiglu(budget), 20) or []
    tg = phase("tgmm", lambda: sweep_transposed(budget), 25) or []
    rep["tgmm_sweep"] = tg
    ok = [r for r in tg if r.get("ms")]
    if ok:
        by_tiles = {}
        for r in ok:
            by_tiles.setdefault(r["tiles"], []).append(r["tflops"])
        n = max(len(v) for v in by_tiles.values())
        full = {k: v for k, v in by_tiles.items() if len(v) == n}
        rep["best_tgmm"] = max(full, key=lambda k: geomean(full[k]))
    save()
    print_tables(rep)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
