#!/usr/bin/env python3
"""Indexed attention and indexers on one GPU (Pallas-Triton), round 2: compiled correctness first,
then the timings of ``benchmarks/notes/indexed_attention.md``. One self-contained run (< 5 min).

    PYTHONPATH=. python benchmarks/tune_indexed.py [--budget-s 270]
    PYTHONPATH=. python benchmarks/tune_indexed.py --smoke     # CPU: tiny shapes, interpret mode

Phases, in this order (each stops adding cases when its share of the budget is spent; the JSON
is rewritten after each):
  1. correctness, compiled: flat indexer exact (ragged query block, a saturated tile) and
     hierarchical = its reference (round 1 could not compile them); then vs the xla reference,
     forward + dq/dk/dv: round 1's failures (token G=1 / G=4, block G=4 query-major), padded
     heads and head dims (G=3, D=96, D=192), query tiles (T=2, 4, 8 over ragged Sq), relaxed vs
     acquire-release atomics, both loop orders; kv-major backward bitwise deterministic;
  2. token lists, topk=2048: Skv = 32K, 128K, Hq=64/Hkv=1 and Hq=32/Hkv=8, fwd and fwd+bwd; at
     32K MLA: relaxed vs acquire-release atomics, backward launch variants, query_tile=2 on random
     and on correlated lists (with the measured reuse), the cost of set semantics;
  3. block lists (16 x 64, Skv=32K) at G=16 and G=4: query-major T=1 / default tile / larger tile
     and kv-major, on uniform random blocks and on correlated (NSA-like) selections, beside the
     dense block-sparse kernel and cuDNN (same heads, S=4096);
  4. indexers: flat vs hierarchical at 32K and 128K (speed-up, IoU random / clustered), the flat
     indexer's stage breakdown and candidates sweep;
  5. forward launch sweep (BN x warps) at 32K MLA, if time is left.

Writes ``$OUT/tune_indexed.json`` (OUT defaults to /tmp) and prints a compact table last.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import indexed as suite  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun  # noqa: E402
from pallas_kernels.triton import indexed_attention as K  # noqa: E402

ARGS = None
REPORT: dict = {"meta": {"round": 2}, "correctness": [], "token": [], "block": [], "indexer": [], "sweep": [],
                "errors": []}
ROWS: list[tuple] = []  # the compact table
# Fraction of the budget by which each phase must have finished adding cases.
RUN = TuneRun("tune_indexed", REPORT,
              phase_end={"correctness": 0.40, "token": 0.60, "block": 0.84, "indexer": 0.97, "sweep": 1.0})
phase_open = RUN.open


def guarded(phase):
    return RUN.guard(phase, 0.0)


def rnd(seed, shape, dtype):
    return timing.random_normal(seed, shape, dtype)


def bench(fn, make, iters=None):
    iters = iters or (2 if ARGS.smoke else 8)
    t = timing.time_fn(fn, make, warmup=1 if ARGS.smoke else 2, iters=iters, rotations=2)
    return t.ms, t.spread


def kw_backend():
    return dict(backend="triton", interpret=ARGS.smoke)


def attention_fn(kind, backward, cfg=None, **kw):
    """A fresh jitted function traced under ``K.config_override(**cfg)`` (jit caches by function)."""
    fn = suite.attention_fn(kind, backward, **kw_backend(), **kw)
    if not cfg:
        return fn

    def traced(*a):
        with K.config_override(**cfg):
            return fn(*a)
    return traced


# ------------------------------------------------------------------------------ 1. correctness
def rel(a, b):
    a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_op(name, op, q, k, v, idx, do, tol, cfg=None, **kw):
    def run(backend, interpret=False):
        f = lambda q, k, v: op(q, k, v, idx, backend=backend, interpret=interpret, return_lse=True, **kw)

        def both(q, k, v, do):
            (o, lse), vjp = jax.vjp(f, q, k, v)
            return (o, lse) + tuple(vjp((do, jnp.zeros_like(lse))))
        with K.config_override(**(cfg or {})):
            return jax.jit(both)(q, k, v, do)
    t0 = time.monotonic()
    got = run("triton", ARGS.smoke)
    want = run("xla")
    errs = {n: rel(g, w) for n, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want) if n != "lse"}
    lse_ok = bool(np.array_equal(np.isneginf(np.asarray(got[1])), np.isneginf(np.asarray(want[1]))))
    ok = all(e <= tol for e in errs.values()) and lse_ok
    REPORT["correctness"].append(dict(case=name, ok=ok, tol=tol, lse_empty_rows_match=lse_ok,
                                      seconds=round(time.monotonic() - t0, 1), **errs))
    ROWS.append(("correct", name, "ok" if ok else "FAIL", " ".join(f"{n}={e:.1e}" for n, e in errs.items())
                 + ("" if lse_ok else " lse -inf pattern differs")))


def _token_case(G, Hkv, dtype, D, Dv, seed):
    s = ARGS.smoke
    B, Sq, Skv, n = (1, 5, 40, 8) if s else (2, 100, 1000, 300)
    Hq = G * Hkv
    q, k, v, do = (rnd(seed + i, shp, dtype) for i, shp in enumerate(((B, Sq, Hq, D), (B, Skv, Hkv, D),
                                                                      (B, Skv, Hkv, Dv), (B, Sq, Hq, Dv))))
    rng = np.random.default_rng(seed)
    idx = rng.integers(-3, Skv + 3, size=(B, Sq, Hkv, n)).astype(np.int32)
    idx[..., 1] = idx[..., 0]
    idx[..., 2] = 2**31 - 1
    idx[0, 0] = -1
    return q, k, v, jnp.asarray(idx), do


def _block_case(G, Hkv, seed):
    s = ARGS.smoke
    B, Sq, Skv, D = (1, 5, 40, 32) if s else (2, 100, 1000, 128)
    bs, n = (8, 3) if s else (64, 6)
    dtype = jnp.bfloat16
    Hq = G * Hkv
    q, k, v, do = (rnd(seed + i, shp, dtype) for i, shp in enumerate(((B, Sq, Hq, D), (B, Skv, Hkv, D),
                                                                      (B, Skv, Hkv, D), (B, Sq, Hq, D))))
    nb = -(-Skv // bs)
    idx = np.random.default_rng(seed).integers(-1, nb + 1, size=(B, Sq, Hkv, n)).astype(np.int32)
    idx[0, 0] = -1
    return (q, k, v, jnp.asarray(idx), do), bs


@guarded("correctness")
def correctness():
    indexers()  # round 1 could not compile them: first
    s = ARGS.smoke
    f32, bf16 = jnp.float32, jnp.bfloat16
    D = 32 if s else 128
    token_cases = [  # (name, G, Hkv, dtype, D, Dv, kwargs, config)
        ("token G=1 Hkv=2 float32 (round 1 FAIL)", 1, 2, f32, D, D, {}, None),
        ("token G=4 Hkv=2 bf16 (round 1 FAIL)", 4, 2, bf16, D, D, {}, None),
        ("token G=3 Hkv=2 bf16 D=96 Dv=64 query_tile=2", 3, 2, bf16, 96, 64, dict(query_tile=2), None),
        ("token G=16 Hkv=1 float32 D=192 Dv=128", 16, 1, f32, 192, 128, {}, None),
        ("token G=64 Hkv=1 bf16", 64, 1, bf16, D, D, {}, None),
        ("token G=64 Hkv=1 bf16 acquire-release atomics", 64, 1, bf16, D, D, {}, dict(relaxed_atomics=False)),
    ]
    for i, (name, G, Hkv, dtype, Dq, Dv, kw, cfg) in enumerate(token_cases):
        if s and G == 64:
            continue
        if not phase_open("correctness", 8):
            return
        q, k, v, idx, do = _token_case(G, Hkv, dtype, Dq if not s else min(Dq, 48), Dv if not s else min(Dv, 32),
                                       seed=100 * i)
        tol = 2e-2 if dtype == bf16 else 3e-3
        check_op(name, sj.indexed_attention, q, k, v, idx, do, tol, cfg, **kw)
    block_cases = [  # (name, G, Hkv, loop order, query tile)
        ("block G=4 query T=1 (round 1 FAIL)", 4, 2, "query", 1),
        ("block G=4 query T=8 (default tile)", 4, 2, "query", None),
        ("block G=16 query T=4 (default tile)", 16, 1, "query", None),
        ("block G=2 kv", 2, 2, "kv", None),
        ("block G=64 query T=1 (round-7 launch)", 64, 1, "query", 1),
        ("block G=128 query T=1 (round-7 launch)", 128, 1, "query", 1),
    ]
    for i, (name, G, Hkv, order, T) in enumerate(block_cases):
        if not phase_open("correctness", 8):
            return
        (q, k, v, idx, do), bs = _block_case(G, Hkv, seed=1000 + 10 * i)
        check_op(name, sj.indexed_block_attention, q, k, v, idx, do, 2e-2, block_size=bs, loop_order=order,
                 query_tile=T)
    if not s and phase_open("correctness", 8):  # kv-major backward: bitwise equal run to run
        (q, k, v, idx, do), bs = _block_case(2, 2, seed=7)
        f = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: sj.indexed_block_attention(
            q, k, v, idx, block_size=bs, loop_order="kv", **kw_backend()), q, k, v)[1](do))
        a, b = f(q, k, v, do), f(q, k, v, do)
        same = all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b))
        REPORT["correctness"].append(dict(case="block kv-major backward deterministic", ok=same))
        ROWS.append(("correct", "block kv-major backward bitwise deterministic", "ok" if same else "FAIL", ""))


def indexers():
    s = ARGS.smoke
    B, Sq_i, Skv_i, Hi, Di, topk = (1, 6, 128, 2, 16, 12) if s else (2, 100, 4096, 8, 64, 256)
    q = rnd(20, (B, Sq_i, Hi, Di), jnp.float32)
    k = rnd(21, (B, Skv_i, Di), jnp.float32)
    w = jnp.abs(rnd(22, (B, Sq_i, Hi), jnp.float32)) + 0.1
    u = rnd(23, (Di,), jnp.float32)
    q, k = q + 4 * u / jnp.linalg.norm(u), k.at[:, 32:64].add(6 * u / jnp.linalg.norm(u))  # a saturated tile
    scores = np.asarray(sj.reference.indexed.lightning_scores(q, k, w))
    # float32 dots compile to tf32 on the GPU: near-tied keys may swap (tests/test_indexers.py)
    tol = 0.0 if s else 2e-3 * float(np.abs(scores).max())
    for causal in (True, False):
        if not phase_open("correctness", 5):
            return
        want = sj.reference.indexed.lightning_indexer(q, k, w, topk, causal=causal)
        got = jax.jit(lambda q, k, w: sj.lightning_indexer(q, k, w, topk, causal=causal, tile_size=32,
                                                           tile_candidates=4 if s else 8, **kw_backend()))(q, k, w)
        same = sj.reference.indexed.same_topk(got, want, scores, atol=tol)
        REPORT["correctness"].append(dict(case=f"flat indexer causal={causal}", ok=same))
        ROWS.append(("correct", f"flat indexer causal={causal} (Sq={Sq_i}: ragged 64-query block)",
                     "ok" if same else "FAIL", f"a top-k within {tol:.1e} (tf32 near-ties)"))
    for causal in (True, False):
        if not phase_open("correctness", 5):
            return
        nblk = max(8, 2 * topk // 16)
        hw = sj.reference.indexed.hierarchical_indexer(q, k, w, topk, block_size=16, num_blocks=nblk, causal=causal)
        hg = jax.jit(lambda q, k, w: sj.hierarchical_indexer(q, k, w, topk, block_size=16, num_blocks=nblk,
                                                             causal=causal, **kw_backend()))(q, k, w)
        same = sj.reference.indexed.same_topk(hg, hw, scores, atol=tol)
        REPORT["correctness"].append(dict(case=f"hierarchical indexer causal={causal}", ok=same))
        ROWS.append(("correct", f"hierarchical indexer causal={causal}", "ok" if same else "FAIL",
                     f"= reference within {tol:.1e}"))


# ------------------------------------------------------------------------------ 2. token lists
def token_make(Skv, Hq, Hkv, idx):
    z = suite.sizes(ARGS.smoke)
    B, Sq, D, dtype = z["B"], z["Sq"], z["D"], z["dtype"]

    def make(i, backward=False):
        x = (rnd(10 * i, (B, Sq, Hq, D), dtype), rnd(10 * i + 1, (B, Skv, Hkv, D), dtype),
             rnd(10 * i + 2, (B, Skv, Hkv, D), dtype), idx)
        return x + ((rnd(10 * i + 3, (B, Sq, Hq, D), dtype),) if backward else ())
    return make, float(B * Sq * Hq * z["topk"]), D


def token_row(label, Skv, Hq, Hkv, idx, backward, cfg=None, extra=None, **kw):
    make, pairs, D = token_make(Skv, Hq, Hkv, idx)
    fn = attention_fn("token", backward, cfg, unique_indices=True, **kw)
    ms, spread = bench(fn, lambda i: make(i, backward), iters=5 if backward else None)
    tf = suite.pair_flops(pairs, D, D, backward) / ms / 1e9
    REPORT["token"].append(dict(label=label, Skv=Skv, Hq=Hq, Hkv=Hkv, backward=backward, ms=ms, tflops=tf,
                                spread=spread, config=cfg, **kw, **(extra or {})))
    ROWS.append(("token", f"{label} Skv={Skv} Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd'}", f"{ms:.3f} ms",
                 f"{tf:.0f} TF/s" + (f" ({extra['note']})" if extra and "note" in extra else "")))
    return ms


@guarded("token")
def token_timings():
    z = suite.sizes(ARGS.smoke)
    B, Sq, topk = z["B"], z["Sq"], z["topk"]
    Skvs = tuple(dict.fromkeys((z["Skvs"][0], z["Skvs"][-1])))
    for Skv in Skvs:
        for Hq, Hkv in z["heads"]:
            idx = suite.stratified_indices(jax.random.key(Skv), B, Sq, Hkv, topk, Skv, q_offset=Skv - Sq)
            for backward in (False, True):
                if not phase_open("token", 12 if backward and Hkv > 1 else 6):
                    return
                token_row("default", Skv, Hq, Hkv, idx, backward)
    Skv = Skvs[0]
    (Hq, Hkv) = z["heads"][0]
    idx = suite.stratified_indices(jax.random.key(Skv), B, Sq, Hkv, topk, Skv, q_offset=Skv - Sq)
    variants = [("acquire-release atomics", True, dict(relaxed_atomics=False), {}),
                ("bwd BN=32 w=4", True, dict(bwd_BN=32, bwd_warps=4), {}),
                ("bwd BN=64 w=8", True, dict(bwd_BN=64, bwd_warps=8), {}),
                ("query_tile=2 random lists", True, None, dict(query_tile=2))]
    for label, backward, cfg, kw in variants:
        if not phase_open("token", 8):
            return
        token_row(label, Skv, Hq, Hkv, idx, backward, cfg, **kw)
    corr = suite.correlated_tokens(jax.random.key(3), B, Sq, Hkv, topk, Skv, q_offset=Skv - Sq)
    reuse = suite.tile_reuse(corr, 2)
    for T in (1, 2):
        for backward in (False, True):
            if not phase_open("token", 8):
                return
            token_row(f"correlated lists query_tile={T}", Skv, Hq, Hkv, corr, backward, None,
                      extra=dict(reuse_T2=reuse, note=f"reuse at T=2: {reuse:.2f}"), query_tile=T)
    if phase_open("token", 5):  # the price of set semantics (sort + dedupe)
        make, _, _ = token_make(Skv, Hq, Hkv, idx)
        fn = attention_fn("token", False, unique_indices=False)
        ms, _ = bench(fn, make)
        REPORT["token"].append(dict(label="unique_indices=False", Skv=Skv, Hq=Hq, Hkv=Hkv, backward=False, ms=ms))
        ROWS.append(("token", f"unique_indices=False Skv={Skv} Hq={Hq}/Hkv={Hkv} fwd", f"{ms:.3f} ms",
                     "sort+dedupe included"))


# ------------------------------------------------------------------------------ 3. block lists
def _block_heads(default):
    """(Hq, Hkv) pairs of the block phases: ``--block-heads`` ('64:1,128:1') or ``default``."""
    if not ARGS.block_heads:
        return default
    return tuple(tuple(int(x) for x in pair.split(":")) for pair in ARGS.block_heads.split(","))


def _dense_baselines(section, label, Hq, Hkv, z):
    """Our dense kernel and cuDNN at S = Sq with the same heads, forward and fwd+bwd (the
    ratios' denominators and the peer, from the same process): {(impl, backward): TF/s}."""
    B, S, D, dtype = z["B"], z["Sq"], z["D"], z["dtype"]
    bm = sj.create_block_mask(sj.masks.full, None, None, S, S, block_size=128)
    base = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, **kw_backend())  # noqa: E731
    cud = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")  # noqa: E731

    def make(i, backward):
        return tuple(rnd(10 * i + j, (B, S, Hq if j in (0, 3) else Hkv, D), dtype) for j in range(4 if backward else 3))

    dense = {}
    for backward in (False, True):
        for impl, f in (("block_sparse_dense", base), ("cudnn", cud)):
            if (impl == "cudnn" and ARGS.smoke) or not phase_open(section, 6):
                continue
            fn = jax.jit(f) if not backward else jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
            try:  # a failing baseline must not cost the indexed timings
                ms, _ = bench(fn, lambda i, b=backward: make(i, b))
            except Exception as e:  # noqa: BLE001
                REPORT["errors"].append(f"{section} baseline {impl}: {type(e).__name__}: {e}"[:600])
                continue
            tf = suite.pair_flops(float(B * Hq * S * S), D, D, backward) / ms / 1e9
            dense[(impl, backward)] = tf
            REPORT.setdefault(section, []).append(dict(impl=impl, Hq=Hq, Hkv=Hkv, S=S, backward=backward, ms=ms,
                                                       tflops=tf))
            ROWS.append((label, f"{impl} S={S} Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd'}",
                         f"{ms:.3f} ms", f"{tf:.0f} TF/s"))
    return dense


