"""Grouped (ragged) matmuls: validation, backend dispatch and the custom VJPs around the kernels.

Kernel backends implement two functions in ``pallas_kernels.<lowering>.grouped_matmul``::

    forward(xs, ws, group_sizes, group_offset, *, fusion, transpose_rhs, out_dtypes, interpret)
        -> tuple of [M, N]           (fusion: pallas_kernels.common.gmm_plan.Fusion)
    transposed(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, interpret)
        -> tuple of [num_groups, K, N]

Gradients (each a kernel call, no [G, M, ...] intermediate):

* ``grouped_matmul``: d lhs = gmm(d out, rhs, transpose_rhs=not transpose_rhs);
  d rhs = gmm_t(lhs, d out) (or gmm_t(d out, lhs) = [G, N, K] with transpose_rhs).
* ``grouped_matmul_t``: d lhs = gmm(grad, d out, transpose_rhs=True); d grad = gmm(lhs, d out).
* ``grouped_swiglu``: the forward (one fused kernel, or two gmm + silu*mul: a static
  per-backend rule, see the function) also writes the pre-activations g = x w_gate and
  u = x w_up (2 M F elements in x.dtype -- what the unfused gmm + gmm + silu*mul would
  save too; ``jax.checkpoint`` trades them for a recompute); the backward forms
  dg, du elementwise, then d x = dg w_gate^T + du w_up^T in ONE dual-gmm kernel and
  d w_gate, d w_up in ONE transposed kernel reading each x tile once. Recomputing g, u
  instead would cost a full forward (4 M K F flops, +50% backward work) to save
  2 M F reads and writes, e.g. 12 ms vs 1.5 ms for Mixtral at M=32768 on an H100.

Semantics shared by every backend (and ``sparse_jax.reference``): rows are sorted by
group; negative sizes count as 0 (traced data cannot raise); a sum past M is cut at
M; rows past the sum and rows of groups outside [group_offset, group_offset + G) give
zeros (and zero gradients); empty groups give zero weight gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp

from sparse_jax import _compat
from sparse_jax import backends
from sparse_jax import reference
from pallas_kernels.common import gmm_plan

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_KERNEL_MODULES = {
    backends.TRITON: "pallas_kernels.triton.grouped_matmul",
    backends.MOSAIC_TPU: "pallas_kernels.tpu.grouped_matmul",
}


# --- validation ------------------------------------------------------------------------------------
def _check_group_sizes(group_sizes, expected: int | None, what: str, at_least: bool = False):
    if not hasattr(group_sizes, "ndim") or group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be a 1-D int32 array [G]; got {getattr(group_sizes, 'shape', group_sizes)}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32; got {group_sizes.dtype}")
    if expected is not None:
        n = group_sizes.shape[0]
        if (n < expected) if at_least else (n != expected):
            need = f"at least {expected}" if at_least else f"{expected}"
            raise ValueError(f"group_sizes has {n} entries but {what} has {expected} groups (need {need})")


def _check_float(name, x, ndim):
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims; got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")


def _check_offset(group_offset):
    if group_offset is None:
        return None
    off = jnp.asarray(group_offset)
    if off.size != 1 or off.ndim > 1:
        raise ValueError(f"group_offset must be a scalar; got shape {tuple(off.shape)}")
    if not jnp.issubdtype(off.dtype, jnp.integer):
        raise ValueError(f"group_offset must be an integer; got {off.dtype}")
    return off.reshape(()).astype(jnp.int32)


def _out_dtype(preferred_element_type, default):
    if preferred_element_type is None:
        return jnp.dtype(default)
    dt = jnp.dtype(preferred_element_type)
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"preferred_element_type must be float32, bfloat16 or float16; got {dt}")
    return dt


# --- kernel plumbing -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Static:
    backend: str
    interpret: bool
    transpose_rhs: bool = False
    out_dtype: Any = None
    fused: bool = True  # grouped_swiglu's forward: one fused kernel, or two gmm + silu*mul
    row_align: int = 1  # the caller's promise: every group size is a multiple of it

    @property
    def kernel(self):
        return importlib.import_module(_KERNEL_MODULES[self.backend])

    @property
    def interpret_arg(self):
        if not self.interpret:
            return False
        return _compat.tpu_interpret_params() if self.backend == backends.MOSAIC_TPU else True

    def forward(self, xs, ws, gs, off, *, fusion, transpose_rhs, out_dtypes):
        return self.kernel.forward(tuple(xs), tuple(ws), gs, off, fusion=fusion, transpose_rhs=transpose_rhs,
                                   out_dtypes=list(out_dtypes), row_align=self.row_align,
                                   interpret=self.interpret_arg)

    def transposed(self, lhs, rhs, gs, off, *, num_groups, out_dtype):
        return self.kernel.transposed(lhs, tuple(rhs), gs, off, num_groups=num_groups, out_dtype=out_dtype,
                                      interpret=self.interpret_arg)


def _gmm_call(static, lhs, rhs, gs, off):
    return static.forward([lhs], [rhs], gs, off, fusion=gmm_plan.GMM, transpose_rhs=static.transpose_rhs,
                          out_dtypes=[static.out_dtype])[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(static, lhs, rhs, gs, off):
    return _gmm_call(static, lhs, rhs, gs, off)


def _gmm_fwd(static, lhs, rhs, gs, off):
    return _gmm_call(static, lhs, rhs, gs, off), (lhs, rhs, gs, off)


def _gmm_bwd(static, res, dout):
    lhs, rhs, gs, off = res
    t = static.transpose_rhs
    dlhs = static.forward([dout.astype(rhs.dtype)], [rhs], gs, off, fusion=gmm_plan.GMM, transpose_rhs=not t,
                          out_dtypes=[lhs.dtype])[0]
    dout = dout.astype(lhs.dtype)
    a, b = (dout, lhs) if t else (lhs, dout)
    drhs = static.transposed(a, [b], gs, off, num_groups=rhs.shape[0], out_dtype=rhs.dtype)[0]
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _tgmm_call(static, lhs, grad, gs, off, num_groups):
    return static.transposed(lhs, [grad], gs, off, num_groups=num_groups, out_dtype=static.out_dtype)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _tgmm(static, lhs, grad, gs, off, num_groups):
    return _tgmm_call(static, lhs, grad, gs, off, num_groups)


def _tgmm_fwd(static, lhs, grad, gs, off, num_groups):
    return _tgmm_call(static, lhs, grad, gs, off, num_groups), (lhs, grad, gs, off)


def _tgmm_bwd(static, num_groups, res, dout):
    lhs, grad, gs, off = res
    gmm = functools.partial(static.forward, fusion=gmm_plan.GMM)
    dlhs = gmm([grad], [dout.astype(grad.dtype)], gs, off, transpose_rhs=True, out_dtypes=[lhs.dtype])[0]
    dgrad = gmm([lhs], [dout.astype(lhs.dtype)], gs, off, transpose_rhs=False, out_dtypes=[grad.dtype])[0]
    return dlhs, dgrad, None, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _swiglu_forward(static, x, wg, wu, gs, off, save: bool):
    """(h,) or (h, g, u) in x.dtype: the fused kernel, or two gmm launches and silu(g) * u in XLA."""
    if static.fused:
        fusion = gmm_plan.SWIGLU_SAVE if save else gmm_plan.SWIGLU
        return static.forward([x], [wg, wu], gs, off, fusion=fusion, transpose_rhs=False,
                              out_dtypes=[x.dtype] * fusion.num_out)
    g, u = (static.forward([x], [w], gs, off, fusion=gmm_plan.GMM, transpose_rhs=False, out_dtypes=[x.dtype])[0]
            for w in (wg, wu))
    h = (gmm_plan.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype)
    return (h, g, u) if save else (h,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu(static, x, wg, wu, gs, off):
    return _swiglu_forward(static, x, wg, wu, gs, off, save=False)[0]


def _swiglu_fwd(static, x, wg, wu, gs, off):
    h, g, u = _swiglu_forward(static, x, wg, wu, gs, off, save=True)
    return h, (x, wg, wu, g, u, gs, off)


def _swiglu_bwd(static, res, dh):
    x, wg, wu, g, u, gs, off = res
    dg, du = (d.astype(x.dtype) for d in gmm_plan.swiglu_grads(g, u, dh))
    dx = static.forward([dg, du], [wg, wu], gs, off, fusion=gmm_plan.DUAL_GMM, transpose_rhs=True,
                        out_dtypes=[x.dtype])[0]
    dwg, dwu = static.transposed(x, [dg, du], gs, off, num_groups=wg.shape[0], out_dtype=wg.dtype)
    return dx, dwg, dwu, None, None


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def check_row_align(row_align) -> int:
    """``row_align`` if it is a positive Python int, else a ValueError."""
    if not isinstance(row_align, int) or isinstance(row_align, bool) or row_align < 1:
        raise ValueError(f"row_align must be a positive Python int; got {row_align!r}")
    return row_align


def preferred_row_alignment(dtype, k: int, n: int, *, backend: str | None = None, interpret: bool = False) -> int:
    """Group alignment (rows) under which the backend's forward of [*, k] x [G, k, n] is fastest.

    8 where the backend would run a forward that needs groups starting at 8-row boundaries (the
    Mosaic GPU forward on Hopper, today only when ``SPARSE_JAX_GPU_GMM_FWD=mosaic_gpu`` asks for
    it), 1 elsewhere. A caller that can lay its groups out that way (the MoE layer's padded
    dispatch) passes the result as ``row_align``.
    """
    backend = backends.resolve(backend, op="grouped_matmul")
    if backend == backends.XLA:
        return 1
    rule = getattr(importlib.import_module(_KERNEL_MODULES[backend]), "preferred_row_alignment", None)
    return 1 if rule is None else int(rule(jnp.dtype(dtype), k, n, interpret=bool(interpret)))


def _degenerate(*dims) -> bool:
    """Shapes with a zero extent go to the reference (nothing for a kernel to do)."""
    return any(d == 0 for d in dims)


# --- public ops ------------------------------------------------------------------------------------
def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, group_offset=None,
                   preferred_element_type=None, row_align: int = 1, backend: str | None = None,
                   interpret: bool = False):
    """Ragged matmul: out[r] = lhs[r] @ rhs[group(r)] with rows sorted by group.

    Args:
      lhs: [M, K] float32/bfloat16/float16.
      rhs: [G, K, N] ([G, N, K] with ``transpose_rhs``); a different float dtype than lhs is
        promoted (both operands go to the kernel in one dtype).
      group_sizes: int32 [G] (or [G_total] with ``group_offset``). Negative entries count as 0;
        a sum past M is cut at M.
      group_offset: scalar int (traced is fine): rhs holds groups [offset, offset + G) of
        group_sizes (expert parallelism); rows of other groups are zeros.
      preferred_element_type: output dtype (default lhs.dtype); accumulation is float32.
      row_align: the caller's promise that every group size is a multiple of it (see
        :func:`preferred_row_alignment`). With 8 on Hopper the forward may run the Mosaic GPU
        kernel; there a group that breaks the promise makes the whole output NaN (never rows of
        another group).
      backend: "triton", "mosaic_tpu", "xla" or None (see :mod:`sparse_jax.backends`).
      interpret: run the Pallas kernels on the CPU.

    Returns:
      [M, N]; rows past sum(group_sizes) and rows of non-local groups are zeros.
      Differentiable in lhs and rhs (custom VJP, see the module docstring).
    """
    _check_float("lhs", lhs, 2)
    _check_float("rhs", rhs, 3)
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(f"contracting dims differ: lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)} "
                         f"(transpose_rhs={transpose_rhs})")
    off = _check_offset(group_offset)
    if off is None:
        _check_group_sizes(group_sizes, rhs.shape[0], "rhs")
    else:
        _check_group_sizes(group_sizes, rhs.shape[0], "rhs", at_least=True)
    out_dtype = _out_dtype(preferred_element_type, lhs.dtype)
    row_align = check_row_align(row_align)
    backend = backends.resolve(backend, op="grouped_matmul")
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if backend == backends.XLA or _degenerate(lhs.shape[0], lhs.shape[1], n, rhs.shape[0]):
        return reference.grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, group_offset=off,
                                        preferred_element_type=out_dtype)
    dt = jnp.promote_types(lhs.dtype, rhs.dtype)
    static = _Static(backend, bool(interpret), bool(transpose_rhs), out_dtype, row_align=row_align)
    return _gmm(static, lhs.astype(dt), rhs.astype(dt), group_sizes, off)


def grouped_matmul_t(lhs, grad, group_sizes, *, num_groups: int | None = None, group_offset=None,
                     preferred_element_type=None, backend: str | None = None, interpret: bool = False):
    """Weight gradient of grouped_matmul: out[g] = lhs[rows of g].T @ grad[rows of g].

    Args:
      lhs: [M, K]; grad: [M, N] (float32/bfloat16/float16; promoted to one dtype).
      group_sizes: int32 [G_total].
      num_groups: groups to compute, G (default G_total); with ``group_offset`` the groups
        [offset, offset + G) (groups past G_total are empty).
      preferred_element_type: output dtype (default lhs.dtype).

    Returns:
      [G, K, N]; empty groups give zeros. Differentiable in lhs and grad.
    """
    _check_float("lhs", lhs, 2)
    _check_float("grad", grad, 2)
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"lhs {tuple(lhs.shape)} and grad {tuple(grad.shape)} must have the same rows")
    _check_group_sizes(group_sizes, None, "")
    off = _check_offset(group_offset)
    if num_groups is not None and (not isinstance(num_groups, int) or num_groups < 0):
        raise ValueError(f"num_groups must be a non-negative Python int; got {num_groups!r}")
    G = group_sizes.shape[0] if num_groups is None else num_groups
    out_dtype = _out_dtype(preferred_element_type, lhs.dtype)
    backend = backends.resolve(backend, op="grouped_matmul_t")
    if backend == backends.XLA or _degenerate(lhs.shape[0], lhs.shape[1], grad.shape[1], G):
        return reference.grouped_matmul_t(lhs, grad, group_sizes, num_groups=G, group_offset=off,
                                          preferred_element_type=out_dtype)
    dt = jnp.promote_types(lhs.dtype, grad.dtype)
    static = _Static(backend, bool(interpret), False, out_dtype)
    return _tgmm(static, lhs.astype(dt), grad.astype(dt), group_sizes, off, G)


def grouped_swiglu(x, w_gate, w_up, group_sizes, *, group_offset=None, fused: bool | None = None,
                   row_align: int = 1, backend: str | None = None, interpret: bool = False):
    """Gate + up projection of a SwiGLU expert FFN: silu(x @ w_gate[g]) * (x @ w_up[g]).

    Args:
      x: [M, K]; w_gate, w_up: [G, K, F] (float32/bfloat16/float16; promoted to one dtype).
      group_sizes: int32 [G] (or [G_total] with ``group_offset``), as in :func:`grouped_matmul`.
      fused: forward as ONE kernel (both products from one read of each x tile, SiLU in
        registers; True) or two gmm kernels + silu * mul (False). None: the backend's static
        rule from the shapes -- GPU: fused only at <= 64 mean rows per group (M / G) with
        F >= 8192, where the H100 measurements saw it win (memory-bound, wide F); elsewhere two
        gmm were as fast or faster (``pallas_kernels.triton.grouped_matmul.fuse_swiglu``,
        benchmarks/notes/grouped_matmul.md), and always where the Mosaic GPU forward runs
        (aligned groups on Hopper). TPU: fused (not measured yet). Both forwards save the same
        g, u, and the backward is the same (one dual gmm, one two-output gmm_t).
      row_align: as in :func:`grouped_matmul`.

    Returns:
      [M, F] in x.dtype. Differentiable in x, w_gate and w_up (see the module docstring).
    """
    _check_float("x", x, 2)
    _check_float("w_gate", w_gate, 3)
    _check_float("w_up", w_up, 3)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must match")
    if x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w_gate {tuple(w_gate.shape)} disagree on K")
    off = _check_offset(group_offset)
    if off is None:
        _check_group_sizes(group_sizes, w_gate.shape[0], "w_gate")
    else:
        _check_group_sizes(group_sizes, w_gate.shape[0], "w_gate", at_least=True)
    row_align = check_row_align(row_align)
    backend = backends.resolve(backend, op="grouped_swiglu")
    if backend == backends.XLA or _degenerate(x.shape[0], x.shape[1], w_gate.shape[2], w_gate.shape[0]):
        return reference.grouped_swiglu(x, w_gate, w_up, group_sizes, group_offset=off)
    dt = jnp.promote_types(jnp.promote_types(x.dtype, w_gate.dtype), w_up.dtype)
    if fused is None:
        rule = getattr(importlib.import_module(_KERNEL_MODULES[backend]), "fuse_swiglu", None)
        fused = True if rule is None else rule(x.shape[0], w_gate.shape[0], x.shape[1], w_gate.shape[2],
                                               dtype=jnp.dtype(dt), row_align=row_align)
    static = _Static(backend, bool(interpret), fused=bool(fused), row_align=row_align)
    return _swiglu(static, x.astype(dt), w_gate.astype(dt), w_up.astype(dt), group_sizes, off).astype(x.dtype)
