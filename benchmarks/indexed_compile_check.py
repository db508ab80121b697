#!/usr/bin/env python3
"""Compile every indexed-attention / indexer Triton kernel for an H100 (sm_90a) without a GPU.

    python -m venv /tmp/tritonvenv && /tmp/tritonvenv/bin/pip install triton==3.6.0   # dev tool only
    PYTHONPATH=. python benchmarks/indexed_compile_check.py --triton-python /tmp/tritonvenv/bin/python

``_compat.export(..., "cuda")`` only builds the Triton IR; Triton's own MLIR verifier and
passes run in XLA's GPU compiler. Round 1 on the H100 failed there (``scf.for`` bounds of
mixed types) although the CPU export passed. This script captures the IR of each kernel
(the cases below: the shipped defaults and what ``tune_indexed.py`` runs) and compiles it
with the pip Triton through ``benchmarks/triton_compile.py`` (verifier,
TTGIR, PTX, ptxas), printing registers, spills, shared memory, wgmma vs mma.sync and the
atomics' memory ordering (``MEMBAR`` count in the SASS). Exits 1 when a kernel fails to
compile, spills, or exceeds shared memory.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks import triton_compile  # noqa: E402

SMEM_LIMIT = 232448


def _cases():
    """(tag, function, abstract args, config overrides)."""
    import jax
    import jax.numpy as jnp

    import sparse_jax as sj
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16

    def attn(op, B, Sq, Skv, Hq, Hkv, D, Dv, n, dtype=bf, **kw):
        idx = jnp.zeros((B, Sq, Hkv, n), jnp.int32)

        def f(q, k, v, do):
            o, pull = jax.vjp(lambda q, k, v: op(q, k, v, idx, backend="triton", **kw), q, k, v)
            return o, pull(do)
        return f, (sd((B, Sq, Hq, D), dtype), sd((B, Skv, Hkv, D), dtype), sd((B, Skv, Hkv, Dv), dtype),
                   sd((B, Sq, Hq, Dv), dtype))

    tok, blk = sj.indexed_attention, sj.indexed_block_attention
    out = [
        ("tok_g64", *attn(tok, 1, 64, 4096, 64, 1, 128, 128, 256, unique_indices=True), {}),
        ("tok_g64_acqrel", *attn(tok, 1, 64, 4096, 64, 1, 128, 128, 256, unique_indices=True),
         dict(relaxed_atomics=False)),
        ("tok_g64_bn64_w8", *attn(tok, 1, 64, 4096, 64, 1, 128, 128, 256, unique_indices=True),
         dict(bwd_BN=64, bwd_warps=8)),
        ("tok_g64_bn32_w4", *attn(tok, 1, 64, 4096, 64, 1, 128, 128, 256, unique_indices=True),
         dict(bwd_BN=32, bwd_warps=4)),
        ("tok_g64_t2", *attn(tok, 1, 64, 4096, 64, 1, 128, 128, 256, unique_indices=True, query_tile=2), {}),
        ("tok_mla_d192", *attn(tok, 1, 64, 4096, 64, 1, 192, 128, 256, unique_indices=True), {}),
        ("tok_g4", *attn(tok, 1, 64, 4096, 32, 8, 128, 128, 256, unique_indices=True), {}),
        ("tok_g4_t4", *attn(tok, 1, 64, 4096, 32, 8, 128, 128, 256, unique_indices=True, query_tile=4), {}),
        ("tok_g1_f32", *attn(tok, 2, 64, 1000, 2, 2, 128, 128, 300, dtype=jnp.float32), {}),
        ("blk_g16_t4", *attn(blk, 1, 64, 4096, 64, 4, 128, 128, 16, block_size=64, loop_order="query"), {}),
        ("blk_g16_t1", *attn(blk, 1, 64, 4096, 64, 4, 128, 128, 16, block_size=64, loop_order="query",
                             query_tile=1), {}),
        ("blk_g4_t16", *attn(blk, 1, 64, 4096, 32, 8, 128, 128, 16, block_size=64, loop_order="query",
                             query_tile=16), {}),
        ("blk_g4_kv", *attn(blk, 1, 64, 4096, 32, 8, 128, 128, 16, block_size=64, loop_order="kv"), {}),
        ("blk_g16_kv", *attn(blk, 1, 64, 4096, 64, 4, 128, 128, 16, block_size=64, loop_order="kv"), {}),
        ("blk_g4_kv_rows64_32", *attn(blk, 1, 64, 4096, 32, 8, 128, 128, 16, block_size=64, loop_order="kv"),
         dict(rows=64, bwd_rows=32)),
        ("blk_g16_t8", *attn(blk, 1, 64, 4096, 64, 4, 128, 128, 16, block_size=64, loop_order="query",
                             query_tile=8), {}),
        ("tok_g3_d96_t2", *attn(tok, 2, 100, 1000, 6, 2, 96, 64, 300, query_tile=2), {}),
    ]
    q, k, w = sd((1, 256, 64, 128), bf), sd((1, 4096, 128), bf), sd((1, 256, 64), jnp.float32)
    out.append(("idx_flat", lambda q, k, w: sj.lightning_indexer(q, k, w, 2048, backend="triton"), (q, k, w), {}))
    out.append(("idx_hier", lambda q, k, w: sj.hierarchical_indexer(q, k, w, 2048, backend="triton"), (q, k, w), {}))
    return out


def capture(out_dir: str, only: str | None = None) -> None:
    """Write ``<tag>_<kernel>.ttir`` and ``.json`` (num_warps, num_stages) per Pallas call."""
    from benchmarks import triton_ir
    from pallas_kernels.triton import indexed_attention as K
    from sparse_jax import _compat

    for tag, fn, args, cfg in _cases():
        if only and not re.search(only, tag):
            continue
        with triton_ir.captured() as texts, K.config_override(**cfg):
            text = _compat.export(fn, "cuda", *args).mlir_module()
        for name, ir, warps, stages in triton_ir.kernel_calls(text, texts):
            triton_ir.write_kernel(os.path.join(out_dir, f"{tag}__{name}"), ir,
                                   dict(num_warps=warps, num_stages=stages))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton-python", default=sys.executable, help="an interpreter with triton==3.6")
    ap.add_argument("--only", default=None, help="regex over case tags")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="indexed_ttir_")
    os.makedirs(out, exist_ok=True)
    capture(out, args.only)
    rows, r = triton_compile.run(args.triton_python, out)
    bad = 0
    for row in rows:
        sass = glob.glob(os.path.join(out, row["kernel"] + ".sass"))
        membar = open(sass[0]).read().count("MEMBAR.ALL.GPU") if sass else None
        err = row.get("error")
        ok = not err and not row.get("spill_st") and (row.get("smem") or 0) <= SMEM_LIMIT
        bad += not ok
        mma = "wgmma" if row.get("wgmma") else "mma.sync" if row.get("mma_sync") else "no-mma"
        print(f"{'ok ' if ok else 'BAD'} {row['kernel']:58s} w{row['num_warps']}s{row['num_stages']} "
              + (f"failed: {err}" if err else f"regs={row['regs']} spill={row['spill_st']} smem={row['smem']} "
                                             f"{mma} membar.gpu={membar}"))
    if r.returncode or not r.stdout.strip():
        print(r.stderr[-2000:])
        return 1
    print(f"IR, PTX, SASS in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
