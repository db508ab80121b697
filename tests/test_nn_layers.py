"""Flax NNX layers: shapes, jit, grads, remat, checkpoints, dtypes, sharding, errors.

Layers are checked against naive einsum/softmax references written here, on the
xla backend (fast on CPU); one case runs the Pallas kernels through the layer in
interpret mode via the ``kernel_backend`` fixture.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sparse_jax as sj
import sparse_jax.nn as sjnn
from tests.conftest import assert_close, randn, rel_err

HP = jax.lax.Precision.HIGHEST


# -- naive references ---------------------------------------------------------------------------
def naive_rope(x, positions, theta=10000.0, fraction=1.0):
    """Rotation of feature pairs (i, i + half) written with complex numbers."""
    D = x.shape[-1]
    rot = int(D * fraction) // 2 * 2
    half = rot // 2
    freq = theta ** (-np.arange(half) * 2.0 / rot)
    ang = np.asarray(positions, np.float64)[..., None, None] * freq  # [B|1, S, 1, half]
    xn = np.asarray(x, np.float64)
    z = (xn[..., :half] + 1j * xn[..., half:rot]) * np.exp(1j * ang)
    return np.concatenate([z.real, z.imag, xn[..., rot:]], axis=-1)


def naive_attention_layer(layer, x, allowed, positions=None):
    """The layer's math by hand. allowed: bool [S, S] or [B, S, S]; x float32 [B, S, d_model]."""
    B, S, _ = x.shape
    pos = np.arange(S) if positions is None else positions
    q = jnp.einsum("bsd,dhk->bshk", x, layer.q_proj.kernel[...], precision=HP)
    k = jnp.einsum("bsd,dhk->bshk", x, layer.k_proj.kernel[...], precision=HP)
    v = jnp.einsum("bsd,dhk->bshk", x, layer.v_proj.kernel[...], precision=HP)
    if layer.rope is not None:
        q = jnp.asarray(naive_rope(q, pos, layer.rope.theta, layer.rope.fraction), jnp.float32)
        k = jnp.asarray(naive_rope(k, pos, layer.rope.theta, layer.rope.fraction), jnp.float32)
    g = layer.num_heads // layer.num_kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HP) * layer.scale
    allowed = jnp.asarray(allowed)
    allowed = allowed[:, None] if allowed.ndim == 3 else allowed[None, None]
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=HP)
    return jnp.einsum("bshk,hkd->bsd", o, layer.o_proj.kernel[...], precision=HP)


def dense_mask(mask, S):
    i = np.arange(S)
    return np.asarray(mask(0, 0, i[:, None], i[None, :]))


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """f32 XLA dots at full precision on every platform (GPUs default to TF32), so the layers
    on the xla backend can be held to the naive references' 1e-5."""
    with jax.default_matmul_precision("float32"):
        yield


def layer_kwargs(**kw):
    """A small GQA layer on the xla backend (the kernels are exercised in test_layer_through_the_kernels)."""
    return dict(d_model=32, num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0), **{"backend": "xla", **kw})


# -- RoPE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_complex_rotation(fraction):
    x = randn(1, (2, 12, 3, 16))
    pos = jax.random.randint(jax.random.key(2), (2, 12), 0, 1000)
    got = sjnn.apply_rope(x, pos, theta=500.0, fraction=fraction)
    assert_close(got, naive_rope(x, pos, 500.0, fraction), 1e-5, "rope")
    if fraction < 1:
        np.testing.assert_array_equal(got[..., 8:], x[..., 8:])


def test_rope_scores_depend_on_relative_position_only():
    q, k = randn(3, (1, 1, 1, 8)), randn(4, (1, 1, 1, 8))
    score = lambda m, n: float(jnp.sum(sjnn.apply_rope(q, jnp.array([m])) * sjnn.apply_rope(k, jnp.array([n]))))
    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(9, 3), rel=1e-3)


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError, match="positions"):
        sjnn.apply_rope(jnp.ones((2, 5, 1, 4)), jnp.arange(4))
    with pytest.raises(ValueError, match="fraction"):
        sjnn.Rope(fraction=1.5)


