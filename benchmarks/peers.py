"""Peer baselines every suite compares against, timed in the same process as sparse_jax.

    attention_peers(B, Sq, Skv, Hq, Hkv, D, dtype, *, causal, block_mask=None, backward=False)
    gmm_peers(M, K, N, group_sizes, dtype, *, backward=False)
    torch_moe(T, D, F, E, top_k, dtype, *, backward=False, router="uniform")

Each returns a list of :class:`benchmarks.timing.Result`, one per peer. Every peer is
optional: when it cannot run here (no GPU, no torch, an import error, out of memory, a
shape it does not support) its Result carries ``error=`` instead of a time; nothing
raises. Keyword-only ``name``, ``suite`` and ``extra`` set the case name (use the one
your own rows use so the report puts them side by side), the suite, and fields merged
into every Result's ``extra`` (plot hints: benchmarks/README.md).

``backward=True`` times forward + backward (the gradient of all inputs); FLOPs are
counted as in :mod:`benchmarks.flops`, from the block mask for sparse cases. With a
block mask, the dense kernels (cuDNN, XLA, JAX Pallas, SDPA) are still timed as the
dense (or dense causal) baseline and labelled so; FlexAttention runs the same blocks.
"""

from __future__ import annotations

import gc
import math
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops as W
from benchmarks import timing
from benchmarks.timing import Result

# Fraction of device memory a materialising peer (XLA attention) may plan to use.
_MEMORY_FRACTION = 0.6


def _error_text(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg if len(msg) < 600 else msg[:600] + "..."


def _run(results, suite, name, impl, shape, extra, work, *, flops=None, bytes_=None):
    """Call ``work()`` -> Timing (or (Timing, note)); append a Result, never raise."""
    extra = dict(extra)
    try:
        out = work()
        t, note = (out if isinstance(out, tuple) else (out, None))
        if note:
            extra["note"] = "; ".join(x for x in (extra.get("note"), note) if x)
        results.append(Result(suite, name, impl, dict(shape), t.ms, flops=flops, bytes=bytes_, spread=t.spread,
                              extra=extra))
    except Exception as e:  # noqa: BLE001 - every peer is optional
        extra["traceback"] = traceback.format_exc(limit=3)[-1500:]
        results.append(Result(suite, name, impl, dict(shape), None, flops=flops, bytes=bytes_, error=_error_text(e),
                              extra=extra))
    finally:
        _release()
    return results[-1]


def _release():
    gc.collect()
    try:
        from benchmarks import peers_torch
        peers_torch.free_memory()
    except ImportError:
        pass


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _require_gpu(what: str):
    if not _on_gpu():
        raise RuntimeError(f"{what} needs a CUDA GPU (JAX platform is {jax.default_backend()!r})")


def _device_memory() -> float:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return float(stats.get("bytes_limit", 0)) or 16e9
    except Exception:  # noqa: BLE001
        return 16e9


def _vjp_fn(f, n_inputs: int):
    """jit(lambda *inputs, ct: grads of f at inputs along ct) -- forward + backward."""
    def g(*args):
        ins, ct = args[:n_inputs], args[n_inputs]
        _, pullback = jax.vjp(f, *ins)
        return pullback(ct)
    return jax.jit(g)


# -- attention ------------------------------------------------------------------------------------
def attention_case_name(B, Sq, Skv, Hq, Hkv, D, *, causal, block_mask=None, backward=False) -> str:
    s = f"B={B} S={Sq}" + (f"/{Skv}" if Skv != Sq else "") + f" H={Hq}" + (f"/{Hkv}" if Hkv != Hq else "") + f" D={D}"
    if block_mask is not None:
        s += f" density={block_mask.density:.3f}"
    elif causal:
        s += " causal"
    return s + (" fwd+bwd" if backward else "")


def _jax_attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward, kv_repeat=1):
    def make(i):
        q = timing.random_normal(10 * i + 1, (B, Sq, Hq, D), dtype)
        k = timing.random_normal(10 * i + 2, (B, Skv, Hkv, D), dtype)
        v = timing.random_normal(10 * i + 3, (B, Skv, Hkv, D), dtype)
        if kv_repeat > 1:
            k, v = jnp.repeat(k, kv_repeat, axis=2), jnp.repeat(v, kv_repeat, axis=2)
        return (q, k, v, timing.random_normal(10 * i + 4, (B, Sq, Hq, D), dtype)) if backward else (q, k, v)
    return make


