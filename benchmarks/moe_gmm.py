"""Grouped-matmul suite: sparse_jax gmm, fused SwiGLU and gmm fwd+bwd beside ragged_dot, ragged_dot_mgpu
and torch._grouped_mm.

    python -m benchmarks.run --suite moe_gmm

Cases (``benchmarks.gmm_cases``): Mixtral-8x7B (E=8, K=4096, N=14336), DeepSeek-V3 (E=256,
K=7168, N=2048) and Qwen2-57B-A14B (E=64, K=3584, N=2560) expert shapes at M = 512, 4096,
32768 rows (tokens x top_k), uniform and Zipf(1.2) group sizes; bf16. Rows (suite "gmm"):

* ``sparse_jax/<backend>``: ``grouped_matmul`` with the shipped tiles, beside
  ``benchmarks.peers.gmm_peers``;
* "... swiglu": ``grouped_swiglu`` (``sparse_jax/<backend> fused``) vs two ``grouped_matmul``
  calls + silu * mul (``sparse_jax/<backend> 2 gmm``): the time and bytes the fusion saves;
* "... fwd+bwd" (M >= 4096, uniform): gradients of lhs and rhs, beside the peers' fwd+bwd.

Each row's ``extra``: ``weight_gbps`` (bytes of the non-empty groups' weights / time),
``floor_ms`` (those bytes at the measured copy bandwidth) and ``vs_floor``.

Subsets for a time-limited GPU run (environment): ``SJ_GMM_MODELS`` (comma list of
MODELS keys), ``SJ_GMM_ROWS`` (e.g. "512,4096"), ``SJ_GMM_DISTS``, ``SJ_GMM_BACKWARD``
("0" skips fwd+bwd), ``SJ_GMM_SWIGLU`` ("0" skips), ``SJ_GMM_PEERS`` ("0" skips peers).
"""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp

import sparse_jax
from benchmarks import flops as W
from benchmarks import gmm_cases as C
from benchmarks import timing
from benchmarks.timing import Result

QUICK_MODELS = {"tiny-4x64x96": (4, 64, 96), "tiny-16x32x64": (16, 32, 64)}
QUICK_ROWS = (48, 200)
SUITE = "gmm"


def _env_list(name, default, cast=str):
    v = os.environ.get(name)
    return tuple(cast(s) for s in v.split(",") if s.strip()) if v else tuple(default)


def _time(fn, make, quick):
    kw = dict(warmup=1, iters=3, rotations=1) if quick else dict(warmup=3, iters=20, rotations=2)
    return timing.time_fn(fn, make, **kw)


def _row(ctx, name, impl, shape, extra, fn, make, flops, bytes_, wbytes):
    extra = dict(extra)
    try:
        t = _time(fn, make, ctx.quick)
        r = Result(SUITE, name, impl, dict(shape), t.ms, flops=flops, bytes=bytes_, spread=t.spread, extra=extra)
        r.extra["weight_gbps"] = round(wbytes / (t.ms * 1e-3) / 1e9, 1)
        r.extra["vs_floor"] = round(t.ms / extra["floor_ms"], 3)
    except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the suite
        r = Result(SUITE, name, impl, dict(shape), None, flops=flops, bytes=bytes_,
                   error=f"{type(e).__name__}: {e}"[:600], extra=extra)
    finally:
        gc.collect()
    ctx.record(r)
    return r


def _peers(ctx, M, K, N, sizes, name, extra, backward, wbytes):
    from benchmarks.peers import gmm_peers
    rows = gmm_peers(M, K, N, sizes, jnp.bfloat16, backward=backward, name=name, suite=SUITE, extra=dict(extra))
    for r in rows:
        if r.time_ms:
            r.extra["weight_gbps"] = round(wbytes / (r.time_ms * 1e-3) / 1e9, 1)
            r.extra["vs_floor"] = round(r.time_ms / extra["floor_ms"], 3)
        ctx.record(r)
    return rows


