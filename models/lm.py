"""A config-driven decoder-only LM whose layers each pick their attention and FFN.

``DecoderLM(cfg, rngs=...)(tokens [B, S]) -> (logits float32 [B, S, V], aux)`` where
``aux`` holds the MoE router losses and the DSA indexer losses summed over layers
(zeros without them) and ``aux["aux_loss"]`` is the weighted total the trainer adds
to the task loss.
:func:`swap_attention` rebuilds a model with other attention layers and carries
every matching weight over (the study's "train dense, evaluate sparse").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

import sparse_jax.nn as sjnn
from sparse_jax import masks
from models.config import AttentionSpec, FFNSpec, ModelConfig

_AUX_KEYS = ("load_balance_loss", "z_loss")


def build_mask(spec: tuple) -> masks.Mask:
    """A mask from a config mask spec (see :mod:`models.config`)."""
    kind, *args = spec
    if kind == "causal":
        return masks.causal
    if kind == "sliding_window":
        return masks.sliding_window(args[0], causal=True)
    if kind == "chunked":
        return masks.chunked(args[0], causal=True)
    if kind == "sinks":
        window, sinks = args
        return masks.and_masks(masks.causal, masks.or_masks(masks.sliding_window(window, causal=True),
                                                            masks.KVPrefix(sinks)))
    if kind == "prefix_lm":
        return masks.prefix_lm(args[0])
    raise ValueError(f"unknown mask spec {spec!r}")


_ATTENTION_LAYERS = {
    "dense": "DenseAttention",
    "block_sparse": "BlockSparseAttention",
    "permuted": "PermutedBlockSparseAttention",
    "dynamic": "DynamicSparseAttention",
    "indexed": "IndexedSparseAttention",
    "nsa": "NativeSparseAttention",
}


def make_attention(cfg: ModelConfig, spec: AttentionSpec, rngs: nnx.Rngs) -> sjnn.AttentionBase:
    """The attention layer ``spec`` names, with the model's shared settings."""
    name = _ATTENTION_LAYERS[spec.kind]
    layer_cls = getattr(sjnn, name, None)
    if layer_cls is None:
        raise ValueError(f"attention kind {spec.kind!r} needs sparse_jax.nn.{name}, which this install lacks")
    kwargs = dict(rope=sjnn.Rope(cfg.rope_theta), qk_norm=cfg.qk_norm, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), backend=cfg.backend, interpret=cfg.interpret, rngs=rngs)
    if spec.kind in ("dense", "block_sparse", "permuted", "dynamic"):
        kwargs["block_size"] = cfg.block_size
    if spec.kind == "block_sparse":
        kwargs["mask"] = build_mask(spec.mask)
    kwargs.update(spec.kwargs)
    return layer_cls(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, **kwargs)


def make_ffn(cfg: ModelConfig, spec: FFNSpec, rngs: nnx.Rngs) -> nnx.Module:
    """A SwiGLU or an MoE FFN as ``spec`` says."""
    dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    if spec.kind == "dense":
        return sjnn.SwiGLU(cfg.d_model, spec.d_ff, **dt)
    moe_cls = getattr(sjnn, "MoEFeedForward", None)
    if moe_cls is None:
        raise ValueError("ffn kind 'moe' needs sparse_jax.nn.MoEFeedForward, which this install lacks")
    return moe_cls(cfg.d_model, spec.d_ff, spec.num_experts, spec.top_k, scoring=spec.scoring,
                   shared_experts=spec.shared_experts, capacity_factor=spec.capacity_factor, backend=cfg.backend,
                   interpret=cfg.interpret, **spec.kwargs, **dt)


def _rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.dtype(cfg.param_dtype),
                       scale_init=sjnn.annotate(nnx.initializers.ones, (sjnn.EMBED,)), rngs=rngs)


def _zero_aux():
    return {k: jnp.zeros((), jnp.float32) for k in _AUX_KEYS}


class DecoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)). Returns (x, router aux)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = make_attention(cfg, cfg.attention_for(layer), rngs)
        self.ffn_norm = _rms_norm(cfg, rngs)
        self.ffn = make_ffn(cfg, cfg.ffn_for(layer), rngs)
        self.is_moe = cfg.ffn_for(layer).kind == "moe"

    def __call__(self, x, *, positions=None, segment_ids=None):
        x = x + self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, return_aux=True)
            aux = {k: jnp.asarray(aux[k], jnp.float32) for k in _AUX_KEYS}
        else:
            y, aux = self.ffn(h), _zero_aux()
        return x + y, aux


class DecoderLM(nnx.Module):
    """Token embedding, ``num_layers`` DecoderBlocks, final RMSNorm, LM head (or tied embedding).

    Call: ``tokens`` int [B, S] (optionally ``positions`` int [B, S] | [S] and
    ``segment_ids`` int [B, S] for packed sequences) -> (logits float32 [B, S, V],
    aux: {"load_balance_loss", "z_loss", "indexer_loss", "aux_loss"} float32 scalars).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                               embedding_init=sjnn.annotate(nnx.initializers.normal(1.0), (sjnn.VOCAB, sjnn.EMBED)),
                               **dt)
        self.blocks = nnx.List([DecoderBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = _rms_norm(cfg, rngs)
        self.lm_head = None if cfg.tie_embeddings else sjnn.linear(cfg.d_model, cfg.vocab_size,
                                                                     (sjnn.EMBED, sjnn.VOCAB), rngs=rngs, **dt)

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int [B, S]; got {tokens.dtype} {tuple(tokens.shape)}")
        x = self.embed(tokens)
        totals = _zero_aux()

        def run(block, x):
            return block(x, positions=positions, segment_ids=segment_ids)

        if self.cfg.remat:
            run = nnx.remat(run)
        for block in self.blocks:
            x, aux = run(block, x)
            totals = {k: totals[k] + aux[k] for k in _AUX_KEYS}
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        # DSA layers built with indexer_loss=True sow their indexer's KL loss; collect it here
        # (other intermediates, e.g. recorded densities, stay for the caller).
        sown = jax.tree.leaves(nnx.pop(self, nnx.All(nnx.Intermediate, nnx.PathContains("indexer_loss"))))
        totals["indexer_loss"] = sum(sown, jnp.zeros((), jnp.float32))
        cfg = self.cfg
        totals["aux_loss"] = (cfg.aux_loss_coef * totals["load_balance_loss"] + cfg.z_loss_coef * totals["z_loss"]
                              + cfg.indexer_loss_coef * totals["indexer_loss"])
        return logits.astype(jnp.float32), totals


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def transfer_weights(src: nnx.Module, dst: nnx.Module) -> list[str]:
    """Copy every parameter of ``src`` whose path and shape exist in ``dst`` (in place).

    Returns the paths of ``dst`` that ``src`` did not provide (they keep their init),
    e.g. the gates of an NSA layer loaded from a dense model.
    """
    src_flat = traverse_util.flatten_dict(nnx.state(src, nnx.Param).to_pure_dict())
    dst_state = nnx.state(dst, nnx.Param)
    dst_flat = traverse_util.flatten_dict(dst_state.to_pure_dict())
    missing = []
    for path, value in dst_flat.items():
        s = src_flat.get(path)
        if s is not None and s.shape == value.shape:
            dst_flat[path] = s.astype(value.dtype)
        else:
            missing.append("/".join(map(str, path)))
    nnx.replace_by_pure_dict(dst_state, traverse_util.unflatten_dict(dst_flat))
    nnx.update(dst, dst_state)
    return missing


def swap_attention(model: DecoderLM, attention: AttentionSpec | tuple[AttentionSpec, ...], *, seed: int = 0,
                   **cfg_changes) -> tuple[DecoderLM, list[str]]:
    """A copy of ``model`` with other attention layers (and optional config changes, e.g.
    ``backend``) and every weight that fits carried over. Returns (model, newly initialised paths)."""
    cfg = model.cfg.replace(attention=attention, **cfg_changes)
    new = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    return new, transfer_weights(model, new)