def _time_jax_attention(attn, make, backward):
    fn = _vjp_fn(attn, 3) if backward else jax.jit(attn)
    return timing.time_fn(fn, make)


def attention_peers(B, Sq, Skv, Hq, Hkv, D, dtype, *, causal, block_mask=None, backward=False,
                    name: str | None = None, suite: str = "attention", extra: dict | None = None) -> list[Result]:
    """cuDNN, XLA, JAX Pallas (Triton ``mha``, Mosaic GPU ``attention_mgpu``), torch SDPA and
    FlexAttention on one attention problem. q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D]."""
    dtype = jnp.dtype(dtype)
    name = name or attention_case_name(B, Sq, Skv, Hq, Hkv, D, causal=causal, block_mask=block_mask,
                                       backward=backward)
    shape = dict(B=B, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype.name, causal=bool(causal),
                 backward=bool(backward))
    base = dict(extra or {})
    if block_mask is not None:
        shape["density"] = round(float(block_mask.density), 6)
    dense_bm = W.dense_block_mask(Sq, Skv, causal)
    dense_flops = W.attention_flops(dense_bm, B, Hq, D, backward=backward)
    nbytes = W.attention_bytes(B, Sq, Skv, Hq, Hkv, D, dtype.itemsize, backward=backward)
    results: list[Result] = []

    def dense_extra(impl, note=None):
        e = dict(base)
        if block_mask is not None:
            e.update(baseline="dense causal" if causal else "dense", series=f"{impl} (dense)")
        if note:
            e["note"] = note
        return e

    make = _jax_attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward)
    scale = 1.0 / math.sqrt(D)

    def dpa(impl):
        def work():
            if impl == "cudnn":
                _require_gpu("cuDNN attention")
            else:
                need = B * Hq * Sq * Skv * 4 * (4 if backward else 2)
                if need > _MEMORY_FRACTION * _device_memory():
                    raise MemoryError(f"XLA attention would materialise {need / 2**30:.1f} GiB of logits")
            attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,  # noqa: E731
                                                                  implementation=impl)
            return _time_jax_attention(attn, make, backward)
        return work

    _run(results, suite, name, "cudnn", shape, dense_extra("cudnn"), dpa("cudnn"), flops=dense_flops, bytes_=nbytes)
    _run(results, suite, name, "xla_attention", shape, dense_extra("xla_attention"), dpa("xla"),
         flops=dense_flops, bytes_=nbytes)

    rep = Hq // Hkv

    def pallas_mha():
        _require_gpu("JAX Pallas mha (Triton)")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as pallas_attention
        attn = lambda q, k, v: pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=causal)  # noqa: E731
        mk = _jax_attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward, kv_repeat=rep)
        return _time_jax_attention(attn, mk, backward)

    mha_note = "no GQA: kv heads repeated outside the timed call" if rep > 1 else None
    _run(results, suite, name, "jax_pallas_mha", shape, dense_extra("jax_pallas_mha", mha_note), pallas_mha,
         flops=dense_flops, bytes_=nbytes)

    def pallas_mgpu():
        _require_gpu("JAX Pallas attention_mgpu (Mosaic GPU)")
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        if float(cc) < 9.0:
            raise RuntimeError(f"attention_mgpu needs sm90+ (device compute capability {cc})")
        from jax.experimental.pallas.ops.gpu import attention_mgpu
        bwd = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64) if backward else {}
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal, **bwd)
        attn = lambda q, k, v: attention_mgpu.attention(q, k, v, config)  # noqa: E731
        # Its shared-memory scratch is hard-coded float16 (jax 0.11.2 and 0.12): bf16 inputs fail
        # ("src had type bfloat16 and dst had type float16"), so it runs on float16 inputs.
        run_dtype, note = dtype, "block_q=64 block_kv=128 (its own example's config)"
        if dtype == jnp.bfloat16:
            run_dtype, note = jnp.dtype(jnp.float16), note + "; float16 inputs (its scratch is f16 only)"
        if dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
            raise RuntimeError(f"skipped: attention_mgpu supports float16 only (got {dtype.name})")
        mk = _jax_attention_inputs(B, Sq, Skv, Hq, Hkv, D, run_dtype, backward)
        return _time_jax_attention(attn, mk, backward), note

    _run(results, suite, name, "jax_pallas_mgpu", shape, dense_extra("jax_pallas_mgpu"), pallas_mgpu,
         flops=dense_flops, bytes_=nbytes)

    def sdpa():
        from benchmarks import peers_torch
        return peers_torch.time_sdpa(B, Sq, Skv, Hq, Hkv, D, dtype, causal=causal, backward=backward)

    _run(results, suite, name, "torch_sdpa", shape, dense_extra("torch_sdpa"), sdpa, flops=dense_flops,
         bytes_=nbytes)

    flex_bm = block_mask if block_mask is not None else dense_bm
    flex_extra = dict(base)
    if block_mask is None:
        flex_extra["note"] = "causal block mask" if causal else "full block mask"

    def flex():
        from benchmarks import peers_torch
        return peers_torch.time_flex(B, Sq, Skv, Hq, Hkv, D, dtype, flex_bm, backward=backward), "torch.compile"

    _run(results, suite, name, "torch_flex", shape, flex_extra, flex,
         flops=W.attention_flops(flex_bm, B, Hq, D, backward=backward), bytes_=nbytes)
    return results


