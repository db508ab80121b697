"""Decoder-LM configuration: per-layer attention and FFN choices, and the presets.

A config is a frozen dataclass of plain values (JSON round-trips through
:meth:`ModelConfig.to_dict` / :meth:`ModelConfig.from_dict`, so checkpoints carry
it). ``attention`` and ``ffn`` are one spec for every layer or a tuple with one
spec per layer.

Attention kinds (see :func:`models.lm.make_attention`):

==================  ========================================================  ==========================
kind                layer                                                     spec fields used
==================  ========================================================  ==========================
``dense``           ``DenseAttention`` (causal)                               options: implementation
``block_sparse``    ``BlockSparseAttention`` with a static mask               mask
``permuted``        ``PermutedBlockSparseAttention`` (PBS-Attn)               options: segment_size, threshold, ...
``dynamic``         ``DynamicSparseAttention`` (xattention / topk / v-slash)  options: selection, ...
``indexed``         ``IndexedSparseAttention`` (DeepSeek sparse attention)    options
``nsa``             ``NativeSparseAttention``                                 options
==================  ========================================================  ==========================

Mask specs (``block_sparse``): ``("causal",)``, ``("sliding_window", w)``,
``("chunked", c)`` (causal inside chunks), ``("sinks", w, n)`` (causal sliding
window of w plus the first n keys), ``("prefix_lm", p)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ATTENTION_KINDS = ("dense", "block_sparse", "permuted", "dynamic", "indexed", "nsa")
FFN_KINDS = ("dense", "moe")
MASK_KINDS = {"causal": 0, "sliding_window": 1, "chunked": 1, "sinks": 2, "prefix_lm": 1}


def _freeze(options) -> tuple[tuple[str, Any], ...]:
    items = options.items() if isinstance(options, dict) else options
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: ``kind`` (see the module table), a ``mask`` spec for
    ``block_sparse``, and ``options``: extra keyword arguments of the layer."""

    kind: str = "dense"
    mask: tuple = ("causal",)
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}; got {self.kind!r}")
        mask = tuple(self.mask)
        if not mask or mask[0] not in MASK_KINDS or len(mask) != 1 + MASK_KINDS[mask[0]]:
            raise ValueError(f"mask spec must be one of ('causal',), ('sliding_window', w), ('chunked', c), "
                             f"('sinks', w, n), ('prefix_lm', p); got {self.mask!r}")
        if any(not isinstance(a, int) or a <= 0 for a in mask[1:]):
            raise ValueError(f"mask spec arguments must be positive ints; got {self.mask!r}")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "options", _freeze(self.options))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. ``block_sparse:sliding_window(256)``."""
        if self.kind == "block_sparse":
            return f"block_sparse:{self.mask[0]}({','.join(map(str, self.mask[1:]))})"
        if self.options:
            return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.options)
        return self.kind


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    """One layer's FFN: a dense SwiGLU of width ``d_ff`` or an MoE of ``num_experts``
    SwiGLU experts of width ``d_ff`` each (``top_k`` routed, ``shared_experts`` always on)."""

    kind: str = "dense"
    d_ff: int = 256
    num_experts: int = 0
    top_k: int = 2
    shared_experts: int = 0
    scoring: str = "softmax"
    capacity_factor: float | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in FFN_KINDS:
            raise ValueError(f"ffn kind must be one of {FFN_KINDS}; got {self.kind!r}")
        if self.d_ff <= 0:
            raise ValueError(f"d_ff must be positive; got {self.d_ff}")
        if self.kind == "moe" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"an MoE FFN needs 1 <= top_k <= num_experts; got top_k={self.top_k}, "
                             f"num_experts={self.num_experts}")
        object.__setattr__(self, "options", _freeze(self.options))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM (pre-norm, RMSNorm, RoPE, GQA, SwiGLU / MoE).

    attention / ffn: one spec for all layers or a tuple of ``num_layers`` specs.
    aux_loss_coef / z_loss_coef weight the MoE load-balancing and router z losses;
    indexer_loss_coef the DSA indexers' KL losses (layers built with ``indexer_loss=True``).
    dtype / param_dtype: names of the compute and storage dtypes.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    attention: AttentionSpec | tuple[AttentionSpec, ...] = AttentionSpec()
    ffn: FFNSpec | tuple[FFNSpec, ...] = FFNSpec()
    rope_theta: float = 10000.0
    qk_norm: bool = False
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    block_size: int = 128
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    backend: str | None = None
    interpret: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    indexer_loss_coef: float = 1.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name, spec_t in (("attention", AttentionSpec), ("ffn", FFNSpec)):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                v = tuple(v)
                if len(v) != self.num_layers or not all(isinstance(s, spec_t) for s in v):
                    raise ValueError(f"{name} must be one {spec_t.__name__} or {self.num_layers} of them; got {v!r}")
                object.__setattr__(self, name, v)
            elif not isinstance(v, spec_t):
                raise TypeError(f"{name} must be a {spec_t.__name__}; got {type(v).__name__}")

    def attention_for(self, layer: int) -> AttentionSpec:
        return self.attention[layer] if isinstance(self.attention, tuple) else self.attention

    def ffn_for(self, layer: int) -> FFNSpec:
        return self.ffn[layer] if isinstance(self.ffn, tuple) else self.ffn

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able dict (inverse: :meth:`from_dict`)."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)

        def spec(t, v):
            v = dict(v)
            if "mask" in v:
                v["mask"] = tuple(v["mask"])
            v["options"] = tuple(tuple(o) for o in v.get("options", ()))
            return t(**v)

        for name, t in (("attention", AttentionSpec), ("ffn", FFNSpec)):
            v = d[name]
            d[name] = tuple(spec(t, s) for s in v) if isinstance(v, list) else spec(t, v)
        return cls(**d)


def json_ready(x):
    """Tuples -> lists recursively (what json.dump would produce)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


