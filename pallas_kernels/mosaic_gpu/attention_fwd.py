"""Forward block-sparse FlashAttention on Hopper through Mosaic GPU (Pallas ``plgpu``).

Why a second GPU lowering: Pallas' Triton path has no TMA and no warp specialisation, which
caps our dense forward at ~0.75x cuDNN. This kernel is FlashAttention-3's structure driven
by a :class:`~sparse_jax.BlockMask` row:

* one CTA per (query head, 128-row query block = one table row, batch) with three
  warpgroups: two compute warpgroups of 64 query rows each and one memory warpgroup;
* the memory warpgroup walks the row's table (full blocks, then partial blocks) and
  streams K/V blocks into a ring of ``steps`` shared-memory slots by TMA, with one
  "filled" barrier per slot and buffer and one "consumed" barrier that both compute
  warpgroups arrive at;
* each compute warpgroup runs wgmma for S = Q K^T and O += P V with the online softmax
  in float32 and exp2 (scale·log2 e folded into one multiply), the two warpgroups
  ping-ponging on a schedule barrier so one's softmax overlaps the other's matmuls;
* partial blocks evaluate the mask on positions (iota, or ``q_pos`` / ``kv_pos`` rows
  brought in by TMA beside the block: PBS's permuted keys), full blocks skip it.

Contract (as :mod:`pallas_kernels.triton.attention_fwd`): o [B, Sq, Hq, D] in q's dtype,
lse float32 [B, Hq, Sq] in natural log, -inf and o = 0 for rows with no allowed key.
:func:`unsupported` says which problems this kernel does not take (the caller falls back
to the Triton kernel): it needs bf16/fp16, D = Dv in {64, 128}, 128 x 128
table blocks that tile Sq and Skv exactly, no softcap, no segment ids or in-kernel
permutation, and a mask made of bands (causal, windows, :class:`SegmentCausal`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import flash_loop
from pallas_kernels.mosaic_gpu import online_softmax as softmax
from pallas_kernels.triton import attention_blocks as blk
from sparse_jax import masks

ROWS_PER_WG = 64  # wgmma's M: query rows per compute warpgroup
COMPUTE_WGS = 2   # two warpgroups per CTA -> a 128-row table block
TABLE_BLOCK = (ROWS_PER_WG * COMPUTE_WGS, 128)


@dataclasses.dataclass(frozen=True)
class MgpuFwdConfig:
    """Launch parameters. ``steps``: K/V ring depth (shared-memory slots; at D = 128 two fill
    the 227 KB, a third misses by ~100 bytes); ``reverse``: launch query blocks last-first (heavy causal rows
    start early, shorter tail); ``grid_order``: "heads_q_batch" launches the query heads of one
    query block side by side, then the next block, batch last; "heads_batch_q" puts the batch
    (PBS: the folded kv heads) before the query blocks, so the CTAs resident at once cover
    every kv head at a few query blocks rather than one kv head at many query blocks whose
    sparse rows read different K/V blocks (L2 misses); None picks "heads_batch_q" for that
    folded layout (one kv head, batch > 1), else "heads_q_batch". ``early_table_read``: the
    memory warpgroup reads step i's table entry before waiting for its slot to drain."""

    steps: int = 2
    reverse: bool = True
    grid_order: str | None = None
    early_table_read: bool = True
    compute_regs: int = 232
    memory_regs: int = 40


def _positional(mask) -> bool:
    """True for masks the kernel can evaluate on positions alone (bands and their combinations)."""
    if mask is None or isinstance(mask, (masks.Full, masks.Band)):
        return True
    if isinstance(mask, (masks.And, masks.Or)):
        return all(_positional(m) for m in mask.masks)
    return False