@guarded("block")
def block_timings():
    z = suite.sizes(ARGS.smoke)
    B, Sq, D, dtype = z["B"], z["Sq"], z["D"], z["dtype"]
    Skv, n, bs = z["Skvs"][0], z["n_blocks"], z["block"]
    for Hq, Hkv in _block_heads(z["block_heads"]):
        G = Hq // Hkv
        pairs = float(B * Sq * Hq * n * bs)
        lists = {"random": suite.random_blocks(jax.random.key(Hq), B, Sq, Hkv, n, Skv, bs, q_offset=Skv - Sq),
                 "correlated": suite.correlated_blocks(jax.random.key(Hq + 1), B, Sq, Hkv, n, Skv, bs,
                                                       q_offset=Skv - Sq)}
        T_def = K.default_query_tile(G, bs)
        T_big = min(16, 2 * T_def) if G < 16 else 8
        reuse = {name: {T: suite.tile_reuse(idx, T) for T in sorted({T_def, T_big})} for name, idx in lists.items()}
        REPORT["block"].append(dict(Hq=Hq, Hkv=Hkv, tile_reuse=reuse))

        def make(i, backward=False, idx=None):
            x = (rnd(10 * i, (B, Sq, Hq, D), dtype), rnd(10 * i + 1, (B, Skv, Hkv, D), dtype),
                 rnd(10 * i + 2, (B, Skv, Hkv, D), dtype)) + ((idx,) if idx is not None else ())
            return x + ((rnd(10 * i + 3, (B, Sq, Hq, D), dtype),) if backward else ())

        dense = _dense_baselines("block", "block", Hq, Hkv, z)
        # (selection, loop order, query tile, with backward too)
        variants = [("random", "query", 1, True, None), ("random", "query", T_def, True, None),
                    ("random", "kv", None, True, None), ("correlated", "query", 1, False, None),
                    ("correlated", "query", T_def, True, None), ("correlated", "query", T_big, False, None),
                    ("correlated", "kv", None, True, None), ("random", "kv", None, True, dict(rows=64, bwd_rows=32))]
        for backward in (False, True):
            for sel, order, T, with_bwd, cfg in variants:
                if backward and not with_bwd:
                    continue
                if not phase_open("block", 10 if backward else 5):
                    return
                fn = attention_fn("block", backward, cfg, block_size=bs, loop_order=order,
                                  **({"query_tile": T} if order == "query" else {}))
                ms, spread = bench(fn, lambda i: make(i, backward, idx=lists[sel]), iters=5 if backward else None)
                tf = suite.pair_flops(pairs, D, D, backward) / ms / 1e9
                ratio = tf / dense.get(("block_sparse_dense", backward), float("nan"))
                label = f"{sel} {order}" + (f" T={T}" if order == "query" else "") + (
                    f" rows={cfg['rows']}/{cfg['bwd_rows']}" if cfg else "")
                REPORT["block"].append(dict(impl=f"indexed/{order}", selection=sel, query_tile=T, config=cfg, Hq=Hq,
                                            Hkv=Hkv, Skv=Skv, n=n, block=bs, backward=backward, ms=ms, tflops=tf,
                                            vs_dense_block_sparse=ratio, spread=spread))
                ROWS.append(("block", f"{label} Skv={Skv} Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd'}",
                             f"{ms:.3f} ms", f"{tf:.0f} TF/s = {ratio:.0%} of dense (goal 60%)"
                             + (f"; reuse {reuse[sel].get(T, 0):.1f}" if order == "query" and T and T > 1 else "")))


