"""Fused XAttention block scoring (Pallas, Triton lowering).

The estimate needs, for every reshaped query row i (s consecutive queries) and every
kv block, the softmax mass that row puts on the block's reshaped keys, summed over the
rows of each query block. Materialising the (Sq/s) x (Skv/s) logits costs
O(S^2/s^2) memory per head (34 GB at 128K, H=32, s=8), so the kernel never writes
them: one program owns ``bm`` reshaped rows of one head and walks the key tiles up to
the causal limit once, computing each tile's logits as ``s`` dots (the antidiagonal
sum is q[i*s + s-1-j] . k[m*s + j] summed over j, i.e. a GEMM with K = s*D). The dots are
the steps of one loop over (tile, j) so Triton's pipeline buffers one [bm, D] q slice and
one [bn, D] k slice per stage (unrolled, it buffered all ``s`` of each: 513 KiB at D=128);
:func:`smem_bytes` models the footprint and :func:`default_config` picks tiles that fit.
On the tile's last step it stores

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


# Shared memory per block on sm_90 (227 KB); launches asking for more fail to compile.
SMEM_LIMIT = 232448
# What the default configs may use: leaves room for Triton's barriers and layout scratch.
SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Launch parameters.

    block_m: reshaped query rows per program; block_n: reshaped keys per tile (raised to
    the reshaped keys per kv block when smaller); num_warps / num_stages as in Triton.
    flat: one loop over (tile, stride step) pairs, the tile epilogue under ``pl.when``
    (the pipeliner sees one long loop); False: a stride loop nested in the tile loop.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    flat: bool = True


def effective_config(cfg: ScoreConfig, keys_per_block: int) -> ScoreConfig:
    """The config the kernel runs: ``block_n`` at least the reshaped keys of one kv block."""
    return dataclasses.replace(cfg, block_n=max(cfg.block_n, keys_per_block))


def padded_head_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def smem_bytes(cfg: ScoreConfig, head_dim: int, itemsize: int) -> int:
    """Upper model of the shared memory Triton allocates for ``cfg`` (bytes).

    Each pipeline stage buffers one stride step's operands, q [block_m, D] and k
    [block_n, D]; the epilogue's row reductions convert the float32 [block_m, block_n]
    logits' layout through shared memory (reusing the pipeline buffers when they are
    larger). Checked against Triton 3.6's allocation by ``benchmarks/score_compile_check.py``.
    """
    dp = padded_head_dim(head_dim)
    pipeline = cfg.num_stages * (cfg.block_m + cfg.block_n) * dp * itemsize
    scratch = cfg.block_m * cfg.block_n * 4
    return max(pipeline, scratch) + 1024


# Preference order of the default configs (largest tiles first: the estimate reads each q
# tile once per key tile, so wider tiles mean less L2 traffic per FLOP).
_CANDIDATES = (ScoreConfig(128, 128, 8, 3), ScoreConfig(128, 128, 8, 2), ScoreConfig(128, 64, 8, 3),
               ScoreConfig(128, 64, 8, 2), ScoreConfig(64, 64, 4, 3), ScoreConfig(64, 64, 4, 2),
               ScoreConfig(64, 32, 4, 2), ScoreConfig(32, 32, 4, 2), ScoreConfig(16, 16, 4, 2))


def default_config(head_dim: int, itemsize: int, keys_per_block: int) -> ScoreConfig | None:
    """The first candidate whose shared memory fits :data:`SMEM_BUDGET` for this D / dtype /
    block geometry (``keys_per_block`` = block_size // stride); None when none does."""
    for cfg in _CANDIDATES:
        eff = effective_config(cfg, keys_per_block)
        if smem_bytes(eff, head_dim, itemsize) <= SMEM_BUDGET:
            return eff
    return None


def launch_config(head_dim: int, dtype, keys_per_block: int):
    """(config, compute dtype) the kernel runs with by default, or None when nothing fits.

    Float32 inputs too wide for any config are scored in bfloat16 (an estimate's
    precision is enough)."""
    dtype = jnp.dtype(dtype)
    cfg = default_config(head_dim, dtype.itemsize, keys_per_block)
    if cfg is None and dtype.itemsize > 2:
        dtype, cfg = jnp.dtype(jnp.bfloat16), default_config(head_dim, 2, keys_per_block)
    return None if cfg is None else (cfg, dtype)


def sweep_configs(head_dim: int, itemsize: int, keys_per_block: int) -> list[ScoreConfig]:
    """Configs worth timing on a GPU (those fitting the shared-memory budget): the flat loop
    at four tile shapes x two pipeline depths, and the nested loop at the two 8-warp shapes
    (nested 128-row tiles on 4 warps spill: ptxas, score_compile_check.py)."""
    grid = [ScoreConfig(bm, bn, w, st, True) for bm, bn, w, sts in
            ((128, 128, 8, (2, 3)), (128, 64, 8, (3, 4)), (64, 128, 4, (3, 4)), (64, 64, 4, (3, 4))) for st in sts]
    grid += [ScoreConfig(128, 128, 8, 3, False), ScoreConfig(128, 64, 8, 3, False)]
    out = []
    for cfg in grid:
        eff = effective_config(cfg, keys_per_block)
        if smem_bytes(eff, head_dim, itemsize) <= SMEM_BUDGET and eff not in out:
            out.append(eff)
    return out


def supported(block_size: int, stride: int) -> bool:
    """The kernel needs a power-of-two number of reshaped keys per block (<= 256)."""
    cpb = block_size // stride
    return block_size % stride == 0 and cpb > 0 and cpb & (cpb - 1) == 0 and cpb <= 256


def _kernel(q_ref, k_ref, p_ref, m_ref, *, stride, bm, bn, cpb, n_tiles, scale_log2, causal, offset,
            valid_cols, flat):
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

    def step(t, j, acc):
        # One stride step of the antidiagonal GEMM (K = stride * D, one D-slice at a time so
        # the pipeline buffers hold one slice of q and k, not all ``stride`` of them).
        qj = q_ref[:, pl.ds(stride - 1 - j, 1), :].reshape(bm, -1)
        kj = k_ref[pl.ds(t * bn, bn), pl.ds(j, 1), :].reshape(bn, -1)
        return acc + plgpu.dot(qj, kj, trans_b=True)

    def epilogue(t, acc):
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

    zeros = jnp.zeros((bm, bn), jnp.float32)
    if flat:
        def body(it, acc):
            t = jax.lax.div(it, jnp.int32(stride))  # non-negative: no floor-division fix-up
            j = it - t * stride
            acc = step(t, j, jnp.where(j == 0, 0.0, acc))

            @pl.when(j == stride - 1)
            def _():
                epilogue(t, acc)
            return acc

        jax.lax.fori_loop(0, n_live * stride, body, zeros)
    else:
        def live(t, carry):
            epilogue(t, jax.lax.fori_loop(0, stride, lambda j, acc: step(t, j, acc), zeros))
            return carry

        jax.lax.fori_loop(0, n_live, live, 0)

    def dead(t, carry):
        p_ref[:, pl.ds(t * cb, cb)] = jnp.zeros((bm, cb), jnp.float32)
        m_ref[t, :] = jnp.full((bm,), -jnp.inf, jnp.float32)
        return carry

    jax.lax.fori_loop(n_live, n_tiles, dead, 0)


def _pad_len(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def partials(q, k, *, block_size: int, stride: int, scale: float, causal: bool, interpret: bool = False,
             config: ScoreConfig | None = None):
    """Run the kernel. q [B, Sq, Hq, D], k [B, Skv, Hkv, D] (one float dtype) -> (psum, mtile, geometry).

    ``config`` None picks :func:`default_config` for D, the dtype's width and the block
    geometry (always within shared memory)."""
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cpb = block_size // stride
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype; got {q.dtype} and {k.dtype}")
    if config is None:
        choice = launch_config(d, q.dtype, cpb)
        if choice is None:
            raise ValueError(f"no score-kernel config fits shared memory for D={d} and {cpb} reshaped keys "
                             f"per block; use a larger stride or a smaller block")
        cfg, dt = choice
        q, k = q.astype(dt), k.astype(dt)
    else:
        cfg = effective_config(config, cpb)
    bm, bn = cfg.block_m, cfg.block_n
    if bn % cpb:
        raise ValueError(f"block_n ({bn}) must be a multiple of the reshaped keys per block ({cpb})")
    dp = padded_head_dim(d)
    sq_p = _pad_len(sq, math.lcm(block_size, stride * bm))
    skv_p = _pad_len(skv, math.lcm(block_size, stride * bn))
    mq, mk = sq_p // stride, skv_p // stride
    n_tiles = mk // bn
    qp = jnp.pad(q, ((0, 0), (0, sq_p - sq), (0, 0), (0, dp - d))).reshape(b, mq, stride, hq, dp)
    kp = jnp.pad(k, ((0, 0), (0, skv_p - skv), (0, 0), (0, dp - d))).reshape(b, mk, stride, hkv, dp)
    kernel = functools.partial(_kernel, stride=stride, bm=bm, bn=bn, cpb=cpb, n_tiles=n_tiles,
                               scale_log2=float(scale) / stride * LOG2E, causal=causal, offset=skv - sq,
                               valid_cols=-(-skv // stride), flat=cfg.flat)
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
