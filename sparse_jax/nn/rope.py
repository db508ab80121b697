"""Rotary position embeddings (RoPE), rotate-half (GPT-NeoX / Llama) layout.

``apply_rope`` rotates the first ``fraction`` of each head's features by
position-dependent angles ``pos * theta ** (-2i / rot_dim)``; the rest pass
through unchanged (partial rotary, as in GPT-NeoX / Phi / the rope half of
DeepSeek MLA heads). Angles are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
    """Number of rotated features: ``fraction * head_dim`` rounded down to an even number."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rope fraction must be in [0, 1]; got {fraction}")
    return int(head_dim * fraction) // 2 * 2


def apply_rope(x, positions, *, theta: float = 10000.0, fraction: float = 1.0):
    """Rotate ``x`` by its positions.

    Args:
      x: [B, S, H, D] (any float dtype).
      positions: int or float [B, S] or [S].
      theta: the base of the frequency ladder.
      fraction: share of the D features rotated (the first ``rotary_dim(D, fraction)``).

    Returns:
      [B, S, H, D] in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x [B, S, H, D]; got shape {tuple(x.shape)}")
    B, S, _, D = x.shape
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    if positions.ndim != 2 or positions.shape[-1] != S or positions.shape[0] not in (1, B):
        raise ValueError(f"positions must be [{S}] or [{B}, {S}]; got {tuple(positions.shape)}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive; got {theta}")
    rot = rotary_dim(D, fraction)
    if rot == 0:
        return x
    half = rot // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rot)  # [half]
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, S, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xr = x[..., :rot].astype(jnp.float32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return rotated if rot == D else jnp.concatenate([rotated, x[..., rot:]], axis=-1)


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE settings a layer carries (hashable; ``rope=None`` on a layer disables RoPE)."""

    theta: float = 10000.0
    fraction: float = 1.0

    def __post_init__(self):
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive; got {self.theta}")
        rotary_dim(2, self.fraction)  # validates the fraction

    def __call__(self, x, positions):
        """x [B, S, H, D], positions [B, S] | [S] -> [B, S, H, D] (x.dtype)."""
        return apply_rope(x, positions, theta=self.theta, fraction=self.fraction)
