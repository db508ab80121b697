#!/usr/bin/env python3
"""PBS density vs recall on the synthetic LLM mix, without running attention (any device).

For every query head the exact softmax mass each query block puts on each key is
computed once (``block_row_mass``: [Hq, nQb, S], rows of a block summed, chunked so no
S x S array lives at once); a plan's recall is then that mass gathered through the
plan's selection (key k of kv head h sits in permuted block ``inv_perm[k] // block``).
Recall = mean over rows of the softmax mass kept (the quantity exp(lse_sparse - lse_dense)
measures on the GPU); density = computed / causal pairs (the kernel's work relative to
dense causal).

    PYTHONPATH=. python benchmarks/pbs_density_study.py --S 8192 --hq 32 --hkv 8 --d 64

Sweeps segment size x tau x GQA mode (and the no-permutation ablation), then the oracle
per-head threshold: for a target mean recall, per-head taus chosen greedily on the
per-head (density, recall) curves vs one tau for all heads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import selection as bench_sel  # noqa: E402
from sparse_jax import permutation as perm_lib  # noqa: E402
from sparse_jax.ops import permuted_attention as pa  # noqa: E402


def block_row_mass(q, k, block: int, q_blocks=None):
    """float32 [Hq, nSel, S]: causal softmax mass the rows of each selected query block put on
    each key (summed over the block's rows). q [1, S, Hq, D], k [1, S, Hkv, D]; q_blocks:
    the query-block indices (default all). One block's [Hq, block, S] logits live at a time."""
    _, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nqb = -(-s // block)
    qb = np.arange(nqb) if q_blocks is None else np.asarray(q_blocks)
    qp = jnp.pad(q[0], ((0, nqb * block - s), (0, 0), (0, 0))).reshape(nqb * block, hkv, g, d)
    kk = k[0]

    @jax.jit
    def run(qp, kk, idx):
        def one(i):
            qc = jax.lax.dynamic_slice_in_dim(qp, i * block, block, axis=0)
            x = jnp.einsum("rhgd,khd->hgrk", qc, kk, preferred_element_type=jnp.float32) / math.sqrt(d)
            rows = i * block + jnp.arange(block)
            x = jnp.where(jnp.arange(s)[None, :] <= rows[:, None], x, -jnp.inf)
            p = jax.nn.softmax(x, axis=-1) * (rows < s)[:, None]
            return p.sum(2).reshape(hq, s)
        return jax.lax.map(one, idx).transpose(1, 0, 2)

    return run(qp, kk, jnp.asarray(qb, jnp.int32))


def plan_recall(mass, plan, block: int, g: int, q_blocks=None):
    """Mean recall of each selected query block's rows, per query head: float [Hq, nSel].

    mass [Hq, nSel, S] (:func:`block_row_mass` on the same q_blocks)."""
    cls = np.asarray(plan.block_mask.block_classes()) > 0  # [N=B*Hkv, Ht, nb, nb]
    inv = np.asarray(perm_lib.inverse_permutation(plan.kv_permutation))[0]  # [Hkv, S]
    hq, nsel, s = mass.shape
    qb = np.arange(nsel) if q_blocks is None else np.asarray(q_blocks)
    rows = np.minimum(block, s - qb * block)
    out = np.zeros((hq, nsel))
    m = np.asarray(mass)
    for h in range(hq):
        kvh = h // g
        table = cls[kvh, 0 if cls.shape[1] == 1 else h % g][qb]  # [nSel, nb]
        allowed = table[:, inv[kvh] // block]  # [nSel, S]
        out[h] = (m[h] * allowed).sum(-1) / rows
    return out


def density_of(plan, b, hq, hkv):
    return bench_sel._causal_pairs_fraction(plan.block_mask, b * hkv, hq // hkv)


def per_head_density(plan, hkv):
    cls = np.asarray(plan.block_mask.block_classes()) > 0
    nb = cls.shape[-1]
    causal_blocks = nb * (nb + 1) / 2
    return cls.reshape(hkv, -1, nb, nb).sum((2, 3)).mean(1) / causal_blocks  # block-level, per kv head


def oracle_per_head(curves, target):
    """curves: {tau: (recall per kv head [Hkv], density per kv head [Hkv])}. Greedy: start every head
    at the smallest tau, raise the head with the best recall gain per density until the mean recall
    reaches ``target``. Returns (mean density, mean recall, taus)."""
    taus = sorted(curves)
    hkv = len(curves[taus[0]][0])
    idx = [0] * hkv

    def totals():
        r = np.mean([curves[taus[idx[h]]][0][h] for h in range(hkv)])
        d = np.mean([curves[taus[idx[h]]][1][h] for h in range(hkv)])
        return r, d

    r, d = totals()
    while r < target:
        best, gain = None, -1.0
        for h in range(hkv):
            if idx[h] + 1 < len(taus):
                r0, d0 = curves[taus[idx[h]]][0][h], curves[taus[idx[h]]][1][h]
                r1, d1 = curves[taus[idx[h] + 1]][0][h], curves[taus[idx[h] + 1]][1][h]
                gg = (r1 - r0) / max(d1 - d0, 1e-9)
                if gg > gain:
                    best, gain = h, gg
        if best is None:
            break
        idx[best] += 1
        r, d = totals()
    return float(d), float(r), [taus[i] for i in idx]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--S", type=int, default=8192)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--segments", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--taus", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 0.95])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = p.parse_args()
    t0 = time.time()
    q, k, _ = bench_sel.synthetic_case(0, a.S, a.hq, a.hkv, a.d, jnp.bfloat16)
    g = a.hq // a.hkv
    mass = block_row_mass(q, k, a.block)
    print(f"mass: {time.time() - t0:.0f}s", flush=True)
    rows = []
    plan_fn = jax.jit(pa.pbs_plan, static_argnames=("block_size", "segment_size", "gqa", "permute_keys"))
    for seg in a.segments:
        for gqa in ("union", "per_head"):
            for permute in ((True, False) if gqa == "union" else (True,)):
                curves = {}
                for tau in a.taus:
                    plan = plan_fn(q, k, block_size=a.block, segment_size=seg, threshold=tau, gqa=gqa,
                                   permute_keys=permute)
                    rec = plan_recall(mass, plan, a.block, g)  # [Hq, nQb]
                    dens = density_of(plan, 1, a.hq, a.hkv)
                    rec_kv = rec.reshape(a.hkv, g, -1).mean((1, 2))
                    curves[tau] = (rec_kv, per_head_density(plan, a.hkv))
                    row = dict(segment=seg, gqa=gqa, permute=permute, tau=tau, density=dens,
                               recall_mean=float(rec.mean()), recall_p10_blocks=float(np.percentile(rec, 10)),
                               recall_per_kv_head=[round(float(x), 4) for x in rec_kv],
                               density_per_kv_head=[round(float(x), 4) for x in curves[tau][1]])
                    rows.append(row)
                    print(f"seg={seg:5d} {gqa:8s} perm={permute!s:5} tau={tau:.2f}: density {dens:.3f} "
                          f"recall {row['recall_mean']:.4f} (p10 {row['recall_p10_blocks']:.3f})", flush=True)
                if gqa == "union" and permute:
                    for tau in a.taus:
                        target = float(np.mean(curves[tau][0]))
                        d_or, r_or, taus = oracle_per_head(curves, target)
                        d_uni = float(np.mean(curves[tau][1]))
                        rows.append(dict(segment=seg, gqa="oracle_per_head_tau", target=target, density_blocks=d_or,
                                         recall=r_or, taus=taus, uniform_density_blocks=d_uni, uniform_tau=tau))
                        print(f"   oracle per-head taus for recall {target:.4f}: block density {d_or:.3f} "
                              f"(uniform tau {tau}: {d_uni:.3f}) taus={taus}", flush=True)
    path = os.path.join(a.out, f"pbs_density_S{a.S}.json")
    with open(path, "w") as f:
        json.dump(dict(args=vars(a), rows=rows), f, indent=1)
    print(f"wrote {path} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
