"""One-call GPU script for the MoE layer's open goals (benchmarks/notes/moe_layer.md, round 3).

Phases (each guarded by the budget; JSON rewritten after each, ``$OUT/tune_moe.json``):

* ``breakdown`` -- T = 1 / 32 per model: the whole layer timed per call (blocking) and
  pipelined (back-to-back calls, one sync: ``timing.time_fn``'s default), the routing +
  dispatch half alone, the gate+up and down grouped matmuls alone, and the weight-read floor.
* ``tiles`` -- T = 1 / 32: the gate+up and the down matmul under each candidate small tile
  (``gmm_plan.override``), each against its own weight-read floor.
* ``profile`` -- ``--profile-tokens`` (default T = 1; with ``--backward`` fwd + all grads): a
  profiler trace of the pipelined layer; every GPU kernel's duration and launches per call.
* ``tgrad`` -- fwd+bwd of the layer (``--tgrad-models``, first large T) under each candidate
  weight-gradient tile (``TGRAD_TILES``).
* ``variants`` -- Mixtral at the first large T, forward: the layer under fusion / tile /
  persistence variants beside ragged_dot.
* ``step`` -- T = 1 / 32: the layer applied ``L`` times inside one jitted loop (as a
  decode step runs its layers: no host dispatch or sync between layers), ours vs
  ragged_dot, per layer; ours also per call (one layer per jitted call, calls pipelined).
* ``decode`` -- ``--decode-tokens`` (default 1): the layer in a decode step on the decode path
  (``ops.moe_decode``) under each ``DECODE_TILES`` candidate and each router split
  (``ROUTER_SPLITS``) at T = 1 (the default tiles at more tokens) against the grouped path
  (``DECODE_MAX_TOKENS = 0``), round 12's decode path (three launches more) and the floor;
  ``experts_by_id`` alone (fixed routing) with the default tiles.
* ``decode_kernels`` -- T = 1: the decode kernel's GPU time alone (profiler) per candidate, beside
  XLA's copy and reduction of the same number of bytes; the router product's kernels per
  ``ROUTER_SPLITS`` candidate beside XLA's (padded GEMM, split-K sum, padding).
* ``batches`` -- Qwen2-MoE T = 1: a step's us per layer against steps per host sync and its
  GPU time (why the step phases time ~0.1 s batches, ``STEP_BATCH_S``).
* ``mid`` -- Mixtral T = 512: the gate+up (fused / two gmm) and down matmuls under
  candidate tiles and policies (the 3x-ragged_dot goal needs ~1.05x the weight floor).
* ``large`` -- T >= 512: ours (default, and the tile policies) vs ragged_dot vs the torch
  ``_grouped_mm`` MoE, forward, uniform router, all three models.

    PYTHONPATH=. timeout 590 python benchmarks/tune_moe.py --budget-s 560
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import flops as W  # noqa: E402
from benchmarks import moe as B  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun, floor_ms, measure, profile_kernels, timed  # noqa: E402
from pallas_kernels.common import gmm_plan  # noqa: E402
from pallas_kernels.common.decode_plan import DecodeTiles  # noqa: E402
from pallas_kernels.common.gmm_plan import Tiles, Tiling  # noqa: E402
from pallas_kernels.triton import moe_decode, router_product  # noqa: E402
from sparse_jax import moe, ops  # noqa: E402
from sparse_jax.moe import layer as moe_layer  # noqa: E402
from sparse_jax.moe import routing as moe_routing  # noqa: E402
from sparse_jax.moe.dispatch import expand, plan_dispatch  # noqa: E402

MODELS = {**B.MODELS, **B.QUICK_MODELS}  # "tiny": the CPU smoke run
RUN = TuneRun("tune_moe", {"errors": [], "breakdown": [], "tiles": [], "profile": [], "step": [], "mid": [], "large": [],
                                "tgrad": [], "variants": [], "decode": [], "decode_kernels": [],
                                "batches": []})

def _named(*tiles: Tiles) -> dict[str, Tiles]:
    """Candidates keyed by a short label ("16x64x128w4s4", as the JSON rows and --tiles name them)."""
    return {f"{t.tm}x{t.tn}x{t.tk}w{t.num_warps}s{t.num_stages}": t for t in tiles}


def _overridden(tiling: Tiling | None):
    """gmm_plan.override(tiling), or no override for None (the shipped defaults)."""
    return gmm_plan.override(tiling) if tiling else contextlib.nullcontext()


def _big_only(tiles: Tiles):
    """Override: every forward gmm with ``tiles``, no small-tile split."""
    return gmm_plan.override(Tiling(forward=tiles, policy="big"))


# Candidate single tiles for the few-rows launch (policy "small"); "default" = no override.
SMALL_TILES = _named(Tiles(16, 32, 256, num_warps=4, num_stages=4), Tiles(16, 64, 128, num_warps=4, num_stages=4),
                     Tiles(16, 64, 256, num_warps=4, num_stages=3), Tiles(32, 64, 128, num_warps=4, num_stages=4),
                     Tiles(16, 128, 128, num_warps=4, num_stages=4), Tiles(32, 128, 128, num_warps=4, num_stages=4),
                     Tiles(16, 128, 64, num_warps=4, num_stages=6))


def _setup(model, T):
    E, k, D, F = MODELS[model]
    w = B._weights(E, D, F, jnp.bfloat16)
    x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
    active = B._active_experts(x, rw, k)
    return E, k, D, F, w, x, rw, active


def _dispatch_parts(x, rw, k, E):
    """Routing + dispatch: returns (rows [M, D], group_sizes, weights, plan)."""
    r = moe.route(moe.router_logits(x, rw), k)
    plan = plan_dispatch(r.expert_ids, E)
    return expand(x, plan, k), plan.group_sizes, r.weights


def breakdown(models, tokens):
    for model in models:
        for T in tokens:
            E, k, D, F, (wg, wu, wd), x, rw, active = _setup(model, T)
            floor = floor_ms(active * 3 * D * F * 2)
            layer = jax.jit(functools.partial(B._ours(None), top_k=k))
            args = (x, rw, wg, wu, wd)
            row = dict(model=model, T=T, active=active, floor_ms=round(floor, 4))
            row["layer_block_ms"], _ = timed(layer, args, pipeline=1)
            row["layer_pipe_ms"], row["batch"] = timed(layer, args)
            row["ragged_dot_pipe_ms"], _ = timed(jax.jit(functools.partial(B.ragged_dot_moe, top_k=k)), args)
            disp = jax.jit(functools.partial(_dispatch_parts, k=k, E=E))
            row["dispatch_pipe_ms"], _ = timed(disp, (x, rw))
            xs, gs, _ = disp(x, rw)
            up = jax.jit(lambda xs, a, b, gs: ops.grouped_swiglu(xs, a, b, gs))
            row["gate_up_pipe_ms"], _ = timed(up, (xs, wg, wu, gs))
            h = up(xs, wg, wu, gs)
            down = jax.jit(lambda h, w, gs: ops.grouped_matmul(h, w, gs))
            row["down_pipe_ms"], _ = timed(down, (h, wd, gs))
            row["vs_floor_pipe"] = round(row["layer_pipe_ms"] / floor, 3)
            RUN.report["breakdown"].append(row)
            RUN.log(row)
            del wg, wu, wd, xs, h
            gc.collect()
        RUN.save()


def tiles(models, tokens, names=None):
    for model in models:
        E, k, D, F = MODELS[model]
        wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
        for T in tokens:
            x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
            active = B._active_experts(x, rw, k)
            xs, gs, _ = jax.jit(functools.partial(_dispatch_parts, k=k, E=E))(x, rw)
            h = ops.grouped_swiglu(xs, wg, wu, gs)
            for name, tile in [("default", None), *SMALL_TILES.items()]:
                if names and name not in names:
                    continue
                if RUN.left() < 20:
                    return
                tiling = None if tile is None else Tiling(forward=tile, policy="small")
                row = dict(model=model, T=T, tile=name, active=active)
                for op, fn, args, nbytes in (
                        ("gate_up", lambda xs, a, b, gs: ops.grouped_swiglu(xs, a, b, gs), (xs, wg, wu, gs), 2 * D * F),
                        ("down", lambda h, w, gs: ops.grouped_matmul(h, w, gs), (h, wd, gs), D * F)):
                    ms = measure(row, f"{op}_ms", fn, args, _overridden(tiling), error_key=f"{op}_error")
                    if ms:
                        row[f"{op}_vs_floor"] = round(ms / floor_ms(active * nbytes * 2), 3)
                RUN.report["tiles"].append(row)
                RUN.log(row)
            RUN.save()
        del wg, wu, wd
        gc.collect()


def _layer_case(model, T, backward):
    """(jitted layer or its fwd+bwd, args, active experts) for one model at T tokens."""
    E, k, D, F, (wg, wu, wd), x, rw, active = _setup(model, T)
    fn = functools.partial(B._ours(None), top_k=k)
    args = (x, rw, wg, wu, wd)
    if backward:
        fn, args = B._fwd_bwd(fn), args + (timing.random_normal(5, (T, D), jnp.float32),)
    return fn, args, active


def profile(models, tokens=(1,), backward=False, calls=50):
    for model in models:
        for T in tokens:
            if RUN.left() < 30:
                return
            fn, args, _ = _layer_case(model, T, backward)
            kernels = profile_kernels(fn, args, calls if T < 512 else 10)
            total = round(sum(r.get("us_per_call", 0.0) for r in kernels if not r.get("kernel", "(").startswith("(")), 2)
            RUN.report["profile"].append(dict(model=model, T=T, backward=backward, kernel_us_per_call=total,
                                              kernels=kernels[:40]))
            RUN.log(f"{model} T={T} backward={backward}: {total} us of kernels per call; top: {kernels[:14]}")
            del args, fn
            gc.collect()
            RUN.save()


# Weight-gradient tiles to sweep at few rows per group (tgrad phase; FEW_ROWS is the default there).
TGRAD_TILES = _named(Tiles(32, 128, 128, num_warps=4, num_stages=4), Tiles(32, 256, 128, num_warps=8, num_stages=3),
                     Tiles(32, 128, 256, num_warps=8, num_stages=3), Tiles(32, 256, 256, num_warps=8, num_stages=2),
                     Tiles(16, 128, 128, num_warps=4, num_stages=4), Tiles(32, 64, 128, num_warps=4, num_stages=4),
                     Tiles(32, 128, 64, num_warps=4, num_stages=4), Tiles(64, 128, 128, num_warps=8, num_stages=3))


def tgrad(models, tokens):
    """fwd+bwd of the layer with each candidate weight-gradient tile (Tiling.transposed)."""
    for model in models:
        for T in tokens:
            fn, args, _ = _layer_case(model, T, True)
            for name, t in [("default", None), *TGRAD_TILES.items()]:
                if RUN.left() < 20:
                    return
                row = dict(model=model, T=T, tgmm_tile=name)
                measure(row, "fwd_bwd_ms", fn, args, _overridden(None if t is None else Tiling(transposed=t)), error_key="error")
                RUN.report["tgrad"].append(row)
                RUN.log(row)
            del args
            gc.collect()
            RUN.save()


def variants(model="mixtral-8x7b", T=512, names=None, backward=False):
    """Layer-level forward (or forward + gradients) under tile and fusion variants (the 3x-ragged_dot
    goal at T = 512); ``names``: the variants to run (default: all), ragged_dot first and last."""
    from pallas_kernels.triton import gmm as gmm_kernel
    from pallas_kernels.triton import grouped_matmul as tgm
    big = Tiles(128, 256, 64, num_warps=8, num_stages=3)
    fused = dict(SWIGLU_FUSED_MAX_ROWS=128)
    fused_big_tiles = {**tgm.FORWARD_TILES, "swiglu": (big.replace(num_stages=2), tgm.FORWARD_TILES["swiglu"][1])}
    cases = {  # name -> contexts (made fresh per use)
        "default": lambda: (),
        "no_split": lambda: (mock.patch.object(gmm_kernel, "SPLIT_LAST_WAVE", False),),
        "band8": lambda: (mock.patch.object(gmm_kernel, "ONE_BAND_ROWS", 0),),
        "neither": lambda: (mock.patch.multiple(gmm_kernel, SPLIT_LAST_WAVE=False, ONE_BAND_ROWS=0),),
        "fused_swiglu": lambda: (mock.patch.multiple(tgm, **fused),),
        "fused_swiglu_128x256": lambda: (mock.patch.multiple(tgm, **fused, FORWARD_TILES=fused_big_tiles),),
        "big_band4": lambda: (_big_only(big.replace(band=4)),),
        "big_band16": lambda: (_big_only(big.replace(band=16)),),
        "big_occ2": lambda: (_big_only(big.replace(occupancy=2)),),
        "big_persist0": lambda: (_big_only(big.replace(occupancy=0)),),
        "128x128x64w4s4": lambda: (_big_only(Tiles(128, 128, 64, num_warps=4, num_stages=4)),),
    }
    # Round 7: more weight bytes in flight per SM. The default big tile (144 KB of shared memory at
    # 3 stages) fits one program per SM with two 48 KB stages in flight; 96 KB tiles fit two
    # (occupancy 2), and 32-deep K steps fit 5-6 stages in the same 144 KB.
    for t in (Tiles(128, 128, 64, num_warps=8, num_stages=3, occupancy=2),
              Tiles(128, 128, 64, num_warps=4, num_stages=3, occupancy=2),
              Tiles(128, 128, 32, num_warps=4, num_stages=6, occupancy=2),
              Tiles(128, 256, 32, num_warps=8, num_stages=6), Tiles(128, 256, 32, num_warps=8, num_stages=5)):
        cases[str(t)] = functools.partial(lambda t: (_big_only(t),), t)
    cases["default_again"] = lambda: ()
    fn, args, _ = _layer_case(model, T, backward)
    k = MODELS[model][1]
    runs = [(name, fn, make) for name, make in cases.items() if names is None or name in names]
    wrap = B._fwd_bwd if backward else (lambda f: f)
    ragged = ("ragged_dot", wrap(functools.partial(B.ragged_dot_moe, top_k=k)), lambda: ())
    runs = [ragged, *runs, ragged]  # the peer first and last: its spread in this process
    for name, f, make in runs:
        if RUN.left() < 15:
            return
        row = dict(model=model, T=T, variant=name, backward=backward)
        measure(row, "ms", f, args, *make(), error_key="error")
        RUN.report["variants"].append(row)
        RUN.log(row)
    RUN.save()


ROUTER_PADS = (8, 16)  # routing.ROUTER_MIN_ROWS candidates (step phase, T < 16)


def _step_cases(models, tokens, L):
    """(top_k, layer args, report row) per model and T (uniform router, bf16): the model's
    weights are made once per model; the row holds the active experts' weight-read floor."""
    for model in models:
        E, k, D, F = MODELS[model]
        wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
        for T in tokens:
            if RUN.left() < 20:
                return
            x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
            active = B._active_experts(x, rw, k)
            yield k, (x, rw, wg, wu, wd), dict(model=model, T=T, L=L, active=active,
                                               floor_ms=round(floor_ms(active * 3 * D * F * 2), 4))
        del wg, wu, wd
        gc.collect()
        RUN.save()


