"""``BlockSparseAttention`` (a static mask through the block-sparse kernels) and ``DenseAttention``.

The block tables of a layer are built on the host once per (q_len, kv_len) by
:class:`BlockTables` and reach the op as numpy constants of the trace, so a
jitted step never rebuilds them (``BlockTables.builds`` counts host builds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax import masks as masks_lib
from sparse_jax.block_mask import BlockMask, create_block_mask
from sparse_jax.nn.attention_base import AttentionBase
from sparse_jax.ops import block_sparse_attention


class BlockTables:
    """The host-built :class:`BlockMask` of one layer per (q_len, kv_len).

    ``mask`` is a mask (``masks.*`` or ``fn(b, h, q_idx, kv_idx)``) built for each new
    length, or a ready BlockMask used as is (its lengths must then match).
    ``heads``: None for a head-independent mask, else the number of heads it is built for.
    Hashable (by the mask's cache key, else identity), so it can sit in a module's static
    attributes and equal layers share ``jit`` traces.
    """

    def __init__(self, mask, block_size=128, heads: int | None = None):
        if isinstance(mask, BlockMask):
            if isinstance(mask.kv_indices, jax.core.Tracer):
                raise ValueError("a layer's BlockMask must be built on the host (numpy tables), not under jit")
            self.mask, self.fixed = mask.mask, mask
        else:
            self.mask, self.fixed = masks_lib.as_mask(mask), None
            if self.mask.segment_ids() is not None:
                raise ValueError("a layer's mask cannot hold a document mask (it is data, per batch); "
                                 "pass segment_ids= to the layer call instead")
        self.block_size, self.heads = block_size, heads
        self._built: dict[tuple[int, int], BlockMask] = {}
        self.builds = 0

    def get(self, q_len: int, kv_len: int) -> BlockMask:
        """Tables for (q_len, kv_len), built on the first request only."""
        if self.fixed is not None:
            if (self.fixed.q_len, self.fixed.kv_len) != (q_len, kv_len):
                raise ValueError(f"the layer's BlockMask is for q_len={self.fixed.q_len}, kv_len={self.fixed.kv_len}; "
                                 f"got sequences of {q_len} and {kv_len}")
            return self.fixed
        key = (int(q_len), int(kv_len))
        if key not in self._built:
            # Built while a layer is being traced: evaluate the builder's own jitted helpers
            # eagerly (on the host) instead of staging them into the caller's trace.
            with jax.ensure_compile_time_eval():
                self._built[key] = create_block_mask(self.mask, None, self.heads, q_len, kv_len, self.block_size)
            self.builds += 1
        return self._built[key]

    def _key(self):
        # Tables are a function of (mask, block size, heads): layers with equal keys can share
        # a trace. Prebuilt tables and masks without a cache key compare by identity.
        k = None if self.fixed is not None else self.mask.cache_key()
        return None if k is None else (k, self.block_size, self.heads)

    def __hash__(self):
        k = self._key()
        return id(self) if k is None else hash(k)

    def __eq__(self, other):
        if self is other:
            return True
        return isinstance(other, BlockTables) and self._key() is not None and self._key() == other._key()

    def __repr__(self):
        return f"BlockTables({self.fixed if self.fixed is not None else self.mask!r}, block_size={self.block_size})"


class BlockSparseAttention(AttentionBase):
    """Attention restricted to a static mask, computed only on the blocks the mask touches.

    Args (beyond :class:`AttentionBase`):
      mask: a mask (``masks.causal``, ``masks.sliding_window(w, causal=True)``, ``and_masks``...,
        or ``fn(b, h, q_idx, kv_idx)``) or a host-built :class:`BlockMask`.
      block_size: int or (bq, bkv) of the tables built from ``mask``.
      per_head_mask: the mask depends on the head index h (tables get H = num_heads).

    Call: ``layer(x [B, S, d_model], *, positions=None, segment_ids=None)``. The mask is
    evaluated on sequence indices; ``positions`` only feed RoPE.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, mask=masks_lib.causal, block_size=128, per_head_mask: bool = False, **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
        self.tables = BlockTables(mask, block_size, self.num_heads if per_head_mask else None)

    def attend(self, q, k, v, *, positions, segment_ids):
        bm = self.tables.get(q.shape[1], k.shape[1])
        self.record(bm.density)
        return block_sparse_attention(q, k, v, bm, scale=self.scale, segment_ids=segment_ids, softcap=self.softcap,
                                      backend=self.backend, interpret=self.interpret)


DENSE_IMPLEMENTATIONS = ("block_sparse", "xla", "cudnn")


class DenseAttention(BlockSparseAttention):
    """Full (causal or bidirectional) attention: the baseline the sparse layers are measured against.

    ``implementation``: "block_sparse" runs ``block_sparse_attention`` with a causal / full
    mask on the chosen backend (the same kernels); "xla" / "cudnn" call
    ``jax.nn.dot_product_attention`` (no softcap). Parameters are those of every
    attention layer, so a trained DenseAttention's state loads into any sparse one.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, causal: bool = True, implementation: str = "block_sparse", block_size=128, **kwargs):
        if implementation not in DENSE_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {DENSE_IMPLEMENTATIONS}; got {implementation!r}")
        if implementation != "block_sparse" and kwargs.get("softcap") is not None:
            raise ValueError("softcap needs implementation='block_sparse' (jax.nn.dot_product_attention has none)")
        super().__init__(d_model, num_heads, num_kv_heads, head_dim,
                         mask=masks_lib.causal if causal else masks_lib.full, block_size=block_size, **kwargs)
        self.causal, self.implementation = bool(causal), implementation

    def attend(self, q, k, v, *, positions, segment_ids):
        if self.implementation == "block_sparse":
            return super().attend(q, k, v, positions=positions, segment_ids=segment_ids)
        self.record(self.tables.get(q.shape[1], k.shape[1]).density)
        mask = None
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids)
            seg = jnp.broadcast_to(seg, (q.shape[0], q.shape[1])) if seg.ndim == 1 else seg
            mask = (seg[:, None, :, None] == seg[:, None, None, :])
        return jax.nn.dot_product_attention(q, k, v, scale=self.scale, is_causal=self.causal, mask=mask,
                                            implementation=None if self.implementation == "xla" else "cudnn")
