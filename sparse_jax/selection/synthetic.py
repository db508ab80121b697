"""Structured synthetic q / k for evaluating selectors (tests, benchmarks, demos).

Real attention maps are sparse in a few recurring ways; :func:`structured_qk` plants
them per head so a selector's recall can be measured without a trained model:

* ``local``: RoPE-like rotations of a shared content vector, so q_i . k_j peaks at
  i = j and decays with |i - j| (sliding-window heads);
* ``sink``: key 0 aligned with every query (attention sinks);
* ``vertical``: a few random keys every query attends to (MInference's vertical lines);
* ``slash``: q_i aligned with k_{i-d} for a few distances d (periodic / slash lines);
* ``needle``: a handful of keys that only the late queries retrieve (scattered, the case
  permutation helps most).

Head h gets pattern ``patterns[h % len(patterns)]`` on top of weak locality and noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PATTERNS", "structured_qk"]

PATTERNS = ("local", "vertical", "slash", "needle", "sink")


def _rotate(x, pos, freqs):
    """Rotary embedding: x [..., S, D] (D even) at integer positions pos [S]."""
    d = x.shape[-1]
    ang = pos[:, None].astype(np.float64) * freqs[None, :]  # [S, D/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def structured_qk(seed: int, batch: int, seq_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                  patterns=PATTERNS, strength: float = 4.0, noise: float = 1.0, num_vertical: int = 8,
                  num_slash: int = 3, num_needles: int = 8, dtype=jnp.float32):
    """q [B, S, Hq, D], k [B, S, Hkv, D] with planted patterns (numpy-built, returned as jnp).

    Patterns live in kv-head space (query heads of a group share them). ``strength``
    scales the planted logits (in units of 1/sqrt(D)-scaled dot products); larger is
    sparser. Deterministic in ``seed``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    rng = np.random.default_rng(seed)
    s, d, hkv, g = seq_len, head_dim, num_kv_heads, num_q_heads // num_kv_heads
    pos = np.arange(s)
    freqs = 1.0 / (64.0 ** (np.arange(d // 2) / (d // 2)))  # slow-ish decay: windows of tens of tokens
    amp = strength * math.sqrt(math.sqrt(d))  # q.k/sqrt(D) ~ strength^2 for aligned unit directions
    q = rng.normal(size=(batch, hkv, g, s, d)) * noise
    k = rng.normal(size=(batch, hkv, s, d)) * noise
    for h in range(hkv):
        kind = patterns[h % len(patterns)]
        content = rng.normal(size=(batch, 1, d))
        content /= np.linalg.norm(content, axis=-1, keepdims=True)
        loc = 0.5 * amp
        q[:, h] += loc * _rotate(np.broadcast_to(content, (batch, s, d)), pos, freqs)[:, None]
        k[:, h] += loc * _rotate(np.broadcast_to(content, (batch, s, d)), pos, freqs)
        a = rng.normal(size=(batch, d))
        a /= np.linalg.norm(a, axis=-1, keepdims=True)
        if kind == "local":
            q[:, h] += amp * _rotate(np.broadcast_to(content, (batch, s, d)), pos, freqs)[:, None]
            k[:, h] += amp * _rotate(np.broadcast_to(content, (batch, s, d)), pos, freqs)
        elif kind in ("sink", "vertical"):
            cols = [0] if kind == "sink" else rng.choice(s, size=min(num_vertical, s), replace=False)
            q[:, h] += amp * a[:, None, None, :]
            k[:, h, cols] += amp * a[:, None, :]
        elif kind == "slash":
            for dist in rng.choice(np.arange(1, max(2, s // 2)), size=num_slash, replace=False):
                c = rng.normal(size=(batch, d))
                c /= np.linalg.norm(c, axis=-1, keepdims=True)
                rot_q = _rotate(np.broadcast_to(c[:, None], (batch, s, d)), pos, freqs * 8)
                rot_k = _rotate(np.broadcast_to(c[:, None], (batch, s, d)), pos + int(dist), freqs * 8)
                q[:, h] += amp * rot_q[:, None]
                k[:, h] += amp * rot_k
        elif kind == "needle":
            cols = rng.choice(s, size=min(num_needles, s), replace=False)
            late = s // 2
            for c in cols:
                u = rng.normal(size=(batch, d))
                u /= np.linalg.norm(u, axis=-1, keepdims=True)
                k[:, h, c] += 1.5 * amp * u
                q[:, h, :, late:] += (1.5 * amp / math.sqrt(len(cols))) * u[:, None, None, :]
        else:
            raise ValueError(f"unknown pattern {kind!r}; choose from {PATTERNS}")
    q = q.transpose(0, 3, 1, 2, 4).reshape(batch, s, hkv * g, d)
    k = k.transpose(0, 2, 1, 3)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype)