# -- attention layers ----------------------------------------------------------------------------
MASKS = {
    "causal": sj.masks.causal,
    "sliding": sj.masks.sliding_window(9, causal=True),
    "chunked": sj.masks.chunked(16, causal=True),
    # not classified exactly per block: the host build refines blocks, here inside the jit trace
    "sinks": sj.masks.and_masks(sj.masks.causal, sj.masks.or_masks(sj.masks.sliding_window(8, causal=True),
                                                                  sj.masks.KVPrefix(8))),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_block_sparse_attention_matches_naive_layer(name):
    S = 40  # not a multiple of the block size
    layer = sjnn.BlockSparseAttention(**layer_kwargs(mask=MASKS[name], block_size=16))
    x = randn(5, (2, S, 32))
    pos = jax.random.randint(jax.random.key(6), (2, S), 0, 50)
    y = nnx.jit(lambda m, x, p: m(x, positions=p))(layer, x, pos)
    assert y.shape == (2, S, 32) and y.dtype == jnp.float32
    assert_close(y, naive_attention_layer(layer, x, dense_mask(MASKS[name], S), pos), 1e-5, name)


def test_segment_ids_restrict_attention_to_documents():
    S = 24
    layer = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8))
    x = randn(7, (1, S, 32))
    seg = jnp.array([0] * 10 + [1] * 14)
    allowed = dense_mask(sj.masks.causal, S) & (np.asarray(seg)[:, None] == np.asarray(seg)[None, :])
    assert_close(layer(x, segment_ids=seg), naive_attention_layer(layer, x, allowed), 1e-5, "segments")


def test_causal_block_sparse_equals_dense_with_same_weights_and_grads():
    sparse = sjnn.BlockSparseAttention(**layer_kwargs(block_size=16))
    dense = sjnn.DenseAttention(**{**layer_kwargs(implementation="xla"), "rngs": nnx.Rngs(1)})
    nnx.update(dense, nnx.state(sparse))
    x = randn(8, (2, 32, 32))

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    (ls, gs), (ld, gd) = (nnx.value_and_grad(loss, argnums=(0, 1))(m, x) for m in (sparse, dense))
    assert ls == pytest.approx(float(ld), rel=1e-5)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(gs), jax.tree_util.tree_leaves_with_path(gd)):
        assert np.all(np.isfinite(a)) and float(jnp.abs(a).max()) > 0, path
        assert_close(a, b, 1e-4, str(path))


def test_tables_are_built_once_per_length_and_never_inside_the_step(monkeypatch):
    calls = []
    real = sjnn.attention.create_block_mask
    monkeypatch.setattr(sjnn.attention, "create_block_mask", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    layer = sjnn.BlockSparseAttention(**layer_kwargs(mask=sj.masks.sliding_window(8, causal=True), block_size=8))
    opt = nnx.Optimizer(layer, __import__("optax").sgd(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)
        opt.update(m, grads)

    for i in range(3):
        step(layer, opt, randn(i, (2, 24, 32)))
    assert calls == [24] and layer.tables.builds == 1
    # The tables reach the op as constants of the trace: a jaxpr of the step holds no table math.
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(randn(0, (2, 24, 32)))
    assert not any(e.primitive.name in ("sort", "argsort", "cumsum") for e in jaxpr.eqns)
    layer(randn(1, (1, 16, 32)))  # a new length builds once more
    layer(randn(2, (3, 16, 32)))
    assert calls == [24, 16] and layer.tables.builds == 2


def test_layer_accepts_a_prebuilt_block_mask():
    bm = sj.create_block_mask(sj.masks.sliding_window(5, causal=True), None, None, 20, 20, 8)
    layer = sjnn.BlockSparseAttention(**layer_kwargs(mask=bm))
    x = randn(3, (1, 20, 32))
    assert_close(layer(x), naive_attention_layer(layer, x, dense_mask(bm.mask, 20)), 1e-5, "prebuilt")
    with pytest.raises(ValueError, match="q_len=20"):
        layer(randn(3, (1, 24, 32)))


def test_remat_gives_the_same_gradients():
    layer = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8, qk_norm=True))
    x = randn(4, (2, 16, 32))
    plain = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    remat = nnx.grad(lambda m: jnp.sum(nnx.remat(lambda m, x: m(x))(m, x) ** 2))(layer)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        assert_close(a, b, 1e-6, "remat")


