"""One-call GPU script for the Mosaic GPU forward gmm (``pallas_kernels/mosaic_gpu/gmm_fwd.py``).

Phases (budget-guarded; JSON ``$OUT/tune_gmm_mgpu.json`` rewritten after each):

* ``check`` -- compiled kernel vs the XLA reference (float32 math): gmm, fused SwiGLU forward and
  its saving form under ``jax.vjp`` (with the Triton backward), trailing zero rows, an empty group,
  ``group_offset``, fp16, few rows; a group that breaks the 8-row promise gives NaN rows and the
  others stay exact; the MoE layer on padded dispatch vs the Triton layer, forward and gradients.
* ``ops`` -- the layer's two grouped products at Mixtral T = 512 / 2048 and at T = 1 for all
  three models: Mosaic GPU (padded rows, aligned groups) under config variants vs the Triton
  kernels on the unpadded rows vs ``torch._grouped_mm``, each against the weight-read floor.
* ``shapes`` -- what a tile's cost follows: Mixtral's down projection (and gate+up) over 8 groups of
  equal size (64, 128, 136, 192, 256 rows: one to four 64-row chunks, 136 = a full tile plus an
  8-row tail) and the padded uniform router at T = 512, Mosaic GPU configs vs Triton. If time
  follows the chunks computed, the kernels are MMA-bound; if it follows the weight bytes, memory-bound.
* ``layer`` -- ``moe_ffn`` by default (unpadded + Triton), explicitly on Triton, with
  ``SPARSE_JAX_GPU_GMM_FWD=mosaic_gpu`` (padded dispatch + Mosaic GPU) and its per-op variants,
  beside ragged_dot and the torch MoE; forward at T = 512 / 2048,
  decode steps at T = 1 / 32 (8 layers in one jitted loop), forward + backward at T = 512.

    PYTHONPATH=. timeout 590 python benchmarks/tune_gmm_mgpu.py --budget-s 560
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
import numpy as np  # noqa: E402

from benchmarks import moe as B  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.tune_run import TuneRun, env_choice, floor_ms, measure, rel_err  # noqa: E402
from pallas_kernels.mosaic_gpu import gmm_fwd  # noqa: E402
from pallas_kernels.triton import gmm as triton_gmm  # noqa: E402
from pallas_kernels.triton import grouped_matmul as tgm  # noqa: E402
from sparse_jax import moe, ops, reference  # noqa: E402
from sparse_jax.moe.dispatch import expand, plan_dispatch  # noqa: E402

ENV = tgm.FWD_IMPL_ENV
MODELS = {**B.MODELS, **B.QUICK_MODELS}
RUN = TuneRun("tune_gmm_mgpu", {"errors": [], "check": [], "ops": [], "shapes": [], "split": [], "layer": []})


def _rnd(seed, shape, dtype=jnp.bfloat16, scale=1.0):
    return timing.random_normal(seed, shape, dtype, scale)


def _aligned_sizes(seed, G, total, empty=()):
    """G sizes, multiples of 8, summing to ``total`` (a multiple of 8); groups in ``empty`` get 0."""
    rng = np.random.default_rng(seed)
    w = rng.random(G)
    w[list(empty)] = 0
    units = total // 8
    s = np.floor(w / w.sum() * units).astype(int)
    s[np.argmax(w)] += units - s.sum()
    return jnp.asarray(s * 8, jnp.int32)


# ---------------------------------------------------------------------------------------- check
def _check_row(name, outs, refs, grads=None, grad_refs=None, tol=2e-2):
    row = dict(case=name)
    row["fwd_err"] = max(rel_err(o, r) for o, r in zip(outs, refs))
    if grads is not None:
        row["grad_err"] = max(rel_err(g, r) for g, r in zip(grads, grad_refs))
    row["ok"] = bool(row["fwd_err"] < tol and row.get("grad_err", 0.0) < tol)
    RUN.report["check"].append(row)
    RUN.log(row)


def _mgpu():
    """The Mosaic GPU forward is opt-in (``auto`` runs Triton): ask for it."""
    return env_choice(ENV, "mosaic_gpu")


def check():
    with _mgpu():
        _check()


def _check():
    cases = [  # name, M, K, N, G, dtype, sizes, offset
        ("gmm tail+empty", 1096, 512, 768, 6, jnp.bfloat16, _aligned_sizes(0, 6, 1000, empty=(2,)), None),
        ("gmm fp16", 512, 256, 512, 4, jnp.float16, _aligned_sizes(1, 4, 512), None),
        ("gmm offset", 640, 384, 256, 3, jnp.bfloat16, _aligned_sizes(2, 8, 600), jnp.int32(2)),
        ("gmm few rows", 32, 1024, 1024, 4, jnp.bfloat16, jnp.full((4,), 8, jnp.int32), None),
        ("gmm 300 rows/group", 1208, 256, 512, 4, jnp.bfloat16, jnp.asarray([304, 296, 8, 592], jnp.int32), None),
    ]
    for name, M, K, N, G, dt, gs, off in cases:
        x, w = _rnd(1, (M, K), dt), _rnd(2, (G, K, N), dt, K ** -0.5)
        f = jax.jit(lambda x, w, gs: ops.grouped_matmul(x, w, gs, group_offset=off, row_align=8))
        ref = reference.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), gs, group_offset=off)
        _check_row(name, [f(x, w, gs)], [ref])
    # fused SwiGLU: forward (SWIGLU) and under vjp (SWIGLU_SAVE + the Triton backward)
    M, K, F, G = 1096, 512, 384, 6
    gs = _aligned_sizes(3, G, 1040, empty=(4,))
    x, wg, wu = _rnd(3, (M, K)), _rnd(4, (G, K, F), scale=K ** -0.5), _rnd(5, (G, K, F), scale=K ** -0.5)
    dh = _rnd(6, (M, F))
    f = lambda x, a, b: ops.grouped_swiglu(x, a, b, gs, row_align=8)  # noqa: E731
    r = lambda x, a, b: reference.grouped_swiglu(x, a, b, gs)  # noqa: E731
    f32 = [a.astype(jnp.float32) for a in (x, wg, wu)]
    h, vjp = jax.vjp(f, x, wg, wu)
    h_ref, vjp_ref = jax.vjp(r, *f32)
    _check_row("swiglu fwd", [jax.jit(f)(x, wg, wu)], [h_ref])
    _check_row("swiglu vjp", [h], [h_ref], vjp(dh), vjp_ref(dh.astype(jnp.float32)))
    # broken promise: the whole output is NaN
    gs_bad = jnp.asarray([16, 13, 19, 8], jnp.int32)
    x, w = _rnd(7, (64, 256)), _rnd(8, (4, 256, 256), scale=1 / 16)
    out = np.asarray(jax.jit(lambda x, w: ops.grouped_matmul(x, w, gs_bad, row_align=8))(x, w), np.float32)
    RUN.report["check"].append(row := dict(case="broken promise", all_nan=bool(np.isnan(out).all()),
                                           ok=bool(np.isnan(out).all())))
    RUN.log(row)
    # both tile heights
    for chunks in (1, 2):
        M, K, N, G = 1096, 512, 768, 6
        gs = _aligned_sizes(14, G, 1000, empty=(3,))
        x, w = _rnd(15, (M, K)), _rnd(16, (G, K, N), scale=K ** -0.5)
        with gmm_fwd.override(C(chunks=chunks)):
            out = jax.jit(lambda x, w, gs: ops.grouped_matmul(x, w, gs, row_align=8))(x, w, gs)
        _check_row(f"gmm chunks={chunks}", [out], [reference.grouped_matmul(x.astype(jnp.float32),
                                                                            w.astype(jnp.float32), gs)])
    # the layer: padded dispatch + Mosaic GPU vs the Triton layer
    T, E, k, D, F = 200, 8, 2, 512, 1024
    x = _rnd(9, (T, D))
    rw = _rnd(10, (D, E), scale=D ** -0.5)
    ws = (_rnd(11, (E, D, F), scale=D ** -0.5), _rnd(12, (E, D, F), scale=D ** -0.5), _rnd(13, (E, F, D), scale=F ** -0.5))
    layer = lambda *a: moe.moe_ffn(*a, top_k=k)  # noqa: E731
    loss = lambda *a: jnp.sum(layer(*a).astype(jnp.float32) ** 2)  # noqa: E731
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, rw, *ws)
    with env_choice(ENV, "triton"):
        grads_t = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, rw, *ws)
        y_t = jax.jit(layer)(x, rw, *ws)
    _check_row("layer padded vs triton", [jax.jit(layer)(x, rw, *ws)], [y_t], grads[1], grads_t[1])
    RUN.save()


# ------------------------------------------------------------------------------------------ ops
C = gmm_fwd.MgpuGmmConfig
CONFIGS = {"default": None, "c1": C(chunks=1), "c1_tn128": C(chunks=1, tn=128), "c2_s2": C(chunks=2, stages=2),
           "c1_tn256": C(chunks=1, tn=256), "c1_tn64": C(chunks=1, tn=64),
           "c2_tn64": C(chunks=2, tn=64), "c1_s2": C(chunks=1, stages=2), "c2_s4": C(chunks=2, stages=4),
           "c1_nooob": C(chunks=1, oob_empty_chunks=False), "c2_nooob": C(chunks=2, oob_empty_chunks=False)}


def _cfg(name):
    c = CONFIGS[name]
    return gmm_fwd.override(c) if c else contextlib.nullcontext()


def ops_phase(cases):
    for model, T, configs in cases:
        E, k, D, F = MODELS[model]
        wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
        x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
        r = moe.route(moe.router_logits(x, rw), k)
        plan = plan_dispatch(r.expert_ids, E)
        plan8 = plan_dispatch(r.expert_ids, E, row_align=8)
        xs, xs8 = expand(x, plan, k), expand(x, plan8, k)
        gs, gs8 = plan.group_sizes, plan8.group_sizes
        active = int(np.count_nonzero(np.asarray(gs)))
        with env_choice(ENV, "triton"):
            h = jax.jit(lambda *a: ops.grouped_swiglu(*a))(xs, wg, wu, gs)
        with _mgpu():
            h8 = jax.jit(lambda *a: ops.grouped_swiglu(*a, row_align=8))(xs8, wg, wu, gs8)
        even = jnp.full((E,), int(xs.shape[0]) // E // 8 * 8, jnp.int32)  # a diagnostic: no partial tiles
        base = dict(model=model, T=T, rows=int(xs.shape[0]), padded_rows=int(np.asarray(gs8).sum()), active=active)
        for op, nw, fn, args, fn8, args8 in (
                ("gate_up", 2, lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g), (xs, wg, wu, gs),
                 lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g, row_align=8, fused=True), (xs8, wg, wu, gs8)),
                ("gate_up_two_gmm", 2, lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g), (xs, wg, wu, gs),
                 lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g, row_align=8, fused=False), (xs8, wg, wu, gs8)),
                ("down", 1, lambda h, w, g: ops.grouped_matmul(h, w, g), (h, wd, gs),
                 lambda h, w, g: ops.grouped_matmul(h, w, g, row_align=8), (h8, wd, gs8)),
                ("down_even_groups", 1, lambda h, w, g: ops.grouped_matmul(h, w, g), (h, wd, even),
                 lambda h, w, g: ops.grouped_matmul(h, w, g, row_align=8), (h, wd, even))):
            if op == "down_even_groups" and (model != "mixtral-8x7b" or int(even[0]) < 64):
                continue
            if RUN.left() < 20:
                return
            row = dict(base, op=op, floor_ms=round(floor_ms(active * nw * D * F * 2), 4))
            with env_choice(ENV, "triton"):
                measure(row, "triton_ms", fn, args)
            for c in configs:
                measure(row, f"mgpu_{c}_ms", fn8, args8, _cfg(c), _mgpu())
            try:
                from benchmarks import peers_torch
                K, N = (D, F) if op == "gate_up" else (F, D)
                t = peers_torch.time_grouped_mm(int(xs.shape[0]), K, N, np.asarray(gs), jnp.bfloat16)
                row["torch_grouped_mm_ms"] = round(t.ms * nw, 4)  # gate and up: two products
                peers_torch.free_memory()
            except Exception as e:  # noqa: BLE001
                row["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            best = min((v for key, v in row.items() if key.startswith("mgpu_") and key.endswith("_ms")), default=None)
            if best:
                row["best_mgpu_vs_floor"] = round(best / row["floor_ms"], 3)
            RUN.report["ops"].append(row)
            RUN.log(row)
        del wg, wu, wd
        gc.collect()
        RUN.save()


# --------------------------------------------------------------------------------------- shapes
def _no_split():
    """The Triton forward without its split last wave (round 11's change)."""
    return mock.patch.object(triton_gmm, "SPLIT_LAST_WAVE", False)


SHAPE_SIZES = (64, 128, 136, 192, 256)


def shapes_phase(configs_down, configs_gate_up, sizes=SHAPE_SIZES, T=512):
    E, k, D, F = MODELS["mixtral-8x7b"]
    wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
    x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
    r = moe.route(moe.router_logits(x, rw), k)
    routed = plan_dispatch(r.expert_ids, E, row_align=8).group_sizes
    patterns = [(f"{s}x{E}", jnp.full((E,), s, jnp.int32)) for s in sizes] + [(f"uniform T={T}", routed)]
    for op, nw, K, N in (("down", 1, F, D), ("gate_up", 2, D, F)):
        configs = configs_down if op == "down" else configs_gate_up
        for name, gs in patterns:
            if RUN.left() < 20:
                return
            M = int(np.asarray(gs).sum())
            xs = _rnd(20 + M, (M, K), scale=1.0)
            row = dict(op=op, groups=name, rows=M, sizes=[int(v) for v in np.asarray(gs)],
                       chunks64=int(sum(-(-int(v) // 64) for v in np.asarray(gs))),
                       floor_ms=round(floor_ms(E * nw * K * N * 2), 4))
            if op == "down":
                fn = lambda h, w, g: ops.grouped_matmul(h, w, g)  # noqa: E731
                fn8 = lambda h, w, g: ops.grouped_matmul(h, w, g, row_align=8)  # noqa: E731
                args = (xs, wd, gs)
            else:
                fn = lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g)  # noqa: E731
                fn8 = lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g, row_align=8, fused=True)  # noqa: E731
                args = (xs, wg, wu, gs)
            with env_choice(ENV, "triton"):
                measure(row, "triton_ms", fn, args)
                measure(row, "triton_nosplit_ms", fn, args, _no_split())
                if op == "gate_up":
                    measure(row, "triton_fused_ms", fn8, args)
                    measure(row, "triton_fused_nosplit_ms", fn8, args, _no_split())
            for c in configs:
                measure(row, f"mgpu_{c}_ms", fn8, args, _cfg(c), _mgpu())
            for key in [key for key in row if key.endswith("_ms") and key != "floor_ms"]:
                row[key.replace("_ms", "_tflops")] = round(2 * row["chunks64"] * 64 * K * N * nw / row[key] / 1e9, 1)
            RUN.report["shapes"].append(row)
            RUN.log(row)
            RUN.save()


# ---------------------------------------------------------------------------------------- split
SPLIT_VARIANTS = {  # name -> contexts: the Triton forward's split last wave and one-band order (round 11)
    "default": lambda: (),
    "nosplit": lambda: (_no_split(),),
    "band8": lambda: (mock.patch.object(triton_gmm, "ONE_BAND_ROWS", 0),),
    "neither": lambda: (_no_split(), mock.patch.object(triton_gmm, "ONE_BAND_ROWS", 0)),
}


def split_phase(cases=(("gate", "uniform"), ("down", "uniform"), ("gate", "128x8"), ("swiglu_fused", "uniform")),
                calls=20):
    """One gmm (or the fused SwiGLU) of Mixtral at T = 512 under each SPLIT_VARIANTS entry: time and
    the profile's per-kernel GPU time (matmul, fixup, anything XLA adds), idle gaps and span."""
    from benchmarks.tune_run import profile_kernels
    E, k, D, F = MODELS["mixtral-8x7b"]
    wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
    x, rw = B._inputs(512, D, E, "uniform", 0, jnp.bfloat16)
    r = moe.route(moe.router_logits(x, rw), k)
    groups = {"uniform": plan_dispatch(r.expert_ids, E).group_sizes,
              **{f"{s}x{E}": jnp.full((E,), s, jnp.int32) for s in (128, 256)}}
    for op, name in cases:
        gs = groups[name]
        M = int(np.asarray(gs).sum())
        K, N = (F, D) if op == "down" else (D, F)
        xs = _rnd(30 + M, (M, K))
        if op == "swiglu_fused":
            fn, args = (lambda x, a, b, g: ops.grouped_swiglu(x, a, b, g, fused=True)), (xs, wg, wu, gs)
        else:
            fn, args = (lambda h, w, g: ops.grouped_matmul(h, w, g)), (xs, wd if op == "down" else wg, gs)
        for variant, make in SPLIT_VARIANTS.items():
            if RUN.left() < 20:
                return
            row = dict(op=op, groups=name, rows=M, variant=variant)
            with env_choice(ENV, "triton"):
                measure(row, "ms", fn, args, *make())
                try:
                    kernels = profile_kernels(fn, args, calls, *make())
                    row["kernels"] = [dict(kernel=q["kernel"][:60], **{k_: v for k_, v in q.items() if k_ != "kernel"})
                                      for q in kernels[:8]]
                except Exception as e:  # noqa: BLE001
                    row["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            RUN.report["split"].append(row)
            RUN.log(row)
            RUN.save()


# ---------------------------------------------------------------------------------------- layer
LAYER_VARIANTS = {  # name -> contexts: which forwards run Mosaic GPU on the padded rows
    "mgpu": lambda: (_mgpu(),),
    "mgpu_down_only": lambda: (_mgpu(), mock.patch.object(gmm_fwd, "FUSIONS", ("gmm",))),
    "mgpu_two_gmm": lambda: (_mgpu(), mock.patch.object(tgm, "fuse_swiglu", lambda *a, **k: False)),
}


def layer_phase(fwd_cases, step_cases, bwd_cases, peers: bool):
    for mode, cases in (("fwd", fwd_cases), ("step", step_cases), ("fwd_bwd", bwd_cases)):
        for model, T in cases:
            if RUN.left() < 30:
                return
            E, k, D, F = MODELS[model]
            x, rw = B._inputs(T, D, E, "uniform", 0, jnp.bfloat16)
            active = B._active_experts(x, rw, k)
            row = dict(mode=mode, model=model, T=T, floor_ms=round(floor_ms(active * 3 * D * F * 2), 4))
            if peers and mode != "step" and model != "deepseek-v3":
                try:
                    from benchmarks import peers_torch
                    from benchmarks.peers import router_bias
                    t = peers_torch.time_moe(T, D, F, E, k, jnp.bfloat16, router_bias(E, "uniform"),
                                             backward=mode == "fwd_bwd")
                    row["torch_ms"] = round(t.ms, 4)
                    peers_torch.free_memory()
                except Exception as e:  # noqa: BLE001
                    row["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            wg, wu, wd = B._weights(E, D, F, jnp.bfloat16)
            args = (x, rw, wg, wu, wd)
            ours = functools.partial(B._ours(None), top_k=k)
            ragged = functools.partial(B.ragged_dot_moe, top_k=k)
            L = 8
            if mode == "step":
                ours, ragged = B.in_step(ours, L), B.in_step(ragged, L)
            elif mode == "fwd_bwd":
                ours, ragged = B._fwd_bwd(ours), B._fwd_bwd(ragged)
                args = args + (timing.random_normal(5, (T, D), jnp.float32),)
            per = L if mode == "step" else 1
            if model != "deepseek-v3" or mode == "step":
                measure(row, "ragged_dot_ms", ragged, args)
            measure(row, "ours_ms", ours, args)
            with env_choice(ENV, "triton"):
                measure(row, "ours_triton_ms", ours, args)
            for name, patch in LAYER_VARIANTS.items():
                measure(row, f"ours_{name}_ms", ours, args, *patch())
            if model != "deepseek-v3" or mode == "step":
                measure(row, "ragged_dot_again_ms", ragged, args)
            for key in ("ragged_dot_ms", "ours_ms", "ours_triton_ms", "ragged_dot_again_ms",
                        *(f"ours_{n}_ms" for n in LAYER_VARIANTS)):
                if key in row:
                    row[key] = round(row[key] / per, 4)
            if "ours_ms" in row:
                row["vs_floor"] = round(row["ours_ms"] / row["floor_ms"], 3)
                for key in ("ragged_dot_ms", "ragged_dot_again_ms", "torch_ms", "ours_triton_ms"):
                    if key in row:
                        row[f"x_{key[:-3]}"] = round(row[key] / row["ours_ms"], 3)
            RUN.report["layer"].append(row)
            RUN.log(row)
            del wg, wu, wd, args
            gc.collect()
            RUN.save()


def _pairs(s):
    return [(m, int(t)) for m, t in (p.split(":") for p in s.split(",") if p)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--phases", default="check,ops,layer")
    ap.add_argument("--ops", default="mixtral-8x7b:512,qwen2-57b-a14b:1,mixtral-8x7b:2048,deepseek-v3:1,mixtral-8x7b:1")
    ap.add_argument("--configs", default="default,c1,c1_tn128,c2_s2,c2_tn64")
    ap.add_argument("--shape-configs-down", default="default,c1,c1_tn128")
    ap.add_argument("--shape-configs-gate-up", default="default,c1")
    ap.add_argument("--fwd", default="mixtral-8x7b:512,mixtral-8x7b:2048,qwen2-57b-a14b:512,deepseek-v3:512")
    ap.add_argument("--step", default="qwen2-57b-a14b:1,mixtral-8x7b:1,deepseek-v3:1,qwen2-57b-a14b:32")
    ap.add_argument("--bwd", default="mixtral-8x7b:512,qwen2-57b-a14b:512")
    ap.add_argument("--no-peers", action="store_true")
    a = ap.parse_args()
    RUN.budget_s = a.budget_s
    RUN.report["env"] = timing.environment()
    RUN.report["ceilings"] = timing.ceilings()
    phases = a.phases.split(",")
    if "check" in phases:
        RUN.guard("check", 30)(check)()
    if "ops" in phases:
        configs = a.configs.split(",")
        RUN.guard("ops", 30)(ops_phase)([(m, t, configs) for m, t in _pairs(a.ops)])
    if "shapes" in phases:
        down, gate_up = ([c for c in v.split(",") if c] for v in (a.shape_configs_down, a.shape_configs_gate_up))
        RUN.guard("shapes", 30)(shapes_phase)(down, gate_up)
    if "split" in phases:
        RUN.guard("split", 30)(split_phase)()
    if "layer" in phases:
        RUN.guard("layer", 30)(layer_phase)(_pairs(a.fwd), _pairs(a.step), _pairs(a.bwd), not a.no_peers)
    RUN.log(f"done; errors: {len(RUN.report['errors'])}")


if __name__ == "__main__":
    main()
