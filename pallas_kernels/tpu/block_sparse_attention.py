"""Block-sparse FlashAttention for TPUs: the ``mosaic_tpu`` backend of
:func:`sparse_jax.block_sparse_attention` (interface in ``sparse_jax/ops/attention.py``).

Pipeline of one call:

1. Tiles: the kernels work on tiles that are multiples of 128 and, where the
   mask's logical blocks allow, whole multiples of them. With concrete (host)
   tables the tiles are picked by a cost model of the pass on this mask
   (:mod:`pallas_kernels.tpu.cost_model`); traced tables get per-generation
   defaults (:mod:`pallas_kernels.tpu.configs`).
2. Tables: :mod:`pallas_kernels.common.coarse_tables` turns the BlockMask into
   per-row lists of active tiles with the class of every logical sub-block (and
   every query head, for per-head masks under GQA) packed beside each entry, so
   coarsening is exact (no pair is added or dropped).
3. Kernels: forward (:mod:`attention_fwd`), dQ and dK/dV (:mod:`attention_bwd`),
   each with one K/V (or Q/dO) fetch per GQA group and step.

float16 is refused: TPUs have no float16 matrix unit path (use bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import attention_tiling as tiling_lib
from pallas_kernels.common import coarse_tables
from pallas_kernels.tpu import attention_bwd, attention_fwd, configs, cost_model
from pallas_kernels.tpu import attention_tiles as at
from sparse_jax import _compat

# Half of SMEM: the rest holds the kernel's own scalars and Mosaic's bookkeeping.
_SMEM_BUDGET_FRACTION = 0.5
# Sub-blocks per tile beyond which coarsening a fine mask stops paying (mask work per element grows).
MAX_SUBS_PER_TILE = 256


def _strip_arrays(mask):
    """The mask with its array leaves (document ids) removed: kernels pass segment ids explicitly."""
    if mask is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    return jax.tree_util.tree_unflatten(treedef, [None] * len(leaves))


def problem(q, k, v, block_mask, q_seg, q_pos, kv_pos, *, scale, softcap, segments_everywhere) -> at.Problem:
    if q.dtype == jnp.float16:
        raise ValueError("backend 'mosaic_tpu' does not support float16 (TPUs have no float16 matmul path); "
                         "use bfloat16 or float32")
    B, Sq, Hq, D = q.shape
    return at.Problem(batch=B, q_len=Sq, kv_len=k.shape[1], num_q_heads=Hq, num_kv_heads=k.shape[2],
                      head_dim=D, head_dim_v=v.shape[-1], dtype=q.dtype, scale=float(scale),
                      softcap=None if softcap is None else float(softcap), mask=_strip_arrays(block_mask.mask),
                      has_q_pos=q_pos is not None, has_kv_pos=kv_pos is not None, has_segments=q_seg is not None,
                      segments_everywhere=bool(segments_everywhere) and q_seg is not None)


def plan(kind: str, P: at.Problem, block_mask, *, interpret) -> tuple[coarse_tables.Coarse, coarse_tables.SlotTables,
                                                                     int | None]:
    """Tiles, tables and scoped-VMEM limit of one pass ('fwd', 'dq' or 'dkv').

    Concrete (host) tables and no explicit tiles: the cheapest tiles under the cost
    model (:func:`cost_model.search`). Otherwise the generation's defaults.
    """
    lq, lk = block_mask.block_size
    ov = configs.current_override()
    gen = ov.generation or configs.generation()
    isz = jnp.dtype(P.dtype).itemsize
    explicit = ov.block_q or ov.block_kv or (kind == "dkv" and (ov.dkv_block_q or ov.dkv_block_kv))
    if ov.search and not explicit and coarse_tables.on_host(block_mask):
        shape = cost_model.Shape(P.batch, P.num_q_heads, P.num_kv_heads, P.head_dim, P.head_dim_v, isz,
                                 P.softcap is not None)
        found = cost_model.search(kind, block_mask, shape, gen, max_subs=MAX_SUBS_PER_TILE)
        if found is not None:
            coarse, tables, _ = found
            est = configs.vmem_estimate(kind, coarse.tile_q, coarse.tile_kv, P.group, P.head_dim, P.head_dim_v, isz)
            return coarse, tables, configs.vmem_limit(est, gen)
    tiles = configs.choose_tiles(kind, logical=(lq, lk), q_len=P.q_len, kv_len=P.kv_len, group=P.group,
                                 head_dim=P.head_dim, head_dim_v=P.head_dim_v, itemsize=isz)
    coarse = coarse_tables.Coarse.make(tiles.block_q, tiles.block_kv, (lq, lk), P.q_len, P.kv_len)
    if coarse.subs > MAX_SUBS_PER_TILE:
        raise ValueError(f"the block mask's logical blocks {block_mask.block_size} are too fine for TPU tiles "
                         f"{(tiles.block_q, tiles.block_kv)} ({coarse.subs} logical blocks per tile, at most "
                         f"{MAX_SUBS_PER_TILE}); build the mask with larger blocks or ask for smaller tiles "
                         "(pallas_kernels.tpu.configs.override)")
    tables = coarse_tables.build(block_mask, coarse, num_q_heads=P.num_q_heads, num_kv_heads=P.num_kv_heads,
                                 transpose=kind == "dkv")
    if not interpret:
        budget = _SMEM_BUDGET_FRACTION * configs.CHIPS[gen].smem_bytes
        if tables.smem_bytes > budget:
            raise ValueError(f"block tables need {tables.smem_bytes} bytes of TPU scalar memory (budget {int(budget)}); "
                             "use larger blocks, a mask shared across batch/heads (B=1, H=1 tables), or shorter "
                             "sequences per call")
    return coarse, tables, tiles.vmem_limit_bytes


def interpret_params(interpret):
    """``interpret=True`` -> TPU interpret mode with race detection and NaN-filled memory."""
    if interpret is True:
        return _compat.tpu_interpret_params()
    return interpret or False


def _rows(x, B, S):
    return None if x is None else jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B, S))


def forward(q, k, v, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap, segments_everywhere,
            interpret):
    """See ``sparse_jax/ops/attention.py``: -> (o [B, Sq, Hq, Dv] q.dtype, lse f32 [B, Hq, Sq])."""
    P = problem(q, k, v, block_mask, q_seg, q_pos, kv_pos, scale=scale, softcap=softcap,
                segments_everywhere=segments_everywhere)
    coarse, tables, vmem = plan("fwd", P, block_mask, interpret=interpret)
    metas = at.meta_arrays(P, q_seg, kv_seg, q_pos, kv_pos, rows_are_q=True)
    return attention_fwd.call(P, coarse, tables, q, k, v, metas, interpret=interpret_params(interpret),
                              vmem_limit_bytes=vmem)


def backward(q, k, v, o, lse, do, block_mask, q_seg, kv_seg, q_pos, kv_pos, *, scale, softcap,
             segments_everywhere, interpret, dlse=None):
    """See ``sparse_jax/ops/attention.py``: -> (dq, dk, dv) in the dtypes of q, k, v."""
    P = problem(q, k, v, block_mask, q_seg, q_pos, kv_pos, scale=scale, softcap=softcap,
                segments_everywhere=segments_everywhere)
    params = interpret_params(interpret)
    B, G, Hkv, Sq = P.batch, P.group, P.num_kv_heads, P.q_len
    # Rows with no allowed key have lse = -inf: +inf makes exp(s - lse) = 0 there instead of
    # exp(-inf + inf) = NaN.
    delta = tiling_lib.row_delta(o, do, lse, dlse)
    stats = [x.reshape(B, Hkv, G, Sq) for x in (jnp.where(lse == -jnp.inf, jnp.inf, lse), delta)]
    coarse_q, rows, vmem_q = plan("dq", P, block_mask, interpret=interpret)
    dq = attention_bwd.call_dq(P, coarse_q, rows, q, k, v, do, *stats,
                               at.meta_arrays(P, q_seg, kv_seg, q_pos, kv_pos, rows_are_q=True),
                               interpret=params, vmem_limit_bytes=vmem_q)
    coarse_kv, cols, vmem_kv = plan("dkv", P, block_mask, interpret=interpret)
    dk, dv = attention_bwd.call_dkv(P, coarse_kv, cols, q, k, v, do, *stats,
                                    at.meta_arrays(P, q_seg, kv_seg, q_pos, kv_pos, rows_are_q=False),
                                    interpret=params, vmem_limit_bytes=vmem_kv)
    return dq, dk, dv
