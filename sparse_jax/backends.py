"""Backend names and the dispatch rule every public op follows.

=============  ================================================  =====================
name           what runs                                          where
=============  ================================================  =====================
``triton``     Pallas kernels lowered through Triton              NVIDIA GPUs
``mosaic_tpu`` Pallas kernels lowered through Mosaic              TPUs
``xla``        the pure-jnp reference (``sparse_jax.reference``)  any device
=============  ================================================  =====================

``backend=None`` picks from ``jax.default_backend()`` (gpu -> triton, tpu ->
mosaic_tpu, anything else -> xla), unless the environment variable
``SPARSE_JAX_BACKEND`` names one. An explicit backend is honoured whatever the
default device is (so ``jax.export`` can lower for another platform).
``interpret=True`` runs the Pallas kernels on the CPU: the GPU kernels through
Pallas' interpreter, the TPU kernels in TPU interpret mode.
"""

from __future__ import annotations

import os

import jax

TRITON, MOSAIC_TPU, XLA = "triton", "mosaic_tpu", "xla"
BACKENDS = (TRITON, MOSAIC_TPU, XLA)
ENV_VAR = "SPARSE_JAX_BACKEND"

_DEFAULT_FOR_PLATFORM = {"gpu": TRITON, "cuda": TRITON, "tpu": MOSAIC_TPU}


def default_backend() -> str:
    """The backend ``backend=None`` resolves to right now."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        return env
    return _DEFAULT_FOR_PLATFORM.get(jax.default_backend(), XLA)


def resolve(backend: str | None, *, op: str, supported: tuple[str, ...] = BACKENDS,
            feature: str | None = None) -> str:
    """Validate ``backend`` for ``op`` and return the concrete backend name.

    Raises ValueError naming the choices when the name is unknown or the backend
    cannot run ``op`` (or ``feature`` of it).
    """
    name = default_backend() if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} for {op}; choose one of {', '.join(BACKENDS)} "
                         "(or None for the default)")
    if name not in supported:
        what = f"{op} with {feature}" if feature else op
        if backend is None and XLA in supported:
            return XLA  # the default may fall back; an explicit request may not
        raise ValueError(f"backend {name!r} cannot run {what}; supported: {', '.join(supported)}")
    return name
