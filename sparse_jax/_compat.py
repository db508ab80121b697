"""Everything that differs between the JAX versions we support (0.11.2 through 0.12.x).

Keep version checks here and nowhere else.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# Custom-call targets of Pallas kernels; jax.export refuses them unless told otherwise.
_PALLAS_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2")

# An abstract GPU to lower Triton kernels for when no GPU is attached (Pallas asks the
# device for its compute capability at lowering time since jax 0.11).
_ABSTRACT_GPU_KIND = "NVIDIA H100 80GB HBM3"


def tpu_interpret_params(*, detect_races: bool = True, nan_init: bool = True) -> Any:
    """``pltpu.InterpretParams`` for running TPU kernels on the CPU.

    Race detection on and uninitialised memory NaN-filled, so a kernel that reads
    what it never wrote, or races between grid steps, fails loudly.
    """
    kwargs: dict[str, Any] = dict(detect_races=detect_races, uninitialized_memory="nan" if nan_init else "zero")
    if "on_race" in inspect.signature(pltpu.InterpretParams).parameters:  # jax >= 0.12
        kwargs["on_race"] = "raise"
    return pltpu.InterpretParams(**kwargs)


def has_platform(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


@contextlib.contextmanager
def abstract_gpu(kind: str = _ABSTRACT_GPU_KIND):
    """Lower Triton kernels for ``kind`` even when the host has no GPU."""
    if has_platform("gpu"):
        yield
        return
    from jax._src import mesh as mesh_lib  # AbstractDevice is not public in 0.11/0.12
    mesh = jax.sharding.AbstractMesh(
        (1,), ("_sparse_jax",), abstract_device=mesh_lib.AbstractDevice(kind, 132, "gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def export(fn: Callable, platform: str, *args, **kwargs):
    """``jax.export`` ``fn(*args, **kwargs)`` for ``platform`` ("cuda", "tpu", "cpu").

    Works without that platform attached; Pallas custom calls are allowed.
    """
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _PALLAS_CUSTOM_CALLS]
    ctx = abstract_gpu() if platform in ("cuda", "rocm") else contextlib.nullcontext()
    with ctx:
        return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args, **kwargs)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = False):
    """``jax.shard_map`` (both supported versions expose it at top level)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def triton_compiler_params(num_warps: int | None = None, num_stages: int | None = None):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics: Sequence[str] | None = None, vmem_limit_bytes: int | None = None):
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=vmem_limit_bytes)
