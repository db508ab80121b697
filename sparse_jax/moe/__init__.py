"""Mixture-of-Experts: routing, token dispatch/combine, the MoE FFN layer, expert parallelism.

Flow: ``route`` (scores, top-k, aux losses) -> ``plan_dispatch`` (stable sort by
expert) -> ``expand`` (gather rows) -> grouped SwiGLU and down matmuls
(:mod:`sparse_jax.ops`) -> ``combine`` (float32 weighted sum back to tokens).
"""
from sparse_jax.moe.dispatch import DispatchPlan, combine, expand, inverse_permutation, permute, plan_dispatch
from sparse_jax.moe.expert_parallel import moe_ffn_ep
from sparse_jax.moe.layer import moe_ffn, moe_ffn_from_routing, routed_experts, shared_expert_ffn
from sparse_jax.moe.routing import (MoEAux, RouterAux, Routing, capacity, capacity_mask, route,
                                    router_logits)
