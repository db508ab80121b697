"""Compile the Triton grouped-matmul kernels for an H100 (sm_90a) on a machine without a GPU.

    pip install triton==3.6.0            # a dev tool only: not a sparse_jax dependency
    python -m benchmarks.gmm_compile_check [--all] [--triton-python /tmp/tritonvenv/bin/python]

Pallas lowers every kernel to Triton IR for an abstract H100 (``_compat.export``); the
pip Triton then runs the same pass pipeline the GPU would (TTIR -> TTGIR -> LLVM ->
PTX -> cubin, Hopper target; ``benchmarks/triton_compile.py``, the compile path every
compile check shares) and ``ptxas -v`` reports registers and spills. For each
kernel it prints shared memory (must fit 227 KB), registers, spill bytes and whether the
MMA is Hopper's asynchronous ``wgmma`` (tiles of >= 64 rows) or ``mma.sync``. Exits
non-zero when a shipped default fails to compile, spills or overflows shared memory.
``--all`` adds the candidates ``benchmarks/tune_gmm.py`` sweeps. Tested with triton 3.6.0
(other versions may need adjusting); ``--triton-python`` names an interpreter with triton
when jax's has none.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import triton_compile

SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90
DECODE_MODELS = {"mixtral": (8, 2, 4096, 14336), "qwen2": (64, 4, 3584, 2560), "deepseek-v3": (256, 8, 7168, 2048)}


def capture_ttir(fn, args) -> list[tuple[str, str, int, int]]:
    """(kernel name, Triton IR text, num_warps, num_stages) of every Pallas call in fn(*args)."""
    from benchmarks import triton_ir
    from sparse_jax import _compat
    with triton_ir.captured() as texts:
        hlo = _compat.export(fn, "cuda", *args).mlir_module()
    return triton_ir.kernel_calls(hlo, texts)


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
            (S((M, 7168), bf), S((256, 7168, 2048), bf), S((256,), i32), S((M, 2048), bf)), True),
           ("swiglu fwd+bwd bf16 32 rows/group", vjp_swiglu,  # Qwen2-MoE at T=512: few-rows tgmm, two operands
            (S((2048, 3584), bf), S((64, 3584, 2560), bf), S((64, 3584, 2560), bf), S((64,), i32),
             S((2048, 2560), bf)), True)]
    for model, (E_, k, D, F) in DECODE_MODELS.items():
        out.append((f"moe decode (experts_by_id) {model} T=1", lambda x, w, i, a, b, c: sparse_jax.ops.experts_by_id(
            x, w, i, a, b, c, backend="triton"),
            (S((1, D), bf), S((1, k), jnp.float32), S((1, k), i32), S((E_, D, F), bf), S((E_, D, F), bf),
             S((E_, F, D), bf)), True))
        out.append((f"moe decode (moe_decode: router partials + routed experts) {model} T=1",
                    lambda x, r, a, b, c, k=k: sparse_jax.ops.moe_decode(x, r, a, b, c, top_k=k, backend="triton"),
                    (S((1, D), bf), S((D, E_), bf), S((E_, D, F), bf), S((E_, D, F), bf), S((E_, F, D), bf)), True))
    if all_candidates:
        from benchmarks import tune_moe
        from pallas_kernels.triton import moe_decode
        for name, t in tune_moe.DECODE_TILES.items():
            if t is None:
                continue
            def dec(x, w, i, a, b, c, t=t):
                with mock.patch.object(moe_decode, "TILES", t):
                    return sparse_jax.ops.experts_by_id(x, w, i, a, b, c, backend="triton")
            out.append((f"moe decode {name}", dec, (S((1, 3584), bf), S((1, 4), jnp.float32), S((1, 4), i32),
                                                     S((64, 3584, 2560), bf), S((64, 3584, 2560), bf),
                                                     S((64, 2560, 3584), bf)), False))
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


def capture(out_dir: str, all_candidates: bool) -> dict[str, tuple[str, bool]]:
    """Write ``k<i>.ttir`` / ``.json`` per distinct kernel (IR, warps, stages) of the cases;
    returns file stem -> (case label + kernel name, whether a shipped default)."""
    from benchmarks import triton_ir
    seen, stems = set(), {}
    for label, fn, fargs, default in cases(all_candidates):
        for name, ttir, warps, stages in capture_ttir(fn, fargs):
            if (ttir, warps, stages) in seen:
                continue
            seen.add((ttir, warps, stages))
            stem = f"k{len(stems):03d}"
            triton_ir.write_kernel(os.path.join(out_dir, stem), ttir, dict(num_warps=warps, num_stages=stages))
            stems[stem] = (f"{label:34s} {name:28s} w{warps}s{stages}", default)
    return stems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="also the tile candidates tune_gmm sweeps")
    p.add_argument("--triton-python", default=sys.executable, help="an interpreter with triton==3.6")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="gmm_ttir_")
    os.makedirs(out, exist_ok=True)
    stems = capture(out, args.all)
    compiled, r = triton_compile.run(args.triton_python, out)
    rows = {row["kernel"]: row for row in compiled}
    if not rows:
        print(f"no kernel compiled (needs triton==3.6 in --triton-python): {r.stderr[-600:]}", file=sys.stderr)
        return 2
    bad = 0
    for stem, (label, default) in stems.items():
        row = rows.get(stem, {"error": "not compiled"})
        ok = not row.get("error") and row.get("regs") is not None and (row.get("smem") or 0) <= SMEM_LIMIT \
            and not row.get("spill_st")
        mma = "wgmma" if row.get("wgmma") else "mma.sync" if row.get("mma_sync") else "no-mma"
        print(f"{'ok ' if ok else 'BAD'} {label} smem={row.get('smem')} regs={row.get('regs')} "
              f"spill={row.get('spill_st')} {mma} {str(row.get('error', ''))[:200]}")
        bad += (not ok) and default
    print(f"Triton IR, PTX, SASS in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