def _case(ctx, model, E, K, N, M, dist, *, swiglu: bool, backward: bool, peers: bool):
    from benchmarks.peers import gmm_case_name
    dt = jnp.bfloat16
    sizes = C.group_sizes(M, E, dist)
    gs = jnp.asarray(sizes)
    wbytes = C.weight_bytes(sizes, K, N, 2)
    floor_ms = wbytes / (ctx.ceilings["copy_gbps"] * 1e9) * 1e3
    shape = dict(M=M, K=K, N=N, G=E, dist=dist, dtype="bfloat16")
    extra = dict(model=model, dist=dist, floor_ms=round(floor_ms, 4), plot=f"gmm_{model}", x="M", panel=dist,
                 plot_title=f"{model} expert gmm (K={K}, N={N}, E={E}, bf16)")
    kw = dict(backend=ctx.backend)
    out = []

    def make(i):
        return (timing.random_normal(10 * i + 1, (M, K), dt), timing.random_normal(2, (E, K, N), dt, K ** -0.5), gs)

    name = gmm_case_name(M, K, N, E) + f" {dist}"
    fwd = jax.jit(lambda x, w, g: sparse_jax.grouped_matmul(x, w, g, **kw))
    out.append(_row(ctx, name, f"sparse_jax/{ctx.backend}", shape, extra, fwd, make, W.gmm_flops(M, K, N),
                    W.gmm_bytes(M, K, N, E, 2), wbytes))
    if peers:
        out += _peers(ctx, M, K, N, sizes, name, extra, False, wbytes)

    if swiglu:
        sname = name + " swiglu"
        sextra = dict(extra, plot=f"gmm_swiglu_{model}", floor_ms=round(2 * floor_ms, 4))

        def make_s(i):
            x, w, g = make(i)
            return x, w, timing.random_normal(3, (E, K, N), dt, K ** -0.5), g

        def two_gmm(x, a, b, g):
            h = sparse_jax.grouped_matmul(x, a, g, **kw).astype(jnp.float32)
            return (jax.nn.silu(h) * sparse_jax.grouped_matmul(x, b, g, **kw)).astype(x.dtype)
        fused = jax.jit(lambda x, a, b, g: sparse_jax.grouped_swiglu(x, a, b, g, fused=True, **kw))
        fl = 2 * W.gmm_flops(M, K, N)
        by = float((M * K + 2 * E * K * N + M * N) * 2)
        rf = _row(ctx, sname, f"sparse_jax/{ctx.backend} fused", shape, sextra, fused, make_s, fl, by, 2 * wbytes)
        rs = _row(ctx, sname, f"sparse_jax/{ctx.backend} 2 gmm", shape, dict(sextra, summary=False), jax.jit(two_gmm),
                  make_s, fl, by + (M * K + 4 * M * N) * 2, 2 * wbytes)
        if rf.time_ms and rs.time_ms:
            rf.extra["note"] = (f"saves {rs.time_ms - rf.time_ms:.3f} ms and {(M * K + 4 * M * N) * 2 / 1e6:.0f} MB "
                                "of traffic vs 2 gmm")
        out += [rf, rs]

    if backward:
        bname = name + " fwd+bwd"

        def make_b(i):
            return (*make(i)[:2], gs, timing.random_normal(10 * i + 4, (M, N), dt))

        def fb(x, w, g, ct):
            o, pull = jax.vjp(lambda x, w: sparse_jax.grouped_matmul(x, w, g, **kw), x, w)
            return pull(ct)
        out.append(_row(ctx, bname, f"sparse_jax/{ctx.backend}", dict(shape, backward=True),
                        dict(extra, plot=f"gmm_bwd_{model}", floor_ms=round(2 * floor_ms, 4)), jax.jit(fb), make_b,
                        W.gmm_flops(M, K, N, backward=True), W.gmm_bytes(M, K, N, E, 2, backward=True), 2 * wbytes))
        if peers:
            out += _peers(ctx, M, K, N, sizes, bname, dict(extra, plot=f"gmm_bwd_{model}",
                                                           floor_ms=round(2 * floor_ms, 4)), True, 2 * wbytes)
    return out


def run(ctx) -> list[Result]:
    models = QUICK_MODELS if ctx.quick else C.MODELS
    models = {k: models[k] for k in _env_list("SJ_GMM_MODELS", models)}
    rows = _env_list("SJ_GMM_ROWS", QUICK_ROWS if ctx.quick else C.ROWS, int)
    dists = _env_list("SJ_GMM_DISTS", C.DISTS)
    backward = os.environ.get("SJ_GMM_BACKWARD", "1") != "0"
    swiglu = os.environ.get("SJ_GMM_SWIGLU", "1") != "0"
    peers = os.environ.get("SJ_GMM_PEERS", "1") != "0" and not ctx.quick
    plan = [(m, M, d) for m in models for M in rows for d in dists]
    out = []
    for model, M, dist in ctx.progress(plan, desc="gmm"):
        E, K, N = models[model]
        out += _case(ctx, model, E, K, N, M, dist, swiglu=swiglu and dist == "uniform",
                     backward=backward and dist == "uniform" and M >= min(rows[-1], 4096), peers=peers)
    return out
