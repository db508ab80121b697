"""``SwiGLU``: the dense gated FFN (Llama / Mixtral expert shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.nn import _common


class SwiGLU(nnx.Module):
    """y = down(silu(gate(x)) * up(x)).

    Args:
      d_model: input/output width; d_ff: hidden width.
      dtype: compute dtype; param_dtype: storage dtype.

    Call: x [..., d_model] -> [..., d_model] in ``dtype``. Kernels: gate_proj/up_proj
    [d_model, d_ff] ("embed", "mlp"), down_proj [d_ff, d_model] ("mlp", "embed").
    """

    def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model <= 0 or d_ff <= 0:
            raise ValueError(f"d_model and d_ff must be positive; got {d_model}, {d_ff}")
        self.d_model, self.d_ff, self.dtype = d_model, d_ff, jnp.dtype(dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _common.linear(d_model, d_ff, (_common.EMBED, _common.MLP), **kw)
        self.up_proj = _common.linear(d_model, d_ff, (_common.EMBED, _common.MLP), **kw)
        self.down_proj = _common.linear(d_ff, d_model, (_common.MLP, _common.EMBED), **kw)

    def __call__(self, x):
        if x.shape[-1] != self.d_model:
            raise ValueError(f"SwiGLU expects x [..., {self.d_model}]; got shape {tuple(x.shape)}")
        x = x.astype(self.dtype)
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
