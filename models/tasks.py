"""Synthetic long-context retrieval tasks with known answers, generated on the fly under ``jit``.

Both tasks share one vocabulary layout (``Vocab``): special tokens, key tokens,
value tokens and noise tokens, disjoint. A batch is ``Batch(tokens, targets,
weights)``: targets are the next tokens and ``weights`` is 1 exactly on the
positions whose next token is an answer, so the loss and the exact-match
accuracy see only the answers.

* :class:`MQAR` (multi-query associative recall, Zoology): ``num_pairs`` key-value
  pairs open the sequence; ``num_queries`` keys reappear later amid noise and the
  model must emit each key's value.
* :class:`Needle` (needle in a haystack with distractors): ``num_needles`` needles
  ``NEEDLE k v`` hidden at random depths of a noise haystack; the sequence ends
  with ``QUERY k`` for one of them and the answer is its ``v``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Batch(NamedTuple):
    """tokens int32 [B, S]; targets int32 [B, S] (next tokens); weights float32 [B, S] (1 on answers)."""

    tokens: jax.Array
    targets: jax.Array
    weights: jax.Array


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token id ranges: 0 pad, 1 NEEDLE, 2 QUERY, then keys, values, and noise up to ``size``."""

    size: int = 256
    num_keys: int = 64
    num_values: int = 64

    NEEDLE = 1
    QUERY = 2

    def __post_init__(self):
        if self.num_keys <= 0 or self.num_values <= 0 or self.noise_lo + 1 > self.size:
            raise ValueError(f"vocabulary of {self.size} too small for {self.num_keys} keys, "
                             f"{self.num_values} values and at least one noise token")

    @property
    def key_lo(self) -> int:
        return 3

    @property
    def value_lo(self) -> int:
        return self.key_lo + self.num_keys

    @property
    def noise_lo(self) -> int:
        return self.value_lo + self.num_values

    def noise(self, key, shape):
        return jax.random.randint(key, shape, self.noise_lo, self.size, jnp.int32)


def _finish(tokens, answer_positions) -> Batch:
    """tokens int32 [S], answer_positions int [n] (positions whose next token is an answer)."""
    targets = jnp.concatenate([tokens[1:], jnp.zeros((1,), jnp.int32)])
    weights = jnp.zeros(tokens.shape, jnp.float32).at[answer_positions].set(1.0)
    return Batch(tokens, targets, weights)


def _distinct(key, n_choices: int, n: int):
    """n distinct ints in [0, n_choices)."""
    return jax.random.permutation(key, n_choices)[:n]