# Seconds of steps per timed batch in the step and decode phases (round 13; at most
# timing.PIPELINE_MAX calls): the steady state of steps issued back to back, GPU-bound. A batch
# ends in a host sync that costs ~200 us on the H100 machine (an 8-layer Qwen2-MoE T = 1 step:
# 111 us per layer at one call per sync, 90.7 at 8 calls, 85.8 at 64, 84.8 at 200; its kernels'
# GPU time 85.5), and timing's default batch (10 ms of calls) left 2-5 us per layer of it in the
# step times of rounds <= 12. ``*_auto_*`` keys keep the default batch for comparison.
STEP_BATCH_S = 0.1
AUTO_BATCH_S = timing.PIPELINE_TARGET_S


def _deep_batches():
    return mock.patch.object(timing, "PIPELINE_TARGET_S", STEP_BATCH_S)


def step(models, tokens, L=8):
    with _deep_batches():
        _step(models, tokens, L)


def _step(models, tokens, L):
    for k, args, row in _step_cases(models, tokens, L):
        for impl, fn in (("ours", B._ours(None)), ("ragged_dot", B.ragged_dot_moe)):
            measure(row, f"{impl}_step_ms", B.in_step(functools.partial(fn, top_k=k), L), args, per=L)
        ours = B.in_step(functools.partial(B._ours(None), top_k=k), L)
        with mock.patch.object(timing, "PIPELINE_TARGET_S", AUTO_BATCH_S):
            measure(row, "ours_step_auto_ms", ours, args, per=L)
        for pad in ROUTER_PADS if 1 < row["T"] < 16 else ():  # T = 1 takes the decode path (no padding)
            measure(row, f"ours_router_pad{pad}_step_ms", ours, args,
                    mock.patch.multiple(moe_routing, ROUTER_MIN_ROWS=pad), per=L)
        measure(row, "ours_call_ms", functools.partial(B._ours(None), top_k=k), args)  # one layer per call
        if row.get("ours_step_ms"):
            row["vs_floor"] = round(row["ours_step_ms"] / row["floor_ms"], 3)
        RUN.report["step"].append(row)
        RUN.log(row)


