"""Public ops: validation, backend dispatch, custom VJPs."""
from sparse_jax.ops.attention import block_sparse_attention
from sparse_jax.ops.grouped_matmul import (grouped_matmul, grouped_matmul_t, grouped_swiglu,
                                            preferred_row_alignment)
from sparse_jax.ops.moe_decode import experts_by_id, moe_decode
from sparse_jax.ops.router_topk import topk_routing
from sparse_jax.ops.dropped_blocks import (add_dropped_estimate, dropped_block_attention, dropped_block_table,
                                           merge_attention)
