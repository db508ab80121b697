"""A launch-config override scoped to a ``with`` block (tuning scripts and tests).

Kernels read the current value at trace time, so wrap a fresh function: ``jax.jit`` caches by
function, not by this setting. Nested blocks stack; leaving one restores the outer value.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Override(Generic[T]):
    """One named override: :meth:`use` sets it inside a block, :meth:`current` reads it (None outside)."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar[T | None] = contextvars.ContextVar(name, default=None)

    @contextlib.contextmanager
    def use(self, value: T) -> Iterator[None]:
        token = self._var.set(value)
        try:
            yield
        finally:
            self._var.reset(token)

    def current(self) -> T | None:
        return self._var.get()
