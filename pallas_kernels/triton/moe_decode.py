"""The decode expert kernel (a few tokens' k experts by id, one launch) lowered through Pallas-Triton.

Work items and their math: :mod:`pallas_kernels.common.decode_plan`. The launch is
persistent (``decode_plan.persistent_schedule``): programs walk items ``p, p + P, ...``.
An item has two loops over D: gate/up steps (a [tk, tn] strip block of each weight against
tk entries of x) and down steps (a [tn, td] block of the strip's w_down rows -> td columns
of the item's float32 partial). Both are row-vector products on the tensor cores
(:mod:`pallas_kernels.triton.row_vector`), which keeps both loops' loads in Triton's software
pipeline.

Refs are whole arrays (no BlockSpec). Loads of full blocks carry no mask; only a dimension
that the block does not divide (static) is masked (H100 round 12: the same times as masking
every load, within 2 %, with fewer instructions per byte). A skipped assignment (weight 0 or an id outside [0, E)) takes
a branch that stores zeros without touching the weights.

Where an item's (expert id, weight) comes from is the launch's *source*: given ids and
weights (``experts_by_id``), or chosen in the kernel from the router's split partial products
(``routed_experts``: a routing prologue per item, so no routing launch sits between the router
product and the experts; H100 round 13: +0.6 us on Qwen2-MoE's 79 us kernel, +2-3 us on the
240 us Mixtral and DeepSeek-V3 kernels, against 3-4 us of launches saved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import decode_plan, gmm_plan
from pallas_kernels.common.decode_plan import DecodeTiles
from pallas_kernels.triton import router_topk, row_vector
from pallas_kernels.triton.gmm import num_sms
from sparse_jax import _compat

# H100 round 12 (benchmarks/notes/moe_decode.md; the kernel alone at T = 1): 128-column strips
# stream 256-byte runs of each gate/up weight row and match XLA's own one-launch read of as many
# bytes (705 MB: Mixtral 238-242 us, DeepSeek-V3 233 us; XLA's reduction 238 us); 64-column
# strips lose 5-12 % there. Qwen2-MoE has only 4 x 2560 / 128 = 80 wide items for 132 SMs: its
# 160 narrow ones take 78.7 us for 220 MB (80.8-81.5 with 128-column down steps) against 85-91 us
# wide (XLA's reduction of as many bytes: 76-77 us).
WIDE = DecodeTiles(tn=128, tk=128, td=256, num_warps=4, num_stages=3, programs_per_sm=2)
NARROW = DecodeTiles(tn=64, tk=128, td=256, num_warps=8, num_stages=3, programs_per_sm=2)
WIDE_MIN_BUSY = 0.75  # WIDE when its items keep at least this fraction of the SMs busy
TILES: DecodeTiles | None = None  # forces one tile set (benchmarks)
SMEM_PER_SM = 232448  # bytes an H100 SM gives its resident programs


def resident_programs(tiles: DecodeTiles, tn: int, tk: int, td: int, itemsize: int) -> int:
    """Programs per SM: ``tiles.programs_per_sm``, fewer if their pipeline buffers (num_stages - 1
    in flight per loop, the larger loop's) do not fit the SM's shared memory together."""
    per_stage = max(2 * tk * tn + row_vector.ROWS * tk, tn * td + row_vector.ROWS * tn) * itemsize
    smem = (tiles.num_stages - 1) * per_stage + 1024 * 4  # + Triton's scratch (layout conversions)
    return max(1, min(tiles.programs_per_sm, SMEM_PER_SM // smem))


def default_tiles(num_assignments: int, F: int, sms: int) -> DecodeTiles:
    """WIDE strips if they make enough work items for the SMs, else NARROW."""
    return WIDE if num_assignments * gmm_plan.cdiv(F, WIDE.tn) >= WIDE_MIN_BUSY * sms else NARROW


class _ByIds:
    """Assignments given: ids int32 [N], weights float32 [N] (inputs before x)."""

    def __init__(self, ids, weights):
        self.inputs, self.out_shapes = (ids, weights), ()

    def __call__(self, ins, outs, a, fb):
        ids_ref, w_ref = ins
        return ids_ref[a], w_ref[a]


class _Routed:
    """Assignments chosen in the kernel from the router's partial products (the routing
    prologue): partials float32 [T, S, E] (``router_product.partial_logits``) and bias
    float32 [E] or None as inputs; outputs weights float32 [N], ids int32 [N] (written by
    each assignment's first strip) and logits float32 [T, E] (by each token's first item).

    Every item adds its token's S partials and runs the top-k of ``router_topk.choose``
    itself: the same instructions on the same data in every program, so all agree on the
    choice bit for bit, and no launch or cross-program sync sits between router and experts.
    """

    def __init__(self, partials, bias, *, top_k, scoring, normalize_topk):
        self.T, self.S, self.E = partials.shape
        self.top_k, self.scoring, self.normalize_topk = top_k, scoring, normalize_topk
        self.has_bias = bias is not None
        self.inputs = (partials,) if bias is None else (partials, bias)
        N = self.T * top_k
        self.out_shapes = (jax.ShapeDtypeStruct((N,), jnp.float32), jax.ShapeDtypeStruct((N,), jnp.int32),
                           jax.ShapeDtypeStruct((self.T, self.E), jnp.float32))

    def __call__(self, ins, outs, a, fb):
        E, top_k = self.E, self.top_k
        Ep, Sp = gmm_plan.next_pow2(max(E, 2)), gmm_plan.next_pow2(max(self.S, 2))
        part_ref, bias_ref = ins if self.has_bias else (ins[0], None)
        w_out, id_out, logit_out = outs
        t, j = a // top_k, a % top_k
        # Traced zero starts: Pallas rejects a static slice past an edge; the masks cover it.
        e_cols = lax.broadcasted_iota(jnp.int32, (Ep,), 0) < E
        s_rows = lax.broadcasted_iota(jnp.int32, (Sp,), 0) < self.S
        parts = plgpu.load(part_ref.at[t, pl.ds(t * 0, Sp), pl.ds(t * 0, Ep)],
                           mask=s_rows[:, None] & e_cols[None, :], other=0.0)
        logits = jnp.sum(parts, axis=0)
        bias = None if bias_ref is None else plgpu.load(bias_ref.at[pl.ds(t * 0, Ep)], mask=e_cols, other=0.0)
        ids, scores = router_topk.choose(logits, bias, E=E, top_k=top_k, scoring=self.scoring)
        weights = router_topk.normalised(scores, self.normalize_topk)
        e, wt = ids[0], weights[0]
        for jj in range(1, top_k):
            e, wt = jnp.where(j == jj, ids[jj], e), jnp.where(j == jj, weights[jj], wt)

        @pl.when(fb == 0)
        def _():
            id_out[a] = e
            w_out[a] = wt

        @pl.when((fb == 0) & (j == 0))
        def _():
            plgpu.store(logit_out.at[t, pl.ds(t * 0, Ep)], logits, mask=e_cols)

        return e, wt


def experts_by_id(x, weights, ids, w_gate, w_up, w_down, *, top_k: int, tiles: DecodeTiles | None = None,
                  interpret: bool = False):
    """y float32 [T, D] = sum_j weights[t k + j] * SwiGLU_{ids[t k + j]}(x[t]).

    x [T, D]; weights float32 [N = T k]; ids int32 [N] (a zero weight or an id outside
    [0, E) skips the assignment: zeros, no weight traffic);
    w_gate/w_up [E, D, F], w_down [E, F, D] in x.dtype.
    """
    y, = _launch(_ByIds(ids, weights), x, w_gate, w_up, w_down, top_k=top_k, tiles=tiles, interpret=interpret)
    return y


def routed_experts(x, partials, bias, w_gate, w_up, w_down, *, top_k: int, scoring: str, normalize_topk: bool,
                   tiles: DecodeTiles | None = None, interpret: bool = False):
    """Routing and experts in one launch: -> (y float32 [T, D], weights float32 [T, k],
    ids int32 [T, k], logits float32 [T, E]).

    partials float32 [T, S, E] (the router product's split partials,
    :func:`pallas_kernels.triton.router_product.partial_logits`); bias float32 [E] or None;
    the choice and weights are those of ``router_topk`` on the logits (their sum over S).
    """
    T = x.shape[0]
    source = _Routed(partials, bias, top_k=top_k, scoring=scoring, normalize_topk=normalize_topk)
    y, weights, ids, logits = _launch(source, x, w_gate, w_up, w_down, top_k=top_k, tiles=tiles, interpret=interpret)
    return y, weights.reshape(T, top_k), ids.reshape(T, top_k), logits


def _launch(source, x, w_gate, w_up, w_down, *, top_k: int, tiles: DecodeTiles | None, interpret: bool):
    """The persistent launch; ``source`` gives each item's (expert id, weight) and its extra
    inputs and outputs. Returns (y float32 [T, D], *source's outputs)."""
    T, D = x.shape
    N = T * top_k
    E, F = w_gate.shape[0], w_gate.shape[2]
    tiles = tiles or TILES or default_tiles(N, F, num_sms())
    tn, tk, td = gmm_plan.pow2_block(F, tiles.tn), gmm_plan.pow2_block(D, tiles.tk), gmm_plan.pow2_block(D, tiles.td)
    nf, nk, nd = gmm_plan.cdiv(F, tn), gmm_plan.cdiv(D, tk), gmm_plan.cdiv(D, td)
    items = N * nf
    resident = resident_programs(tiles, tn, tk, td, w_gate.dtype.itemsize)
    programs, per = decode_plan.persistent_schedule(items, num_sms(), resident)
    h_dtype = x.dtype

    mask_k, mask_f, mask_d = D % tk != 0, F % tn != 0, D % td != 0  # static: full blocks load unmasked

    n_in = len(source.inputs)

    def kernel(*refs):
        x_ref, wg_ref, wu_ref, wd_ref, o_ref = refs[n_in:n_in + 5]
        src_in, src_out = refs[:n_in], refs[n_in + 5:]
        p = pl.program_id(0)

        def d_mask(d0):
            return (d0 + lax.broadcasted_iota(jnp.int32, (td,), 0)) < D if mask_d else None

        def run_item(q):
            a, fb = q // nf, q % nf
            e, wt = source(src_in, src_out, a, fb)
            t = a // top_k
            live = (wt != 0) & (e >= 0) & (e < E)
            strip = pl.ds(fb * tn, tn)
            f_ok = (fb * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0)) < F if mask_f else None

            def gate_up_step(kb, accs):
                k0 = pl.multiple_of(kb * tk, tk)
                k_ok = (k0 + lax.broadcasted_iota(jnp.int32, (tk,), 0)) < D if mask_k else None
                xr = plgpu.load(x_ref.at[t, pl.ds(k0, tk)], mask=k_ok, other=None if k_ok is None else 0.0)
                mask = row_vector.block_mask(k_ok, f_ok, (tk, tn))
                other = None if mask is None else 0.0
                wg = plgpu.load(wg_ref.at[e, pl.ds(k0, tk), strip], mask=mask, other=other)
                wu = plgpu.load(wu_ref.at[e, pl.ds(k0, tk), strip], mask=mask, other=other)
                xa = row_vector.rows(xr)
                return (accs[0] + jnp.dot(xa, wg, preferred_element_type=jnp.float32),
                        accs[1] + jnp.dot(xa, wu, preferred_element_type=jnp.float32))

            @pl.when(live)
            def _compute():
                zero = jnp.zeros((row_vector.ROWS, tn), jnp.float32)
                g, u = lax.fori_loop(0, nk, gate_up_step, (zero, zero))
                h = row_vector.rows((gmm_plan.silu(jnp.max(g, axis=0)) * jnp.max(u, axis=0)).astype(h_dtype))

                def down_step(db, carry):
                    d0 = pl.multiple_of(db * td, td)
                    d_ok = d_mask(d0)
                    mask = row_vector.block_mask(f_ok, d_ok, (tn, td))
                    wd = plgpu.load(wd_ref.at[e, strip, pl.ds(d0, td)], mask=mask, other=None if mask is None else 0.0)
                    y = jnp.max(jnp.dot(h, wd, preferred_element_type=jnp.float32), axis=0)
                    plgpu.store(o_ref.at[q, pl.ds(d0, td)], wt * y, mask=d_ok)
                    return carry

                lax.fori_loop(0, nd, down_step, 0)

            @pl.when(jnp.logical_not(live))  # a skipped assignment: zeros, no weight traffic
            def _skip():
                def zero_step(db, carry):
                    d0 = pl.multiple_of(db * td, td)
                    plgpu.store(o_ref.at[q, pl.ds(d0, td)], jnp.zeros((td,), jnp.float32), mask=d_mask(d0))
                    return carry

                lax.fori_loop(0, nd, zero_step, 0)

        def walk(i, carry):
            q = p + i * programs

            @pl.when(q < items)
            def _():
                run_item(q)
            return carry

        lax.fori_loop(0, per, walk, 0)

    itemsize = w_gate.dtype.itemsize
    parts, *extra = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((items, D), jnp.float32), *source.out_shapes],
        grid=(programs,),
        compiler_params=_compat.triton_compiler_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=6 * N * D * F, transcendentals=N * F,
                                      bytes_accessed=3 * N * D * F * itemsize + 4 * items * D),
        name=f"moe_decode_{'routed_' if source.out_shapes else ''}{tn}x{tk}x{td}",
    )(*source.inputs, x, w_gate, w_up, w_down)
    # Item q = (t k + j) nf + f: a token's k * nf partials are contiguous; summed in a fixed order.
    return (jnp.sum(parts.reshape(T, top_k * nf, D), axis=1), *extra)
