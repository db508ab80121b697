"""Models: configs, tasks, the decoder LM, training and exact checkpoint resume (CPU, tiny sizes)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import sparse_jax as sj
from models import config as C
from models import lm, tasks
from models import train as T

VOCAB = tasks.Vocab(64, 16, 16)


ON_CPU = jax.default_backend() == "cpu"


def tiny(**kw):
    """A ~100K-param Llama on the xla backend (the kernels have their own tests)."""
    return C.llama("tiny", vocab_size=64, block_size=16, **{"backend": "xla", **kw})


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "mixtral", "deepseek"])
def test_presets_build_and_round_trip_through_json(name):
    cfg = C.preset(name, "tiny", vocab_size=256,
                   attention=C.AttentionSpec("block_sparse", mask=("sinks", 64, 16)))
    assert C.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = nnx.eval_shape(lambda: lm.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert 1e5 <= lm.count_params(model) <= 1e6


def test_base_preset_is_about_100m_params():
    cfg = C.llama("base", vocab_size=32000)
    n = lm.count_params(nnx.eval_shape(lambda: lm.DecoderLM(cfg, rngs=nnx.Rngs(0))))
    assert 80e6 <= n <= 160e6, n


@pytest.mark.parametrize("bad, match", [
    (dict(attention=C.AttentionSpec(), num_layers=0), "num_layers"),
    (dict(attention=(C.AttentionSpec(),)), "2 of them"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny().replace(**bad)


def test_spec_errors():
    with pytest.raises(ValueError, match="attention kind"):
        C.AttentionSpec("magic")
    with pytest.raises(ValueError, match="mask spec"):
        C.AttentionSpec("block_sparse", mask=("sliding_window",))
    with pytest.raises(ValueError, match="top_k"):
        C.FFNSpec("moe", 32, num_experts=2, top_k=3)


# -- tasks ---------------------------------------------------------------------------------------
def test_mqar_answers_are_the_values_paired_with_the_keys():
    task = tasks.MQAR(96, num_pairs=6, num_queries=5, vocab=VOCAB)
    b = jax.jit(task.sample, static_argnums=1)(jax.random.key(3), 4)
    for toks, tgt, w in zip(*(np.asarray(a) for a in b)):
        pairs = dict(zip(toks[0:12:2], toks[1:12:2]))
        assert len(pairs) == 6
        answers = np.nonzero(w)[0]
        assert len(answers) == 5 and answers.min() >= 12
        for p in answers:
            assert tgt[p] == toks[p + 1] == pairs[toks[p]]
        assert np.all(toks[12:] >= VOCAB.key_lo)
    again = task.sample(jax.random.key(3), 4)
    np.testing.assert_array_equal(again.tokens, b.tokens)


def test_needle_answer_is_the_queried_needles_value():
    task = tasks.Needle(80, num_needles=3, vocab=VOCAB)
    b = task.sample(jax.random.key(4), 6)
    for toks, tgt, w in zip(*(np.asarray(a) for a in b)):
        assert np.nonzero(w)[0].tolist() == [78] and toks[77] == VOCAB.QUERY
        needles = {toks[i + 1]: toks[i + 2] for i in np.nonzero(toks[:77] == VOCAB.NEEDLE)[0]}
        assert len(needles) == 3 and tgt[78] == needles[toks[78]]


@pytest.mark.parametrize("task", [tasks.MQAR(32768, num_pairs=64, num_queries=64),
                                  tasks.Needle(32768, num_needles=8)], ids=["mqar", "needle"])
def test_tasks_scale_to_32k_tokens(task):
    b = task.sample(jax.random.key(5), 1)
    assert b.tokens.shape == (1, 32768) and b.tokens.dtype == jnp.int32
    n = 64 if isinstance(task, tasks.MQAR) else 1
    assert int(b.weights.sum()) == n and int(b.tokens.max()) < task.vocab.size


def test_task_errors():
    with pytest.raises(ValueError, match="no room"):
        tasks.MQAR(16, num_pairs=8, num_queries=8, vocab=VOCAB)
    with pytest.raises(ValueError, match="multiple"):
        tasks.make_task("mixture", 64, vocab=VOCAB, mqar_num_pairs=2, mqar_num_queries=2).sample(jax.random.key(0), 3)


# -- the LM --------------------------------------------------------------------------------------
def test_swap_attention_keeps_weights_and_outputs():
    model = lm.DecoderLM(tiny(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 64)
    logits, aux = model(tokens)
    assert logits.shape == (2, 48, 64) and logits.dtype == jnp.float32 and float(aux["aux_loss"]) == 0
    causal, missing = lm.swap_attention(model, C.AttentionSpec("block_sparse", mask=("causal",)))
    assert missing == []
    np.testing.assert_allclose(causal(tokens)[0], logits, rtol=1e-5, atol=1e-5)
    window, _ = lm.swap_attention(model, C.AttentionSpec("block_sparse", mask=("sliding_window", 8)))
    got = window(tokens)[0]
    np.testing.assert_allclose(got[:, :8], logits[:, :8], rtol=1e-5, atol=1e-5)  # the window covers them
    assert float(jnp.abs(got[:, 20:] - logits[:, 20:]).max()) > 1e-3


def test_moe_lm_reports_router_losses_and_trains_with_remat():
    cfg = C.deepseek("tiny", vocab_size=64, block_size=16, remat=True, aux_loss_coef=0.1, backend="xla")
    model = lm.DecoderLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 64)
    _, aux = model(tokens)
    # one dense and one MoE layer: the balance loss of one layer is ~1 when balanced
    assert 0.5 < float(aux["load_balance_loss"]) < 4 and float(aux["aux_loss"]) > 0
    grads = nnx.grad(lambda m: m(tokens)[1]["aux_loss"])(model)
    router = grads.blocks[1].ffn.router[...]
    assert np.all(np.isfinite(router)) and float(jnp.abs(router).max()) > 0


# -- training ------------------------------------------------------------------------------------
def test_loss_decreases_on_a_tiny_task():
    task = tasks.MQAR(32, num_pairs=2, num_queries=2, vocab=VOCAB)
    tc = T.TrainConfig(steps=80, batch_size=16, lr=1e-2, warmup_steps=10, progress=False)
    res = T.train(tiny(), task, tc)
    losses = [h["task_loss"] for h in res.history]
    assert len(losses) == 80 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_train_step_drops_sown_statistics():
    """Layers that sow (record_density) must not pile Intermediates into the trained model: the
    state's structure would change every step and retrace the step each call (it did: one
    compile per step, 18 s/step for an MoE model on the H100)."""
    from models import study_variants
    cfg = tiny(attention=study_variants.recording(C.AttentionSpec("dense")))
    model = lm.DecoderLM(cfg, rngs=nnx.Rngs(0))
    task = tasks.MQAR(32, num_pairs=2, num_queries=2, vocab=VOCAB)
    tc = T.TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, progress=False)
    optimizer = nnx.Optimizer(model, T.make_optimizer(tc), wrt=nnx.Param)
    step = T.make_train_step(task, tc.batch_size)
    structures = []
    for s in range(3):
        step(model, optimizer, jax.random.key(s))
        structures.append(jax.tree.structure(nnx.state(model)))
        assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate)), "sown values left in the model"
    assert structures[0] == structures[1] == structures[2]


def test_resume_reproduces_the_loss_curve_exactly(tmp_path):
    task = tasks.MQAR(32, num_pairs=2, num_queries=2, vocab=VOCAB)
    cfg = tiny(attention=C.AttentionSpec("block_sparse", mask=("sliding_window", 16)))
    tc = T.TrainConfig(steps=12, batch_size=8, warmup_steps=3, progress=False)
    straight = T.train(cfg, task, tc)
    first = T.train(cfg, task, tc, ckpt_dir=str(tmp_path / "run"), until=5)
    resumed = T.train(cfg, task, tc, ckpt_dir=str(tmp_path / "run"), resume=True)
    assert resumed.start_step == 5 and [h["step"] for h in resumed.history] == list(range(6, 13))
    losses = [h["loss"] for h in first.history + resumed.history]
    # bitwise on the CPU; on the GPU the attention backward's atomic dQ adds and XLA's scatter-add
    # reorder float sums run to run (H100: above 1e-5 after 12 steps); a lost optimizer state or
    # a shifted schedule changes the loss by far more than 1e-3
    np.testing.assert_allclose(losses, [h["loss"] for h in straight.history], rtol=0 if ON_CPU else 1e-3)
    tokens = task.sample(jax.random.key(7), 2).tokens
    restored, meta = T.load_model(str(tmp_path / "run"))
    assert meta["step"] == 12 and restored.cfg == cfg
    np.testing.assert_array_equal(restored(tokens)[0], resumed.model(tokens)[0])


def test_train_config_errors():
    with pytest.raises(ValueError, match="steps"):
        T.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="ckpt_dir"):
        T.train(tiny(), tasks.MQAR(32, 2, 2, VOCAB), T.TrainConfig(steps=2, progress=False), resume=True)


def test_time_limit_stops_training_early():
    task = tasks.MQAR(32, num_pairs=2, num_queries=2, vocab=VOCAB)
    tc = T.TrainConfig(steps=80, batch_size=16, lr=1e-2, warmup_steps=10, progress=False)
    res = T.train(tiny(), task, tc, time_limit_s=0.0)
    assert [h["step"] for h in res.history] == [1] and res.evals[-1]["step"] == 1


# -- the study's pieces (the study itself runs as `python -m models.study --preset cpu`) -----------
def test_study_variants_and_report(tmp_path):
    from models import study_report, study_variants

    variants = study_variants.swap_variants(256, 32)
    names = [v.name for v in variants]
    assert len(names) == len(set(names)) and names[0] == "dense"
    assert {"sliding_window", "chunked", "sinks"} <= {v.family for v in variants}
    for v in variants:  # every spec builds a model config
        tiny(attention=v.spec)
    rows = [dict(family="dense", knob="", name="dense", accuracy=0.9, density_vs_causal=1.0),
            dict(family="sliding_window", knob="window=64", name="sliding_window window=64", accuracy=0.4,
                 density_vs_causal=0.3, time_ms=1.0, speed_density_vs_causal=0.3, note="a | b")]
    result = dict(preset=dict(name="test", size="tiny", seq_len=256, block_size=32, speed_batch=1, speed_len=256,
                              dtype="float32"),
                  env=dict(device="cpu", backend="xla", jax=jax.__version__),
                  dense_training=dict(params=1000, steps=10, seconds=1.0, final_loss=1.0),
                  swaps=rows, native=[], notes=["n"], seconds=2.0)
    written = study_report.write(result, [str(tmp_path)])
    files = ["results.json", "summary.md"] + (["accuracy_vs_density.png", "speed_vs_density.png"]
                                              if study_report.HAVE_MATPLOTLIB else [])
    assert sorted(written) == sorted(str(tmp_path / f) for f in files)
    assert all((tmp_path / f).stat().st_size > 0 for f in files)
    md = (tmp_path / "summary.md").read_text()
    assert "| sliding_window window=64 | 0.300 |" in md and "a \\| b" in md


def test_indexer_warm_up_trains_only_the_new_params():
    from models.study import OnlyPaths

    dense = lm.DecoderLM(tiny(remat=True), rngs=nnx.Rngs(0))
    spec = C.AttentionSpec("indexed", options=dict(topk=8, index_heads=2, index_head_dim=8, indexer_loss=True))
    model, missing = lm.swap_attention(dense, spec)
    assert missing and all("index_" in m for m in missing)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    task = tasks.MQAR(32, num_pairs=2, num_queries=2, vocab=VOCAB)
    res = T.train(model, task, T.TrainConfig(steps=3, batch_size=4, warmup_steps=1, progress=False),
                  wrt=OnlyPaths(frozenset(missing)))
    assert all(h["indexer_loss"] > 0 for h in res.history)
    after = nnx.state(model, nnx.Param).to_pure_dict()
    for path, old in traverse_util.flatten_dict(before).items():
        new = traverse_util.flatten_dict(after)[path]
        changed = not np.array_equal(old, np.asarray(new))
        assert changed == ("/".join(map(str, path)) in missing), path


def test_study_evaluation_reports_accuracy_and_density():
    import dataclasses

    from models import study

    p = dataclasses.replace(study.PRESETS["cpu"], seq_len=32, block_size=8, batch_size=4, eval_batches=1,
                            mqar_pairs=2, needles=1, vocab=VOCAB)
    dense = lm.DecoderLM(study.model_config(p, "xla"), rngs=nnx.Rngs(0))
    spec = C.AttentionSpec("block_sparse", mask=("sliding_window", 8))
    model, _ = lm.swap_attention(dense, study._records(spec))
    row = study.evaluate_model(model, p, causal_density=0.625)
    assert 0 <= row["acc_mqar"] <= 1 and 0 <= row["acc_needle"] <= 1
    assert row["accuracy"] == pytest.approx((row["acc_mqar"] + row["acc_needle"]) / 2)
    assert row["answers"] == {"mqar": 4, "needle": 2}
    want = sj.create_block_mask(lm.build_mask(spec.mask), None, None, 32, 32, 8).density / 0.625
    assert row["density_vs_causal"] == pytest.approx(want)


def test_study_warm_start_continues_the_shorter_model(tmp_path, monkeypatch):
    import dataclasses

    from models import study

    monkeypatch.chdir(tmp_path)  # train_dense checkpoints under ./runs/study/<preset>
    short = dataclasses.replace(study.PRESETS["cpu"], name="short", seq_len=32, block_size=8, batch_size=2, steps=2,
                                mqar_pairs=2, needles=1, vocab=VOCAB)
    init, _, _ = study.train_dense(short, "xla", reuse=False, progress=False, time_limit_s=60)
    longer = dataclasses.replace(short, name="longer", seq_len=64, lr=1e-9, warm_start="short")
    model, hist, notes = study.train_dense(longer, "xla", reuse=False, progress=False, time_limit_s=60, init=init)
    assert hist["steps"] == 2 and not notes
    for a, b in zip(jax.tree.leaves(nnx.state(init, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)
    fresh = lm.DecoderLM(study.model_config(longer, "xla"), rngs=nnx.Rngs(0))
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(nnx.state(fresh, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))))


def test_study_variants_segment_size():
    from models import study_variants

    variants = study_variants.swap_variants(4096, 128, segment_size=1024)
    pbs = [v for v in variants if v.family == "pbs"]
    assert pbs and all(v.spec.kwargs["segment_size"] == 1024 for v in pbs)
    est = [v for v in variants if v.family == "pbs_estimate"]
    assert [v.knob for v in est] == [v.knob for v in pbs] and all(v.spec.kwargs["estimate_dropped"] for v in est)
    with pytest.raises(ValueError, match="multiple of block_size"):
        study_variants.swap_variants(4096, 128, segment_size=1000)
