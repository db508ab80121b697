"""Forward of block-list attention (NSA's selected branch) on Hopper through Mosaic GPU.

Query-major: a compute warpgroup holds 64 query rows that share one block list, wgmma's M. Every
listed block is a contiguous [span, D] K/V slab that TMA copies into shared memory (the Triton
kernel gathers it row by row through registers). The 64 rows are

* 64 query heads of one token when G = Hq / Hkv >= 64 (DSA / MLA-size groups), or
* a *query tile* of T = 64 / G consecutive tokens x the G heads of a kv head when G is 8, 16 or
  32 (NSA: G = 16, T = 4). The tile walks the union of its tokens' lists
  (:func:`pallas_kernels.common.indexed.tile_lists`) once; a per-(token, block) membership bit
  masks the blocks a row's token did not list, so the MMA does T x |union| blocks of work for
  T x n useful ones (neighbouring NSA selections overlap, so the union stays short).

Two layouts of the CTA's two compute warpgroups (plus one memory warpgroup):

* ``shared`` (G a multiple of 128): both warpgroups take 64 heads each of the *same* token, so
  each K/V block is loaded once for 128 rows; they ping-pong on a schedule barrier (one's
  softmax overlaps the other's matmuls), as in :mod:`pallas_kernels.mosaic_gpu.attention_fwd`;
* ``separate`` (G <= 64): each warpgroup takes its own token (or tile) with its own list and
  K/V ring; no ping-pong (the two lists may differ in length).

The memory warpgroup walks the lists (``step_keys / span`` blocks per step, one TMA copy each)
into ``steps``-deep rings. Lists are canonical (:func:`pallas_kernels.common.indexed.canonicalize`
with ``unique=False``) or tile unions of them: valid blocks first, ascending, distinct, none
starting after the (last) query. With one token per warpgroup every block but the last valid
one lies wholly at or before the query, so only a row's last step evaluates a mask; tiles mask
every step (membership).

Contract (as :mod:`pallas_kernels.triton.indexed_attention`): o [B, Sq, Hq, D] in q's dtype,
lse float32 [B, Sq, Hq] in natural log; rows with no allowed key give o = 0, lse = -inf.
:func:`unsupported` lists what the kernel does not take (the caller falls back to Triton).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import indexed as common
from pallas_kernels.common.overrides import Override
from pallas_kernels.mosaic_gpu import flash_loop
from pallas_kernels.mosaic_gpu import online_softmax as softmax

ROWS_PER_WG = 64  # wgmma's M: query heads of one token per compute warpgroup
COMPUTE_WGS = 2
SPANS = (32, 64, 128)
SHARED_STEP_KEYS, SEPARATE_STEP_KEYS = 128, 64  # default keys per pipeline step of each layout


@dataclasses.dataclass(frozen=True)
class MgpuIndexedConfig:
    """Launch parameters. ``steps``: K/V ring depth per ring; ``step_keys``: keys per pipeline
    step (a multiple of the block size; None: 128 for the shared layout, 64 for the separate
    one, whose two rings must fit shared memory together); ``pingpong``: the shared layout's
    schedule barrier."""

    steps: int = 2
    step_keys: int | None = None
    pingpong: bool = True
    compute_regs: int = 232
    memory_regs: int = 40


_OVERRIDE: Override[MgpuIndexedConfig] = Override("mgpu_indexed_config")


def override(config: MgpuIndexedConfig):
    """Launch forwards traced inside with ``config`` (tuning; wrap a fresh function: jit caches by
    function, not by this setting)."""
    return _OVERRIDE.use(config)


def tile_tokens(G: int) -> int:
    """Tokens per warpgroup for G query heads per kv head: 64 / G below 64 heads, else 1."""
    return max(1, ROWS_PER_WG // G)


def unsupported(q, k, v, *, span: int) -> str | None:
    """Why this kernel cannot run the problem, or None when it can."""
    Hq, D = q.shape[2:]
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (bf16 / fp16 only)"
    if D != Dv or D not in (64, 128):
        return f"head dims D={D}, Dv={Dv} (equal, 64 or 128)"
    if G not in (8, 16, 32, 64) and G % 128:
        return (f"{G} query heads per kv head (8, 16, 32, 64 or a multiple of 128: a warpgroup's 64 MMA rows "
                "are whole groups of heads, in 8-row tiles)")
    if span not in SPANS:
        return f"block size {span} (one of {SPANS})"
    if Skv % span:
        return f"Skv={Skv} not a multiple of the block size {span}"
    if G % (ROWS_PER_WG * COMPUTE_WGS) and span > SEPARATE_STEP_KEYS:
        return (f"block size {span} with {G} query heads per kv head (a warpgroup per token needs two K/V "
                f"rings; steps of {span} keys overflow shared memory)")
    return None


@dataclasses.dataclass(frozen=True)
class _Geo:
    B: int
    Sq: int
    Hq: int
    Hkv: int
    D: int
    n: int       # slots per list
    span: int
    causal: bool
    scale: float
    dtype: object
    cfg: MgpuIndexedConfig

    @property
    def G(self):
        return self.Hq // self.Hkv

    @property
    def shared(self) -> bool:
        return self.G % (ROWS_PER_WG * COMPUTE_WGS) == 0

    @property
    def rings(self) -> int:
        return 1 if self.shared else COMPUTE_WGS

    @property
    def step_keys(self) -> int:
        keys = self.cfg.step_keys or (SHARED_STEP_KEYS if self.shared else SEPARATE_STEP_KEYS)
        return max(keys, self.span)

    @property
    def per_step(self) -> int:  # blocks per pipeline step
        return self.step_keys // self.span

    @property
    def T(self) -> int:  # tokens per warpgroup
        return tile_tokens(self.G)

    @property
    def heads_per_wg(self) -> int:
        return min(self.G, ROWS_PER_WG)

    @property
    def heads_per_cta(self) -> int:
        return self.heads_per_wg * (COMPUTE_WGS if self.shared else 1)

    @property
    def tiles_per_cta(self) -> int:
        return 1 if self.shared else COMPUTE_WGS

    @property
    def n_tiles(self) -> int:
        return common.cdiv(self.Sq, self.T)


class _Row:
    """What a compute warpgroup (or the memory warpgroup, for warpgroup ``w``) works on: query tile
    ``tile`` (tokens ``t0 .. t0 + T - 1``; ``live`` when it exists), query heads
    ``head0 .. head0 + heads_per_wg - 1`` of kv head ``hkv``, and its list's pipeline steps."""

    def __init__(self, g: _Geo, refs, w):
        b = lax.axis_index("batch")
        hb = lax.axis_index("heads")
        tok = lax.axis_index("tok")
        self.b = b
        if g.shared:
            self.tile = tok
            self.head0 = hb * g.heads_per_cta + w * g.heads_per_wg
        else:
            self.tile = tok * g.tiles_per_cta + w
            self.head0 = hb * g.heads_per_cta
        self.t0 = self.tile * g.T
        self.hkv = lax.div(self.head0, jnp.int32(g.G))
        self.live = self.tile < g.n_tiles
        self.tc = jnp.minimum(self.tile, g.n_tiles - 1)  # clamped: never address past the arrays
        self.count = jnp.where(self.live, refs["count"][b, self.tc, self.hkv], 0)
        self.n_steps = lax.div(self.count + (g.per_step - 1), jnp.int32(g.per_step))
        self.refs, self.g = refs, g

    def _slot(self, name, slot, empty):
        s = jnp.minimum(slot, self.g.n - 1)
        return jnp.where(slot < self.count, self.refs[name][self.b, self.tc, self.hkv, s], empty)

    def unit(self, slot):
        """Block id at list ``slot`` (-1 past the row's count); reads are clamped."""
        return self._slot("idx", slot, -1)

    def members(self, slot):
        """Membership bits of list ``slot`` (bit j: token t0 + j listed it); tiles only."""
        return self._slot("bits", slot, 0)

    def token_rows(self, j):
        """(source, destination) row slices of the tile's token j in the [Sq, Hq, D] operands and the
        warpgroup's [64, D] buffers; the source token is clamped to Sq - 1 (a ragged last tile loads
        a repeat of the last token and never stores it)."""
        t = jnp.minimum(self.t0 + j, self.g.Sq - 1)
        return (self.b, t, pl.ds(self.head0, self.g.heads_per_wg)), pl.ds(j * self.g.heads_per_wg,
                                                                           self.g.heads_per_wg)


