"""Finishing what must not be interrupted: a COMMIT, a ROLLBACK, closing a session.

A task can be cancelled at any await point (a timeout, a client that went away). Cancelled in
the middle of a COMMIT, nobody knows whether the work was stored; in the middle of a ROLLBACK TO
SAVEPOINT, the rows it was to undo stay in the transaction. So these operations run to their
end in a task of their own, and the cancellation is raised once they are done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import IllegalStateChangeError

from ormkit._journal import busy

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["aclose", "aclose_after_error", "close_after_error", "shielded", "wait_until_idle"]

logger = logging.getLogger("ormkit")


async def shielded(operation: Awaitable[None]) -> asyncio.CancelledError | None:
    """Run `operation` to its end even if the task is cancelled meanwhile.

    Returns the cancellation that arrived (for the caller to raise once it is safe), or None.
    An error of the operation itself propagates; if a cancellation arrived as well, the
    cancellation is raised, from the operation's error, so the task still stops.
    """
    task = asyncio.ensure_future(operation)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as error:  # noqa: PERF203 (rare: only on cancellation)
            if task.cancelled():
                raise  # the operation itself was cancelled, not just the task waiting on it
            cancelled = error
    failure = task.exception()
    if failure is not None:
        if cancelled is not None:
            raise cancelled from failure
        raise failure
    return cancelled


def close_after_error(session: Session) -> None:
    """Close `session` (rolling back) while another error is on its way out.

    If closing fails too (the connection is gone), the error the block raised matters more:
    this one is logged, and that one propagates.
    """
    try:
        session.close()
    except Exception:
        logger.exception("closing the session after an error failed as well")


async def aclose_after_error(session: AsyncSession) -> None:
    """Async version of `close_after_error`, shielded from cancellation."""
    try:
        cancelled = await aclose(session)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("closing the session after an error failed as well")
        return
    if cancelled is not None:
        raise cancelled


async def aclose(session: AsyncSession) -> asyncio.CancelledError | None:
    """Close `session`, shielded, after any operation another task has under way in it.

    SQLAlchemy does not support two tasks using one session at once. When one task's block
    ends while another task is still inside the session, closing right away would roll back
    under the other's feet: its flush could then run its INSERT after the ROLLBACK, outside any
    transaction (and SQLite or asyncpg commit it), and the close itself can fail and leave the
    connection checked out (asyncpg: "another operation is in progress"). So the other's flush
    or statement is waited for (the journal counts them, from SQLAlchemy's events), and a close
    SQLAlchemy refuses because the other is taking a connection (`IllegalStateChangeError`) is
    tried again. The session is marked closed at the first try, so the other task's next call
    fails. After `_BUSY_WAIT` seconds the session is invalidated instead: its connections are
    discarded, never left checked out.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _BUSY_WAIT
    cancelled: asyncio.CancelledError | None = None
    while True:
        if not busy(session.sync_session):
            try:
                return await shielded(session.close()) or cancelled
            except Exception as error:
                if not _refused_while_busy(error):
                    raise
        if loop.time() > deadline:
            logger.error("another task kept this session busy; its connection is discarded")
            return await shielded(session.invalidate()) or cancelled
        try:
            await asyncio.sleep(_BUSY_POLL)
        except asyncio.CancelledError as error:
            cancelled = error  # closing matters more; raised once closed


def wait_until_idle(session: Session) -> bool:
    """Wait while another thread has a flush or a statement under way in `session`.

    For a sync session shared by the threads of one request: a cancellation can leave the
    endpoint's thread running while the unit of work ends in another. False if it is still
    busy after `_BUSY_WAIT` seconds.
    """
    deadline = time.monotonic() + _BUSY_WAIT
    while busy(session):
        if time.monotonic() > deadline:
            return False
        time.sleep(_BUSY_POLL)
    return True


def _refused_while_busy(error: Exception) -> bool:
    """Whether `error` says another task's operation holds the session."""
    # The window no event shows: the other task is taking a connection for the session.
    return isinstance(error, IllegalStateChangeError)


_BUSY_WAIT, _BUSY_POLL = 5.0, 0.001
