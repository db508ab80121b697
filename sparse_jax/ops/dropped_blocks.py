"""``dropped_block_attention``: the mass of the blocks a block-sparse table skips, estimated
from each block's mean key and value, and ``merge_attention`` to add it to the sparse output.

Definition and reference: :mod:`sparse_jax.reference.dropped_blocks`. Backends: ``triton``
(a forward kernel, ``pallas_kernels/triton/dropped_blocks.py``; the backward differentiates
the chunked reference, whose score matrices are 1/block_size of the attention's) and
``xla`` (the reference both ways). There is no Mosaic kernel: on TPUs the default backend
falls back to ``xla`` (the estimate is ~1/block_size of the sparse kernel's work).
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp

from sparse_jax import backends
from sparse_jax._block_tables import EMPTY, FULL
from sparse_jax.reference import dropped_blocks as ref
from sparse_jax.selection.tables import static_classes

__all__ = ["add_dropped_estimate", "dropped_block_attention", "dropped_block_table", "merge_attention"]

merge_attention = ref.merge_attention

_SUPPORTED = (backends.TRITON, backends.XLA)


def _check(q, k, v, dropped, block_size, kv_permutation):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, S, H, D]; got shape {tuple(x.shape)}")
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    bq, bk = (int(x) for x in block_size)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive; got {block_size}")
    want = (-(-sq // bq), -(-skv // bk))
    ds = tuple(dropped.shape)
    if (len(ds) != 4 or ds[0] not in (1, b) or ds[1] not in (1, hkv, hq) or ds[2:] != want
            or dropped.dtype != jnp.bool_):
        raise ValueError(f"dropped must be bool [B|1, 1|Hkv|Hq, nQb, nKb] = [{b}, {hkv} or {hq}, {want[0]}, "
                         f"{want[1]}]; got {dropped.dtype} {list(ds)}")
    if kv_permutation is not None and tuple(kv_permutation.shape) != (b, hkv, skv):
        raise ValueError(f"kv_permutation must be [B, Hkv, Skv] = [{b}, {hkv}, {skv}]; "
                         f"got {list(kv_permutation.shape)}")
    return bq, bk


def dropped_block_table(block_mask):
    """bool [B|1, H|1, nQb, nKb]: the blocks a :class:`~sparse_jax.BlockMask` skips although
    its mask would let every pair in them through (FULL under the mask, not in the tables):
    the blocks whose mass :func:`dropped_block_attention` can estimate. Square blocks only."""
    bq, bk = block_mask.block_size
    if bq != bk:
        raise ValueError(f"dropped_block_table needs square blocks; got {block_mask.block_size}")
    visible = static_classes(block_mask.q_len, block_mask.kv_len, bq, block_mask.mask) == FULL
    return jnp.asarray(visible) & (jnp.asarray(block_mask.block_classes()) == EMPTY)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _estimate(block_size, scale, softcap, interpret, kernel, q, k, v, dropped, kv_permutation):
    return kernel.forward(q, k, v, dropped, block_size=block_size, scale=scale, softcap=softcap,
                          kv_permutation=kv_permutation, interpret=interpret)


def _estimate_fwd(block_size, scale, softcap, interpret, kernel, q, k, v, dropped, kv_permutation):
    out = _estimate(block_size, scale, softcap, interpret, kernel, q, k, v, dropped, kv_permutation)
    return out, (q, k, v, dropped, kv_permutation)


def _estimate_bwd(block_size, scale, softcap, interpret, kernel, res, cts):
    q, k, v, dropped, kv_permutation = res
    _, vjp = jax.vjp(lambda q, k, v: ref.dropped_block_attention(
        q, k, v, dropped, block_size=block_size, scale=scale, softcap=softcap, kv_permutation=kv_permutation),
        q, k, v)
    dq, dk, dv = vjp(cts)
    return dq, dk, dv, None, None


_estimate.defvjp(_estimate_fwd, _estimate_bwd)


def dropped_block_attention(q, k, v, dropped, *, block_size=128, scale: float | None = None,
                            softcap: float | None = None, kv_permutation=None, backend: str | None = None,
                            interpret: bool = False):
    """Attention of every query to one pseudo-key per dropped block (mean key, mean value,
    logit + log of the block's rows).

    Args:
      q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D]; v: [B, Skv, Hkv, Dv] (one float dtype).
      dropped: bool [B|1, 1|Hkv|Hq, nQb, nKb]: the (query block, kv block) pairs to estimate,
        typically :func:`dropped_block_table` of the sparse kernel's BlockMask. Constant (no
        gradient).
      block_size: int or (bq, bkv), the tables' blocks.
      scale, softcap: as in :func:`sparse_jax.block_sparse_attention`.
      kv_permutation: int32 [B, Hkv, Skv] or None: blocks of a permuted key layout
        (block j holds rows ``perm[b, h, j*bkv:(j+1)*bkv]``).
      backend: "triton", "xla" or None (TPUs fall back to "xla"); interpret: CPU interpret mode.

    Returns:
      (o float32 [B, Sq, Hq, Dv], lse float32 [B, Hq, Sq]); rows with nothing dropped give
      o = 0, lse = -inf. Combine with the sparse kernel's (o, lse) by :func:`merge_attention`.
    """
    bq, bk = _check(q, k, v, dropped, block_size, kv_permutation)
    backend = backends.resolve(backend, op="dropped_block_attention", supported=_SUPPORTED)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    dropped = jax.lax.stop_gradient(dropped)
    if backend == backends.XLA:
        return ref.dropped_block_attention(q, k, v, dropped, block_size=(bq, bk), scale=scale, softcap=softcap,
                                           kv_permutation=kv_permutation)
    kernel = importlib.import_module("pallas_kernels.triton.dropped_blocks")
    if kernel.row_tile(bq) is None:
        raise ValueError(f"backend 'triton' needs a query block divisible by 16 for the dropped-block "
                         f"estimate; got {bq} (use backend='xla')")
    return _estimate((bq, bk), scale, softcap, bool(interpret), kernel, q, k, v, dropped, kv_permutation)


def add_dropped_estimate(q, k, v, o, lse, block_mask, *, kv_permutation=None, scale: float | None = None,
                         softcap: float | None = None, backend: str | None = None, interpret: bool = False):
    """A block-sparse attention's (o [B, Sq, Hq, Dv], lse float32 [B, Hq, Sq]) over ``block_mask``
    merged with :func:`dropped_block_attention` over :func:`dropped_block_table` of it (same q/k/v
    layout as the kernel call). Returns (o in q's dtype, lse). Mosaic TPU runs the estimate on
    the xla reference."""
    est_backend = backends.XLA if backend == backends.MOSAIC_TPU else backend
    oc, lc = dropped_block_attention(q, k, v, dropped_block_table(block_mask), block_size=block_mask.block_size,
                                     scale=scale, softcap=softcap, kv_permutation=kv_permutation,
                                     backend=est_backend, interpret=interpret)
    o, lse = merge_attention(o, lse, oc, lc)
    return o.astype(q.dtype), lse
