"""The torch peers: SDPA (flash), FlexAttention, ``torch._grouped_mm`` and an MoE FFN.

Each ``time_*`` function builds fresh random inputs on the torch device, warms up
(compiling where it compiles) and returns a :class:`benchmarks.timing.Timing`; it
raises when it cannot run and :mod:`benchmarks.peers` turns that into an error Result.
They run on CUDA with CUDA-event timing; with ``SPARSE_JAX_BENCH_TORCH_CPU=1`` they also
run on the CPU (wall-clock timing), which is only for checking this code without a GPU.
Layouts: torch attention is [B, H, S, D]; weights and tables match the JAX side.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np

from benchmarks import timing

CPU_ENV = "SPARSE_JAX_BENCH_TORCH_CPU"


def device() -> str:
    """"cuda" when torch sees a GPU, "cpu" if allowed by CPU_ENV; raises otherwise."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get(CPU_ENV) == "1":
        return "cpu"
    raise RuntimeError("torch has no CUDA device here (torch peers run on the GPU machine)")


def torch_dtype(dtype):
    import torch
    name = np.dtype(dtype).name if not hasattr(dtype, "dtype") else np.dtype(dtype.dtype).name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _randn(seed: int, shape, dtype, dev, scale: float = 1.0, requires_grad: bool = False):
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    # Drawn in the target dtype: a float32 draw of DeepSeek-V3's expert weights is a 15 GB temporary.
    x = torch.randn(shape, generator=g, device=dev, dtype=dtype).mul_(scale)
    return x.requires_grad_(requires_grad)


def time_it(fn, make_args, *, warmup: int = 3, iters: int = 20, rotations: int = 3) -> timing.Timing:
    """CUDA-event timing on the GPU (timing.time_torch); wall clock on the CPU fallback."""
    import torch
    if device() == "cuda":
        return timing.time_torch(fn, make_args, warmup=warmup, iters=iters, rotations=rotations)
    arg_sets = [tuple(make_args(i)) for i in range(rotations)]
    for i in range(warmup):
        fn(*arg_sets[i % rotations])
    ts = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(*arg_sets[i % rotations])
        ts.append(time.perf_counter() - t0)
    del torch
    ts = np.asarray(ts)
    return timing.Timing(float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90)), len(ts))


def free_memory() -> None:
    """Hand cached torch memory back so the JAX side can grow into it."""
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# -- attention --------------------------------------------------------------------------------------
def _attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward, dev):
    dt = torch_dtype(dtype)
    s = 1.0

    def make(i):
        q = _randn(10 * i + 1, (B, Hq, Sq, D), dt, dev, s, backward)
        k = _randn(10 * i + 2, (B, Hkv, Skv, D), dt, dev, s, backward)
        v = _randn(10 * i + 3, (B, Hkv, Skv, D), dt, dev, s, backward)
        if not backward:
            return q, k, v
        return q, k, v, _randn(10 * i + 4, (B, Hq, Sq, D), dt, dev)
    return make


def _with_backward(attn, backward):
    import torch
    if not backward:
        return lambda q, k, v: attn(q, k, v)

    def fwd_bwd(q, k, v, do):
        out = attn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), do)
    return fwd_bwd