def test_orbax_round_trip_restores_identical_outputs(tmp_path):
    layer = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8, qk_norm=True))
    x = randn(9, (1, 16, 32))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "attn", nnx.state(layer))
        ckptr.wait_until_finished()
        fresh = sjnn.BlockSparseAttention(**{**layer_kwargs(block_size=8, qk_norm=True), "rngs": nnx.Rngs(3)})
        assert rel_err(fresh(x), layer(x)) > 1e-2
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: fresh))
        nnx.update(fresh, ckptr.restore(tmp_path / "attn", abstract))
    np.testing.assert_array_equal(fresh(x), layer(x))


def test_bf16_compute_with_f32_params():
    f32 = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8))
    bf16 = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8, dtype=jnp.bfloat16))
    nnx.update(bf16, nnx.state(f32))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x = randn(2, (2, 24, 32))
    y = bf16(x)
    assert y.dtype == jnp.bfloat16
    assert_close(y, f32(x), 3e-2, "bf16")
    g = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(bf16)
    assert all(a.dtype == jnp.float32 and np.all(np.isfinite(a)) for a in jax.tree.leaves(g))


def test_dense_attention_implementations_agree():
    x = randn(11, (2, 20, 32))
    a = sjnn.DenseAttention(**layer_kwargs(block_size=8))
    b = sjnn.DenseAttention(**layer_kwargs(implementation="xla"))
    nnx.update(b, nnx.state(a))
    assert_close(a(x), b(x), 1e-5, "dense")
    assert_close(a(x), naive_attention_layer(a, x, dense_mask(sj.masks.causal, 20)), 1e-5, "dense vs naive")
    full = sjnn.DenseAttention(**layer_kwargs(causal=False, implementation="xla", rope=None))
    assert_close(full(x), naive_attention_layer(full, x, np.ones((20, 20), bool)), 1e-5, "bidirectional")


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=3, num_kv_heads=2), "multiple"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(mask=sj.masks.document(np.zeros(8, np.int32))), "segment_ids"),
])
def test_attention_constructor_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        sjnn.BlockSparseAttention(**{**layer_kwargs(), **bad})


def test_attention_call_errors():
    layer = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8))
    with pytest.raises(ValueError, match=r"\[B, S, 32\]"):
        layer(jnp.ones((2, 8, 16)))
    with pytest.raises(ValueError, match="positions"):
        layer(jnp.ones((2, 8, 32)), positions=jnp.arange(7))


@pytest.mark.skipif(importlib.util.find_spec("pallas_kernels.triton.block_sparse_attention") is None,
                    reason="block-sparse attention kernels not present")
def test_layer_through_the_kernels(kernel_backend):
    backend, interpret = kernel_backend
    kw = layer_kwargs(mask=sj.masks.sliding_window(24, causal=True), block_size=16)
    ref = sjnn.BlockSparseAttention(**kw)
    kern = sjnn.BlockSparseAttention(**{**kw, "backend": backend, "interpret": interpret, "rngs": nnx.Rngs(1)})
    nnx.update(kern, nnx.state(ref))
    x = randn(12, (1, 48, 32))
    assert_close(kern(x), ref(x), 2e-5 if interpret else 2e-3, backend)
    g_ref = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ref)
    g_kern = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(kern)
    for a, b in zip(jax.tree.leaves(g_kern), jax.tree.leaves(g_ref)):
        assert_close(a, b, 1e-4 if interpret else 5e-3, f"{backend} grad")


