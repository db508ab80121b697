"""Expert parallelism on 4 host devices equals the single-device layer (forward, gradients, aux).

The device count must be fixed before jax is imported, so the checks run in a child
process (this file run as a script) that prints one JSON line of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

NUM_DEVICES = 4


def _child() -> dict:
    import jax
    import jax.numpy as jnp

    from sparse_jax import moe, reference

    assert jax.device_count() == NUM_DEVICES, jax.devices()

    def problem(T, E, k, D=16, F=12, Fs=None, seed=0, skew=False):
        ks = iter(jax.random.split(jax.random.key(seed), 10))
        x = jax.random.normal(next(ks), (T, D))
        rw = jax.random.normal(next(ks), (D, E))
        if skew:  # most tokens prefer the experts of device 0
            x = x.at[:, 0].set(3.0)
            rw = rw.at[0, : E // NUM_DEVICES].add(3.0)
        ws = [jax.random.normal(next(ks), s) * s[-2] ** -0.5 for s in ((E, D, F), (E, D, F), (E, F, D))]
        shared = None
        if Fs:
            shared = tuple(jax.random.normal(next(ks), s) * s[0] ** -0.5 for s in ((D, Fs), (D, Fs), (Fs, D)))
        return (x, rw, *ws), shared

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def grads(fn, args, shared, ct):
        def loss(args, shared):
            y, aux = fn(*args, shared_expert=shared, return_aux=True)
            return jnp.sum(y * ct) + aux.load_balance_loss + 1e-2 * aux.z_loss, (y, aux)
        (_, (y, aux)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(args, shared)
        return y, aux, g

    def compare(name, T, E, k, axis_type, Fs=None, ep_kw=None, D=16, F=12, **kw):
        mesh = jax.make_mesh((NUM_DEVICES,), ("ep",), axis_types=(axis_type,))
        args, shared = problem(T, E, k, D=D, F=F, Fs=Fs)
        ct = jax.random.normal(jax.random.key(7), (T, args[0].shape[1]))
        single = lambda *a, **k2: moe.moe_ffn(*a, top_k=k, **kw, **k2)  # noqa: E731
        ep = lambda *a, **k2: moe.moe_ffn_ep(*a, mesh=mesh, axis_name="ep", top_k=k,  # noqa: E731
                                             **kw, **(ep_kw or {}), **k2)
        y1, aux1, (g1, gs1) = grads(single, args, shared, ct)
        y2, aux2, (g2, gs2) = grads(ep, args, shared, ct)
        out = {"y": rel(y2, y1)}
        out.update({f"d_{n}": rel(a, b) for n, a, b in zip(("x", "router", "w_gate", "w_up", "w_down"), g2, g1)})
        if shared is not None:
            out.update({f"d_shared{i}": rel(a, b) for i, (a, b) in enumerate(zip(gs2, gs1))})
        out["aux"] = max(rel(a, b) for a, b in zip(aux2, aux1))
        out["dropped"] = [int(aux1.dropped), int(aux2.dropped)]
        return name, out

    def overflow():
        """Pair capacity below need: per (source, destination) the first Cp rows in expert-then-token order."""
        T, E, k, f = 16, 8, 2, 0.5
        mesh = jax.make_mesh((NUM_DEVICES,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
        args, _ = problem(T, E, k, seed=3, skew=True)
        y, aux = jax.jit(lambda *a: moe.moe_ffn_ep(*a, mesh=mesh, axis_name="ep", top_k=k, return_aux=True,
                                                   exchange_capacity_factor=f))(*args)
        r = moe.route(moe.router_logits(args[0], args[1]), k)
        ids = np.asarray(r.expert_ids)
        T_l, El = T // NUM_DEVICES, E // NUM_DEVICES
        cp = int(np.ceil(f * T_l * k / NUM_DEVICES))
        kept = np.zeros_like(ids, bool)
        for s in range(NUM_DEVICES):
            local = [(ids[t, j], t, j) for t in range(s * T_l, (s + 1) * T_l) for j in range(k)]
            used = np.zeros(NUM_DEVICES, int)
            for e, t, j in sorted(local):
                if used[e // El] < cp:
                    kept[t, j] = True
                    used[e // El] += 1
        want = reference.moe_ffn_from_routing(args[0], jnp.where(jnp.asarray(kept), r.weights, 0.0), r.expert_ids,
                                              *args[2:])
        return "exchange-overflow", {"y": rel(y, want), "dropped": [int((~kept).sum()), int(aux.dropped)]}

    def ragged_traces():
        """exchange="ragged" cannot run on the CPU: it must say so, and still trace + differentiate."""
        from sparse_jax.moe import expert_parallel
        mesh = jax.make_mesh((NUM_DEVICES,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
        args, _ = problem(13, 8, 3)
        out = {}
        try:
            moe.moe_ffn_ep(*args, mesh=mesh, axis_name="ep", top_k=3, exchange="ragged")
            out["cpu_error"] = False
        except ValueError as e:
            out["cpu_error"] = "ragged" in str(e)
        check, expert_parallel._check_exchange = expert_parallel._check_exchange, lambda *a: None
        try:
            f = lambda *a: moe.moe_ffn_ep(*a, mesh=mesh, axis_name="ep", top_k=3, exchange="ragged").sum()  # noqa
            hlo = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4))).lower(*args).as_text()
        finally:
            expert_parallel._check_exchange = check
        out["ragged_ops_in_grad"] = hlo.count("ragged_all_to_all")
        return "ragged", out

    Auto, Explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
    results = dict([
        compare("dropless-padded", 13, 8, 3, Auto),
        compare("sigmoid-groups-bias-capacity-shared", 16, 8, 2, Auto, Fs=10, scoring="sigmoid", num_groups=4,
                topk_groups=2, bias=0.2 * jnp.arange(8.0), capacity_factor=0.75),
        compare("explicit-mesh-one-expert-per-device", 10, 4, 4, Explicit),
        # the gmm kernels (interpret mode) under shard_map with a traced group_offset
        compare("triton-interpret-kernels", 12, 8, 2, Auto, D=32, F=64, ep_kw=dict(backend="triton", interpret=True)),
        overflow(),
        ragged_traces(),
    ])
    return results


@pytest.fixture(scope="module")
def ep_results():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.multidevice
@pytest.mark.parametrize("case", ["dropless-padded", "sigmoid-groups-bias-capacity-shared",
                                  "explicit-mesh-one-expert-per-device", "triton-interpret-kernels"])
def test_ep_equals_single_device(ep_results, case):
    res = ep_results[case]
    for key, err in res.items():
        if key == "dropped":
            assert err[0] == err[1], (case, res)
        else:
            assert err <= 1e-5, (case, key, err)
    if "capacity" in case:
        assert res["dropped"][0] > 0


@pytest.mark.multidevice
def test_ep_exchange_overflow_drop_order(ep_results):
    res = ep_results["exchange-overflow"]
    assert res["y"] <= 1e-5, res
    assert res["dropped"][0] == res["dropped"][1] > 0, res


@pytest.mark.multidevice
def test_ep_ragged_exchange_traces(ep_results):
    res = ep_results["ragged"]
    assert res["cpu_error"], res
    assert res["ragged_ops_in_grad"] >= 4, res  # 2 forward + their 2 transposes


if __name__ == "__main__":
    print(json.dumps(_child()))