def time_sdpa(B, Sq, Skv, Hq, Hkv, D, dtype, *, causal: bool, backward: bool = False) -> tuple[timing.Timing, str]:
    """torch SDPA restricted to the flash backend. Returns (timing, note)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = device()
    gqa = Hq != Hkv
    note = "flash backend" + (", enable_gqa" if gqa else "")

    def attn(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    make = _attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward, dev)
    fn = _with_backward(attn, backward)
    try:
        fn(*make(0))
    except RuntimeError:
        if not gqa:
            raise
        # Some builds' flash kernel refuses enable_gqa: repeat the kv heads outside the timed call.
        base, rep = make, Hq // Hkv

        def make(i):  # noqa: F811
            a = list(base(i))
            a[1] = a[1].detach().repeat_interleave(rep, dim=1).requires_grad_(backward)
            a[2] = a[2].detach().repeat_interleave(rep, dim=1).requires_grad_(backward)
            return a

        gqa, note = False, "flash backend, kv heads repeated (outside the timed call)"
        fn = _with_backward(attn, backward)
    return time_it(fn, make), note


def torch_mask_mod(mask, dev):
    """A FlexAttention mask_mod computing exactly what sparse_jax's ``mask`` computes.

    sparse_jax masks are written with operators torch tensors share (-, >=, &, //), so
    they evaluate on torch index tensors directly; a document mask gets its segment ids
    gathered here and handed in the way a kernel hands in the tile's ids.
    """
    import torch
    if mask is None:
        return None
    seg = mask.segment_ids()
    if seg is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask.evaluate(b, h, q_idx, kv_idx)
        return mask_mod
    q_ids = torch.as_tensor(np.asarray(seg[0]), device=dev)
    kv_ids = torch.as_tensor(np.asarray(seg[1]), device=dev)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
        qs = q_ids[q_idx] if q_ids.ndim == 1 else q_ids[b, q_idx]
        ks = kv_ids[kv_idx] if kv_ids.ndim == 1 else kv_ids[b, kv_idx]
        return mask.evaluate(b, h, q_idx, kv_idx, qs, ks)
    return mask_mod


def to_torch_block_mask(block_mask, Hq: int, dev):
    """torch ``BlockMask.from_kv_blocks`` with the same partial / full blocks as ``block_mask``.

    Heads: sparse_jax tables with H = Hkv (< Hq) are expanded to the query heads (query
    head h reads kv head h // (Hq // Hkv)); torch infers the number of kv blocks from
    the index width, so index tables are padded to nKb (slots past a row's count are
    ignored by both).
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    bb, bh = block_mask.shape[:2]
    nk = block_mask.num_kv_blocks

    def convert(num, idx):
        num, idx = np.asarray(num, np.int32), np.asarray(idx, np.int32)
        if bh not in (1, Hq):
            num, idx = np.repeat(num, Hq // bh, axis=1), np.repeat(idx, Hq // bh, axis=1)
        if idx.shape[-1] < nk:
            idx = np.concatenate([idx, np.zeros(idx.shape[:-1] + (nk - idx.shape[-1],), np.int32)], axis=-1)
        return (torch.from_numpy(np.ascontiguousarray(num)).to(dev),
                torch.from_numpy(np.ascontiguousarray(idx)).to(dev))

    kv_num, kv_idx = convert(block_mask.kv_num_blocks, block_mask.kv_indices)
    full_num, full_idx = convert(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return TorchBlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tuple(block_mask.block_size),
        mask_mod=torch_mask_mod(block_mask.mask, dev), seq_lengths=(block_mask.q_len, block_mask.kv_len))


@functools.cache
def _compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    cfg = torch._dynamo.config
    # A sweep compiles once per (shape, mask): past dynamo's recompile limit (8) it would
    # silently run flex eagerly, which ignores the block tables. Allow many; fail, never fall back.
    for key, value in (("recompile_limit", 4096), ("cache_size_limit", 4096),
                       ("accumulated_recompile_limit", 1 << 16), ("accumulated_cache_size_limit", 1 << 16)):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), value))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_fn(block_mask, Hq: int, Hkv: int, dev, *, compiled: bool = True):
    """``attn(q, k, v)`` running FlexAttention over ``block_mask`` ([B, H, S, D] tensors)."""
    from torch.nn.attention.flex_attention import flex_attention
    tbm = to_torch_block_mask(block_mask, Hq, dev)
    flex = _compiled_flex() if compiled else flex_attention
    gqa = Hq != Hkv
    return lambda q, k, v: flex(q, k, v, block_mask=tbm, enable_gqa=gqa)


