"""The router's split partial products (the decode path's first launch) vs the jnp product."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from pallas_kernels.triton import router_product
from tests.conftest import randn


@given(D=st.integers(1, 9000), E=st.integers(1, 300))
def test_plan_covers_d_in_few_splits(D, E):
    sp = router_product.plan(D, E)
    assert sp.rows % sp.tk == 0 and sp.tk >= 16 and sp.be >= 16
    assert (sp.splits - 1) * sp.rows < D <= sp.splits * sp.rows  # every row in one split, no empty split
    assert sp.splits <= router_product.MAX_SPLITS


@pytest.mark.parametrize("T, D, E, x_dtype, r_dtype", [
    (1, 3584, 64, jnp.bfloat16, jnp.bfloat16),   # Qwen2-MoE: 14 splits of 256 rows
    (2, 200, 6, jnp.float32, jnp.float32),        # ragged D and E, one split
    (1, 1000, 100, jnp.bfloat16, jnp.float32),    # a float32 router on bfloat16 tokens: full float32 products
    (3, 130, 8, jnp.float16, jnp.float16),
], ids=["qwen2", "ragged", "f32-router", "f16"])
def test_partials_sum_to_the_router_product(T, D, E, x_dtype, r_dtype):
    x, rw = randn(0, (T, D), x_dtype), randn(1, (D, E), r_dtype, scale=D ** -0.5)
    parts = router_product.partial_logits(x, rw, interpret=True)
    sp = router_product.plan(D, E)
    assert parts.shape == (T, sp.splits, E) and parts.dtype == jnp.float32
    # float64 on the host: XLA:GPU's own float32 product runs in tf32, the kernel at full precision
    want = np.asarray(x, np.float64) @ np.asarray(rw, np.float64)
    np.testing.assert_allclose(np.asarray(parts, np.float64).sum(1), want, rtol=1e-5, atol=1e-5)