# -- FFNs ----------------------------------------------------------------------------------------
def test_swiglu_matches_formula():
    f = sjnn.SwiGLU(16, 24, rngs=nnx.Rngs(0))
    x = randn(1, (3, 5, 16))
    want = jnp.dot(jax.nn.silu(jnp.dot(x, f.gate_proj.kernel[...], precision=HP))
                   * jnp.dot(x, f.up_proj.kernel[...], precision=HP), f.down_proj.kernel[...], precision=HP)
    assert_close(f(x), want, 1e-5, "swiglu")


def _moe_reference(layer, x):
    from sparse_jax import moe, reference
    t = x.reshape(-1, layer.d_model)
    r = moe.route(moe.router_logits(t, layer.router[...]), layer.top_k, scoring=layer.scoring)
    y = reference.moe_ffn_from_routing(t, r.weights, r.expert_ids, layer.w_gate[...], layer.w_up[...],
                                       layer.w_down[...])
    if layer.shared is not None:
        y = y + layer.shared(t)
    return y.reshape(x.shape)


@pytest.mark.parametrize("scoring, shared", [("softmax", 0), ("sigmoid", 1)])
def test_moe_feed_forward_matches_reference_and_trains(scoring, shared):
    layer = sjnn.MoEFeedForward(16, 32, 6, 2, scoring=scoring, shared_experts=shared, backend="xla",
                                rngs=nnx.Rngs(0))
    x = randn(2, (2, 12, 16))
    y, aux = nnx.jit(lambda m, x: m(x, return_aux=True))(layer, x)
    assert_close(y, _moe_reference(layer, x), 1e-5, "moe")
    assert int(aux["tokens_per_expert"].sum()) == 24 * 2 and int(aux["dropped"]) == 0
    assert float(aux["load_balance_loss"]) > 0

    def loss(m):
        y, aux = m(x, return_aux=True)
        return jnp.mean(y ** 2) + 0.1 * aux["load_balance_loss"]

    grads = nnx.grad(loss)(layer)
    for name in ("router", "w_gate", "w_up", "w_down"):
        g = getattr(grads, name)[...]
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, name


def test_moe_capacity_drops_assignments():
    layer = sjnn.MoEFeedForward(16, 32, 4, 2, capacity_factor=0.5, backend="xla", rngs=nnx.Rngs(0))
    _, aux = layer(randn(3, (64, 16)), return_aux=True)
    assert int(aux["dropped"]) > 0


