"""MoE FFN layer suite: ``sparse_jax.moe.moe_ffn`` vs a ragged_dot MoE, a gather-einsum MoE and torch.

Cases: three model shapes (one layer, bf16) x T tokens x router ("uniform" or
"zipf": logits + ``benchmarks.peers.router_bias``, the same skew the torch peer uses).
Every implementation routes the same way (softmax top-k, renormalised), so they do
the same work:

* ``sparse_jax/<backend>``: :func:`sparse_jax.moe.moe_ffn` (sort, gather, grouped
  SwiGLU + down gmm kernels, float32 combine);
* ``ragged_dot``: the same pipeline written with ``jax.lax.ragged_dot`` and a
  ``segment_sum`` combine, differentiated by JAX;
* ``gather_einsum``: each token's k experts' weights gathered ([T, k, D, F]) and
  einsum'd, forward only and only while the gathered copy fits (decode sizes);
* ``torch_moe``: ``benchmarks.peers.torch_moe`` (``torch._grouped_mm``).

Forward latency at every T; forward + backward (gradients of x, router and all expert
weights) at T = 512, 2048, 8192; the Zipf router at T = 512, 8192 (``model_plan``: each
model's cases most important first; each model gets a weighted share of the suite's time
and skips, with a recorded reason, what does not fit). Each row's ``extra`` carries ``floor_ms``: the time to read the
active experts' weights once at the measured copy bandwidth, and ``vs_floor``.

Subsets for a time-limited GPU run (environment): ``SJ_MOE_MODELS`` (comma list of
MODELS keys), ``SJ_MOE_TOKENS`` (e.g. "1,32,512"), ``SJ_MOE_ROUTERS``,
``SJ_MOE_BACKWARD`` ("0" skips fwd+bwd), ``SJ_MOE_PEERS`` ("0" skips torch).
"""

from __future__ import annotations

import functools
import gc
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.timing import Result

# name -> (E, top_k, D, F)
MODELS = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen2-57b-a14b": (64, 4, 3584, 2560),  # top-4 as TritonMoE benchmarks it
    "deepseek-v3": (256, 8, 7168, 2048),
}
TOKENS = (1, 32, 128, 512, 2048, 8192)
BACKWARD_MIN_T = 512
ROUTERS = ("uniform", "zipf")
QUICK_MODELS = {"tiny": (8, 2, 64, 96)}
QUICK_TOKENS = (8, 64)
GATHER_BUDGET_BYTES = 8e9  # gather_einsum materialises T k 3 D F weights


# ----------------------------------------------------------------------------------- baselines
def _softmax_topk(x, router_weights, top_k):
    logits = jnp.dot(x, router_weights, preferred_element_type=jnp.float32)
    w, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return w / w.sum(-1, keepdims=True), ids