# ------------------------------------------------------------------------------ 4. indexers
@guarded("indexer")
def indexer_timings():
    z = suite.sizes(ARGS.smoke)
    B, Sq, Hi, Di, topk, dtype = z["B"], z["Sq"], z["Hi"], z["Di"], z["topk"], z["dtype"]
    attn = {r["Skv"]: r["ms"] for r in REPORT["token"] if r.get("Hkv") == 1 and not r["backward"]
            and r.get("label") == "default"}
    for Skv in dict.fromkeys((z["Skvs"][0], z["Skvs"][-1])):
        if not phase_open("indexer", 20):
            return
        make = lambda i, Skv=Skv: (rnd(10 * i, (B, Sq, Hi, Di), dtype), rnd(10 * i + 1, (B, Skv, Di), dtype),
                                   jnp.abs(rnd(10 * i + 2, (B, Sq, Hi), jnp.float32)))
        flat = jax.jit(lambda q, k, w: sj.lightning_indexer(q, k, w, topk, **kw_backend()))
        hier = jax.jit(lambda q, k, w: sj.hierarchical_indexer(q, k, w, topk, **kw_backend()))
        fms, _ = bench(flat, make, iters=5)
        hms, _ = bench(hier, make, iters=5)
        q, k, w = make(0)
        iou_r = float(jnp.mean(sj.indexers.topk_overlap(flat(q, k, w), hier(q, k, w))))
        qc, kc, wc = suite.clustered_indexer_inputs(jax.random.key(5), B, Sq, Skv, Hi, Di, 64, dtype)
        iou_c = float(jnp.mean(sj.indexers.topk_overlap(flat(qc, kc, wc), hier(qc, kc, wc))))
        tf = 2.0 * B * Sq * Skv * Hi * Di / fms / 1e9
        row = dict(Skv=Skv, flat_ms=fms, hier_ms=hms, speedup=fms / hms, iou_random=iou_r, iou_clustered=iou_c,
                   flat_score_tflops=tf, flat_vs_attention=fms / attn[Skv] if Skv in attn else None)
        REPORT["indexer"].append(row)
        ROWS.append(("indexer", f"Skv={Skv} flat / hierarchical", f"{fms:.2f} / {hms:.2f} ms",
                     f"x{fms / hms:.1f} (goal x{4 if Skv >= 131072 else 2}) IoU rnd {iou_r:.2f} clus {iou_c:.2f}"
                     + (f"; flat = {fms / attn[Skv]:.1f}x attention fwd" if Skv in attn else "")))
        if Skv != z["Skvs"][0]:
            continue
        from pallas_kernels.triton import indexer as KI
        t_abs = jnp.broadcast_to(jnp.arange(Sq, dtype=jnp.int32) + Skv - Sq, (B, Sq))
        tiles = jax.jit(lambda q, k, w: KI.tile_candidates(q, k, w, t_abs, tile=128, cands=32, causal=True,
                                                           interpret=ARGS.smoke))
        ms_tiles, _ = bench(tiles, make, iters=5)
        vals, _ = tiles(q, k, w)
        topk_fn = jax.jit(lambda v: jax.lax.top_k(v.reshape(B, Sq, -1), topk))
        ms_topk, _ = bench(topk_fn, lambda i: (vals,), iters=5)
        score_tf = 2.0 * B * Sq * Skv * Hi * Di / ms_tiles / 1e9
        REPORT["indexer"].append(dict(Skv=Skv, stage="tile kernel", ms=ms_tiles, score_tflops=score_tf))
        REPORT["indexer"].append(dict(Skv=Skv, stage="top_k over candidates", ms=ms_topk))
        ROWS.append(("indexer", f"Skv={Skv} flat stages: tile kernel / top_k", f"{ms_tiles:.2f} / {ms_topk:.2f} ms",
                     f"{score_tf:.0f} TF/s in the tile kernel"))
        for cands in (16, 64):
            if not phase_open("indexer", 10):
                return
            f = jax.jit(lambda q, k, w, c=cands: sj.lightning_indexer(q, k, w, topk, tile_candidates=c,
                                                                     **kw_backend()))
            ms, _ = bench(f, make, iters=5)
            REPORT["indexer"].append(dict(Skv=Skv, tile_candidates=cands, flat_ms=ms))
            ROWS.append(("indexer", f"Skv={Skv} flat tile_candidates={cands} (default 32)", f"{ms:.2f} ms", ""))


