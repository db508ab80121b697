"""``indexed_attention`` / ``indexed_block_attention``: per-query key lists (DSA, NSA selection).

Validation, canonical lists, backend dispatch and the custom VJP around the kernels.
Kernel backends implement, in ``pallas_kernels.<lowering>.indexed_attention``::

    forward(q, k, v, lists, q_off, *, span, scale, causal, loop_order, query_tile, interpret)
        -> (o [B, Sq, Hq, Dv] q.dtype, lse f32 [B, Sq, Hq])
    backward(q, k, v, o, lse, do, lists, q_off, *, span, scale, causal, loop_order, query_tile, interpret)
        -> (dq, dk, dv)

with ``lists`` canonical (:func:`pallas_kernels.common.indexed.canonicalize`), ``span``
1 for token lists and the block size for block lists, ``q_off int32 [B]``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import indexed as common
from sparse_jax import backends
from sparse_jax.reference import indexed as ref

_KERNEL_MODULES = {
    backends.TRITON: "pallas_kernels.triton.indexed_attention",
    backends.MOSAIC_TPU: "pallas_kernels.tpu.indexed_attention",
}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Static:
    module: str
    span: int
    scale: float
    causal: bool
    loop_order: str
    query_tile: int | None
    interpret: object

    def kwargs(self):
        return dict(span=self.span, scale=self.scale, causal=self.causal, loop_order=self.loop_order,
                    query_tile=self.query_tile, interpret=self.interpret)

    @property
    def kernel(self):
        return importlib.import_module(self.module)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(static, q, k, v, lists, q_off):
    return static.kernel.forward(q, k, v, lists, q_off, **static.kwargs())


def _attend_fwd(static, q, k, v, lists, q_off):
    o, lse = static.kernel.forward(q, k, v, lists, q_off, **static.kwargs())
    return (o, lse), (q, k, v, o, lse, lists, q_off)


def _attend_bwd(static, res, cts):
    q, k, v, o, lse, lists, q_off = res
    do, _ = cts  # lse is returned for inspection; it is not differentiated
    dq, dk, dv = static.kernel.backward(q, k, v, o, lse, do.astype(o.dtype), lists, q_off, **static.kwargs())
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _validate(q, k, v, indices, name):
    for what, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{what} must be [B, S, H, D]; got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{what} must be float32, bfloat16 or float16; got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Sq, Hq, D = q.shape
    if k.shape[0] != B or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, Skv, Hkv] with q's B={B}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: {D} vs {k.shape[3]}")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not hasattr(indices, "dtype") or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array; got {getattr(indices, 'dtype', type(indices))}")
    if indices.ndim != 4 or tuple(indices.shape[:3]) != (B, Sq, Hkv) or indices.shape[3] < 1:
        raise ValueError(f"{name} must be [B, Sq, Hkv, n] = [{B}, {Sq}, {Hkv}, n >= 1]; got {tuple(indices.shape)}")


def _check_query_tile(query_tile):
    if query_tile is None:
        return None
    T = int(query_tile)
    if not 1 <= T <= common.MAX_QUERY_TILE or T & (T - 1):
        raise ValueError(f"query_tile must be a power of two in [1, {common.MAX_QUERY_TILE}] or None; got {query_tile}")
    return T


def _run(q, k, v, indices, *, span, scale, causal, q_offset, unique, return_lse, backend, interpret, loop_order,
         query_tile, op, reference_fn):
    B, Sq, Hq, D = q.shape
    Skv = k.shape[1]
    q_off = ref.query_offsets(q_offset, B, Sq, Skv)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    backend = backends.resolve(backend, op=op)
    if backend == backends.XLA:
        o, lse = reference_fn(q, k, v, indices, scale=scale, causal=causal, q_offset=q_off, return_lse=True)
        return (o, lse) if return_lse else o
    if backend == backends.MOSAIC_TPU and loop_order == common.KV_MAJOR:
        raise ValueError(f"{op}: backend 'mosaic_tpu' runs the query-major loop only; pass loop_order=None "
                         "or 'query'")
    n_units = Skv if span == 1 else common.cdiv(Skv, span)
    lists = common.canonicalize(indices, q_off, span=span, n_units=n_units, causal=bool(causal), unique=unique)
    static = _Static(_KERNEL_MODULES[backend], span, scale, bool(causal), loop_order, query_tile, interpret)
    o, lse = _attend(static, q, k, v, lists, q_off)
    return (o, jnp.transpose(lse, (0, 2, 1))) if return_lse else o


def indexed_attention(q, k, v, indices, *, scale: float | None = None, causal: bool = True, q_offset=None,
                      unique_indices: bool = False, return_lse: bool = False, query_tile: int | None = None,
                      backend: str | None = None, interpret=False):
    """Attention of each query over its own list of key tokens (DeepSeek sparse attention).

    Args:
      q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D]; v: [B, Skv, Hkv, Dv] (float32/bfloat16/float16,
        one dtype; Hq a multiple of Hkv).
      indices: int [B, Sq, Hkv, topk]: the keys query ``t`` of kv-head group ``h`` attends
        to, shared by the group's Hq/Hkv query heads. ``-1`` marks an unused slot;
        negative values, values ``>= Skv`` and (``causal``) keys after the query are
        ignored. A key listed twice counts once (set semantics).
      scale: logit scale (default 1/sqrt(D)).
      causal: drop keys after the query's position ``t + q_offset``.
      q_offset: int or int [B]: absolute position of query 0 (default ``Skv - Sq``:
        bottom-right aligned, as in chunked prefill).
      unique_indices: promise that no key repeats within a row (true of the indexers'
        output). Skips the sort that implements set semantics (and the early stop it
        gives rows with many unused slots); a repeated key is then counted once per slot.
      return_lse: also return the log-sum-exp float32 [B, Hq, Sq] (-inf for empty rows).
      query_tile: triton only (a performance choice; other backends ignore it): consecutive
        tokens per kernel program, a power of two <= 16. The program walks the union of their
        lists once (each listed key row is read once for all of them, and dK/dV get one atomic
        add per union key), masking per token. Pays off when neighbouring tokens' lists
        overlap; None picks 1. With a tile > 1, repeats count once even under
        ``unique_indices=True``.
      backend: "triton", "mosaic_tpu", "xla" or None (see :mod:`sparse_jax.backends`).
      interpret: run the Pallas kernels in interpret mode (CPU); for mosaic_tpu a
        ``pltpu.InterpretParams`` is also accepted.

    Returns:
      o [B, Sq, Hq, Dv] in q's dtype (rows with no allowed key are 0), and lse if asked.

    Differentiable in q, k, v. On triton, dK/dV are scattered with float32 atomics
    (not bitwise deterministic run to run); on mosaic_tpu and xla they are deterministic.
    """
    _validate(q, k, v, indices, "indices")
    return _run(q, k, v, indices, span=1, scale=scale, causal=causal, q_offset=q_offset,
                unique=bool(unique_indices), return_lse=return_lse, backend=backend, interpret=interpret,
                loop_order=common.QUERY_MAJOR, query_tile=_check_query_tile(query_tile), op="indexed_attention",
                reference_fn=ref.indexed_attention)


def indexed_block_attention(q, k, v, block_indices, *, block_size: int = 64, scale: float | None = None,
                            causal: bool = True, q_offset=None, loop_order: str | None = None,
                            query_tile: int | None = None, return_lse: bool = False, backend: str | None = None,
                            interpret=False):
    """Attention of each query over its own list of key blocks (NSA's selected branch).

    Args:
      q, k, v: as in :func:`indexed_attention`.
      block_indices: int [B, Sq, Hkv, n_blocks]: key blocks (of ``block_size`` tokens;
        block ``j`` holds keys ``j*block_size ... j*block_size + block_size - 1``) query
        ``t`` of group ``h`` attends to. ``-1`` / out of range / (causal) starting
        after the query: ignored; repeats count once. Inside a listed block, keys past
        ``Skv`` and (causal) after the query are masked.
      block_size: tokens per block (the last block may be ragged).
      loop_order: "query" (NSA: a token's G query heads are the MMA rows, its blocks the
        inner loop), "kv" (FSA: one program per key block over the tokens that selected
        it; partial softmaxes merged afterwards; deterministic backward) or None:
        "query" when Hq/Hkv >= 32, else "kv" (H100: kv-major trained 1.4-3.5x faster at
        Hq/Hkv = 16). mosaic_tpu runs "query" only. On Hopper GPUs the forward runs the Mosaic
        GPU kernel whatever the loop order when it takes the problem (bf16/fp16, D = Dv in
        {64, 128}, Hq/Hkv in {8, 16, 32, 64} or a multiple of 128, block size 32/64/128
        dividing Skv; ``SPARSE_JAX_GPU_INDEXED_FWD`` chooses explicitly): both loops return the
        same (o, lse), so ``loop_order`` and ``query_tile`` then pick the backward.
      query_tile: tokens per program of the query-major loop (triton; see
        :func:`indexed_attention`). None: 1. Larger tiles paid off on H100 only in the
        forward over strongly overlapping selections (4 tokens, G=16: 1.14x); they cost
        1.4-2.1x on unrelated selections and in the backward.
      Other arguments as in :func:`indexed_attention`.

    Returns:
      o [B, Sq, Hq, Dv] (and lse float32 [B, Hq, Sq] if ``return_lse``).
    """
    _validate(q, k, v, block_indices, "block_indices")
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be positive; got {block_size}")
    G = q.shape[2] // k.shape[2]
    order = common.choose_loop_order(G, loop_order)
    if loop_order is None and backends.resolve(backend, op="indexed_block_attention") == backends.MOSAIC_TPU:
        order = common.QUERY_MAJOR
    ref_fn = functools.partial(ref.indexed_block_attention, block_size=block_size)
    return _run(q, k, v, block_indices, span=block_size, scale=scale, causal=causal, q_offset=q_offset,
                unique=False, return_lse=return_lse, backend=backend, interpret=interpret, loop_order=order,
                query_tile=_check_query_tile(query_tile), op="indexed_block_attention", reference_fn=ref_fn)
