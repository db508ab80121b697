"""Flax NNX layers over the sparse_jax ops.

Attention layers share one convention: ``Layer(d_model, num_heads, num_kv_heads,
head_dim=None, ..., dtype, param_dtype, backend, interpret, rngs)`` and
``layer(x [B, S, d_model], *, positions=None) -> [B, S, d_model]``, with the
projections named q_proj / k_proj / v_proj / o_proj so weights move between them.

Linen users: ``flax.nnx.bridge.to_linen(Layer, *args, **kwargs)`` gives a Linen module;
run its ``init`` under ``nnx.use_eager_sharding(False)`` (parameters carry logical
axis names, placed on a mesh later by :func:`shard_model` / :func:`partition_specs`).
"""
from sparse_jax.nn._common import (
    EMBED, EXPERT, HEAD_DIM, HEADS, KV_HEADS, MLP, VOCAB, annotate, einsum_projection, expert_weights,
    head_projection, linear, output_projection)
from sparse_jax.nn.rope import Rope, apply_rope, rotary_dim
from sparse_jax.nn.sharding import DEFAULT_RULES, logical_to_mesh, partition_specs, shard_model
from sparse_jax.nn.attention_base import AttentionBase
from sparse_jax.nn.attention import BlockSparseAttention, BlockTables, DenseAttention
from sparse_jax.nn.ffn import SwiGLU
from sparse_jax.nn.moe import MoEFeedForward
from sparse_jax.nn.permuted import PermutedBlockSparseAttention
from sparse_jax.nn.dynamic import DynamicSparseAttention
from sparse_jax.nn.nsa import NativeSparseAttention
from sparse_jax.nn.dsa import IndexedSparseAttention
