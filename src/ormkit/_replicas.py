"""Read replicas of a session factory: which database a read-only unit of work reads from.

I/O-free: the units of work run the statements (sync or async) and report what they saw here.

The database is chosen once per unit of work, never per statement: a read-only unit of work
takes one replica for its whole transaction, round robin over the usable ones, and checks it
with one statement (`PROBE`) that says how far behind it is and whether it has replayed the
commit a token names. A replica that refused a connection, failed that statement, or lagged
past `max_replica_lag` is skipped for `replica_retry_after` seconds, then tried again. With no
usable replica, a read-only unit of work reads from the primary, still read-only.

Commit tokens: after a commit on a PostgreSQL primary, the WAL insert position is taken from
the primary (`pg_current_wal_insert_lsn()`: at or past the end of that commit's record, even
with `synchronous_commit=off`, where the write position may not be). A replica that has
replayed past it has the commit. SQLite replicas are copies of the file that nothing updates
for ormkit, so a token there sends the read to the primary.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ormkit._checks import check_number, describe
from ormkit.errors import InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "CAUGHT_UP",
    "COMMIT_POSITION",
    "POLL_INTERVAL",
    "PROBE",
    "READ_ONLY",
    "SQLITE_TOKEN",
    "UNREACHABLE_TOKEN",
    "Replica",
    "ReplicaSet",
    "check_writable",
    "format_token",
    "parse_token",
    "read_only_bind",
    "replicas_of",
]

logger = logging.getLogger("ormkit")

READ_ONLY = "ormkit_read_only"  # the key in Session.info that marks a read-only session

# One round trip: the lag in seconds, and whether the commit a token names is replayed (NULL
# without a token). The lag is 0 when the replica has replayed all but the last WAL page it
# received (an idle primary is no lag, and a standby can hold a received page it has nothing
# more to replay from); else the time since the last transaction it replayed. The token is sent
# as text: not every driver has a pg_lsn codec.
PROBE = text(
    "SELECT CAST(CASE WHEN pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"
    " < 8192 THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END "
    "AS DOUBLE PRECISION), "
    "pg_last_wal_replay_lsn() >= CAST(CAST(:token AS TEXT) AS pg_lsn)"
)
CAUGHT_UP = text("SELECT pg_last_wal_replay_lsn() >= CAST(CAST(:token AS TEXT) AS pg_lsn)")
COMMIT_POSITION = text("SELECT CAST(pg_current_wal_insert_lsn() AS TEXT)")
POLL_INTERVAL = 0.01  # seconds between two looks at a replica that is behind a token

_PG_TOKEN = re.compile(r"pg:([0-9A-F]{1,8}/[0-9A-F]{1,8})")
SQLITE_TOKEN = "sqlite:primary"  # noqa: S105 - a commit token, not a password
# Past any replica's position: the reads after it use the primary.
UNREACHABLE_TOKEN = "pg:FFFFFFFF/FFFFFFFF"  # noqa: S105 - likewise
Kind = Literal["postgresql", "sqlite"]


def _kind_of(engine: Engine) -> Kind:
    name = engine.dialect.name
    if name not in ("postgresql", "sqlite"):
        raise InvalidArgumentError(
            f"replicas are supported on PostgreSQL and SQLite, not on {name}: PostgreSQL says "
            "how far each replica has replayed, which read-your-writes needs"
        )
    return "postgresql" if name == "postgresql" else "sqlite"


@dataclass
class Replica:
    """One replica's engine and health."""

    engine: Any  # an Engine or an AsyncEngine, like the factory's primary
    name: str  # its URL without the password, for the log
    skipped_until: float = 0.0  # time.monotonic() before which it is not tried
    state: str = "usable"  # "usable", "down" or "lagging": logged when it changes


@dataclass
class ReplicaSet:
    """A factory's primary and replicas, and the settings that choose between them."""

    primary: Any
    replicas: list[Replica]
    kind: Kind
    replica_wait: float
    max_replica_lag: float
    replica_retry_after: float
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def candidates(self) -> list[Replica]:
        """The replicas to try, in order: usable ones (or due for a retry), round robin."""
        now = time.monotonic()
        usable = [r for r in self.replicas if r.skipped_until <= now]
        if not usable:
            return []
        start = next(self._turn) % len(usable)
        return usable[start:] + usable[:start]

    def failed(self, replica: Replica, error: BaseException) -> None:
        """`replica` refused a connection or a statement: skip it for a while."""
        self._skip(replica, "down", f"is down ({type(error).__name__}: {_first_line(error)})")

    def judge_lag(self, replica: Replica, lag: object) -> bool:
        """Whether `replica`, `lag` seconds behind, may serve reads; skipped if it lags too far."""
        seconds = 0.0 if lag is None else float(cast("float", lag))
        if seconds > self.max_replica_lag:
            self._skip(
                replica,
                "lagging",
                f"lags {seconds:.1f} s behind the primary "
                f"(max_replica_lag={self.max_replica_lag:g})",
            )
            return False
        self.serving(replica)
        return True

    def serving(self, replica: Replica) -> None:
        """`replica` answered and is close enough: it is usable again, if it was not."""
        with self._lock:
            was = replica.state
            replica.state, replica.skipped_until = "usable", 0.0
        if was != "usable":
            logger.info("ormkit: replica %s is usable again", replica.name)

    def _skip(self, replica: Replica, state: str, why: str) -> None:
        with self._lock:
            was = replica.state
            replica.state = state
            replica.skipped_until = time.monotonic() + self.replica_retry_after
        if was != state:
            logger.warning(
                "ormkit: replica %s %s; read-only units of work use the other replicas or the "
                "primary, and try it again in %g s",
                replica.name,
                why,
                self.replica_retry_after,
            )


