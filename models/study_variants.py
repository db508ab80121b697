"""The attention variants the study swaps into a trained dense model, each at several densities.

A :class:`Variant` is an :class:`~models.config.AttentionSpec` plus the family it
belongs to and the knob value that sets its density. Families whose layer is not
in this install (``sparse_jax.nn``) are left out and listed by :func:`unavailable`.
"""

from __future__ import annotations

import dataclasses

import sparse_jax.nn as sjnn
from models.config import AttentionSpec

# family -> the sparse_jax.nn layer it needs
FAMILY_LAYERS = {
    "dense": "DenseAttention",
    "sliding_window": "BlockSparseAttention",
    "chunked": "BlockSparseAttention",
    "sinks": "BlockSparseAttention",
    "pbs": "PermutedBlockSparseAttention",
    "pbs_estimate": "PermutedBlockSparseAttention",  # PBS + the dropped-block estimate
    "xattention": "DynamicSparseAttention",
    "xattention_estimate": "DynamicSparseAttention",  # XAttention + the dropped-block estimate
    "topk": "DynamicSparseAttention",
    "vertical_slash": "DynamicSparseAttention",
    "indexed": "IndexedSparseAttention",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    family: str
    knob: str  # e.g. "window=256", "threshold=0.9"
    spec: AttentionSpec

    @property
    def name(self) -> str:
        return self.family if not self.knob else f"{self.family} {self.knob}"


def with_options(spec: AttentionSpec, **options) -> AttentionSpec:
    """``spec`` with extra layer options."""
    return dataclasses.replace(spec, options=dict(spec.kwargs, **options))


def swap_variants(seq_len: int, block_size: int, *, thresholds=(0.95, 0.9, 0.8, 0.6),
                  fractions=(1 / 2, 1 / 4, 1 / 8), segment_size: int | None = None) -> list[Variant]:
    """Every available variant at ``seq_len`` with ``block_size`` tables, ordered round-robin
    over the families (dense first).

    Static masks use windows / chunks of ``fraction * seq_len`` (at least one block);
    threshold methods use ``thresholds``; budgeted methods keep ``fraction`` of the blocks
    (top-k) or of the keys (vertical-slash, indexed). PBS permutes within ``segment_size``
    tokens (default: 4 blocks, at most a quarter of the sequence).
    """
    nb = -(-seq_len // block_size)
    sizes = sorted({max(block_size, int(seq_len * f) // block_size * block_size) for f in fractions}, reverse=True)
    out = [Variant("dense", "", AttentionSpec("dense"))]
    for w in sizes:
        out.append(Variant("sliding_window", f"window={w}", AttentionSpec("block_sparse", mask=("sliding_window", w))))
    for c in sizes:
        out.append(Variant("chunked", f"chunk={c}", AttentionSpec("block_sparse", mask=("chunked", c))))
    for w in sizes:
        out.append(Variant("sinks", f"window={w},sinks={block_size}",
                           AttentionSpec("block_sparse", mask=("sinks", w, block_size))))
    segment = segment_size or min(4 * block_size, max(block_size, seq_len // 4 // block_size * block_size))
    if segment % block_size:
        raise ValueError(f"segment_size={segment} must be a multiple of block_size={block_size}")
    for t in thresholds:
        out.append(Variant("pbs", f"threshold={t}", AttentionSpec(
            "permuted", options=dict(threshold=t, segment_size=segment))))
    for t in thresholds:
        out.append(Variant("pbs_estimate", f"threshold={t}", AttentionSpec(
            "permuted", options=dict(threshold=t, segment_size=segment, estimate_dropped=True))))
    for t in thresholds:
        out.append(Variant("xattention", f"threshold={t}", AttentionSpec(
            "dynamic", options=dict(selection="xattention", threshold=t, stride=min(8, block_size)))))
    for t in thresholds:
        out.append(Variant("xattention_estimate", f"threshold={t}", AttentionSpec(
            "dynamic", options=dict(selection="xattention", threshold=t, stride=min(8, block_size),
                                    estimate_dropped=True))))
    for f in fractions:
        k = max(2, int(nb * f))
        out.append(Variant("topk", f"blocks={k}",
                           AttentionSpec("dynamic", options=dict(selection="topk", num_blocks=k))))
    for f in fractions:
        n = max(block_size, int(seq_len * f) // 2)
        out.append(Variant("vertical_slash", f"vertical={n},slash={n}", AttentionSpec(
            "dynamic", options=dict(selection="vertical_slash", vertical_size=n, slash_size=n,
                                    last_q=min(64, seq_len)))))
    for f in fractions:
        k = max(block_size, int(seq_len * f))
        out.append(Variant("indexed", f"topk={k}", AttentionSpec("indexed", options=dict(topk=k))))
    unique = {v.name: v for v in out}  # small sequences collapse some budgets onto one another
    kept = [v for v in unique.values() if hasattr(sjnn, FAMILY_LAYERS[v.family])]
    # Round-robin over families (densest first within each), so a time budget that cuts the
    # list short drops the sparsest settings of every family rather than whole families.
    rank, seen = {}, {}
    for v in kept:
        rank[v.name] = seen[v.family] = seen.get(v.family, -1) + 1
    families = list(dict.fromkeys(v.family for v in kept))
    return sorted(kept, key=lambda v: (rank[v.name], families.index(v.family)))


def unavailable() -> list[str]:
    """Families the study would run but this install lacks the layer for."""
    return sorted(f for f, layer in FAMILY_LAYERS.items() if not hasattr(sjnn, layer))


def recording(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` with density recording on (the study reads the sown densities)."""
    return with_options(spec, record_density=True)
