"""``MoEFeedForward``: a routed SwiGLU Mixture-of-Experts over :func:`sparse_jax.moe.moe_ffn`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_jax import backends
from sparse_jax.moe import moe_ffn
from sparse_jax.nn import _common
from sparse_jax.nn.ffn import SwiGLU


class MoEFeedForward(nnx.Module):
    """Top-k routed SwiGLU experts (Mixtral / DeepSeek style), dropless unless ``capacity_factor``.

    Args:
      d_model: model width; d_ff: hidden width of each expert.
      num_experts: E; top_k: experts per token.
      scoring: "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3).
      shared_experts: number of always-on experts (one SwiGLU of width shared_experts * d_ff).
      capacity_factor: None (dropless) or the per-expert capacity factor.
      normalize_topk: renormalise the k combine weights to sum to 1.
      num_groups, topk_groups: DeepSeek-V3 group-limited routing.
      dtype / param_dtype: compute / storage dtypes; backend / interpret: grouped-matmul kernels.

    Parameters: router [d_model, E] ("embed", None); w_gate, w_up [E, d_model, d_ff]
    ("expert", "embed", "mlp"); w_down [E, d_ff, d_model] ("expert", "mlp", "embed");
    shared (a :class:`SwiGLU`) when ``shared_experts``.

    Call: ``x [..., d_model] -> y [..., d_model]`` (``dtype``), or ``(y, aux)`` with
    ``return_aux=True``: aux = {"load_balance_loss", "z_loss" (float32 scalars),
    "tokens_per_expert" (int32 [E]), "dropped" (int32)}. The caller weights the losses.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, *, scoring: str = "softmax",
                 shared_experts: int = 0, capacity_factor: float | None = None, normalize_topk: bool = True,
                 num_groups: int | None = None, topk_groups: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, backend: str | None = None, interpret: bool = False, rngs: nnx.Rngs):
        if min(d_model, d_ff, num_experts) <= 0:
            raise ValueError(f"d_model, d_ff, num_experts must be positive; got {d_model}, {d_ff}, {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}]; got {top_k}")
        if shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0; got {shared_experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive or None; got {capacity_factor}")
        if backend is not None and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)} or None")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.scoring, self.capacity_factor, self.normalize_topk = scoring, capacity_factor, normalize_topk
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.dtype, self.backend, self.interpret = jnp.dtype(dtype), backend, bool(interpret)
        router_init = _common.annotate(_common.fan_in_init(0, 1), (_common.EMBED, None))
        self.router = nnx.Param(router_init(rngs.params(), (d_model, num_experts), param_dtype))
        ex = dict(param_dtype=param_dtype, rngs=rngs)
        up_axes, down_axes = (_common.EXPERT, _common.EMBED, _common.MLP), (_common.EXPERT, _common.MLP, _common.EMBED)
        self.w_gate = _common.expert_weights(num_experts, d_model, d_ff, up_axes, **ex)
        self.w_up = _common.expert_weights(num_experts, d_model, d_ff, up_axes, **ex)
        self.w_down = _common.expert_weights(num_experts, d_ff, d_model, down_axes, **ex)
        self.shared = (SwiGLU(d_model, shared_experts * d_ff, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if shared_experts else None)

    def __call__(self, x, *, return_aux: bool = False):
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoEFeedForward expects x [..., {self.d_model}]; got shape {tuple(x.shape)}")
        dt = self.dtype
        tokens = x.reshape(-1, self.d_model).astype(dt)
        shared = None
        if self.shared is not None:
            s = self.shared
            shared = tuple(p.kernel[...].astype(dt) for p in (s.gate_proj, s.up_proj, s.down_proj))
        y, aux = moe_ffn(tokens, self.router[...], self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                         self.w_down[...].astype(dt), top_k=self.top_k, scoring=self.scoring,
                         normalize_topk=self.normalize_topk, num_groups=self.num_groups,
                         topk_groups=self.topk_groups, capacity_factor=self.capacity_factor,
                         shared_expert=shared, return_aux=True, backend=self.backend, interpret=self.interpret)
        y = y.reshape(x.shape[:-1] + (self.d_model,))
        if not return_aux:
            return y
        return y, dict(load_balance_loss=aux.load_balance_loss, z_loss=aux.z_loss,
                       tokens_per_expert=aux.tokens_per_expert, dropped=aux.dropped)
