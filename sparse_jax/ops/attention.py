"""``block_sparse_attention``: validation, backend dispatch and the custom VJP around the kernels.

Kernel backends implement two functions in ``pallas_kernels.<lowering>.block_sparse_attention``::

    forward(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap,
            segments_everywhere, interpret) -> (o [B, Sq, Hq, Dv] q.dtype, lse f32 [B, Hq, Sq])
    backward(q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale,
             softcap, segments_everywhere, interpret, dlse=None) -> (dq, dk, dv)

with q_seg/kv_seg int32 [B, Sq]/[B, Skv] or None (segment ids: the mask's document
ids, or explicit ``segment_ids`` which then also apply to full blocks when
``segments_everywhere``), q_pos/kv_pos int32 [B, S] or None (positions the mask
is evaluated at), lse in natural log and -inf for rows with no allowed key
(whose output is 0). The block mask's H is 1, Hkv (one table per group) or Hq.
lse is differentiable: its cotangent ``dlse`` shifts FlashAttention-2's row term
``delta`` (:func:`pallas_kernels.common.attention_tiling.row_delta`), so partial
attentions can be merged through their lse with exact gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp

from sparse_jax import backends
from sparse_jax import reference
from sparse_jax.block_mask import BlockMask
from sparse_jax.reference import kv_permutation as kv_permutation_ref

_KERNEL_MODULES = {
    backends.TRITON: "pallas_kernels.triton.block_sparse_attention",
    backends.MOSAIC_TPU: "pallas_kernels.tpu.block_sparse_attention",
}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Backends whose kernels take ``kv_permutation`` (kernel modules receive it as a keyword).
_KV_PERMUTATION_BACKENDS = (backends.TRITON, backends.XLA)


@dataclasses.dataclass(frozen=True)
class _Static:
    module: str
    scale: float
    softcap: float | None
    segments_everywhere: bool
    interpret: bool

    def kwargs(self):
        return dict(scale=self.scale, softcap=self.softcap, segments_everywhere=self.segments_everywhere,
                    interpret=self.interpret)

    @property
    def kernel(self):
        return importlib.import_module(self.module)


def _kernel_kwargs(static, kv_perm):
    kw = static.kwargs()
    if kv_perm is not None:
        kw["kv_permutation"] = kv_perm
    return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, kv_perm=None):
    return static.kernel.forward(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos,
                                 **_kernel_kwargs(static, kv_perm))


def _attention_fwd(static, q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, kv_perm=None):
    o, lse = static.kernel.forward(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos,
                                   **_kernel_kwargs(static, kv_perm))
    return (o, lse), (q, k, v, o, lse, block_mask, q_seg, kv_seg, q_pos, kv_pos, kv_perm)


def _attention_bwd(static, res, cts):
    q, k, v, o, lse, block_mask, q_seg, kv_seg, q_pos, kv_pos, kv_perm = res
    do, dlse = cts  # dlse: zeros unless the caller's loss reads lse (e.g. merged attention partials)
    dq, dk, dv = static.kernel.backward(q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos,
                                        dlse=dlse, **_kernel_kwargs(static, kv_perm))
    return dq, dk, dv, None, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _rows(x, B, S, name):
    if x is None:
        return None
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array; got {x.dtype}")
    if x.ndim == 1:
        x = jnp.broadcast_to(x[None], (B,) + x.shape)
    if x.shape != (B, S):
        raise ValueError(f"{name} must be [{S}] or [{B}, {S}]; got {tuple(x.shape)}")
    return x.astype(jnp.int32)


def validate(q, k, v, block_mask):
    """Trace-time checks shared by every backend."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, S, H, D]; got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Sq, Hq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, Skv, Hkv]")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: {D} vs {k.shape[3]}")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a sparse_jax.BlockMask; got {type(block_mask).__name__}")
    if (block_mask.q_len, block_mask.kv_len) != (Sq, k.shape[1]):
        raise ValueError(f"block mask is for q_len={block_mask.q_len}, kv_len={block_mask.kv_len}, "
                         f"but q has {Sq} and k has {k.shape[1]} positions")
    bb, bh = block_mask.shape[:2]
    if bb not in (1, B):
        raise ValueError(f"block mask batch {bb} does not broadcast to B={B}")
    if bh not in (1, Hkv, Hq):
        raise ValueError(f"block mask has H={bh}; expected 1, the kv heads ({Hkv}) or the query heads ({Hq})")


