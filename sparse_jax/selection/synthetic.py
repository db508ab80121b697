"""Structured synthetic q / k for evaluating selectors (tests, benchmarks, demos).

Real attention maps are sparse in a few recurring ways; :func:`structured_qk` plants
them per kv head so a selector's recall can be measured without a trained model:

* ``local``: RoPE-like rotations of a shared content vector, so q_i . k_j peaks at
  i = j and decays with |i - j| (sliding-window heads);
* ``sink``: key 0 aligned with every query (attention sinks);
* ``vertical``: a few random keys every query attends to (MInference's vertical lines);
* ``slash``: q_i aligned with k_{i-d} for a few distances d (slash lines);
* ``needle``: a handful of scattered keys that only the second half of the queries
  retrieves;
* ``topic``: documents of random length whose keys share a topic vector; queries look
  at their own document and, later on, at an earlier one (block-coherent mass);
* ``scatter``: 4% of the keys, scattered, mention one entity the later queries look
  for (the case key permutation helps most: many heavy keys per segment).

Patterns combine with ``+`` (``"sink+local"``); :data:`LLM_MIX` is a per-head mix
resembling a long-context LLM layer.

Every head also gets weak locality and unit Gaussian noise. Built with jax.random on
the default device (so 128K-token inputs are generated on the accelerator).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PATTERNS", "LLM_MIX", "structured_qk"]

PATTERNS = ("local", "vertical", "slash", "needle", "sink", "topic", "scatter")
# A mix resembling a long-context LLM layer (sinks and locality in most heads, a few retrieval heads).
LLM_MIX = ("sink+local", "topic+sink", "scatter+local", "vertical+local", "sink+slash", "needle+topic",
           "local", "scatter+topic")


def _rotate(x, pos, freqs):
    """Rotary embedding of x [..., S, D] (D even) at positions pos [S] (float32)."""
    d = x.shape[-1]
    ang = pos[:, None].astype(jnp.float32) * freqs[None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _unit(key, shape):
    u = jax.random.normal(key, shape, jnp.float32)
    return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


def _component(key, kind, q, k, pos, freqs, amp, num_vertical, num_slash, num_needles):
    """Add one planted pattern to q [B, G, S, D], k [B, S, D]."""
    batch, s, d = k.shape
    ks = jax.random.split(key, 4)
    if kind == "local":
        content = _unit(ks[0], (batch, 1, d))
        rot = _rotate(jnp.broadcast_to(content, (batch, s, d)), pos, freqs)
        return q + amp * rot[:, None], k + amp * rot
    if kind in ("sink", "vertical"):
        a = _unit(ks[0], (batch, d))
        cols = jnp.array([0]) if kind == "sink" else jax.random.choice(ks[1], s, (min(num_vertical, s),),
                                                                        replace=False)
        return q + amp * a[:, None, None, :], k.at[:, cols].add(amp * a[:, None, :])
    if kind == "slash":
        dists = jax.random.choice(ks[0], jnp.arange(1, max(2, s // 2)), (num_slash,), replace=False)
        cs = _unit(ks[1], (num_slash, batch, d))
        for i in range(num_slash):
            c = jnp.broadcast_to(cs[i][:, None], (batch, s, d))
            q = q + amp * _rotate(c, pos, freqs * 8)[:, None]
            k = k + amp * _rotate(c, pos + dists[i], freqs * 8)
        return q, k
    if kind == "needle":
        n = min(num_needles, s)
        cols = jax.random.choice(ks[0], s, (n,), replace=False)
        us = _unit(ks[1], (n, batch, d))
        k = k.at[:, cols].add(1.5 * amp * us.transpose(1, 0, 2))
        late = (pos >= s // 2)[None, None, :, None]
        return q + jnp.where(late, (1.5 * amp / math.sqrt(n)) * us.sum(0)[:, None, None, :], 0.0), k
    if kind == "topic":
        # Documents of random length (mean ~512 tokens), each with a topic vector its keys carry;
        # a query carries its own document's topic and, from the second half on, one earlier one's.
        n_docs = max(1, s // 512)
        starts = jnp.sort(jax.random.choice(ks[0], jnp.arange(1, max(2, s)), (n_docs - 1,), replace=False)) \
            if n_docs > 1 else jnp.zeros((0,), jnp.int32)
        doc = jnp.searchsorted(starts, pos, side="right")  # [S]
        topics = _unit(ks[1], (n_docs, batch, d))
        own = topics[doc].transpose(1, 0, 2)  # [B, S, D]
        ref = jax.random.randint(ks[2], (s,), 0, jnp.maximum(doc, 1))  # an earlier document
        other = jnp.where((pos >= s // 2)[None, :, None], topics[ref].transpose(1, 0, 2), 0.0)
        return q + (amp * (own + other))[:, None], k + amp * own
    if kind == "scatter":
        # An entity mentioned throughout: 4% of the keys, scattered, carry its vector; the
        # second half of the queries looks for it.
        u = _unit(ks[0], (batch, d))
        hit = jax.random.uniform(ks[1], (s,)) < 0.04
        k = k + jnp.where(hit[None, :, None], amp * u[:, None, :], 0.0)
        late = (pos >= s // 2)[None, None, :, None]
        return q + jnp.where(late, amp * u[:, None, None, :], 0.0), k
    raise ValueError(f"unknown pattern {kind!r}; choose from {PATTERNS} (or combine them with '+')")


def _head(key, kind, batch, s, g, d, amp, noise, num_vertical, num_slash, num_needles):
    """q [B, G, S, D], k [B, S, D] of one kv head carrying ``kind`` ('a+b' combines patterns)."""
    ks = jax.random.split(key, 3)
    pos = jnp.arange(s)
    freqs = jnp.asarray(1.0 / (64.0 ** (np.arange(d // 2) / (d // 2))), jnp.float32)
    q = noise * jax.random.normal(ks[0], (batch, g, s, d), jnp.float32)
    k = noise * jax.random.normal(ks[1], (batch, s, d), jnp.float32)
    q, k = _component(ks[2], "local", q, k, pos, freqs, 0.5 * amp, 0, 0, 0)  # weak locality everywhere
    for i, part in enumerate(kind.split("+")):
        q, k = _component(jax.random.fold_in(ks[2], i + 1), part, q, k, pos, freqs, amp, num_vertical, num_slash,
                          num_needles)
    return q, k


def structured_qk(seed: int, batch: int, seq_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                  patterns=PATTERNS, strength: float = 4.0, noise: float = 1.0, num_vertical: int = 8,
                  num_slash: int = 3, num_needles: int = 8, dtype=jnp.float32):
    """q [B, S, Hq, D], k [B, S, Hkv, D] with kv head h carrying ``patterns[h % len(patterns)]``.

    Query heads of a group share their kv head's pattern (with their own noise).
    ``strength`` scales the planted logits (aligned unit directions give q.k/sqrt(D)
    about strength^2); larger is sparser. Deterministic in ``seed``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    for p in patterns:
        for part in p.split("+"):
            if part not in PATTERNS:
                raise ValueError(f"unknown pattern {part!r}; choose from {PATTERNS}")
    g = num_q_heads // num_kv_heads
    amp = strength * math.sqrt(math.sqrt(head_dim))
    # "rbg" keys: XLA's RngBitGenerator compiles in milliseconds per shape, threefry in ~0.5 s
    # (op-by-op generation of a new shape cost ~5 s of CPU in tests).
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), num_kv_heads)
    qs, ks = [], []
    for h in range(num_kv_heads):
        qh, kh = _head(keys[h], patterns[h % len(patterns)], batch, seq_len, g, head_dim, amp, noise,
                       num_vertical, num_slash, num_needles)
        qs.append(qh.astype(dtype))
        ks.append(kh.astype(dtype))
    q = jnp.stack(qs, axis=1)  # [B, Hkv, G, S, D]
    q = q.transpose(0, 3, 1, 2, 4).reshape(batch, seq_len, num_q_heads, head_dim)
    k = jnp.stack(ks, axis=2)  # [B, S, Hkv, D]
    return q, k
