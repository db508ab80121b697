"""Measuring helpers of ``benchmarks/tune_gmm.py``: pipelined timers, a torch peer sharing JAX arrays,
per-kernel GPU times from a profiler trace, a lower-then-compile-in-a-pool helper.

* :func:`time_jax` issues n calls back to back and syncs once (GPU throughput, comparable
  with CUDA-event timings); :func:`time_torch_calls` puts CUDA events around n calls.
* :func:`torch_gmm` times ``torch._grouped_mm`` on our own arrays through DLPack (no second
  copy of 7.5 GB DeepSeek weights; round 1 ran out of memory making its own).
* :func:`kernel_breakdown` reads ``jax.profiler``'s trace.json.gz: GPU time per kernel name.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import glob
import gzip
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

BF16 = jnp.bfloat16


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
    return s if len(s) < 300 else s[:300] + "..."


class Compiler:
    """Lower on the calling thread (Python, holds the GIL), compile in a pool (XLA, C++)."""

    def __init__(self, threads: int = 12):
        self.pool = cf.ThreadPoolExecutor(threads)
        self.futs: dict = {}
        self.lower_s = 0.0

    def add(self, key, fn, args):
        if key in self.futs:
            return
        t0 = time.perf_counter()
        try:
            low = fn.lower(*args)
            self.futs[key] = self.pool.submit(low.compile)
        except Exception as e:  # noqa: BLE001
            f = cf.Future()
            f.set_exception(e)
            self.futs[key] = f
        self.lower_s += time.perf_counter() - t0

    def get(self, key):
        """The compiled executable (raises what lowering / compiling raised)."""
        return self.futs[key].result()


def block(x):
    return jax.block_until_ready(x)


def time_jax(fn, args, *, target_s: float = 0.15, max_calls: int = 200, reps: int = 3) -> dict:
    """Pipelined: n calls back to back, one sync; median over ``reps`` of time / n (ms).

    Also returns the per-call-synced median (round 1's method) as ``sync_ms``."""
    block(fn(*args))
    block(fn(*args))
    sync = []
    for _ in range(3):
        t0 = time.perf_counter()
        block(fn(*args))
        sync.append(time.perf_counter() - t0)
    one = float(np.median(sync))
    n = int(min(max_calls, max(3, target_s / max(one, 1e-6))))
    per = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        block(out)
        per.append((time.perf_counter() - t0) / n)
        del out
    per.sort()
    return dict(ms=per[len(per) // 2] * 1e3, spread=(per[-1] - per[0]) / per[len(per) // 2], n=n,
                sync_ms=one * 1e3)


def time_torch_calls(fn, args, *, target_s: float = 0.15, max_calls: int = 200, reps: int = 3) -> dict:
    """CUDA events around n back-to-back calls (wall clock without CUDA); median of time / n (ms)."""
    import torch
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn(*args)
    sync()
    t0 = time.perf_counter()
    fn(*args)
    sync()
    one = time.perf_counter() - t0
    n = int(min(max_calls, max(3, target_s / max(one, 1e-6))))
    per = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                fn(*args)
            e.record()
            sync()
            per.append(s.elapsed_time(e) / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                fn(*args)
            per.append((time.perf_counter() - t0) / n * 1e3)
    per.sort()
    return dict(ms=per[len(per) // 2], n=n)


def rand(seed, shape, dtype=BF16, scale=1.0):
    """Normal(0, scale) in ``dtype``; arrays over 256M elements are made one leading slice at a time
    (a whole-array float32 draw of DeepSeek's 7.5 GB weights is 15 GB)."""
    key = jax.random.key(seed)
    if math.prod(shape) <= (1 << 28):
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    draw = jax.jit(lambda i: (scale * jax.random.normal(jax.random.fold_in(key, i), shape[1:], jnp.float32))
                   .astype(dtype))
    return jax.jit(lambda: jax.lax.map(draw, jnp.arange(shape[0])))()


def rel(a, b) -> float:
    a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    d = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (d if d > 0 else 1.0))


def geomean(v):
    return math.prod(v) ** (1 / len(v))





def hlo_kernels(exe) -> dict:
    """Kernel launches in an executable's optimized HLO: Triton custom calls and XLA fusions."""
    try:
        text = exe.as_text()
    except Exception:  # noqa: BLE001
        return {}
    return {"triton": text.count("__gpu$xla.gpu.triton"), "fusions": text.count(" fusion(")}


# --- torch peer (sharing our arrays through DLPack: no second copy of the weights) ------------------
def torch_mod():
    try:
        import torch
        return torch
    except Exception:  # noqa: BLE001
        return None


def to_torch(a):
    torch = torch_mod()
    block(a)
    try:
        return torch.from_dlpack(a)
    except Exception:  # noqa: BLE001 - fall back to a host round trip
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).to(
            "cuda" if torch.cuda.is_available() else "cpu").to(torch.bfloat16)


def torch_offsets(sizes):
    torch = torch_mod()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.as_tensor(np.cumsum(np.asarray(sizes, np.int64)).astype(np.int32), device=dev)


def torch_free():
    torch = torch_mod()
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def torch_gmm(x, w, sizes, *, backward=False, ct=None) -> dict:
    torch = torch_mod()
    if torch is None:
        raise RuntimeError("torch not installed")
    tx, tw, offs = to_torch(x), to_torch(w), torch_offsets(sizes)
    try:
        if not backward:
            return time_torch_calls(lambda: torch._grouped_mm(tx, tw, offs=offs), ())
        tx.requires_grad_(True)
        tw.requires_grad_(True)
        tct = to_torch(ct)
        return time_torch_calls(lambda: torch.autograd.grad(torch._grouped_mm(tx, tw, offs=offs), (tx, tw), tct), ())
    finally:
        del tx, tw
        torch_free()


# --- profiler: per-kernel GPU time ------------------------------------------------------------------
def kernel_breakdown(fn, args, calls: int = 5) -> dict:
    """GPU kernel durations (us per call, by name) from a jax.profiler trace of ``calls`` calls."""
    block(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            out = None
            for _ in range(calls):
                out = fn(*args)
            block(out)
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "plugins", "profile", "*", "*.trace.json.gz"))
        if not paths:
            return {"error": "no trace.json.gz written"}
        with gzip.open(paths[0], "rt") as f:
            events = json.load(f).get("traceEvents", [])
    pname, tname = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tname[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    gpu = {p for p, n in pname.items() if "GPU" in n or "gpu" in n}
    xs = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]
    streams = [e for e in xs if tname.get((e["pid"], e.get("tid")), "").lower().startswith("stream")]
    picked = streams or [e for e in xs if not any(s in tname.get((e["pid"], e.get("tid")), "")
                                                   for s in ("XLA", "Ops", "Modules", "Steps"))]
    per: dict = {}
    for e in picked:
        per[e.get("name", "?")] = per.get(e.get("name", "?"), 0.0) + float(e.get("dur", 0.0))
    out = {k[:60]: round(v / calls, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:12]}
    span = (max(e["ts"] + e.get("dur", 0) for e in picked) - min(e["ts"] for e in picked)) / calls if picked else None
    return {"kernels_us": out, "busy_us": round(sum(per.values()) / calls, 1),
            "span_us": round(span, 1) if span else None,
            "threads": sorted({tname.get((e["pid"], e.get("tid")), "?") for e in xs})[:8]}