# -- grouped matmul -------------------------------------------------------------------------------
def gmm_case_name(M, K, N, G, *, backward=False) -> str:
    return f"M={M} K={K} N={N} G={G}" + (" fwd+bwd" if backward else "")


def _group_sizes(group_sizes) -> np.ndarray:
    gs = np.asarray(group_sizes).astype(np.int32)
    if gs.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D; got shape {gs.shape}")
    return gs


def gmm_peers(M, K, N, group_sizes, dtype, *, backward=False, name: str | None = None, suite: str = "gmm",
              extra: dict | None = None) -> list[Result]:
    """``jax.lax.ragged_dot``, JAX's Mosaic GPU ``ragged_dot_mgpu`` and ``torch._grouped_mm`` on
    lhs [M, K] @ rhs [G, K, N] with rows sorted by group (``group_sizes`` [G])."""
    dtype = jnp.dtype(dtype)
    gs = _group_sizes(group_sizes)
    G = len(gs)
    rows = int(min(gs.sum(), M))
    name = name or gmm_case_name(M, K, N, G, backward=backward)
    shape = dict(M=M, K=K, N=N, G=G, dtype=dtype.name, backward=bool(backward))
    fl = W.gmm_flops(rows, K, N, backward=backward)
    nb = W.gmm_bytes(M, K, N, G, dtype.itemsize, backward=backward)
    base = dict(extra or {})
    results: list[Result] = []
    gs_dev = jnp.asarray(gs)

    def make(i):
        lhs = timing.random_normal(10 * i + 1, (M, K), dtype)
        rhs = timing.random_normal(10 * i + 2, (G, K, N), dtype, scale=K ** -0.5)
        return (lhs, rhs, timing.random_normal(10 * i + 3, (M, N), dtype)) if backward else (lhs, rhs)

    def ragged_dot():
        f = lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs, gs_dev)  # noqa: E731
        return timing.time_fn(_vjp_fn(f, 2) if backward else jax.jit(f), make)

    _run(results, suite, name, "ragged_dot", shape, base, ragged_dot, flops=fl, bytes_=nb)

    def mgpu():
        _require_gpu("ragged_dot_mgpu (Mosaic GPU)")
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        if float(cc) < 9.0:
            raise RuntimeError(f"ragged_dot_mgpu needs sm90+ (device compute capability {cc})")
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm
        cfg = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
        fwd = lambda lhs, rhs: rdm.ragged_dot(lhs, rhs, group_sizes=gs_dev, **cfg)  # noqa: E731
        if not backward:
            return timing.time_fn(jax.jit(fwd), make), "block 128x128x64, 4 stages (untuned)"
        from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trdm

        def fwd_bwd(lhs, rhs, do):  # no VJP upstream: composed from its forward kernels
            out = fwd(lhs, rhs)
            dlhs = rdm.ragged_dot(do, rhs, group_sizes=gs_dev, transpose_rhs=True, **cfg)
            drhs = trdm.transposed_ragged_dot(lhs, do, group_sizes=gs_dev, **cfg)
            return out, dlhs, drhs
        return timing.time_fn(jax.jit(fwd_bwd), make), "fwd + ragged_dot(transpose_rhs) + transposed_ragged_dot"

    _run(results, suite, name, "ragged_dot_mgpu", shape, base, mgpu, flops=fl, bytes_=nb)

    def grouped_mm():
        from benchmarks import peers_torch
        return peers_torch.time_grouped_mm(M, K, N, gs, dtype, backward=backward)

    _run(results, suite, name, "torch_grouped_mm", shape, base, grouped_mm, flops=fl, bytes_=nb)
    return results


