"""Attention suite: block-sparse attention beside cuDNN, XLA, JAX Pallas, torch SDPA and FlexAttention.

Cases (B=1, H=16, D=128, bfloat16 unless noted; ``--quick`` shrinks everything), run in
:func:`plan`'s order (most important first; a case whose estimate exceeds the suite's
time left is skipped and listed in a "skipped cases" row):

* dense-equivalent masks at S=8192 (every block listed full, or causal), forward and
  forward+backward, against the dense kernels (``peers.attention_peers``);
* packed documents + causal sliding window (partial blocks evaluate the mask), fwd and
  fwd+bwd, beside FlexAttention;
* sparsity scaling at S=32768: random 128-blocks (diagonal kept) at densities
  1, .5, .2, .1, .05, forward, plus cuDNN dense / causal for scale;
* the same random 11%-dense 128-block mask as torch FlexAttention, fwd and fwd+bwd;
* GQA decode (Sq=1 against 16K keys, 32 query / 8 kv heads).

FLOPs count computed block pairs only (``benchmarks.flops``: partial and full blocks,
ragged blocks clipped), the same count for every implementation of a case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax as sj
from benchmarks import flops as W
from benchmarks import peers, timing
from benchmarks.timing import Result
from sparse_jax import masks

SUITE = "attention"


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(B=1, H=2, D=32, S=256, S_long=512, block=64, dtype=jnp.float32, decode=(2, 1, 512, 4, 2))
    return dict(B=1, H=16, D=128, S=8192, S_long=32768, block=128, dtype=jnp.bfloat16,
                decode=(8, 1, 16384, 32, 8))


def random_block_mask(S: int, density: float, seed: int, block: int) -> sj.BlockMask:
    """Random blocks at ``density`` with the diagonal kept, all fully allowed (FlexAttention's
    'random block mask' benchmark); table widths fixed to the block count."""
    nb = -(-S // block)
    rng = np.random.default_rng(seed)
    sel = rng.random((nb, nb)) < density
    sel[np.arange(nb), np.arange(nb)] = True
    return sj.BlockMask.from_block_bool(sel, S, S, block_size=block, max_kv_blocks=nb, max_q_blocks=nb,
                                        max_full_kv_blocks=nb, max_full_q_blocks=nb)


def _inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward):
    def make(i):
        q = timing.random_normal(10 * i + 1, (B, Sq, Hq, D), dtype)
        k = timing.random_normal(10 * i + 2, (B, Skv, Hkv, D), dtype)
        v = timing.random_normal(10 * i + 3, (B, Skv, Hkv, D), dtype)
        return (q, k, v, timing.random_normal(10 * i + 4, (B, Sq, Hq, D), dtype)) if backward else (q, k, v)
    return make


def time_ours(ctx, name, bm, B, Sq, Skv, Hq, Hkv, D, dtype, *, backward, extra=None, **kw) -> Result:
    """sparse_jax.block_sparse_attention on ``ctx.backend``; never raises."""
    shape = dict(B=B, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, dtype=jnp.dtype(dtype).name, backward=backward,
                 density=round(float(bm.density), 6))
    flop = W.attention_flops(bm, B, Hq, D, backward=backward)
    nbytes = W.attention_bytes(B, Sq, Skv, Hq, Hkv, D, jnp.dtype(dtype).itemsize, backward=backward)
    impl = f"sparse_jax/{ctx.backend}"

    def attn(q, k, v):
        return sj.block_sparse_attention(q, k, v, bm, backend=ctx.backend, **kw)

    if backward:
        def step(q, k, v, do):
            _, pullback = jax.vjp(attn, q, k, v)
            return pullback(do)
        fn = jax.jit(step)
    else:
        fn = jax.jit(attn)
    try:
        t = timing.time_fn(fn, _inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward),
                           iters=5 if ctx.quick else 20)
        return ctx.record(Result(SUITE, name, impl, shape, t.ms, flops=flop, bytes=nbytes, spread=t.spread,
                                 extra=dict(extra or {})))
    except Exception as e:  # noqa: BLE001 - one failing case must not end the suite
        return ctx.record(Result(SUITE, name, impl, shape, None, flops=flop, error=f"{type(e).__name__}: {e}"[:800],
                                 extra=dict(extra or {})))


def _peers(ctx, *args, **kw):
    if ctx.platform != "gpu":
        return []
    out = peers.attention_peers(*args, **kw)
    for r in out:
        ctx.record(r)
    return out


def _docs_window_mask(S: int):
    """Packed documents (random cuts, ~S/2048 of them) AND a causal sliding window of S/4."""
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, S), size=max(1, S // 2048), replace=False))
    ids = np.zeros(S, np.int32)
    ids[cuts] = 1
    ids = np.cumsum(ids).astype(np.int32)
    return masks.and_masks(masks.document(ids), masks.sliding_window(S // 4, causal=True))


def _flex_row(ctx, name, bm, B, S, H, D, dtype, backward):
    from benchmarks import peers_torch
    flop = W.attention_flops(bm, B, H, D, backward=backward)
    shape = dict(B=B, Sq=S, Skv=S, Hq=H, Hkv=H, D=D, dtype=jnp.dtype(dtype).name, backward=backward,
                 density=round(float(bm.density), 6))
    try:
        t = peers_torch.time_flex(B, S, S, H, H, D, dtype, bm, backward=backward)
        ctx.record(Result(SUITE, name, "torch_flex", shape, t.ms, flops=flop, spread=t.spread))
    except Exception as e:  # noqa: BLE001
        ctx.record(Result(SUITE, name, "torch_flex", shape, None, error=str(e)[:600]))


def plan(ctx) -> list[tuple[str, float, object]]:
    """(label, estimated H100 seconds, thunk) per case, most important first."""
    z = _sizes(ctx.quick)
    B, H, D, S, dtype, blk = z["B"], z["H"], z["D"], z["S"], z["dtype"], z["block"]
    gpu = ctx.platform == "gpu"
    tasks = []

    def dense(causal, backward):
        def go():
            bm = sj.create_block_mask(masks.causal if causal else masks.full, None, None, S, S, block_size=blk)
            name = peers.attention_case_name(B, S, S, H, H, D, causal=causal, backward=backward)
            time_ours(ctx, name, bm, B, S, S, H, H, D, dtype, backward=backward,
                      extra=dict(plot="attention_dense", x="backward", panel="causal" if causal else "non-causal"))
            _peers(ctx, B, S, S, H, H, D, dtype, causal=causal, backward=backward, name=name)
        return go

    def docs_window(backward):
        def go():
            bm = sj.create_block_mask(_docs_window_mask(S), None, None, S, S, block_size=blk)
            name = peers.attention_case_name(B, S, S, H, H, D, causal=True, block_mask=bm,
                                             backward=backward) + " docs+window"
            time_ours(ctx, name, bm, B, S, S, H, H, D, dtype, backward=backward)
            if gpu:
                _flex_row(ctx, name, bm, B, S, H, D, dtype, backward)
        return go

    def random11(backward):
        def go():
            bm = random_block_mask(S, 0.11, seed=11, block=blk)
            name = peers.attention_case_name(B, S, S, H, H, D, causal=False, block_mask=bm, backward=backward)
            time_ours(ctx, name, bm, B, S, S, H, H, D, dtype, backward=backward)
            _peers(ctx, B, S, S, H, H, D, dtype, causal=False, block_mask=bm, backward=backward, name=name)
        return go

    # Peers: cuDNN, XLA, JAX Pallas (2), torch SDPA and compiled FlexAttention, ~18 s fwd at 8K.
    tasks += [("dense fwd", 20, dense(False, False)), ("causal fwd", 20, dense(True, False)),
              ("docs+window fwd", 10, docs_window(False)), ("docs+window fwd+bwd", 12, docs_window(True)),
              ("dense fwd+bwd", 25, dense(False, True)), ("causal fwd+bwd", 25, dense(True, True)),
              ("random 11% fwd", 18, random11(False))]
    tasks += [("sparsity S_long", 25, lambda: _sparsity(ctx, z)), ("decode", 8, lambda: _decode(ctx, z)),
              ("random 11% fwd+bwd", 25, random11(True))]
    return tasks


def _sparsity(ctx, z):
    """Random 128-blocks (diagonal kept) at S_long over densities, forward, + cuDNN dense/causal."""
    B, H, D, dtype, blk, SL = z["B"], z["H"], z["D"], z["dtype"], z["block"], z["S_long"]
    dense_t = None
    for density in (1.0, 0.5, 0.2, 0.1, 0.05):
        bm = random_block_mask(SL, density, seed=int(density * 1000), block=blk)
        name = f"B={B} S={SL} H={H} D={D} random blocks density={density}"
        r = time_ours(ctx, name, bm, B, SL, SL, H, H, D, dtype, backward=False,
                      extra=dict(plot="attention_sparsity", x="density", y="time_ms", xscale="log",
                                 series=f"sparse_jax/{ctx.backend}"))
        if r.time_ms and density == 1.0:
            dense_t = r.time_ms
        if r.time_ms and dense_t:
            r.extra["time_vs_dense"] = r.time_ms / dense_t
            r.extra["goal_time_vs_dense"] = min(1.0, float(bm.density) + 0.05)
    if ctx.platform != "gpu":
        return
    for causal in (False, True):
        fn = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                            implementation="cudnn"))
        name = peers.attention_case_name(B, SL, SL, H, H, D, causal=causal)
        shape = dict(B=B, Sq=SL, Skv=SL, Hq=H, Hkv=H, D=D, dtype=jnp.dtype(dtype).name, causal=causal)
        flop = W.attention_flops(W.dense_block_mask(SL, SL, causal), B, H, D)
        try:
            t = timing.time_fn(fn, _inputs(B, SL, SL, H, H, D, dtype, False), iters=10)
            ctx.record(Result(SUITE, name, "cudnn", shape, t.ms, flops=flop, spread=t.spread))
        except Exception as e:  # noqa: BLE001
            ctx.record(Result(SUITE, name, "cudnn", shape, None, error=str(e)[:600]))


def _decode(ctx, z):
    """GQA decode: bandwidth bound (bytes = the K/V cache read once)."""
    D, dtype, blk = z["D"], z["dtype"], z["block"]
    Bd, Sq, Skv, Hq, Hkv = z["decode"]
    bm = sj.create_block_mask(masks.full, None, None, Sq, Skv, block_size=(16, blk))
    name = f"decode B={Bd} Sq={Sq} Skv={Skv} H={Hq}/{Hkv} D={D}"
    r = time_ours(ctx, name, bm, Bd, Sq, Skv, Hq, Hkv, D, dtype, backward=False)
    r.bytes = float(2 * Bd * Skv * Hkv * D * jnp.dtype(dtype).itemsize)
    if ctx.platform == "gpu":
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        shape = dict(B=Bd, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, dtype=jnp.dtype(dtype).name)
        try:
            t = timing.time_fn(fn, _inputs(Bd, Sq, Skv, Hq, Hkv, D, dtype, False))
            ctx.record(Result(SUITE, name, "cudnn", shape, t.ms, bytes=r.bytes, spread=t.spread))
        except Exception as e:  # noqa: BLE001
            ctx.record(Result(SUITE, name, "cudnn", shape, None, error=str(e)[:600]))


def run(ctx) -> list[Result]:
    """Every case of :func:`plan` in order; one whose estimate exceeds the suite's time left is
    skipped (one "skipped cases" row lists them) and smaller later ones still run."""
    skipped = []
    for label, est, go in plan(ctx):
        left = ctx.time_left()
        if left is not None and not ctx.quick and left < est:
            skipped.append(label)
            continue
        go()
    if skipped:
        ctx.log("skipped (time): " + ", ".join(skipped))
        ctx.record(Result(SUITE, "skipped cases", f"sparse_jax/{ctx.backend}", {}, None, extra=dict(summary=False),
                          error="skipped: not enough of the suite's time left for: " + ", ".join(skipped)))
    return []
