#!/usr/bin/env python3
"""Compile captured Pallas-Triton IR for an H100 (sm_90a) with the pip ``triton`` package: the one
compile path of the compile-check scripts (``attention_ptx_local``, ``indexed_compile_check``,
``score_compile_check``, ``gmm_compile_check``). Needs only triton (3.6; it ships ptxas and
cuobjdump), not jax, so it also runs in a separate interpreter:

    python benchmarks/triton_compile.py DIR     # every DIR/*.ttir (+ .json launch options)

For each kernel: Triton's TTIR passes (``triton.compile`` skips them for IR input; XLA runs them
on the GPU), TTGIR, PTX, cubin; ``ptxas -v`` registers and spills, the shared memory Triton
allocates, CTAs per SM, wgmma vs mma.sync counts, per-loop SASS instruction mix and the K/V
prefetch depth of each ``scf.for``. One JSON line per kernel; files beside the IR.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys

SMEM_PER_SM = 233472  # bytes of shared memory per SM on sm_90 (228 KiB); 1 KiB reserved per CTA
REGS_PER_SM = 65536

SASS_CLASSES = [
    ("HGMMA", r"^HGMMA"), ("HMMA", r"^HMMA"), ("MUFU.EX2", r"^MUFU\.EX2"), ("MUFU", r"^MUFU"),
    ("LDGSTS", r"^LDGSTS"), ("LDG", r"^LDG"), ("STG", r"^STG"), ("ATOM/RED", r"^(ATOM|RED)"),
    ("LDS", r"^LDS"), ("STS", r"^STS"), ("BAR", r"^BAR"), ("DEPBAR", r"^DEPBAR"), ("SHFL", r"^SHFL"),
    ("FFMA", r"^FFMA"), ("FMUL", r"^FMUL"), ("FADD", r"^FADD"), ("FMNMX", r"^FMNMX"), ("F2FP", r"^F2F"),
    ("FSETP/FSEL", r"^(FSETP|FSEL)"), ("STL/LDL", r"^(STL|LDL)"),
    ("INT", r"^(IMAD|IADD|LEA|SHF|LOP|ISETP|SEL|MOV|IABS|VIADD|PRMT|U\w+|R2UR|S2UR|PLOP3|P2R|R2P)"),
]


# -- kernel side (needs only the triton package) --------------------------------------------------
def sass_loops(sass: str) -> list[dict]:
    """Instruction mix of every loop (backward branch) in a cuobjdump -sass listing."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            text = m.group(2).strip()
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()
            ins.append((int(m.group(1), 16), op[0] if op else "", text))
    loops = []
    for addr, op, text in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", text) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [o for a, o, _ in ins if lo <= a <= addr]
            mix = collections.Counter(next((name for name, pat in SASS_CLASSES if re.match(pat, o)), "other")
                                      for o in body)
            loops.append(dict(start=hex(lo), instructions=len(body), mix=dict(mix.most_common())))
    return loops


def ttgir_prefetch(ttgir: str) -> list[dict]:
    """Per scf.for: the K/V ring size (largest memdesc ring allocated before it) and async_wait depths."""
    out = []
    lines = ttgir.splitlines()
    ring = 0
    for i, line in enumerate(lines):
        m = re.search(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", line)
        if m:
            ring = max(ring, int(m.group(1)))
        if "scf.for" in line:
            depth, waits = 1, []
            for body in lines[i + 1:]:
                depth += body.count("{") - body.count("}")
                w = re.search(r"ttg\.async_wait .*\{num = (\d+)", body)
                if w:
                    waits.append(int(w.group(1)))
                if depth <= 0:
                    break
            out.append(dict(buffers=ring, async_wait_num=waits))
            ring = 0
    return out


def occupancy(regs: int | None, smem: int, warps: int) -> int | None:
    if regs is None:
        return None
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + 1024)
    return int(min(by_regs, by_smem, 64 // warps))


def compile_ttir(path: str, opts: dict) -> dict:
    """Run Triton 3.6's TTIR passes (triton.compile skips them for IR input; XLA runs them) and
    compile to cubin for sm_90a; returns the statistics described in the module docstring."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = ir.parse_mlir_module(path, ctx)
    mod.context = ctx
    mod = backend.make_ttir(mod, {}, backend.parse_options(opts), 90)
    base = path[:-5]
    with open(base + ".opt.ttir", "w") as f:
        f.write(str(mod))
    k = triton.compile(base + ".opt.ttir", target=target, options=opts)
    ptx = k.asm["ptx"]
    for ext, data in ((".ptx", ptx), (".ttgir", k.asm["ttgir"])):
        with open(base + ext, "w") as f:
            f.write(data)
    with open(base + ".cubin", "wb") as f:
        f.write(k.asm["cubin"])
    r = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", base + ".ptx", "-o", os.devnull],
                       capture_output=True, text=True)
    log = r.stdout + r.stderr
    reg = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", base + ".cubin"], capture_output=True,
                          text=True).stdout
    with open(base + ".sass", "w") as f:
        f.write(sass)
    regs = int(reg.group(1)) if reg else None
    smem = int(k.metadata.shared)
    return dict(regs=regs, spill_st=int(spill.group(1)) if spill else None, smem=smem,
                ctas_per_sm=occupancy(regs, smem, opts["num_warps"]),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                ex2=len(re.findall(r"ex2\.approx", ptx)), cp_async=len(re.findall(r"cp\.async\.c[ag]", ptx)),
                sass_total=dict(collections.Counter(
                    o for o in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", sass)
                    if o.split(".")[0] in ("HGMMA", "HMMA", "MUFU", "LDGSTS", "STL", "LDL", "BAR"))),
                loops=sass_loops(sass), kv_prefetch=ttgir_prefetch(k.asm["ttgir"]))


def compile_dir(out_dir: str) -> list[dict]:
    """Compile every captured ``*.ttir`` of ``out_dir``; prints and returns one row per kernel."""
    rows = []
    for path in sorted(p for p in glob.glob(os.path.join(out_dir, "*.ttir")) if not p.endswith(".opt.ttir")):
        with open(path[:-5] + ".json") as f:
            meta = json.load(f)
        opts = dict(num_warps=meta["num_warps"], num_stages=meta["num_stages"])
        row = dict(kernel=os.path.basename(path)[:-5], **meta)
        try:
            row.update(compile_ttir(path, opts))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run(python: str, out_dir: str, timeout: float | None = None) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Compile ``out_dir`` with this script in interpreter ``python`` (one that has triton);
    returns the kernels' rows (the JSON lines it printed) and the finished process."""
    r = subprocess.run([python, os.path.abspath(__file__), out_dir], capture_output=True, text=True,
                       timeout=timeout)
    rows = []
    for line in r.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows, r


if __name__ == "__main__":
    compile_dir(sys.argv[1])
