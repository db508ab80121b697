"""The main job: train, checkpoint, restore and evaluate a small block-sparse MoE LM.

    python -m models.demo                  # any machine, a few minutes on a 2-core CPU
    python -m models.demo --preset gpu     # the accuracy study's GPU preset (models.study; its
                                           # options, e.g. --budget-s, pass through)

On the default backend (Triton kernels on a GPU, Mosaic on a TPU, the XLA reference
on a CPU) it trains a tiny decoder LM whose attention is block-sparse (a causal
sliding window plus attention sinks) and whose FFNs are a top-2 MoE, on multi-query
associative recall; checkpoints it with orbax; restores it from the checkpoint alone
and checks the restored model's outputs equal the live model's; replays steps after
a mid-run checkpoint to check resuming is exact; evaluates exact-match accuracy; and
prints a short report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx

import sparse_jax as sj
from models import config as C
from models import lm, tasks
from models import train as T

SEQ_LEN, BLOCK, WINDOW = 128, 16, 48
STEPS, BATCH, CKPT_DIR = 400, 32, os.path.join("runs", "demo")


def demo_config(backend: str) -> C.ModelConfig:
    """Tiny Mixtral-style model: sliding window + sink block attention, 4 experts top-2."""
    attention = C.AttentionSpec("block_sparse", mask=("sinks", WINDOW, BLOCK))
    return C.mixtral("tiny", vocab_size=128, attention=attention, num_experts=4, top_k=2, block_size=BLOCK,
                     qk_norm=True, backend=backend)


def replay_gap(ckpt_dir: str, step: int, task, tc: T.TrainConfig, live_losses: list[float]) -> float:
    """Restore the checkpoint at ``step`` into fresh objects, train a few steps; the largest
    relative gap to the live run's losses (0.0: bitwise identical)."""
    model = lm.DecoderLM(T.load_model(ckpt_dir, step)[0].cfg, rngs=nnx.Rngs(99))
    optimizer = nnx.Optimizer(model, T.make_optimizer(tc), wrt=nnx.Param)
    mngr = T.checkpoint_manager(ckpt_dir)
    start, data_key, _ = T.restore_checkpoint(mngr, model, optimizer, step=step)
    mngr.close()
    step_fn = T.make_train_step(task, tc.batch_size)
    replayed = [float(step_fn(model, optimizer, jax.random.fold_in(data_key, s))["loss"])
                for s in range(start + 1, start + 1 + len(live_losses))]
    return float(np.max(np.abs(np.subtract(replayed, live_losses)) / np.abs(live_losses)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="sparse-jax main job")
    ap.add_argument("--preset", choices=("demo", "cpu", "gpu"), default="demo",
                    help="demo: the tiny train/checkpoint/restore run; cpu/gpu: the accuracy study")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps (demo default {STEPS})")
    args, rest = ap.parse_known_args(argv)
    if args.preset != "demo":  # other options (--budget-s, --steps, ...) go to the study
        from models import study
        steps = [] if args.steps is None else ["--steps", str(args.steps)]
        return study.main(["--preset", args.preset, *rest, *steps])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.steps = STEPS if args.steps is None else args.steps

    t0 = time.perf_counter()
    backend = sj.backends.default_backend()
    dev = jax.devices()[0]
    print(f"sparse-jax main job: jax {jax.__version__}, device {dev.platform} ({getattr(dev, 'device_kind', '')}), "
          f"backend {backend}", flush=True)
    cfg = demo_config(backend)
    vocab = tasks.Vocab(cfg.vocab_size, 32, 32)
    task = tasks.MQAR(SEQ_LEN, num_pairs=4, num_queries=4, vocab=vocab)
    tc = T.TrainConfig(steps=args.steps, batch_size=BATCH, lr=3e-3, warmup_steps=40, ckpt_every=args.steps // 2,
                       eval_batches=4, progress=sys.stderr.isatty())
    shutil.rmtree(CKPT_DIR, ignore_errors=True)
    res = T.train(cfg, task, tc, ckpt_dir=CKPT_DIR, desc="demo")
    losses = [h["task_loss"] for h in res.history]

    restored, meta = T.load_model(CKPT_DIR)
    batch = task.sample(jax.random.key(2024), 8)
    live_logits, _ = res.model(batch.tokens)
    restored_logits, _ = restored(batch.tokens)
    identical = bool(np.array_equal(np.asarray(live_logits), np.asarray(restored_logits)))
    mid = args.steps // 2
    gap = replay_gap(CKPT_DIR, mid, task, tc, [h["loss"] for h in res.history[mid:mid + 5]])
    # Bitwise on the CPU; GPU reductions with atomics (the embedding gradient) may reorder.
    resume_exact = gap == 0.0 if dev.platform == "cpu" else gap < 1e-5
    ev = T.evaluate(restored, task, batches=4, batch_size=BATCH, seed=7)
    bm = sj.create_block_mask(lm.build_mask(cfg.attention_for(0).mask), None, None, SEQ_LEN, SEQ_LEN, BLOCK)
    causal = sj.create_block_mask(sj.masks.causal, None, None, SEQ_LEN, SEQ_LEN, BLOCK)
    report = dict(backend=backend, device=dev.platform, params=lm.count_params(res.model),
                  loss_start=float(np.mean(losses[:10])), loss_end=float(np.mean(losses[-10:])),
                  accuracy=ev["accuracy"], chance=1.0 / vocab.num_values, restored_identical=identical,
                  resume_exact=resume_exact, seconds=time.perf_counter() - t0)
    print("\n== report ==")
    print(f"model        {report['params']:,} params; attention: sliding window {WINDOW} + sink block "
          f"({bm.density / causal.density:.0%} of causal blocks, block {BLOCK}); FFN: MoE 4 experts top-2")
    print(f"training     {args.steps} steps, MQAR (4 pairs, {SEQ_LEN} tokens), batch {BATCH}: "
          f"answer loss {report['loss_start']:.3f} -> {report['loss_end']:.3f} in {res.seconds:.0f}s")
    print(f"eval         exact-match accuracy {report['accuracy']:.1%} on {ev['answers']} answers "
          f"(chance {report['chance']:.1%})")
    print(f"checkpoint   restored (from {CKPT_DIR}, step {meta['step']}) vs live outputs identical: {identical}")
    print(f"resume       replay from step {mid} reproduces the live losses: {resume_exact} "
          f"(largest relative gap {gap:.1e})")
    print(f"backend      {backend}; total {report['seconds']:.0f}s")
    ok = identical and resume_exact and report["loss_end"] < report["loss_start"]
    print("OK" if ok else "FAILED")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "demo_report.json"), "w") as f:
            json.dump(dict(report, ok=ok), f, indent=1)
    if not ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
