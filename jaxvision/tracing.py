"""Settings that apply while a model is traced: a context variable set for a `with` block."""
from __future__ import annotations

import contextlib
import contextvars


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value):
    """`var` is `value` inside the block and what it was after it, also when the block raises."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