# ------------------------------------------------------------------------------ 5. forward sweep
@guarded("sweep")
def sweep():
    z = suite.sizes(ARGS.smoke)
    Skv = z["Skvs"][0]
    Hq, Hkv = z["heads"][0]
    idx = suite.stratified_indices(jax.random.key(Skv), z["B"], z["Sq"], Hkv, z["topk"], Skv, q_offset=Skv - z["Sq"])
    for bn, w in ((32, 4), (128, 4)):
        if not phase_open("sweep", 8):
            return
        try:
            token_row(f"fwd BN={bn} w={w}", Skv, Hq, Hkv, idx, False, dict(BN=bn, num_warps=w))
        except Exception as e:  # noqa: BLE001
            REPORT["errors"].append(f"sweep BN={bn} w={w}: {type(e).__name__}: {e}"[:300])


# ------------------------------------------------------------------------------ 6. block-list launch sweep
# Round 7: query-major block lists at G = 64 / 128 (DSA-size groups, 16 x 64-token blocks) reached
# 53-59 % of the dense kernel on the round-1 launch rule (BN=64, 4 warps, 2 stages at M=64); the
# token kernel's best launch at the same M differed (BN=32). (BN, warps, stages) forward,
# (bwd_BN, bwd_warps) backward; None = the shipped rule.
BLOCK_FWD = (None, (32, 4, 2), (32, 4, 3), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2))
BLOCK_BWD = (None, (32, 4), (64, 8), (32, 8))