# -- presets ----------------------------------------------------------------------------------
# (d_model, num_layers, num_heads, num_kv_heads, d_ff): tiny ~ CPU tests, small ~ a few M params,
# base ~ 100M with a 32K vocabulary.
SIZES = {
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 4, 8, 4, 768),
    "medium": (512, 8, 8, 4, 1408),
    "base": (768, 12, 12, 4, 2048),
}


def _size(size: str):
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}; got {size!r}")
    return SIZES[size]


def llama(size: str = "tiny", *, vocab_size: int = 256, attention: AttentionSpec = AttentionSpec(),
          **overrides) -> ModelConfig:
    """Llama-style dense model: GQA, RoPE, SwiGLU."""
    d, layers, heads, kv, ff = _size(size)
    return ModelConfig(vocab_size=vocab_size, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       attention=attention, ffn=FFNSpec("dense", ff), **overrides)


def mixtral(size: str = "tiny", *, vocab_size: int = 256, attention: AttentionSpec = AttentionSpec(),
            num_experts: int = 8, top_k: int = 2, **overrides) -> ModelConfig:
    """Mixtral-style MoE: every FFN is 8 softmax-routed SwiGLU experts, top-2."""
    d, layers, heads, kv, ff = _size(size)
    return ModelConfig(vocab_size=vocab_size, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       attention=attention,
                       ffn=FFNSpec("moe", ff, num_experts=num_experts, top_k=top_k, scoring="softmax"), **overrides)


def deepseek(size: str = "tiny", *, vocab_size: int = 256, attention: AttentionSpec = AttentionSpec(),
             num_experts: int = 16, top_k: int = 4, shared_experts: int = 1, first_dense: int = 1,
             **overrides) -> ModelConfig:
    """DeepSeek-style MoE: fine-grained experts (d_ff / 4 each), sigmoid scoring, a shared
    expert, and the first ``first_dense`` layers dense."""
    d, layers, heads, kv, ff = _size(size)
    moe = FFNSpec("moe", max(ff // 4, 8), num_experts=num_experts, top_k=top_k, shared_experts=shared_experts,
                  scoring="sigmoid")
    ffn = tuple(FFNSpec("dense", ff) if i < first_dense else moe for i in range(layers))
    return ModelConfig(vocab_size=vocab_size, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       attention=attention, ffn=ffn, **overrides)


PRESETS = {"llama": llama, "mixtral": mixtral, "deepseek": deepseek}


def preset(name: str, size: str = "tiny", **kwargs) -> ModelConfig:
    """``preset("llama" | "mixtral" | "deepseek", size, vocab_size=..., attention=..., ...)``."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {name!r}")
    return PRESETS[name](size, **kwargs)
