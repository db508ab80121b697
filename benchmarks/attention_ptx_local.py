#!/usr/bin/env python3
"""PTX evidence for the Triton attention kernels *without a GPU*: registers, spills, shared
memory, wgmma vs mma.sync, ex2.approx and cp.async counts per launch config.

Pallas lowers each kernel to Triton IR on the CPU (``_compat.export(..., "cuda")``); this
script captures that IR and compiles it for sm_90a with the ``triton`` Python package
(which ships ptxas) in a *separate* interpreter, so sparse-jax itself never depends on
triton. XLA runs its own copy of Triton's pass pipeline on the GPU, so numbers can differ
slightly from what the GPU build gets (``benchmarks/tune_attention.py`` collects those).

    python -m venv /tmp/tritonvenv && /tmp/tritonvenv/bin/pip install triton
    PYTHONPATH=. python benchmarks/attention_ptx_local.py --triton-python /tmp/tritonvenv/bin/python \\
        --D 128 --fwd 128,64,8,3 --fwd 128,128,8,2 --dq 64,64,4,2 --dkdv 64,64,8,2 [--fused]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def _capture(out_dir, D, S, fwds, bwds, fused):
    """Export forward + backward for each config and write <tag>_<kernel>.ttir / .json."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as reg

    import sparse_jax as sj
    from pallas_kernels.triton import attention_configs as cfgs
    from pallas_kernels.triton import block_sparse_attention as K
    from sparse_jax import _compat, masks

    captured = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*a, **kw):  # the Triton module of every pallas_call lowered
        result = original(*a, **kw)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = spy
    bm = sj.create_block_mask(masks.causal, None, None, S, S, block_size=128)
    spec = jax.ShapeDtypeStruct((1, S, 4, D), jnp.bfloat16)
    kw = dict(scale=D ** -0.5, softcap=None, segments_everywhere=False, interpret=False)
    jobs = [("fwd", cfgs.FwdConfig(*f), None) for f in fwds]
    jobs += [("bwd", None, cfgs.BwdConfig(*b, fused_dq=fused)) for b in bwds]
    try:
        for kind, fc, bc in jobs:
            n0 = len(captured)
            if kind == "fwd":
                fn = lambda q, k, v, fc=fc: K.forward(q, k, v, bm, None, None, None, None, config=fc, **kw)  # noqa
                _compat.export(fn, "cuda", spec, spec, spec)
                items = [(f"fwd_{fc.block_q}x{fc.block_kv}_w{fc.num_warps}_s{fc.num_stages}", fc.num_warps,
                          fc.num_stages)]
            else:
                def fn(q, k, v, do, bc=bc):
                    o, lse = K.forward(q, k, v, bm, None, None, None, None, **kw)
                    return K.backward(q, k, v, o, lse, do, bm, None, None, None, None, config=bc, **kw)
                _compat.export(fn, "cuda", spec, spec, spec, spec)
                items = [("fwd_default", 0, 0)]
                if not bc.fused_dq:
                    items.append((f"dq_{bc.block_q_dq}x{bc.block_kv_dq}_w{bc.warps_dq}_s{bc.stages_dq}", bc.warps_dq,
                                  bc.stages_dq))
                items.append((f"dkdv{'_fused' if bc.fused_dq else ''}_{bc.block_q_dkv}x{bc.block_kv_dkv}"
                              f"_w{bc.warps_dkv}_s{bc.stages_dkv}", bc.warps_dkv, bc.stages_dkv))
            for (tag, warps, stages), text in zip(items, captured[n0:]):
                if tag == "fwd_default":
                    continue
                base = os.path.join(out_dir, f"D{D}_{tag}")
                with open(base + ".ttir", "w") as f:
                    f.write(text)
                with open(base + ".json", "w") as f:
                    json.dump(dict(num_warps=warps, num_stages=stages), f)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original


def _compile(out_dir):
    """(Runs under the triton interpreter.) Compile every .ttir for sm_90a and print stats."""
    import triton
    from triton.backends.compiler import GPUTarget
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    for path in sorted(p for p in glob.glob(os.path.join(out_dir, "*.ttir")) if not p.endswith(".opt.ttir")):
        with open(path[:-5] + ".json") as f:
            opts = json.load(f)
        row = dict(kernel=os.path.basename(path)[:-5], **opts)
        try:
            # triton.compile skips the TTIR passes for IR input; XLA runs them (canonicalize,
            # combine dot+add into the accumulator, ...), so run them here first.
            from triton._C.libtriton import ir
            from triton.backends.nvidia.compiler import CUDABackend
            backend = CUDABackend(GPUTarget("cuda", 90, 32))
            ctx = ir.context()
            ir.load_dialects(ctx)
            backend.load_dialects(ctx)
            mod = ir.parse_mlir_module(path, ctx)
            mod.context = ctx
            mod = backend.make_ttir(mod, {}, backend.parse_options(opts), 90)
            opt_path = path[:-5] + ".opt.ttir"
            with open(opt_path, "w") as f:
                f.write(str(mod))
            ptx = triton.compile(opt_path, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
            with open(path[:-5] + ".ptx", "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-arch=sm_90a", "-v", path[:-5] + ".ptx", "-o", path[:-5] + ".cubin"],
                               capture_output=True, text=True)
            log = r.stdout + r.stderr
            reg = re.search(r"Used (\d+) registers", log)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            smem = re.search(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", ptx)
            row.update(regs=int(reg.group(1)) if reg else None,
                       spill_st=int(spill.group(1)) if spill else None,
                       wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                       ex2=len(re.findall(r"ex2\.approx", ptx)), cp_async=len(re.findall(r"cp\.async\.c[ag]", ptx)),
                       smem_decl=int(smem.group(1)) if smem else None)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _tuple(s):
    return tuple(int(x) for x in s.split(","))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton-python", default=None, help="interpreter with the triton package")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--fwd", action="append", default=[], type=_tuple, help="block_q,block_kv,warps,stages")
    ap.add_argument("--dq", action="append", default=[], type=_tuple)
    ap.add_argument("--dkdv", action="append", default=[], type=_tuple)
    ap.add_argument("--fused", action="store_true", help="fused (atomic) dQ variant of the backward configs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_only:
        _compile(args.compile_only)
        return
    out = args.out or tempfile.mkdtemp(prefix="bsa_ttir_")
    os.makedirs(out, exist_ok=True)
    dqs = args.dq or [(64, 64, 4, 2)]
    bwds = [dq + kv for dq in dqs for kv in (args.dkdv or [(64, 64, 8, 2)])] if (args.dq or args.dkdv) else []
    _capture(out, args.D, args.S, args.fwd, bwds, args.fused)
    py = args.triton_python or sys.executable
    subprocess.run([py, os.path.abspath(__file__), "--compile-only", out], check=False)
    print(f"Triton IR and PTX in {out}")


if __name__ == "__main__":
    main()
