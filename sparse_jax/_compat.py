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


_RELAXED_ADD_P = None


def _relaxed_atomic_add_primitive():
    """A Pallas-Triton ``atomic_add`` with relaxed memory order (``plgpu.atomic_add`` is acquire-release).

    Acquire-release puts a ``MEMBAR.GPU`` before every atomic instruction, which serialises a
    thread's scatter-adds on their L2 round trips. Reductions into a buffer that nothing reads
    before the kernel ends need only atomicity. Same abstract evaluation and interpret-mode
    discharge as ``atomic_rmw``; only the Triton lowering's memory semantic differs.
    """
    global _RELAXED_ADD_P
    if _RELAXED_ADD_P is not None:
        return _RELAXED_ADD_P
    from jax._src import core as jax_core
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as tl
    from jax._src.pallas.triton import primitives as tp
    from jax._src.state import discharge as state_discharge
    from jax._src.state import indexing

    add = tp.AtomicOpType.ADD
    prim = jax_core.Primitive("atomic_add_relaxed")
    prim.def_effectful_abstract_eval(lambda *avals, args_tree: tp._atomic_abstract_eval(
        *avals, args_tree=args_tree, atomic_type=add))
    state_discharge.register_discharge_rule(prim)(lambda ctx, *args, args_tree: tp._atomic_rmw_discharge_rule(
        ctx, *args, args_tree=args_tree, atomic_type=add))

    @tl.register_lowering(prim)
    def _lower(ctx, *args_flat, args_tree):
        ptr, indexers, val, mask = args_tree.unflatten(args_flat)
        *_, val_aval, mask_aval = args_tree.unflatten(ctx.avals_in)
        indexers = list(indexers)
        if not indexers or not isinstance(indexers[-1], indexing.NDIndexer):
            ref_aval = ctx.avals_in[0]
            indexers.append(indexing.NDIndexer.make_trivial_indexer(ref_aval.shape))
        if len(indexers) != 1:
            raise NotImplementedError("atomic_add_relaxed: one indexer only")
        ptr = tl._compute_pointers_from_indices(ptr, ctx.block_infos[0], indexers[0])
        # jax >= 0.12 also returns a bounds mask for blocks that overhang their array.
        ptr, bounds = ptr if isinstance(ptr, tuple) else (ptr, None)
        shape = indexers[0].get_indexer_shape_static()
        val = tl._bcast_to(tl._ensure_ir_value(val, val_aval), shape)
        mask = None if mask is None else tl._bcast_to(tl._ensure_ir_value(mask, mask_aval), shape)
        if bounds is not None:
            from jax._src.lib.mlir.dialects import arith
            mask = bounds if mask is None else arith.andi(mask, bounds)
        op = tt_dialect.RMWOp.FADD if jax.numpy.issubdtype(val_aval.dtype, jax.numpy.floating) else tt_dialect.RMWOp.ADD
        return tl._atomic_rmw(op, ptr, val, mask=mask, semantic=tt_dialect.MemSemantic.RELAXED)

    _RELAXED_ADD_P = prim
    return prim


def triton_atomic_add(ref, idx, val, *, relaxed: bool = True):
    """``ref[idx] += val`` atomically inside a Pallas-Triton kernel (no mask: give masked lanes
    their own spare addresses). ``relaxed=False`` is ``plgpu.atomic_add`` (acquire-release)."""
    from jax.experimental.pallas import triton as plgpu
    if not relaxed:
        return plgpu.atomic_add(ref, idx, val)
    from jax._src.state import primitives as state_primitives
    ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "atomic_add_relaxed")
    args, tree = jax.tree_util.tree_flatten((ref, transforms, val, None))
    return _relaxed_atomic_add_primitive().bind(*args, args_tree=tree)
