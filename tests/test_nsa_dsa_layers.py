"""NativeSparseAttention and IndexedSparseAttention layers: shapes, jit, gradients, branch semantics,
kernel backend vs the xla backend, the indexer's distillation loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import nn as snn
from sparse_jax.reference import dense_attention
from tests.conftest import assert_close, tolerance

D_MODEL, HQ, HKV, HD = 32, 4, 2, 8


def _x(S=24, B=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, S, D_MODEL), jnp.float32)


def _nsa(**kw):
    args = dict(compress_block=8, compress_stride=4, select_block=8, num_selected=2, window=8, block_size=16)
    args.update(kw)
    return snn.NativeSparseAttention(D_MODEL, HQ, HKV, HD, rngs=nnx.Rngs(0), **args)


def _dsa(**kw):
    args = dict(topk=6, index_heads=2, index_head_dim=8)
    args.update(kw)
    return snn.IndexedSparseAttention(D_MODEL, HQ, HKV, HD, rngs=nnx.Rngs(0), **args)


def _causal_reference(q, k, v):
    S = q.shape[1]
    return dense_attention(q, k, v, jnp.tril(jnp.ones((S, S), bool))[None, None])


def _out_and_grads(model, x):
    """(model(x), d sum(model(x)^2) / d params): one compilation, not an eager op-by-op backward."""
    def loss(m):
        y = m(x)
        return jnp.sum(y ** 2), y
    (_, y), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return y, grads


def _call(model, x):
    return nnx.jit(lambda m, x: m(x))(model, x)


def _norms(state):
    return {"/".join(map(str, p)): float(jnp.linalg.norm(jnp.asarray(v, jnp.float32)))
            for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}


def test_nsa_shapes_jit_grads():
    """MLP compression (mean pooling is checked against its definition in the branches test)."""
    compress = "mlp"
    m = _nsa(compress=compress, backend="xla")
    x = _x()
    y, grads = _out_and_grads(m, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    norms = _norms(grads)
    assert all(np.isfinite(v) for v in norms.values())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate") + (("k_compress_in", "v_compress_out")
                                                                     if compress == "mlp" else ()):
        assert any(name in p and v > 0 for p, v in norms.items()), f"no gradient reaches {name}"


def test_nsa_branches_cover_dense_attention_when_unrestricted():
    """Selecting every block, or a window as long as the sequence, is plain causal attention."""
    S = 24
    m = _nsa(num_selected=3, window=S, backend="xla")

    @nnx.jit
    def run(m, x):
        q, k, v = m.project(x, jnp.arange(S))
        return (q, k, v), m.branches(q, k, v), m.compressed_kv(k, v)

    (q, k, v), (o_cmp, o_slc, o_win), (k_cmp, v_cmp) = run(m, _x(S))
    want = _causal_reference(q, k, v)
    assert_close(o_slc, want, 1e-5, "selected branch")
    assert_close(o_win, want, 1e-5, "window branch")
    # Compressed branch: query t sees mean-pooled blocks that have ended by t.
    ends = np.arange(k_cmp.shape[1]) * 4 + 7
    mask = jnp.asarray(np.arange(S)[:, None] >= ends[None, :])[None, None]
    assert_close(o_cmp, dense_attention(q, k_cmp, v_cmp, mask), 1e-5, "compressed branch")


def test_nsa_selection_forces_first_and_local_blocks():
    S = 40
    m = _nsa(num_selected=3, num_local=2, backend="xla")
    from sparse_jax.ops import block_sparse_attention

    @nnx.jit
    def select(m, x):
        q, k, v = m.project(x, jnp.arange(S))
        k_cmp, v_cmp = m.compressed_kv(k, v)
        _, lse = block_sparse_attention(q, k_cmp, v_cmp, m.cmp_tables.get(S, k_cmp.shape[1]), return_lse=True,
                                        backend="xla")
        return m.select_blocks(q, k_cmp, lse, S)

    blocks = np.asarray(select(m, _x(S)))  # [B, S, Hkv, 3]
    for t in range(S):
        row = blocks[:, t]
        cur = t // 8
        assert np.all((row == -1) | (row * 8 <= t)), "no block after the query"
        assert np.all(np.any(row == 0, axis=-1)), "block 0 always selected"
        assert np.all(np.any(row == cur, axis=-1)), "the query's own block always selected"
        if cur >= 1:
            assert np.all(np.any(row == cur - 1, axis=-1)), "num_local=2: the previous block too"


def test_nsa_kernel_backend_matches_xla():
    x = _x(S=24, B=1)
    y_xla = _call(_nsa(backend="xla"), x)
    y_k = _call(_nsa(backend="triton", interpret=True, select_loop_order="kv"), x)
    assert_close(y_k, y_xla, max(1e-4, tolerance(jnp.float32)), "NSA triton vs xla")


def test_dsa_full_topk_is_causal_attention_and_grads():
    S = 12
    m = _dsa(topk=64, backend="xla")  # topk >= S: every past key selected
    x = _x(S)
    q, k, v = m.project(x, jnp.arange(S))
    want = m.o_proj(_causal_reference(q, k, v))
    y, grads = _out_and_grads(m, x)
    assert_close(y, want, 1e-5, "DSA with topk >= S")
    norms = _norms(grads)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(name in p and v > 0 for p, v in norms.items()), name
    for name in ("index_q", "index_k", "index_w"):  # the main loss never reaches the indexer
        assert all(v == 0 for p, v in norms.items() if name in p), name


@pytest.mark.parametrize("indexer,backend", [("flat", "triton"),
                                             pytest.param("hierarchical", "xla", marks=pytest.mark.slow)])
def test_dsa_kernel_backend_indexer_loss(indexer, backend):
    """Kernel path == xla path; the KL loss is finite, >= 0, and trains only the indexer.
    (The hierarchical indexer's kernels are covered in test_indexers.py; here only its wiring.)"""
    x = _x(S=16, B=1)
    kw = dict(topk=6, indexer=indexer, index_block_size=4, index_num_blocks=3, indexer_loss=True)
    mk = _dsa(backend=backend, interpret=backend == "triton", **kw)
    mx = _dsa(backend="xla", **kw)
    assert_close(_call(mk, x), _call(mx, x), max(1e-4, tolerance(jnp.float32)), f"DSA ({indexer}) {backend} vs xla")
    loss_k = jax.tree_util.tree_leaves(nnx.pop(mk, nnx.Intermediate))[0]
    loss_x = jax.tree_util.tree_leaves(nnx.pop(mx, nnx.Intermediate))[0]
    assert np.isfinite(float(loss_k)) and float(loss_k) >= 0
    np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=max(1e-4, tolerance(jnp.float32)), atol=1e-6)

    def aux(m):
        m(x)
        return jax.tree_util.tree_leaves(nnx.pop(m, nnx.Intermediate))[0]

    norms = _norms(nnx.jit(nnx.grad(aux))(mx))
    assert any("index_q" in p and v > 0 for p, v in norms.items())
    assert any("index_w" in p and v > 0 for p, v in norms.items())
    assert all(v == 0 for p, v in norms.items() if "q_proj" in p and "index" not in p)


def test_layer_errors():
    with pytest.raises(ValueError, match="compress"):
        _nsa(compress="max")
    with pytest.raises(ValueError, match="indexer"):
        _dsa(indexer="sorted")
    with pytest.raises(ValueError, match="segment_ids"):
        _dsa(backend="xla")(_x(8), segment_ids=jnp.zeros((2, 8), jnp.int32))
