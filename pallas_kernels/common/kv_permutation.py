"""Online K/V permutation, kernel side (shared by every lowering).

The semantics (and the reference) live in :mod:`sparse_jax.reference.kv_permutation`:
logical key position j of kv head h reads row ``perm[b, h, j]``; out-of-range
entries are padding. Kernels gather K/V rows through the sanitized permutation
(-1 marks padding) and write dK/dV in logical order; :func:`scatter_back` is the
transpose of that gather.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax.reference.kv_permutation import normalize, permuted_rows, sanitize

__all__ = ["normalize", "permuted_rows", "sanitize", "scatter_back"]


def scatter_back(d_logical, perm):
    """Gradient rows in logical order [B, Skv, Hkv, D] -> original rows (scatter-add;
    padding entries (-1) are dropped). perm: sanitized int32 [B, Hkv, Skv]."""
    B, S, H, _ = d_logical.shape
    idx = jnp.where(perm >= 0, perm, S).transpose(0, 2, 1)  # [B, Skv, Hkv]; S is out of range
    b = jnp.arange(B)[:, None, None]
    h = jnp.arange(H)[None, None, :]
    return jnp.zeros_like(d_logical).at[b, idx, h].add(d_logical, mode="drop")
