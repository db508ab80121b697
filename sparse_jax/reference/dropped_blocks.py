"""Reference of the dropped-block estimate: attention of each query to the *mean* key and
value of every block its table skipped, and the lse merge of two partial attentions.

A block-sparse kernel drops the softmax mass of every block it does not compute. When a
query's attention is spread over many skipped blocks (a model whose heads average over
context, long before any block stands out), that loss changes the output although no
single block mattered. The estimate puts each dropped block back as one pseudo-key:

    logit_j = softcap(scale * q . mean(K_j)) + log n_j,     value_j = mean(V_j)

(n_j the block's valid rows), i.e. the block's mass approximated as n_j exp(q . mean key).
It is exact when the logits are constant inside a block (flat attention) and costs one
[Sq, nKb] score matrix per head: 1/block_size of the dense attention's work.

Shapes: q [B, Sq, Hq, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, Dv] (Hq a multiple of Hkv);
``dropped`` bool [B|1, H, nQb, nKb] with H in (1, Hkv, Hq): which (query block, kv block)
pairs to estimate. ``kv_permutation`` int32 [B, Hkv, Skv] or None: block j of kv head h
holds rows ``perm[b, h, j*bk:(j+1)*bk]`` (a permuted layout, as PBS uses).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Elements of one chunk's float32 logits (256 MiB): the reference never holds [Sq, nKb] for
# every head at once.
CHUNK_ELEMENTS = 1 << 26


def pooled_kv(k, v, block_size: int, kv_permutation=None):
    """Mean key and value of every kv block, float32 [B, nKb, Hkv, D|Dv], and the log of the
    blocks' valid row counts float32 [nKb] (the last block may be ragged)."""
    b, skv, hkv, _ = k.shape
    if kv_permutation is not None:
        idx = jnp.swapaxes(kv_permutation, 1, 2)[..., None]  # [B, Skv, Hkv, 1]
        k = jnp.take_along_axis(k, idx, axis=1)
        v = jnp.take_along_axis(v, idx, axis=1)
    nkb = -(-skv // block_size)
    pad = nkb * block_size - skv

    def pool(x):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.sum(x.reshape(b, nkb, block_size, hkv, x.shape[-1]), axis=2)

    counts = jnp.minimum(block_size, skv - jnp.arange(nkb) * block_size).astype(jnp.float32)
    inv = (1.0 / counts)[None, :, None, None]
    return pool(k) * inv, pool(v) * inv, jnp.log(counts)


def expand_dropped(dropped, batch: int, num_q_heads: int, num_kv_heads: int):
    """bool [B|1, 1|Hkv|Hq, nQb, nKb] -> bool [B, Hkv, G, nQb, nKb]."""
    dropped = jnp.asarray(dropped, bool)
    h = dropped.shape[1]
    g = num_q_heads // num_kv_heads
    if h == 1:
        dropped = jnp.broadcast_to(dropped[:, :, None], (dropped.shape[0], num_kv_heads, g) + dropped.shape[2:])
    elif h == num_kv_heads:
        dropped = jnp.broadcast_to(dropped[:, :, None], dropped.shape[:2] + (g,) + dropped.shape[2:])
    else:
        dropped = dropped.reshape(dropped.shape[0], num_kv_heads, g, *dropped.shape[2:])
    return jnp.broadcast_to(dropped, (batch,) + dropped.shape[1:])


def dropped_block_attention(q, k, v, dropped, *, block_size, scale: float | None = None,
                            softcap: float | None = None, kv_permutation=None):
    """(o float32 [B, Sq, Hq, Dv], lse float32 [B, Hq, Sq]) of the pseudo-keys the module
    docstring defines. ``block_size``: int or (bq, bkv). Rows whose query block has no
    dropped block: o = 0, lse = -inf. Differentiable in q, k and v."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kbar, vbar, logn = pooled_kv(k, v, bk, kv_permutation)
    nkb = kbar.shape[1]
    nqb = -(-sq // bq)
    drop = expand_dropped(dropped, b, hq, hkv)  # [B, Hkv, G, nQb, nKb]
    # Chunks of query blocks small enough that one chunk's logits stay under CHUNK_ELEMENTS.
    per_block = b * hq * bq * nkb
    cq = max(1, min(nqb, CHUNK_ELEMENTS // max(per_block, 1)))
    n_chunks = -(-nqb // cq)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * cq * bq - sq), (0, 0), (0, 0)))
    qc = qp.reshape(b, n_chunks, cq, bq, hkv, g, d).transpose(1, 0, 2, 3, 4, 5, 6)
    dc = jnp.pad(drop, ((0, 0),) * 3 + ((0, n_chunks * cq - nqb), (0, 0)))
    dc = dc.reshape(b, hkv, g, n_chunks, cq, nkb).transpose(3, 0, 1, 2, 4, 5)

    def one(args):
        qx, dx = args  # [B, cq, bq, Hkv, G, D], [B, Hkv, G, cq, nKb]
        s = jnp.einsum("bcqhgd,bjhd->bhgcqj", qx.astype(jnp.float32), kbar,
                       precision=jax.lax.Precision.HIGHEST) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(dx[:, :, :, :, None, :], s + logn, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1)
        o = jnp.einsum("bhgcqj,bjhd->bcqhgd", p, vbar, precision=jax.lax.Precision.HIGHEST)
        safe = jnp.where(l > 0, l, 1.0)
        o = o / jnp.moveaxis(safe, (1, 2), (3, 4))[..., None]
        lse = jnp.where(l > 0, m[..., 0] + jnp.log(safe), -jnp.inf)  # [B, Hkv, G, cq, bq]
        return o, lse

    o, lse = jax.lax.map(one, (qc, dc))  # [C, B, cq, bq, Hkv, G, Dv], [C, B, Hkv, G, cq, bq]
    o = o.transpose(1, 0, 2, 3, 4, 5, 6).reshape(b, n_chunks * cq * bq, hq, -1)[:, :sq]
    lse = lse.transpose(1, 2, 3, 0, 4, 5).reshape(b, hq, n_chunks * cq * bq)[:, :, :sq]
    return o, lse


def merge_attention(o1, lse1, o2, lse2):
    """Combine two attentions over disjoint key sets: (o [B, S, H, Dv] float32, lse [B, H, S]).

    o_i any float dtype [B, S, H, Dv], lse_i float32 [B, H, S] (-inf: no keys). The result is
    the attention over the union; rows empty in both stay o = 0, lse = -inf.
    """
    m = jnp.maximum(lse1, lse2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m_safe), jnp.exp(lse2 - m_safe)
    total = w1 + w2
    safe = jnp.where(total > 0, total, 1.0)

    def rows(w):  # [B, H, S] -> [B, S, H, 1]
        return jnp.swapaxes(w / safe, 1, 2)[..., None]

    o = o1.astype(jnp.float32) * rows(w1) + o2.astype(jnp.float32) * rows(w2)
    lse = jnp.where(total > 0, m_safe + jnp.log(safe), -jnp.inf)
    return o, lse
