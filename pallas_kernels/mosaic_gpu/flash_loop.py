"""One K/V step of the warp-specialised FlashAttention loop shared by the Mosaic GPU forwards.

A compute warpgroup holds its query rows in shared memory; a memory warpgroup fills K/V ring
slots and signals ``k_bar`` / ``v_bar``; the compute warpgroup releases each slot through
``k_done`` / ``v_done`` as soon as its matmul has read it. With a schedule barrier ``sched``
two compute warpgroups ping-pong: one's softmax overlaps the other's matmuls (FA3).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import online_softmax as softmax


def schedule_barrier(sched) -> None:
    """Meet the other compute warpgroup on the ping-pong barrier."""
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


def kv_step(i, carry, *, n, slot_of: Callable, q_smem, k_smem, v_smem, k_bar, v_bar, k_done, v_done, sched,
            allowed: Callable | None, c: float, dtype):
    """Fold the K/V block of step ``i`` (of ``n``) into ``carry`` = (acc, m, l) (see :mod:`online_softmax`).

    ``slot_of(j)``: ring slot of step j; ``sched``: the ping-pong barrier or None;
    ``allowed(i, slot)``: bool [rows, keys] of the step's allowed keys, or None for an unmasked
    step. Before the next step's matmul can start, this waits for its K slot to fill.
    """
    acc, m_i, l_i = carry
    slot = slot_of(i)

    def qk_scope(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        if sched is not None:
            schedule_barrier(sched)
        return acc_ref[...]

    s = pl.run_scoped(qk_scope, plgpu.ACC((q_smem.shape[0], k_smem.shape[1]), jnp.float32))
    plgpu.barrier_arrive(k_done.at[slot])
    masked = allowed is not None
    if masked:
        s = jnp.where(allowed(i, slot), s, -jnp.inf)
    p16, acc, m_new, l_i = softmax.update(s, acc, m_i, l_i, c=c, masked=masked, dtype=dtype)
    if sched is not None:
        plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(v_bar.at[slot])
    if sched is not None:
        plgpu.barrier_wait(sched)

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        nxt = i + 1

        @pl.when(nxt < n)
        def _():
            plgpu.barrier_wait(k_bar.at[slot_of(nxt)])

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_done.at[slot])
    return acc, m_new, l_i


