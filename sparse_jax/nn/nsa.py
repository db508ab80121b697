"""``NativeSparseAttention``: NSA's three branches mixed by learned gates (Yuan et al., 2025).

For query t (causal self-attention, positions = sequence indices):

* **compressed**: attention over compressed key/value blocks. Block i summarises keys
  ``[i * stride, i * stride + compress_block)`` (mean pool, or an MLP over the block
  with intra-block position embeddings); t sees block i once the block has ended
  (``i * stride + compress_block - 1 <= t``). Runs on ``block_sparse_attention``.
* **selected**: ``indexed_block_attention`` over ``num_selected`` blocks of
  ``select_block`` keys per (token, kv head). Block importance is the compressed
  branch's attention probability mass, summed over the group's query heads and
  spread over the selection blocks each compressed block overlaps (NSA eq. 9); the
  first block and the ``num_local`` blocks ending at t are always kept.
* **window**: ``block_sparse_attention`` with a causal sliding window of ``window`` keys.

``o = sigmoid(g_cmp) * o_cmp + sigmoid(g_slc) * o_slc + sigmoid(g_win) * o_win`` with
per-head gates from a linear map of x. The branches share the layer's k/v
projections (so dense weights load into the layer); selection is not differentiated
(top-n), the gates and all three attentions are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import masks as masks_lib
from sparse_jax.block_mask import BlockMask
from sparse_jax.nn import _common
from sparse_jax.nn.attention import BlockTables
from sparse_jax.nn.attention_base import AttentionBase
from sparse_jax.ops import block_sparse_attention
from sparse_jax.ops.indexed_attention import indexed_block_attention
from sparse_jax.reference import indexed as ref_indexed

_COMPRESS = ("mean", "mlp")


class _CompressedTables:
    """Host-built block tables of the compressed branch per (q_len, n_compressed).

    Built analytically in NumPy (no mask evaluation, so the first call may happen under
    ``jit``); every touched block is partial and the kernel evaluates
    ``q >= i * stride + block - 1`` inside it. Hashed by identity (static module state).
    """

    def __init__(self, block: int, stride: int, tile: int):
        self.block, self.stride, self.tile = block, stride, tile
        self.mask = masks_lib.as_mask(lambda b, h, q_idx, kv_idx, l=block, d=stride: q_idx >= kv_idx * d + (l - 1))
        self._built: dict[tuple[int, int], BlockMask] = {}

    def get(self, q_len: int, n_compressed: int) -> BlockMask:
        key = (int(q_len), int(n_compressed))
        if key not in self._built:
            t = self.tile
            nq, nk = -(-q_len // t), -(-n_compressed // t)
            last_q = np.minimum((np.arange(nq) + 1) * t, q_len) - 1
            first_end = np.arange(nk) * t * self.stride + self.block - 1  # earliest block end in the kv tile
            sel = last_q[:, None] >= first_end[None, :]
            self._built[key] = BlockMask.from_block_bool(sel, q_len, n_compressed, block_size=t,
                                                         mask_fn=self.mask, classify=False)
        return self._built[key]

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def _overlap(num_compressed: int, num_select: int, *, stride: int, block: int, select_block: int):
    """float32 [nc, ns]: 1 where compressed block i overlaps selection block j."""
    i = np.arange(num_compressed)[:, None]
    j = np.arange(num_select)[None, :]
    return ((i * stride < (j + 1) * select_block) & (i * stride + block > j * select_block)).astype(np.float32)


class NativeSparseAttention(AttentionBase):
    """Native Sparse Attention (compressed + selected + sliding-window branches, gated).

    Args (beyond :class:`~sparse_jax.nn.AttentionBase`):
      compress_block, compress_stride: length and stride of the compressed blocks (l, d).
      compress: "mean" (pooling) or "mlp" (a two-layer MLP over the flattened block).
      select_block: keys per selected block (l'); num_selected: blocks per token (n).
      num_local: trailing blocks always selected (the one holding t counts); the first
        block is always selected too.
      window: sliding-window length.
      select_loop_order: ``loop_order`` of ``indexed_block_attention`` (None: by group size).
      block_size: tile of the block-sparse tables of the compressed and window branches.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, compress_block: int = 32, compress_stride: int = 16, compress: str = "mean",
                 select_block: int = 64, num_selected: int = 16, num_local: int = 2, window: int = 512,
                 select_loop_order: str | None = None, block_size: int = 64, rngs: nnx.Rngs, **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, **kwargs)
        if compress not in _COMPRESS:
            raise ValueError(f"compress must be one of {_COMPRESS}; got {compress!r}")
        if min(compress_block, compress_stride, select_block, num_selected, window) <= 0 or num_local < 0:
            raise ValueError("block lengths, stride, num_selected and window must be positive (num_local >= 0)")
        if compress_stride > compress_block:
            raise ValueError(f"compress_stride ({compress_stride}) cannot exceed compress_block ({compress_block})")
        self.l, self.d, self.l_sel, self.n_sel = int(compress_block), int(compress_stride), int(select_block), \
            int(num_selected)
        self.num_local, self.window, self.compress = int(num_local), int(window), compress
        self.select_loop_order = select_loop_order
        D, kw = self.head_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        self.gate = _common.linear(d_model, 3 * self.num_heads, (_common.EMBED, None), **kw)
        if compress == "mlp":
            self.compress_pos = nnx.Param(_common.annotate(nnx.initializers.normal(0.02), (None, _common.HEAD_DIM))(
                rngs.params(), (self.l, D), self.param_dtype))
            self.k_compress_in = _common.linear(self.l * D, D, (None, _common.HEAD_DIM), **kw)
            self.k_compress_out = _common.linear(D, D, (_common.HEAD_DIM, _common.HEAD_DIM), **kw)
            self.v_compress_in = _common.linear(self.l * D, D, (None, _common.HEAD_DIM), **kw)
            self.v_compress_out = _common.linear(D, D, (_common.HEAD_DIM, _common.HEAD_DIM), **kw)
        self.cmp_tables = _CompressedTables(self.l, self.d, block_size)
        self.win_tables = BlockTables(masks_lib.sliding_window(self.window, causal=True), block_size)

    # -- branches -------------------------------------------------------------------------------
    def compressed_kv(self, k, v):
        """k, v [B, S, Hkv, D] -> compressed [B, nc, Hkv, D] (nc = (S - l) // d + 1, maybe 0)."""
        S = k.shape[1]
        nc = max(0, (S - self.l) // self.d + 1)
        rows = np.arange(nc)[:, None] * self.d + np.arange(self.l)[None, :]  # [nc, l]
        out = []
        for x, name in ((k, "k"), (v, "v")):
            blocks = x[:, rows]  # [B, nc, l, Hkv, D]
            if self.compress == "mean":
                out.append(jnp.mean(blocks.astype(jnp.float32), axis=2).astype(x.dtype))
                continue
            blocks = blocks + self.compress_pos[...].astype(x.dtype)[None, None, :, None, :]
            flat = jnp.moveaxis(blocks, 3, 2).reshape(blocks.shape[:2] + (blocks.shape[3], -1))  # [B, nc, Hkv, l*D]
            hidden = jax.nn.gelu(getattr(self, f"{name}_compress_in")(flat))
            out.append(getattr(self, f"{name}_compress_out")(hidden).astype(x.dtype))
        return out[0], out[1]

    def select_blocks(self, q, k_cmp, lse_cmp, S):
        """Selected block indices int32 [B, S, Hkv, n] from the compressed attention (no gradient)."""
        B, _, Hq, D = q.shape
        nc, Hkv = k_cmp.shape[1], self.num_kv_heads
        G, ns = Hq // Hkv, -(-S // self.l_sel)
        n = min(self.n_sel, ns)
        q, k_cmp, lse_cmp = jax.lax.stop_gradient((q, k_cmp, lse_cmp))
        over = jnp.asarray(_overlap(nc, ns, stride=self.d, block=self.l, select_block=self.l_sel))

        def chunk(qc, lc, tc):
            if nc:
                s = jnp.einsum("bthgd,bchd->bthgc", qc.astype(jnp.float32), k_cmp.astype(jnp.float32)) * self.scale
                ok = (jnp.arange(nc) * self.d + self.l - 1)[None, None, None, None, :] <= tc[None, :, None, None, None]
                lse = jnp.where(jnp.isfinite(lc), lc, jnp.inf)[..., None]
                p = jnp.where(ok, jnp.exp(s - lse), 0.0)
                imp = jnp.einsum("bthc,cj->bthj", jnp.sum(p, axis=3), over)  # [B, c, Hkv, ns]
            else:
                imp = jnp.zeros(qc.shape[:3] + (ns,), jnp.float32)
            blk = jnp.arange(ns)[None, None, None, :]
            cur = (tc // self.l_sel)[None, :, None, None]
            forced = (blk == 0) | ((blk <= cur) & (blk > cur - self.num_local))
            imp = jnp.where(forced, jnp.inf, imp)
            imp = jnp.where(blk * self.l_sel <= tc[None, :, None, None], imp, -jnp.inf)
            top, idx = jax.lax.top_k(imp, n)
            return jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)

        qg = q.reshape(B, S, Hkv, G, D)
        lse = jnp.transpose(lse_cmp, (0, 2, 1)).reshape(B, S, Hkv, G)
        t = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
        rows = max(1, min(S, (1 << 22) // max(1, Hq * max(nc, ns))))
        return ref_indexed.map_query_chunks(lambda a, b, c: chunk(a, b, c[0]), rows, S, qg, lse, t)

    def branches(self, q, k, v):
        """The three branch outputs [B, S, Hq, D] (compressed, selected, window)."""
        B, S, Hq, D = q.shape
        kw = dict(scale=self.scale, backend=self.backend, interpret=self.interpret)
        k_cmp, v_cmp = self.compressed_kv(k, v)
        if k_cmp.shape[1]:
            o_cmp, lse_cmp = block_sparse_attention(q, k_cmp, v_cmp, self.cmp_tables.get(S, k_cmp.shape[1]),
                                                    return_lse=True, **kw)
        else:
            o_cmp, lse_cmp = jnp.zeros_like(q), jnp.full((B, Hq, S), -jnp.inf, jnp.float32)
        blocks = self.select_blocks(q, k_cmp, lse_cmp, S)
        o_slc = indexed_block_attention(q, k, v, blocks, block_size=self.l_sel, loop_order=self.select_loop_order,
                                        **kw)
        o_win = block_sparse_attention(q, k, v, self.win_tables.get(S, S), **kw)
        return o_cmp, o_slc, o_win

    def __call__(self, x, *, positions=None, segment_ids=None):
        """x [B, S, d_model] -> [B, S, d_model] (causal self-attention; ``positions`` feed RoPE only)."""
        if segment_ids is not None:
            raise ValueError("NativeSparseAttention does not support segment_ids (packed documents)")
        _common.check_input(x, self.d_model, type(self).__name__)
        positions = _common.default_positions(x, positions)
        q, k, v = self.project(x, positions)
        o_cmp, o_slc, o_win = self.branches(q, k, v)
        g = jax.nn.sigmoid(self.gate(x.astype(self.dtype)).astype(jnp.float32))
        g = g.reshape(x.shape[:2] + (self.num_heads, 3, 1))
        o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
        return self.o_proj(o.astype(self.dtype))