# Decode kernel candidates (decode / decode_kernels phases; "default": moe_decode.default_tiles).
DECODE_TILES = {"default": None, **{str(t): t for t in (
    moe_decode.WIDE, moe_decode.NARROW, DecodeTiles(), DecodeTiles(tn=32), DecodeTiles(tn=128), DecodeTiles(programs_per_sm=4),
    DecodeTiles(td=256, num_stages=3), DecodeTiles(num_stages=6), DecodeTiles(programs_per_sm=1),
    DecodeTiles(programs_per_sm=3), DecodeTiles(tn=128, num_warps=8), DecodeTiles(tn=32, tk=128, td=64),
    DecodeTiles(tk=32, num_stages=8),
    DecodeTiles(tn=64, tk=128, num_stages=3), DecodeTiles(tn=128, tk=128, num_stages=4),
    DecodeTiles(tn=64, tk=128, num_stages=4), DecodeTiles(tn=64, tk=128, td=256, num_stages=3),
    DecodeTiles(tn=64, tk=128, num_warps=8, num_stages=3), DecodeTiles(tn=64, tk=128, td=64, num_stages=3),
    DecodeTiles(tn=64, tk=128, td=256, num_warps=8, num_stages=3), DecodeTiles(tn=64, tk=128, num_warps=8, num_stages=4),
    DecodeTiles(tn=64, tk=256, td=256, num_warps=8, num_stages=2), DecodeTiles(tn=64, tk=256, td=256, num_warps=8,
                                                                                num_stages=3),
    DecodeTiles(tn=128, tk=128, td=256, num_stages=3),
    # round 12, second call: wider strips (longer contiguous runs per weight row), deeper pipelines
    DecodeTiles(tn=128, num_stages=6), DecodeTiles(tn=128, tk=128, num_stages=3),
    DecodeTiles(tn=128, num_warps=8, num_stages=6), DecodeTiles(tn=256, tk=32, td=32, num_stages=6),
    DecodeTiles(tn=256, tk=64, td=64, num_stages=3), DecodeTiles(tn=256, tk=32, td=64, num_warps=8, num_stages=4))}}




