"""When the GPU backend runs a Mosaic GPU kernel instead of its Triton twin.

Each Mosaic GPU forward has an environment switch (``auto`` | ``triton`` | ``mosaic_gpu``) and an
``unsupported(...)`` rule that names why it cannot take a problem. ``auto`` (the default) runs
Mosaic GPU on Hopper for the problems it takes; ``mosaic_gpu`` insists (an error naming the reason
when it cannot); ``triton`` and interpret mode never run it.
"""

from __future__ import annotations

import os

import jax

CHOICES = ("auto", "triton", "mosaic_gpu")


def hopper() -> bool:
    """True when the first GPU is a Hopper (sm_90: wgmma, TMA)."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return False
    return str(getattr(dev, "compute_capability", "0")).split(".")[0] == "9"


def choose(env: str, why_not, *, force_triton: bool = False) -> str:
    """'mosaic_gpu' or 'triton' under the switch ``env``.

    ``why_not``: a callable returning the Mosaic GPU kernel's reason to decline (None: it can
    run); ``force_triton``: the caller needs Triton (interpret mode, an explicit Triton config).
    """
    choice = os.environ.get(env, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{env}={choice!r}; choose auto, triton or mosaic_gpu")
    if choice == "triton" or force_triton:
        return "triton"
    why = why_not()
    if choice == "mosaic_gpu":
        if why is not None:
            raise ValueError(f"{env}=mosaic_gpu, but the Mosaic GPU kernel cannot take {why}")
        return "mosaic_gpu"
    return "mosaic_gpu" if why is None and hopper() else "triton"
