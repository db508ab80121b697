"""sparse-jax: block-sparse, permuted and indexed attention and grouped MoE matmuls for JAX.

Flow: masks -> BlockMask tables -> kernels per backend (pallas_kernels/) -> ops -> layers (nn) -> models.
"""
from sparse_jax import backends, masks, reference
from sparse_jax.block_mask import BlockMask, create_block_mask, gqa_union
from sparse_jax.ops import block_sparse_attention, grouped_matmul, grouped_matmul_t, grouped_swiglu
from sparse_jax.group_metadata import GroupMetadata, make_group_metadata
from sparse_jax import permutation, selection
from sparse_jax.ops.permuted_attention import permuted_block_sparse_attention
from sparse_jax import moe
from sparse_jax.moe import moe_ffn, moe_ffn_ep
from sparse_jax.ops.indexed_attention import indexed_attention, indexed_block_attention
from sparse_jax import indexers
from sparse_jax.indexers import hierarchical_indexer, lightning_indexer

__version__ = "0.1.0"