def block_sparse_attention(q, k, v, block_mask: BlockMask, *, scale: float | None = None, segment_ids=None,
                           q_positions=None, kv_positions=None, softcap: float | None = None,
                           return_lse: bool = False, backend: str | None = None, interpret: bool = False,
                           kv_permutation=None):
    """FlashAttention over the blocks a :class:`BlockMask` lists.

    Args:
      q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D]; v: [B, Skv, Hkv, Dv] (float32/bfloat16/float16,
        one dtype; Hq a multiple of Hkv for GQA/MQA).
      block_mask: tables for (Sq, Skv); H is 1, Hkv or Hq.
      scale: logit scale (default 1/sqrt(D)).
      segment_ids: int [B, S] / [S] (self-attention) or a pair (q_ids, kv_ids): ANDs a
        document mask onto every block.
      q_positions, kv_positions: int [B, S] / [S]: positions the mask function is
        evaluated at inside partial blocks (default the indices; for permuted layouts).
      softcap: logits -> softcap * tanh(logits / softcap) (Gemma-2 style).
      return_lse: also return the log-sum-exp float32 [B, Hq, Sq] (-inf for empty rows);
        differentiable (gradients flow through it as through o).
      backend: "triton", "mosaic_tpu", "xla" or None (see :mod:`sparse_jax.backends`).
      interpret: run the Pallas kernel in interpret mode (CPU).
      kv_permutation: int [B, Hkv, Skv] (or [Hkv, Skv] / [Skv]): logical key position j of
        kv head h reads K/V row ``kv_permutation[b, h, j]`` (online permutation; the block
        mask is over logical positions, the mask function sees the original rows' positions
        and segment ids; out-of-range entries are padding). See
        :mod:`sparse_jax.reference.kv_permutation`. Triton and xla backends.

    Returns:
      o [B, Sq, Hq, Dv] in q's dtype (rows with no allowed key are 0), and lse if asked.
    """
    validate(q, k, v, block_mask)
    B, Sq, Hq, D = q.shape
    Skv = k.shape[1]
    kv_perm = None
    if kv_permutation is not None:
        kv_perm = kv_permutation_ref.normalize(kv_permutation, B, k.shape[2], Skv)
    backend = backends.resolve(backend, op="block_sparse_attention",
                               supported=backends.BACKENDS if kv_perm is None else _KV_PERMUTATION_BACKENDS,
                               feature=None if kv_perm is None else "kv_permutation")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if softcap is not None and float(softcap) <= 0:
        raise ValueError(f"softcap must be positive; got {softcap}")
    softcap = None if softcap is None else float(softcap)
    q_pos = _rows(q_positions, B, Sq, "q_positions")
    kv_pos = _rows(kv_positions, B, Skv, "kv_positions")
    explicit = None
    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        if Sq != Skv and not isinstance(segment_ids, (tuple, list)):
            raise ValueError("q_len != kv_len: pass segment_ids as a pair (q_segment_ids, kv_segment_ids)")
        explicit = (_rows(qs, B, Sq, "segment_ids"), _rows(ks, B, Skv, "segment_ids"))
    mask = block_mask.mask
    own = mask.segment_ids() if mask is not None else None
    if own is not None and explicit is not None:
        raise ValueError("the block mask already holds a document mask; pass segment ids through "
                         "masks.document(...) or segment_ids=, not both")
    if backend == backends.XLA and kv_perm is not None:
        out = kv_permutation_ref.attention(
            q, k, v, block_mask, kv_perm, scale=scale, segment_ids=explicit, q_positions=q_pos,
            kv_positions=kv_pos, softcap=softcap, return_lse=True)
        return out if return_lse else out[0]
    if backend == backends.XLA:
        out = reference.block_sparse_attention(
            q, k, v, block_mask, scale=scale, segment_ids=explicit, q_positions=q_pos, kv_positions=kv_pos,
            softcap=softcap, return_lse=True)
        return out if return_lse else out[0]
    if mask is not None and mask.captures_arrays():
        raise ValueError(f"backend {backend!r} evaluates mask functions inside the kernel on positions only, "
                         f"but {mask!r} reads captured arrays; express data-dependent masks with "
                         "masks.document(...) / segment_ids=, or use backend='xla'")
    if explicit is not None:
        q_seg, kv_seg = explicit
    elif own is not None:
        q_seg, kv_seg = _rows(own[0], B, Sq, "document q ids"), _rows(own[1], B, Skv, "document kv ids")
    else:
        q_seg = kv_seg = None
    static = _Static(_KERNEL_MODULES[backend], scale, softcap, explicit is not None, bool(interpret))
    o, lse = _attention(static, q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, kv_perm)
    return (o, lse) if return_lse else o
