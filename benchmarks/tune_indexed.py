#!/usr/bin/env python3
"""Indexed attention and indexers on one GPU (Pallas-Triton): compiled correctness, a small variant
sweep and the timings of ``benchmarks/notes/indexed_attention.md``. One self-contained run (< 5 min).

    PYTHONPATH=. python benchmarks/tune_indexed.py [--budget-s 280]
    PYTHONPATH=. python benchmarks/tune_indexed.py --smoke     # CPU: tiny shapes, interpret mode

Phases, in this order (each skipped once the budget is spent; the JSON is rewritten after each):
  1. correctness, compiled, vs the xla reference: token lists (G = 1, 4, 16, 64; f32 and bf16;
     repeats, -1 / out-of-range slots, empty rows) forward + dq/dk/dv; block lists, both loop
     orders; flat indexer exact (incl. a saturated tile) and hierarchical vs its reference;
  2. (run last) token forward / backward launch sweep (BN x warps x stages) at Skv=32K, Hq=64 / Hkv=1;
  3. token timings: topk=2048, Skv = 32K, 64K, 128K, Hq=64/Hkv=1 and Hq=32/Hkv=8, fwd and
     fwd+bwd, TFLOP/s over selected pairs; the cost of set semantics (unique_indices=False);
  4. block lists (16 x 64): query- vs kv-major at G=16 and G=4, kv-major rows sweep, beside the
     dense block-sparse kernel and cuDNN (same heads, S=4096) in this process;
  5. indexers: flat vs hierarchical at 32K, 64K, 128K (speed-up, IoU random / clustered),
     the flat indexer's candidates sweep and its stage breakdown, indexer vs attention time.

Writes ``$OUT/tune_indexed.json`` (OUT defaults to /tmp) and prints a compact table last.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import indexed as suite  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.triton import indexed_attention as K  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
START = time.monotonic()
ARGS = None
REPORT: dict = {"meta": {}, "correctness": [], "sweep": [], "token": [], "block": [], "indexer": [], "errors": []}
ROWS: list[tuple] = []  # the compact table


def left() -> float:
    return ARGS.budget_s - (time.monotonic() - START)


def save():
    with open(os.path.join(OUT, "tune_indexed.json"), "w") as f:
        json.dump(REPORT, f, indent=1, default=str)


def guarded(phase):
    def wrap(fn):
        def run(*a, **kw):
            if left() < 10:
                REPORT["errors"].append(f"{phase}: skipped (budget)")
                return None
            t0 = time.monotonic()
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001
                REPORT["errors"].append(f"{phase}: {type(e).__name__}: {e}"[:2000])
                traceback.print_exc()
            finally:
                REPORT.setdefault("phase_s", {})[phase] = round(time.monotonic() - t0, 1)
                save()
        return run
    return wrap


def rnd(seed, shape, dtype):
    return timing.random_normal(seed, shape, dtype)


def bench(fn, make, iters=None):
    iters = iters or (2 if ARGS.smoke else 10)
    t = timing.time_fn(fn, make, warmup=1 if ARGS.smoke else 2, iters=iters, rotations=2)
    return t.ms, t.spread


def kw_backend():
    return dict(backend="triton", interpret=ARGS.smoke)


# ------------------------------------------------------------------------------ 1. correctness
def rel(a, b):
    a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_op(name, op, q, k, v, idx, do, tol, **kw):
    def run(backend, interpret=False):
        f = lambda q, k, v: op(q, k, v, idx, backend=backend, interpret=interpret, return_lse=True, **kw)
        (o, lse), vjp = jax.vjp(jax.jit(f), q, k, v)
        return (o, lse) + tuple(vjp((do, jnp.zeros_like(lse))))
    got = run("triton", ARGS.smoke)
    want = run("xla")
    errs = {n: rel(g, w) for n, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want) if n != "lse"}
    lse_ok = bool(np.array_equal(np.isneginf(np.asarray(got[1])), np.isneginf(np.asarray(want[1]))))
    ok = all(e <= tol for e in errs.values()) and lse_ok
    REPORT["correctness"].append(dict(case=name, ok=ok, tol=tol, lse_empty_rows_match=lse_ok, **errs))
    ROWS.append(("correct", name, "ok" if ok else "FAIL", " ".join(f"{n}={e:.1e}" for n, e in errs.items())))


@guarded("correctness")
def correctness():
    s = ARGS.smoke
    B, Sq, Skv, D = (1, 4, 40, 32) if s else (2, 64, 1000, 128)
    rng = np.random.default_rng(0)
    for G, Hkv, dtype in ((1, 2, jnp.float32), (4, 2, jnp.bfloat16), (16, 1, jnp.float32), (64, 1, jnp.bfloat16)):
        if s and G == 64:
            continue
        n = 8 if s else 300
        Hq = G * Hkv
        q, k, v, do = (rnd(i, shp, dtype) for i, shp in enumerate(((B, Sq, Hq, D), (B, Skv, Hkv, D),
                                                                   (B, Skv, Hkv, D), (B, Sq, Hq, D))))
        idx = rng.integers(-3, Skv + 3, size=(B, Sq, Hkv, n)).astype(np.int32)
        idx[..., 1] = idx[..., 0]
        idx[0, 0] = -1
        tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
        check_op(f"token G={G} Hkv={Hkv} {jnp.dtype(dtype).name}", sj.indexed_attention, q, k, v, jnp.asarray(idx),
                 do, tol)
    for G, Hkv, order in ((2, 2, "kv"), (4, 2, "query"), (16, 1, "query"), (16, 1, "kv")):
        bs, n = (8, 3) if s else (64, 6)
        Hq = G * Hkv
        dtype = jnp.bfloat16
        q, k, v, do = (rnd(10 + i, shp, dtype) for i, shp in enumerate(((B, Sq, Hq, D), (B, Skv, Hkv, D),
                                                                        (B, Skv, Hkv, D), (B, Sq, Hq, D))))
        nb = -(-Skv // bs)
        idx = rng.integers(-1, nb + 1, size=(B, Sq, Hkv, n)).astype(np.int32)
        idx[0, 0] = -1
        check_op(f"block G={G} {order}", sj.indexed_block_attention, q, k, v, jnp.asarray(idx), do, 2e-2,
                 block_size=bs, loop_order=order)
    # Indexers.
    Sq_i, Skv_i, Hi, Di, topk = (6, 128, 2, 16, 12) if s else (64, 4096, 8, 64, 256)
    q = rnd(20, (1, Sq_i, Hi, Di), jnp.float32)
    k = rnd(21, (1, Skv_i, Di), jnp.float32)
    w = jnp.abs(rnd(22, (1, Sq_i, Hi), jnp.float32)) + 0.1
    u = rnd(23, (Di,), jnp.float32)
    q, k = q + 4 * u / jnp.linalg.norm(u), k.at[:, 32:64].add(6 * u / jnp.linalg.norm(u))  # a saturated tile
    for causal in (True, False):
        want = sj.reference.indexed.lightning_indexer(q, k, w, topk, causal=causal)
        got = sj.lightning_indexer(q, k, w, topk, causal=causal, tile_size=32, tile_candidates=4 if s else 8,
                                   **kw_backend())
        same = bool(np.array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1)))
        REPORT["correctness"].append(dict(case=f"flat indexer causal={causal}", ok=same))
        ROWS.append(("correct", f"flat indexer causal={causal}", "ok" if same else "FAIL", "exact sets"))
        nblk = max(8, 2 * topk // 16)
        hw = sj.reference.indexed.hierarchical_indexer(q, k, w, topk, block_size=16, num_blocks=nblk, causal=causal)
        hg = sj.hierarchical_indexer(q, k, w, topk, block_size=16, num_blocks=nblk, causal=causal, **kw_backend())
        same = bool(np.array_equal(np.sort(np.asarray(hg), -1), np.sort(np.asarray(hw), -1)))
        REPORT["correctness"].append(dict(case=f"hierarchical indexer causal={causal}", ok=same))
        ROWS.append(("correct", f"hierarchical indexer causal={causal}", "ok" if same else "FAIL", "= reference"))


# ------------------------------------------------------------------------------ 2./3. token lists
def token_case(Skv, Hq, Hkv, D=None):
    z = suite.sizes(ARGS.smoke)
    B, Sq, topk, D, dtype = z["B"], z["Sq"], z["topk"], D or z["D"], z["dtype"]
    idx = suite.stratified_indices(jax.random.key(Skv), B, Sq, Hkv, topk, Skv, q_offset=Skv - Sq)

    def make(i, backward=False):
        x = (rnd(10 * i, (B, Sq, Hq, D), dtype), rnd(10 * i + 1, (B, Skv, Hkv, D), dtype),
             rnd(10 * i + 2, (B, Skv, Hkv, D), dtype), idx)
        return x + ((rnd(10 * i + 3, (B, Sq, Hq, D), dtype),) if backward else ())
    return make, float(B * Sq * Hq * topk), D


@guarded("sweep")
def sweep():
    z = suite.sizes(ARGS.smoke)
    Skv = z["Skvs"][0]
    Hq, Hkv = z["heads"][0]
    make, pairs, D = token_case(Skv, Hq, Hkv)
    configs = {False: [(32, 4, 2), (64, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3)],
               True: [(32, 4, 2), (64, 4, 2), (64, 8, 2)]}
    for backward in (False, True):
        best = None
        for bn, w, st in configs[backward][:2] if ARGS.smoke else configs[backward]:
            if left() < 20:
                return
            try:
                with K.config_override(BN=bn, num_warps=w, num_stages=st):
                    fn = suite.attention_fn("token", backward, unique_indices=True, **kw_backend())
                    ms, spread = bench(fn, lambda i: make(i, backward), iters=5)
                tf = suite.pair_flops(pairs, D, D, backward) / ms / 1e9
                row = dict(backward=backward, BN=bn, warps=w, stages=st, ms=ms, tflops=tf, spread=spread)
                best = row if best is None or ms < best["ms"] else best
            except Exception as e:  # noqa: BLE001
                row = dict(backward=backward, BN=bn, warps=w, stages=st, error=f"{type(e).__name__}: {e}"[:300])
            REPORT["sweep"].append(row)
        if best:
            ROWS.append(("sweep", f"token {'fwd+bwd' if backward else 'fwd'} Skv={Skv} Hq={Hq}/Hkv={Hkv} best",
                         f"{best['ms']:.3f} ms", f"{best['tflops']:.0f} TF/s BN={best['BN']} w={best['warps']} "
                                                 f"st={best['stages']}"))


@guarded("token")
def token_timings():
    z = suite.sizes(ARGS.smoke)
    for Skv in z["Skvs"]:
        for Hq, Hkv in z["heads"]:
            make, pairs, D = token_case(Skv, Hq, Hkv)
            for backward in (False, True):
                if left() < 45:
                    return
                fn = suite.attention_fn("token", backward, unique_indices=True, **kw_backend())
                ms, spread = bench(fn, lambda i: make(i, backward))
                tf = suite.pair_flops(pairs, D, D, backward) / ms / 1e9
                REPORT["token"].append(dict(Skv=Skv, Hq=Hq, Hkv=Hkv, backward=backward, ms=ms, tflops=tf,
                                            spread=spread))
                ROWS.append(("token", f"Skv={Skv} Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd'}",
                             f"{ms:.3f} ms", f"{tf:.0f} TF/s"))
            if Skv == z["Skvs"][0] and Hkv == 1:  # the price of set semantics (sort + dedupe)
                fn = suite.attention_fn("token", False, unique_indices=False, **kw_backend())
                ms, _ = bench(fn, make)
                REPORT["token"].append(dict(Skv=Skv, Hq=Hq, Hkv=Hkv, backward=False, unique_indices=False, ms=ms))
                ROWS.append(("token", f"Skv={Skv} Hq={Hq}/Hkv={Hkv} fwd, unique_indices=False", f"{ms:.3f} ms",
                             "sort+dedupe included"))


# ------------------------------------------------------------------------------ 4. block lists
@guarded("block")
def block_timings():
    z = suite.sizes(ARGS.smoke)
    B, Sq, D, dtype = z["B"], z["Sq"], z["D"], z["dtype"]
    Skv, n, bs = z["Skvs"][0], z["n_blocks"], z["block"]
    for Hq, Hkv in z["block_heads"]:
        idx = suite.random_blocks(jax.random.key(Hq), B, Sq, Hkv, n, Skv, bs, q_offset=Skv - Sq)
        pairs = float(B * Sq * Hq * n * bs)

        def make(i, backward=False, S=Skv, Sqq=Sq, with_idx=True):
            x = (rnd(10 * i, (B, Sqq, Hq, D), dtype), rnd(10 * i + 1, (B, S, Hkv, D), dtype),
                 rnd(10 * i + 2, (B, S, Hkv, D), dtype)) + ((idx,) if with_idx else ())
            return x + ((rnd(10 * i + 3, (B, Sqq, Hq, D), dtype),) if backward else ())

        dense = {}
        for backward in (False, True):
            S = Sq
            bm = sj.create_block_mask(sj.masks.full, None, None, S, S, block_size=128)
            base = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, **kw_backend())
            cud = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            for impl, f in (("block_sparse_dense", base), ("cudnn", cud)):
                if impl == "cudnn" and ARGS.smoke:
                    continue
                fn = jax.jit(f) if not backward else jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
                try:  # a failing baseline must not cost the indexed timings
                    ms, _ = bench(fn, lambda i: make(i, backward, S=S, Sqq=S, with_idx=False))
                except Exception as e:  # noqa: BLE001
                    REPORT["errors"].append(f"block baseline {impl}: {type(e).__name__}: {e}"[:600])
                    continue
                tf = suite.pair_flops(float(B * Hq * S * S), D, D, backward) / ms / 1e9
                dense[(impl, backward)] = tf
                REPORT["block"].append(dict(impl=impl, Hq=Hq, Hkv=Hkv, S=S, backward=backward, ms=ms, tflops=tf))
                ROWS.append(("block", f"{impl} S={S} Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd'}",
                             f"{ms:.3f} ms", f"{tf:.0f} TF/s"))
            for order in ("query", "kv"):
                rows_opts = (None,) if order == "query" else (None, 32, 128)
                for rows in rows_opts:
                    if left() < 40:
                        return
                    ctx = K.config_override(rows=rows) if rows else K.config_override()
                    with ctx:
                        fn = suite.attention_fn("block", backward, block_size=bs, loop_order=order, **kw_backend())
                        ms, spread = bench(fn, lambda i: make(i, backward))
                    tf = suite.pair_flops(pairs, D, D, backward) / ms / 1e9
                    ratio = tf / dense.get(("block_sparse_dense", backward), float("nan"))
                    REPORT["block"].append(dict(impl=f"indexed/{order}", rows=rows, Hq=Hq, Hkv=Hkv, Skv=Skv, n=n,
                                                block=bs, backward=backward, ms=ms, tflops=tf,
                                                vs_dense_block_sparse=ratio, spread=spread))
                    ROWS.append(("block", f"{order}{'' if rows is None else f' rows={rows}'} Skv={Skv} "
                                 f"Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd'}", f"{ms:.3f} ms",
                                 f"{tf:.0f} TF/s = {ratio:.0%} of dense (goal 60%)"))


# ------------------------------------------------------------------------------ 5. indexers
@guarded("indexer")
def indexer_timings():
    z = suite.sizes(ARGS.smoke)
    B, Sq, Hi, Di, topk, dtype = z["B"], z["Sq"], z["Hi"], z["Di"], z["topk"], z["dtype"]
    attn = {r["Skv"]: r["ms"] for r in REPORT["token"] if r.get("Hkv") == 1 and not r["backward"]
            and r.get("unique_indices", True)}
    for Skv in z["Skvs"]:
        if left() < 40:
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
                     + (f"; flat = {fms / attn[Skv]:.1f}x attention" if Skv in attn else "")))
        if Skv == z["Skvs"][0]:  # candidates sweep and stage breakdown at the shortest length
            for cands in (16, 32, 64):
                if left() < 30:
                    return
                f = jax.jit(lambda q, k, w, c=cands: sj.lightning_indexer(q, k, w, topk, tile_candidates=c,
                                                                         **kw_backend()))
                ms, _ = bench(f, make, iters=5)
                REPORT["indexer"].append(dict(Skv=Skv, tile_candidates=cands, flat_ms=ms))
                ROWS.append(("indexer", f"Skv={Skv} flat tile_candidates={cands}", f"{ms:.2f} ms", ""))
            from pallas_kernels.triton import indexer as KI
            t_abs = jnp.broadcast_to(jnp.arange(Sq, dtype=jnp.int32) + Skv - Sq, (B, Sq))
            tiles = jax.jit(lambda q, k, w: KI.tile_candidates(q, k, w, t_abs, tile=128, cands=32, causal=True,
                                                               interpret=ARGS.smoke))
            ms_tiles, _ = bench(tiles, make, iters=5)
            vals, idx = tiles(q, k, w)
            topk_fn = jax.jit(lambda v: jax.lax.top_k(v.reshape(B, Sq, -1), topk))
            ms_topk, _ = bench(topk_fn, lambda i: (vals,), iters=5)
            REPORT["indexer"].append(dict(Skv=Skv, stage="tile kernel", ms=ms_tiles,
                                          score_tflops=2.0 * B * Sq * Skv * Hi * Di / ms_tiles / 1e9))
            REPORT["indexer"].append(dict(Skv=Skv, stage="top_k over candidates", ms=ms_topk))
            ROWS.append(("indexer", f"Skv={Skv} flat stages: tile kernel / top_k", f"{ms_tiles:.2f} / {ms_topk:.2f} ms",
                         f"{2.0 * B * Sq * Skv * Hi * Di / ms_tiles / 1e9:.0f} TF/s in the tile kernel"))


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=280.0)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Pallas interpret mode")
    ARGS = p.parse_args()
    REPORT["meta"] = dict(environment=timing.environment(), smoke=ARGS.smoke, budget_s=ARGS.budget_s)
    if not ARGS.smoke and jax.default_backend() != "gpu":
        raise SystemExit("tune_indexed.py needs a GPU (or --smoke)")
    correctness()
    token_timings()
    block_timings()
    indexer_timings()
    sweep()  # last: the least important when the budget runs short
    REPORT["meta"]["total_s"] = round(time.monotonic() - START, 1)
    save()
    print(f"\n== tune_indexed ({REPORT['meta']['total_s']} s; JSON: {os.path.join(OUT, 'tune_indexed.json')})")
    for e in REPORT["errors"]:
        print("ERROR", e[:300])
    for r in ROWS:
        print(f"{r[0]:8s} | {r[1]:58s} | {r[2]:>18s} | {r[3]}")


if __name__ == "__main__":
    main()
