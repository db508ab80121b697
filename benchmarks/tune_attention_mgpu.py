#!/usr/bin/env python3
"""The Mosaic GPU block-sparse forward (``pallas_kernels/mosaic_gpu/attention_fwd.py``) on one
Hopper GPU: compiled correctness against the xla reference, then its time beside our Triton
forward, cuDNN and JAX's ``attention_mgpu``, and PBS prefill end to end with either forward.
One self-contained run (<= ``--budget-s``).

    OUT=/tmp PYTHONPATH=. python benchmarks/tune_attention_mgpu.py --phases correctness,dense,pbs

Phases (``--phases``):
  correctness: dense, causal, windows, a band that leaves whole rows and whole query blocks
     empty, random block tables per kv head, batch 2, fp16 D=64, PBS (physical layout, kv
     positions; and permuted queries, q positions): o and lse vs the xla backend (f32 inputs
     cast from the same bf16 values), NaN count, and the gradients with the Mosaic GPU forward
     under the Triton backward.
  dense: B=1 S=8192 H=16 D=128 bf16, non-causal and causal, fwd and fwd+bwd; launch variants
     (ring depth 2/3, query-block order); random block tables at 32K (density 0.2, 0.1).
  pbs_stage: the kernel stage of PBS alone (folded layout, tau 0.8 tables) with each forward and
     launch variant, beside the same kernel's dense causal rate on that layout.
  pbs: PBS prefill at ``--pbs-sizes`` (B=1, Hq=32, Hkv=8, D=128, block 128, segment 1024,
     ``--taus``): end to end with each forward, and cuDNN dense causal.

Writes ``$OUT/tune_attention_mgpu.json``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_jax as sj  # noqa: E402
from benchmarks import flops as W  # noqa: E402
from benchmarks import selection as bench_sel  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun, env_choice, rel_err  # noqa: E402
from pallas_kernels.mosaic_gpu import attention_fwd as mg  # noqa: E402
from pallas_kernels.triton import block_sparse_attention as gpu_entry  # noqa: E402
from sparse_jax import masks  # noqa: E402

ARGS = None
REPORT: dict = {"meta": {}, "correctness": [], "dense": [], "pbs": [], "pbs_stage": [], "errors": []}
RUN = TuneRun("tune_attention_mgpu", REPORT)
left, log, save = RUN.left, RUN.log, RUN.save


def fwd_impl(name: str):
    """Trace under ``SPARSE_JAX_GPU_ATTENTION_FWD=name`` (read at trace time)."""
    return env_choice(gpu_entry.FWD_IMPL_ENV, name)


def ms(fn, args, iters=5):
    return timing.time_fn(fn, lambda i: args, warmup=2, iters=iters, rotations=1).median_s * 1e3


def _compiled(impl, fn):
    """fn jitted and traced under forward ``impl`` (the env var is read at trace time; a fresh
    wrapper per call, since jit's cache is keyed on the function and would reuse the other
    forward's trace)."""
    jf = jax.jit(lambda *a: fn(*a))

    def call(*a):
        with fwd_impl(impl):
            return jf(*a)
    return call


# -- correctness -----------------------------------------------------------------------------
def _cases():
    S = 2048
    yield "dense", dict(S=1024, Hq=4, Hkv=2, D=128, mask=masks.Full())
    yield "causal", dict(S=S, Hq=8, Hkv=2, D=128, mask=masks.Band(0, None))
    yield "causal fp16 D=64", dict(S=S, Hq=4, Hkv=4, D=64, mask=masks.Band(0, None), dtype=jnp.float16)
    yield "window 300", dict(S=S, Hq=4, Hkv=1, D=128, mask=masks.sliding_window(300, causal=True))
    yield "band lo=200 (empty rows)", dict(S=S, Hq=4, Hkv=2, D=128, mask=masks.Band(200, None))
    yield "causal B=2", dict(S=1024, Hq=4, Hkv=2, D=128, mask=masks.Band(0, None), B=2)
    yield "random blocks per kv head", dict(S=S, Hq=8, Hkv=2, D=128, mask=None, random=0.3)


def _tables(c, key):
    S, mask = c["S"], c["mask"]
    if c.get("random"):
        nb = S // 128
        blocks = jax.random.uniform(key, (1, c["Hkv"], nb, nb)) < c["random"]
        blocks = blocks.at[:, :, 3, :].set(False)  # a query block with nothing: rows must read 0
        return sj.BlockMask.from_block_bool(np.asarray(blocks), S, S, 128)
    return sj.create_block_mask(mask, None, None, S, S, 128)


def correctness():
    for name, c in _cases():
        if not RUN.open("correctness", 20):
            break
        try:
            B, S, Hq, Hkv, D = c.get("B", 1), c["S"], c["Hq"], c["Hkv"], c["D"]
            dt = c.get("dtype", jnp.bfloat16)
            q = timing.random_normal(1, (B, S, Hq, D), dt)
            k = timing.random_normal(2, (B, S, Hkv, D), dt)
            v = timing.random_normal(3, (B, S, Hkv, D), dt)
            bm = _tables(c, jax.random.key(4))
            why = mg.unsupported(q, k, v, bm, softcap=None, has_segments=False, has_perm=False)
            if why:
                raise ValueError(f"case not taken by the Mosaic GPU kernel: {why}")
            f = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, return_lse=True)  # noqa: E731
            o, lse = _compiled("mosaic_gpu", f)(q, k, v)
            o_t, lse_t = _compiled("triton", f)(q, k, v)
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            o_r, lse_r = sj.block_sparse_attention(f32(q), f32(k), f32(v), bm, return_lse=True, backend="xla")
            w = timing.random_normal(9, o.shape, jnp.float32)
            loss = lambda q, k, v: jnp.sum(sj.block_sparse_attention(q, k, v, bm).astype(jnp.float32) * w)  # noqa: E731
            g = _compiled("mosaic_gpu", jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            g_r = jax.grad(lambda q, k, v: jnp.sum(sj.block_sparse_attention(q, k, v, bm, backend="xla") * w),
                           argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
            row = dict(case=name, o=rel_err(o, o_r), o_triton=rel_err(o_t, o_r), lse=rel_err(lse, lse_r),
                       lse_triton=rel_err(lse_t, lse_r), nan=int(jnp.isnan(o.astype(jnp.float32)).sum()),
                       empty_rows_zero=bool(jnp.all(jnp.where(jnp.isinf(lse_r)[..., None].transpose(0, 2, 1, 3),
                                                              o.astype(jnp.float32) == 0, True))),
                       **{f"d{n}": rel_err(a, r) for n, a, r in zip("qkv", g, g_r)})
            tol = 2e-2
            row["ok"] = (row["o"] < tol and row["lse"] < 1e-3 and row["nan"] == 0 and row["empty_rows_zero"]
                         and all(row[f"d{n}"] < 3e-2 for n in "qkv"))
        except Exception as e:  # noqa: BLE001
            row = dict(case=name, ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}")
        REPORT["correctness"].append(row)
        log(f"correctness {row}")
        save()
    pbs_correctness()


def pbs_correctness():
    S = 4096
    q, k, v = bench_sel.synthetic_case(3, S, 8, 2, 128, jnp.bfloat16)
    for permute_queries in (False, True):
        if not RUN.open("correctness", 30):
            break
        kw = dict(block_size=128, segment_size=1024, threshold=0.8, permute_queries=permute_queries)
        try:
            f = lambda q, k, v: sj.permuted_block_sparse_attention(q, k, v, **kw)  # noqa: E731
            o = _compiled("mosaic_gpu", f)(q, k, v)
            o_t = _compiled("triton", f)(q, k, v)
            o_r = sj.permuted_block_sparse_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                     v.astype(jnp.float32), backend="xla", **kw)
            row = dict(case=f"pbs S={S} permute_queries={permute_queries}", o=rel_err(o, o_r), o_triton=rel_err(o_t, o_r),
                       nan=int(jnp.isnan(o.astype(jnp.float32)).sum()))
            row["ok"] = row["o"] < 2e-2 and row["nan"] == 0
        except Exception as e:  # noqa: BLE001
            row = dict(case=f"pbs permute_queries={permute_queries}", ok=False,
                       error=f"{type(e).__name__}: {str(e)[:1500]}")
        REPORT["correctness"].append(row)
        log(f"correctness {row}")
        save()


# -- timing ---------------------------------------------------------------------------------------
def _time_case(name, q, k, v, bm, *, flops, variants, backward=False):
    row = dict(case=name, flops=flops, ms={})
    w = timing.random_normal(9, q.shape, q.dtype)

    def fn(cfg):
        if backward:
            def g(q, k, v):
                return jax.grad(lambda q, k, v: jnp.sum(
                    (sj.block_sparse_attention(q, k, v, bm) * w).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
            return g
        if cfg is None:
            return lambda q, k, v: sj.block_sparse_attention(q, k, v, bm)
        return lambda q, k, v: mg.forward(q, k, v, bm, None, None, scale=1 / math.sqrt(q.shape[-1]), config=cfg)[0]

    for label, impl, cfg in variants:
        if not RUN.open("timing", 10):
            break
        try:
            row["ms"][label] = ms(_compiled(impl, fn(cfg)), (q, k, v))
        except Exception as e:  # noqa: BLE001
            row["ms"][label] = None
            REPORT["errors"].append(dict(case=name, variant=label, error=f"{type(e).__name__}: {str(e)[:1500]}"))
    row["tflops"] = {k_: (flops / (t * 1e-3) / 1e12 if t else None) for k_, t in row["ms"].items()}
    log(f"{name}: " + ", ".join(f"{k_} {t:.3f} ms ({row['tflops'][k_]:.0f} TF/s)" for k_, t in row["ms"].items() if t))
    REPORT["dense"].append(row)
    save()
    return row


def _peers(row, q, k, v, causal, backward):
    w = timing.random_normal(9, q.shape, q.dtype)
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")  # noqa: E731
    if backward:
        f0 = f
        f = lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum((f0(q, k, v) * w).astype(jnp.float32)),  # noqa: E731
                                     argnums=(0, 1, 2))(q, k, v)
    try:
        row["ms"]["cudnn"] = ms(jax.jit(f), (q, k, v))
    except Exception as e:  # noqa: BLE001
        REPORT["errors"].append(dict(case=row["case"], variant="cudnn", error=str(e)[:500]))
    if not backward:
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as am
            cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
            h = [x.astype(jnp.float16) for x in (q, k, v)]
            row["ms"]["jax_attention_mgpu_fp16"] = ms(jax.jit(lambda q, k, v: am.attention(q, k, v, cfg)), h)
        except Exception as e:  # noqa: BLE001
            REPORT["errors"].append(dict(case=row["case"], variant="attention_mgpu", error=str(e)[:500]))
    row["tflops"] = {k_: (row["flops"] / (t * 1e-3) / 1e12 if t else None) for k_, t in row["ms"].items()}
    log(f"{row['case']} peers: " + ", ".join(f"{k_} {t:.3f} ms" for k_, t in row["ms"].items() if t))
    save()


def dense():
    S, H, D = 8192, 16, 128
    q, k, v = (timing.random_normal(i, (1, S, H, D), jnp.bfloat16) for i in (1, 2, 3))
    fwd_variants = [("triton", "triton", None), ("mgpu", "mosaic_gpu", None),
                    ("mgpu late table read", "mosaic_gpu", mg.MgpuFwdConfig(early_table_read=False))]
    for causal in (False, True):
        bm = W.dense_block_mask(S, S, causal, 128)
        fl = W.attention_flops(bm, 1, H, D)
        row = _time_case(f"S={S} H={H} D={D}{' causal' if causal else ''}", q, k, v, bm, flops=fl,
                         variants=fwd_variants)
        _peers(row, q, k, v, causal, False)
        fl_b = W.attention_flops(bm, 1, H, D, backward=True)
        row = _time_case(f"S={S} H={H} D={D}{' causal' if causal else ''} fwd+bwd", q, k, v, bm, flops=fl_b,
                         variants=[("triton", "triton", None), ("mgpu fwd", "mosaic_gpu", None)], backward=True)
        _peers(row, q, k, v, causal, True)
    S = 32768
    q, k, v = (timing.random_normal(i, (1, S, H, D), jnp.bfloat16) for i in (1, 2, 3))
    for dens in (0.2, 0.1):
        nb = S // 128
        blocks = np.asarray(jax.random.uniform(jax.random.key(7), (1, 1, nb, nb)) < dens)
        bm = sj.BlockMask.from_block_bool(blocks, S, S, 128)
        _time_case(f"S={S} random blocks density={dens}", q, k, v, bm, flops=W.attention_flops(bm, 1, H, D),
                   variants=fwd_variants[:2])


PBS_HEADS = dict(hq=32, hkv=8, d=128)


def _pbs_cases(phase):
    """(S, q, k, v, timing iterations) of each ``--pbs-sizes`` length while ``phase`` has budget."""
    for S in ARGS.pbs_sizes:
        if not RUN.open(phase, 60):
            break
        q, k, v = bench_sel.synthetic_case(0, S, PBS_HEADS["hq"], PBS_HEADS["hkv"], PBS_HEADS["d"], jnp.bfloat16)
        yield S, q, k, v, (3 if S >= 65536 else 5)


def pbs():
    for S, q, k, v, it in _pbs_cases("pbs"):
        row = dict(S=S, segment=1024, ms={})
        REPORT["pbs"].append(row)
        row["ms"]["cudnn_causal"] = ms(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")), (q, k, v), it)
        dense_bm = W.dense_block_mask(S, S, True, 128)
        for impl in ("triton", "mosaic_gpu"):
            row["ms"][f"dense_causal_{impl}"] = ms(_compiled(impl, lambda q, k, v: sj.block_sparse_attention(
                q, k, v, dense_bm)), (q, k, v), it)
            tot = _compiled(impl, lambda q, k, v, t: sj.permuted_block_sparse_attention(
                q, k, v, block_size=128, segment_size=1024, threshold=t))
            tot_e = _compiled(impl, lambda q, k, v, t: sj.permuted_block_sparse_attention(
                q, k, v, block_size=128, segment_size=1024, threshold=t, estimate_dropped=True))
            for tau in ARGS.taus:
                if not RUN.open("pbs", 10):
                    break
                row["ms"][f"pbs_{impl}_tau{tau}"] = ms(tot, (q, k, v, jnp.float32(tau)), it)
                if ARGS.estimate:
                    row["ms"][f"pbs_estimate_{impl}_tau{tau}"] = ms(tot_e, (q, k, v, jnp.float32(tau)), it)
            log(f"S={S} {impl}: " + ", ".join(f"{k_} {t:.2f}" for k_, t in row["ms"].items()))
            save()
        row["x_cudnn"] = {k_: row["ms"]["cudnn_causal"] / t for k_, t in row["ms"].items() if t}
        log(f"S={S} x cuDNN: " + ", ".join(f"{k_} {x:.2f}" for k_, x in row["x_cudnn"].items()))
        save()


def pbs_stage():
    """The kernel stage of PBS alone (folded layout, the plan's tables at tau 0.8) with each
    forward and launch variant, against the same kernel's dense causal rate on the same layout:
    where does the Mosaic GPU kernel lose on PBS tables?"""
    import dataclasses
    from sparse_jax import permutation as perm_lib
    from sparse_jax.ops import permuted_attention as pa
    hq, hkv, d = PBS_HEADS["hq"], PBS_HEADS["hkv"], PBS_HEADS["d"]
    for S, q, k, v, it in _pbs_cases("pbs_stage"):
        plan = jax.jit(lambda q, k: pa.pbs_plan(q, k, block_size=128, segment_size=1024, threshold=0.8))(q, k)
        qf = perm_lib.fold_heads(q, hkv)
        kf, vf = perm_lib.permute_heads(k, plan.kv_permutation), perm_lib.permute_heads(v, plan.kv_permutation)
        pos = plan.kv_permutation.reshape(hkv, S)
        tables = plan.block_mask
        flat = dataclasses.replace(tables, mask=None)
        dense_bm = W.dense_block_mask(S, S, True, 128)
        fl = W.attention_flops(tables, hkv, hq // hkv, d)
        fl_dense = W.attention_flops(dense_bm, hkv, hq // hkv, d)
        row = dict(S=S, tau=0.8, density=fl / fl_dense, ms={}, tflops={})
        REPORT["pbs_stage"].append(row)
        scale = 1 / math.sqrt(d)
        cases = [
            ("triton", "triton", lambda q, k, v: sj.block_sparse_attention(q, k, v, tables, kv_positions=pos), fl),
            ("mgpu", "mosaic_gpu", lambda q, k, v: sj.block_sparse_attention(q, k, v, tables, kv_positions=pos), fl),
            ("mgpu tables without mask", "mosaic_gpu", lambda q, k, v: sj.block_sparse_attention(q, k, v, flat), fl),
            ("mgpu heads_q_batch", "mosaic_gpu", lambda q, k, v: mg.forward(
                q, k, v, tables, None, pos, scale=scale, config=mg.MgpuFwdConfig(grid_order="heads_q_batch"))[0], fl),
            ("mgpu in order", "mosaic_gpu", lambda q, k, v: mg.forward(
                q, k, v, tables, None, pos, scale=scale, config=mg.MgpuFwdConfig(reverse=False))[0], fl),
            ("mgpu dense causal (folded)", "mosaic_gpu", lambda q, k, v: sj.block_sparse_attention(q, k, v, dense_bm),
             fl_dense),
            ("mgpu dense causal heads_q_batch", "mosaic_gpu", lambda q, k, v: mg.forward(
                q, k, v, dense_bm, None, None, scale=scale, config=mg.MgpuFwdConfig(grid_order="heads_q_batch"))[0],
             fl_dense),
        ]
        for label, impl, fn, flops in cases:
            if not RUN.open("pbs_stage", 10):
                break
            try:
                t = ms(_compiled(impl, fn), (qf, kf, vf), it)
                row["ms"][label], row["tflops"][label] = t, flops / (t * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001
                REPORT["errors"].append(dict(case=f"pbs_stage S={S}", variant=label,
                                             error=f"{type(e).__name__}: {str(e)[:1500]}"))
            log(f"S={S} stage {label}: {row['ms'].get(label)} ms, {row['tflops'].get(label)} TF/s")
        save()


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--phases", default="dense,pbs")
    p.add_argument("--pbs-sizes", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    p.add_argument("--estimate", action="store_true", help="pbs: also PBS + the dropped-block estimate")
    ARGS = p.parse_args()
    RUN.budget_s = ARGS.budget_s
    REPORT["meta"] = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, args=vars(ARGS))
    log(REPORT["meta"])
    phases = ARGS.phases.split(",")
    for name, fn in (("correctness", correctness), ("dense", dense), ("pbs_stage", pbs_stage), ("pbs", pbs)):
        if name in phases:
            RUN.guard(name, 10)(fn)()
    save()


if __name__ == "__main__":
    main()