@dataclasses.dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall at ``seq_len`` tokens (see the module docstring)."""

    seq_len: int = 512
    num_pairs: int = 16
    num_queries: int = 16
    vocab: Vocab = Vocab()
    name: str = "mqar"

    def __post_init__(self):
        if self.num_pairs > self.vocab.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds the {self.vocab.num_keys} distinct keys")
        if self.num_queries > (self.seq_len - 2 * self.num_pairs) // 2:
            raise ValueError(f"seq_len={self.seq_len} has no room for {self.num_pairs} pairs and "
                             f"{self.num_queries} queries")
        if min(self.num_pairs, self.num_queries) <= 0:
            raise ValueError("num_pairs and num_queries must be positive")

    def _one(self, key) -> Batch:
        v, n, q = self.vocab, self.num_pairs, self.num_queries
        kk, kv, kn, ks, kq = jax.random.split(key, 5)
        keys = v.key_lo + _distinct(kk, v.num_keys, n)
        values = v.value_lo + jax.random.randint(kv, (n,), 0, v.num_values, jnp.int32)
        context = jnp.stack([keys, values], axis=1).reshape(-1)
        rest = self.seq_len - 2 * n
        tokens = jnp.concatenate([context, v.noise(kn, (rest,))])
        pos = 2 * n + 2 * _distinct(ks, rest // 2, q)  # query slots: (key, value) at (p, p + 1)
        which = jax.random.randint(kq, (q,), 0, n)
        tokens = tokens.at[pos].set(keys[which]).at[pos + 1].set(values[which])
        return _finish(tokens.astype(jnp.int32), pos)

    def sample(self, key, batch_size: int) -> Batch:
        """A batch of ``batch_size`` fresh sequences from ``key`` (jit-able)."""
        return jax.vmap(self._one)(jax.random.split(key, batch_size))


@dataclasses.dataclass(frozen=True)
class Needle:
    """Needle-in-a-haystack retrieval with ``num_needles`` needles at ``seq_len`` tokens."""

    seq_len: int = 2048
    num_needles: int = 4
    vocab: Vocab = Vocab()
    name: str = "needle"

    def __post_init__(self):
        if self.num_needles > self.vocab.num_keys:
            raise ValueError(f"num_needles={self.num_needles} exceeds the {self.vocab.num_keys} distinct keys")
        if self.num_needles <= 0 or 3 * self.num_needles > self.seq_len - 3:
            raise ValueError(f"seq_len={self.seq_len} has no room for {self.num_needles} needles")

    def _one(self, key) -> Batch:
        v, n = self.vocab, self.num_needles
        kk, kv, kn, ks, kq = jax.random.split(key, 5)
        keys = v.key_lo + _distinct(kk, v.num_keys, n)
        values = v.value_lo + jax.random.randint(kv, (n,), 0, v.num_values, jnp.int32)
        body = self.seq_len - 3  # the tail "QUERY k v" takes the last three positions
        tokens = v.noise(kn, (self.seq_len,))
        pos = 3 * _distinct(ks, body // 3, n)
        tokens = tokens.at[pos].set(v.NEEDLE).at[pos + 1].set(keys).at[pos + 2].set(values)
        j = jax.random.randint(kq, (), 0, n)
        tail = jnp.stack([jnp.int32(v.QUERY), keys[j], values[j]])
        tokens = tokens.at[body:].set(tail)
        return _finish(tokens.astype(jnp.int32), jnp.array([self.seq_len - 2]))

    def sample(self, key, batch_size: int) -> Batch:
        return jax.vmap(self._one)(jax.random.split(key, batch_size))


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Batches split evenly across ``tasks`` (same seq_len and vocabulary), concatenated."""

    tasks: tuple
    name: str = "mixture"

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a mixture needs at least one task")
        if len({(t.seq_len, t.vocab) for t in self.tasks}) != 1:
            raise ValueError("tasks of a mixture must share seq_len and vocab")

    @property
    def seq_len(self) -> int:
        return self.tasks[0].seq_len

    @property
    def vocab(self) -> Vocab:
        return self.tasks[0].vocab

    def sample(self, key, batch_size: int) -> Batch:
        n = len(self.tasks)
        if batch_size % n:
            raise ValueError(f"batch_size={batch_size} must be a multiple of the {n} tasks of the mixture")
        parts = [t.sample(k, batch_size // n) for t, k in zip(self.tasks, jax.random.split(key, n))]
        return Batch(*(jnp.concatenate(xs) for xs in zip(*parts)))


def answer_accuracy(logits, batch: Batch):
    """Exact-match counts on answer positions: (correct, total) float32 scalars.

    logits [B, S, V]; a position counts when ``weights`` is 1 and argmax == target.
    """
    hit = (jnp.argmax(logits, axis=-1) == batch.targets).astype(jnp.float32)
    return jnp.sum(hit * batch.weights), jnp.sum(batch.weights)


def answer_loss(logits, batch: Batch):
    """Mean cross-entropy over answer positions (float32 scalar)."""
    import optax

    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch.targets)
    return jnp.sum(ce * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)


def make_task(name: str, seq_len: int, vocab: Vocab = Vocab(), **kwargs):
    """``"mqar"``, ``"needle"`` or ``"mixture"`` (mqar + needle) at ``seq_len`` tokens."""
    if name == "mqar":
        return MQAR(seq_len, vocab=vocab, **kwargs)
    if name == "needle":
        return Needle(seq_len, vocab=vocab, **kwargs)
    if name == "mixture":
        mq = {k[5:]: v for k, v in kwargs.items() if k.startswith("mqar_")}
        nd = {k[7:]: v for k, v in kwargs.items() if k.startswith("needle_")}
        return Mixture((MQAR(seq_len, vocab=vocab, **mq), Needle(seq_len, vocab=vocab, **nd)))
    raise ValueError(f"task must be 'mqar', 'needle' or 'mixture'; got {name!r}")
