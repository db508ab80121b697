"""Training: AdamW with warmup + cosine decay, periodic eval, orbax checkpoints that resume exactly.

Data are generated on the fly: step ``s`` trains on ``task.sample(fold_in(data_key, s))``,
so a checkpoint that stores (model state, optimizer state, step, data key) resumes
onto the very same loss curve (tested in tests/test_models.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

try:  # tqdm is an optional extra ("bench"); without it training runs without a progress bar
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - depends on the install
    tqdm = None

from models import tasks as tasks_lib
from models.config import ModelConfig
from models.lm import DecoderLM


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings.

    lr peaks after ``warmup_steps`` and decays by cosine to ``lr * min_lr_ratio`` at ``steps``.
    ``ckpt_every`` = 0 saves only at the end (when a checkpoint dir is given).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_batches: int = 4
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    data_seed: int = 1
    eval_seed: int = 2
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1; got {self.lr}, {self.min_lr_ratio}")


@functools.lru_cache(maxsize=32)
def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on a warmup-cosine schedule (no decay on norms / 1-D params)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, min(tc.warmup_steps, tc.steps - 1), tc.steps,
                                                  tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


@functools.lru_cache(maxsize=32)
def make_train_step(task, batch_size: int, wrt=nnx.Param) -> Callable:
    """``step(model, optimizer, key) -> metrics``: samples a batch from ``key`` and updates in place.

    ``wrt``: the nnx filter of the trained parameters (the optimizer's ``wrt``).
    Cached per (task, batch size, wrt), like :func:`make_optimizer` per config, so runs
    of one configuration share compiled steps.
    """

    @nnx.jit
    def step(model, optimizer, key):
        batch = task.sample(key, batch_size)

        def loss_fn(model):
            logits, aux = model(batch.tokens)
            task_loss = tasks_lib.answer_loss(logits, batch)
            return task_loss + aux["aux_loss"], (task_loss, aux)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (loss, (task_loss, aux)), grads = grad_fn(model)
        optimizer.update(model, grads)
        # Drop what layers sow for inspection (e.g. record_density): kept, it would pile up in the
        # model's state, change its structure and retrace this step on every call.
        nnx.pop(model, nnx.Intermediate)
        return dict(loss=loss, task_loss=task_loss, aux_loss=aux["aux_loss"],
                    load_balance_loss=aux["load_balance_loss"], indexer_loss=aux["indexer_loss"],
                    grad_norm=optax.global_norm(grads))

    return step


@functools.lru_cache(maxsize=32)
def make_eval_step(task, batch_size: int) -> Callable:
    """``eval_step(model, key) -> (correct, total, loss)`` on a fresh batch from ``key``."""

    @nnx.jit
    def eval_step(model, key):
        batch = task.sample(key, batch_size)
        logits, _ = model(batch.tokens)
        correct, total = tasks_lib.answer_accuracy(logits, batch)
        return correct, total, tasks_lib.answer_loss(logits, batch)

    return eval_step


def evaluate(model, task, *, batches: int = 4, batch_size: int = 32, seed: int = 2, eval_step=None) -> dict:
    """Exact-match accuracy and loss on the answer tokens of ``batches`` held-out batches."""
    eval_step = eval_step or make_eval_step(task, batch_size)
    key = jax.random.key(seed)
    correct = total = loss = 0.0
    for i in range(batches):
        c, t, l = eval_step(model, jax.random.fold_in(key, i))
        correct, total, loss = correct + float(c), total + float(t), loss + float(l)
    return dict(accuracy=correct / max(total, 1.0), loss=loss / batches, answers=int(total))


# -- checkpoints ------------------------------------------------------------------------------
def _abstract(tree):
    """Restore targets placed on this process's first device: without a sharding orbax would
    reuse the saving machine's (a checkpoint written on a GPU would not load on a CPU)."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=here), tree)


def checkpoint_manager(directory: str, tc: TrainConfig | None = None) -> ocp.CheckpointManager:
    """An orbax CheckpointManager at ``directory`` keeping ``tc.keep_checkpoints`` steps."""
    keep = tc.keep_checkpoints if tc is not None else 2
    return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False))


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, model, optimizer, data_key, meta: dict) -> None:
    """Save model state, optimizer state, the data key and JSON ``meta`` at ``step``."""
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model).to_pure_dict()),
        optimizer=ocp.args.StandardSave(nnx.state(optimizer).to_pure_dict()),
        data_key=ocp.args.StandardSave({"key": jax.random.key_data(data_key)}),
        meta=ocp.args.JsonSave(dict(meta, step=int(step)))), force=True)
    mngr.wait_until_finished()


