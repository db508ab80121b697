"""The main job (placeholder until the models land): run each op on the default backend."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import sparse_jax as sj


def main():
    backend = sj.backends.default_backend()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; backend {backend}")
    B, S, Hq, Hkv, D = 1, 1024, 4, 2, 64
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, S, Hq, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32)
    mask = sj.masks.sliding_window(256, causal=True)
    bm = sj.create_block_mask(mask, None, None, S, S, 128)
    print(bm)
    t = time.perf_counter()
    o = jax.block_until_ready(sj.block_sparse_attention(q, k, v, bm))
    print(f"block_sparse_attention {o.shape} in {time.perf_counter() - t:.2f}s")
    x = jax.random.normal(ks[0], (512, 64))
    w = jax.random.normal(ks[1], (8, 64, 128))
    sizes = jnp.array([100, 0, 50, 200, 12, 50, 50, 40], jnp.int32)
    y = jax.block_until_ready(sj.grouped_matmul(x, w, sizes))
    print(f"grouped_matmul {y.shape}")


if __name__ == "__main__":
    main()
