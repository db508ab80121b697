"""Runtime bounds check of Pallas kernels in interpret mode: no unmasked lane may leave its ref.

Compiled, a Pallas-Triton access is raw pointer arithmetic: a lane whose index falls
outside the kernel's block reads or writes whatever lies there (a neighbouring block,
another buffer, an executable's constants). Interpret mode cannot show it, because its
discharge rules turn accesses into ``dynamic_slice`` / ``dynamic_update_slice``, which
*clamp* the start and touch valid memory. :func:`bounds_checked` wraps those discharge
rules: for every load, store and atomic (``ref[...]``, ``plgpu.load/store``, atomics) it
composes the ref's chain of indexers into per-lane coordinates of the kernel's ref, and
records every lane that is outside the ref and not masked off. Unlike
:mod:`tests.triton_store_lint` (static: blocks overhanging their arrays), this sees
data-dependent addresses: table entries, permutations, computed gathers, ``pl.ds``
windows past the end.

    with bounds_checked() as found:
        jax.block_until_ready(f(*args))      # interpret=True kernels
    assert not found, found

Accesses through non-indexer transforms (bitcasts, reshapes) are counted in
``found.unchecked`` and not verified.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.pallas import hlo_interpreter
from jax._src.state import discharge as state_discharge
from jax._src.state import indexing

from sparse_jax import _compat

# Ref-access primitives whose discharge rules get wrapped (state get/swap/addupdate, Pallas masked
# load/store, Triton atomics, our relaxed atomic add).
_KINDS = ("get", "swap", "addupdate", "masked_load", "masked_swap", "atomic_rmw", "atomic_add_relaxed")


@dataclasses.dataclass
class Violation:
    kernel: str
    primitive: str
    ref_shape: tuple
    lanes: int
    example: tuple

    def __str__(self):
        return (f"{self.kernel}: {self.primitive} on a ref of shape {self.ref_shape}: {self.lanes} unmasked "
                f"lane(s) outside it, e.g. at {self.example}")


class Findings(list):
    unchecked: int = 0  # accesses through transforms this checker does not model
    checked: int = 0  # accesses instrumented (at trace time)


def _axes_layout(idx: indexing.NDIndexer):
    """(output axis of each slice dim, output axes of the int block) of an NDIndexer."""
    is_int = [not isinstance(s, indexing.Slice) for s in idx.indices]
    n_int = len(idx.int_indexer_shape)
    pos_int = [i for i, b in enumerate(is_int) if b]
    contiguous = bool(np.all(np.diff(pos_int) == 1)) if pos_int else True
    start = (sum(1 for b in is_int[:pos_int[0]] if not b) if contiguous else 0) if pos_int else 0
    int_axes = list(range(start, start + n_int)) if pos_int else []
    slice_axes, a = {}, 0
    for d, b in enumerate(is_int):
        if b:
            continue
        if a == start and pos_int:
            a += n_int
        slice_axes[d] = a
        a += 1
    return slice_axes, int_axes


def _view_coords(idx: indexing.NDIndexer, out_coords):
    """Coordinates in idx's source of the lanes whose coordinates in idx's output are out_coords."""
    slice_axes, int_axes = _axes_layout(idx)
    src = []
    for d, s in enumerate(idx.indices):
        if isinstance(s, indexing.Slice):
            src.append(jnp.asarray(s.start, jnp.int32) + s.stride * out_coords[slice_axes[d]])
        else:
            arr = jnp.broadcast_to(jnp.asarray(s, jnp.int32), tuple(idx.int_indexer_shape))
            if arr.ndim == 0:
                src.append(jnp.broadcast_to(arr, out_coords[0].shape if out_coords else ()))
            else:
                at = tuple(jnp.clip(out_coords[a], 0, n - 1) for a, n in zip(int_axes, arr.shape))
                src.append(arr[at])
    return src


def _lane_coords(transforms, ref_shape, out_shape):
    """Per-dimension coordinates (arrays of out_shape) in the base ref, or None if unsupported."""
    if not all(isinstance(t, indexing.NDIndexer) for t in transforms):
        return None
    coords = [jax.lax.broadcasted_iota(jnp.int32, out_shape, a) for a in range(len(out_shape))]
    for idx in reversed(transforms):
        coords = [jnp.broadcast_to(c, out_shape) for c in _view_coords(idx, coords)]
    if len(coords) != len(ref_shape):
        return None
    return coords


def _check(findings, kernel, prim, ref_aval, transforms, mask, out_shape):
    ref_shape = tuple(ref_aval.shape)
    if not transforms:
        return
    coords = _lane_coords(list(transforms), ref_shape, tuple(out_shape))
    if coords is None:
        findings.unchecked += 1
        return
    findings.checked += 1
    bad = jnp.zeros(tuple(out_shape), bool)
    for c, n in zip(coords, ref_shape):
        bad = bad | (c < 0) | (c >= n)
    if mask is not None:
        bad = bad & jnp.broadcast_to(mask, tuple(out_shape))
    count = jnp.sum(bad.astype(jnp.int32))
    first = jnp.argmax(bad.reshape(-1)) if bad.size else jnp.int32(0)
    example = jnp.stack([c.reshape(-1)[first] for c in coords]) if bad.size else jnp.zeros((len(coords),), jnp.int32)

    def record(count, example):
        if int(count):
            findings.append(Violation(kernel, prim, ref_shape, int(count), tuple(int(e) for e in example)))

    jax.debug.callback(record, count, example)


def _wrap(prim_name, rule, findings, current):
    def checked(ctx, *args, **params):
        ref_aval = ctx.in_avals[0]
        try:
            if prim_name in ("get", "swap", "addupdate"):
                n_lead = 1 if prim_name == "get" else 2
                transforms = jax.tree_util.tree_unflatten(params["tree"], args[n_lead:])
                mask = None
            else:
                parts = params["args_tree"].unflatten(args)
                transforms = parts[1]
                mask = parts[3] if prim_name != "masked_load" else parts[2]
            transforms = list(transforms)
            view = ref_aval
            for t in transforms:
                view = t.transform_type(view)
            out_shape = tuple(view.shape)
        except Exception:  # an access this checker does not understand: count it, do not guess
            findings.unchecked += 1
            return rule(ctx, *args, **params)
        _check(findings, current[0], prim_name, ref_aval, transforms, mask, out_shape)
        return rule(ctx, *args, **params)
    return checked


@contextlib.contextmanager
def bounds_checked():
    """Wrap the discharge rules of every ref access; yields the list violations are appended to
    when the traced programs run. Caches are cleared on entry and exit, so programs traced
    inside are traced with the checks and programs traced later without them."""
    findings = Findings()
    current = ["?"]
    if hasattr(_compat, "_relaxed_atomic_add_primitive"):
        _compat._relaxed_atomic_add_primitive()  # registered lazily: make it exist before wrapping
    rules = state_discharge._discharge_rules
    saved = {p: r for p, r in rules.items() if p.name in _KINDS}
    interp = hlo_interpreter.pallas_call_hlo_interpret

    def named_interpret(*args, **params):
        info = params.get("name_and_src_info")
        current[0] = getattr(info, "name", None) or "pallas_call"
        return interp(*args, **params)

    jax.clear_caches()
    for p, r in saved.items():
        rules[p] = _wrap(p.name, r, findings, current)
    hlo_interpreter.pallas_call_hlo_interpret = named_interpret
    try:
        yield findings
    finally:
        rules.update(saved)
        hlo_interpreter.pallas_call_hlo_interpret = interp
        jax.clear_caches()
