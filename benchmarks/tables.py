"""Suite "tables": how fast BlockMask tables are built, against splash attention's MaskInfo.

Masks: causal, causal sliding window (4096) and causal packed documents (random
lengths, ~S/4096 documents), S = 8K ... 128K (quick: 8K, 16K), block 128, one head.

sparse_jax
  sparse_jax_host         ``create_block_mask`` on the host (numpy), table cache cleared
                          before every call: all eight tables (rows and their transposes)
  sparse_jax_host_cached  the same call hitting the cache (what a training step pays)
  sparse_jax_jit          under ``jit`` on the current device: causal / window as a
                          traced block selection (random, as runtime top-k would give)
                          AND the mask via ``BlockMask.from_block_bool``; documents as
                          ``create_block_mask`` with traced segment ids
splash attention (jax.experimental.pallas.ops.tpu.splash_attention)
  splash_mask_info        ``process_mask`` + ``process_mask_dkv`` (forward and dK/dV
                          tables, the pair comparable to ours) on CausalMask / LocalMask,
                          and on a dense NumpyMask for documents (splash has no document
                          mask class; its kernel takes segment ids at run time instead;
                          S <= 32K);
                          its lru_cache is cleared before every call
  splash_dynamic_mask_info ``process_dynamic_mask`` (+ dkv) under ``jit`` from a dense
                          [1, S, S] mask array, where that array fits (S <= 32K; the
                          dense array is an input, not timed)

Slow cases are timed once; a splash case whose predicted time (S^2 scaling from the
previous size) exceeds its budget, or whose dense mask would not fit, is recorded as
skipped with the reason (``error = "skipped: ..."``, counted apart from errors). Sizes
run in ascending order, all mask kinds per size. The traced builder is compiled with
XLA's constant folding off (see :func:`jit_build`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.timing import Result

BLOCK = 128
WINDOW = 4096
DOC_LEN = 4096
SIZES = (8192, 16384, 32768, 65536, 131072)
QUICK_SIZES = (8192, 16384)
KINDS = ("causal", "sliding_window", "document")
HOST_DENSE_LIMIT = 32768  # a dense numpy [S, S] document mask for splash's NumpyMask (1 GiB)


def doc_ids(seed: int, S: int, mean_len: int = DOC_LEN) -> np.ndarray:
    """int32 [S]: packed documents (sorted ids) with random boundaries, about S / mean_len of them."""
    rng = np.random.default_rng(seed)
    n = max(2, S // mean_len)
    cuts = np.sort(rng.choice(np.arange(1, S), size=n - 1, replace=False))
    ids = np.zeros(S, np.int32)
    ids[cuts] = 1
    return np.cumsum(ids).astype(np.int32)


def sj_mask(kind: str, ids=None):
    from sparse_jax import masks
    if kind == "causal":
        return masks.causal
    if kind == "sliding_window":
        return masks.sliding_window(WINDOW, causal=True)
    return masks.document(ids) & masks.causal


def splash_mask(kind: str, S: int, ids=None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    if kind == "causal":
        m = sm.CausalMask((S, S))
    elif kind == "sliding_window":
        m = sm.LocalMask((S, S), (WINDOW - 1, 0), 0)
    else:
        m = sm.NumpyMask(dense_document_mask(ids))
    return sm.MultiHeadMask([m])


def dense_document_mask(ids: np.ndarray) -> np.ndarray:
    """bool [S, S]: same document and causal."""
    S = ids.shape[0]
    return (ids[:, None] == ids[None, :]) & (np.arange(S)[:, None] >= np.arange(S)[None, :])


# -- the timed builders ---------------------------------------------------------------------------
def host_build(kind: str, S: int, *, cached: bool):
    import sparse_jax
    from sparse_jax import block_mask as bm_lib

    def fn(ids=None):
        if not cached:
            bm_lib._CACHE.clear()
        return sparse_jax.create_block_mask(sj_mask(kind, ids), None, None, S, S, BLOCK)
    return fn


def jit_build(kind: str, S: int, example_args):
    """The traced builder, compiled for ``example_args`` with XLA's constant folding off.

    Everything the builder derives from S alone (position iotas, block ranges) is a
    compile-time constant; XLA's GPU pipeline spent minutes folding [S, 16] maps and
    reduce-windows of them at S = 64K / 128K (slow_operation_alarm). A runtime builder
    computes those values anyway, so the compiled program is the same work without the fold.
    """
    import sparse_jax
    if kind == "document":
        f = jax.jit(lambda ids: sparse_jax.create_block_mask(sj_mask(kind, ids), None, None, S, S, BLOCK))
    else:
        mask = sj_mask(kind)
        f = jax.jit(lambda sel: sparse_jax.BlockMask.from_block_bool(sel, S, S, BLOCK, mask_fn=mask))
    lowered = f.lower(*example_args)
    try:
        return lowered.compile({"xla_disable_hlo_passes": "constant_folding"})
    except Exception:  # noqa: BLE001 - an XLA that rejects the option: fold as usual
        return lowered.compile()


def splash_build():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as smi

    def fn(mask):
        clear = getattr(smi._process_mask, "cache_clear", None)
        if clear is not None:
            clear()
        return smi.process_mask(mask, (BLOCK, BLOCK)), smi.process_mask_dkv(mask, (BLOCK, BLOCK))
    return fn


def splash_dynamic_build():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as smi
    return jax.jit(lambda m: (smi.process_dynamic_mask(m, (BLOCK, BLOCK))[0],
                              smi.process_dynamic_mask_dkv(m, (BLOCK, BLOCK))[0]))


def _dense_for_kind(kind: str, S: int, seed: int) -> np.ndarray:
    i = np.arange(S)
    if kind == "causal":
        return i[:, None] >= i[None, :]
    if kind == "sliding_window":
        d = i[:, None] - i[None, :]
        return (d >= 0) & (d < WINDOW)
    return dense_document_mask(doc_ids(seed, S))


# -- the suite ------------------------------------------------------------------------------------
class _Predictor:
    """Time of the previous size per (kind, impl), scaled by (S / S_prev)^2."""

    def __init__(self):
        self.last: dict = {}

    def predict(self, key, S):
        if key not in self.last:
            return None
        S0, t0 = self.last[key]
        return t0 * (S / S0) ** 2

    def update(self, key, S, seconds):
        self.last[key] = (S, seconds)


class Skip(Exception):
    """A case deliberately not run (memory, predicted time); recorded as "skipped: <reason>"."""


def _record(ctx, kind, S, impl, work, *, extra=None):
    shape = dict(S=S, block=BLOCK, mask=kind, heads=1)
    if kind == "sliding_window":
        shape["window"] = WINDOW
    if kind == "document":
        shape["mean_doc_len"] = DOC_LEN
    ex = dict(plot="block_tables", x="S", y="time_ms", panel=kind, plot_title="BlockMask table build time",
              xlabel="sequence length (block 128)")
    ex.update(extra or {})
    name = f"{kind} S={S // 1024}K"
    try:
        t = work()
        ex["n"] = t.n
        r = Result("tables", name, impl, shape, t.ms, spread=t.spread, extra=ex)
    except Skip as e:
        r = Result("tables", name, impl, shape, None, error=f"skipped: {e}"[:500], extra=ex)
    except Exception as e:  # noqa: BLE001 - one failing builder must not stop the sweep
        r = Result("tables", name, impl, shape, None, error=f"{type(e).__name__}: {e}"[:500], extra=ex)
    return ctx.record(r)


def run(ctx) -> list[Result]:
    sizes = QUICK_SIZES if ctx.quick else SIZES
    ours_budget = 0.1 if ctx.quick else 0.5
    splash_budget = 3.0 if ctx.quick else 30.0
    dense_limit = 8192 if ctx.platform == "cpu" else 32768  # [1, S, S] bool for the dynamic splash path
    pred = _Predictor()
    out = []
    # Size-major: every mask kind at 8K before any at 16K, so a short budget still gives all kinds.
    for S, kind in ctx.progress([(S, k) for S in sizes for k in KINDS], desc="tables"):
        out += _case(ctx, kind, S, pred, ours_budget, splash_budget, dense_limit)
    return out


def _case(ctx, kind, S, pred, ours_budget, splash_budget, dense_limit):
    res = []
    nq = S // BLOCK
    host_args = (lambda i: (doc_ids(i, S),)) if kind == "document" else (lambda i: ())

    res.append(_record(ctx, kind, S, "sparse_jax_host", lambda: timing.time_budget(
        host_build(kind, S, cached=False), host_args, budget_s=ours_budget, warmup=1),
        extra={"note": "numpy, cache cleared each call", "main_peer": "splash_mask_info"}))
    res.append(_record(ctx, kind, S, "sparse_jax_host_cached", lambda: timing.time_budget(
        host_build(kind, S, cached=True), host_args, budget_s=ours_budget, warmup=1, rotations=1),
        extra={"note": "cache hit (key includes hashing the segment ids)", "main_peer": "splash_mask_info",
               "summary": False}))

    def jit_args(i):
        if kind == "document":
            return (jnp.asarray(doc_ids(100 + i, S)),)
        return (jax.random.bernoulli(jax.random.key(i), 0.5, (nq, nq)),)

    jit_note = ("traced segment ids" if kind == "document" else "traced random block selection AND the mask")
    res.append(_record(ctx, kind, S, "sparse_jax_jit", lambda: timing.time_budget(
        jit_build(kind, S, jit_args(0)), jit_args, budget_s=ours_budget, warmup=1),
        extra={"note": f"{jit_note}, on {ctx.platform}", "main_peer": "splash_dynamic_mask_info"}))

    def splash_work():
        if kind == "document" and S > HOST_DENSE_LIMIT:
            raise Skip(f"splash has no document mask class: a dense [S, S] NumpyMask would need "
                              f"{S * S / 2**30:.2f} GiB (limit S <= {HOST_DENSE_LIMIT})")
        p = pred.predict((kind, "splash"), S)
        if p is not None and p > splash_budget:
            raise Skip(f"predicted {p:.0f} s per call (S^2 scaling), budget {splash_budget:.0f} s")
        left = ctx.time_left()
        if left is not None and p is not None and p > 0.5 * left:
            raise Skip(f"predicted {p:.0f} s, {left:.0f} s left for the suite")
        masks_ = [splash_mask(kind, S, doc_ids(i, S) if kind == "document" else None) for i in range(1)]
        t = timing.time_budget(splash_build(), lambda i: (masks_[0],), budget_s=splash_budget / 6, warmup=0,
                               min_iters=1, max_iters=10, rotations=1)
        pred.update((kind, "splash"), S, t.median_s)
        return t

    res.append(_record(ctx, kind, S, "splash_mask_info", splash_work,
                       extra={"note": "numpy, process_mask + process_mask_dkv, lru_cache cleared"}))

    def splash_dynamic_work():
        if S > dense_limit:
            raise Skip(f"needs a dense [1, {S}, {S}] mask array ({S * S / 2**30:.2f} GiB); "
                              f"limit S <= {dense_limit} on {ctx.platform}")
        p = pred.predict((kind, "splash_dynamic"), S)
        if p is not None and p > splash_budget:
            raise Skip(f"predicted {p:.0f} s per call, budget {splash_budget:.0f} s")
        dense = jnp.asarray(_dense_for_kind(kind, S, 200))[None]
        t = timing.time_budget(splash_dynamic_build(), lambda i: (dense,), budget_s=ours_budget * 3, warmup=1,
                               min_iters=1, rotations=1)
        pred.update((kind, "splash_dynamic"), S, t.median_s)
        return t

    res.append(_record(ctx, kind, S, "splash_dynamic_mask_info", splash_dynamic_work,
                       extra={"note": f"jit on {ctx.platform} from a dense mask array (input, not timed)"}))
    return res

