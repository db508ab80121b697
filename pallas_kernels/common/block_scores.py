"""Lowering-independent epilogue of the block-score kernels.

A score kernel leaves, per reshaped query row and key tile, the tile's row max and the
per-kv-block sums of exp(logit - tile max). :func:`combine_partials` turns them into
softmax mass per (query block, kv block): a log-sum-exp across tiles gives each row's
normaliser, then the rows of each query block are summed. Work and memory are
O(rows x kv blocks), 1/(block/stride) of the logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PartialsGeometry:
    """Static shape facts of a partials pair.

    q_len, kv_len: token lengths; block_size: square score block (tokens); stride:
    tokens per reshaped row/key; keys_per_tile: reshaped keys per kernel tile;
    log2_domain: the tile maxima are in log2 units (exp2-based kernels).
    """

    q_len: int
    kv_len: int
    block_size: int
    stride: int
    keys_per_tile: int
    log2_domain: bool = True

    @property
    def rows_per_block(self) -> int:
        return self.block_size // self.stride

    @property
    def blocks_per_tile(self) -> int:
        return self.keys_per_tile // self.rows_per_block


def combine_partials(psum, mtile, geom: PartialsGeometry):
    """psum float32 [B, H, Mq, nKb'], mtile float32 [B, H, T, Mq] -> float32 [B, H, nQb, nKb].

    Rows past ``q_len`` (padding) are dropped; the result is the block mass summed over
    each query block's valid reshaped rows.
    """
    b, h, mq, nkp = psum.shape
    t = mtile.shape[2]
    cb = geom.blocks_per_tile
    if t * cb != nkp:
        raise ValueError(f"partials disagree: {t} tiles x {cb} blocks != {nkp} kv blocks")
    m = jnp.swapaxes(mtile, 2, 3)  # [B, H, Mq, T]
    if geom.log2_domain:
        m = m * math.log(2.0)
    p = psum.reshape(b, h, mq, t, cb)
    tile_sum = jnp.sum(p, axis=-1)
    live = (tile_sum > 0) & jnp.isfinite(m)
    m_row = jnp.max(jnp.where(live, m, -jnp.inf), axis=-1, keepdims=True)
    m_row = jnp.where(jnp.isfinite(m_row), m_row, 0.0)
    scale = jnp.where(live, jnp.exp(jnp.where(live, m, 0.0) - m_row), 0.0)  # [B, H, Mq, T]
    total = jnp.sum(tile_sum * scale, axis=-1, keepdims=True)
    w = scale / jnp.where(total > 0, total, 1.0)
    mass = (p * w[..., None]).reshape(b, h, mq, nkp)
    rpb = geom.rows_per_block
    valid_rows = -(-geom.q_len // geom.stride)
    mass = jnp.where((np.arange(mq) < valid_rows)[:, None], mass, 0.0)
    nq = -(-geom.q_len // geom.block_size)
    nk = -(-geom.kv_len // geom.block_size)
    mass = mass[:, :, : -(-mq // rpb) * rpb].reshape(b, h, mq // rpb, rpb, nkp).sum(3)
    return mass[:, :, :nq, :nk]