def time_flex(B, Sq, Skv, Hq, Hkv, D, dtype, block_mask, *, backward: bool = False) -> timing.Timing:
    """torch.compile'd FlexAttention with the sparse_jax block mask converted (timed after warm-up)."""
    dev = device()
    make = _attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, backward, dev)
    fn = _with_backward(flex_attention_fn(block_mask, Hq, Hkv, dev), backward)
    return time_it(fn, make, warmup=3)


# -- grouped matmul -------------------------------------------------------------------------------
def _offsets(group_sizes, dev):
    import torch
    sizes = np.asarray(group_sizes, np.int64)
    return torch.as_tensor(np.cumsum(sizes).astype(np.int32), device=dev)


def time_grouped_mm(M, K, N, group_sizes, dtype, *, backward: bool = False) -> timing.Timing:
    """``torch._grouped_mm(x [M, K], w [G, K, N], offs)``, offs = cumsum(group_sizes) int32."""
    import torch
    dev = device()
    dt = torch_dtype(dtype)
    G = len(group_sizes)
    offs = _offsets(group_sizes, dev)

    def make(i):
        x = _randn(10 * i + 1, (M, K), dt, dev, 1.0, backward)
        w = _randn(10 * i + 2, (G, K, N), dt, dev, K ** -0.5, backward)
        return (x, w, _randn(10 * i + 3, (M, N), dt, dev)) if backward else (x, w)

    if backward:
        def fn(x, w, do):
            return torch.autograd.grad(torch._grouped_mm(x, w, offs), (x, w), do)
    else:
        def fn(x, w):
            return torch._grouped_mm(x, w, offs)
    return time_it(fn, make)


# -- MoE FFN --------------------------------------------------------------------------------------
def moe_forward(x, w_router, router_bias, w_gate, w_up, w_down, top_k: int):
    """Softmax top-k router (weights renormalised over the k), sort by expert, three grouped
    matmuls (gate, up, down) with SwiGLU, weighted scatter-add back to the tokens."""
    import torch
    import torch.nn.functional as F
    T, E = x.shape[0], w_router.shape[1]
    logits = (x @ w_router).float() + router_bias
    probs = torch.softmax(logits, dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    xs = x[token]
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    h = F.silu(torch._grouped_mm(xs, w_gate, offs)) * torch._grouped_mm(xs, w_up, offs)
    y = torch._grouped_mm(h, w_down, offs) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)


def time_moe(T, D, F, E, top_k, dtype, router_bias, *, backward: bool = False) -> timing.Timing:
    import torch
    dev = device()
    dt = torch_dtype(dtype)
    bias = torch.as_tensor(np.asarray(router_bias, np.float32), device=dev)

    # One set of expert weights for every rotation, like the JAX side: three copies of
    # DeepSeek-V3's 22.5 GB did not fit beside JAX's arrays (the earlier OOM).
    weights = [_randn(3, (E, D, F), dt, dev, D ** -0.5, backward),
               _randn(4, (E, D, F), dt, dev, D ** -0.5, backward),
               _randn(5, (E, F, D), dt, dev, F ** -0.5, backward)]

    def make(i):
        s = 10 * i
        args = [_randn(s + 1, (T, D), dt, dev, 1.0, backward),
                _randn(s + 2, (D, E), dt, dev, D ** -0.5, backward), *weights]
        if backward:
            args.append(_randn(s + 6, (T, D), dt, dev))
        return args

    if backward:
        def fn(x, wr, wg, wu, wd, do):
            out = moe_forward(x, wr, bias, wg, wu, wd, top_k)
            return torch.autograd.grad(out, (x, wr, wg, wu, wd), do)
    else:
        def fn(x, wr, wg, wu, wd):
            with torch.no_grad():
                return moe_forward(x, wr, bias, wg, wu, wd, top_k)
    return time_it(fn, make)
