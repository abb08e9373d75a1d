"""Which units of work are open, per session factory, in this thread or task.

A unit of work entered while another of the same factory is open in the same thread (async:
the same task) joins it, as Django's nested `atomic` does. The registry is a context variable,
so it follows the code that opened the unit of work, and each entry records its owner: a task
created inside an open unit of work copies the context, and `asyncio.to_thread` or a framework's
thread pool copies it into another thread, but neither is the owner, so their units of work are
independent transactions.
"""

from __future__ import annotations

import asyncio
import threading
from contextvars import ContextVar
from typing import Generic, TypeVar

__all__ = ["Registration", "current_owner", "find_open", "register"]

U = TypeVar("U")

# factory -> (unit of work, owner, also the worker threads of its context). Replaced, never
# mutated: a copied context keeps its view.
_open: ContextVar[dict[object, tuple[object, tuple[int, object], bool]] | None] = ContextVar(
    "ormkit_open_units_of_work", default=None
)


def current_owner() -> tuple[int, object]:
    """This thread, and the asyncio task running in it (None outside a task)."""
    try:
        task: object = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return threading.get_ident(), task


def find_open(factory: object) -> object | None:
    """The unit of work of `factory` that this thread or task has open, if any."""
    entries = _open.get()
    entry = entries.get(factory) if entries else None
    if entry is None:
        return None
    unit, owner, worker_threads = entry
    here = current_owner()
    if owner == here or (worker_threads and here[1] is None):
        # With `worker_threads` (a request's sync unit of work, ormkit.fastapi), also a thread
        # outside any task: the worker thread FastAPI runs a `def` endpoint in, with a copy of
        # the request's context, is the same request.
        return unit
    return None


class Registration(Generic[U]):
    """An open unit of work's entry; `remove()` it when the unit of work ends."""

    __slots__ = ("factory", "previous", "unit")

    def __init__(self, factory: object, unit: U, *, worker_threads: bool = False) -> None:
        self.factory, self.unit = factory, unit
        entries = _open.get()
        self.previous = entries.get(factory) if entries else None
        _open.set({**(entries or {}), factory: (unit, current_owner(), worker_threads)})

    def remove(self) -> None:
        entries = _open.get()
        if not entries:
            return
        entry = entries.get(self.factory)
        if entry is None or entry[0] is not self.unit:
            # Ended in another context than it was opened in (a fixture's teardown, say): that
            # context never listed it. The one it was listed in finds it ended and ignores it.
            return
        remaining = dict(entries)
        if self.previous is None:
            del remaining[self.factory]
        else:
            remaining[self.factory] = self.previous
        _open.set(remaining)


def register(factory: object, unit: U, *, worker_threads: bool = False) -> Registration[U]:
    """List `unit` as the open unit of work of `factory` for this thread or task.

    With `worker_threads`, for the threads (outside any asyncio task) that run in a copy of
    this context instead: the worker threads of one request.
    """
    return Registration(factory, unit, worker_threads=worker_threads)
