"""Pure-jnp references: the oracle of every test and the ``xla`` backend."""
from sparse_jax.reference.attention import attention, block_sparse_attention, dense_attention
from sparse_jax.reference.grouped_matmul import grouped_matmul, grouped_matmul_t, grouped_swiglu
from sparse_jax.reference.moe import moe_ffn, moe_ffn_from_routing
from sparse_jax.reference import indexed
