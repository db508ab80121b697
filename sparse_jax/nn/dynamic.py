"""``DynamicSparseAttention``: runtime block selection (estimator -> BlockMask -> kernel) under ``jit``."""

from __future__ import annotations

import jax

from sparse_jax import selection as sel_lib
from sparse_jax.nn.attention_base import AttentionBase
from sparse_jax.ops import add_dropped_estimate, block_sparse_attention

SELECTIONS = ("xattention", "topk", "vertical_slash")
GQA_MODES = ("per_head", "union", "mean")


class DynamicSparseAttention(AttentionBase):
    """Causal attention over blocks chosen per call from the current q and k.

    Args (beyond :class:`AttentionBase`):
      selection: "xattention" (antidiagonal scores + cumulative ``threshold``, ``stride``),
        "topk" (pooled block scores, the best ``num_blocks`` per query block, ``pooling``)
        or "vertical_slash" (MInference: ``vertical_size`` keys and ``slash_size``
        diagonals per head, estimated from the last ``last_q`` queries).
      block_size: square block of the tables.
      max_kv_blocks: static cap on blocks per row for "xattention" (None: no cap).
      gqa: "per_head", "union" or "mean" (see :mod:`sparse_jax.selection`).
      estimate_dropped: add each skipped block back as its mean key and value
        (:mod:`sparse_jax.ops.dropped_blocks`); not with ``segment_ids``.

    The selection is not differentiated (q and k enter it through ``stop_gradient``);
    gradients reach q, k, v through the kernel. ``segment_ids`` AND a document mask in.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, selection: str = "xattention", block_size: int = 128, threshold: float = 0.9, stride: int = 8,
                 max_kv_blocks: int | None = None, num_blocks: int | None = None, pooling: str = "mean",
                 vertical_size: int | None = None, slash_size: int | None = None, last_q: int = 64,
                 gqa: str = "per_head", estimate_dropped: bool = False, **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
        if gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}; got {gqa!r}")
        if selection == "topk" and (num_blocks is None or num_blocks <= 0):
            raise ValueError(f"selection='topk' needs num_blocks > 0; got {num_blocks}")
        if selection == "vertical_slash" and (vertical_size is None or slash_size is None):
            raise ValueError("selection='vertical_slash' needs vertical_size and slash_size")
        if selection == "xattention" and block_size % stride:
            raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")
        self.selection, self.block_size, self.gqa = selection, int(block_size), gqa
        self.estimate_dropped = bool(estimate_dropped)
        if selection == "xattention":
            self.options = dict(threshold=float(threshold), stride=int(stride), max_kv_blocks=max_kv_blocks)
        elif selection == "topk":
            self.options = dict(num_blocks=int(num_blocks), pooling=pooling)
        else:
            self.options = dict(vertical_size=int(vertical_size), slash_size=int(slash_size), last_q=int(last_q))

    def select(self, q, k):
        """The BlockMask for q [B, S, Hq, D], k [B, S, Hkv, D] (no gradient)."""
        q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
        common = dict(block_size=self.block_size, gqa=self.gqa, scale=self.scale)
        if self.selection == "xattention":
            return sel_lib.xattention(q, k, causal=True, backend=self.backend, interpret=self.interpret,
                                      **common, **self.options)
        if self.selection == "topk":
            return sel_lib.topk_blocks(q, k, causal=True, **common, **self.options)
        return sel_lib.vertical_slash(q, k, **common, **self.options)

    def attend(self, q, k, v, *, positions, segment_ids):
        bm = self.select(q, k)
        self.record(bm.density)
        kw = dict(scale=self.scale, softcap=self.softcap, backend=self.backend, interpret=self.interpret)
        if not self.estimate_dropped:
            return block_sparse_attention(q, k, v, bm, segment_ids=segment_ids, **kw)
        if segment_ids is not None:  # a block's mean key would mix documents
            raise ValueError("estimate_dropped does not take segment_ids")
        o, lse = block_sparse_attention(q, k, v, bm, return_lse=True, **kw)
        return add_dropped_estimate(q, k, v, o, lse, bm, **kw)[0]