# router_product.plan candidates (MAX_SPLITS, STEP_ROWS); the first is the shipped one.
ROUTER_SPLITS = ((32, 128), (16, 128), (16, 256), (32, 256), (8, 256), (64, 128))


def _router_partials(splits, step_rows, x, rw):
    with mock.patch.multiple(router_product, MAX_SPLITS=splits, STEP_ROWS=step_rows):
        return router_product.partial_logits(x, rw)


def decode_kernels(models, names=None, calls=20):
    """T = 1: GPU time of the decode kernel alone (profiler) under each candidate, against the
    same bytes streamed by XLA's own kernels (a copy and a reduction of one contiguous buffer)."""
    for model in models:
        E, k, D, F, (wg, wu, wd), x, rw, _ = _setup(model, 1)
        r = moe.route(moe.router_logits(x, rw), k)
        args = (x, r.weights, r.expert_ids, wg, wu, wd)
        nbytes = k * 3 * D * F * 2
        row = dict(model=model, weight_mb=round(nbytes / 1e6, 1), floor_us=round(floor_ms(nbytes) * 1e3, 2))
        buf = jnp.ones((nbytes // 2 // 4096, 4096), jnp.bfloat16)
        for key, fn in (("xla_copy", lambda b: b + 1), ("xla_reduce", lambda b: jnp.sum(b, axis=0, dtype=jnp.float32))):
            ks = profile_kernels(fn, (buf,), calls)
            us = sum(r_.get("us_per_call", 0.0) for r_ in ks if not r_.get("kernel", "(").startswith("("))
            row[f"{key}_us"] = round(us, 2)
        del buf
        for key, fn in (("xla_router", moe_routing.router_logits),  # rows padded to 8: pad, GEMM, split-K sum
                        *((f"router_s{s_}k{k_}", functools.partial(_router_partials, s_, k_)) for s_, k_ in ROUTER_SPLITS)):
            ks = profile_kernels(fn, (x, rw), calls)
            row[f"{key}_us"] = round(sum(r_.get("us_per_call", 0.0) for r_ in ks
                                         if not r_.get("kernel", "(").startswith("(")), 2)
        for n, t in DECODE_TILES.items():
            if (names is not None and n not in names) or RUN.left() < 15:
                continue
            try:
                ks = profile_kernels(functools.partial(ops.experts_by_id, backend="triton"), args, calls,
                                     mock.patch.multiple(moe_decode, TILES=t))
                us = [r_["us_per_call"] for r_ in ks if r_.get("kernel", "").startswith("moe_decode")]
                other = sum(r_.get("us_per_call", 0.0) for r_ in ks if not r_.get("kernel", "(").startswith(("(", "moe_decode")))
                row[f"{n}_us"] = round(us[0], 2) if us else None
                row[f"{n}_tbps"] = round(nbytes / us[0] / 1e6, 3) if us else None
                row[f"{n}_other_us"] = round(other, 2)
            except Exception as e:  # noqa: BLE001
                row[f"{n}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        RUN.report["decode_kernels"].append(row)
        RUN.log(row)
        del wg, wu, wd
        gc.collect()
        RUN.save()




def _round12_decode(x, router_weights, w_gate, w_up, w_down, *, top_k):
    """Round 12's decode path, for comparison: XLA's router product on rows padded to 8, the
    ``topk_routing`` launch, ``experts_by_id`` (three launches more than ``ops.moe_decode``)."""
    padded = moe_routing.router_logits(x, router_weights, keep_padding=True)
    weights, ids = ops.topk_routing(padded, top_k, num_tokens=x.shape[0], backend="triton")
    return ops.experts_by_id(x, weights, ids, w_gate, w_up, w_down, backend="triton").astype(x.dtype)


def decode(models, tokens=(1,), L=8, names=None, profile_step=False):
    with _deep_batches():
        _decode(models, tokens, L, names, profile_step)


def _decode(models, tokens, L, names, profile_step):
    for k, args, row in _step_cases(models, tokens, L):
        T = row["T"]
        # every assignment streams its own expert on the decode path: T k experts' weights
        row["assigned_floor_ms"] = round(row["floor_ms"] * T * k / row["active"], 4)
        layer = functools.partial(B._ours(None), top_k=k)
        ours, unrolled = B.in_step(layer, L), B.in_step(layer, L, unroll=True)
        r12 = functools.partial(_round12_decode, top_k=k)
        grouped, decode_path = (mock.patch.multiple(moe_layer, DECODE_MAX_TOKENS=n) for n in (0, T))
        measure(row, "grouped_step_ms", ours, args, grouped, per=L)
        measure(row, "grouped_unrolled_step_ms", unrolled, args, grouped, per=L)
        measure(row, "decode_unrolled_step_ms", unrolled, args, decode_path, per=L)
        measure(row, "r12_path_step_ms", B.in_step(r12, L), args, per=L)
        with mock.patch.object(timing, "PIPELINE_TARGET_S", AUTO_BATCH_S):
            measure(row, "decode_default_auto_step_ms", ours, args, decode_path, per=L)
        measure(row, "decode_update_glue_step_ms", B.in_step(layer, L, glue="update"), args, decode_path, per=L)
        if profile_step:
            for key, fn, patch in (("grouped", unrolled, grouped), ("decode", unrolled, decode_path),
                                   ("r12", B.in_step(r12, L, unroll=True), contextlib.nullcontext())):
                ks = profile_kernels(fn, args, 10, patch)
                row[f"{key}_unrolled_kernels"] = [dict(r_, us_per_layer=round(r_.get("us_per_call", 0) / L, 2))
                                                  for r_ in ks[:16]]
        for splits, step_rows in ROUTER_SPLITS if T == 1 else ():  # the op's GPU time per router split
            ks = profile_kernels(layer, args, 20, decode_path,
                                 mock.patch.multiple(router_product, MAX_SPLITS=splits, STEP_ROWS=step_rows))
            row[f"decode_router_s{splits}k{step_rows}_gpu_us"] = round(
                sum(r_.get("us_per_call", 0.0) for r_ in ks if not r_.get("kernel", "(").startswith("(")), 2)
        cands = {n: t for n, t in DECODE_TILES.items() if names is None or n in names}
        for n, t in (cands if T == 1 else {"default": None}).items():
            if RUN.left() < 15:
                break
            ms = measure(row, f"decode_{n}_step_ms", ours, args, decode_path, mock.patch.multiple(moe_decode, TILES=t),
                         per=L)
            if ms:
                row[f"decode_{n}_vs_floor"] = round(ms / row["floor_ms"], 3)
        x, rw, wg, wu, wd = args
        r = moe.route(moe.router_logits(x, rw), k)
        measure(row, "op_ms", functools.partial(ops.experts_by_id, backend="triton"),
                (x, r.weights, r.expert_ids, wg, wu, wd))
        measure(row, "layer_call_ms", layer, args, decode_path)
        RUN.report["decode"].append(row)
        RUN.log(row)


def batches(model="qwen2-57b-a14b", calls=200):
    """T = 1 on the shipped path: us per layer of a 1- and an 8-layer step against steps per host
    sync (1, 8, 64, ``calls``) and the profiler's GPU time (round 13's STEP_BATCH_S experiment;
    run it again under ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` for no CUDA graphs)."""
    import time
    k, args, row = next(_step_cases([model], [1], 8))
    row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    layer = functools.partial(B._ours(None), top_k=k)
    for L in (1, 8):
        f = jax.jit(B.in_step(layer, L, unroll=True))
        for pipe in (1, 8, 64):
            row[f"L{L}_sync_every{pipe}_us_per_layer"] = round(timed(f, args, pipe)[0] * 1e3 / L, 2)
        jax.block_until_ready(f(*args))
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        row[f"L{L}_sync_every{calls}_us_per_layer"] = round((time.perf_counter() - t0) / calls / L * 1e6, 2)
        ks = profile_kernels(B.in_step(layer, L, unroll=True), args, 20)
        row[f"L{L}_gpu_us_per_layer"] = round(sum(r_.get("us_per_call", 0) for r_ in ks[1:]) / L, 2)
    RUN.report["batches"].append(row)
    RUN.log(row)


MID_TILES = _named(Tiles(128, 256, 64, num_warps=8, num_stages=3), Tiles(128, 128, 64, num_warps=4, num_stages=4),
                   Tiles(128, 128, 64, num_warps=8, num_stages=4), Tiles(64, 256, 64, num_warps=8, num_stages=3),
                   Tiles(64, 128, 128, num_warps=4, num_stages=4), Tiles(128, 256, 64, num_warps=8, num_stages=4))


def mid(model="mixtral-8x7b", T=512):
    E, k, D, F = MODELS[model]
    wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
    x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
    active = B._active_experts(x, rw, k)
    xs, gs, _ = jax.jit(functools.partial(_dispatch_parts, k=k, E=E))(x, rw)
    h = ops.grouped_swiglu(xs, wg, wu, gs)
    ops_ = {"gate_up_fused": (lambda xs, a, b, gs: ops.grouped_swiglu(xs, a, b, gs, fused=True), (xs, wg, wu, gs), 2),
            "gate_up_two": (lambda xs, a, b, gs: ops.grouped_swiglu(xs, a, b, gs, fused=False), (xs, wg, wu, gs), 2),
            "down": (lambda h, w, gs: ops.grouped_matmul(h, w, gs), (h, wd, gs), 1)}
    for name, tile in [("default", None), *MID_TILES.items()]:
        for op, (fn, args, nw) in ops_.items():
            if RUN.left() < 15:
                return
            row = dict(model=model, T=T, op=op, tile=name)
            tiling = None if tile is None else Tiling(forward=tile, policy="big")
            ms = measure(row, "ms", fn, args, _overridden(tiling), error_key="error")
            if ms:
                row["vs_floor"] = round(ms / floor_ms(active * nw * D * F * 2), 3)
            RUN.report["mid"].append(row)
            RUN.log(row)
        RUN.save()


def large(models, tokens, peers: bool, backward: bool = False, router: str = "uniform"):
    """Forward (or, with ``backward``, forward + all gradients) of the layer at T >= 512
    (``router``: "uniform" or "zipf", as in benchmarks.moe)."""
    policies = {"default": None} if backward else {"default": None, "big": Tiling(policy="big"),
                                                   "small": Tiling(policy="small")}
    wrap = B._fwd_bwd if backward else (lambda f: f)
    for model in models:
        E, k, D, F = MODELS[model]
        rows, inputs = {}, {}
        # torch first, before JAX holds this model's weights or grows its pool with ragged_dot's
        # temporaries (JAX keeps freed memory in its pool; torch hands its cache back below)
        for T in tokens:
            inputs[T] = x, rw = B._inputs(T, D, E, router, 0, jnp.bfloat16)
            active = B._active_experts(x, rw, k)
            rows[T] = row = dict(model=model, T=T, router=router, active=active, backward=backward,
                                 floor_ms=round(floor_ms(active * 3 * D * F * 2), 4))
            if peers:
                from benchmarks import peers_torch
                from benchmarks.peers import router_bias
                try:
                    t = peers_torch.time_moe(T, D, F, E, k, jnp.bfloat16, router_bias(E, router), backward=backward)
                    row["torch_ms"] = round(t.ms, 4)
                except Exception as e:  # noqa: BLE001
                    row["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    gc.collect()
                    peers_torch.free_memory()
        wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
        for T in tokens:
            if RUN.left() < 30:
                return
            row = rows[T]
            args = (*inputs[T], wg, wu, wd)
            if backward:
                args = args + (timing.random_normal(5, (T, D), jnp.float32),)
            for name, tiling in policies.items():
                if name != "default" and model != "mixtral-8x7b":
                    continue
                measure(row, f"ours_{name}_ms", wrap(functools.partial(B._ours(None), top_k=k)), args,
                         _overridden(tiling), error_key=f"ours_{name}_error")
            measure(row, "ragged_dot_ms", wrap(functools.partial(B.ragged_dot_moe, top_k=k)), args,
                     error_key="ragged_dot_error")
            ours = row.get("ours_default_ms")
            if ours and backward:
                row["tflops"] = round(W.moe_flops(T, D, F, E, k, backward=True) / (ours * 1e-3) / 1e12, 1)
            if ours:
                row["x_ragged_dot"] = round(row.get("ragged_dot_ms", float("nan")) / ours, 3)
                row["x_torch"] = round(row.get("torch_ms", float("nan")) / ours, 3)
                row["vs_floor"] = round(ours / row["floor_ms"], 3)
            RUN.report["large"].append(row)
            RUN.log(row)
            RUN.save()
            gc.collect()
        del wg, wu, wd
        gc.collect()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--phases", default="breakdown,tiles,profile,mid,large")
    ap.add_argument("--large-models", default=None, help="models of the large phase (default: --models)")
    ap.add_argument("--models", default="mixtral-8x7b,qwen2-57b-a14b,deepseek-v3")
    ap.add_argument("--small-tokens", default="1,32")
    ap.add_argument("--large-tokens", default="512,2048")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--backward", action="store_true", help="large phase: forward + all gradients")
    ap.add_argument("--router", default="uniform", help="large phase: uniform or zipf")
    ap.add_argument("--profile-tokens", default="1")
    ap.add_argument("--decode-tokens", default="1")
    ap.add_argument("--profile-step", action="store_true", help="decode phase: profile the unrolled step too")
    ap.add_argument("--decode-tiles", default=None, help="decode phase: comma-separated DECODE_TILES names")
    ap.add_argument("--tgrad-models", default="qwen2-57b-a14b")
    ap.add_argument("--tiles", default=None, help="comma-separated SMALL_TILES names (and 'default') to sweep")
    ap.add_argument("--variants", default=None, help="variants phase: comma-separated names (default: all)")
    ap.add_argument("--variant-tokens", default=None, help="variants phase: token counts (default: first large T)")
    a = ap.parse_args()
    RUN.budget_s = a.budget_s
    RUN.report["env"] = timing.environment()
    RUN.report["ceilings"] = timing.ceilings()
    models = a.models.split(",")
    small = [int(t) for t in a.small_tokens.split(",")]
    big = [int(t) for t in a.large_tokens.split(",")]
    phases = a.phases.split(",")
    if "breakdown" in phases:
        RUN.guard("breakdown", 60)(breakdown)(models, small)
    if "tiles" in phases:
        RUN.guard("tiles", 40)(tiles)(models, small, a.tiles.split(",") if a.tiles else None)
    if "profile" in phases:
        RUN.guard("profile", 30)(profile)(models, [int(t) for t in a.profile_tokens.split(",")], a.backward)
    if "tgrad" in phases:
        RUN.guard("tgrad", 30)(tgrad)(a.tgrad_models.split(","), big[:1])
    if "variants" in phases:
        names = a.variants.split(",") if a.variants else None
        for T in [int(t) for t in a.variant_tokens.split(",")] if a.variant_tokens else big[:1]:
            RUN.guard("variants", 30)(variants)("tiny" if models == ["tiny"] else "mixtral-8x7b", T, names,
                                                a.backward)
    if "step" in phases:
        RUN.guard("step", 30)(step)(models, small)
    if "decode_kernels" in phases:
        RUN.guard("decode_kernels", 30)(decode_kernels)(models, a.decode_tiles.split(",") if a.decode_tiles else None)
    if "decode" in phases:
        RUN.guard("decode", 30)(decode)(models, [int(t) for t in a.decode_tokens.split(",")],
                                        names=a.decode_tiles.split(",") if a.decode_tiles else None,
                                        profile_step=a.profile_step)
    if "batches" in phases:
        RUN.guard("batches", 30)(batches)("tiny" if models == ["tiny"] else "qwen2-57b-a14b")
    if "mid" in phases:
        RUN.guard("mid", 30)(mid)("tiny" if models == ["tiny"] else "mixtral-8x7b", big[0])
    if "large" in phases:
        RUN.guard("large", 40)(large)(a.large_models.split(",") if a.large_models else models, big, not a.no_peers,
                                          a.backward, a.router)
    RUN.log(f"done; errors: {len(RUN.report['errors'])}")


if __name__ == "__main__":
    main()
