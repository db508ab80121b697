#!/usr/bin/env python3
"""Block-sparse attention on one GPU (Pallas-Triton), round 2: compiled correctness of the new
code paths, then A/B timings of the variants the round-1 evidence pointed at, the same-mask
FlexAttention comparison and SASS evidence. One self-contained run: --budget-s 270 (default)
plus a watchdog at budget + 15 s keeps it under 300 s of wall time.

    PYTHONPATH=. python benchmarks/tune_attention.py                 # on the GPU machine
    PYTHONPATH=. python benchmarks/tune_attention.py --smoke         # CPU: tiny shapes, interpret mode

Round 1 (H100, notes "Variants and outcomes") showed that shared memory, through CTAs per SM,
decides the forward: 2 CTAs of 4 warps (M=128 each, <= 113 KB) beat 1 CTA of 8 warps, and a
mask-evaluating loop with a 3-deep K/V ring (num_stages=3) drops a config to 1 CTA/SM. Phases
(each skipped once the budget is spent; JSON rewritten after each):

  1. correctness, compiled (4 cases, compiled in parallel threads): lazy rescale, tiles-first grid,
     index prefetch, permuted K/V, decode tiles of every packed row; o, lse, dq, dk, dv vs
     the float32 reference;
  2. forward S=8192 H=16 D=128 bf16, dense and causal: 128x64 / 4 warps at 2 and 3 stages,
     lazy rescale, grid order, index prefetch, the round-1 winners, cuDNN beside them; a
     causal mask with its diagonal blocks marked full (isolates the masked-loop cost);
  3. backward: the dQ and dK/dV kernels timed separately, the best pair then fwd+bwd through
     the public op against cuDNN fwd+bwd (dense and causal);
  4. sparsity at S=32768: densities 1 .. 0.05 (random blocks, all full) for both grid orders,
     and d=0.5 as one contiguous band (random access vs table-walk cost);
  5. decode Sq=1 / Sq=16 (B=8 Hq=32 Hkv=8 Skv=16K) with the new decode tiles; GQA prefill;
  6. evidence: the kernels' Triton IR captured from this process's lowering, compiled with the
     installed triton (ptxas -v, cuobjdump -sass): registers, spills, shared memory, CTAs/SM,
     per-loop SASS instruction mix (benchmarks/attention_ptx_local.py);
  7. torch FlexAttention on the same random 11%-dense mask (fwd, fwd+bwd; late: it compiles);
  8. causal D=64 and D=256 (the heuristic against alternatives), cuDNN beside them;
  9. an XLA dump attempt (--xla_dump_emitter_re) in a child process, if time is left.
A watchdog prints the table and exits at budget + 15 s whatever is still running.

Crash isolation (the first round-2 GPU run died with SIGSEGV inside a Triton compile):
  0. precheck: before the phases, every distinct compile they will ask for (kernel family,
     shape class, config, part: 54 on the GPU) is lowered and compiled in ``--compile-child``
     processes, 8 at a time (``--precheck-parallel``) within ``--precheck-s`` 55 s, while this
     process measures the ceilings. Progress lines pin a crash on one compile; the phases skip
     what crashed (``!! SKIP`` lines; listed first in the table). Child logs (with their
     faulthandler stacks): ``$OUT/tune_attention_precheck/child_<n>.log``.
  The measurements run in a worker process under a supervisor (this command): a worker death
  prints its faulthandler stacks (``$OUT/tune_attention_faulthandler.txt``) and the phase it
  was in; a death inside a threaded compile is retried with ``--compile-threads 1``, any other
  skips that phase; the rest resumes from the saved JSON in a new worker. ``--no-supervisor``
  measures in-process. Tests: ``TUNE_ATTENTION_SIMULATE_CRASH='child:<label part>'``,
  ``'phase:<name>'`` or ``'compile:<phase>'`` (with --compile-threads 2) raise a real SIGSEGV.

Writes ``$OUT/tune_attention.json`` (OUT defaults to /tmp) and prints a compact table last,
with the winners as Python literals for pallas_kernels/triton/attention_configs.py.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import faulthandler  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import flops as W  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun  # noqa: E402
from pallas_kernels.triton import attention_bwd  # noqa: E402
from pallas_kernels.triton import attention_configs as cfgs  # noqa: E402
from pallas_kernels.triton import block_sparse_attention as K  # noqa: E402
from pallas_kernels.triton.attention_configs import BwdConfig, FwdConfig  # noqa: E402
from sparse_jax import masks  # noqa: E402

ARGS = None
REPORT: dict = {"meta": {}, "correctness": [], "fwd": [], "bwd_kernels": [], "fwd_bwd": [], "baselines": [],
                "sparsity": [], "flex": [], "decode": [], "evidence": {}, "best": {}, "errors": [],
                "precheck": {}, "skipped": [], "crashes": []}
RUN = TuneRun("tune_attention", REPORT)
OUT = RUN.out


# -- plumbing ------------------------------------------------------------------------------------
left, log, save = RUN.left, RUN.log, RUN.save


def guard(section, need_s=10.0):
    """Run a phase if ``need_s`` of budget is left; record its exception instead of dying."""
    return RUN.guard(section, need_s)


def bench(fn, arg_sets, *, reps=None, inner=None):
    """Median seconds per call; ``inner`` calls are queued between syncs to hide dispatch."""
    reps = reps or (2 if ARGS.smoke else 7)
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
    """jobs: list of (key, fn, example_args) -> {key: compiled or Exception}; tracing is
    sequential, XLA/Triton compilation runs in ``--compile-threads`` threads (8, as in round 1).
    The JSON marks the threaded section so the supervisor can tell a crash there from others."""
    lowered = {}
    for key, fn, args in jobs:
        try:
            lowered[key] = jax.jit(fn).lower(*args)
        except Exception as e:  # noqa: BLE001
            lowered[key] = e
    out = {k: l for k, l in lowered.items() if isinstance(l, Exception)}
    threads = ARGS.compile_threads or (1 if ARGS.smoke else 8)
    REPORT["meta"]["in_compile"] = dict(phase=REPORT["meta"].get("current_phase"), threads=threads,
                                        jobs=[str(k)[:120] for k in lowered])
    save()
    if os.environ.get(SIM_ENV) == f"compile:{REPORT['meta'].get('current_phase')}" and threads > 1:
        os.kill(os.getpid(), signal.SIGSEGV)  # tests: a crash inside a threaded compile
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as ex:
        futs = {k: ex.submit(l.compile) for k, l in lowered.items() if not isinstance(l, Exception)}
        for k, f in futs.items():
            try:
                out[k] = f.result()
            except Exception as e:  # noqa: BLE001
                out[k] = e
    REPORT["meta"]["in_compile"] = None
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


def cfg_str(c) -> str:
    """Short label of a config: tile/warps/stages and the non-default switches."""
    if isinstance(c, FwdConfig):
        s = f"{c.block_q}x{c.block_kv}/w{c.num_warps}/s{c.num_stages}"
        skip = ("block_q", "block_kv", "num_warps", "num_stages")
    else:
        s = (f"dq{c.block_q_dq}x{c.block_kv_dq}/w{c.warps_dq}/s{c.stages_dq} "
             f"dkv{c.block_q_dkv}x{c.block_kv_dkv}/w{c.warps_dkv}/s{c.stages_dkv}")
        skip = ("block_q_dq", "block_kv_dq", "warps_dq", "stages_dq", "block_q_dkv", "block_kv_dkv", "warps_dkv",
                "stages_dkv")
    default = type(c)()
    for f in dataclasses.fields(c):
        if f.name not in skip and getattr(c, f.name) != getattr(default, f.name):
            v = getattr(c, f.name)
            s += f" {f.name}" if v is True else f" {f.name}={v}"
    return s


# -- shapes and masks ----------------------------------------------------------------------------
def main_shape():
    return dict(B=1, S=256, H=2, D=64) if ARGS.smoke else dict(B=1, S=8192, H=16, D=128)


def dense_mask(S, causal, block=128):
    return sj.create_block_mask(masks.causal if causal else masks.full, None, None, S, S, block_size=block)


def tril_full_mask(S, block=128):
    """Causal block structure with the diagonal blocks marked *full*: the causal work without
    any mask evaluation (wrong numerics on the diagonal; a timing diagnostic only)."""
    nb = S // block
    return sj.BlockMask.from_block_bool(np.tril(np.ones((nb, nb), bool)), S, S, block_size=block)


def random_mask(S, density, seed, block=128, width=None):
    nb = S // block
    rng = np.random.default_rng(seed)
    sel = rng.random((nb, nb)) < density
    sel[np.arange(nb), np.arange(nb)] = True
    return sj.BlockMask.from_block_bool(sel, S, S, block_size=block, max_kv_blocks=width, max_q_blocks=width,
                                        max_full_kv_blocks=width, max_full_q_blocks=width)


def band_mask(S, density, block=128, width=None):
    """Each query block row attends to one contiguous run of ~density*nb key blocks (same work
    as a random mask of that density, sequential K/V access)."""
    nb = S // block
    n = max(1, int(round(density * nb)))
    i = np.arange(nb)[:, None]
    j = np.arange(nb)[None, :]
    start = np.minimum(np.maximum(i - n // 2, 0), nb - n)
    sel = (j >= start) & (j < start + n)
    return sj.BlockMask.from_block_bool(sel, S, S, block_size=block, max_kv_blocks=width, max_q_blocks=width,
                                        max_full_kv_blocks=width, max_full_q_blocks=width)


# -- the variants ----------------------------------------------------------------------------------
def fwd_variants():
    """name -> FwdConfig, with the prediction recorded in the notes (block_sparse_attention_gpu.md)."""
    if ARGS.smoke:
        base = FwdConfig(64, 32, 4, 2)
        return {"w4s2": base, "w4s2 lazy": dataclasses.replace(base, lazy_rescale=True),
                "w4s2 lazy tiles_first": dataclasses.replace(base, lazy_rescale=True, grid_order="tiles_first"),
                "w4s3 prefetch": FwdConfig(64, 32, 4, 3, prefetch_index=True)}
    s2 = FwdConfig(128, 64, 4, 2)
    return {
        "r1 dense best 128x64/w4/s3": FwdConfig(128, 64, 4, 3),
        "r1 causal best 128x128/w8/s3": FwdConfig(128, 128, 8, 3),
        "w4s2": s2,
        "w4s2 lazy": dataclasses.replace(s2, lazy_rescale=True),
        "w4s2 tiles_first": dataclasses.replace(s2, grid_order="tiles_first"),
        "w4s2 lazy tiles_first": dataclasses.replace(s2, lazy_rescale=True, grid_order="tiles_first"),
        "w4s2 lazy reverse": dataclasses.replace(s2, lazy_rescale=True, schedule="reverse"),
        "w4s3 lazy": FwdConfig(128, 64, 4, 3, lazy_rescale=True),
        "w4s3 prefetch (1 CTA, K/V 2 ahead)": FwdConfig(128, 64, 4, 3, prefetch_index=True),
        "64x64/w4/s3 lazy": FwdConfig(64, 64, 4, 3, lazy_rescale=True),
        "128x128/w8/s3 lazy": FwdConfig(128, 128, 8, 3, lazy_rescale=True),
    }


def causal_fwd_variants():
    variants = fwd_variants()
    out = {k: v for k, v in variants.items() if "prefetch" not in k or ARGS.smoke}
    out["r1 causal best reverse"] = dataclasses.replace(
        list(variants.values())[1], schedule="reverse") if not ARGS.smoke else list(variants.values())[0]
    return out


# dQ kernel: (block_q_dq, block_kv_dq, warps_dq, stages_dq); dK/dV: (block_q_dkv, block_kv_dkv, warps, stages)
DQ_VARIANTS = [((128, 128, 8, 2), {}), ((64, 64, 4, 2), {}), ((128, 64, 8, 2), {}), ((64, 64, 4, 3), {}),
               ((128, 128, 8, 2), {"grid_order": "tiles_first"}), ((64, 64, 4, 2), {"grid_order": "tiles_first"})]
DKDV_VARIANTS = [((64, 64, 4, 2), {}), ((32, 64, 4, 2), {}), ((64, 128, 8, 2), {}), ((64, 64, 4, 3), {}),
                 ((32, 128, 4, 2), {}), ((64, 64, 4, 2), {"grid_order": "tiles_first"}),
                 ((64, 64, 4, 2), {"prefetch_index": True})]
SMOKE_DQ = [((64, 32, 4, 2), {}), ((64, 32, 4, 2), {"grid_order": "tiles_first"})]
SMOKE_DKDV = [((32, 64, 4, 2), {}), ((32, 64, 4, 2), {"prefetch_index": True})]


def bwd_cfg(dq, dkdv, **kw):
    return BwdConfig(*dq, *dkdv, **kw)


# -- crash isolation: every compile checked in child processes first ----------------------------
# A compiler crash inside XLA's Triton pipeline (MLIR/LLVM) kills the process with a signal: no
# Python exception, no table. Before the phases, every distinct (kernel family, shape class,
# config, part) they will compile is compiled in ``--compile-child`` processes, a few at a time;
# a child killed by a signal pins the crash on the part its progress lines say it had started
# (the rest of its batch is queued again), and the phases skip what crashed.
PRECHECK_PARTS = {"fwd": ("dense", "causal"), "bwd": ("dq", "dkdv", "dq_causal", "dkdv_causal"),
                  "decode": ("fwd",), "corr": ("grads",), "op": ("grads",)}
SIM_ENV = "TUNE_ATTENTION_SIMULATE_CRASH"  # tests only: 'child:<label substring>' or 'phase:<name>'


def check_key(kind, D, cfg, extra=""):
    """Identity of one pre-checked compile target (kernel family, shape class, config)."""
    return f"{kind}|D{D}{extra}|{json.dumps(dataclasses.asdict(cfg), sort_keys=True)}"


def op_cases():
    """Public-op calls with the default configs (no override): evidence that the shipped
    defaults compile. (name, B, S, Hq, Hkv, D, dtype, mask)."""
    S = 256 if ARGS.smoke else 2048
    return [("defaults causal GQA2 bf16 D128", 1, S, 4, 2, 64 if ARGS.smoke else 128, jnp.bfloat16, masks.causal),
            ("defaults sliding-window fp16 D64", 1, S, 2, 2, 64, jnp.float16,
             masks.sliding_window(S // 4, causal=True))]


def precheck_items():
    """Everything the selected phases compile, suspects first: the correctness cases and configs
    with a round-2 switch, then the shipped defaults, then the rest."""
    s = ARGS.smoke
    items: dict[str, dict] = {}
    phases = set(ARGS.phases.split(","))

    def add(kind, D, cfg, parts, extra="", **spec):
        key = check_key(kind, D, cfg, extra)
        it = items.setdefault(key, dict(key=key, kind=kind, D=D, cfg=dataclasses.asdict(cfg), parts=[],
                                        label=f"{kind} D{D}{extra} {cfg_str(cfg)}", **spec))
        it["parts"] += [p for p in parts if p not in it["parts"]]

    if "correctness" in phases:
        for i, case in enumerate(correctness_cases()):
            items[f"corr|{i}"] = dict(key=f"corr|{i}", kind="corr", case=i, parts=["grads"], label=f"corr {case[0]}")
    for i, case in enumerate(op_cases()):
        items[f"op|{i}"] = dict(key=f"op|{i}", kind="op", case=i, parts=["grads"], label=f"op {case[0]}")
    D = main_shape()["D"]
    if "fwd" in phases:
        for c in fwd_variants().values():
            add("fwd", D, c, ["dense"])
        for c in causal_fwd_variants().values():
            add("fwd", D, c, ["causal"])
    dqs, dkdvs = (SMOKE_DQ, SMOKE_DKDV) if s else (DQ_VARIANTS, DKDV_VARIANTS)
    if "bwd" in phases:
        for dq, kw in dqs:
            add("bwd", D, bwd_cfg(dq, dkdvs[0][0], **kw), ["dq"])
        for dkdv, kw in dkdvs:
            add("bwd", D, bwd_cfg(dqs[0][0], dkdv, **kw), ["dkdv"])
        if not s:
            add("bwd", D, BwdConfig(128, 128, 8, 2, 64, 64, 4, 2), ["dq", "dkdv", "dq_causal", "dkdv_causal"])
    if "head_dims" in phases and not s:
        for hd, variants in HEAD_DIM_VARIANTS.items():
            for c in variants.values():
                add("fwd", hd, c, ["causal"])
    if "decode" in phases:
        for Sq in (1, 16):
            for c in decode_variants(Sq).values():
                add("decode", decode_shape()[0], c, ["fwd"], extra=f":Sq{Sq}", Sq=Sq)
    default_fwd, default_bwd = FwdConfig(), BwdConfig()

    def rank(it):
        if it["kind"] == "corr":
            return 0
        cfg = it.get("cfg", {})
        base = dataclasses.asdict(default_bwd if it["kind"] == "bwd" else default_fwd)
        new = any(cfg.get(k) != base.get(k) for k in ("lazy_rescale", "grid_order", "prefetch_index"))
        return 1 if new else 2 if it["kind"] in ("op", "decode") else 3
    return sorted(items.values(), key=rank)


def compile_part(it, part):
    """Lower and compile one precheck target (runs in a child; raises on failure)."""
    kind, smoke = it["kind"], ARGS.smoke
    if kind == "corr":
        name, B, Sq, Skv, Hq, Hkv, D, dtype, mk, kw, fwd, bwd = correctness_cases()[it["case"]]
        args = qkv_sets(B, Sq, Skv, Hq, Hkv, D, dtype, n=1, with_do=True)[0]
        jax.jit(_grads_fn("triton", mk(Sq, Skv), kw, fwd, bwd)).lower(*args).compile()
        return
    if kind == "op":
        name, B, S, Hq, Hkv, D, dtype, mask_fn = op_cases()[it["case"]]
        bm = sj.create_block_mask(mask_fn, None, None, S, S, 128)
        args = qkv_sets(B, S, S, Hq, Hkv, D, dtype, n=1, with_do=True)[0]
        jax.jit(_grads_fn("triton", bm, {})).lower(*args).compile()
        return
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    if kind == "decode":
        D, B, Skv, Hq, Hkv = decode_shape()
        Sq, S, bm, cfg = it["Sq"], Skv, decode_mask(it["Sq"], Skv), FwdConfig(**it["cfg"])
    else:
        shape = main_shape()
        B, S, Hq, D = shape["B"], shape["S"], shape["H"], (shape["D"] if smoke else it["D"])
        Sq, Hkv = S, Hq
        bm = dense_mask(S, part in ("causal", "dq_causal", "dkdv_causal"))
    q, k, do = sds((B, Sq, Hq, D), bf), sds((B, S, Hkv, D), bf), sds((B, Sq, Hq, D), bf)
    if kind in ("fwd", "decode"):
        cfg = FwdConfig(**it["cfg"])
        fn = lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, config=cfg, **kernel_kw(D))[0]  # noqa
        jax.jit(fn).lower(q, k, k).compile()
        return
    cfg = BwdConfig(**it["cfg"])

    def fn(q, k, v, o, lse, do):
        P, _, dqi, dki = K.backward_inputs(q, k, v, o, lse, do, bm, None, None, None, None, scale=1.0 / math.sqrt(D),
                                           softcap=None, segments_everywhere=False)
        if part.startswith("dq"):
            return attention_bwd.dq_call(P, cfg, dqi, dtype=bf, interpret=smoke)
        return attention_bwd.dkdv_call(P, cfg, dki, k_dtype=bf, v_dtype=bf, interpret=smoke)
    jax.jit(fn).lower(q, k, k, do, sds((B, Hq, Sq), jnp.float32), do).compile()


def compile_child(path):
    """``--compile-child FILE``: compile each (item, part) of the JSON batch in order, printing
    '@@start i part' / '@@done i part seconds' / '@@fail i part "message"' lines."""
    faulthandler.enable(all_threads=True)  # C-level crash: Python stacks of every thread on stderr
    with open(path) as f:
        batch = json.load(f)
    sim = os.environ.get(SIM_ENV, "")
    for i, (it, part) in enumerate(batch):
        print(f"@@start {i} {part}", flush=True)
        t0 = time.monotonic()
        if sim.startswith("child:") and sim[6:] in f"{it['label']} [{part}]":
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            compile_part(it, part)
            print(f"@@done {i} {part} {time.monotonic() - t0:.1f}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"@@fail {i} {part} {json.dumps(f'{type(e).__name__}: {e}'[:400])}", flush=True)


def signal_name(rc):
    try:
        return signal.Signals(-rc).name
    except (ValueError, TypeError):
        return f"rc {rc}"


class Precheck:
    """Runs the child compiles on background threads (``parallel`` children at a time, each
    given ``batch`` targets) until everything is checked or ``budget_s`` is spent."""

    def __init__(self, items, parallel, budget_s, batch):
        self.items, self.parallel, self.batch = items, parallel, batch
        self.deadline = time.monotonic() + budget_s
        self.t0 = time.monotonic()
        self.queue = [(i, p) for i, it in enumerate(items) for p in it["parts"]]
        self.tries = {u: 0 for u in self.queue}
        self.status: dict = {u: "unchecked" for u in self.queue}
        self.children: list[dict] = []
        self.lock = threading.Lock()
        self.running = 0
        self.dir = os.path.join(OUT, "tune_attention_precheck")
        os.makedirs(self.dir, exist_ok=True)
        self.threads = [threading.Thread(target=self._slot, daemon=True) for _ in range(parallel)]

    def start(self):
        log(f"precheck: {len(self.queue)} compiles of {len(self.items)} targets in child processes, "
            f"{self.parallel} at a time, {self.batch} per child, budget {self.deadline - self.t0:.0f}s")
        for t in self.threads:
            t.start()
        return self

    def _slot(self):
        while True:
            with self.lock:
                if time.monotonic() > self.deadline - (20 if ARGS.smoke else 8):
                    return  # too little time left for a child to start JAX and compile
                units = None
                if self.queue:
                    units, self.queue = self.queue[:self.batch], self.queue[self.batch:]
                    n = len(self.children)
                    self.children.append(None)
                    self.running += 1
                elif not self.running:
                    return
            if units is None:  # a running child may still requeue what it did not reach
                time.sleep(0.2)
                continue
            for u in units:
                self.tries[u] += 1
            try:
                self._run_child(units, n)
            finally:
                with self.lock:
                    self.running -= 1

    def _run_child(self, units, n):
        spec = os.path.join(self.dir, f"child_{n}.json")
        with open(spec, "w") as f:
            json.dump([(self.items[i], p) for i, p in units], f)
        logf = os.path.join(self.dir, f"child_{n}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--compile-child", spec] + (["--smoke"] if ARGS.smoke else [])
        t0 = time.monotonic()
        timeout = max(5.0, self.deadline - t0)
        out, rc = "", None
        with open(logf, "w") as err:
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
                out, rc = p.stdout, p.returncode
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                rc = "timeout"
        started, finished = None, set()
        for line in out.splitlines():
            f = line.split(" ", 3)
            if len(f) < 3 or not f[0].startswith("@@"):
                continue
            u = units[int(f[1])]
            if f[0] == "@@start":
                started = u
            elif f[0] == "@@done":
                self.status[u] = f"ok {f[3]}s"
                finished.add(u)
            elif f[0] == "@@fail":
                self.status[u] = "fail " + json.loads(f[3])
                finished.add(u)
        rec = dict(n=n, units=[f"{self.items[i]['label']} [{p}]" for i, p in units], rc=rc,
                   wall_s=round(time.monotonic() - t0, 1), log=logf)
        blamed = started if started not in finished else None
        if rc != 0:
            if isinstance(rc, int) and rc < 0:
                rec["signal"] = signal_name(rc)
            with open(logf, errors="replace") as f:
                rec["stderr_tail"] = f.read()[-2500:]
            if blamed is not None:
                crashed = isinstance(rc, int) and rc < 0
                self.status[blamed] = ("timeout" if rc == "timeout" else
                                       f"CRASH {signal_name(rc)}" if crashed else f"CRASH rc={rc}")
                rec["blamed"] = f"{self.items[blamed[0]]['label']} [{blamed[1]}]"
            rest = [u for u in units if u not in finished and u != blamed and self.tries[u] < 2]
            with self.lock:  # not reached by this child: queue again, first
                self.queue = rest + self.queue
            msg = (f"precheck child {n}: {rec.get('signal', rc)} after {rec['wall_s']}s; blamed "
                   f"{rec.get('blamed', 'nothing (died before a compile started)')}; {len(rest)} requeued; log {logf}")
            log(("!! " if rec.get("signal") else "") + msg)
        self.children[n] = rec

    def finish(self):
        for t in self.threads:
            t.join(max(0.0, self.deadline - time.monotonic()) + 30)
        res = {}
        for (i, p), st in self.status.items():
            res.setdefault(self.items[i]["key"], dict(label=self.items[i]["label"], parts={}))["parts"][p] = st
        counts = {}
        for st in self.status.values():
            k = st.split()[0].lower()
            counts[k] = counts.get(k, 0) + 1
        summary = dict(wall_s=round(time.monotonic() - self.t0, 1), compiles=len(self.status), counts=counts,
                       parallel=self.parallel, batch=self.batch, children=[c for c in self.children if c],
                       crashes=[f"{self.items[i]['label']} [{p}]: {st}" for (i, p), st in self.status.items()
                                if st.startswith(("CRASH", "timeout"))],
                       failures=[f"{self.items[i]['label']} [{p}]: {st}"[:300] for (i, p), st in self.status.items()
                                 if st.startswith("fail")],
                       results=res)
        log(f"precheck done in {summary['wall_s']}s: {counts}")
        for line in summary["crashes"]:
            log(f"!! precheck {line}")
        for line in summary["failures"]:
            log(f"precheck {line[:200]}")
        return summary


def run_precheck():
    items = precheck_items()
    n = sum(len(it["parts"]) for it in items)
    parallel = 2 if ARGS.smoke else ARGS.precheck_parallel
    batch = max(1, -(-n // (2 * parallel)))  # about two waves of children
    return Precheck(items, parallel, ARGS.precheck_s, batch).start()


def precheck_status(key, part):
    return ((REPORT.get("precheck") or {}).get("results", {}).get(key, {}).get("parts", {}).get(part)) or "unchecked"


def crashed_switches():
    """(field, value) of the non-default switches of every config that crashed in the precheck."""
    bad = set()
    for key, r in (REPORT.get("precheck") or {}).get("results", {}).items():
        if not any(st.startswith("CRASH") for st in r["parts"].values()):
            continue
        kind = key.split("|")[0]
        cfgs_ = []
        if kind == "corr":
            case = correctness_cases()[int(key.split("|")[1])]
            cfgs_ = [c for c in case[10:12] if c is not None]
        elif kind in ("fwd", "decode"):
            cfgs_ = [FwdConfig(**json.loads(key.split("|", 2)[2]))]
        elif kind == "bwd":
            cfgs_ = [BwdConfig(**json.loads(key.split("|", 2)[2]))]
        for c in cfgs_:
            base = type(c)()
            bad |= {(type(c).__name__, f.name, getattr(c, f.name)) for f in dataclasses.fields(c)
                    if f.name in ("lazy_rescale", "grid_order", "prefetch_index", "schedule", "pack_gqa", "fused_dq")
                    and getattr(c, f.name) != getattr(base, f.name)}
    return bad


def gate(kind, D, cfg, part, where, extra=""):
    """None if ``cfg`` may be compiled in this process, else the reason (logged, recorded in
    REPORT['skipped']): it crashed the compiler in the precheck, or it was not checked and
    carries a switch value that crashed another config."""
    st = precheck_status(check_key(kind, D, cfg, extra), part)
    why = None
    if st.startswith("CRASH"):
        why = f"precheck {st}"
    elif st == "unchecked":
        mine = {(type(cfg).__name__, f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        shared = sorted(f"{n}={v}" for _, n, v in mine & crashed_switches())
        if shared:
            why = f"not prechecked and shares {', '.join(shared)} with a crashing config"
    if why:
        REPORT["skipped"].append(dict(where=where, kind=kind, D=D, part=part, label=cfg_str(cfg), reason=why))
        log(f"!! SKIP {where}: {cfg_str(cfg)} [{part}]: {why}")
    return why


def gated(named_cfgs, kind, D, where, part="fwd", extra=""):
    return {n: c for n, c in named_cfgs.items() if gate(kind, D, c, part, f"{where} {n}", extra) is None}


# -- phase: correctness ------------------------------------------------------------------------
def _grads_fn(backend, bm, kw, fwd=None, bwd=None):
    interpret = ARGS.smoke and backend == "triton"

    def fn(q, k, v, do):
        def f(q, k, v):
            return sj.block_sparse_attention(q, k, v, bm, backend=backend, interpret=interpret, return_lse=True,
                                             **kw)
        with cfgs.override(fwd=fwd, bwd=bwd):
            o, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)
            return o, lse, vjp(do)
    return fn


def correctness_cases():
    s = ARGS.smoke
    doc_S = 320 if s else 600
    ids = np.sort(np.random.default_rng(0).integers(0, 5, doc_S)).astype(np.int32)
    S_c = 256 if s else 512
    perm_S = 256 if s else 512
    perm = np.stack([np.stack([np.random.default_rng(10 * b + h).permutation(perm_S) for h in range(2)])
                     for b in range(2)]).astype(np.int32)
    lazy = dict(lazy_rescale=True)
    return [
        # (name, B, Sq, Skv, Hq, Hkv, D, dtype, mask builder, op kwargs, fwd config, bwd config)
        ("causal GQA2 bf16 D128: 128x64/w4/s2 lazy tiles_first", 1, S_c, S_c, 4, 2, 128, jnp.bfloat16,
         lambda Sq, Skv: sj.create_block_mask(masks.causal, None, None, Sq, Skv, 128), {},
         FwdConfig(128, 64, 4, 2, lazy_rescale=True, grid_order="tiles_first"),
         BwdConfig(128, 128, 8, 2, 64, 64, 4, 2, grid_order="tiles_first")),
        ("doc+window fp16 D64 ragged: lazy + prefetch_index", 2, doc_S, doc_S, 2, 1, 64, jnp.float16,
         lambda Sq, Skv: sj.create_block_mask(masks.and_masks(masks.document(ids),
                                                              masks.sliding_window(200, causal=True)),
                                              None, None, Sq, Skv, (64, 128)), {},
         FwdConfig(128, 64, 4, 3, prefetch_index=True, **lazy),
         BwdConfig(64, 64, 4, 2, 64, 64, 4, 2, prefetch_index=True)),
        ("kv_permutation causal bf16 D64 + segments: lazy", 2, perm_S, perm_S, 4, 2, 64, jnp.bfloat16,
         lambda Sq, Skv: sj.BlockMask.from_block_bool(np.tril(np.ones((Sq // 128, Sq // 128), bool)), Sq, Skv, 128,
                                                      mask_fn=masks.causal),
         {"kv_permutation": perm, "segment_ids": np.repeat(np.arange(perm_S // 128), 128).astype(np.int32)},
         FwdConfig(128, 64, 4, 2, **lazy), None),
        ("decode Sq=16 GQA4 bf16 D128: default decode tiles + auto split", 2, 16, 1500 if s else 2500, 16, 4, 128,
         jnp.bfloat16,
         lambda Sq, Skv: sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv,
                                              (16, 128)), {}, None, None),
    ]


@guard("correctness", need_s=60)
def phase_correctness():
    cases = correctness_cases()
    jobs, data = [], {}
    skipped = {}
    for i, (name, B, Sq, Skv, Hq, Hkv, D, dtype, mk, kw, fwd, bwd) in enumerate(cases):
        bm = mk(Sq, Skv)
        args = qkv_sets(B, Sq, Skv, Hq, Hkv, D, dtype, n=1, with_do=True)[0]
        data[name] = (args, dtype, (B, Sq, Skv, Hq, Hkv, D))
        st = precheck_status(f"corr|{i}", "grads")
        if st.startswith("CRASH"):
            skipped[name] = RuntimeError(f"not compiled here: precheck {st} (compiler crash)")
            REPORT["skipped"].append(dict(where="correctness", label=name, reason=f"precheck {st}"))
            log(f"!! SKIP correctness {name}: precheck {st}")
            continue
        jobs.append(((name, "triton"), _grads_fn("triton", bm, kw, fwd, bwd), args))
        jobs.append(((name, "xla"), _grads_fn("xla", bm, kw), args))
    compiled = compile_all(jobs)
    compiled.update({(n, "triton"): e for n, e in skipped.items()})
    for name, *_ in cases:
        args, dtype, shape = data[name]
        row = dict(case=name, shape=shape, dtype=jnp.dtype(dtype).name)
        if name in skipped:
            row["skipped"] = "compiler crash in precheck"
        try:
            ours, ref = compiled[(name, "triton")], compiled.get((name, "xla"))
            for c in (ours, ref):
                if isinstance(c, Exception):
                    raise c
            o, lse, g = ours(*args)
            ro, rlse, rg = ref(*args)
            tol = 2e-3 if dtype == jnp.float32 else 2e-2
            lse, rlse = np.asarray(lse), np.asarray(rlse)
            fin = np.isfinite(rlse)
            row.update(o=rel(o, ro), dq=rel(g[0], rg[0]), dk=rel(g[1], rg[1]), dv=rel(g[2], rg[2]),
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


# -- phase: forward ----------------------------------------------------------------------------
def time_fwd(tag, shape, bm, named_cfgs, *, flop_mask=None, sets=None):
    """Times K.forward over ``bm`` for each (name, config); rows sorted by time."""
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    named_cfgs = gated(named_cfgs, "fwd", D, f"fwd {tag}", part="causal" if tag.startswith("causal") and
                       tag != "causal-nomask" else "dense")
    if not named_cfgs:
        return []
    flop = W.attention_flops(flop_mask or bm, B, H, D)
    sets = sets or qkv_sets(B, S, S, H, H, D, jnp.bfloat16)
    jobs = [(name, (lambda c: lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, config=c,
                                                          **kernel_kw(D))[0])(c), sets[0])
            for name, c in named_cfgs.items()]
    rows = []
    for name, c in compile_all(jobs).items():
        row = dict(tag=tag, S=S, H=H, D=D, variant=name, config=dataclasses.asdict(named_cfgs[name]),
                   label=cfg_str(named_cfgs[name]))
        try:
            if isinstance(c, Exception):
                raise c
            t = bench(c, sets)
            row.update(ms=t * 1e3, tflops=tflops(flop, t))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:800]
        rows.append(row)
        REPORT["fwd"].append(row)
    ok = sorted([r for r in rows if "ms" in r], key=lambda r: r["ms"])
    for r in ok:
        log(f"fwd {tag:12s} {r['variant']:38s} {r['ms']:7.3f} ms {r['tflops']:6.0f} TFLOP/s")
    for r in rows:
        if "error" in r:
            log(f"fwd {tag:12s} {r['variant']:38s} ERROR {r['error'][:150]}")
    return ok


def baseline_rows(shape, causal, backward):
    """cuDNN in this process, counted with the same FLOPs as ours."""
    if ARGS.smoke:
        return []
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    flop = W.attention_flops(dense_mask(S, causal), B, H, D, backward=backward)
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")  # noqa
    row = dict(impl="cudnn", S=S, H=H, D=D, causal=causal, backward=backward)
    try:
        if backward:
            def g(q, k, v, do):
                _, pb = jax.vjp(f, q, k, v)
                return pb(do)
            fn, sets = jax.jit(g), qkv_sets(B, S, S, H, H, D, jnp.bfloat16, with_do=True)
        else:
            fn, sets = jax.jit(f), qkv_sets(B, S, S, H, H, D, jnp.bfloat16)
        t = bench(fn, sets)
        row.update(ms=t * 1e3, tflops=tflops(flop, t))
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:600]
    REPORT["baselines"].append(row)
    log(f"baseline cudnn S={S} {'causal' if causal else 'dense'}{' fwd+bwd' if backward else ''}: "
        f"{row.get('ms', float('nan')):.3f} ms")
    return row


@guard("forward", need_s=40)
def phase_fwd():
    shape = main_shape()
    S = shape["S"]
    dense = time_fwd("dense", shape, dense_mask(S, False), fwd_variants())
    causal = time_fwd("causal", shape, dense_mask(S, True), causal_fwd_variants())
    if dense:
        REPORT["best"]["fwd_dense_d128"] = dense[0]
    if causal:
        REPORT["best"]["fwd_causal_d128"] = causal[0]
        # The causal work with the diagonal blocks marked full: what the mask evaluation costs.
        best = FwdConfig(**causal[0]["config"])
        time_fwd("causal-nomask", shape, tril_full_mask(S), {causal[0]["variant"]: best},
                 flop_mask=dense_mask(S, True))
    baseline_rows(shape, False, False)
    baseline_rows(shape, True, False)


# -- phase: backward ---------------------------------------------------------------------------
def _bwd_prep(shape, causal):
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    bm = dense_mask(S, causal)
    sets = qkv_sets(B, S, S, H, H, D, jnp.bfloat16, n=2, with_do=True)
    fwd = jax.jit(lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, **kernel_kw(D)))
    prep = jax.jit(lambda q, k, v, o, lse, do: K.backward_inputs(
        q, k, v, o, lse, do, bm, None, None, None, None, scale=1.0 / math.sqrt(D), softcap=None,
        segments_everywhere=False)[2:])
    P = K.problem(*sets[0][:3], bm, None, None, None, None, scale=1.0 / math.sqrt(D), softcap=None,
                  segments_everywhere=False, kv_permutation=None)
    inputs = []
    for q, k, v, do in sets:
        o, lse = fwd(q, k, v)
        inputs.append(prep(q, k, v, o, lse, do))
    return bm, P, inputs


@guard("backward", need_s=50)
def phase_bwd():
    shape = main_shape()
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    bm, P, inputs = _bwd_prep(shape, False)
    dqs, dkdvs = (SMOKE_DQ, SMOKE_DKDV) if ARGS.smoke else (DQ_VARIANTS, DKDV_VARIANTS)
    flop_pair = 2.0 * W.attention_pairs(bm, B, H) * D  # one [pairs x D] matmul
    jobs = []
    for dq, kw in dqs:
        c = bwd_cfg(dq, dkdvs[0][0], **kw)
        if gate("bwd", D, c, "dq", "bwd dq kernel"):
            continue
        jobs.append((("dq", cfg_str(c).split(" dkv")[0] + "".join(f" {k}={v}" for k, v in kw.items()), c),
                     lambda dqi, dki, c=c: attention_bwd.dq_call(P, c, dqi, dtype=jnp.bfloat16,
                                                                 interpret=ARGS.smoke), inputs[0]))
    for dkdv, kw in dkdvs:
        c = bwd_cfg(dqs[0][0], dkdv, **kw)
        if gate("bwd", D, c, "dkdv", "bwd dkdv kernel"):
            continue
        jobs.append((("dkdv", "dkv" + cfg_str(c).split(" dkv")[1], c),
                     lambda dqi, dki, c=c: attention_bwd.dkdv_call(P, c, dki, k_dtype=jnp.bfloat16,
                                                                   v_dtype=jnp.bfloat16, interpret=ARGS.smoke),
                     inputs[0]))
    best = {}
    for (kernel, label, c), comp in compile_all(jobs).items():
        row = dict(kernel=kernel, label=label, config=dataclasses.asdict(c))
        try:
            if isinstance(comp, Exception):
                raise comp
            t = bench(comp, inputs)
            n_mm = 3 if kernel == "dq" else 4  # matmuls per block pair it runs
            row.update(ms=t * 1e3, tflops_executed=tflops(n_mm * flop_pair, t))
            if kernel not in best or t < best[kernel][0]:
                best[kernel] = (t, c)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:800]
        REPORT["bwd_kernels"].append(row)
        log(f"bwd {kernel:4s} {label:44s} " + (f"{row['ms']:7.3f} ms {row['tflops_executed']:5.0f} TFLOP/s executed"
                                                 if "ms" in row else f"ERROR {row['error'][:120]}"))
    if "dq" not in best or "dkdv" not in best:
        return
    dq_c, kv_c = best["dq"][1], best["dkdv"][1]
    final = dataclasses.replace(
        dq_c, block_q_dkv=kv_c.block_q_dkv, block_kv_dkv=kv_c.block_kv_dkv, warps_dkv=kv_c.warps_dkv,
        stages_dkv=kv_c.stages_dkv, prefetch_index=kv_c.prefetch_index,
        grid_order=dq_c.grid_order if dq_c.grid_order == kv_c.grid_order else "heads_first")
    candidates = {"best pair": final, "r1 best": BwdConfig(128, 128, 8, 2, 64, 64, 4, 2)}
    if ARGS.smoke:
        candidates = {"best pair": final}
    fwd_best = REPORT["best"].get("fwd_dense_d128")
    fcfg = FwdConfig(**fwd_best["config"]) if fwd_best else None
    for causal in (False, True):
        bmc = dense_mask(S, causal)
        flop = W.attention_flops(bmc, B, H, D, backward=True)
        sets = qkv_sets(B, S, S, H, H, D, jnp.bfloat16, n=2, with_do=True)
        fc = fcfg
        if causal and REPORT["best"].get("fwd_causal_d128"):
            fc = FwdConfig(**REPORT["best"]["fwd_causal_d128"]["config"])
        sfx = "_causal" if causal else ""
        if fc is not None and gate("fwd", D, fc, "causal" if causal else "dense", "fwd+bwd forward"):
            fc = None  # the shipped default (round-1 configs)
        cands = {n: bc for n, bc in candidates.items()
                 if not (gate("bwd", D, bc, "dq" + sfx, f"fwd+bwd {n}") or gate("bwd", D, bc, "dkdv" + sfx,
                                                                                f"fwd+bwd {n}"))}

        def mk(bc, fc=fc, bmc=bmc):
            def g(q, k, v, do):
                with cfgs.override(fwd=fc, bwd=bc):
                    _, pb = jax.vjp(lambda q, k, v: sj.block_sparse_attention(q, k, v, bmc, backend="triton",
                                                                              interpret=ARGS.smoke), q, k, v)
                    return pb(do)
            return g
        comp = compile_all([(name, mk(bc), sets[0]) for name, bc in cands.items()])
        for name, c in comp.items():
            row = dict(causal=causal, variant=name, bwd=dataclasses.asdict(candidates[name]),
                       fwd=dataclasses.asdict(fc) if fc else None, label=cfg_str(candidates[name]))
            try:
                if isinstance(c, Exception):
                    raise c
                t = bench(c, sets)
                row.update(ms=t * 1e3, tflops=tflops(flop, t))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:800]
            REPORT["fwd_bwd"].append(row)
            log(f"fwd+bwd {'causal' if causal else 'dense':6s} {name:10s} {row['label']:50s} "
                f"{row.get('ms', float('nan')):7.3f} ms {row.get('tflops') or 0:5.0f} TFLOP/s")
        ok = sorted((r for r in REPORT["fwd_bwd"] if r["causal"] == causal and "ms" in r), key=lambda r: r["ms"])
        if ok:
            REPORT["best"][f"bwd_{'causal' if causal else 'dense'}_d128"] = dict(ok[0], config=ok[0]["bwd"])
        baseline_rows(shape, causal, True)


# -- phase: sparsity ---------------------------------------------------------------------------
@guard("sparsity", need_s=30)
def phase_sparsity():
    best = REPORT["best"].get("fwd_dense_d128")
    cfg = FwdConfig(**best["config"]) if best else cfgs.forward_config(128, jnp.bfloat16, 128, masked=False)
    S = 1024 if ARGS.smoke else 32768
    B, H, D = 1, (2 if ARGS.smoke else 16), (64 if ARGS.smoke else 128)
    if ARGS.smoke:
        cfg = FwdConfig(64, 32, 4, 2)
    nb = S // 128
    sets = qkv_sets(B, S, S, H, H, D, jnp.bfloat16, n=2)
    orders = tuple(o for o in ("heads_first", "tiles_first")
                   if not gate("fwd", main_shape()["D"], dataclasses.replace(cfg, grid_order=o), "dense", "sparsity"))
    fns = {o: jax.jit(lambda q, k, v, bm, c=dataclasses.replace(cfg, grid_order=o):
                      K.forward(q, k, v, bm, None, None, None, None, config=c, **kernel_kw(D))[0]) for o in orders}
    masks_ = [("random", d, random_mask(S, d, seed=int(d * 1000), width=nb)) for d in (1.0, 0.5, 0.2, 0.1, 0.05)]
    masks_.append(("band", 0.5, band_mask(S, 0.5, width=nb)))
    base = {}
    for kind, d, bm in masks_:
        flop = W.attention_flops(bm, B, H, D)
        for o in orders:
            if left() < 12:
                return
            t = bench(lambda q, k, v, bm=bm, o=o: fns[o](q, k, v, bm), sets)
            if d == 1.0:
                base[o] = t
            row = dict(S=S, kind=kind, density_target=d, density=float(bm.density), grid_order=o, ms=t * 1e3,
                       tflops=tflops(flop, t), ratio_to_dense=t / base[o] if o in base else None,
                       goal=(float(bm.density) + 0.05) if d < 1 else None, config=dataclasses.asdict(cfg))
            REPORT["sparsity"].append(row)
            log(f"sparsity {kind:6s} d={bm.density:.3f} {o:11s}: {t * 1e3:7.2f} ms {row['tflops']:5.0f} TFLOP/s "
                f"ratio {row['ratio_to_dense'] or 1:.3f} (goal <= {row['goal'] or 1:.3f})")


# -- phase: FlexAttention on the same mask -------------------------------------------------------
@guard("flex same mask", need_s=45)
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
    fb = REPORT["best"].get("fwd_dense_d128")
    fcfg = FwdConfig(**fb["config"]) if fb else None
    bb = REPORT["best"].get("bwd_dense_d128")
    bcfg = BwdConfig(**bb["config"]) if bb else None
    if fcfg is not None and gate("fwd", D, fcfg, "dense", "flex ours"):
        fcfg = None
    if bcfg is not None and (gate("bwd", D, bcfg, "dq", "flex ours") or gate("bwd", D, bcfg, "dkdv", "flex ours")):
        bcfg = None
    for backward in (False, True):
        if backward and left() < 40:
            break
        flop = W.attention_flops(bm, B, H, D, backward=backward)
        row = dict(S=S, density=float(bm.density), backward=backward)
        try:
            f = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, backend="triton")  # noqa: E731
            if backward:
                def g(q, k, v, do):
                    with cfgs.override(fwd=fcfg, bwd=bcfg):
                        _, pb = jax.vjp(f, q, k, v)
                        return pb(do)
                fn, sets = jax.jit(g), qkv_sets(B, S, S, H, H, D, jnp.bfloat16, with_do=True)
            else:
                def g(q, k, v):
                    with cfgs.override(fwd=fcfg):
                        return f(q, k, v)
                fn, sets = jax.jit(g), qkv_sets(B, S, S, H, H, D, jnp.bfloat16)
            t = bench(fn, sets)
            row.update(ours_ms=t * 1e3, ours_tflops=tflops(flop, t))
        except Exception as e:  # noqa: BLE001
            row["ours_error"] = str(e)[:600]
        try:
            tf = peers_torch.time_flex(B, S, S, H, H, D, jnp.bfloat16, bm, backward=backward)
            row.update(flex_ms=tf.ms, flex_tflops=tflops(flop, tf.median_s))
            if "ours_ms" in row:
                row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = str(e)[:600]
        finally:
            peers_torch.free_memory()
        REPORT["flex"].append(row)
        log(f"flex same mask bwd={backward}: ours {row.get('ours_ms', float('nan')):.3f} ms, flex "
            f"{row.get('flex_ms', float('nan')):.3f} ms, x{row.get('speedup_vs_flex', float('nan')):.2f} "
            f"{row.get('flex_error', '')[:120]}")


# -- phase: decode and GQA prefill ---------------------------------------------------------------
def decode_shape():
    """(D, B, Skv, Hq, Hkv) of the decode timings."""
    return (64, 2, 2048, 8, 2) if ARGS.smoke else (128, 8, 16384, 32, 8)


def decode_mask(Sq, Skv):
    return sj.create_block_mask(masks.bottom_right(masks.causal, Sq, Skv), None, None, Sq, Skv, (16, 128))


def decode_variants(Sq):
    D, _, _, Hq, Hkv = decode_shape()
    variants = {"default": cfgs.forward_config(D, jnp.bfloat16, Sq, group=Hq // Hkv),
                "r1 (16 rows)": FwdConfig(block_q=16, block_kv=64, num_warps=4, num_stages=3)}
    if Sq == 16:
        variants["64 rows bkv128"] = FwdConfig(block_q=64, block_kv=128, num_warps=4, num_stages=3)
        variants["64 rows lazy"] = dataclasses.replace(variants["default"], lazy_rescale=True)
    return variants


@guard("decode / gqa", need_s=20)
def phase_decode():
    s = ARGS.smoke
    D, B, Skv, Hq, Hkv = decode_shape()
    for Sq in (1, 16):
        bm = decode_mask(Sq, Skv)
        sets = qkv_sets(B, Sq, Skv, Hq, Hkv, D, jnp.bfloat16, n=2)
        kv_bytes = 2 * B * Skv * Hkv * D * 2
        variants = gated(decode_variants(Sq), "decode", D, f"decode Sq={Sq}", extra=f":Sq{Sq}")
        jobs = [(n, (lambda c: lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, config=c,
                                                         **kernel_kw(D))[0])(c), sets[0]) for n, c in variants.items()]
        for name, c in compile_all(jobs).items():
            row = dict(case=f"decode Sq={Sq} Skv={Skv} B={B} Hq={Hq} Hkv={Hkv}", variant=name,
                       config=dataclasses.asdict(variants[name]), label=cfg_str(variants[name]))
            try:
                if isinstance(c, Exception):
                    raise c
                t = bench(c, sets)
                row.update(ms=t * 1e3, kv_gbps=kv_bytes / t / 1e9)
            except Exception as e:  # noqa: BLE001
                row["error"] = str(e)[:600]
            REPORT["decode"].append(row)
            log(f"{row['case']} {name:16s} {row['label']:28s} {row.get('ms', float('nan')):.3f} ms "
                f"{row.get('kv_gbps') or 0:.0f} GB/s {row.get('error', '')[:100]}")
    # GQA prefill, causal, with the default config
    S, Hq, Hkv = (256, 8, 1) if s else (8192, 32, 4)
    bm = dense_mask(S, True)
    sets = qkv_sets(1, S, S, Hq, Hkv, D, jnp.bfloat16, n=2)
    flop = W.attention_flops(bm, 1, Hq, D)
    best = REPORT["best"].get("fwd_causal_d128")
    for pack in (False, True):
        c = dataclasses.replace(FwdConfig(**best["config"]) if best and not s else FwdConfig(64, 32, 4, 2),
                                pack_gqa=pack)
        if gate("fwd", D, c, "causal", f"gqa prefill pack={pack}"):
            continue
        fn = jax.jit(lambda q, k, v, c=c: K.forward(q, k, v, bm, None, None, None, None, config=c,
                                                     **kernel_kw(D))[0])
        row = dict(case=f"prefill causal S={S} Hq={Hq} Hkv={Hkv}", variant=f"pack={pack}",
                   config=dataclasses.asdict(c), label=cfg_str(c))
        try:
            t = bench(fn, sets)
            row.update(ms=t * 1e3, tflops=tflops(flop, t))
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e)[:600]
        REPORT["decode"].append(row)
        log(f"{row['case']} pack={pack}: {row.get('ms', float('nan')):.3f} ms {row.get('tflops') or 0:.0f} TFLOP/s")


# -- phase: other head dims ----------------------------------------------------------------------
HEAD_DIM_VARIANTS = {
    64: {"heuristic 128x128/w4/s2": FwdConfig(128, 128, 4, 2), "128x64/w4/s3": FwdConfig(128, 64, 4, 3),
         "r1 heuristic 128x128/w8/s3": FwdConfig(128, 128, 8, 3)},
    256: {"heuristic 64x64/w8/s2": FwdConfig(64, 64, 8, 2), "64x32/w4/s2 (2 CTAs)": FwdConfig(64, 32, 4, 2),
          "128x64/w8/s2": FwdConfig(128, 64, 8, 2)},
}


@guard("head dims 64 / 256", need_s=35)
def phase_head_dims():
    for D, variants in HEAD_DIM_VARIANTS.items():
        if left() < 25:
            break
        shape = dict(main_shape(), D=64 if ARGS.smoke else D)
        if ARGS.smoke:
            variants = {"smoke": FwdConfig(64, 32, 4, 2)}
        best = time_fwd(f"causal D={D}", shape, dense_mask(shape["S"], True), variants)
        if best:
            REPORT["best"][f"fwd_causal_d{D}"] = best[0]
        baseline_rows(shape, True, False)


# -- phase: evidence -----------------------------------------------------------------------------
@guard("evidence", need_s=25)
def phase_evidence():
    from benchmarks import attention_ptx_local as ptx
    out = tempfile.mkdtemp(prefix="bsa_ev_")
    fwds = []
    for key in ("fwd_dense_d128", "fwd_causal_d128"):
        if REPORT["best"].get(key):
            fwds.append(FwdConfig(**REPORT["best"][key]["config"]))
    fwds.append(FwdConfig(128, 64, 4, 2, lazy_rescale=True))
    bb = REPORT["best"].get("bwd_dense_d128")
    bwds = [BwdConfig(**bb["config"])] if bb else [cfgs.backward_config(128, jnp.bfloat16)]
    D = 64 if ARGS.smoke else 128
    ev = {"dir": out}
    try:  # lowering here: the Triton IR XLA compiled in this very process (platform 'gpu')
        ptx.capture(out, D, 1024, "causal", list(dict.fromkeys(fwds)), bwds, platform="cuda" if ARGS.smoke else "gpu")
        ev["captured"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.ttir")))
    except Exception as e:  # noqa: BLE001
        ev["capture_error"] = f"{type(e).__name__}: {e}"[:800]
    try:
        import triton  # noqa: F401  (torch's triton on the GPU machine)
        py = sys.executable
    except Exception:  # noqa: BLE001
        py = os.environ.get("TRITON_PYTHON", sys.executable)
    try:
        from benchmarks import triton_compile
        ev["kernels"], p = triton_compile.run(py, out, timeout=max(20, min(90, left() - 30)))
        ev["compile_tail"] = p.stderr[-1500:]
    except Exception as e:  # noqa: BLE001
        ev["compile_error"] = f"{type(e).__name__}: {e}"[:800]
    for k in ev.get("kernels", []):
        log(f"sass {k['kernel'][:60]}: regs={k.get('regs')} spill={k.get('spill_st')} smem={k.get('smem')} "
            f"ctas/SM={k.get('ctas_per_sm')} wgmma={k.get('wgmma')} loops="
            + "; ".join(f"{lp['instructions']} instr (HGMMA {lp['mix'].get('HGMMA', 0)}, "
                        f"EX2 {lp['mix'].get('MUFU.EX2', 0)}, INT {lp['mix'].get('INT', 0)}, "
                        f"FMUL {lp['mix'].get('FMUL', 0)}, STL/LDL {lp['mix'].get('STL/LDL', 0)})"
                        for lp in k.get("loops", [])[:3]) + (f" ERROR {k['error'][:150]}" if "error" in k else ""))
    REPORT["evidence"] = ev


@guard("xla dump", need_s=30)
def phase_xla_dump():
    if ARGS.smoke:
        return
    best = REPORT["best"].get("fwd_dense_d128")
    REPORT["evidence"]["xla_dump"] = xla_dump_attempt(FwdConfig(**best["config"]) if best else FwdConfig())
    log(f"xla dump: {json.dumps(REPORT['evidence']['xla_dump'])[:600]}")


def xla_dump_attempt(cfg):
    """What XLA itself writes for a Pallas-Triton kernel with emitter dumps on (a child process)."""
    dump = tempfile.mkdtemp(prefix="bsa_xla_")
    flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_emitter_re=.* --xla_gpu_dump_llvmir"
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--dump-child", json.dumps(dataclasses.asdict(cfg))],
                           env=env, capture_output=True, text=True, timeout=max(10, min(45, left() - 10)))
        rc, tail = p.returncode, (p.stdout + p.stderr)[-800:]
    except Exception as e:  # noqa: BLE001
        rc, tail = None, f"{type(e).__name__}: {e}"
    found = {}
    for f in glob.glob(os.path.join(dump, "**", "*"), recursive=True):
        if not os.path.isfile(f) or os.path.getsize(f) > 200_000_000:
            continue
        with open(f, errors="replace") as fh:
            text = fh.read()
        n_wgmma = len(re.findall(r"wgmma\.mma_async|warp_group_dot|nvgpu\.wgmma", text))
        if n_wgmma or f.endswith((".ptx", ".ll", ".ttgir", ".ttir")) or "block_sparse_attention" in text:
            found[os.path.relpath(f, dump)] = dict(bytes=len(text), wgmma=n_wgmma,
                                                  ex2=len(re.findall(r"ex2\.approx", text)),
                                                  cp_async=len(re.findall(r"cp\.async", text)))
    return dict(rc=rc, tail=tail, files=len(glob.glob(os.path.join(dump, "**", "*"), recursive=True)),
                matching=dict(list(found.items())[:30]))


def dump_child(spec):
    cfg = FwdConfig(**json.loads(spec))
    S, H, D = 1024, 4, 128
    bm = dense_mask(S, True)
    q, k, v = qkv_sets(1, S, S, H, H, D, jnp.bfloat16, n=1)[0]
    jax.block_until_ready(jax.jit(lambda q, k, v: K.forward(q, k, v, bm, None, None, None, None, config=cfg,
                                                            **kernel_kw(D)))(q, k, v))


# -- report ------------------------------------------------------------------------------------
def final_table():
    L = []
    ceil = REPORT["meta"].get("ceilings", {}).get("matmul_tflops_bf16")
    L.append(f"device {REPORT['meta'].get('env', {}).get('device')}  jax {jax.__version__}  matmul ceiling "
             f"{ceil and round(ceil)} TFLOP/s  total {RUN.elapsed():.0f}s")
    L += crash_lines()
    L.append("correctness: " + ", ".join(f"{r['case'].split(':')[0]}="
                                         f"{'ok' if r.get('ok') else 'SKIPPED' if r.get('skipped') else 'FAIL'}"
                                         for r in REPORT["correctness"]))
    base = {(r["causal"], r["backward"], r["S"], r["D"]): r.get("ms") for r in REPORT["baselines"]}
    for tag in dict.fromkeys(r["tag"] for r in REPORT["fwd"]):
        rows = sorted((r for r in REPORT["fwd"] if r["tag"] == tag and "ms" in r), key=lambda r: r["ms"])
        cud = base.get((tag != "dense", False, rows[0]["S"], rows[0]["D"])) if rows else None
        L.append(f"fwd {tag} (cuDNN {cud and round(cud, 3)} ms):")
        for r in rows:
            L.append(f"  {r['variant']:38s} {r['ms']:7.3f} ms {r['tflops']:5.0f} TF"
                     + (f"  x{cud / r['ms']:.2f} cuDNN" if cud else ""))
    if REPORT["bwd_kernels"]:
        L.append("bwd kernels (executed TFLOP/s: dQ 3, dK/dV 4 matmuls per block pair):")
        for r in sorted((r for r in REPORT["bwd_kernels"] if "ms" in r), key=lambda r: (r["kernel"], r["ms"])):
            L.append(f"  {r['kernel']:4s} {r['label']:44s} {r['ms']:7.3f} ms {r['tflops_executed']:5.0f}")
    for r in REPORT["fwd_bwd"]:
        if "ms" in r:
            cud = base.get((r["causal"], True, main_shape()["S"], main_shape()["D"]))
            L.append(f"fwd+bwd {'causal' if r['causal'] else 'dense':6s} {r['variant']:9s} {r['ms']:7.3f} ms "
                     f"{r['tflops']:5.0f} TF" + (f"  x{cud / r['ms']:.2f} cuDNN ({cud:.3f} ms)" if cud else ""))
    for r in REPORT["sparsity"]:
        L.append(f"sparsity {r['kind']:6s} d={r['density']:.3f} {r['grid_order']:11s} {r['ms']:7.2f} ms "
                 f"ratio {r['ratio_to_dense'] or 1:.3f} goal {r['goal'] or 1:.3f}")
    for r in REPORT["flex"]:
        L.append(f"flex same mask bwd={r.get('backward')}: ours {r.get('ours_ms', float('nan')):.3f} ms, flex "
                 f"{r.get('flex_ms', float('nan')):.3f} ms, x{r.get('speedup_vs_flex', float('nan')):.2f}")
    for r in REPORT["decode"]:
        if "ms" in r:
            L.append(f"{r['case'][:38]:38s} {r['variant']:16s} {r['label'][:28]:28s} {r['ms']:.3f} ms "
                     f"{r.get('kv_gbps') or r.get('tflops') or 0:.0f} {'GB/s' if 'kv_gbps' in r else 'TF'}")
    for k in (REPORT.get("evidence") or {}).get("kernels", []):
        loops = k.get("loops", [])
        L.append(f"sass {k['kernel'][:52]:52s} regs={k.get('regs')} spill={k.get('spill_st')} smem={k.get('smem')} "
                 f"ctas/SM={k.get('ctas_per_sm')} loop0={loops[0]['instructions'] if loops else None}")
    L.append("winners (for attention_configs.TUNED_*):")
    for key, r in REPORT["best"].items():
        kind = "FwdConfig" if key.startswith("fwd") else "BwdConfig"
        L.append(f"  {key}: {kind}(**{r['config']})  # {r.get('ms', float('nan')):.3f} ms")
    L.append(f"errors: {len(REPORT['errors'])}  json {os.path.join(OUT, 'tune_attention.json')}")
    return "\n".join(L)


def crash_lines():
    """The compiler-crash evidence, first in the table: precheck outcome, crashes with their
    child logs, worker deaths (supervisor), and what the phases skipped because of them."""
    L = []
    pc = REPORT.get("precheck") or {}
    if pc:
        L.append(f"precheck (child-process compiles): {pc.get('compiles')} compiles in {pc.get('wall_s')}s, "
                 f"{pc.get('parallel')} children at a time: {pc.get('counts')}")
        logs = {c.get("blamed"): c.get("log") for c in pc.get("children", []) if c.get("blamed")}
        for line in pc.get("crashes", []):
            L.append(f"  !! COMPILER {line}  (log {logs.get(line.rsplit(':', 1)[0])})")
        for line in pc.get("failures", [])[:8]:
            L.append(f"  fail {line[:160]}")
    for c in REPORT.get("crashes", []):
        L.append(f"!! WORKER DIED {c.get('signal')} in phase {c.get('phase')!r}"
                 + (f" during a {c['in_compile']['threads']}-thread compile" if c.get("in_compile") else "")
                 + f" at {c.get('at_s')}s -> {c.get('action')}  (stacks: {c.get('faulthandler')})")
    for r in REPORT.get("skipped", []):
        L.append(f"  !! skipped {r['where']}: {r['label']} ({r['reason'][:90]})")
    return L


def start_watchdog():
    """Past the budget (+15 s) print what has been measured and exit, whatever is running
    (a torch.compile that will not finish must not take the run past its slot)."""
    def fire():
        print(f"\n[watchdog] {RUN.elapsed():.0f}s: budget exceeded; partial results", flush=True)
        faulthandler.dump_traceback(all_threads=True)  # what was still running
        try:
            save()
            print("\n" + final_table(), flush=True)
        finally:
            os._exit(0)
    timer = threading.Timer(ARGS.budget_s + 15 - RUN.elapsed(), fire)
    timer.daemon = True
    timer.start()


def load_report():
    try:
        with open(os.path.join(OUT, "tune_attention.json")) as f:
            REPORT.update(json.load(f))
    except (OSError, ValueError):
        pass


def supervise(argv):
    """Run the measurements in a worker process; when it dies (a signal: a compiler crash
    the precheck did not predict, or a crash at run time) record where, print its stacks
    (faulthandler file), resume the remaining phases in a new worker while the budget lasts,
    and print the table from the saved JSON if no worker could."""
    faulthandler.enable(all_threads=True)
    t0 = time.time()
    fh_path = os.path.join(OUT, "tune_attention_faulthandler.txt")
    os.makedirs(OUT, exist_ok=True)
    for stale in (os.path.join(OUT, "tune_attention.json"), fh_path):
        if os.path.exists(stale):
            os.remove(stale)
    extra, attempt = [], 0
    while True:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", "--t0", repr(t0), *extra]
        p = subprocess.Popen(cmd)
        try:
            rc = p.wait(timeout=max(5.0, ARGS.budget_s + 18 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        if rc == 0:
            return
        load_report()
        meta = REPORT["meta"]
        crash = dict(attempt=attempt, rc=rc, signal=signal_name(rc) if isinstance(rc, int) else rc,
                     phase=meta.get("current_phase"), in_compile=meta.get("in_compile"),
                     at_s=round(time.time() - t0, 1), faulthandler=fh_path)
        print(f"\n[supervisor] !! worker {attempt} died: {crash['signal']} in phase {crash['phase']!r}"
              + (f" inside a {crash['in_compile']['threads']}-thread compile of {crash['in_compile']['jobs']}"
                 if crash["in_compile"] else "") + f" at {crash['at_s']}s; stacks:", flush=True)
        try:
            with open(fh_path, errors="replace") as f:
                print(f.read()[-6000:], file=sys.stderr, flush=True)
        except OSError:
            pass
        left_s = ARGS.budget_s - (time.time() - t0)
        threaded = bool(crash["in_compile"]) and crash["in_compile"]["threads"] > 1
        if rc == "timeout" or attempt >= 2 or left_s < 40 or (crash["phase"] is None and attempt):
            crash["action"] = "stop"
        elif crash["phase"] is None:
            crash["action"] = "start again"  # died before the phases (precheck / ceilings)
        elif threaded and "--compile-threads" not in extra:
            # The precheck compiled each of these alone without a crash (else they were skipped):
            # suspect concurrent compiles; retry the phase with one compile thread.
            crash["action"] = "retry phase with 1 compile thread"
            extra = ["--compile-threads", "1"]
        else:
            crash["action"] = "skip phase, resume"
            meta.setdefault("crashed_phases", []).append(crash["phase"])
        REPORT["crashes"].append(crash)
        meta["in_compile"] = None
        save()
        print(f"[supervisor] action: {crash['action']} ({left_s:.0f}s of budget left)", flush=True)
        if crash["action"] == "stop":
            break
        attempt += 1
        extra = [a for a in extra if a != "--resume"] + ["--resume"]
    print("\n" + final_table(), flush=True)


def worker():
    RUN.start = time.monotonic() - (time.time() - ARGS.t0)
    fh = open(os.path.join(OUT, "tune_attention_faulthandler.txt"), "a")
    fh.write(f"--- worker pid {os.getpid()} at {time.time() - ARGS.t0:.1f}s ---\n")
    fh.flush()
    faulthandler.enable(file=fh, all_threads=True)  # the supervisor prints it to stderr
    sim = os.environ.get(SIM_ENV, "")
    if ARGS.resume:
        load_report()
        log(f"resumed: done {REPORT['meta'].get('done')}, crashed {REPORT['meta'].get('crashed_phases')}, "
            f"compile threads {ARGS.compile_threads}")
    pre = None
    if not REPORT.get("precheck") and ARGS.precheck_s > 0:
        pre = run_precheck()  # children compile while this process measures the ceilings
    if not REPORT["meta"].get("env"):
        REPORT["meta"]["env"] = timing.environment()
        REPORT["meta"]["argv"] = sys.argv
        try:
            REPORT["meta"]["ceilings"] = timing.ceilings(quick=ARGS.smoke)
        except Exception as e:  # noqa: BLE001
            REPORT["meta"]["ceilings"] = {"error": str(e)}
        log(f"env {REPORT['meta']['env'].get('device')} ceilings {REPORT['meta']['ceilings']}")
    if pre is not None:
        REPORT["precheck"] = pre.finish()
        save()
    phases = {"correctness": phase_correctness, "fwd": phase_fwd, "bwd": phase_bwd, "sparsity": phase_sparsity,
              "flex": phase_flex, "decode": phase_decode, "head_dims": phase_head_dims, "evidence": phase_evidence,
              "xla_dump": phase_xla_dump}
    start_watchdog()
    meta = REPORT["meta"]
    for name in ARGS.phases.split(","):
        if name in meta.setdefault("done", []) or name in meta.get("crashed_phases", []):
            continue
        meta["current_phase"] = name
        save()
        if sim == f"phase:{name}" and not ARGS.resume:
            os.kill(os.getpid(), signal.SIGSEGV)
        phases[name]()
        meta["done"].append(name)
    meta["current_phase"] = None
    save()
    print("\n" + final_table(), flush=True)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, interpret mode")
    ap.add_argument("--phases", default="correctness,fwd,bwd,sparsity,decode,evidence,flex,head_dims,xla_dump")
    ap.add_argument("--compile-threads", type=int, default=None,
                    help="threads compiling a phase's variants (default 8 as in round 1; smoke 1)")
    ap.add_argument("--precheck-s", type=float, default=55.0, help="budget of the child-process compile check "
                                                                   "(0: none)")
    ap.add_argument("--precheck-parallel", type=int, default=8)
    ap.add_argument("--no-supervisor", action="store_true", help="measure in this process (no crash recovery)")
    ap.add_argument("--dump-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    ARGS = ap.parse_args()
    RUN.budget_s = ARGS.budget_s
    if ARGS.dump_child is not None:
        ARGS.smoke = False
        dump_child(ARGS.dump_child)
        return
    if ARGS.compile_child is not None:
        compile_child(ARGS.compile_child)
        return
    if ARGS.smoke:
        ARGS.budget_s = RUN.budget_s = max(ARGS.budget_s, 1500.0)
        ARGS.precheck_s = max(ARGS.precheck_s, 600.0) if ARGS.precheck_s else 0.0
    if ARGS.worker:
        worker()
    elif ARGS.no_supervisor:
        ARGS.t0 = time.time()
        worker()
    else:
        supervise(sys.argv[1:])


if __name__ == "__main__":
    main()
