"""Fused XAttention block scoring (Pallas, Triton lowering).

The estimate needs, for every reshaped query row i (s consecutive queries) and every
kv block, the softmax mass that row puts on the block's reshaped keys, summed over the
rows of each query block. Materialising the (Sq/s) x (Skv/s) logits costs
O(S^2/s^2) memory per head (34 GB at 128K, H=32, s=8), so the kernel never writes
them: one program owns ``bm`` reshaped rows of one head and walks the key tiles up to
the causal limit once, computing each tile's logits as ``s`` dots (the antidiagonal
sum is q[i*s + s-1-j] . k[m*s + j] summed over j, i.e. a GEMM with K = s*D), and stores

* ``psum``  float32 [B, Hq, Mq, nKb]: sum over the block's keys of exp2(x - m_tile(row)),
* ``mtile`` float32 [B, Hq, T, Mq]: that tile's row max (log2 domain; -inf if empty).

One pass of matmul FLOPs (causal: half the square); the normalisation, which needs each
row's total, is a cheap jnp epilogue over those partials
(:func:`pallas_kernels.common.block_scores.combine_partials`), whose memory is 1/(block/s)
of the logits'. The pure-jnp reference is
:func:`sparse_jax.selection.scores.antidiagonal_block_scores_xla`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import block_scores as common
from sparse_jax import _compat

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Launch parameters: ``block_m`` reshaped query rows per program, ``block_n`` reshaped
    keys per tile (a multiple of the reshaped keys per kv block)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def supported(block_size: int, stride: int) -> bool:
    """The kernel needs a power-of-two number of reshaped keys per block (<= 256)."""
    cpb = block_size // stride
    return block_size % stride == 0 and cpb > 0 and cpb & (cpb - 1) == 0 and cpb <= 256


def _kernel(q_ref, k_ref, p_ref, m_ref, *, stride, bm, bn, cpb, n_tiles, scale_log2, causal, offset,
            valid_cols):
    r = pl.program_id(0)
    rows = r * bm + jnp.arange(bm, dtype=jnp.int32)
    cb = bn // cpb
    if causal:
        # Reshaped key m is visible to row i iff m*s <= i*s + s - 1 + offset.
        last_row = r * bm + bm - 1
        last_col = (last_row * stride + stride - 1 + offset) // stride
        n_live = jnp.minimum(n_tiles, jnp.maximum(last_col, -1) // bn + 1)
    else:
        n_live = n_tiles

    def live(t, carry):
        acc = jnp.zeros((bm, bn), jnp.float32)
        for j in range(stride):
            qj = q_ref[:, stride - 1 - j, :]
            kj = k_ref[pl.ds(t * bn, bn), j, :]
            acc += plgpu.dot(qj, kj, trans_b=True)
        x = acc * scale_log2
        cols = t * bn + jnp.arange(bn, dtype=jnp.int32)
        ok = (cols < valid_cols)[None, :]
        if causal:
            ok = ok & (cols[None, :] * stride <= rows[:, None] * stride + (stride - 1 + offset))
        x = jnp.where(ok, x, -jnp.inf)
        mx = jnp.max(x, axis=1)
        m_safe = jnp.where(mx == -jnp.inf, 0.0, mx)
        p = jnp.where(ok, jnp.exp2(x - m_safe[:, None]), 0.0)
        p_ref[:, pl.ds(t * cb, cb)] = jnp.sum(p.reshape(bm, cb, cpb), axis=2)
        m_ref[t, :] = mx
        return carry

    def dead(t, carry):
        p_ref[:, pl.ds(t * cb, cb)] = jnp.zeros((bm, cb), jnp.float32)
        m_ref[t, :] = jnp.full((bm,), -jnp.inf, jnp.float32)
        return carry

    jax.lax.fori_loop(0, n_live, live, 0)
    jax.lax.fori_loop(n_live, n_tiles, dead, 0)


def _pad_len(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def partials(q, k, *, block_size: int, stride: int, scale: float, causal: bool, interpret: bool = False,
             config: ScoreConfig | None = None):
    """Run the kernel. q [B, Sq, Hq, D], k [B, Skv, Hkv, D] -> (psum, mtile, geometry)."""
    cfg = config or ScoreConfig()
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cpb = block_size // stride
    bm, bn = cfg.block_m, max(cfg.block_n, cpb)
    if bn % cpb:
        raise ValueError(f"block_n ({bn}) must be a multiple of the reshaped keys per block ({cpb})")
    dp = max(16, 1 << (d - 1).bit_length())
    sq_p = _pad_len(sq, math.lcm(block_size, stride * bm))
    skv_p = _pad_len(skv, math.lcm(block_size, stride * bn))
    mq, mk = sq_p // stride, skv_p // stride
    n_tiles = mk // bn
    qp = jnp.pad(q, ((0, 0), (0, sq_p - sq), (0, 0), (0, dp - d))).reshape(b, mq, stride, hq, dp)
    kp = jnp.pad(k, ((0, 0), (0, skv_p - skv), (0, 0), (0, dp - d))).reshape(b, mk, stride, hkv, dp)
    kernel = functools.partial(_kernel, stride=stride, bm=bm, bn=bn, cpb=cpb, n_tiles=n_tiles,
                               scale_log2=float(scale) / stride * LOG2E, causal=causal, offset=skv - sq,
                               valid_cols=-(-skv // stride))
    n_kb = mk // cpb
    psum, mtile = pl.pallas_call(
        kernel,
        grid=(mq // bm, hq, b),
        in_specs=[pl.BlockSpec((None, bm, stride, None, dp), lambda r, h, bb: (bb, r, 0, h, 0)),
                  pl.BlockSpec((None, mk, stride, None, dp), lambda r, h, bb: (bb, 0, 0, h // g, 0))],
        out_specs=[pl.BlockSpec((None, None, bm, n_kb), lambda r, h, bb: (bb, h, r, 0)),
                   pl.BlockSpec((None, None, n_tiles, bm), lambda r, h, bb: (bb, h, 0, r))],
        out_shape=[jax.ShapeDtypeStruct((b, hq, mq, n_kb), jnp.float32),
                   jax.ShapeDtypeStruct((b, hq, n_tiles, mq), jnp.float32)],
        compiler_params=_compat.triton_compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="antidiagonal_block_scores",
    )(qp, kp)
    geom = common.PartialsGeometry(q_len=sq, kv_len=skv, block_size=block_size, stride=stride,
                                   keys_per_tile=bn, log2_domain=True)
    return psum, mtile, geom


def antidiagonal_block_sums(q, k, *, block_size: int = 128, stride: int = 8, causal: bool = True,
                            scale: float | None = None, interpret: bool = False, config: ScoreConfig | None = None):
    """float32 [B, Hq, nQb, nKb]: per (query block, kv block), the summed softmax mass of the
    block's reshaped rows (not yet divided by the row count)."""
    if not supported(block_size, stride):
        raise ValueError(f"the Triton score kernel needs block_size / stride to be a power of two <= 256; "
                         f"got {block_size} / {stride}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    psum, mtile, geom = partials(q, k, block_size=block_size, stride=stride, scale=scale, causal=causal,
                                 interpret=interpret, config=config)
    return common.combine_partials(psum, mtile, geom)