def unsupported(q, k, v, block_mask, *, softcap, has_segments: bool, has_perm: bool) -> str | None:
    """Why this kernel cannot run the problem, or None when it can."""
    B, Sq, Hq, D = q.shape
    Skv, Dv = k.shape[1], v.shape[3]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (bf16 / fp16 only)"
    if D != Dv or D not in (64, 128):
        return f"head dims D={D}, Dv={Dv} (equal, 64 or 128: wider heads overflow shared memory)"
    if tuple(block_mask.block_size) != TABLE_BLOCK:
        return f"block size {block_mask.block_size} (needs {TABLE_BLOCK})"
    if Sq % TABLE_BLOCK[0] or Skv % TABLE_BLOCK[1]:
        return f"lengths Sq={Sq}, Skv={Skv} (multiples of {TABLE_BLOCK})"
    if softcap is not None:
        return "softcap"
    if has_segments or has_perm:
        return "segment ids / kv_permutation"
    if not _positional(block_mask.mask):
        return f"mask {block_mask.mask!r} (bands only)"
    return None


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What the kernel specialises on: the call's :class:`~pallas_kernels.triton.attention_blocks.Problem`
    (shared with the Triton kernels), the operand dtype and the launch config."""

    P: blk.Problem
    dtype: object
    cfg: MgpuFwdConfig

    @property
    def n_q_tiles(self) -> int:
        return self.P.q_len // TABLE_BLOCK[0]


def _table_coords(S: _Spec, b, h):
    """(batch, head) of the table row a CTA of batch b, query head h reads."""
    tb = b if S.P.table_batch > 1 else 0
    th = {"shared": 0, "kv": lax.div(h, jnp.int32(S.P.group)), "q": h}[S.P.table_head_map]
    return tb, th


def _row_counts(S: _Spec, refs, tb, th, qt):
    n_full = refs["full_num"][tb, th, qt] if S.P.max_full_kv else jnp.int32(0)
    n_part = refs["num"][tb, th, qt] if S.P.max_kv else jnp.int32(0)
    return n_full, n_part


def _kv_block(S: _Spec, refs, tb, th, qt, i, n_full):
    """Table entry of step i: full list first, then the partial list (clamped reads)."""
    if not S.P.max_kv:
        return refs["full_idx"][tb, th, qt, jnp.minimum(i, S.P.max_full_kv - 1)]
    j = jnp.clip(i - n_full, 0, S.P.max_kv - 1)
    part = refs["idx"][tb, th, qt, j]
    if not S.P.max_full_kv:
        return part
    full = refs["full_idx"][tb, th, qt, jnp.minimum(i, S.P.max_full_kv - 1)]
    return jnp.where(i < n_full, full, part)


def _kernel(S: _Spec, names, *refs):
    n_in = len(names)
    refs_in = dict(zip(names, refs[:n_in]))
    o_ref, lse_ref = refs[n_in], refs[n_in + 1]
    scratch = refs[n_in + 2:]
    (qo_smem2, k_smem, v_smem, lse_smem2, qpos_smem2, kvpos_smem,
     k_bar, v_bar, q_bar, pos_bar, k_done, v_done, sched) = scratch
    cfg, bq, bkv, D, dtype = S.cfg, ROWS_PER_WG, TABLE_BLOCK[1], S.P.head_dim, S.dtype
    steps = cfg.steps

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    qt = lax.axis_index("q_seq")
    if cfg.reverse:
        qt = S.n_q_tiles - 1 - qt
    wg = lax.axis_index("wg")
    tb, th = _table_coords(S, b, h)
    n_full, n_part = _row_counts(S, refs_in, tb, th, qt)
    n = n_full + n_part
    c = S.P.scale * softmax.LOG2E

    schedule_barrier = functools.partial(flash_loop.schedule_barrier, sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(cfg.compute_regs, action="increase")
        qo_smem = qo_smem2.at[wg]
        q_base = qt * TABLE_BLOCK[0] + wg * bq
        plgpu.copy_gmem_to_smem(refs_in["q"].at[b, pl.ds(q_base, bq), h], qo_smem, q_bar.at[wg])
        if S.P.has_q_pos:
            plgpu.copy_gmem_to_smem(refs_in["q_pos"].at[b, pl.ds(q_base, bq)], qpos_smem2.at[wg],
                                    pos_bar.at[steps + wg])
        plgpu.barrier_wait(q_bar.at[wg])
        if S.P.has_q_pos:
            plgpu.barrier_wait(pos_bar.at[steps + wg])
            q_pos = plgpu.load(qpos_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            q_pos = lax.broadcast_in_dim(q_pos, (bq, bkv), [0])
        else:
            q_pos = q_base + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)

        acc, m_i, l_i = softmax.init(bq, D)

        @pl.when(n > 0)
        def _():
            plgpu.barrier_wait(k_bar.at[0])

        pl.when(wg == 1)(schedule_barrier)

        def allowed(i, slot):
            if S.P.has_kv_pos:
                plgpu.barrier_wait(pos_bar.at[slot])
                kv_pos = plgpu.load(kvpos_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                kv_pos = lax.broadcast_in_dim(kv_pos, (bq, bkv), [1])
            else:
                blk = _kv_block(S, refs_in, tb, th, qt, i, n_full)
                kv_pos = blk * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
            return S.P.mask.evaluate(b, h, q_pos, kv_pos)

        def step(i, carry, *, masked: bool):
            return flash_loop.kv_step(
                i, carry, n=n, slot_of=lambda j: lax.rem(j, jnp.int32(steps)), q_smem=qo_smem, k_smem=k_smem,
                v_smem=v_smem, k_bar=k_bar, v_bar=v_bar, k_done=k_done, v_done=v_done, sched=sched,
                allowed=allowed if masked else None, c=c, dtype=dtype)

        carry = (acc, m_i, l_i)
        if S.P.max_full_kv:
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        if S.P.max_kv:
            carry = lax.fori_loop(n_full, n, functools.partial(step, masked=S.P.mask is not None), carry)
        acc, m_i, l_i = carry
        pl.when(wg == 0)(schedule_barrier)

        o, lse = softmax.finish(acc, m_i, l_i, dtype)
        qo_smem[...] = o
        lse_smem = lse_smem2.at[wg]
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q_base, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(cfg.memory_regs, action="decrease")
        hkv = lax.div(h, jnp.int32(S.P.group))

        def fetch_k(blk, slot):
            rows = (b, pl.ds(blk * bkv, bkv), hkv)
            plgpu.copy_gmem_to_smem(refs_in["k"].at[rows], k_smem.at[slot], k_bar.at[slot])

        def fetch_v(blk, i, slot):
            rows = (b, pl.ds(blk * bkv, bkv), hkv)
            plgpu.copy_gmem_to_smem(refs_in["v"].at[rows], v_smem.at[slot], v_bar.at[slot])
            if S.P.has_kv_pos and S.P.max_kv:
                @pl.when(i >= n_full)
                def _():
                    plgpu.copy_gmem_to_smem(refs_in["kv_pos"].at[b, pl.ds(blk * bkv, bkv)],
                                            kvpos_smem.at[slot], pos_bar.at[slot])

        for s0 in range(steps):
            @pl.when(s0 < n)
            def _():
                blk = _kv_block(S, refs_in, tb, th, qt, jnp.int32(s0), n_full)
                fetch_k(blk, s0)
                fetch_v(blk, jnp.int32(s0), s0)

        @pl.loop(0, jnp.maximum(n - steps, 0))
        def _(j):
            i = j + steps
            slot = lax.rem(j, jnp.int32(steps))
            if cfg.early_table_read:  # the scalar load's latency overlaps the wait
                blk = _kv_block(S, refs_in, tb, th, qt, i, n_full)
            plgpu.barrier_wait(k_done.at[slot])
            if not cfg.early_table_read:
                blk = _kv_block(S, refs_in, tb, th, qt, i, n_full)
            fetch_k(blk, slot)
            plgpu.barrier_wait(v_done.at[slot])
            fetch_v(blk, i, slot)


def _table_inputs(block_mask, S: _Spec) -> dict:
    out = {}
    if S.P.max_full_kv:
        out["full_num"] = jnp.asarray(block_mask.full_kv_num_blocks, jnp.int32)
        out["full_idx"] = jnp.asarray(block_mask.full_kv_indices, jnp.int32)
    if S.P.max_kv:
        out["num"] = jnp.asarray(block_mask.kv_num_blocks, jnp.int32)
        out["idx"] = jnp.asarray(block_mask.kv_indices, jnp.int32)
    return out


def forward(q, k, v, block_mask, q_pos, kv_pos, *, scale: float, config: MgpuFwdConfig | None = None):
    """o [B, Sq, Hq, D] (q.dtype), lse float32 [B, Hq, Sq]; see the module docstring.

    q_pos / kv_pos: int32 [B, Sq] / [B, Skv] or None (the mask is evaluated at the indices).
    """
    cfg = config or MgpuFwdConfig()
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    P = blk.problem(q, k, v, block_mask, None, None, q_pos, kv_pos, scale=scale, softcap=None,
                    segments_everywhere=False, kv_permutation=None)
    S = _Spec(P=P, dtype=q.dtype, cfg=cfg)
    inputs = dict(q=q, k=k, v=v, **_table_inputs(block_mask, S))
    if S.P.has_q_pos:
        inputs["q_pos"] = jnp.asarray(q_pos, jnp.int32)
    if S.P.has_kv_pos:
        inputs["kv_pos"] = jnp.asarray(kv_pos, jnp.int32)
    names = tuple(inputs)
    steps, bkv = cfg.steps, TABLE_BLOCK[1]
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, D), q.dtype, transforms=tiled),   # Q, then O
        plgpu.SMEM((steps, bkv, D), k.dtype, transforms=tiled),
        plgpu.SMEM((steps, bkv, D), v.dtype, transforms=tiled),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),                    # lse
        # q / kv positions: only when the mask reads them (every buffer costs ~1 KB of alignment,
        # which decides whether a third K/V slot fits)
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.int32) if S.P.has_q_pos else None,
        plgpu.SMEM((steps, bkv), jnp.int32) if S.P.has_kv_pos else None,
        plgpu.Barrier(num_barriers=steps),                                      # K filled
        plgpu.Barrier(num_barriers=steps),                                      # V filled
        plgpu.Barrier(num_barriers=COMPUTE_WGS),                                # Q filled
        plgpu.Barrier(num_barriers=steps + COMPUTE_WGS) if S.P.has_q_pos or S.P.has_kv_pos else None,  # positions
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps),            # K consumed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps),            # V consumed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),                                # ping-pong schedule
    )
    out_type = (jax.ShapeDtypeStruct((B, Sq, Hq, D), q.dtype), jax.ShapeDtypeStruct((B, Hq, Sq), jnp.float32))
    order = cfg.grid_order or ("heads_batch_q" if Hkv == 1 and B > 1 else "heads_q_batch")
    if order == "heads_q_batch":
        grid, grid_names = (Hq, S.n_q_tiles, B), ("heads", "q_seq", "batch")
    elif order == "heads_batch_q":
        grid, grid_names = (Hq, B, S.n_q_tiles), ("heads", "batch", "q_seq")
    else:
        raise ValueError(f"grid_order {cfg.grid_order!r}; choose heads_q_batch or heads_batch_q")
    call = plgpu.kernel(
        functools.partial(_kernel, S, names),
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    o, lse = call(*inputs.values())
    return o, lse
