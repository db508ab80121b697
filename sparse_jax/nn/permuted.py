"""``PermutedBlockSparseAttention``: PBS-Attn (segment-local key permutation + block selection) as a layer."""

from __future__ import annotations

from sparse_jax.nn.attention_base import AttentionBase
from sparse_jax.ops.permuted_attention import permuted_block_sparse_attention

GQA_MODES = ("union", "mean", "per_head")


class PermutedBlockSparseAttention(AttentionBase):
    """Causal self-attention through :func:`sparse_jax.permuted_block_sparse_attention`.

    Args (beyond :class:`AttentionBase`):
      segment_size: keys are reordered only inside segments of this many positions
        (a multiple of ``block_size``).
      threshold: share of each query block's pooled attention mass kept (>= 1: dense).
      block_size: square block of the selection tables.
      permute_queries: also sort queries inside segments.
      gqa: how a kv head's query heads share tables ("union", "mean", "per_head").
      max_kv_blocks: static cap on selected blocks per row (None: no cap).
      estimate_dropped: add each skipped block back as its mean key and value
        (:mod:`sparse_jax.ops.dropped_blocks`; ~1/block_size of dense attention's work).

    Selection runs under ``jit`` on every call (it is data-dependent) and is not
    differentiated; gradients reach q, k, v. ``segment_ids`` are not supported.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, segment_size: int = 256, threshold: float = 0.9, block_size: int = 128,
                 permute_queries: bool = False, gqa: str = "union", max_kv_blocks: int | None = None,
                 estimate_dropped: bool = False, **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
        if block_size <= 0 or segment_size <= 0 or segment_size % block_size:
            raise ValueError(f"segment_size ({segment_size}) must be a positive multiple of block_size ({block_size})")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0; got {threshold}")
        if gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}; got {gqa!r}")
        self.segment_size, self.threshold, self.block_size = int(segment_size), float(threshold), int(block_size)
        self.permute_queries, self.gqa, self.max_kv_blocks = bool(permute_queries), gqa, max_kv_blocks
        self.estimate_dropped = bool(estimate_dropped)

    def attend(self, q, k, v, *, positions, segment_ids):
        if segment_ids is not None:
            raise ValueError("PermutedBlockSparseAttention does not take segment_ids (PBS permutes whole sequences)")
        o, aux = permuted_block_sparse_attention(
            q, k, v, block_size=self.block_size, segment_size=self.segment_size, threshold=self.threshold,
            causal=True, permute_queries=self.permute_queries, return_aux=True, gqa=self.gqa,
            max_kv_blocks=self.max_kv_blocks, estimate_dropped=self.estimate_dropped, scale=self.scale,
            softcap=self.softcap, backend=self.backend, interpret=self.interpret)
        self.record(aux.density)
        return o
