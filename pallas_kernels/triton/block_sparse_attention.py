"""Triton (GPU) entry points of ``sparse_jax.block_sparse_attention``.

Implements the interface documented in :mod:`sparse_jax.ops.attention`::

    forward(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap,
            segments_everywhere, interpret, kv_permutation=None, config=None) -> (o, lse)
    backward(q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap,
             segments_everywhere, interpret, kv_permutation=None, config=None) -> (dq, dk, dv)

This module flattens operands and tables into the layout the kernels read
(``attention_fwd`` / ``attention_bwd``), picks launch configs
(``attention_configs``) and post-processes (un-permuting dK/dV).

On Hopper the forward runs the Mosaic GPU kernel (:mod:`pallas_kernels.mosaic_gpu.attention_fwd`:
TMA, warp-specialised) for the problems it takes; see :func:`forward_impl`.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import attention_tiling as tiling_lib
from pallas_kernels.common import kv_permutation as perm_lib
from pallas_kernels.triton import attention_blocks as blk
from pallas_kernels.triton import attention_bwd, attention_configs, attention_fwd
from pallas_kernels.mosaic_gpu import attention_fwd as mgpu_fwd
from pallas_kernels.mosaic_gpu import dispatch as mgpu_dispatch
from pallas_kernels.triton.attention_blocks import problem
from pallas_kernels.triton.attention_configs import BwdConfig, FwdConfig

SUPPORTS_KV_PERMUTATION = True


def _flat(x):
    return jnp.asarray(x).astype(jnp.int32).reshape(-1)


def _operand(P: blk.Problem, x, d: int):
    """[..., d] -> the kernels' [rows, d] layout (a free reshape)."""
    return x.reshape(-1, d)


def _meta_inputs(P: blk.Problem, q_seg, kv_seg, q_pos, kv_pos, perm) -> dict:
    """Positions / segment ids / permutation the kernels read (only those they need)."""
    out = {}
    if P.has_q_pos:
        out["q_pos"] = _flat(q_pos)
    if P.has_kv_pos:
        if perm is None:
            out["kv_pos"] = _flat(kv_pos)
        else:
            out["kv_pos"] = _flat(perm if kv_pos is None else perm_lib.permuted_rows(kv_pos, perm))
    if P.has_segments:
        out["q_seg"] = _flat(q_seg)
        out["kv_seg"] = _flat(kv_seg if perm is None else perm_lib.permuted_rows(kv_seg, perm))
    if perm is not None:
        out["perm"] = _flat(perm)
    return out


def _row_tables(block_mask, schedule: bool) -> dict:
    t = {"num": _flat(block_mask.kv_num_blocks), "idx": _flat(block_mask.kv_indices),
         "full_num": _flat(block_mask.full_kv_num_blocks), "full_idx": _flat(block_mask.full_kv_indices)}
    if schedule and block_mask.num_q_blocks > 1:
        t["order"] = _flat(tiling_lib.heavy_first_order(jnp.asarray(block_mask.kv_num_blocks),
                                                        jnp.asarray(block_mask.full_kv_num_blocks)))
    return t


def _col_tables(block_mask) -> dict:
    return {"q_num": _flat(block_mask.q_num_blocks), "q_idx": _flat(block_mask.q_indices),
            "full_q_num": _flat(block_mask.full_q_num_blocks), "full_q_idx": _flat(block_mask.full_q_indices)}


def _prepare_perm(kv_permutation, q, k):
    if kv_permutation is None:
        return None
    B, Skv, Hkv = k.shape[:3]
    return perm_lib.sanitize(perm_lib.normalize(kv_permutation, B, Hkv, Skv), Skv)


FWD_IMPL_ENV = "SPARSE_JAX_GPU_ATTENTION_FWD"


def forward_impl(q, k, v, block_mask, *, softcap, has_segments: bool, has_perm: bool, interpret: bool,
                 config) -> str:
    """'mosaic_gpu' or 'triton': which kernel runs this forward.

    ``SPARSE_JAX_GPU_ATTENTION_FWD`` = ``auto`` (default: Mosaic GPU on Hopper for the
    problems it takes, else Triton), ``triton`` or ``mosaic_gpu`` (an error when the
    Mosaic GPU kernel cannot take the problem). Interpret mode and a Triton config (passed,
    or set by ``attention_configs.override``) always run Triton.
    """
    force = interpret or isinstance(config, FwdConfig) or bool(attention_configs.overridden("fwd"))
    return mgpu_dispatch.choose(FWD_IMPL_ENV, lambda: mgpu_fwd.unsupported(
        q, k, v, block_mask, softcap=softcap, has_segments=has_segments, has_perm=has_perm), force_triton=force)


