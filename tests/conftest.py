"""Shared test fixtures: which kernel backends run, tolerances, random inputs.

Kernel tests are parametrised over ``kernel_backend`` = (backend, interpret):
compiled Triton on a GPU, compiled Mosaic on a TPU, and both in interpret mode on
the CPU. ``SPARSE_JAX_TEST_BACKENDS`` overrides, e.g. ``triton:compiled`` or
``triton:interpret,mosaic_tpu:interpret``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,  # CI: the same examples every run
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _kernel_backends():
    env = os.environ.get("SPARSE_JAX_TEST_BACKENDS")
    if env:
        out = []
        for item in env.split(","):
            name, _, mode = item.strip().partition(":")
            out.append((name, mode != "compiled"))
        return out
    platform = jax.default_backend()
    if platform == "gpu":
        return [("triton", False)]
    if platform == "tpu":
        return [("mosaic_tpu", False)]
    return [("triton", True), ("mosaic_tpu", True)]


KERNEL_BACKENDS = _kernel_backends()


def backend_id(p):
    return f"{p[0]}-{'interpret' if p[1] else 'compiled'}"


@pytest.fixture(params=KERNEL_BACKENDS, ids=backend_id)
def kernel_backend(request):
    """(backend name, interpret flag) for kernel tests."""
    return request.param


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    on_tpu = jax.default_backend() == "tpu"
    slow = os.environ.get("SPARSE_JAX_SLOW") == "1"
    for item in items:
        if item.get_closest_marker("gpu") and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("tpu") and not on_tpu:
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
        if item.get_closest_marker("slow") and not slow:
            item.add_marker(pytest.mark.skip(reason="slow; set SPARSE_JAX_SLOW=1"))


COMPILED_GPU = jax.default_backend() == "gpu"


def tolerance(dtype, *, interpret: bool | None = None) -> float:
    """Relative (Frobenius) error allowed vs the float32 reference. ``interpret=None``: kernels
    run compiled on a GPU (float32 dots in tf32) and interpreted elsewhere."""
    dtype = jnp.dtype(dtype)
    if interpret is None:
        interpret = not COMPILED_GPU
    if dtype == jnp.float32:
        # Compiled Triton float32 dots run in tf32 (about 3e-4 relative error).
        return 2e-5 if interpret else 2e-3
    return 2e-2


def kernel_names(exported) -> set[str]:
    """Names of the Pallas kernels in a ``jax.export`` result (its custom calls' ``name``;
    the module's source locations, which name test files, are not searched)."""
    import re
    return {name for line in exported.mlir_module().splitlines() if "stablehlo.custom_call" in line
            for name in re.findall(r'\bname = "([A-Za-z0-9_]+)"', line)}


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), "non-finite values in the output"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (denom if denom > 0 else 1.0))


def assert_close(x, ref, tol, what=""):
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def randn(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(key) if isinstance(key, int) else key, shape,
                                      jnp.float32)).astype(dtype)


@pytest.fixture(autouse=True)
def _sync_after_test():
    """``SPARSE_JAX_SYNC_AFTER_TEST=1``: wait for every live device array after each test, so no
    kernel of one test still runs while the next compiles and loads its executables (a
    diagnostic for order-dependent GPU failures; off by default)."""
    yield
    if os.environ.get("SPARSE_JAX_SYNC_AFTER_TEST") == "1":
        for a in jax.live_arrays():
            a.block_until_ready()


@pytest.fixture(autouse=True)
def _bounds_check_kernels():
    """``SPARSE_JAX_BOUNDS_CHECK=1``: run each test with every interpret-mode kernel access
    bounds-checked (:mod:`tests.pallas_bounds_check`); a lane outside its ref fails the test.
    Slow (caches are cleared per test); for sweeps, not CI."""
    if os.environ.get("SPARSE_JAX_BOUNDS_CHECK") != "1":
        yield
        return
    from tests.pallas_bounds_check import bounds_checked
    with bounds_checked() as found:
        yield
        jax.effects_barrier()
    assert not found, "out-of-bounds kernel accesses:\n" + "\n".join(str(f) for f in found[:8])
