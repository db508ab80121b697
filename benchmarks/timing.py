"""Timing done one way for every benchmark: warm-up, device sync, many repetitions, medians.

* ``time_fn(fn, make_args)`` compiles and warms ``fn`` up, then times it over a rotation
  of several fresh random input sets (so repeated runs don't just measure the L2
  cache), synchronising with ``block_until_ready``; it reports the median and the
  10th/90th percentiles. Calls shorter than ``PIPELINE_TARGET_S`` are timed in batches
  of back-to-back calls with one sync at the end (each sample is the batch mean), as a
  model's step would issue them: the host's dispatch and the sync's round trip then
  overlap the device work instead of adding ~20-100 us to every sub-millisecond sample,
  which is what CUDA events measure for the torch peers too.
* ``time_torch(fn)`` does the same for torch callables with CUDA events.
* ``ceilings()`` measures the device's matmul TFLOP/s and copy bandwidth in the same
  process, so each result can be printed beside what the chip delivers right now.
* :class:`Result` is the record every suite returns; ``benchmarks.run`` writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    n: int
    batch: int = 1  # calls per sample (back to back, one sync): see time_fn

    @property
    def ms(self) -> float:
        return self.median_s * 1e3

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the measurement was."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s else float("nan")


@dataclasses.dataclass
class Result:
    """One measured configuration of one implementation.

    suite: "attention", "moe", ...; name: the case ("causal S=8192"); impl: who ran it
    ("sparse_jax/triton", "cudnn", "torch.flex_attention"...); flops/bytes: the work
    counted for this case (computed blocks only), from which TFLOP/s and GB/s follow.
    """

    suite: str
    name: str
    impl: str
    shape: dict
    time_ms: float | None
    flops: float | None = None
    bytes: float | None = None
    spread: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def tflops(self) -> float | None:
        if not self.flops or not self.time_ms:
            return None
        return self.flops / (self.time_ms * 1e-3) / 1e12

    @property
    def gbps(self) -> float | None:
        if not self.bytes or not self.time_ms:
            return None
        return self.bytes / (self.time_ms * 1e-3) / 1e9

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["tflops"], d["gbps"] = self.tflops, self.gbps
        return d


def _block(x):
    return jax.block_until_ready(x)


# A batch of back-to-back calls lasts at least this long: at 2 ms (round 3) a 1 ms call ran in
# pairs and still carried half a sync each (+0.1-0.2 ms on Mixtral's gmm, notes/grouped_matmul.md).
PIPELINE_TARGET_S = 10e-3
PIPELINE_MAX = 64


def time_fn(fn: Callable, make_args: Callable[[int], Sequence[Any]], *, warmup: int = 3, iters: int = 20,
            rotations: int = 3, min_time_s: float = 0.0, pipeline: int | None = None) -> Timing:
    """Median time of ``fn(*make_args(i))`` over ``iters`` samples after ``warmup`` calls.

    ``make_args(i)`` returns the i-th of ``rotations`` input sets (fresh random data,
    never zeros); they are created before timing starts. ``fn`` should already be
    jitted. With ``min_time_s`` the loop runs until that much time has passed too.
    ``pipeline``: calls per sample, issued back to back (rotating inputs) with one
    ``block_until_ready`` at the end; ``None`` picks ``PIPELINE_TARGET_S / (one call)``
    clamped to [1, PIPELINE_MAX] from the last warm-up call; ``Timing.batch`` records it.
    """
    arg_sets = [tuple(make_args(i)) for i in range(rotations)]
    for a in arg_sets:
        _block(a)
    probe = float("inf")
    for i in range(max(warmup, 1)):
        t0 = time.perf_counter()
        _block(fn(*arg_sets[i % rotations]))
        probe = time.perf_counter() - t0
    batch = pipeline or int(min(PIPELINE_MAX, max(1, PIPELINE_TARGET_S // max(probe, 1e-9))))
    times = []
    start = time.perf_counter()
    i = 0
    while i < iters or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        out = None
        for j in range(batch):
            out = fn(*arg_sets[(i * batch + j) % rotations])
        _block(out)
        times.append((time.perf_counter() - t0) / batch)
        del out
        i += 1
    ts = np.asarray(times)
    return Timing(float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90)), len(ts), batch)


def time_torch(fn: Callable, make_args: Callable[[int], Sequence[Any]], *, warmup: int = 3, iters: int = 20,
               rotations: int = 3) -> Timing:
    """Like :func:`time_fn` for a torch callable on CUDA, timed with CUDA events."""
    import torch
    arg_sets = [tuple(make_args(i)) for i in range(rotations)]
    for i in range(warmup):
        fn(*arg_sets[i % rotations])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        a = arg_sets[i % rotations]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    ts = np.asarray(times)
    return Timing(float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90)), len(ts))


def random_normal(seed: int, shape, dtype=jnp.bfloat16, scale: float = 1.0):
    """N(0, scale^2) drawn in ``dtype`` (no float32 temporary: DeepSeek-V3's experts are 22 GB)."""
    return (jax.random.normal(jax.random.key(seed), shape, dtype) * scale).astype(dtype)


@functools.cache
def ceilings(quick: bool = False) -> dict:
    """Measured matmul TFLOP/s (bf16, through XLA) and copy bandwidth (GB/s, read + write)."""
    on_accel = jax.default_backend() != "cpu"
    n = 8192 if on_accel and not quick else 1024
    a, b = random_normal(0, (n, n)), random_normal(1, (n, n))
    mm = jax.jit(lambda a, b: a @ b)
    t = time_fn(mm, lambda i: (a, b), warmup=2, iters=10 if on_accel else 3, rotations=1)
    size = (1 << 28) if on_accel and not quick else (1 << 22)
    x = random_normal(2, (size,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.0001)
    tc = time_fn(cp, lambda i: (x,), warmup=2, iters=10 if on_accel else 3, rotations=1)
    return {"matmul_tflops_bf16": 2 * n**3 / t.median_s / 1e12,
            "copy_gbps": 2 * x.size * 4 / tc.median_s / 1e9,
            "matmul_n": n, "copy_bytes": 2 * x.size * 4}


def environment() -> dict:
    """Device, versions and host: what every results file records."""
    dev = jax.devices()[0]
    env = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
           "num_devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
           "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import jaxlib
        env["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    for mod in ("flax", "triton", "torch"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def _json_default(o):
    """numpy scalars and arrays as numbers and lists; anything else as its str()."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def dump(results: Sequence[Result], path: str, **meta) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [r.to_json() for r in results]}, f, indent=1, default=_json_default)


def time_budget(fn: Callable, make_args: Callable[[int], Sequence[Any]], *, budget_s: float = 2.0,
                min_iters: int = 3, max_iters: int = 20, warmup: int = 1, rotations: int = 3) -> Timing:
    """Like :func:`time_fn`, with the repetition count picked so the case costs about ``budget_s``.

    For work whose duration spans orders of magnitude across a sweep (host-side table
    building, from microseconds to seconds): after ``warmup`` calls, one probe call sets
    ``iters = clamp(budget_s / probe, min_iters, max_iters)`` (the probe is the first
    sample). A probe longer than ``budget_s`` is the only sample (``Timing.n == 1``).
    """
    arg_sets = [tuple(make_args(i)) for i in range(rotations)]
    for a in arg_sets:
        _block(a)
    for i in range(warmup):
        _block(fn(*arg_sets[i % rotations]))
    times = []
    t0 = time.perf_counter()
    _block(fn(*arg_sets[0]))
    times.append(time.perf_counter() - t0)
    iters = 1 if times[0] >= budget_s else int(min(max_iters, max(min_iters, budget_s / max(times[0], 1e-9))))
    for i in range(1, iters):
        a = arg_sets[i % rotations]
        t0 = time.perf_counter()
        _block(fn(*a))
        times.append(time.perf_counter() - t0)
    ts = np.asarray(times)
    return Timing(float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90)), len(ts))
