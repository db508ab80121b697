"""Compile the Triton grouped-matmul kernels for an H100 (sm_90a) on a machine without a GPU.

    pip install triton==3.6.0            # a dev tool only: not a sparse_jax dependency
    python -m benchmarks.gmm_compile_check [--all]

Pallas lowers every kernel to Triton IR for an abstract H100 (``_compat.export``); the
pip Triton then runs the same pass pipeline the GPU would (TTIR -> TTGIR -> LLVM ->
PTX -> cubin, Hopper target) and ``ptxas -v`` reports registers and spills. For each
kernel it prints shared memory (must fit 227 KB), registers, spill bytes and whether the
MMA is Hopper's asynchronous ``wgmma`` (tiles of >= 64 rows) or ``mma.sync``. Exits
non-zero when a shipped default fails to compile, spills or overflows shared memory.
``--all`` adds the candidates ``benchmarks/tune_gmm.py`` sweeps. Tested with triton 3.6.0
(it drives Triton's stage functions directly; other versions may need adjusting).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def capture_ttir(fn, args) -> list[tuple[str, str, int, int]]:
    """(kernel name, Triton IR text, num_warps, num_stages) of every Pallas call in fn(*args)."""
    from benchmarks import triton_ir
    from sparse_jax import _compat
    with triton_ir.captured() as texts:
        hlo = _compat.export(fn, "cuda", *args).mlir_module()
    return triton_ir.kernel_calls(hlo, texts)


def ptxas_report(ptx: str) -> dict:
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", p, "-o", os.devnull], capture_output=True, text=True)
    text = r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
            "ptxas_ok": r.returncode == 0, "ptxas_log": text[-400:]}


def compile_report(ttir: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler.compiler import Language
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        mod = ir.parse_mlir_module(path, ctx)
        mod.context = ctx
    stages: dict = {}
    backend.add_stages(stages, options, Language.TRITON)
    metadata = {"hash": "0" * 64, "target": backend.target, **options.__dict__}
    outputs = {}
    for ext, stage in stages.items():
        mod = stage(mod, metadata)
        outputs[ext] = mod
    ptx = outputs["ptx"]
    rep = ptxas_report(ptx)
    rep.update(shared=metadata.get("shared"), wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
               triton=triton.__version__)
    return rep


def cases(all_candidates: bool):
    """(label, fn, abstract args, is_default) over the shipped defaults and, with --all, the sweep."""
    import sparse_jax
    from pallas_kernels.common import gmm_plan
    from pallas_kernels.common.gmm_plan import Tiling
    S = jax.ShapeDtypeStruct
    M, K, N, E = 4096, 4096, 14336, 8
    bf, i32 = jnp.bfloat16, jnp.int32
    x, w, gs, ct = S((M, K), bf), S((E, K, N), bf), S((E,), i32), S((M, N), bf)

    def vjp_gmm(dtype):
        def f(x, w, gs, ct):
            o, pull = jax.vjp(lambda x, w: sparse_jax.grouped_matmul(x, w, gs, backend="triton"), x, w)
            return o, *pull(ct)
        return f, (S((M, K), dtype), S((E, K, N), dtype), gs, S((M, N), dtype))

    def vjp_swiglu(x, a, b, gs, ct):
        o, pull = jax.vjp(lambda x, a, b: sparse_jax.grouped_swiglu(x, a, b, gs, backend="triton"), x, a, b)
        return o, *pull(ct)

    def vjp_deepseek(x, w, gs, ct):  # 256 experts, 16 rows each: the few-rows weight-gradient tiles
        o, pull = jax.vjp(lambda x, w: sparse_jax.grouped_matmul(x, w, gs, backend="triton"), x, w)
        return o, *pull(ct)

    out = [("gmm fwd+bwd bf16", *vjp_gmm(bf), True), ("gmm fwd+bwd f32", *vjp_gmm(jnp.float32), True),
           ("swiglu fwd+bwd bf16", vjp_swiglu, (x, w, w, gs, ct), True),
           ("gmm fwd+bwd bf16 256 experts", vjp_deepseek,
            (S((M, 7168), bf), S((256, 7168, 2048), bf), S((256,), i32), S((M, 2048), bf)), True)]
    if all_candidates:
        from benchmarks import tune_gmm
        for t in tune_gmm.BIG_CANDIDATES + tune_gmm.SMALL_CANDIDATES:
            def f(x, w, gs, t=t):
                with gmm_plan.override(Tiling(forward=t)):
                    return sparse_jax.grouped_matmul(x, w, gs, backend="triton")
            out.append((f"gmm {t}", f, (x, w, gs), False))
        for t in tune_gmm.DLHS_CANDIDATES:
            def h(d, w, gs, t=t):
                with gmm_plan.override(Tiling(forward=t)):
                    return sparse_jax.grouped_matmul(d, w, gs, transpose_rhs=True, backend="triton")
            out.append((f"gmm transpose_rhs {t}", h, (ct, w, gs), False))
        for t in tune_gmm.TGMM_CANDIDATES:
            def g(x, d, gs, t=t):
                with gmm_plan.override(Tiling(transposed=t)):
                    return sparse_jax.grouped_matmul_t(x, d, gs, backend="triton")
            out.append((f"gmm_t {t}", g, (x, ct, gs), False))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="also the tile candidates tune_gmm sweeps")
    args = p.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs the pip triton package (pip install triton==3.6.0); nothing checked", file=sys.stderr)
        return 2
    bad = 0
    seen = set()
    for label, fn, fargs, default in cases(args.all):
        for name, ttir, warps, stages in capture_ttir(fn, fargs):
            key = (ttir, warps, stages)
            if key in seen:
                continue
            seen.add(key)
            try:
                r = compile_report(ttir, warps, stages)
                ok = r["ptxas_ok"] and (r["shared"] or 0) <= SMEM_LIMIT and not r["spill_bytes"]
                print(f"{'ok ' if ok else 'BAD'} {label:34s} {name:28s} w{warps}s{stages} smem={r['shared']:>7} "
                      f"regs={r['registers']} spill={r['spill_bytes']} "
                      f"{'wgmma' if r['wgmma'] else 'mma.sync' if r['mma_sync'] else 'no-mma'}")
            except Exception as e:  # noqa: BLE001
                ok = False
                print(f"BAD {label:34s} {name:28s} w{warps}s{stages} failed: {str(e)[:300]}")
            bad += (not ok) and default
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
