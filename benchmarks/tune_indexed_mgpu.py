#!/usr/bin/env python3
"""Block-list attention (NSA's selected branch) with the Mosaic GPU forward
(``pallas_kernels/mosaic_gpu/indexed_block_fwd.py``) on one Hopper GPU, beside the Triton
query-major forward, our dense block-sparse kernel (Mosaic GPU forward on Hopper) and cuDNN with
the same heads. One self-contained run (<= ``--budget-s``).

    OUT=/tmp PYTHONPATH=. python benchmarks/tune_indexed_mgpu.py [--heads 64:1,128:1] [--skvs 32768,131072]

For each (Hq, Hkv) and selection (uniform random blocks; correlated, NSA-like): Sq = 4096 queries at
the end of Skv keys, 16 blocks of 64, D = Dv = 128, bf16; TF/s over the selected pairs (every
listed block counted whole, as in ``benchmarks/indexed.py``):
  * agreement of the Mosaic GPU forward with the Triton forward on these lists (o, lse);
  * forward: Triton (the default loop order: query-major from 32 heads per kv head, else kv-major),
    Mosaic GPU default (query tiles of 64 / G tokens below 64 heads) and launch variants (ring
    depth, keys per step, ping-pong, registers);
  * forward + backward (the backward is Triton's default loop order in both);
  * dense baselines at S = Sq: our block_sparse_attention (each forward) and cuDNN, fwd and fwd+bwd.

Writes ``$OUT/tune_indexed_mgpu.json``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import contextlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import indexed as suite  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun, env_choice, rel_err  # noqa: E402
from pallas_kernels.mosaic_gpu import indexed_block_fwd as mib  # noqa: E402
from pallas_kernels.triton import block_sparse_attention as dense_entry  # noqa: E402
from pallas_kernels.triton import indexed_attention as idx_entry  # noqa: E402

ARGS = None
REPORT: dict = {"meta": {}, "agreement": [], "indexed": [], "dense": [], "errors": []}
RUN = TuneRun("tune_indexed_mgpu", REPORT)
left, log, save = RUN.left, RUN.log, RUN.save

B, SQ, D, N_BLOCKS, SPAN, DTYPE = 1, 4096, 128, 16, 64, jnp.bfloat16
VARIANTS = {  # name -> MgpuIndexedConfig (None: the default)
    "default": None,
    "no_pingpong": mib.MgpuIndexedConfig(pingpong=False),
    "keys64_steps2": mib.MgpuIndexedConfig(step_keys=64, steps=2),
    "keys64_steps4": mib.MgpuIndexedConfig(step_keys=64, steps=4),
    "regs_216_56": mib.MgpuIndexedConfig(compute_regs=216, memory_regs=56),
}


def compiled(fn, *, indexed_impl=None, dense_impl=None, config=None):
    """fn jitted and traced under the given forward choices (a fresh wrapper: jit caches by function)."""
    jf = jax.jit(lambda *a: fn(*a))

    def call(*a):
        with env_choice(idx_entry.FWD_IMPL_ENV, indexed_impl), env_choice(dense_entry.FWD_IMPL_ENV, dense_impl):
            with (mib.override(config) if config is not None else contextlib.nullcontext()):
                return jf(*a)
    return call


def rnd(seed, shape):
    return timing.random_normal(seed, shape, DTYPE)


def bench_ms(fn, make, iters=8):
    t = timing.time_fn(fn, make, warmup=2, iters=iters, rotations=2)
    return t.ms, t.spread


def vjp_of(f):
    return lambda q, k, v, *rest: jax.vjp(lambda q, k, v: f(q, k, v, *rest[:-1]), q, k, v)[1](rest[-1])


def dense_baselines(Hq, Hkv):
    """{(impl, backward): TF/s} of dense attention at S = Sq with these heads."""
    bm = sj.create_block_mask(sj.masks.full, None, None, SQ, SQ, block_size=128)
    ours = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, backend="triton")  # noqa: E731
    cud = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")  # noqa: E731
    out = {}
    for backward in (False, True):
        def make(i, backward=backward):
            return tuple(rnd(10 * i + j, (B, SQ, Hq if j in (0, 3) else Hkv, D)) for j in range(4 if backward else 3))
        for name, f, dimpl in (("dense_mosaic_gpu", ours, "mosaic_gpu"), ("dense_triton", ours, "triton"),
                               ("cudnn", cud, None)):
            if left() < 20:
                return out
            try:
                fn = compiled(vjp_of(f) if backward else f, dense_impl=dimpl)
                ms, spread = bench_ms(fn, make)
            except Exception as e:  # noqa: BLE001
                REPORT["errors"].append(f"dense {name} Hq={Hq} bwd={backward}: {type(e).__name__}: {e}"[:500])
                continue
            tf = suite.pair_flops(float(B * Hq * SQ * SQ), D, D, backward) / ms / 1e9
            out[(name, backward)] = tf
            REPORT["dense"].append(dict(impl=name, Hq=Hq, Hkv=Hkv, S=SQ, backward=backward, ms=ms, spread=spread,
                                        tflops=tf))
            log(f"dense {name:17s} Hq={Hq}/Hkv={Hkv} {'fwd+bwd' if backward else 'fwd':7s} {ms:8.3f} ms {tf:6.0f} TF/s")
    return out


def lists_for(sel, Hq, Hkv, Skv):
    make = suite.random_blocks if sel == "random" else suite.correlated_blocks
    return make(jax.random.key(Hq + (sel == "correlated")), B, SQ, Hkv, N_BLOCKS, Skv, SPAN, q_offset=Skv - SQ)


def indexed_case(Hq, Hkv, Skv, sel, dense):
    idx = lists_for(sel, Hq, Hkv, Skv)
    op = lambda q, k, v, idx: sj.indexed_block_attention(q, k, v, idx, block_size=SPAN,  # noqa: E731
                                                         backend="triton")  # default loop order
    pairs = float(B * SQ * Hq * N_BLOCKS * SPAN)

    def make(i, backward=False):
        x = (rnd(10 * i, (B, SQ, Hq, D)), rnd(10 * i + 1, (B, Skv, Hkv, D)), rnd(10 * i + 2, (B, Skv, Hkv, D)), idx)
        return x + ((rnd(10 * i + 3, (B, SQ, Hq, D)),) if backward else ())

    # agreement on these lists (the compiled tests cover edge cases at small sizes)
    q, k, v, _ = make(0)
    with_lse = lambda q, k, v, idx: sj.indexed_block_attention(q, k, v, idx, block_size=SPAN,  # noqa: E731
                                                               backend="triton", return_lse=True)
    try:
        o_t, l_t = compiled(with_lse, indexed_impl="triton")(q, k, v, idx)
        o_m, l_m = compiled(with_lse, indexed_impl="mosaic_gpu")(q, k, v, idx)
        row = dict(Hq=Hq, Hkv=Hkv, Skv=Skv, selection=sel, o_rel=rel_err(o_m, o_t), lse_rel=rel_err(l_m, l_t),
                   nan=int(np.isnan(np.asarray(o_m, np.float32)).sum()))
        row["ok"] = row["o_rel"] < 1e-2 and row["lse_rel"] < 1e-3 and row["nan"] == 0
    except Exception as e:  # noqa: BLE001
        row = dict(Hq=Hq, Hkv=Hkv, Skv=Skv, selection=sel, ok=False, error=f"{type(e).__name__}: {e}"[:800])
    REPORT["agreement"].append(row)
    log(f"agree  G={Hq // Hkv} Hkv={Hkv} {sel:10s} {row}")
    if not row["ok"]:
        return

    runs = [(False, "triton", None)] + [(False, "mosaic_gpu", name) for name in VARIANTS]
    runs += [(True, "triton", None), (True, "mosaic_gpu", "default")]
    for backward, impl, variant in runs:
        if left() < 15:
            return
        if impl == "mosaic_gpu" and variant != "default" and (Skv != ARGS.skvs[0] or sel != "random"):
            continue  # launch variants once per head shape
        rec = dict(Hq=Hq, Hkv=Hkv, Skv=Skv, selection=sel, backward=backward, impl=impl, variant=variant)
        try:
            fn = compiled(vjp_of(op) if backward else op, indexed_impl=impl, config=VARIANTS.get(variant))
            rec["ms"], rec["spread"] = bench_ms(fn, lambda i: make(i, backward), iters=5 if backward else 8)
            rec["tflops"] = suite.pair_flops(pairs, D, D, backward) / rec["ms"] / 1e9
            for base in ("dense_mosaic_gpu", "dense_triton", "cudnn"):
                rec[f"vs_{base}"] = rec["tflops"] / dense.get((base, backward), float("nan"))
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
        REPORT["indexed"].append(rec)
        if "error" in rec:
            log(f"ERROR {rec}")
        else:
            log(f"idx G={Hq // Hkv:3d} Hkv={Hkv} Skv={Skv:6d} {sel:10s} {'fwd+bwd' if backward else 'fwd':7s} "
                f"{impl:10s} {variant or '':14s} {rec['ms']:8.3f} ms {rec['tflops']:6.0f} TF/s "
                f"= {rec['vs_dense_mosaic_gpu']:.0%} of dense (Mosaic GPU), {rec['vs_cudnn']:.0%} of cuDNN")
        save()


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--heads", default="64:1,128:1,64:4")
    p.add_argument("--skvs", default="32768,131072")
    p.add_argument("--selections", default="random,correlated")
    ARGS = p.parse_args()
    ARGS.skvs = [int(s) for s in ARGS.skvs.split(",")]
    RUN.budget_s = ARGS.budget_s
    REPORT["meta"].update(environment=timing.environment(), args=vars(ARGS))
    if jax.default_backend() != "gpu":
        raise SystemExit("tune_indexed_mgpu.py needs a GPU")
    for pair in ARGS.heads.split(","):
        Hq, Hkv = (int(x) for x in pair.split(":"))
        dense = dense_baselines(Hq, Hkv)
        for Skv in ARGS.skvs:
            for sel in ARGS.selections.split(","):
                indexed_case(Hq, Hkv, Skv, sel, dense)
    save()
    print(f"== done in {RUN.elapsed():.0f} s; errors: {len(REPORT['errors'])}")
    for e in REPORT["errors"]:
        print("ERROR", e[:300])


if __name__ == "__main__":
    main()
