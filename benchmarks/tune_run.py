"""Plumbing of the one-call GPU tuning scripts (``tune_attention``, ``tune_selection``,
``tune_indexed``, ``tune_moe``): a wall-clock budget, optional per-phase shares of it, a
timestamped log, the JSON report rewritten after every phase, and a phase guard that skips a
phase when the budget is spent and records its exception instead of ending the run (so one
failing variant never costs the whole device call)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback

import numpy as np


@contextlib.contextmanager
def env_choice(var: str, value: str | None):
    """Set ``var=value`` for what is traced inside (backend switches are read at trace time);
    None leaves it as it is."""
    old = os.environ.get(var)
    if value is not None:
        os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def rel_err(x, ref) -> float:
    """Relative Frobenius error of ``x`` against ``ref`` over ref's finite entries (float64); inf
    when the two differ in which entries are finite (an lse of -inf where the other is not)."""
    x = np.asarray(np.asarray(x, np.float32), np.float64)
    ref = np.asarray(np.asarray(ref, np.float32), np.float64)
    fin = np.isfinite(ref)
    if not np.array_equal(fin, np.isfinite(x)):
        return float("inf")
    d = np.linalg.norm(ref[fin])
    return float(np.linalg.norm(x[fin] - ref[fin]) / (d if d > 0 else 1.0))



def timed(fn, args, pipeline=None):
    """(median ms rounded to 4 places, calls per timed batch) of ``fn(*args)`` (``timing.time_fn``)."""
    from benchmarks import timing
    t = timing.time_fn(fn, lambda i: args, warmup=2, iters=10, rotations=1, pipeline=pipeline)
    return round(t.ms, 4), t.batch


def compiled(fn, args, *contexts):
    """jit(fn) lowered and compiled for ``args`` inside ``contexts`` (tile overrides, module
    patches; kernels read them at trace time)."""
    import jax
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        # a fresh function object: JAX's trace cache is keyed on it, not on the patches
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


def measure(row, key, fn, args, *contexts, error_key=None, per=1, pipeline=None):
    """row[key] = ms of fn(*args) (divided by ``per``), traced and compiled inside ``contexts``
    (tile overrides, module patches; kernels read them at trace time); ``pipeline``: calls per
    timed batch (``timing.time_fn``). A failure is recorded under ``error_key`` (default
    ``<key>_error``) instead; returns the time or None."""
    try:
        f = compiled(fn, args, *contexts)
        row[key] = round(timed(f, args, pipeline)[0] / per, 4)
        return row[key]
    except Exception as e:  # noqa: BLE001
        row[error_key or f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return None


def _gpu_kernels(trace_dir: str, calls: int) -> list[dict]:
    """Kernel name -> total / per-call duration from the perfetto trace under ``trace_dir``."""
    import glob
    import gzip
    import json
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return [{"error": f"no trace in {trace_dir}"}]
    ev = json.load(gzip.open(sorted(files)[-1]))
    ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in ev if e.get("ph") == "M"
             and e.get("name") == "process_name"}
    agg: dict[str, list[float]] = {}
    spans = []
    for e in ev:
        if e.get("ph") == "X" and "GPU" in str(names.get(e.get("pid"), "")).upper():
            agg.setdefault(e.get("name", "?"), []).append(float(e.get("dur", 0.0)))
            spans.append((float(e.get("ts", 0.0)), float(e.get("dur", 0.0))))
    if not agg:
        return [{"error": "no GPU events", "processes": sorted(set(map(str, names.values())))[:20]}]
    rows = [dict(kernel=k[:90], launches_per_call=round(len(v) / calls, 2), us_per_call=round(sum(v) / calls, 2))
            for k, v in agg.items()]
    rows = sorted(rows, key=lambda r: -r["us_per_call"])
    # the GPU timeline from the first kernel's start to the last one's end, per call: kernels + gaps
    spans.sort()
    busy_end, idle = spans[0][0], 0.0
    for ts, dur in spans:
        idle += max(ts - busy_end, 0.0)
        busy_end = max(busy_end, ts + dur)
    rows.insert(0, dict(kernel="(idle between kernels)", launches_per_call=0, us_per_call=round(idle / calls, 2),
                        span_us_per_call=round((busy_end - spans[0][0]) / calls, 2)))
    return rows


def profile_kernels(fn, args, calls: int, *contexts) -> list[dict]:
    """Per-kernel GPU time of ``calls`` pipelined calls of jit(fn) (traced inside ``contexts``):
    rows from :func:`_gpu_kernels`, the first being the idle time between kernels and the span."""
    import tempfile

    import jax
    f = compiled(fn, args, *contexts)
    for _ in range(3):
        jax.block_until_ready(f(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        out = None
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
    return _gpu_kernels(d, calls)


def floor_ms(nbytes) -> float:
    """Milliseconds to read ``nbytes`` at the copy bandwidth measured in this process."""
    from benchmarks import timing
    return nbytes / (timing.ceilings()["copy_gbps"] * 1e9) * 1e3

class TuneRun:
    """``report`` is the script's JSON document (a dict with an ``errors`` list), written to
    ``$OUT/<name>.json``; ``budget_s`` is set once the arguments are parsed. ``phase_end``
    (optional): phase -> fraction of the budget by which it must have stopped adding cases,
    so an early phase cannot eat the later ones' time (see :meth:`open`)."""

    def __init__(self, name: str, report: dict, phase_end: dict[str, float] | None = None):
        self.name, self.report = name, report
        self.phase_end = dict(phase_end or {})
        self.out = os.environ.get("OUT", "/tmp")
        self.start = time.monotonic()
        self.budget_s: float | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def open(self, phase: str, need_s: float = 5.0) -> bool:
        """Whether ``phase`` may start a case needing ``need_s``: inside its share and the budget."""
        end = self.phase_end.get(phase, 1.0) * self.budget_s
        return self.elapsed() + need_s < end and self.left() > need_s

    def log(self, msg) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"{self.name}.json"), "w") as f:
            json.dump(self.report, f, indent=1, default=str)

    def guard(self, section: str, need_s: float):
        """Decorator: run the phase if ``need_s`` of budget is left; log its time, save after it."""
        def deco(fn):
            def run(*a, **kw):
                if self.left() < need_s:
                    self.log(f"skip {section}: {self.left():.0f}s left")
                    self.report["errors"].append({"section": section, "error": "skipped: budget"})
                    return None
                t0 = time.monotonic()
                try:
                    return fn(*a, **kw)
                except Exception as e:  # noqa: BLE001
                    self.log(f"{section} FAILED: {type(e).__name__}: {str(e)[:300]}")
                    self.report["errors"].append({"section": section, "error": f"{type(e).__name__}: {e}"[:2000],
                                                  "traceback": traceback.format_exc()[-3000:]})
                finally:
                    self.report.setdefault("phase_s", {})[section] = round(time.monotonic() - t0, 1)
                    self.log(f"{section}: {time.monotonic() - t0:.1f}s")
                    self.save()
            return run
        return deco
