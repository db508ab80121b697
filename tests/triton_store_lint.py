"""Static check of Pallas-Triton kernels for accesses past a block's array (the CPU cannot run them).

Pallas-Triton turns a ref access into raw pointer arithmetic with no bounds check: when a
BlockSpec's block is larger than the array along a dimension (e.g. 16 head rows over 4
heads, 128 columns over 96), or does not divide it (a ragged last block), the lanes past
the array address the *neighbouring* memory (other heads, other tokens, or past the
buffer). An unmasked store there overwrites live data -- a race the interpreter never
shows, because interpret mode pads every block with scratch memory.

:func:`check` traces a function, finds every ``pallas_call`` and reports each access to a
ref whose block overhangs its array that is not masked: ``ref[...]`` reads and writes
(state ``get`` / ``swap`` / ``addupdate``), ``plgpu.load`` / ``plgpu.store`` without
``mask``, and atomics without ``mask``. A mask's *content* is not verified (the kernels'
numerical tests do that); its absence on an overhanging ref is always a bug or a fault
waiting for the last block.
"""

from __future__ import annotations

import dataclasses

import jax
from jax._src import core as jax_core
from jax._src.pallas import core as pallas_core

_STATE_ACCESS = {"get", "swap", "addupdate"}
_MASKED_ACCESS = {"masked_load": 2, "masked_swap": 3, "atomic_rmw": 3, "atomic_add_relaxed": 3}  # mask's position


@dataclasses.dataclass
class Finding:
    kernel: str
    ref: str
    primitive: str
    overhang: str

    def __str__(self):
        return f"{self.kernel}: {self.primitive} on {self.ref} without a mask ({self.overhang})"


def _overhang(bm) -> str | None:
    dims = []
    for d, (a, b) in enumerate(zip(bm.array_aval.shape, bm.block_shape)):
        if isinstance(b, pallas_core.Squeezed) or b is None:
            continue
        size = pallas_core.get_block_size(b)
        if size > a or a % size:
            dims.append(f"dim {d}: block {size} over {a}")
    return "; ".join(dims) or None


def _sub_jaxprs(eqn):
    """(sub-jaxpr, outer invars feeding its invars) pairs of a control-flow equation."""
    p, name = eqn.params, eqn.primitive.name
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_in, body_in, carry = eqn.invars[:nc], eqn.invars[nc:nc + nb], eqn.invars[nc + nb:]
        return [(p["cond_jaxpr"].jaxpr, cond_in + carry), (p["body_jaxpr"].jaxpr, body_in + carry)]
    if name == "cond":
        return [(br.jaxpr, eqn.invars[1:]) for br in p["branches"]]
    out = []
    for j in jax_core.jaxprs_in_params(p):  # jit, custom_vjp_call, scan...: operands map one to one
        j = j.jaxpr  # (jax < 0.12: the Jaxpr inside a ClosedJaxpr; since: the Jaxpr itself)
        if len(j.invars) == len(eqn.invars):
            out.append((j, eqn.invars))
    return out


def _walk_kernel(jaxpr, watched: dict, kernel: str, findings: list):
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _STATE_ACCESS or name in _MASKED_ACCESS:
            ref = eqn.invars[0]
            if ref in watched:
                masked = False
                if name in _MASKED_ACCESS:
                    parts = eqn.params["args_tree"].unflatten(eqn.invars)
                    masked = parts[_MASKED_ACCESS[name]] is not None
                if not masked:
                    label, why = watched[ref]
                    findings.append(Finding(kernel, label, name, why))
        for sub, outer in _sub_jaxprs(eqn):
            inner = {iv: watched[ov] for iv, ov in zip(sub.invars, outer)
                     if isinstance(ov, jax_core.Var) and ov in watched}
            if inner:
                _walk_kernel(sub, inner, kernel, findings)


def _find_calls(jaxpr, findings: list):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            gm = eqn.params["grid_mapping"]
            kernel = eqn.params["jaxpr"]
            info = eqn.params.get("name_and_src_info")
            name = getattr(info, "name", None) or "pallas_call"
            refs = kernel.invars[gm.num_index_operands:]
            watched = {}
            for i, (var, bm) in enumerate(zip(refs, gm.block_mappings)):
                why = _overhang(bm)
                if why:
                    watched[var] = (f"operand {i} ({bm.origin})", why)
            _walk_kernel(kernel, watched, name, findings)
            continue
        for sub in jax_core.jaxprs_in_params(eqn.params):
            _find_calls(sub, findings)


def check(fn, *args) -> list[Finding]:
    """Findings (empty when clean) for every Pallas-Triton call that ``fn(*args)`` traces."""
    findings: list[Finding] = []
    _find_calls(jax.make_jaxpr(fn)(*args).jaxpr, findings)
    return findings
