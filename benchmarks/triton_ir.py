"""Capture the Triton IR that Pallas' Triton lowering emits, for offline compile checks.

The compile-check scripts (``attention_ptx_local.py``, ``gmm_compile_check.py``,
``indexed_compile_check.py``, ``score_compile_check.py``) lower kernels for an abstract
H100 with ``jax.export`` and hand each kernel's Triton IR to the pip Triton compiler.
Needs jax (imported lazily, so the compile-only side of those scripts does not).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Iterator

# How a Pallas-Triton custom call names its kernel and launch options in the lowered module.
_CALL = re.compile(r'name = "([^"]*)", num_stages = (\d+) : i32, num_warps = (\d+)')


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """Collects the Triton IR text of every ``pallas_call`` lowered inside the block, in order."""
    from jax._src.pallas.triton import lowering

    texts: list[str] = []
    original = lowering.lower_jaxpr_to_triton_module

    def spy(*a, **kw):
        result = original(*a, **kw)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield texts
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def kernel_calls(module_text: str, texts: list[str]) -> list[tuple[str, str, int, int]]:
    """(kernel name, Triton IR, num_warps, num_stages) of each Pallas call in a lowered module,
    paired in order with the IR texts :func:`captured` collected while lowering it."""
    return [(name, ir, int(warps), int(stages))
            for ir, (name, stages, warps) in zip(texts, _CALL.findall(module_text))]


def write_kernel(base: str, ttir: str, meta: dict) -> None:
    """``<base>.ttir`` (the IR) and ``<base>.json`` (num_warps, num_stages, ...), the layout
    ``attention_ptx_local.compile_dir`` reads."""
    with open(base + ".ttir", "w") as f:
        f.write(ttir)
    with open(base + ".json", "w") as f:
        json.dump(meta, f)
