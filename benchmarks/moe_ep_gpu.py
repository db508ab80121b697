"""Expert parallelism on several GPUs: check ``moe_ffn_ep`` equals ``moe_ffn``, then time both.

    python -m benchmarks.moe_ep_gpu                 # all local GPUs (2x H200 expected)
    python -m benchmarks.moe_ep_gpu --quick         # small shapes
    python -m benchmarks.moe_ep_gpu --cpu-devices 4 --quick   # smoke run on host devices

1. Correctness (bf16 and float32): forward and the gradients of x, router and the
   expert weights, EP vs single device, and both vs the float32 per-token reference.
2. Timing: one layer (bf16) per model shape, the single-device layer (all experts and
   tokens on GPU 0) vs EP over P GPUs (tokens and experts split P ways), forward and
   forward + backward: exact (dropless) padded exchange, ``exchange_capacity_factor=1.25``
   (less padding and traffic; may drop a few assignments: for timing only) and the
   exact ragged exchange (``ragged_all_to_all``: only real rows travel).

Prints a table last; writes ``$OUT/moe_ep_gpu.json`` (OUT defaults to /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--cpu-devices", type=int, default=0, help="run on N host CPU devices (smoke test)")
    p.add_argument("--models", default="mixtral-8x7b,qwen2-57b-a14b,deepseek-v3")
    p.add_argument("--tokens", default="2048,8192")
    return p.parse_args(argv)


ARGS = _args() if __name__ == "__main__" else _args([])
if ARGS.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import timing  # noqa: E402
from sparse_jax import backends, moe, reference  # noqa: E402

MODELS = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen2-57b-a14b": (64, 4, 3584, 2560),
          "deepseek-v3": (256, 8, 7168, 2048)}


def _problem(T, D, E, F, dtype, seed=0):
    r = lambda i, s, scale=1.0: timing.random_normal(seed + i, s, dtype, scale)  # noqa: E731
    return (r(0, (T, D)), r(1, (D, E), D ** -0.5), r(2, (E, D, F), D ** -0.5), r(3, (E, D, F), D ** -0.5),
            r(4, (E, F, D), F ** -0.5))


def _rel(a, b):
    a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _grad_fn(layer):
    def loss(args, ct):
        return jnp.sum(layer(*args).astype(jnp.float32) * ct)
    return jax.jit(jax.value_and_grad(loss))


def check(mesh, backend, dtype, T, D, E, F, k, exchange="padded", **kw):
    """EP vs single device vs float32 reference -> dict of relative errors."""
    args = _problem(T, D, E, F, dtype, seed=1)
    ct = timing.random_normal(9, (T, D), jnp.float32)
    single = lambda *a: moe.moe_ffn(*a, top_k=k, backend=backend, **kw)  # noqa: E731
    ep = lambda *a: moe.moe_ffn_ep(*a, mesh=mesh, axis_name="ep", top_k=k, backend=backend,  # noqa: E731
                                   exchange=exchange, **kw)
    ref = lambda *a: reference.moe_ffn(*[x.astype(jnp.float32) for x in a], top_k=k, **kw)  # noqa: E731
    y1, y2, yr = jax.jit(single)(*args), jax.jit(ep)(*args), jax.jit(ref)(*args)
    (_, g1), (_, g2), (_, gr) = (_grad_fn(f)(args, ct) for f in (single, ep, ref))
    out = {"y ep/single": _rel(y2, y1), "y single/ref": _rel(y1, yr), "y ep/ref": _rel(y2, yr)}
    for n, a, b, c in zip(("x", "router", "w_gate", "w_up", "w_down"), g2, g1, gr):
        out[f"d{n} ep/single"] = _rel(a, b)
        out[f"d{n} ep/ref"] = _rel(a, c)
    return out


def _sharded(mesh, arrays, specs):
    return tuple(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs))


def time_model(mesh, backend, model, T, quick):
    E, k, D, F = MODELS[model]
    if quick:
        E, k, D, F = min(E, 16), min(k, 4), 64, 64
    dtype = jnp.bfloat16
    dev0 = jax.devices()[0]
    host = _problem(T, D, E, F, dtype, seed=3)
    ct = timing.random_normal(8, (T, D), jnp.float32)
    rows = []
    kw = dict(warmup=1, iters=3, rotations=1) if quick else dict(warmup=3, iters=20, rotations=1)
    variants = [("single", None, "padded"), ("ep exact", None, "padded"), ("ep f=1.25", 1.25, "padded"),
                ("ep ragged", None, "ragged")]
    for label, f, exchange in variants:
        if exchange == "ragged" and ARGS.cpu_devices:
            continue
        if label == "single":
            args = tuple(jax.device_put(a, dev0) for a in host)
            layer = lambda *a: moe.moe_ffn(*a, top_k=k, backend=backend)  # noqa: E731
            ct_ = jax.device_put(ct, dev0)
        else:
            args = _sharded(mesh, host, (P("ep"), P(), P("ep"), P("ep"), P("ep")))
            layer = (lambda f_, x_: lambda *a: moe.moe_ffn_ep(
                *a, mesh=mesh, axis_name="ep", top_k=k, backend=backend, exchange_capacity_factor=f_,
                exchange=x_))(f, exchange)
            ct_ = jax.device_put(ct, NamedSharding(mesh, P("ep")))
        for what in ("fwd", "fwd+bwd"):
            fn = jax.jit(layer) if what == "fwd" else _grad_fn(layer)
            make = (lambda i: args) if what == "fwd" else (lambda i: (args, ct_))
            flops = 6 * T * k * D * F * (3 if what == "fwd+bwd" else 1)
            try:
                t = timing.time_fn(fn, make, **kw)
                rows.append(dict(model=model, T=T, variant=label, what=what, ms=t.ms, spread=t.spread,
                                 tflops=flops / t.median_s / 1e12))
            except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
                rows.append(dict(model=model, T=T, variant=label, what=what, ms=None, error=f"{type(e).__name__}: "
                                 f"{str(e)[:300]}"))
            del fn
        del args
    return rows


def main():
    n = jax.device_count()
    env = timing.environment()
    print(f"devices: {n} x {env['device']}, jax {env['jax']}", flush=True)
    if n < 2:
        print("expert parallelism needs >= 2 devices; nothing to do", flush=True)
        return 1
    P_ = 1 << (n.bit_length() - 1)  # a power of two dividing every model's E
    mesh = jax.make_mesh((P_,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:P_])
    backend = backends.default_backend()
    out = {"env": env, "devices": P_, "backend": backend, "checks": {}, "timings": []}

    t0 = time.time()
    checks = {"bf16 T=1000 E=16 k=4": (jnp.bfloat16, 1000, 512, 16, 384, 4, {}),
              "f32 T=333 E=8 k=2 capacity": (jnp.float32, 333, 256, 8, 128, 2, dict(capacity_factor=1.0))}
    if ARGS.quick:
        checks = {"bf16 T=50 E=8 k=2": (jnp.bfloat16, 50, 64, 8, 32, 2, {}),
                  "f32 T=33 E=8 k=2 capacity": (jnp.float32, 33, 32, 8, 16, 2, dict(capacity_factor=1.0))}
    if not ARGS.cpu_devices:  # XLA:CPU has no ragged-all-to-all
        checks.update({f"{name} ragged": (*c[:-1], dict(c[-1], exchange="ragged")) for name, c in checks.items()})
    ok = True
    for name, (dtype, T, D, E, F, k, kw) in checks.items():
        errs = check(mesh, backend, dtype, T, D, E, F, k, **kw)
        # EP must match the single-device layer to rounding; both must match the f32 oracle.
        tol_same, tol_ref = (2e-2, 3e-2) if dtype == jnp.bfloat16 else (2e-3, 5e-3)
        passed = all(v <= (tol_same if "single" in key and "ep/" in key else tol_ref) for key, v in errs.items())
        ok &= passed
        out["checks"][name] = dict(errs, passed=passed)
        worst = max(errs.items(), key=lambda kv: kv[1])
        print(f"check {name}: {'PASS' if passed else 'FAIL'} (worst {worst[0]} = {worst[1]:.2e})", flush=True)
    print(f"checks took {time.time() - t0:.0f} s", flush=True)

    tokens = [int(t) for t in ARGS.tokens.split(",")] if not ARGS.quick else [64]
    for model in ARGS.models.split(","):
        for T in tokens:
            out["timings"].extend(time_model(mesh, backend, model, T, ARGS.quick))
            jax.clear_caches()

    path = os.path.join(os.environ.get("OUT", "/tmp"), "moe_ep_gpu.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    single = {(r["model"], r["T"], r["what"]): r.get("ms") for r in out["timings"] if r["variant"] == "single"}
    print(f"\nwrote {path}\n{'model':16} {'T':>6} {'what':8} {'variant':9} {'ms':>9} {'TFLOP/s':>8} {'vs single':>9}")
    for r in out["timings"]:
        base = single.get((r["model"], r["T"], r["what"]))
        ms = r.get("ms")
        sp = f"{base / ms:.2f}x" if ms and base else "-"
        tf = f"{r['tflops']:.0f}" if ms else r.get("error", "")[:40]
        print(f"{r['model']:16} {r['T']:>6} {r['what']:8} {r['variant']:9} {ms or float('nan'):>9.3f} {tf:>8} {sp:>9}")
    print(f"correctness: {'PASS' if ok else 'FAIL'} on {P_} devices ({backend})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
