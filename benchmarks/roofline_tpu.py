"""Roofline model of the TPU block-sparse attention kernels on v5e and v6e (no TPU needed).

For each configuration it builds the real BlockMask and the kernel's own coarse
tile tables (the same code the kernels run), then counts, per pass (forward, dQ,
dK/dV):

* MXU work of every computed tile (per query head; tiles whose sub-blocks are all
  full run without mask work, the others with it), with the MXU shape efficiency
  (a contraction or output dim below the systolic array side leaves it partly idle:
  D = 128 on v6e's 256 x 256 MXU runs at most half rate);
* EUP work (one exp per computed pair, plus a tanh with softcap) and VPU work
  (element ops per pair, more on masked tiles);
* HBM bytes: Q/O (or dO, dQ, ...) once per tile row, K/V (or Q/dO/lse/delta for
  dK/dV) once per *active tile* -- the re-reads block sparsity scales with;
* grid steps (rows x slots, padding slots included) at a fixed per-step cost.

Modelled time = max(MXU, VPU, EUP, HBM) + steps x step overhead (the step cost is
not assumed to overlap). "Fraction of peak" = useful FLOPs (allowed pairs only)
/ (modelled time x bf16 peak). Hardware numbers and their sources are in
``HARDWARE`` and benchmarks/notes/block_sparse_attention_tpu.md; VPU/EUP rates and
the step overhead are estimates to calibrate on hardware.

    python -m benchmarks.roofline_tpu [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import numpy as np

import sparse_jax as sj
from benchmarks.timing import Result
from pallas_kernels.common import coarse_tables as CT
from pallas_kernels.tpu import configs, cost_model
from sparse_jax import _block_tables as T
from sparse_jax import masks

SUITE = "roofline_tpu"


GENERATIONS = ("v5e", "v6e")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: object  # a Mask, or a float density for random blocks
    S: int
    B: int = 1
    Hq: int = 32
    Hkv: int = 8
    D: int = 128
    Dv: int = 128
    itemsize: int = 2
    softcap: bool = False


def cases(quick: bool) -> list[Case]:
    S = 4096 if quick else 16384
    rng = np.random.default_rng(0)
    ids = np.sort(rng.integers(0, max(1, S // 2048), S)).astype(np.int32)
    out = [
        Case(f"causal S={S}", masks.causal, S),
        Case(f"sliding window 2048 S={S}", masks.sliding_window(2048, causal=True), S),
        Case(f"documents (~2K) + causal S={S}", masks.and_masks(masks.document(ids), masks.causal), S),
        Case(f"chunked 1024 causal S={S}", masks.chunked(1024, causal=True), S),
        Case(f"full S={S}", masks.full, S),
    ]
    if not quick:
        out.append(Case("causal S=65536", masks.causal, 65536))
        out.append(Case("causal S=16384 D=256", masks.causal, 16384, D=256, Dv=256, Hq=16, Hkv=4))
    out += [Case(f"random blocks d={d} S={S}", d, S) for d in ((0.1, 0.5) if quick else (0.05, 0.1, 0.25, 0.5, 1.0))]
    return out


def _block_mask(case: Case):
    if isinstance(case.mask, float):
        n = -(-case.S // 128)
        sel = np.random.default_rng(1).random((1, 1, n, n)) < case.mask
        return sj.BlockMask.from_block_bool(sel, case.S, case.S, block_size=128)
    return sj.create_block_mask(case.mask, None, None, case.S, case.S, 128)


def allowed_pairs(bm) -> int:
    """Pairs the mask allows (what a dense kernel would count as useful), per (b, h) table."""
    cls = np.asarray(bm.block_classes())[0, 0]
    bq, bkv = bm.block_size
    rows = np.minimum(bq, bm.q_len - np.arange(cls.shape[0]) * bq)
    cols = np.minimum(bkv, bm.kv_len - np.arange(cls.shape[1]) * bkv)
    total = int((np.outer(rows, cols) * (cls == T.FULL)).sum())
    if bm.mask is None:
        return total + int((np.outer(rows, cols) * (cls == T.PARTIAL)).sum())
    for i, j in zip(*np.nonzero(cls == T.PARTIAL)):
        qi = np.arange(i * bq, i * bq + rows[i])[:, None]
        ki = np.arange(j * bkv, j * bkv + cols[j])[None, :]
        total += int(np.broadcast_to(np.asarray(bm.mask(0, 0, qi, ki)), (qi.size, ki.size)).sum())
    return total


def model(case: Case, gen: str, kind: str, *, searched: bool = True) -> dict:
    """Modelled time and its components for one pass ('fwd', 'dq', 'dkv') of one case, with
    the tiles the kernel would pick (``searched``: the cost-model search on these host tables;
    otherwise the generation's defaults)."""
    chip = configs.CHIPS[gen]
    bm = _block_mask(case)
    shape = cost_model.Shape(case.B, case.Hq, case.Hkv, case.D, case.Dv, case.itemsize, case.softcap)
    if searched:
        coarse, tables, cost = cost_model.search(kind, bm, shape, gen, max_subs=256)
    else:
        with configs.override(generation=gen):
            tiles = configs.choose_tiles(kind, logical=bm.block_size, q_len=case.S, kv_len=case.S,
                                         group=shape.group, head_dim=case.D, head_dim_v=case.Dv,
                                         itemsize=case.itemsize)
        coarse = CT.Coarse.make(tiles.block_q, tiles.block_kv, bm.block_size, case.S, case.S)
        tables = CT.build(bm, coarse, num_q_heads=case.Hq, num_kv_heads=case.Hkv, transpose=kind == "dkv")
        cost = cost_model.pass_cost(kind, tables, coarse, shape, gen)
    useful = allowed_pairs(bm) * case.B * case.Hq * sum(f for f, _ in cost_model.matmuls(kind, case.D, case.Dv))
    return dict(kind=kind, gen=gen, tiles=(coarse.tile_q, coarse.tile_kv), searched=searched,
                active_tiles=cost.active_tiles, masked_tiles=cost.masked_tiles, grid_steps=cost.grid_steps,
                computed_pairs=cost.computed_pairs, density=cost.computed_pairs / (case.B * case.Hq * case.S ** 2),
                useful_flops=useful, hbm_bytes=cost.hbm_bytes, smem_bytes=tables.smem_bytes, bound=cost.bound,
                mxu_ms=cost.mxu_s * 1e3, vpu_ms=cost.vpu_s * 1e3, eup_ms=cost.eup_s * 1e3, hbm_ms=cost.hbm_s * 1e3,
                overhead_ms=cost.overhead_s * 1e3, model_ms=cost.total_s * 1e3,
                frac_peak=useful / (cost.total_s * chip.peak_bf16_tflops * 1e12))


def run(ctx) -> list[Result]:
    out = []
    record = getattr(ctx, "record", lambda r: r)
    quick = bool(getattr(ctx, "quick", False))
    for case in cases(quick):
        for gen, kind, searched in itertools.product(GENERATIONS, ("fwd", "dq", "dkv"), (False, True)):
            impl = f"model/{gen}/{'searched' if searched else 'default'}-tiles"
            name = f"{case.name} [{kind}]"
            try:
                m = model(case, gen, kind, searched=searched)
                r = Result(SUITE, name, impl, dict(B=case.B, S=case.S, Hq=case.Hq, Hkv=case.Hkv, D=case.D,
                                                   Dv=case.Dv), None, flops=m["useful_flops"],
                           bytes=m["hbm_bytes"], extra=m)
            except Exception as e:  # noqa: BLE001 - one bad case must not stop the suite
                r = Result(SUITE, name, impl, {}, None, error=f"{type(e).__name__}: {e}"[:500])
            out.append(record(r))
    return out


def _table(results) -> str:
    head = (f"{'case':44s} {'chip':4s} {'pass':4s} {'tiles':>10s} {'dens':>5s} {'bound':>5s} {'mxu':>7s} "
            f"{'vpu':>7s} {'eup':>7s} {'hbm':>7s} {'steps':>7s} {'model':>8s} {'%peak':>6s}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:44s} ERROR {r.error}")
            continue
        m = r.extra
        lines.append(f"{r.name.split(' [')[0][:44]:44s} {m['gen']:4s} {m['kind']:4s} "
                     f"{'*' if m['searched'] else ' '}{m['tiles'][0]:>4d}x{m['tiles'][1]:<4d} {m['density']:5.2f} {m['bound']:>5s} "
                     f"{m['mxu_ms']:7.3f} {m['vpu_ms']:7.3f} {m['eup_ms']:7.3f} {m['hbm_ms']:7.3f} "
                     f"{m['overhead_ms']:7.3f} {m['model_ms']:8.3f} {100 * m['frac_peak']:5.1f}%")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    ctx = argparse.Namespace(quick=args.quick)
    print("times in ms; 'steps' = grid-step overhead; %peak = useful FLOPs / (model time x bf16 peak); "
          "tiles marked * were picked by the cost-model search, the others are the generation defaults")
    print(_table(run(ctx)))


if __name__ == "__main__":
    main()