def ragged_dot_moe(x, router_weights, w_gate, w_up, w_down, *, top_k):
    """MoE FFN with jax.lax.ragged_dot: sort by expert, three ragged dots, segment_sum combine."""
    T = x.shape[0]
    E = w_gate.shape[0]
    w, ids = _softmax_topk(x, router_weights, top_k)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // top_k
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token]
    g = jax.lax.ragged_dot(xs, w_gate, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, w_up, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    out = jax.lax.ragged_dot(h, w_down, sizes, preferred_element_type=jnp.float32)
    out = out * w.reshape(-1)[order][:, None]
    return jax.ops.segment_sum(out, token, num_segments=T).astype(x.dtype)


def gather_einsum_moe(x, router_weights, w_gate, w_up, w_down, *, top_k):
    """MoE FFN by gathering each token's expert weights: [T, k, D, F] einsums."""
    w, ids = _softmax_topk(x, router_weights, top_k)
    f32 = jnp.float32
    g = jnp.einsum("td,tkdf->tkf", x, w_gate[ids], preferred_element_type=f32)
    u = jnp.einsum("td,tkdf->tkf", x, w_up[ids], preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jnp.einsum("tkf,tkfd->tkd", h, w_down[ids], preferred_element_type=f32)
    return jnp.einsum("tk,tkd->td", w, y).astype(x.dtype)


def _ours(backend):
    from sparse_jax import moe

    def f(x, router_weights, w_gate, w_up, w_down, *, top_k):
        return moe.moe_ffn(x, router_weights, w_gate, w_up, w_down, top_k=top_k, backend=backend)
    return f


def in_step(fn, layers: int, unroll: bool = False, glue: str = "select"):
    """fn applied ``layers`` times in one jitted loop, as a decode step runs its layers (no host
    dispatch or sync in between); x[:, 0] is reset to 1 each time (the router-bias column).
    ``unroll``: straight-line code instead of an XLA while loop (as a model whose layers are
    not scanned runs them). ``glue``: how column 0 is reset -- "select" (elementwise: XLA fuses
    it into the layer's last fusion, as a model's residual add would be) or "update" (rounds
    <= 12: ``.at[:, 0].set(1)``, a dynamic-update-slice kernel of its own, ~1.2 us per layer
    on an H100, plus a copy)."""
    def reset(y):
        if glue == "update":
            return y.at[:, 0].set(1)
        return jnp.where(jax.lax.broadcasted_iota(jnp.int32, y.shape, 1) == 0, jnp.ones((), y.dtype), y)

    def f(x, router_weights, w_gate, w_up, w_down):
        def body(_, h):
            return reset(fn(h, router_weights, w_gate, w_up, w_down).astype(h.dtype))
        return jax.lax.fori_loop(0, layers, body, x, unroll=unroll)
    return f


def _fwd_bwd(fn):
    def loss(x, rw, wg, wu, wd, ct):
        return jnp.sum(fn(x, rw, wg, wu, wd).astype(jnp.float32) * ct)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


# ----------------------------------------------------------------------------------------- cases
def _env_list(name, default, cast=str):
    v = os.environ.get(name)
    return tuple(cast(s) for s in v.split(",") if s.strip()) if v else tuple(default)


def _inputs(T, D, E, router, seed, dtype):
    """x [T, D] with x[:, 0] = 1 and router weights [D, E] whose row 0 is the router bias."""
    from benchmarks.peers import router_bias
    x = timing.random_normal(seed, (T, D), dtype).at[:, 0].set(1)
    rw = timing.random_normal(seed + 1, (D, E), dtype, scale=D ** -0.5)
    return x, rw.at[0].set(jnp.asarray(router_bias(E, router), dtype))


def _active_experts(x, rw, top_k):
    _, ids = _softmax_topk(x, rw, top_k)
    return int(np.unique(np.asarray(ids)).size)


def _time(fn, make, quick):
    kw = dict(warmup=1, iters=3, rotations=2) if quick else dict(warmup=2, iters=10, rotations=2)
    return timing.time_fn(fn, make, **kw)


def _row(ctx, name, impl, shape, extra, fn, make, flops, bytes_):
    extra = dict(extra)
    try:
        t = _time(fn, make, ctx.quick)
        r = Result("moe", name, impl, dict(shape), t.ms, flops=flops, bytes=bytes_, spread=t.spread, extra=extra)
        r.extra["vs_floor"] = round(t.ms / extra["floor_ms"], 3)
    except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the suite
        msg = f"{type(e).__name__}: {e}"
        r = Result("moe", name, impl, dict(shape), None, flops=flops, bytes=bytes_, error=msg[:600], extra=extra)
    finally:
        gc.collect()
    ctx.record(r)
    return r


def _case(ctx, model, E, k, D, F, T, router, weights, backward, peers, jitted):
    from benchmarks import flops as W
    from benchmarks.peers import moe_case_name
    dtype = weights[0].dtype
    itemsize = jnp.dtype(dtype).itemsize
    x0, rw = _inputs(T, D, E, router, 0, dtype)
    active = _active_experts(x0, rw, k)
    active_bytes = active * 3 * D * F * itemsize
    floor_ms = active_bytes / (ctx.ceilings["copy_gbps"] * 1e9) * 1e3
    name = moe_case_name(T, D, F, E, k, router=router, backward=backward)
    shape = dict(T=T, D=D, F=F, E=E, top_k=k, router=router, dtype=jnp.dtype(dtype).name, backward=backward)
    extra = dict(model=model, floor_ms=round(floor_ms, 4), active_experts=active, plot=f"moe_{model}"
                 + ("_fwdbwd" if backward else "_fwd"), x="T", panel=router, xscale="log", yscale="log",
                 y="tflops" if backward else "time_ms",
                 plot_title=f"{model} MoE layer {'fwd+bwd' if backward else 'forward'} (bf16)")
    flops = W.moe_flops(T, D, F, E, k, backward=backward)
    # Weights actually read (active experts only) + tokens in/out and the routed rows.
    bytes_ = float((active_bytes + (2 * T * D + 2 * T * k * (D + 3 * F)) * itemsize) * (2 if backward else 1))

    def make(i):
        x, _ = _inputs(T, D, E, router, 10 * i, dtype)
        args = (x, rw, *weights)
        return args + (timing.random_normal(10 * i + 5, (T, D), jnp.float32),) if backward else args

    impls = [(f"sparse_jax/{ctx.backend}", _ours(ctx.backend)), ("ragged_dot", ragged_dot_moe)]
    if not backward and T * k * 3 * D * F * itemsize <= GATHER_BUDGET_BYTES:
        impls.append(("gather_einsum", gather_einsum_moe))
    out = []
    if peers:  # torch first: its arrays must fit before JAX's pool grows with this case's temporaries
        out.extend(_torch_rows(ctx, T, D, F, E, k, dtype, backward, router, name, extra))
    for impl, f in impls:
        key = (impl, k, backward)  # one jitted function per model: the routers share executables
        if key not in jitted:
            f = functools.partial(f, top_k=k)
            jitted[key] = jax.jit(_fwd_bwd(f) if backward else f)
        out.append(_row(ctx, name, impl, shape, extra, jitted[key], make, flops, bytes_))
    return out


def _torch_rows(ctx, T, D, F, E, k, dtype, backward, router, name, extra):
    try:
        from benchmarks.peers import torch_moe
    except ImportError as e:  # the peers module is optional
        return [ctx.record(Result("moe", name, "torch_moe", {}, None, error=f"peers unavailable: {e}"))]
    rows = torch_moe(T, D, F, E, k, dtype, backward=backward, router=router, name=name, suite="moe",
                     extra=dict(extra))
    for r in rows:
        if r.time_ms:
            r.extra["vs_floor"] = round(r.time_ms / extra["floor_ms"], 3)
        ctx.record(r)
    return rows


def _weights(E, D, F, dtype, seed=100):
    return (timing.random_normal(seed, (E, D, F), dtype, scale=D ** -0.5),
            timing.random_normal(seed + 1, (E, D, F), dtype, scale=D ** -0.5),
            timing.random_normal(seed + 2, (E, F, D), dtype, scale=F ** -0.5))


# Share of the suite's time per model (Mixtral first: the README's headline plots).
MODEL_WEIGHTS = {"mixtral-8x7b": 0.45, "qwen2-57b-a14b": 0.25, "deepseek-v3": 0.30}
# T of the fwd+bwd and of the Zipf-router cases (full runs; uniform fwd runs every T).
BACKWARD_TOKENS = (512, 2048, 8192)
ZIPF_TOKENS = (512, 8192)


def model_plan(tokens, routers, backward: bool, bwd_min: int, quick: bool) -> list[tuple[int, str, bool]]:
    """One model's (T, router, backward) cases, most important first: uniform forward at every
    T, uniform fwd+bwd, then the Zipf router (forward, then fwd+bwd at the smallest T)."""
    first, rest = routers[0], routers[1:]
    bwd_t = [T for T in tokens if T >= bwd_min and (quick or T in BACKWARD_TOKENS)] if backward else []
    out = [(T, first, False) for T in tokens] + [(T, first, True) for T in bwd_t]
    for r in rest:
        zt = [T for T in tokens if quick or T in ZIPF_TOKENS] or list(tokens[-1:])
        out += [(T, r, False) for T in zt] + [(T, r, True) for T in bwd_t[:1]]
    return out


def _est_s(T, backward):
    return (6.0 if backward else 3.0) + (3.0 if T >= 8192 else 0.0)


def run(ctx) -> list[Result]:
    import time
    models = QUICK_MODELS if ctx.quick else MODELS
    names = _env_list("SJ_MOE_MODELS", models)
    tokens = _env_list("SJ_MOE_TOKENS", QUICK_TOKENS if ctx.quick else TOKENS, int)
    routers = _env_list("SJ_MOE_ROUTERS", ROUTERS[:1] if ctx.quick else ROUTERS)
    backward = os.environ.get("SJ_MOE_BACKWARD", "1") != "0"
    peers = os.environ.get("SJ_MOE_PEERS", "1") != "0" and not ctx.quick
    bwd_min = QUICK_TOKENS[-1] if ctx.quick else BACKWARD_MIN_T
    dtype = jnp.bfloat16
    results: list[Result] = []
    for mi, model in enumerate(names):
        E, k, D, F = models[model]
        cases = model_plan(tokens, routers, backward, bwd_min, ctx.quick)
        left = ctx.time_left()
        deadline = None
        if left is not None:  # this model's share of what is left; unused time flows to the next
            w = [MODEL_WEIGHTS.get(m, 1.0 / len(names)) for m in names[mi:]]
            deadline = time.monotonic() + left * w[0] / sum(w)
        weights, jitted = None, {}
        gc.collect()
        jax.clear_caches()
        weights = _weights(E, D, F, dtype)  # one layer at a time (DeepSeek-V3: 22.5 GB in bf16)
        skipped = []
        for T, router, bwd in ctx.progress(cases, desc=f"moe {model}"):
            if deadline is not None and deadline - time.monotonic() < _est_s(T, bwd):
                skipped.append(f"T={T} {router}{' fwd+bwd' if bwd else ''}")
                continue
            results.extend(_case(ctx, model, E, k, D, F, T, router, weights, bwd, peers, jitted))
        if skipped:
            ctx.log(f"{model}: out of its time share, skipped " + ", ".join(skipped))
            results.append(ctx.record(Result("moe", f"{model} skipped cases", f"sparse_jax/{ctx.backend}",
                                             dict(model=model), None, extra=dict(summary=False),
                                             error="skipped: out of the model's time share: "
                                                   + ", ".join(skipped))))
        weights, jitted = None, {}
    return results
