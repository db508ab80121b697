"""BlockMask: the one block-sparsity description every attention kernel reads.

Layout (FlexAttention's, with static shapes so it lives happily under ``jit``):

=====================  ==========================================  ==========================
field                  shape / dtype                               meaning
=====================  ==========================================  ==========================
kv_num_blocks          int32 [B|1, H|1, nQb]                       partial kv blocks per row
kv_indices             int32 [B|1, H|1, nQb, max_kv_blocks]        their indices, ascending
full_kv_num_blocks     int32 [B|1, H|1, nQb]                       fully-allowed kv blocks
full_kv_indices        int32 [B|1, H|1, nQb, max_full_kv_blocks]
q_num_blocks           int32 [B|1, H|1, nKb]                       transposes, per kv column
q_indices              int32 [B|1, H|1, nKb, max_q_blocks]         (for the dK/dV pass)
full_q_num_blocks      int32 [B|1, H|1, nKb]
full_q_indices         int32 [B|1, H|1, nKb, max_full_q_blocks]
=====================  ==========================================  ==========================

Slots past a row's count repeat the row's last index (0 for an empty row), so a
kernel that walks every slot re-uses the block it already holds instead of
fetching a new one. A "partial" block needs the mask function applied inside it;
a "full" block has every valid pair allowed. Lengths need not be multiples of
the block size: the last block of each axis is ragged and classified on its
valid positions only (kernels bound-check it).

Static data (block size, lengths, the mask's structure) is pytree aux data;
the tables and any arrays a mask reads (segment ids) are leaves.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _block_tables as T
from sparse_jax import masks as masks_lib
from sparse_jax.masks import Mask

__all__ = ["BlockMask", "create_block_mask", "gqa_union", "group_sub_blocks"]

_TABLE_FIELDS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)

# Blocks evaluated element-wise under tracing when a mask's block classes are inexact.
DEFAULT_TRACED_REFINE_BLOCKS = 4096


def _normalize_block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, (int, np.integer)):
        bq = bkv = int(block_size)
    else:
        try:
            bq, bkv = (int(b) for b in block_size)
        except (TypeError, ValueError):
            raise ValueError(f"block_size must be an int or a pair (bq, bkv); got {block_size!r}") from None
    if bq <= 0 or bkv <= 0:
        raise ValueError(f"block sizes must be positive; got ({bq}, {bkv})")
    return bq, bkv


def _is_traced(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree_util.tree_leaves(t))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """Block tables for block-sparse attention (see the module docstring for the layout).

    Build with :func:`create_block_mask`, :meth:`from_block_bool` or :meth:`from_kv_blocks`.
    """

    kv_num_blocks: Any
    kv_indices: Any
    full_kv_num_blocks: Any
    full_kv_indices: Any
    q_num_blocks: Any
    q_indices: Any
    full_q_num_blocks: Any
    full_q_indices: Any
    block_size: tuple[int, int]
    q_len: int
    kv_len: int
    mask: Mask | None = None

    # -- pytree ------------------------------------------------------------------------------
    def tree_flatten(self):
        children = tuple(getattr(self, f) for f in _TABLE_FIELDS) + (self.mask,)
        return children, (self.block_size, self.q_len, self.kv_len)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children[:8], *aux, mask=children[8])

    # -- shapes ------------------------------------------------------------------------------
    @property
    def mask_fn(self) -> Mask | None:
        """The mask applied inside partial blocks (None: selected blocks are fully allowed)."""
        return self.mask

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B|1, H|1, q_len, kv_len)."""
        b, h = self.kv_num_blocks.shape[:2]
        return (b, h, self.q_len, self.kv_len)

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[-1]

    @property
    def max_kv_blocks(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def max_full_kv_blocks(self) -> int:
        return self.full_kv_indices.shape[-1]

    @property
    def max_q_blocks(self) -> int:
        return self.q_indices.shape[-1]

    @property
    def max_full_q_blocks(self) -> int:
        return self.full_q_indices.shape[-1]

    @property
    def density(self):
        """Fraction of block pairs the kernel computes (partial + full)."""
        xp = np if isinstance(self.kv_num_blocks, np.ndarray) else jnp
        b, h = self.kv_num_blocks.shape[:2]
        total = b * h * self.num_q_blocks * self.num_kv_blocks
        n = xp.sum(self.kv_num_blocks.astype(xp.int64 if xp is np else xp.int32)) + xp.sum(self.full_kv_num_blocks)
        d = n / total
        return float(d) if xp is np else d

    # -- views for tests and humans ------------------------------------------------------
    def block_classes(self):
        """int8 [B|1, H|1, nQb, nKb]: 0 empty, 1 partial, 2 full (from the row tables)."""
        xp = np if isinstance(self.kv_indices, np.ndarray) else jnp
        g = T.class_from_lists(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks, T.PARTIAL, xp)
        return T.class_from_lists(self.full_kv_num_blocks, self.full_kv_indices, self.num_kv_blocks, T.FULL, xp, g)

    def block_classes_from_columns(self):
        """The same grid rebuilt from the transposed (column) tables."""
        xp = np if isinstance(self.q_indices, np.ndarray) else jnp
        g = T.class_from_lists(self.q_num_blocks, self.q_indices, self.num_q_blocks, T.PARTIAL, xp)
        g = T.class_from_lists(self.full_q_num_blocks, self.full_q_indices, self.num_q_blocks, T.FULL, xp, g)
        return xp.swapaxes(g, -1, -2)

    def to_dense(self):
        """bool [B|1, H|1, q_len, kv_len]: which pairs the kernels compute. For tests (O(S^2))."""
        cls = jnp.asarray(self.block_classes())
        bq, bkv = self.block_size
        b, h = cls.shape[:2]
        per_q = jnp.repeat(jnp.repeat(cls, bq, axis=2), bkv, axis=3)[:, :, : self.q_len, : self.kv_len]
        if self.mask is None:
            return per_q > 0
        bi = jnp.arange(b)[:, None, None, None]
        hi = jnp.arange(h)[None, :, None, None]
        qi = jnp.arange(self.q_len)[None, None, :, None]
        ki = jnp.arange(self.kv_len)[None, None, None, :]
        allowed = jnp.broadcast_to(self.mask(bi, hi, qi, ki), per_q.shape)
        return (per_q == T.FULL) | ((per_q == T.PARTIAL) & allowed)

    def to_string(self, b: int = 0, h: int = 0, max_cells: int = 64) -> str:
        """Text picture of one (b, h) block pattern: '#' full, '+' partial, '.' empty."""
        cls = np.asarray(self.block_classes())[min(b, self.shape[0] - 1), min(h, self.shape[1] - 1)]
        fq = -(-cls.shape[0] // max_cells)
        fk = -(-cls.shape[1] // max_cells)
        if fq > 1 or fk > 1:  # downsample: a cell shows the densest class under it
            pq, pk = (-cls.shape[0]) % fq, (-cls.shape[1]) % fk
            cls = np.pad(cls, ((0, pq), (0, pk)))
            cls = cls.reshape(cls.shape[0] // fq, fq, cls.shape[1] // fk, fk).max(axis=(1, 3))
        chars = np.array([".", "+", "#"])
        return "\n".join("".join(chars[row]) for row in cls)

    def save_png(self, path: str, b: int = 0, h: int = 0) -> None:
        """Block pattern as a PNG (needs matplotlib)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        cls = np.asarray(self.block_classes())[b, h]
        fig, ax = plt.subplots(figsize=(4, 4 * cls.shape[0] / max(cls.shape[1], 1) + 0.5))
        ax.imshow(cls, cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
        ax.set_xlabel(f"kv block ({self.block_size[1]})")
        ax.set_ylabel(f"q block ({self.block_size[0]})")
        ax.set_title(f"density {self.density:.3f}")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)

    def __repr__(self):
        b, h, _, _ = self.shape
        traced = _is_traced(self.kv_num_blocks)
        head = (f"BlockMask(shape=(B={b}, H={h}, q_len={self.q_len}, kv_len={self.kv_len}), "
                f"block_size={self.block_size}, blocks={self.num_q_blocks}x{self.num_kv_blocks}, "
                f"max_kv_blocks={self.max_kv_blocks}, max_full_kv_blocks={self.max_full_kv_blocks}, "
                f"mask={self.mask!r}")
        if traced:
            return head + ", traced)"
        return head + f", density={self.density:.4f})\n" + self.to_string(max_cells=32)

    # -- builders ---------------------------------------------------------------------------
    @classmethod
    def from_block_bool(cls, block_bool, q_len: int, kv_len: int, block_size=128, mask_fn=None, *,
                        max_kv_blocks: int | None = None, max_q_blocks: int | None = None,
                      max_full_kv_blocks: int | None = None, max_full_q_blocks: int | None = None,
                      classify: bool = True) -> "BlockMask":
        """Tables from a block selection ``block_bool`` bool [B|1, H|1, nQb, nKb] (or [nQb, nKb]).

        Without ``mask_fn`` the selected blocks are fully allowed. With it, a selected
        block is full or partial by the mask's own classification on the layout indices
        and unselected blocks are empty; with ``classify=False`` every selected block is
        partial (the kernel evaluates the mask inside it — what a permuted layout, whose
        mask is evaluated on original positions, needs). Traceable under jit/vmap; ``max_*`` (static) bound the table widths
        (defaults: the exact maximum on the host, the number of blocks under tracing).
        """
        bq, bkv = _normalize_block_size(block_size)
        nq, nk = -(-q_len // bq), -(-kv_len // bkv)
        traced = _is_traced(block_bool, mask_fn)
        xp = jnp if traced else np
        sel = xp.asarray(block_bool).astype(bool)
        if sel.ndim == 2:
            sel = sel[None, None]
        if sel.ndim != 4 or sel.shape[-2:] != (nq, nk):
            raise ValueError(f"block_bool must be [B|1, H|1, {nq}, {nk}] for q_len={q_len}, kv_len={kv_len}, "
                             f"block_size=({bq}, {bkv}); got shape {tuple(sel.shape)}")
        if mask_fn is None:
            grid = xp.where(sel, xp.int8(T.FULL), xp.int8(T.EMPTY))
            mask = None
        else:
            mask = masks_lib.as_mask(mask_fn)
            if classify:
                grid = _classify(mask, sel.shape[0], sel.shape[1], q_len, kv_len, bq, bkv, xp)
            else:
                grid = xp.full(sel.shape, T.PARTIAL, xp.int8)
            grid = xp.where(sel, grid, xp.int8(T.EMPTY))
        return _from_grid(grid, q_len, kv_len, (bq, bkv), mask, xp, max_kv_blocks, max_q_blocks,
                          max_full_kv_blocks, max_full_q_blocks)

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None, *,
                       q_len: int, kv_len: int, block_size=128, mask_fn=None,
                       max_q_blocks: int | None = None, max_full_q_blocks: int | None = None) -> "BlockMask":
        """Tables from per-row block lists (FlexAttention's ``BlockMask.from_kv_blocks``).

        kv_num_blocks int32 [B|1, H|1, nQb], kv_indices int32 [B|1, H|1, nQb, K]: blocks
        that get the mask applied (or that are fully allowed when ``mask_fn`` is None);
        full_kv_* likewise for blocks known to be fully allowed. Duplicates are merged,
        slots past a row's count and indices outside [0, nKb) are ignored as padding.
        Traceable; the transposes are derived here.
        """
        bq, bkv = _normalize_block_size(block_size)
        nq, nk = -(-q_len // bq), -(-kv_len // bkv)
        traced = _is_traced(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, mask_fn)
        xp = jnp if traced else np
        num = xp.asarray(kv_num_blocks).astype(xp.int32)
        idx = xp.asarray(kv_indices).astype(xp.int32)
        if idx.ndim != 4 or num.shape != idx.shape[:3] or num.shape[-1] != nq:
            raise ValueError(f"kv_num_blocks must be [B|1, H|1, {nq}] and kv_indices [B|1, H|1, {nq}, K]; "
                             f"got {tuple(num.shape)} and {tuple(idx.shape)}")
        if not traced:
            used = np.arange(idx.shape[-1]) < num[..., None]
            bad = used & ((idx < 0) | (idx >= nk))
            if bad.any():
                raise ValueError(f"kv_indices holds block indices outside [0, {nk}) in used slots")
        mask = None if mask_fn is None else masks_lib.as_mask(mask_fn)
        grid = T.class_from_lists(num, idx, nk, T.PARTIAL if mask is not None else T.FULL, xp)
        if full_kv_num_blocks is not None:
            grid = T.class_from_lists(xp.asarray(full_kv_num_blocks).astype(xp.int32),
                                      xp.asarray(full_kv_indices).astype(xp.int32), nk, T.FULL, xp, grid)
        max_kv = idx.shape[-1]
        max_full = None if full_kv_indices is None else xp.asarray(full_kv_indices).shape[-1]
        return _from_grid(grid, q_len, kv_len, (bq, bkv), mask, xp, max_kv, max_q_blocks, max_full, max_full_q_blocks)

    def with_mask(self, mask_fn) -> "BlockMask":
        """The same tables with another mask function for partial blocks."""
        return dataclasses.replace(self, mask=None if mask_fn is None else masks_lib.as_mask(mask_fn))

    def coarsen(self, block_size, *, check: bool = True) -> "BlockMask":
        """The same pattern on larger blocks: ``block_size`` (int or (bq, bkv)) multiples of this one's.

        A coarse block is FULL when every logical block inside it is full, PARTIAL when
        any is non-empty, EMPTY otherwise; the mask function is kept and applied inside
        partial coarse blocks. That is exact when the fine tables agree with the mask on
        the layout indices (true for :func:`create_block_mask` tables): every empty fine
        block inside a partial coarse block allows nothing under the mask and every full
        one allows everything. ``check`` verifies this for host (numpy) tables and raises
        ValueError otherwise; traced tables are not checked. Without a mask function a
        coarse block may not mix selected and unselected blocks (checked; traced tables
        without a mask cannot be coarsened). Traceable.
        """
        bq, bkv = _normalize_block_size(block_size)
        fq, fk = self.block_size
        if bq % fq or bkv % fk:
            raise ValueError(f"coarse block {(bq, bkv)} must be a multiple of the current block {(fq, fk)}")
        rq, rk = bq // fq, bkv // fk
        if rq == rk == 1:
            return self
        xp = np if isinstance(self.kv_indices, np.ndarray) else jnp
        fine = self.block_classes()
        sub, valid = group_sub_blocks(fine, rq, rk, xp)
        nonempty = xp.any((sub != T.EMPTY) & valid, axis=-1)
        all_full = xp.all((sub == T.FULL) | ~valid, axis=-1)
        if self.mask is None:
            if xp is jnp:
                raise ValueError("coarsen() of a BlockMask without mask function needs host (numpy) tables "
                                 "so that mixing selected and unselected blocks can be ruled out")
            all_sel = np.all((sub != T.EMPTY) | ~valid, axis=-1)
            if np.any(nonempty & ~all_sel):
                raise ValueError(f"cannot coarsen to {(bq, bkv)}: a coarse block mixes selected and unselected "
                                 "blocks and there is no mask function to tell them apart")
            grid = np.where(nonempty, np.int8(T.FULL), np.int8(T.EMPTY))
        else:
            grid = xp.where(all_full, xp.int8(T.FULL), xp.where(nonempty, xp.int8(T.PARTIAL), xp.int8(T.EMPTY)))
            if check and xp is np:
                b, h = fine.shape[:2]
                exact, _ = group_sub_blocks(_classify(self.mask, b, h, self.q_len, self.kv_len, fq, fk, np),
                                            rq, rk, np)
                partial = (grid == T.PARTIAL)[..., None] & valid
                bad = partial & (((sub == T.EMPTY) & (exact != T.EMPTY)) | ((sub == T.FULL) & (exact != T.FULL)))
                if np.any(bad):
                    raise ValueError(f"cannot coarsen to {(bq, bkv)} exactly: the tables select blocks differently "
                                     f"from what the mask function {self.mask!r} allows, and a coarse partial block "
                                     "would apply the mask to blocks the tables leave out (or restrict blocks they "
                                     "keep whole); use check=False to accept that, or keep the block size")
        return _from_grid(grid, self.q_len, self.kv_len, (bq, bkv), self.mask, xp)


def group_sub_blocks(grid, factor_q: int, factor_kv: int, xp):
    """Group a class grid [..., nQb, nKb] into coarse blocks of factor_q x factor_kv.

    Returns (sub int8 [..., nQc, nKc, factor_q * factor_kv], valid bool of the same
    shape): sub-block ``a * factor_kv + c`` of coarse block (i, j) is fine block
    (i * factor_q + a, j * factor_kv + c); ``valid`` is False for the padding past the
    fine grid (whose class reads EMPTY).
    """
    nq, nk = grid.shape[-2:]
    nqc, nkc = -(-nq // factor_q), -(-nk // factor_kv)
    lead = grid.shape[:-2]
    pad = [(0, 0)] * len(lead) + [(0, nqc * factor_q - nq), (0, nkc * factor_kv - nk)]
    g = xp.pad(grid, pad)
    g = g.reshape(*lead, nqc, factor_q, nkc, factor_kv)
    g = xp.moveaxis(g, -3, -2).reshape(*lead, nqc, nkc, factor_q * factor_kv)
    qv = (xp.arange(nqc * factor_q) < nq).reshape(nqc, 1, factor_q, 1)
    kv = (xp.arange(nkc * factor_kv) < nk).reshape(1, nkc, 1, factor_kv)
    valid = (qv & kv).reshape(nqc, nkc, factor_q * factor_kv)
    return g.astype(xp.int8), xp.broadcast_to(valid, g.shape)


def _classify(mask, B, H, q_len, kv_len, bq, bkv, xp, refine_blocks=None):
    geom = T.geometry(q_len, kv_len, bq, bkv, xp)
    nq, nk = geom.q_lo.shape[0], geom.kv_lo.shape[0]
    grid, todo = T.classify(mask, geom, (B, H, nq, nk))
    return T.refine(mask, grid, todo, geom, max_blocks=refine_blocks)


def _from_grid(grid, q_len, kv_len, block_size, mask, xp, max_kv=None, max_q=None, max_full_kv=None,
               max_full_q=None) -> BlockMask:
    """All eight tables from a class grid int8 [B, H, nQb, nKb]."""
    nq, nk = grid.shape[-2:]
    partial, full = grid == T.PARTIAL, grid == T.FULL

    def width(flags, requested, n, what):
        if requested is not None:
            requested = int(requested)
            if requested <= 0:
                raise ValueError(f"{what} must be positive; got {requested}")
            if xp is np and int(flags.sum(-1).max(initial=0)) > requested:
                raise ValueError(f"{what}={requested} is too small: a row has "
                                 f"{int(flags.sum(-1).max())} blocks")
            return requested
        if xp is np:
            return max(1, int(flags.sum(-1).max(initial=0)))
        return n

    kv_n, kv_i = T.index_lists(partial, width(partial, max_kv, nk, "max_kv_blocks"), xp)
    fkv_n, fkv_i = T.index_lists(full, width(full, max_full_kv, nk, "max_full_kv_blocks"), xp)
    pt, ft = xp.swapaxes(partial, -1, -2), xp.swapaxes(full, -1, -2)
    q_n, q_i = T.index_lists(pt, width(pt, max_q, nq, "max_q_blocks"), xp)
    fq_n, fq_i = T.index_lists(ft, width(ft, max_full_q, nq, "max_full_q_blocks"), xp)
    return BlockMask(kv_n, kv_i, fkv_n, fkv_i, q_n, q_i, fq_n, fq_i, tuple(block_size), int(q_len),
                     int(kv_len), mask)


_CACHE: "collections.OrderedDict[Any, BlockMask]" = collections.OrderedDict()
_CACHE_SIZE = 64


def create_block_mask(mask_fn, B: int | None, H: int | None, q_len: int, kv_len: int, block_size=128, *,
                      max_kv_blocks: int | None = None, max_q_blocks: int | None = None,
                      max_full_kv_blocks: int | None = None, max_full_q_blocks: int | None = None,
                      refine_blocks: int | None = None) -> BlockMask:
    """Block tables of ``mask_fn`` for a (B, H, q_len, kv_len) problem, without any S x S array.

    Args:
      mask_fn: a mask from :mod:`sparse_jax.masks` or ``fn(b, h, q_idx, kv_idx) -> bool``.
      B, H: batch and head counts the mask depends on; None broadcasts (size-1 tables).
      q_len, kv_len: sequence lengths (any positive ints).
      block_size: int or (bq, bkv).
      max_kv_blocks, max_q_blocks, max_full_kv_blocks, max_full_q_blocks: static widths of
        the partial / full row and column tables (default: exact on the host, every block
        under tracing). A host build raises if one is too small.
      refine_blocks: under tracing, how many blocks of an inexactly-classified mask are
        evaluated element-wise (default 4096); on the host all are.

    Blocks are classified analytically (bands, chunks, prefixes, sorted documents are
    exact); compositions or user functions that cannot be classified exactly are
    refined by evaluating only the ambiguous blocks, in chunks. Host builds with the
    same arguments are cached.
    """
    bq, bkv = _normalize_block_size(block_size)
    q_len, kv_len = int(q_len), int(kv_len)
    if q_len <= 0 or kv_len <= 0:
        raise ValueError(f"q_len and kv_len must be positive; got {q_len}, {kv_len}")
    for name, v in (("B", B), ("H", H)):
        if v is not None and int(v) <= 0:
            raise ValueError(f"{name} must be positive or None; got {v}")
    mask = masks_lib.as_mask(mask_fn)
    seg = mask.segment_ids()
    if seg is not None:
        for ids, n, what in ((seg[0], q_len, "q"), (seg[1], kv_len, "kv")):
            shape = np.shape(ids)
            if shape[-1] != n or len(shape) not in (1, 2):
                raise ValueError(f"document {what} segment ids have shape {shape}; expected [{n}] or [B, {n}]")
            if len(shape) == 2 and B is not None and shape[0] not in (1, B):
                raise ValueError(f"document segment ids have batch {shape[0]} but B={B}")
        batches = [np.shape(i)[0] for i in seg if len(np.shape(i)) == 2]
        if B is None and batches:
            B = max(batches)
    Bt, Ht = (1 if B is None else int(B)), (1 if H is None else int(H))
    traced = _is_traced(mask)
    key = None
    if not traced:
        mk = mask.cache_key()
        if mk is not None:
            key = (mk, Bt, Ht, q_len, kv_len, bq, bkv, max_kv_blocks, max_q_blocks, max_full_kv_blocks,
                   max_full_q_blocks)
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                return hit
    xp = jnp if traced else np
    refine = refine_blocks if refine_blocks is not None else DEFAULT_TRACED_REFINE_BLOCKS
    grid = _classify(mask, Bt, Ht, q_len, kv_len, bq, bkv, xp, refine)
    bm = _from_grid(grid, q_len, kv_len, (bq, bkv), mask, xp, max_kv_blocks, max_q_blocks, max_full_kv_blocks,
                    max_full_q_blocks)
    if key is not None:
        _CACHE[key] = bm
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return bm


def gqa_union(block_mask: BlockMask, num_kv_heads: int) -> BlockMask:
    """Per-kv-head tables: the union of the blocks of each group's query heads.

    ``block_mask`` has H = num_q_heads (a multiple of ``num_kv_heads``) or 1. A block is
    full for the group when it is full for every head of the group; otherwise it is
    partial if any head needs it (the kernel still applies the mask per query head).
    Without a mask function, union blocks are fully allowed for every head of the group
    (CompactAttention's semantics: a group shares one selection).
    """
    b, h = block_mask.shape[:2]
    if h == 1 or h == num_kv_heads:
        return block_mask
    if h % num_kv_heads:
        raise ValueError(f"block mask has H={h}, not a multiple of num_kv_heads={num_kv_heads}")
    xp = np if isinstance(block_mask.kv_indices, np.ndarray) else jnp
    g = block_mask.block_classes()
    g = g.reshape(b, num_kv_heads, h // num_kv_heads, *g.shape[2:])
    active = (g > 0).any(2)
    if block_mask.mask is None:
        grid = xp.where(active, xp.int8(T.FULL), xp.int8(T.EMPTY))
    else:
        all_full = (g == T.FULL).all(2)
        grid = xp.where(all_full, xp.int8(T.FULL), xp.where(active, xp.int8(T.PARTIAL), xp.int8(T.EMPTY)))
    return _from_grid(grid, block_mask.q_len, block_mask.kv_len, block_mask.block_size, block_mask.mask, xp,
                      *((None,) * 4 if xp is np else (block_mask.max_kv_blocks, block_mask.max_q_blocks,
                                                       block_mask.max_full_kv_blocks, block_mask.max_full_q_blocks)))