# -- MoE ------------------------------------------------------------------------------------------
ROUTERS = ("uniform", "zipf")


def router_bias(E: int, router: str = "uniform", alpha: float = 1.0) -> np.ndarray:
    """float32 [E] added to the router logits: zeros ("uniform": random, balanced in
    expectation) or ``-alpha * log(1 + rank)`` ("zipf": expert e about (1 + e)^-alpha
    as popular). Shared with the JAX MoE suite so both route alike."""
    if router == "uniform":
        return np.zeros(E, np.float32)
    if router == "zipf":
        return (-alpha * np.log1p(np.arange(E))).astype(np.float32)
    raise ValueError(f"router must be one of {ROUTERS}; got {router!r}")


def moe_case_name(T, D, F, E, top_k, *, router="uniform", backward=False) -> str:
    return f"T={T} D={D} F={F} E={E} k={top_k} {router}" + (" fwd+bwd" if backward else "")


def torch_moe(T, D, F, E, top_k, dtype, *, backward=False, router="uniform", name: str | None = None,
              suite: str = "moe", extra: dict | None = None) -> list[Result]:
    """A torch MoE FFN (softmax top-k router, sort by expert, ``torch._grouped_mm`` for gate,
    up and down, SwiGLU, weighted combine) on T tokens of width D, E experts of width F."""
    dtype = jnp.dtype(dtype)
    name = name or moe_case_name(T, D, F, E, top_k, router=router, backward=backward)
    shape = dict(T=T, D=D, F=F, E=E, top_k=top_k, router=router, dtype=dtype.name, backward=bool(backward))
    results: list[Result] = []
    bias = router_bias(E, router)

    def work():
        from benchmarks import peers_torch
        return peers_torch.time_moe(T, D, F, E, top_k, dtype, bias, backward=backward), "eager"

    _run(results, suite, name, "torch_moe", shape, dict(extra or {}), work,
         flops=W.moe_flops(T, D, F, E, top_k, backward=backward),
         bytes_=W.moe_bytes(T, D, F, E, top_k, dtype.itemsize, backward=backward))
    return results
