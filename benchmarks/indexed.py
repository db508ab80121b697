"""Indexed attention suite: DSA token lists, NSA block lists, and the indexers.

Cases (B=1, Sq=4096 queries at the end of the sequence, D=Dv=128, bfloat16; ``--quick`` shrinks):

* token lists, topk=2048 at Skv = 32K, 64K, 128K, MLA-like (Hq=64 / Hkv=1) and GQA
  (Hq=32 / Hkv=8): forward and forward+backward;
* block lists, 16 blocks of 64 keys at Skv = 32K: GQA 16 (Hq=64 / Hkv=4) and GQA 4
  (Hq=32 / Hkv=8), both loop orders, forward and forward+backward, beside the dense
  block-sparse kernel (``block_sparse_attention``, all blocks listed, Sq = Skv = 4096)
  and cuDNN dense attention on the same heads;
* indexers (Hi=64, Di=128, topk=2048): flat (exact) vs hierarchical (HISA) time at
  Skv = 32K, 64K, 128K, their top-k overlap (IoU) on random and on block-clustered keys,
  and the indexer's time relative to the token attention it feeds.

FLOPs count the selected (query, key) pairs only: ``2 * pairs * (D + Dv)`` forward,
``2 * pairs * (4 D + 3 Dv)`` forward+backward (the convention of ``benchmarks.flops``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax as sj
from benchmarks import timing
from benchmarks.timing import Result

SUITE = "indexed"


def sizes(quick: bool) -> dict:
    if quick:
        return dict(B=1, Sq=64, Skvs=(512,), topk=32, heads=((4, 1),), D=32, block_heads=((4, 1),), n_blocks=4,
                    block=16, Hi=4, Di=32, dtype=jnp.float32, iters=3)
    return dict(B=1, Sq=4096, Skvs=(32768, 65536, 131072), topk=2048, heads=((64, 1), (32, 8)), D=128,
                block_heads=((64, 4), (32, 8)), n_blocks=16, block=64, Hi=64, Di=128, dtype=jnp.bfloat16, iters=10)


def stratified_indices(key, B, Sq, Hkv, topk, Skv, *, q_offset):
    """Distinct, ascending, causal token lists int32 [B, Sq, Hkv, topk]: one random key per stratum
    of the query's visible prefix (cheap to build at any length; every slot valid when the prefix
    holds topk keys)."""
    t_abs = jnp.arange(Sq, dtype=jnp.int32) + q_offset  # [Sq]
    visible = jnp.minimum(t_abs + 1, Skv)
    stride = jnp.maximum(visible // topk, 1)[None, :, None, None]
    base = jnp.arange(topk, dtype=jnp.int32)[None, None, None, :] * stride
    jitter = (jax.random.uniform(key, (B, Sq, Hkv, topk)) * stride).astype(jnp.int32)
    idx = base + jitter
    return jnp.where(idx <= t_abs[None, :, None, None], idx, -1).astype(jnp.int32)


def random_blocks(key, B, Sq, Hkv, n, Skv, block, *, q_offset):
    """n distinct random causal blocks per (token, kv head), the token's own block included."""
    nb = -(-Skv // block)
    t_abs = jnp.arange(Sq, dtype=jnp.int32) + q_offset
    own = (t_abs // block)[None, :, None, None]
    scores = jax.random.uniform(key, (B, Sq, Hkv, nb))
    scores = jnp.where(jnp.arange(nb)[None, None, None, :] <= own, scores, -1.0)
    scores = jnp.where(jnp.arange(nb)[None, None, None, :] == own, 2.0, scores)
    _, idx = jax.lax.top_k(scores, n)
    return idx.astype(jnp.int32)


def _ar1_latent(key, B, Sq, r, rho):
    """float32 [B, Sq, r]: a unit-variance AR(1) walk per batch (neighbouring tokens' queries are close)."""
    eps = jax.random.normal(key, (Sq, B, r))

    def step(z, e):
        z = rho * z + jnp.sqrt(1.0 - rho * rho) * e
        return z, z

    _, zs = jax.lax.scan(step, eps[0], eps)
    return jnp.transpose(zs, (1, 0, 2))


def correlated_blocks(key, B, Sq, Hkv, n, Skv, block, *, q_offset, rho=0.97, rank=16):
    """n distinct causal blocks per (token, kv head), chosen like NSA does (top-n of a score of the
    token's query against block summaries) with queries drifting slowly along the sequence: with
    rho=0.97 neighbouring tokens share ~3/4 of their blocks (NSA's selections are strongly
    correlated; the uniform :func:`random_blocks` are the worst case). Own block always included."""
    nb = -(-Skv // block)
    kz, kc = jax.random.split(key)
    z = _ar1_latent(kz, B * Hkv, Sq, rank, rho).reshape(B, Hkv, Sq, rank).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bthr,jr->bthj", z, jax.random.normal(kc, (nb, rank)))
    t_abs = jnp.arange(Sq, dtype=jnp.int32) + q_offset
    own = (t_abs // block)[None, :, None, None]
    j = jnp.arange(nb)[None, None, None, :]
    scores = jnp.where(j <= own, scores, -jnp.inf)
    scores = jnp.where(j == own, jnp.inf, scores)
    _, idx = jax.lax.top_k(scores, n)
    return idx.astype(jnp.int32)


def correlated_tokens(key, B, Sq, Hkv, topk, Skv, *, q_offset, rho=0.97, rank=16):
    """Distinct causal token lists [B, Sq, Hkv, topk] from the same drifting-query model (DSA-like:
    an indexer's top-k of neighbouring queries overlap)."""
    kz, kc = jax.random.split(key)
    z = _ar1_latent(kz, B * Hkv, Sq, rank, rho).reshape(B, Hkv, Sq, rank).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bthr,sr->bths", z, jax.random.normal(kc, (Skv, rank)))
    t_abs = jnp.arange(Sq, dtype=jnp.int32) + q_offset
    scores = jnp.where(jnp.arange(Skv)[None, None, None, :] <= t_abs[None, :, None, None], scores, -jnp.inf)
    vals, idx = jax.lax.top_k(scores, topk)
    return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)


def tile_reuse(idx, T: int) -> float:
    """Mean over tiles of T consecutive tokens of (listed units) / (units in the union): how many
    tokens read each loaded unit with ``query_tile=T`` (1 = no sharing)."""
    from pallas_kernels.common import indexed as common
    lists = common.Lists(idx, jnp.sum(idx >= 0, axis=-1, dtype=jnp.int32))
    tiles = common.tile_lists(lists, T)
    listed = jnp.sum(idx >= 0)
    return float(listed / jnp.maximum(jnp.sum(tiles.count), 1))


def clustered_indexer_inputs(key, B, Sq, Skv, Hi, Di, block, dtype):
    """Keys clustered by block (one direction per block), queries near a few blocks' directions."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    nb = Skv // block
    centers = jax.random.normal(k1, (B, nb, Di))
    k = jnp.repeat(centers, block, axis=1) + 0.3 * jax.random.normal(k2, (B, Skv, Di))
    pick = jax.random.randint(k3, (B, Sq, Hi), 0, nb)
    q = jax.vmap(lambda c, p: c[p])(centers, pick) + 0.3 * jax.random.normal(k4, (B, Sq, Hi, Di))
    w = jnp.abs(jax.random.normal(k5, (B, Sq, Hi))) + 0.1
    return q.astype(dtype), k.astype(dtype), w


def pair_flops(pairs: float, D: int, Dv: int, backward: bool) -> float:
    return 2.0 * pairs * ((4 * D + 3 * Dv) if backward else (D + Dv))


def attention_fn(kind: str, backward: bool, **kw):
    """jit of sj.indexed_attention / indexed_block_attention (forward, or forward + backward)."""
    op = sj.indexed_attention if kind == "token" else sj.indexed_block_attention

    def fwd(q, k, v, idx):
        return op(q, k, v, idx, **kw)

    if not backward:
        return jax.jit(fwd)

    def step(q, k, v, idx, do):
        _, pullback = jax.vjp(lambda q, k, v: fwd(q, k, v, idx), q, k, v)
        return pullback(do)

    return jax.jit(step)


def _record(ctx, name, impl, shape, fn, make, flops=None, extra=None):
    try:
        t = timing.time_fn(fn, make, iters=ctx_iters(ctx), rotations=2)
        return ctx.record(Result(SUITE, name, impl, shape, t.ms, flops=flops, spread=t.spread, extra=extra or {}))
    except Exception as e:  # noqa: BLE001 - one failing case must not end the suite
        return ctx.record(Result(SUITE, name, impl, shape, None, flops=flops, error=f"{type(e).__name__}: {e}"[:800],
                                 extra=extra or {}))


def ctx_iters(ctx) -> int:
    return 3 if ctx.quick else 10


def _enough(ctx, seconds):
    left = ctx.time_left()
    return left is None or left > seconds


def run(ctx) -> list[Result]:
    z = sizes(ctx.quick)
    B, Sq, D, dtype, topk = z["B"], z["Sq"], z["D"], z["dtype"], z["topk"]
    impl = f"sparse_jax/{ctx.backend}"
    rnd = lambda i, s: timing.random_normal(i, s, dtype)
    attn_ms = {}

    # 1. Token lists (DSA).
    for Skv in z["Skvs"]:
        for Hq, Hkv in z["heads"]:
            idx = stratified_indices(jax.random.key(Skv), B, Sq, Hkv, topk, Skv, q_offset=Skv - Sq)
            pairs = float(B * Sq * Hq * topk)
            for backward in (False, True):
                if not _enough(ctx, 4):
                    return ctx.results
                name = f"token Sq={Sq} Skv={Skv} topk={topk} Hq={Hq} Hkv={Hkv} D={D}" + (" fwd+bwd" if backward else "")
                shape = dict(B=B, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, topk=topk, backward=backward,
                             dtype=jnp.dtype(dtype).name)
                fn = attention_fn("token", backward, unique_indices=True, backend=ctx.backend)
                make = lambda i, Skv=Skv, Hq=Hq, Hkv=Hkv, idx=idx, backward=backward: (
                    rnd(10 * i, (B, Sq, Hq, D)), rnd(10 * i + 1, (B, Skv, Hkv, D)), rnd(10 * i + 2, (B, Skv, Hkv, D)),
                    idx) + ((rnd(10 * i + 3, (B, Sq, Hq, D)),) if backward else ())
                r = _record(ctx, name, impl, shape, fn, make, pair_flops(pairs, D, D, backward),
                            extra=dict(plot="indexed_token", x="Skv", series=f"Hq={Hq}/Hkv={Hkv}"
                                       + (" fwd+bwd" if backward else " fwd")))
                if r.time_ms and not backward and Hkv == 1:
                    attn_ms[Skv] = r.time_ms

    # 2. Block lists (NSA selection) beside the dense block-sparse kernel and cuDNN.
    Skv = z["Skvs"][0]
    n, bs = z["n_blocks"], z["block"]
    for Hq, Hkv in z["block_heads"]:
        idx = random_blocks(jax.random.key(Hq), B, Sq, Hkv, n, Skv, bs, q_offset=Skv - Sq)
        pairs = float(B * Sq * Hq * n * bs)
        for backward in (False, True):
            for order in ("query", "kv"):
                if not _enough(ctx, 4):
                    return ctx.results
                name = (f"block Sq={Sq} Skv={Skv} {n}x{bs} Hq={Hq} Hkv={Hkv} D={D}" + (" fwd+bwd" if backward else ""))
                shape = dict(B=B, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, n_blocks=n, block=bs, loop_order=order,
                             backward=backward, dtype=jnp.dtype(dtype).name)
                fn = attention_fn("block", backward, block_size=bs, loop_order=order, backend=ctx.backend)
                make = lambda i, Hq=Hq, Hkv=Hkv, idx=idx, backward=backward: (
                    rnd(10 * i, (B, Sq, Hq, D)), rnd(10 * i + 1, (B, Skv, Hkv, D)), rnd(10 * i + 2, (B, Skv, Hkv, D)),
                    idx) + ((rnd(10 * i + 3, (B, Sq, Hq, D)),) if backward else ())
                _record(ctx, name, f"{impl}/{order}", shape, fn, make, pair_flops(pairs, D, D, backward),
                        extra=dict(plot="indexed_block", x="loop_order", series=f"Hq={Hq}/Hkv={Hkv}"))
        for backward in (False, True):
            S = Sq
            bm = sj.create_block_mask(sj.masks.full, None, None, S, S, block_size=128)
            name = f"dense-equivalent block_sparse_attention S={S} Hq={Hq} Hkv={Hkv} D={D}" + (
                " fwd+bwd" if backward else "")
            shape = dict(B=B, Sq=S, Skv=S, Hq=Hq, Hkv=Hkv, D=D, backward=backward, dtype=jnp.dtype(dtype).name)
            base = lambda q, k, v: sj.block_sparse_attention(q, k, v, bm, backend=ctx.backend)
            fn = jax.jit(base) if not backward else jax.jit(lambda q, k, v, do: jax.vjp(base, q, k, v)[1](do))
            make = lambda i, Hq=Hq, Hkv=Hkv, backward=backward: (
                rnd(10 * i, (B, S, Hq, D)), rnd(10 * i + 1, (B, S, Hkv, D)), rnd(10 * i + 2, (B, S, Hkv, D))) + (
                (rnd(10 * i + 3, (B, S, Hq, D)),) if backward else ())
            _record(ctx, name, f"{impl}/block_sparse_dense", shape, fn, make,
                    pair_flops(float(B * Hq * S * S), D, D, backward))
            if ctx.platform == "gpu":
                def cudnn(q, k, v):
                    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
                fn = jax.jit(cudnn) if not backward else jax.jit(lambda q, k, v, do: jax.vjp(cudnn, q, k, v)[1](do))
                _record(ctx, name, "cudnn", shape, fn, make, pair_flops(float(B * Hq * S * S), D, D, backward))

    # 3. Indexers: flat (exact) vs hierarchical.
    Hi, Di = z["Hi"], z["Di"]
    for Skv in z["Skvs"]:
        if not _enough(ctx, 10):
            break
        shape = dict(B=B, Sq=Sq, Skv=Skv, Hi=Hi, Di=Di, topk=topk, dtype=jnp.dtype(dtype).name)
        make = lambda i, Skv=Skv: (rnd(10 * i, (B, Sq, Hi, Di)), rnd(10 * i + 1, (B, Skv, Di)),
                                   jnp.abs(timing.random_normal(10 * i + 2, (B, Sq, Hi), jnp.float32)))
        kw = dict(causal=True, backend=ctx.backend)
        flat = jax.jit(lambda q, k, w: sj.lightning_indexer(q, k, w, topk, **kw))
        hier = jax.jit(lambda q, k, w: sj.hierarchical_indexer(q, k, w, topk, **kw))
        score_flops = 2.0 * B * Sq * Skv * Hi * Di
        rf = _record(ctx, f"indexer flat Skv={Skv}", impl, shape, flat, make, score_flops,
                     extra=dict(plot="indexer", x="Skv", series="flat"))
        rh = _record(ctx, f"indexer hierarchical Skv={Skv}", impl, shape, hier, make, None,
                     extra=dict(plot="indexer", x="Skv", series="hierarchical"))
        if rf.time_ms and rh.time_ms:
            rh.extra["speedup_vs_flat"] = rf.time_ms / rh.time_ms
            rh.extra["goal_speedup"] = 4.0 if Skv >= 131072 else 2.0
            q, k, w = make(0)
            rh.extra["iou_random"] = float(jnp.mean(sj.indexers.topk_overlap(flat(q, k, w), hier(q, k, w))))
            qc, kc, wc = clustered_indexer_inputs(jax.random.key(5), B, Sq, Skv, Hi, Di, 64, dtype)
            rh.extra["iou_clustered"] = float(jnp.mean(sj.indexers.topk_overlap(flat(qc, kc, wc), hier(qc, kc, wc))))
        if rf.time_ms and Skv in attn_ms:
            rf.extra["indexer_vs_attention"] = rf.time_ms / attn_ms[Skv]
    return ctx.results
