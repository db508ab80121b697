#!/usr/bin/env python3
"""Codegen evidence for the Triton attention kernels, with or without a GPU: registers, spills,
shared memory, CTAs per SM, wgmma vs mma.sync, and per-loop SASS instruction counts.

Pallas lowers each kernel to Triton IR (``_compat.export(..., "cuda")`` on a CPU; the same
lowering on a GPU machine); this script captures that IR and compiles it for sm_90a with the
``triton`` Python package (which ships ptxas, cuobjdump and nvdisasm), in a separate
interpreter when sparse-jax's does not have triton. XLA runs its own copy of Triton's pass
pipeline on the GPU, so numbers can differ slightly from the GPU build.

What it reports per kernel (one JSON line each):

* ``regs`` / ``spill_st`` (ptxas -v), ``smem`` (bytes Triton allocates), ``ctas_per_sm``
  (min over the register file, 228 KB of shared memory and 64 warps);
* ``loops``: for every loop of the SASS (a backward branch), its instruction count per warp
  and the mix (HGMMA, MUFU.EX2, LDGSTS, integer address math, FMUL, spills, BAR...);
* ``kv_prefetch``: per ``scf.for`` of the TTGIR, how many K/V buffers it cycles and the
  ``async_wait`` depth (``num``): a loop whose wait is ``num = 0`` prefetches one step ahead.

    python -m venv /tmp/tritonvenv && /tmp/tritonvenv/bin/pip install triton==3.6.0
    PYTHONPATH=. python benchmarks/attention_ptx_local.py --triton-python /tmp/tritonvenv/bin/python \\
        --D 128 --mask dense --fwd block_q=128,block_kv=64,num_warps=4,num_stages=2,lazy_rescale=1 \\
        --bwd block_q_dq=128,block_kv_dq=128,warps_dq=8 --out /tmp/bsa_ptx

``--fwd`` / ``--bwd`` take ``FwdConfig`` / ``BwdConfig`` fields as ``key=value`` (repeatable;
a bare 4-tuple ``128,64,8,3`` also works for the forward).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.triton_compile import compile_dir  # noqa: E402  (the compile side)


# -- capture side (needs jax + sparse_jax) --------------------------------------------------------
def parse_config(spec: str, kind: str):
    """'key=value,...' (or 'bq,bkv,warps,stages' for the forward) -> FwdConfig / BwdConfig."""
    from pallas_kernels.triton.attention_configs import BwdConfig, FwdConfig
    cls = FwdConfig if kind == "fwd" else BwdConfig
    if "=" not in spec:
        return cls(*(int(x) for x in spec.split(",")))
    kw = {}
    for item in spec.split(","):
        key, _, val = item.partition("=")
        field = cls.__dataclass_fields__[key]
        if field.type in ("bool", "bool | None"):
            kw[key] = None if val == "None" else val.lower() in ("1", "true", "yes")
        elif field.type in ("int", "int | None"):
            kw[key] = None if val == "None" else int(val)
        else:
            kw[key] = val
    return cls(**kw)


def config_tag(cfg) -> str:
    from pallas_kernels.triton.attention_configs import FwdConfig
    default = type(cfg)()
    if isinstance(cfg, FwdConfig):
        tag = f"{cfg.block_q}x{cfg.block_kv}_w{cfg.num_warps}_s{cfg.num_stages}"
        skip = ("block_q", "block_kv", "num_warps", "num_stages")
    else:
        tag = (f"dq{cfg.block_q_dq}x{cfg.block_kv_dq}w{cfg.warps_dq}s{cfg.stages_dq}_"
               f"dkv{cfg.block_q_dkv}x{cfg.block_kv_dkv}w{cfg.warps_dkv}s{cfg.stages_dkv}")
        skip = ("block_q_dq", "block_kv_dq", "warps_dq", "stages_dq", "block_q_dkv", "block_kv_dkv", "warps_dkv",
                "stages_dkv")
    for name in cfg.__dataclass_fields__:
        if name not in skip and getattr(cfg, name) != getattr(default, name):
            val = getattr(cfg, name)
            tag += f"_{name}{int(val) if isinstance(val, bool) else val}"
    return re.sub(r"[^\w.-]", "", tag)


def make_mask(kind: str, S: int, block: int = 128):
    import numpy as np

    import sparse_jax as sj
    from sparse_jax import masks
    if kind == "dense":
        return sj.create_block_mask(masks.full, None, None, S, S, block_size=block)
    if kind == "causal":
        return sj.create_block_mask(masks.causal, None, None, S, S, block_size=block)
    if kind == "random":  # all-full random blocks, as in the sparsity benchmark
        nb = S // block
        sel = np.random.default_rng(0).random((nb, nb)) < 0.5
        sel[np.arange(nb), np.arange(nb)] = True
        return sj.BlockMask.from_block_bool(sel, S, S, block_size=block)
    raise ValueError(f"unknown mask {kind!r}")


def capture(out_dir: str, D: int, S: int, mask: str, fwds, bwds, H: int = 4, platform: str = "cuda") -> None:
    """Lower forward (and backward) for each config; write <tag>_<kernel>.ttir / .json per kernel.

    ``platform='cuda'`` lowers for an abstract H100 (works without a GPU); on a GPU machine pass
    'gpu' to lower for the attached device through jit.
    """
    import jax
    import jax.numpy as jnp

    from benchmarks import triton_ir
    from pallas_kernels.triton import block_sparse_attention as K
    from sparse_jax import _compat

    bm = make_mask(mask, S)
    spec = jax.ShapeDtypeStruct((1, S, H, D), jnp.bfloat16)
    kw = dict(scale=D ** -0.5, softcap=None, segments_everywhere=False, interpret=False)

    def lower(fn, n_args):
        if platform == "cuda":
            return _compat.export(fn, "cuda", *([spec] * n_args)).mlir_module()
        return jax.jit(fn).lower(*([spec] * n_args)).as_text()

    jobs = [("fwd", c) for c in fwds] + [("bwd", c) for c in bwds]
    for kind, cfg in jobs:
        with triton_ir.captured() as texts:
            if kind == "fwd":
                text = lower(lambda q, k, v, c=cfg: K.forward(q, k, v, bm, None, None, None, None, config=c, **kw), 3)
            else:
                def fn(q, k, v, do, c=cfg):
                    o, lse = jax.lax.stop_gradient(K.forward(q, k, v, bm, None, None, None, None, **kw))
                    return K.backward(q, k, v, o, lse, do, bm, None, None, None, None, config=c, **kw)
                text = lower(fn, 4)
        for name, ir_text, warps, stages in triton_ir.kernel_calls(text, texts):
            if kind == "bwd" and name.endswith("_fwd"):
                continue
            short = name.replace("block_sparse_attention_", "")
            triton_ir.write_kernel(os.path.join(out_dir, f"D{D}_{mask}_{short}_{config_tag(cfg)}"), ir_text,
                                   dict(num_warps=warps, num_stages=stages, mask=mask, D=D, S=S))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton-python", default=None, help="interpreter with the triton package")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--mask", default="causal", choices=("dense", "causal", "random"))
    ap.add_argument("--fwd", action="append", default=[], help="FwdConfig fields key=value,...")
    ap.add_argument("--bwd", action="append", default=[], help="BwdConfig fields key=value,...")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_only:
        compile_dir(args.compile_only)
        return
    out = args.out or tempfile.mkdtemp(prefix="bsa_ttir_")
    os.makedirs(out, exist_ok=True)
    capture(out, args.D, args.S, args.mask, [parse_config(s, "fwd") for s in args.fwd],
            [parse_config(s, "bwd") for s in args.bwd])
    py = args.triton_python or sys.executable
    subprocess.run([py, os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile.py"), out],
                   check=False)
    print(f"Triton IR, PTX, SASS in {out}")


if __name__ == "__main__":
    main()