def test_moe_errors():
    with pytest.raises(ValueError, match="top_k"):
        sjnn.MoEFeedForward(16, 32, 4, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[..., 16\]"):
        sjnn.MoEFeedForward(16, 32, 4, 2, rngs=nnx.Rngs(0))(jnp.ones((3, 8)))


# -- sharding ------------------------------------------------------------------------------------
def test_logical_axes_and_one_device_mesh():
    mesh = jax.make_mesh((1, 1, 1), ("data", "model", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    attn = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8))
    moe = sjnn.MoEFeedForward(32, 16, 4, 2, shared_experts=1, backend="xla", rngs=nnx.Rngs(0))
    logical = nnx.get_partition_spec(nnx.state(attn))
    assert tuple(logical["q_proj"]["kernel"].get_value()) == ("embed", "heads", "head_dim")
    assert tuple(logical["k_proj"]["kernel"].get_value()) == ("embed", "kv_heads", "head_dim")
    assert tuple(logical["o_proj"]["kernel"].get_value()) == ("heads", "head_dim", "embed")
    specs = sjnn.partition_specs(moe, mesh=mesh)
    assert specs["w_gate"].get_value() == jax.sharding.PartitionSpec("expert", None, "model")
    assert specs["w_down"].get_value() == jax.sharding.PartitionSpec("expert", "model", None)
    x = randn(1, (2, 16, 32))
    want_attn, want_moe = attn(x), moe(x)
    for m in (attn, moe):
        sjnn.shard_model(m, mesh)
    assert attn.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    assert_close(nnx.jit(lambda m, x: m(x))(attn, x), want_attn, 1e-6, "sharded attn")
    assert_close(nnx.jit(lambda m, x: m(x))(moe, x), want_moe, 1e-6, "sharded moe")


# -- runtime-selected sparsity -----------------------------------------------------------------
DYNAMIC = {
    "pbs": (lambda **kw: sjnn.PermutedBlockSparseAttention(segment_size=16, block_size=8, **kw), "threshold", 1.0, 0.3),
    "xattention": (lambda **kw: sjnn.DynamicSparseAttention(selection="xattention", block_size=8, **kw),
                   "threshold", 1.0, 0.3),
    "topk": (lambda **kw: sjnn.DynamicSparseAttention(selection="topk", block_size=8, **kw), "num_blocks", 4, 2),
    "vertical_slash": (lambda **kw: sjnn.DynamicSparseAttention(selection="vertical_slash", block_size=8,
                                                                 slash_size=2, last_q=8, **kw),
                       "vertical_size", 32, 2),
}


@pytest.mark.parametrize("name", list(DYNAMIC))
def test_dynamic_layers_full_budget_is_dense_and_small_budget_is_sparser(name):
    make, knob, full, small = DYNAMIC[name]
    S = 32
    dense = sjnn.DenseAttention(**layer_kwargs(implementation="xla", record_density=True))
    x = randn(13, (2, S, 32))
    want = dense(x)
    causal_density = float(nnx.pop(dense, nnx.Intermediate)["density"][0])
    for budget, exact in ((full, True), (small, False)):
        layer = make(**{**layer_kwargs(record_density=True), "rngs": nnx.Rngs(5), knob: budget})
        nnx.update(layer, nnx.state(dense, nnx.Param))
        y = nnx.jit(lambda m, x: m(x))(layer, x)
        density = float(nnx.pop(layer, nnx.Intermediate)["density"][0])
        if exact:
            assert_close(y, want, 1e-5, f"{name} full budget")
        else:
            assert density < causal_density, (density, causal_density)
            assert np.all(np.isfinite(y))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_dynamic_layer_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        sjnn.DynamicSparseAttention(**layer_kwargs(selection="topk"))
    with pytest.raises(ValueError, match="selection"):
        sjnn.DynamicSparseAttention(**layer_kwargs(selection="oracle"))
    with pytest.raises(ValueError, match="multiple of block_size"):
        sjnn.PermutedBlockSparseAttention(**layer_kwargs(segment_size=24, block_size=16))
    with pytest.raises(ValueError, match="segment_ids"):
        sjnn.PermutedBlockSparseAttention(**layer_kwargs(segment_size=16, block_size=8))(
            jnp.ones((1, 16, 32)), segment_ids=jnp.zeros(16, jnp.int32))


def test_linen_bridge():
    import flax.linen as nn

    x = randn(3, (2, 16, 32))
    lin = nnx.bridge.to_linen(sjnn.BlockSparseAttention, 32, 4, 2, block_size=8, backend="xla")
    with nnx.use_eager_sharding(False):
        variables = lin.init(jax.random.key(0), x)
    y = jax.jit(lin.apply)(variables, x)
    assert y.shape == x.shape and isinstance(lin, nn.Module)
    nnx_layer = sjnn.BlockSparseAttention(**layer_kwargs(block_size=8))
    params = variables["params"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(nnx_layer, name).kernel[...] = nn.unbox(params[name]["kernel"])
    assert_close(y, nnx_layer(x), 1e-6, "linen bridge")