# engine -> the same engine, opening read-only transactions (made once per engine).
_read_only_binds: weakref.WeakKeyDictionary[object, Any] = weakref.WeakKeyDictionary()


def read_only_bind(engine: Any) -> Any:
    """`engine` (a replica or the primary), giving connections in read-only transactions."""
    found = _read_only_binds.get(engine)
    if found is not None:
        return found
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if sync_engine.dialect.name == "postgresql":
        # A connection characteristic: SQLAlchemy opens each transaction READ ONLY and resets
        # the connection when it goes back to the pool.
        found = engine.execution_options(postgresql_readonly=True)
        if sync_engine.dialect.driver == "psycopg":
            _listen_read_only_default(sync_engine)
    else:
        # SQLite: a replica's own connections run PRAGMA query_only (see listen_query_only).
        # The primary's are shared with writers: there, ormkit's refusals (a flush with
        # changes, FOR UPDATE, bulk writes) keep a read-only unit of work read-only.
        found = engine
    _read_only_binds[engine] = found
    return found


def _listen_read_only_default(sync_engine: Any) -> None:
    """Leave psycopg connections at read_only=None when they go back to `sync_engine`'s pool.

    SQLAlchemy resets a READ ONLY connection to read_only=False on its way back, and psycopg
    then begins every transaction with BEGIN READ WRITE, which a hot standby refuses: a plain
    session on a replica engine would fail after a read-only unit of work had used it. None is
    psycopg's own default (a plain BEGIN). The checkin event runs right after SQLAlchemy's
    reset and in the same context, so the dialect's setter works there as the reset's did.
    """
    dialect = sync_engine.dialect

    def read_only_default(dbapi_connection: Any, _record: object) -> None:
        if dbapi_connection is not None and dialect.get_readonly(dbapi_connection) is False:
            dialect.set_readonly(dbapi_connection, None)

    event.listen(sync_engine, "checkin", read_only_default)


def listen_query_only(engine: Any) -> None:
    """Make every new connection of a SQLite replica's `engine` refuse writes."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    def query_only(dbapi_connection: Any, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only = ON")
        cursor.close()

    event.listen(sync_engine, "connect", query_only)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


# factory -> its replicas. Weak: a factory that goes away takes its replica set with it.
_sets: weakref.WeakKeyDictionary[object, ReplicaSet] = weakref.WeakKeyDictionary()


def replicas_of(factory: object) -> ReplicaSet | None:
    """The replica set of `factory`, or None if it was made without replicas."""
    try:
        return _sets.get(factory)
    except TypeError:  # not weak-referenceable: not a factory of ormkit's
        return None


def register(
    factory: object,
    primary: Any,
    replicas: Sequence[Any],
    *,
    replica_wait: object,
    max_replica_lag: object,
    replica_retry_after: object,
) -> None:
    """Give `factory` its replicas (engines already made from the URLs)."""
    check_number("replica_wait", replica_wait, minimum=0, unit=" of seconds")
    check_number("max_replica_lag", max_replica_lag, minimum=0, unit=" of seconds")
    check_number("replica_retry_after", replica_retry_after, minimum=0, unit=" of seconds")
    primary_sync = primary.sync_engine if isinstance(primary, AsyncEngine) else primary
    kind = _kind_of(primary_sync)
    if kind == "sqlite" and primary_sync.url.database in (None, "", ":memory:"):
        raise InvalidArgumentError(
            "replicas need a primary that is a SQLite file, not a memory database: a replica is "
            "a copy of the primary's file"
        )
    members: list[Replica] = []
    for replica in replicas:
        replica_sync = replica.sync_engine if isinstance(replica, AsyncEngine) else replica
        if replica_sync.dialect.name != primary_sync.dialect.name:
            raise InvalidArgumentError(
                f"a replica must be a database of the primary's kind ({primary_sync.dialect.name})"
                f", got {replica_sync.dialect.name} ({describe(str(replica_sync.url))})"
            )
        members.append(Replica(replica, replica_sync.url.render_as_string(hide_password=True)))
    _sets[factory] = ReplicaSet(
        primary,
        members,
        kind,
        float(cast("float", replica_wait)),  # all three checked above
        float(cast("float", max_replica_lag)),
        float(cast("float", replica_retry_after)),
    )


def parse_token(token: object, kind: Kind) -> str | None:
    """The WAL position `token` names (PostgreSQL), or None (SQLite: read from the primary).

    Raises:
        InvalidArgumentError: `token` is not a commit token of this kind of database.
    """
    if not isinstance(token, str):
        raise InvalidArgumentError(
            f"after takes a commit token (the str a unit of work's commit_token gave), got "
            f"{describe(token)}"
        )
    if kind == "sqlite":
        if token != SQLITE_TOKEN:
            raise InvalidArgumentError(
                f"after={token!r} is not a commit token of a SQLite factory, which are "
                f"{SQLITE_TOKEN!r}; pass the commit_token of a unit of work of this factory"
            )
        return None
    match = _PG_TOKEN.fullmatch(token)
    if match is None:
        raise InvalidArgumentError(
            f"after={token[:40]!r} is not a commit token of a PostgreSQL factory (they look "
            "like 'pg:16/B374D848'); pass the commit_token of a unit of work of this factory, "
            "unchanged"
        )
    return match.group(1)


def format_token(position: object) -> str:
    """The commit token for WAL position `position` (the text of a pg_lsn)."""
    return f"pg:{str(position).upper()}"


def check_writable(session: Session | AsyncSession, action: str) -> None:
    """Refuse `action` in a read-only unit of work's session, before any SQL."""
    if session.info.get(READ_ONLY):
        raise TransactionError(
            f"{action} in a read-only unit of work; it reads from a replica (or the primary, "
            "read-only): do the write in a unit of work opened without read_only=True"
        )
