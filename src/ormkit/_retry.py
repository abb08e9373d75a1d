"""What `UnitOfWork.run` retries, and how long it waits in between; no I/O here.

A transaction aborted by a serialization failure (SQLSTATE 40001) or a deadlock (40P01), or one
that found SQLite busy, did nothing: running it again is the correct response. Every other
error is the work's own and is raised at once.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass

from ormkit._checks import check_number

__all__ = ["RetryPolicy", "transient_reason"]

# SQLSTATEs a retry resolves: serialization_failure, deadlock_detected.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# SQLite's primary result codes for "another connection holds the lock".
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, and the capped exponential backoff with full jitter between them."""

    attempts: int
    backoff: float
    max_backoff: float

    def __post_init__(self) -> None:
        check_number("attempts", self.attempts, minimum=1, whole=True)
        check_number("backoff", self.backoff, minimum=0, unit=" of seconds")
        check_number("max_backoff", self.max_backoff, minimum=0, unit=" of seconds")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt `failed_attempt` (1-based) failed."""
        # Full jitter: contenders that failed together do not retry together.
        ceiling = min(self.max_backoff, self.backoff * 2 ** (failed_attempt - 1))
        return random.uniform(0, ceiling)  # noqa: S311 (jitter, not secrecy)


def transient_reason(error: BaseException) -> str | None:
    """The SQLSTATE (or "SQLite busy") if `error` is a conflict a retry resolves, else None.

    Drivers surface the code differently: psycopg's errors carry `sqlstate`; SQLAlchemy's
    asyncpg adapter sets `sqlstate`/`pgcode` on its error, with asyncpg's own as the cause;
    SQLAlchemy wraps all of them in a `DBAPIError` whose `orig` is the driver's error. So the
    whole chain is searched: `orig`, `__cause__` and `__context__`.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for attribute in ("sqlstate", "pgcode"):
            code = getattr(current, attribute, None)
            if isinstance(code, str) and code in _RETRYABLE_SQLSTATES:
                return code
        if isinstance(current, sqlite3.OperationalError) and _sqlite_busy(current):
            return "SQLite busy"
        pending.extend(
            link
            for link in (getattr(current, "orig", None), current.__cause__, current.__context__)
            if isinstance(link, BaseException)
        )
    return None


def _sqlite_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    message = str(error)
    return "database is locked" in message or "database table is locked" in message
