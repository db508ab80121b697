"""The online-softmax arithmetic shared by the Mosaic GPU attention forwards (register values in
wgmma layouts; log2 units: scores are multiplied by ``c = scale * log2(e)`` and exponentiated
with exp2)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def init(rows: int, dv: int):
    """(acc f32 [rows, dv], m f32 [rows], l f32 [rows]) before the first key."""
    m = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.full((rows,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((rows, dv), 0, jnp.float32), plgpu.Layout.WGMMA)
    return acc, m, l


def update(s, acc, m_i, l_i, *, c: float, masked: bool, dtype):
    """Fold scores ``s`` f32 [rows, keys] (raw q.k; -inf where masked) into the running state.

    Returns (p in ``dtype`` for the P V product, acc rescaled, m, l).
    """
    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
    # A row whose every key so far is masked keeps m = -inf; subtract 0 instead so exp2 gives
    # 0 (not NaN) for it. Unmasked steps cannot produce that row.
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m_i - m_ref)
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_ref, s.shape, [0]))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    l_new = l_i * alpha + p.sum(axis=1)
    p16 = p.astype(dtype)
    if acc.shape[1] <= 128:
        # Keeps the rescale and the conversion ahead of the next wgmma (FA3's ordering).
        acc, l_new, m_new, p16 = lax.optimization_barrier((acc, l_new, m_new, p16))
    return p16, acc, m_new, l_new


def finish(acc, m_i, l_i, dtype):
    """(o in ``dtype`` [rows, dv], lse f32 [rows] in natural log): o = 0 and lse = -inf for rows
    that saw no allowed key."""
    empty = l_i == 0.0
    safe = jnp.where(empty, 1.0, l_i)
    o = (acc / lax.broadcast_in_dim(safe, acc.shape, [0])).astype(dtype)
    lse = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(safe)) * LN2)
    return o, lse