@guarded("block_sweep")
def block_sweep():
    z = suite.sizes(ARGS.smoke)
    B, Sq, D, dtype = z["B"], z["Sq"], z["D"], z["dtype"]
    Skv, n, bs = z["Skvs"][0], z["n_blocks"], z["block"]
    for Hq, Hkv in _block_heads(((64, 1), (128, 1))):
        idx = suite.random_blocks(jax.random.key(Hq), B, Sq, Hkv, n, Skv, bs, q_offset=Skv - Sq)
        pairs = float(B * Sq * Hq * n * bs)

        def make(i, backward=False):
            x = (rnd(10 * i, (B, Sq, Hq, D), dtype), rnd(10 * i + 1, (B, Skv, Hkv, D), dtype),
                 rnd(10 * i + 2, (B, Skv, Hkv, D), dtype), idx)
            return x + ((rnd(10 * i + 3, (B, Sq, Hq, D), dtype),) if backward else ())

        dense = _dense_baselines("block_sweep", "bsweep", Hq, Hkv, z)
        runs = [(False, None if c is None else dict(BN=c[0], num_warps=c[1], num_stages=c[2])) for c in BLOCK_FWD]
        runs += [(True, None if c is None else dict(bwd_BN=c[0], bwd_warps=c[1])) for c in BLOCK_BWD]
        for backward, cfg in runs:
            if not phase_open("block_sweep", 8):
                return
            row = dict(Hq=Hq, Hkv=Hkv, Skv=Skv, backward=backward, config=cfg)
            try:
                fn = attention_fn("block", backward, cfg, block_size=bs, loop_order="query", query_tile=1)
                row["ms"], row["spread"] = bench(fn, lambda i: make(i, backward), iters=5 if backward else None)
                row["tflops"] = suite.pair_flops(pairs, D, D, backward) / row["ms"] / 1e9
                for impl in ("block_sparse_dense", "cudnn"):
                    row[f"vs_{impl}"] = row["tflops"] / dense.get((impl, backward), float("nan"))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            REPORT.setdefault("block_sweep", []).append(row)
            ROWS.append(("bsweep", f"G={Hq // Hkv} {'fwd+bwd' if backward else 'fwd'} {cfg or 'default'}",
                         f"{row.get('ms', float('nan')):.3f} ms",
                         f"ERR {row['error'][:80]}" if "error" in row else
                         f"{row['tflops']:.0f} TF/s = {row['vs_block_sparse_dense']:.0%} of our dense, "
                         f"{row['vs_cudnn']:.0%} of cuDNN"))


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=270.0)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Pallas interpret mode")
    p.add_argument("--phases", default="correctness,token,block,indexer,sweep")
    p.add_argument("--block-heads", default=None,
                   help="(Hq:Hkv) pairs of the block and block_sweep phases, e.g. '64:1,128:1' (defaults: the suite's (64:4, 32:8) and (64:1, 128:1))")
    ARGS = p.parse_args()
    RUN.budget_s = ARGS.budget_s
    REPORT["meta"].update(environment=timing.environment(), smoke=ARGS.smoke, budget_s=ARGS.budget_s)
    if not ARGS.smoke and jax.default_backend() != "gpu":
        raise SystemExit("tune_indexed.py needs a GPU (or --smoke)")
    phases = ARGS.phases.split(",")
    for name, fn in (("correctness", correctness), ("token", token_timings), ("block", block_timings),
                     ("indexer", indexer_timings), ("sweep", sweep), ("block_sweep", block_sweep)):
        if name in phases:
            fn()
    REPORT["meta"]["total_s"] = round(RUN.elapsed(), 1)
    RUN.save()
    print(f"\n== tune_indexed round 2 ({REPORT['meta']['total_s']} s; JSON: {os.path.join(RUN.out, 'tune_indexed.json')})")
    for e in REPORT["errors"]:
        print("ERROR", str(e)[:300])
    for r in ROWS:
        print(f"{r[0]:8s} | {r[1]:64s} | {r[2]:>18s} | {r[3]}")


if __name__ == "__main__":
    main()