def forward(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap, segments_everywhere,
            interpret, kv_permutation=None, config: FwdConfig | mgpu_fwd.MgpuFwdConfig | None = None):
    """o [B, Sq, Hq, Dv] (q.dtype), lse float32 [B, Hq, Sq]."""
    impl = forward_impl(q, k, v, block_mask, softcap=softcap, interpret=interpret, config=config,
                        has_segments=q_seg is not None, has_perm=kv_permutation is not None)
    if impl == "mosaic_gpu":
        return mgpu_fwd.forward(q, k, v, block_mask, q_pos, kv_pos, scale=scale,
                                config=config if isinstance(config, mgpu_fwd.MgpuFwdConfig) else None)
    perm = _prepare_perm(kv_permutation, q, k)
    P = problem(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, scale=scale, softcap=softcap,
                segments_everywhere=segments_everywhere, kv_permutation=perm)
    # 'masked': something besides the K/V rows depends on the block index (mask function,
    # segment ids, permutation) — which deepens Triton's K/V ring (see attention_configs).
    masked = P.mask is not None or P.has_segments or P.has_perm
    cfg = config or attention_configs.forward_config(
        P.head_dim_pad, q.dtype, min(P.block_q, P.q_len), masked=masked,
        group=P.group if P.table_heads in (1, P.num_kv_heads) else 1, kv_len=P.kv_len)
    inputs = _row_tables(block_mask, cfg.schedule == "sorted")
    inputs.update(q=_operand(P, q, P.head_dim), k=_operand(P, k, P.head_dim), v=_operand(P, v, P.head_dim_v))
    inputs.update(_meta_inputs(P, q_seg, kv_seg, q_pos, kv_pos, perm))
    o, lse = attention_fwd.call(P, cfg, inputs, dtype=q.dtype, interpret=interpret)
    return (o.reshape(P.batch, P.q_len, P.num_q_heads, P.head_dim_v),
            lse.reshape(P.batch, P.q_len, P.num_q_heads).transpose(0, 2, 1))


def backward_inputs(q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap,
                    segments_everywhere, kv_permutation=None, dlse=None):
    """(problem, sanitized permutation or None, dQ-kernel inputs, dK/dV-kernel inputs) of a
    backward pass: the row statistics (head-major [B, Hq, Sq] like lse) and tables the two
    kernels read. ``benchmarks/tune_attention.py`` times the kernels separately with these."""
    perm = _prepare_perm(kv_permutation, q, k)
    P = problem(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, scale=scale, softcap=softcap,
                segments_everywhere=segments_everywhere, kv_permutation=perm)
    do = do.astype(q.dtype)
    delta = tiling_lib.row_delta(o, do, lse, dlse).reshape(-1)
    lse2 = jnp.where(jnp.isfinite(lse), lse * blk.LOG2E, jnp.inf).reshape(-1)
    ops = dict(q=_operand(P, q, P.head_dim), k=_operand(P, k, P.head_dim), v=_operand(P, v, P.head_dim_v),
               do=_operand(P, do, P.head_dim_v), lse2=lse2, delta=delta)
    meta = _meta_inputs(P, q_seg, kv_seg, q_pos, kv_pos, perm)
    return P, perm, {**_row_tables(block_mask, True), **ops, **meta}, {**_col_tables(block_mask), **ops, **meta}


def backward(q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap,
             segments_everywhere, interpret, kv_permutation=None, config: BwdConfig | None = None, dlse=None):
    """(dq, dk, dv) shaped and typed like (q, k, v); ``dlse`` float32 [B, Hq, Sq] or None."""
    P, perm, dq_inputs, dkdv_inputs = backward_inputs(
        q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos, scale=scale, softcap=softcap,
        segments_everywhere=segments_everywhere, kv_permutation=kv_permutation, dlse=dlse)
    cfg = config or attention_configs.backward_config(
        P.head_dim_pad, q.dtype, masked=P.mask is not None or P.has_segments or P.has_perm)
    if cfg.fused_dq:
        dkdv_inputs["dq_acc"] = _operand(P, jnp.zeros(q.shape, jnp.float32), P.head_dim)
        dk, dv, dq = attention_bwd.dkdv_call(P, cfg, dkdv_inputs, k_dtype=k.dtype, v_dtype=v.dtype,
                                             interpret=interpret)
        dq = (dq * P.scale).astype(q.dtype)
    else:
        dq = attention_bwd.dq_call(P, cfg, dq_inputs, dtype=q.dtype, interpret=interpret)
        dk, dv = attention_bwd.dkdv_call(P, cfg, dkdv_inputs, k_dtype=k.dtype, v_dtype=v.dtype,
                                         interpret=interpret)
    dq = dq.reshape(q.shape)
    dk = dk.reshape(k.shape)
    dv = dv.reshape(v.shape)
    if perm is not None:
        dk, dv = perm_lib.scatter_back(dk, perm), perm_lib.scatter_back(dv, perm)
    return dq, dk, dv
