"""Projection helpers shared by every layer, with logical axis names for sharding.

Every parameter carries logical axis names (``nnx.with_partitioning``) from this
vocabulary, mapped to mesh axes by :mod:`sparse_jax.nn.sharding`:

============  ==============================================
``embed``     the model width d_model
``heads``     query heads
``kv_heads``  key/value heads (GQA groups)
``head_dim``  features of one head
``mlp``       FFN hidden width
``expert``    MoE experts
``vocab``     token vocabulary
============  ==============================================

Attention layers name their projections ``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` (kernels [d_model, H, D] / [H, D, d_model]) so a dense model's
weights load into any sparse variant unchanged.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

EMBED, HEADS, KV_HEADS, HEAD_DIM = "embed", "heads", "kv_heads", "head_dim"
MLP, EXPERT, VOCAB = "mlp", "expert", "vocab"


def annotate(init, axes: Sequence[str | None]):
    """``init`` whose variables carry logical ``axes`` (``nnx.with_partitioning``).

    Variables are created unsharded (no mesh needed); :mod:`sparse_jax.nn.sharding`
    places them on a mesh afterwards through logical-axis rules.
    """
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def fan_in_init(in_axes: int | Sequence[int], out_axes: int | Sequence[int], scale: float = 1.0):
    """Truncated-normal init with variance ``scale / fan_in`` over the named input axes."""
    return jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axes,
                                                out_axis=out_axes)


def einsum_projection(einsum_str: str, kernel_shape: Sequence[int], axes: Sequence[str | None],
                      in_axes: int | Sequence[int], out_axes: int | Sequence[int], *, dtype=None,
                      param_dtype=jnp.float32, use_bias: bool = False, init_scale: float = 1.0,
                      rngs: nnx.Rngs) -> nnx.Einsum:
    """An ``nnx.Einsum`` whose kernel [kernel_shape] carries logical ``axes``.

    ``dtype`` is the compute dtype (None: promote inputs and params), ``param_dtype``
    the storage dtype. A bias (when ``use_bias``) has the kernel's output axes.
    """
    if len(kernel_shape) != len(axes):
        raise ValueError(f"kernel_shape {tuple(kernel_shape)} and axes {tuple(axes)} differ in rank")
    out = (out_axes,) if isinstance(out_axes, int) else tuple(out_axes)
    bias_shape = tuple(kernel_shape[a] for a in out) if use_bias else None
    bias_axes = tuple(axes[a] for a in out)
    return nnx.Einsum(
        einsum_str, tuple(kernel_shape), bias_shape, dtype=dtype, param_dtype=param_dtype,
        kernel_init=annotate(fan_in_init(in_axes, out_axes, init_scale), tuple(axes)),
        bias_init=annotate(jax.nn.initializers.zeros, bias_axes), rngs=rngs)


def head_projection(d_model: int, num_heads: int, head_dim: int, *, kv: bool = False, **kw) -> nnx.Einsum:
    """x [B, S, d_model] -> [B, S, H, D]; kernel [d_model, H, D] (embed, heads|kv_heads, head_dim)."""
    return einsum_projection("bsd,dhk->bshk", (d_model, num_heads, head_dim),
                             (EMBED, KV_HEADS if kv else HEADS, HEAD_DIM), 0, (1, 2), **kw)


def output_projection(num_heads: int, head_dim: int, d_model: int, **kw) -> nnx.Einsum:
    """o [B, S, H, D] -> [B, S, d_model]; kernel [H, D, d_model] (heads, head_dim, embed)."""
    return einsum_projection("bshk,hkd->bsd", (num_heads, head_dim, d_model), (HEADS, HEAD_DIM, EMBED),
                             (0, 1), 2, **kw)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], **kw) -> nnx.Einsum:
    """x [..., d_in] -> [..., d_out]; kernel [d_in, d_out] with logical ``axes``."""
    return einsum_projection("...d,df->...f", (d_in, d_out), axes, 0, 1, **kw)


def expert_weights(num_experts: int, d_in: int, d_out: int, axes: tuple[str, str, str], *,
                   param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Param:
    """A stacked per-expert kernel float [E, d_in, d_out] with logical ``axes``
    (("expert", "embed", "mlp") for gate/up, ("expert", "mlp", "embed") for down)."""
    init = annotate(fan_in_init(1, 2), axes)
    return nnx.Param(init(rngs.params(), (num_experts, d_in, d_out), param_dtype))


def resolve_head_dims(d_model: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None):
    """Validated (num_heads, num_kv_heads, head_dim); head_dim defaults to d_model // num_heads."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if min(d_model, num_heads, num_kv_heads) <= 0:
        raise ValueError(f"d_model, num_heads, num_kv_heads must be positive; got {d_model}, {num_heads}, "
                         f"{num_kv_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) is not divisible by num_heads ({num_heads}); pass head_dim")
        head_dim = d_model // num_heads
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive; got {head_dim}")
    return num_heads, num_kv_heads, head_dim


def check_input(x, d_model: int, layer: str):
    """Trace-time check of a layer input x [B, S, d_model]."""
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{layer} expects x [B, S, {d_model}]; got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{layer} expects a float input; got {x.dtype}")


def default_positions(x, positions):
    """positions as int32 [B, S] or [S] (default ``arange(S)``), validated against x [B, S, ...]."""
    B, S = x.shape[:2]
    if positions is None:
        return jnp.arange(S, dtype=jnp.int32)
    positions = jnp.asarray(positions)
    if positions.shape not in ((S,), (B, S), (1, S)):
        raise ValueError(f"positions must be [{S}] or [{B}, {S}]; got {tuple(positions.shape)}")
    return positions

