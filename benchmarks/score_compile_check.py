#!/usr/bin/env python3
"""Compile the Triton block-score kernel for an H100 (sm_90a) on a machine without a GPU.

Pallas lowers the kernel to Triton IR for an abstract H100 (``_compat.export``); the pip
Triton then runs the pass pipeline the GPU runs and reports the shared memory it
allocates (the number the GPU's launch checks against 227 KB), registers, spills and
whether wgmma is emitted. The compile half runs in an interpreter that has ``triton``
(``--triton-python``; sparse-jax's own venv need not have it), through
``benchmarks/triton_compile.py``.

    python -m venv /tmp/tritonvenv && /tmp/tritonvenv/bin/pip install triton==3.6.0
    PYTHONPATH=. python benchmarks/score_compile_check.py --triton-python /tmp/tritonvenv/bin/python [--sweep]

Prints one line per (D, dtype, config): Triton's shared memory next to
:func:`pallas_kernels.triton.block_scores.smem_bytes` (the model the unit test checks),
and exits non-zero when a default config does not fit or the model underestimates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.triton import block_scores as K  # noqa: E402
from benchmarks import triton_compile  # noqa: E402

SMEM_LIMIT = K.SMEM_LIMIT


def capture(out_dir: str, cases) -> list[dict]:
    """Lower each (label, D, dtype, block, stride, config) and write <label>.ttir / .json."""
    from benchmarks import triton_ir
    from sparse_jax import _compat
    rows = []
    for label, d, dtype, block, stride, cfg in cases:
        q = jax.ShapeDtypeStruct((1, 4096, 2, d), dtype)
        k = jax.ShapeDtypeStruct((1, 4096, 1, d), dtype)
        with triton_ir.captured() as texts:
            _compat.export(lambda q, k: K.partials(q, k, block_size=block, stride=stride, scale=0.1, causal=True,
                                                   config=cfg)[:2], "cuda", q, k)
        eff = K.effective_config(cfg, block // stride)
        meta = dict(num_warps=eff.num_warps, num_stages=eff.num_stages, D=d, dtype=jnp.dtype(dtype).name,
                    block=block, stride=stride, block_m=eff.block_m, block_n=eff.block_n,
                    model_smem=K.smem_bytes(eff, d, jnp.dtype(dtype).itemsize))
        triton_ir.write_kernel(os.path.join(out_dir, label), texts[-1], meta)
        rows.append(dict(kernel=label, **meta))
    return rows


def default_cases(sweep: bool):
    out = []
    for d in (64, 128, 256):
        for dtype in (jnp.bfloat16, jnp.float32):
            for block, stride in ((128, 8), (128, 16), (64, 4), (128, 1)):
                tag = f"default_D{d}_{jnp.dtype(dtype).name}_b{block}s{stride}"
                choice = K.launch_config(d, dtype, block // stride)
                if choice is None:  # nothing fits: the selection scores with the XLA path instead
                    print(f"--  {tag}: no config fits shared memory (XLA path)")
                    continue
                cfg, compute = choice  # float32 too wide for any config is scored in bfloat16
                out.append((tag, d, compute, block, stride, cfg))
    if sweep:
        for cfg in K.sweep_configs(128, 2, 16):
            tag = f"bm{cfg.block_m}bn{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}{'f' if cfg.flat else 'n'}"
            out.append((f"sweep_D128_bf16_{tag}", 128, jnp.bfloat16, 128, 8, cfg))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--triton-python", default=sys.executable)
    p.add_argument("--sweep", action="store_true", help="also the configs tune_selection.py sweeps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="score_ttir_")
    os.makedirs(out, exist_ok=True)
    capture(out, default_cases(args.sweep))
    rows, r = triton_compile.run(args.triton_python, out)
    bad = 0
    for row in rows:
        smem = row.get("smem")
        ok = smem is not None and smem <= SMEM_LIMIT and smem <= row["model_smem"] and not row.get("spill_st")
        default = row["kernel"].startswith("default")
        bad += default and not ok
        print(f"{'ok ' if ok else 'BAD'} {row['kernel']:<44} smem={smem} model={row['model_smem']} "
              f"regs={row.get('regs')} spill={row.get('spill_st')} wgmma={row.get('wgmma')} "
              f"mma_sync={row.get('mma_sync')} {row.get('error', '')[:200]}")
    if r.returncode or not r.stdout.strip():
        print(r.stderr[-3000:], file=sys.stderr)
        return 2
    print(f"Triton IR, PTX, SASS in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