def restore_checkpoint(mngr: ocp.CheckpointManager, model, optimizer=None, step: int | None = None):
    """Load a checkpoint into ``model`` (and ``optimizer``) in place; returns (step, data_key, meta)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    model_state = nnx.state(model)
    items = dict(model=ocp.args.StandardRestore(_abstract(model_state.to_pure_dict())),
                 data_key=ocp.args.StandardRestore(_abstract({"key": jax.random.key_data(jax.random.key(0))})),
                 meta=ocp.args.JsonRestore())
    if optimizer is not None:
        opt_state = nnx.state(optimizer)
        items["optimizer"] = ocp.args.StandardRestore(_abstract(opt_state.to_pure_dict()))
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(model_state, out["model"])
    nnx.update(model, model_state)
    if optimizer is not None:
        nnx.replace_by_pure_dict(opt_state, out["optimizer"])
        nnx.update(optimizer, opt_state)
    data_key = jax.random.wrap_key_data(jnp.asarray(out["data_key"]["key"]))
    return int(step), data_key, dict(out["meta"])


# -- the loop ---------------------------------------------------------------------------------
class _NoBar:
    """What the loop needs of a tqdm bar, when tqdm is off or not installed."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(iterable, *, desc: str, enabled: bool):
    if not enabled or tqdm is None:
        return _NoBar(iterable)
    return tqdm(iterable, desc=desc, leave=False)


@dataclasses.dataclass
class TrainResult:
    model: DecoderLM
    optimizer: nnx.Optimizer
    history: list[dict]  # one dict per step trained in this call: step, loss, task_loss, aux_loss, ...
    evals: list[dict]  # step, accuracy, loss
    start_step: int
    seconds: float


def train(model: DecoderLM | ModelConfig, task, tc: TrainConfig, *, ckpt_dir: str | None = None,
          resume: bool = False, until: int | None = None, time_limit_s: float | None = None,
          wrt=nnx.Param, desc: str = "train") -> TrainResult:
    """Train ``model`` (or a fresh model of a config) on ``task`` for ``tc.steps`` steps in all.

    With ``ckpt_dir`` the run checkpoints every ``tc.ckpt_every`` steps and at the end;
    with ``resume`` it first restores the latest checkpoint there (if any) and trains
    only the remaining steps. ``until`` stops after that step (as a preemption would:
    the schedule still spans ``tc.steps``), saving a checkpoint there. ``time_limit_s``
    likewise stops after the first step that ends past that many seconds (the result's
    ``history`` tells how far it got). ``wrt`` (an nnx filter) restricts training to
    some parameters, e.g. a DSA indexer warm-up on a frozen model.
    """
    if isinstance(model, ModelConfig):
        model = DecoderLM(model, rngs=nnx.Rngs(tc.seed))
    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs a ckpt_dir")
    optimizer = nnx.Optimizer(model, make_optimizer(tc), wrt=wrt)
    data_key = jax.random.key(tc.data_seed)
    mngr = checkpoint_manager(ckpt_dir, tc) if ckpt_dir is not None else None
    end = tc.steps if until is None else int(until)
    if not 0 < end <= tc.steps:
        raise ValueError(f"until must be in [1, steps={tc.steps}]; got {until}")
    start = 0
    if resume and mngr.latest_step() is not None:
        start, data_key, _ = restore_checkpoint(mngr, model, optimizer)
    meta = dict(model_config=model.cfg.to_dict(), train_config=dataclasses.asdict(tc))
    step_fn = make_train_step(task, tc.batch_size, wrt)
    eval_step = make_eval_step(task, tc.batch_size)
    history, evals, pending = [], [], []
    t0 = time.perf_counter()

    def flush():
        for s, m in pending:
            history.append(dict(step=s, **{k: float(v) for k, v in m.items()}))
        pending.clear()

    bar = _progress_bar(range(start + 1, end + 1), desc=desc, enabled=tc.progress)
    for s in bar:
        pending.append((s, step_fn(model, optimizer, jax.random.fold_in(data_key, s))))
        if time_limit_s is not None and s < end and time.perf_counter() - t0 > time_limit_s:
            jax.block_until_ready(pending[-1][1])
            end = s
        if s % 25 == 0 or s == end:
            flush()
            bar.set_postfix(loss=f"{history[-1]['task_loss']:.3f}")
        if tc.eval_every and s % tc.eval_every == 0 and s != end:
            evals.append(dict(step=s, **evaluate(model, task, batches=tc.eval_batches, batch_size=tc.batch_size,
                                                 seed=tc.eval_seed, eval_step=eval_step)))
        if mngr is not None and tc.ckpt_every and s % tc.ckpt_every == 0 and s != end:
            save_checkpoint(mngr, s, model, optimizer, data_key, meta)
        if s == end:
            break
    bar.close()
    flush()
    if start < end:
        evals.append(dict(step=end, **evaluate(model, task, batches=tc.eval_batches, batch_size=tc.batch_size,
                                               seed=tc.eval_seed, eval_step=eval_step)))
        if mngr is not None:
            save_checkpoint(mngr, end, model, optimizer, data_key, meta)
    if mngr is not None:
        mngr.close()
    return TrainResult(model, optimizer, history, evals, start, time.perf_counter() - t0)


def load_model(ckpt_dir: str, step: int | None = None) -> tuple[DecoderLM, dict]:
    """Rebuild a model from its checkpoint alone (the config travels in the metadata)."""
    mngr = checkpoint_manager(ckpt_dir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    model = DecoderLM(ModelConfig.from_dict(meta["model_config"]), rngs=nnx.Rngs(0))
    restore_checkpoint(mngr, model, step=step)
    mngr.close()
    return model, dict(meta)
