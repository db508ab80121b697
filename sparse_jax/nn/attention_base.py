"""``AttentionBase``: the projections, RoPE, GQA bookkeeping and checks every attention layer shares.

A subclass implements only :meth:`AttentionBase.attend` on projected, rotated
q [B, S, Hq, D], k/v [B, S, Hkv, D]; parameter names (q_proj, k_proj, v_proj,
o_proj, and q_norm / k_norm with ``qk_norm``) are the same in every layer, so
``nnx.update(sparse_layer, nnx.state(dense_layer))`` moves trained weights over.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from sparse_jax import backends
from sparse_jax.nn import _common
from sparse_jax.nn.rope import Rope

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


class AttentionBase(nnx.Module):
    """Multi-head attention with GQA, RoPE and optional QK-norm; subclasses choose the attention.

    Args:
      d_model: model width.
      num_heads: query heads Hq; num_kv_heads: key/value heads Hkv (default Hq; Hq % Hkv == 0).
      head_dim: D (default d_model // num_heads).
      rope: a :class:`Rope` (default theta 1e4, all features) or None for no RoPE.
      qk_norm: RMS-normalise q and k per head before RoPE (Qwen-3 / OLMo-2 style).
      use_bias: biases on the q/k/v/o projections.
      scale: logit scale (default 1/sqrt(D)); softcap: tanh soft-capping of logits.
      dtype: compute dtype (activations, attention); param_dtype: storage dtype.
      backend, interpret: passed to the ops (see :mod:`sparse_jax.backends`).
      record_density: sow each call's block density (fraction of (query block, kv block)
        pairs computed, float32 scalar) as ``nnx.Intermediate`` "density"; read it with
        ``nnx.pop(model, nnx.Intermediate)``. Off by default (keeps the graph static).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, rope: Rope | None = Rope(), qk_norm: bool = False, use_bias: bool = False,
                 scale: float | None = None, softcap: float | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, backend: str | None = None, interpret: bool = False,
                 record_density: bool = False, rngs: nnx.Rngs):
        num_heads, num_kv_heads, head_dim = _common.resolve_head_dims(d_model, num_heads, num_kv_heads, head_dim)
        for name, dt in (("dtype", dtype), ("param_dtype", param_dtype)):
            if jnp.dtype(dt) not in _FLOATS:
                raise ValueError(f"{name} must be float32, bfloat16 or float16; got {dt}")
        if rope is not None and not isinstance(rope, Rope):
            raise TypeError(f"rope must be a sparse_jax.nn.Rope or None; got {rope!r}")
        if backend is not None and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)} or None")
        if softcap is not None and softcap <= 0:
            raise ValueError(f"softcap must be positive; got {softcap}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.rope = rope
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        self.softcap = None if softcap is None else float(softcap)
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.backend, self.interpret = backend, bool(interpret)
        self.record_density = bool(record_density)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=use_bias, rngs=rngs)
        self.q_proj = _common.head_projection(d_model, num_heads, head_dim, **kw)
        self.k_proj = _common.head_projection(d_model, num_kv_heads, head_dim, kv=True, **kw)
        self.v_proj = _common.head_projection(d_model, num_kv_heads, head_dim, kv=True, **kw)
        self.o_proj = _common.output_projection(num_heads, head_dim, d_model, **kw)
        if qk_norm:
            norm = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
                        scale_init=_common.annotate(nnx.initializers.ones, (_common.HEAD_DIM,)))
            self.q_norm = nnx.RMSNorm(head_dim, **norm)
            self.k_norm = nnx.RMSNorm(head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None

    # -- pieces a subclass may reuse ----------------------------------------------------------
    def project(self, x, positions):
        """x [B, S, d_model] -> q [B, S, Hq, D], k, v [B, S, Hkv, D] in ``dtype`` (RoPE applied)."""
        x = x.astype(self.dtype)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def record(self, density) -> None:
        """Sow ``density`` (a scalar) when ``record_density`` is on."""
        if self.record_density:
            self.sow(nnx.Intermediate, "density", jnp.asarray(density, jnp.float32))

    def attend(self, q, k, v, *, positions, segment_ids):
        """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> o [B, S, Hq, D]. Subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend()")

    def __call__(self, x, *, positions=None, segment_ids=None):
        """Self-attention.

        Args:
          x: float [B, S, d_model].
          positions: int [B, S] or [S] for RoPE (default arange(S)).
          segment_ids: int [B, S] or [S]: packed documents; tokens attend within their segment.

        Returns:
          [B, S, d_model] in ``dtype``.
        """
        _common.check_input(x, self.d_model, type(self).__name__)
        positions = _common.default_positions(x, positions)
        q, k, v = self.project(x, positions)
        o = self.attend(q, k, v, positions=positions, segment_ids=segment_ids)
        return self.o_proj(o.astype(self.dtype))
