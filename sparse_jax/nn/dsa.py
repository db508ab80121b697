"""``IndexedSparseAttention``: DeepSeek sparse attention (DSA, DeepSeek-V3.2) as an NNX layer.

A lightning indexer with its own small projections (``index_heads`` query heads of
``index_head_dim`` features, one shared key head, per-head weights from x) picks
``topk`` keys per token (:func:`sparse_jax.lightning_indexer`, or HISA's
:func:`sparse_jax.hierarchical_indexer`); the main attention runs over those keys only
(:func:`sparse_jax.indexed_attention`, the selection shared by every head).

Training the indexer (DeepSeek-V3.2's recipe). The indexer sees ``stop_gradient(x)``
and top-k selection has no gradient, so the main loss never reaches it. With
``indexer_loss=True`` each call sows, as ``nnx.Intermediate`` "indexer_loss", the KL
divergence ``KL(p_main || p_index)`` over each token's selected keys: ``p_main`` is the
main attention's distribution (summed over heads, renormalised; a constant) and
``p_index`` the softmax of the indexer scores. Its gradient reaches only the indexer
projections; add it (scaled) to the training loss, e.g.
``loss + coef * sum(jax.tree.leaves(nnx.pop(model, nnx.Intermediate)))``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import indexers
from sparse_jax.nn import _common
from sparse_jax.nn.attention_base import AttentionBase
from sparse_jax.nn.rope import Rope
from sparse_jax.ops.indexed_attention import indexed_attention
from sparse_jax.reference import indexed as ref_indexed

_INDEXERS = ("flat", "hierarchical")


def _gather_rows(x, idx):
    """x [B, S, ...], idx int [B, c, k] (in range) -> [B, c, k, ...]."""
    B, c, k = idx.shape
    return jax.vmap(lambda xb, ib: xb[ib.reshape(-1)].reshape((c, k) + xb.shape[1:]))(x, idx)


def indexer_kl_loss(q, k, lse, scale, q_idx, k_idx, w_idx, indices):
    """Mean over tokens of ``KL(p_main || p_index)`` on each token's selected keys.

    q [B, S, Hq, D], k [B, S, Hkv, D], lse float32 [B, Hq, S] (the main attention's, over
    the same selection), q_idx [B, S, Hi, Di], k_idx [B, S, Di], w_idx [B, S, Hi],
    indices int [B, S, topk] (-1 unused). The main side is a constant. Memory is
    O(chunk x topk x (Hq + Di)) (query chunks under checkpoint).
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    q, k, lse = jax.lax.stop_gradient((q, k, lse))
    valid = indices >= 0
    safe = jnp.where(valid, indices, 0)
    lse_t = jnp.transpose(lse, (0, 2, 1))  # [B, S, Hq]

    def chunk(qc, lc, qic, wc, ic, vc):
        kg = _gather_rows(k, ic).astype(jnp.float32)  # [B, c, k, Hkv, D]
        logits = jnp.einsum("bchgd,bcjhd->bchgj", qc.reshape(qc.shape[:2] + (Hkv, Hq // Hkv, D)).astype(jnp.float32),
                            kg) * scale
        lc = jnp.where(jnp.isfinite(lc), lc, jnp.inf).reshape(lc.shape[:2] + (Hkv, Hq // Hkv, 1))
        p = jnp.where(vc[:, :, None, None, :], jnp.exp(logits - lc), 0.0)
        p = jnp.sum(p, axis=(2, 3))
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)  # [B, c, k]
        kig = _gather_rows(k_idx, ic).astype(jnp.float32)  # [B, c, k, Di]
        s = jnp.einsum("bchd,bcjd->bchj", qic.astype(jnp.float32), kig)
        s = jnp.einsum("bchj,bch->bcj", jax.nn.relu(s), wc.astype(jnp.float32))
        logp = jax.nn.log_softmax(jnp.where(vc, s, -jnp.inf), axis=-1)
        kl = jnp.where(vc & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logp), 0.0)
        return jnp.sum(kl, axis=-1)  # [B, c]

    rows = max(1, min(S, (1 << 21) // max(1, indices.shape[-1] * (Hq + q_idx.shape[-1]))))
    kl = ref_indexed.map_query_chunks(chunk, rows, S, q, lse_t, q_idx, w_idx, safe, valid)
    has = jnp.any(valid, axis=-1)
    return jnp.sum(jnp.where(has, kl, 0.0)) / jnp.maximum(jnp.sum(has), 1)


class IndexedSparseAttention(AttentionBase):
    """DSA: a lightning indexer picks ``topk`` keys per token; attention runs over them only.

    Args (beyond :class:`~sparse_jax.nn.AttentionBase`):
      topk: keys per token (capped at the sequence length).
      index_heads, index_head_dim: the indexer's query heads Hi and feature size Di.
      indexer: "flat" (exact, :func:`~sparse_jax.lightning_indexer`) or "hierarchical" (HISA).
      index_block_size, index_num_blocks: the hierarchical indexer's block size and kept blocks.
      indexer_loss: sow the indexer's KL distillation loss (see the module docstring).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, topk: int = 2048, index_heads: int = 4, index_head_dim: int = 64, indexer: str = "flat",
                 index_block_size: int = 64, index_num_blocks: int | None = None, indexer_loss: bool = False,
                 rngs: nnx.Rngs, **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, **kwargs)
        if indexer not in _INDEXERS:
            raise ValueError(f"indexer must be one of {_INDEXERS}; got {indexer!r}")
        if min(topk, index_heads, index_head_dim) <= 0:
            raise ValueError("topk, index_heads and index_head_dim must be positive")
        self.topk, self.index_heads, self.index_head_dim = int(topk), int(index_heads), int(index_head_dim)
        self.indexer, self.compute_indexer_loss = indexer, bool(indexer_loss)
        self.index_block_size, self.index_num_blocks = int(index_block_size), index_num_blocks
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        self.index_q = _common.head_projection(d_model, self.index_heads, self.index_head_dim, **kw)
        self.index_k = _common.linear(d_model, self.index_head_dim, (_common.EMBED, _common.HEAD_DIM), **kw)
        self.index_w = _common.linear(d_model, self.index_heads, (_common.EMBED, None), **kw)
        self.index_rope = None if self.rope is None else Rope(theta=self.rope.theta, fraction=self.rope.fraction)

    def index(self, x, positions):
        """Indexer inputs from ``stop_gradient(x)``: q_idx [B, S, Hi, Di], k_idx [B, S, Di], w [B, S, Hi]."""
        x = jax.lax.stop_gradient(x).astype(self.dtype)
        qi, ki = self.index_q(x), self.index_k(x)
        if self.index_rope is not None:
            qi, ki = self.index_rope(qi, positions), self.index_rope(ki[:, :, None], positions)[:, :, 0]
        w = self.index_w(x).astype(jnp.float32) / math.sqrt(self.index_heads * self.index_head_dim)
        return qi, ki, w

    def select(self, qi, ki, w):
        """int32 [B, S, topk'] keys per token (topk' = min(topk, S)), -1 past the allowed ones."""
        topk = min(self.topk, ki.shape[1])
        kw = dict(causal=True, backend=self.backend, interpret=self.interpret)
        if self.indexer == "hierarchical":
            return indexers.hierarchical_indexer(qi, ki, w, topk, block_size=self.index_block_size,
                                                 num_blocks=self.index_num_blocks, **kw)
        return indexers.lightning_indexer(qi, ki, w, topk, **kw)

    def __call__(self, x, *, positions=None, segment_ids=None):
        """x [B, S, d_model] -> [B, S, d_model] (causal self-attention; ``positions`` feed RoPE only)."""
        if segment_ids is not None:
            raise ValueError("IndexedSparseAttention does not support segment_ids (packed documents)")
        _common.check_input(x, self.d_model, type(self).__name__)
        positions = _common.default_positions(x, positions)
        q, k, v = self.project(x, positions)
        qi, ki, w = self.index(x, positions)
        idx = self.select(qi, ki, w)
        Hkv = self.num_kv_heads
        sel = jnp.broadcast_to(idx[:, :, None, :], idx.shape[:2] + (Hkv, idx.shape[-1]))
        o, lse = indexed_attention(q, k, v, sel, scale=self.scale, causal=True, unique_indices=True, return_lse=True,
                                   backend=self.backend, interpret=self.interpret)
        if self.compute_indexer_loss:
            loss = indexer_kl_loss(q, k, lse, self.scale, qi, ki, w, idx)
            self.sow(nnx.Intermediate, "indexer_loss", loss)
        return self.o_proj(o.astype(self.dtype))