def _kernel(g: _Geo, refs_in, o_ref, lse_ref, scratch):
    (qo_smem2, k_smem, v_smem, lse_smem2, k_bar, v_bar, q_bar, k_done, v_done, sched) = scratch
    cfg, bq, bkv, D, steps, per_step, span = g.cfg, ROWS_PER_WG, g.step_keys, g.D, g.cfg.steps, g.per_step, g.span
    T = g.T
    wg = lax.axis_index("wg")
    c = g.scale * softmax.LOG2E
    pingpong = g.shared and cfg.pingpong

    schedule_barrier = functools.partial(flash_loop.schedule_barrier, sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(cfg.compute_regs, action="increase")
        row = _Row(g, refs_in, wg)
        ring = 0 if g.shared else wg
        n = row.n_steps
        qo_smem = qo_smem2.at[wg]
        t0_abs = row.t0 + refs_in["q_off"][row.b]  # absolute position of the tile's first token

        @pl.when(row.live)
        def _():
            for j in range(T):
                src, dst = row.token_rows(j)
                plgpu.copy_gmem_to_smem(refs_in["q"].at[src], qo_smem.at[dst], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

        acc, m_i, l_i = softmax.init(bq, D)

        @pl.when(n > 0)
        def _():
            plgpu.barrier_wait(k_bar.at[ring * steps])

        if pingpong:
            pl.when(wg == 1)(schedule_barrier)

        def per_column(values, laters):
            """[bq, bkv] int32 holding values[j] in the columns of the step's block j (array-scalar
            arithmetic only: the per-block values are scalars)."""
            out = laters[0] * 0 + values[0]
            for j in range(1, per_step):
                out = out + laters[j] * (values[j] - values[j - 1])
            return out

        def allowed(i, _slot):
            """bool [bq, bkv]: keys of step i that are real listed keys of the row's token and (causal)
            not after it."""
            col = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
            laters = [(col >= j * span).astype(jnp.int32) for j in range(per_step)]
            unit = per_column([row.unit(i * per_step + j) for j in range(per_step)], laters)
            pos = unit * span + col - per_column([j * span for j in range(per_step)], laters)
            ok = unit >= 0
            if T == 1:
                return ok & (pos <= t0_abs) if g.causal else ok
            r = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
            tok = r * 0  # the row's token within the tile
            for j in range(1, T):
                tok = tok + (r >= j * g.heads_per_wg).astype(jnp.int32)
            bits = [row.members(i * per_step + j) for j in range(per_step)]
            member = tok * 0
            for j in range(T):
                bit_j = per_column([lax.rem(lax.div(b, jnp.int32(1 << j)), jnp.int32(2)) for b in bits], laters)
                member = member + (tok == j).astype(jnp.int32) * bit_j
            ok = ok & (member > 0)
            return ok & (pos - tok <= t0_abs) if g.causal else ok

        def step(i, carry, *, masked: bool):
            return flash_loop.kv_step(
                i, carry, n=n, slot_of=lambda j: ring * steps + lax.rem(j, jnp.int32(steps)), q_smem=qo_smem,
                k_smem=k_smem, v_smem=v_smem, k_bar=k_bar, v_bar=v_bar, k_done=k_done, v_done=v_done,
                sched=sched if pingpong else None, allowed=allowed if masked else None, c=c,
                dtype=g.dtype)

        # One token per warpgroup: only the last step can hold keys to mask. Tiles: every step
        # (membership).
        first_masked = jnp.maximum(n - 1, 0) if T == 1 else jnp.int32(0)
        carry = lax.fori_loop(0, first_masked, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(first_masked, n, functools.partial(step, masked=True), carry)
        if pingpong:
            pl.when(wg == 0)(schedule_barrier)

        @pl.when(row.live)
        def _():
            o, lse = softmax.finish(acc, m_i, l_i, g.dtype)
            qo_smem[...] = o
            lse_smem = lse_smem2.at[wg]
            lse_smem[...] = lse
            plgpu.commit_smem()
            for j in range(T):
                @pl.when(row.t0 + j < g.Sq)
                def _():
                    dst, src = row.token_rows(j)
                    plgpu.copy_smem_to_gmem(qo_smem.at[src], o_ref.at[dst])
                    plgpu.copy_smem_to_gmem(lse_smem.at[src], lse_ref.at[dst])
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(cfg.memory_regs, action="decrease")
        rows = [_Row(g, refs_in, w) for w in range(g.rings)]

        def fetch(row, ring, i, slot, which, bar):
            src = refs_in[which]
            dst = (k_smem if which == "k" else v_smem).at[ring * steps + slot]
            for j in range(per_step):
                u = jnp.maximum(row.unit(i * per_step + j), 0)  # an unused slot re-reads block 0 (masked)
                plgpu.copy_gmem_to_smem(src.at[row.b, pl.ds(u * span, span), row.hkv],
                                        dst.at[pl.ds(j * span, span)], bar.at[ring * steps + slot])

        for ring, row in enumerate(rows):
            for s0 in range(steps):
                @pl.when(s0 < row.n_steps)
                def _():
                    fetch(row, ring, jnp.int32(s0), s0, "k", k_bar)
                    fetch(row, ring, jnp.int32(s0), s0, "v", v_bar)

        longest = functools.reduce(jnp.maximum, [r.n_steps for r in rows])

        @pl.loop(0, jnp.maximum(longest - steps, 0))
        def _(j):
            i = j + steps
            slot = lax.rem(j, jnp.int32(steps))
            for ring, row in enumerate(rows):
                @pl.when(i < row.n_steps)
                def _():
                    plgpu.barrier_wait(k_done.at[ring * steps + slot])
                    fetch(row, ring, i, slot, "k", k_bar)
                    plgpu.barrier_wait(v_done.at[ring * steps + slot])
                    fetch(row, ring, i, slot, "v", v_bar)


def forward(q, k, v, lists: common.Lists, q_off, *, span: int, scale: float, causal: bool,
            config: MgpuIndexedConfig | None = None):
    """o [B, Sq, Hq, D] (q.dtype), lse f32 [B, Sq, Hq]; see the module docstring.

    ``lists``: canonical block lists (``unique=False``); ``q_off`` int32 [B].
    """
    why = unsupported(q, k, v, span=span)
    if why is not None:
        raise ValueError(f"the Mosaic GPU block-list forward cannot take {why}")
    cfg = config or _OVERRIDE.current() or MgpuIndexedConfig()
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    tiles = common.tile_lists(lists, tile_tokens(Hq // Hkv))
    g = _Geo(B=B, Sq=Sq, Hq=Hq, Hkv=Hkv, D=D, n=tiles.idx.shape[-1], span=span, causal=bool(causal),
             scale=float(scale), dtype=q.dtype, cfg=cfg)
    if g.step_keys % span or g.step_keys > 256:
        raise ValueError(f"step_keys={g.step_keys} must be a multiple of the block size {span} and <= 256")
    inputs = dict(q=q, k=k, v=v, idx=tiles.idx, count=tiles.count, q_off=jnp.asarray(q_off, jnp.int32))
    if tiles.bits is not None:
        inputs["bits"] = tiles.bits
    names = tuple(inputs)
    slots = g.rings * cfg.steps
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, D), q.dtype, transforms=tiled),   # Q, then O
        plgpu.SMEM((slots, g.step_keys, D), k.dtype, transforms=tiled),
        plgpu.SMEM((slots, g.step_keys, D), v.dtype, transforms=tiled),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),                    # lse
        plgpu.Barrier(num_arrivals=g.per_step, num_barriers=slots),             # K filled (one copy per block)
        plgpu.Barrier(num_arrivals=g.per_step, num_barriers=slots),             # V filled
        plgpu.Barrier(num_arrivals=g.T, num_barriers=COMPUTE_WGS),              # Q filled (a copy per token)
        plgpu.Barrier(num_arrivals=COMPUTE_WGS // g.rings, num_barriers=slots),  # K consumed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS // g.rings, num_barriers=slots),  # V consumed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),                                # ping-pong schedule
    )

    def kernel(*refs):
        n_in = len(names)
        _kernel(g, dict(zip(names, refs[:n_in])), refs[n_in], refs[n_in + 1], refs[n_in + 2:])

    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, Sq, Hq, D), q.dtype), jax.ShapeDtypeStruct((B, Sq, Hq), jnp.float32)),
        scratch_types=scratch,
        grid=(common.cdiv(g.n_tiles, g.tiles_per_cta), Hq // g.heads_per_cta, B),
        grid_names=("tok", "heads", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    return call(*inputs.values())
