"""Engines with ormkit's dialect defaults.

SQLite is made to behave like the server databases people deploy on: foreign keys enforced,
real transactions (so SAVEPOINTs roll back), WAL and a busy timeout for files, and one shared
memory database per engine. PostgreSQL engines pre-ping pooled connections. Every default can
be switched off; an engine made elsewhere is never touched.
"""

from __future__ import annotations

import asyncio
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import URL, Engine, event, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _sa_create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

from ormkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

__all__ = ["create_async_engine", "create_engine"]

# ormkit's own options of create_engine and create_async_engine; any other `sqlite_*` keyword
# is a misspelling (SQLAlchemy has no create_engine option of that name).
_SQLITE_OPTIONS = (
    "sqlite_busy_timeout",
    "sqlite_foreign_keys",
    "sqlite_savepoints",
    "sqlite_shared_memory",
    "sqlite_wal",
)
# The functions a message about a sync/async driver mix-up points at: (sync, async).
_ENGINE_FUNCTIONS = ("create_engine", "create_async_engine")
_FACTORY_FUNCTIONS = ("create_session_factory", "create_async_session_factory")


@dataclass(frozen=True)
class _SQLiteDefaults:
    foreign_keys: bool
    savepoints: bool
    wal: bool
    busy_timeout: float | None
    shared_memory: bool


def create_engine(
    url: str | URL,
    /,
    *,
    sqlite_foreign_keys: bool = True,
    sqlite_savepoints: bool = True,
    sqlite_wal: bool = True,
    sqlite_busy_timeout: float | None = 5.0,
    sqlite_shared_memory: bool = True,
    **engine_options: Any,
) -> Engine:
    """Create a SQLAlchemy `Engine` with ormkit's dialect defaults.

    Args:
        url: a database URL, such as `"sqlite:///app.db"` or
            `"postgresql+psycopg://user:password@127.0.0.1/app"`.
        sqlite_foreign_keys: run `PRAGMA foreign_keys=ON` on every new connection, so SQLite
            enforces foreign keys as other databases do.
        sqlite_savepoints: emit `BEGIN` when SQLAlchemy begins a transaction instead of letting
            the `sqlite3` module begin lazily before the first write. Without this, reads are
            outside the transaction and `begin_nested()` does not really roll back.
        sqlite_wal: put file databases in WAL mode, so readers do not block the writer.
        sqlite_busy_timeout: seconds a connection waits for another's write lock before
            failing with "database is locked"; `None` keeps the driver's default.
        sqlite_shared_memory: make a memory database (`"sqlite://"`) one database shared by
            every session of the engine (one connection, `StaticPool`). Its sessions must be
            used one after another, not overlapping.
        **engine_options: passed to `sqlalchemy.create_engine`; they win over ormkit's
            defaults (for example `pool_pre_ping=False` on PostgreSQL).

    The `sqlite_*` options are ignored by other dialects, like SQLAlchemy's own
    dialect-prefixed arguments, so one configuration can serve SQLite and PostgreSQL.
    Whatever the options, a SQLite transaction left open by a COMMIT that failed (a deferred
    foreign key) is rolled back when its connection goes back to the pool.

    ```python
    engine = create_engine("sqlite:///app.db")
    engine_without_wal = create_engine("sqlite:///app.db", sqlite_wal=False)
    ```
    """
    parsed = _parse_url(url, want_async=False)
    _check_sqlite_options(
        parsed, engine_options, savepoints=sqlite_savepoints, busy_timeout=sqlite_busy_timeout
    )
    sqlite = _SQLiteDefaults(
        sqlite_foreign_keys,
        sqlite_savepoints,
        sqlite_wal,
        sqlite_busy_timeout,
        sqlite_shared_memory,
    )
    engine = sqlalchemy.create_engine(parsed, **_engine_options(parsed, engine_options, sqlite))
    _install_listeners(engine, parsed, engine_options, sqlite)
    return engine


def create_async_engine(
    url: str | URL,
    /,
    *,
    sqlite_foreign_keys: bool = True,
    sqlite_savepoints: bool = True,
    sqlite_wal: bool = True,
    sqlite_busy_timeout: float | None = 5.0,
    sqlite_shared_memory: bool = True,
    **engine_options: Any,
) -> AsyncEngine:
    """Create a SQLAlchemy `AsyncEngine` with ormkit's dialect defaults.

    The async twin of `create_engine`, with the same options; the URL names an async driver
    (`sqlite+aiosqlite://`, `postgresql+asyncpg://`, `postgresql+psycopg://`).

    ```python
    engine = create_async_engine("sqlite+aiosqlite:///app.db")
    ```
    """
    parsed = _parse_url(url, want_async=True)
    _check_sqlite_options(
        parsed, engine_options, savepoints=sqlite_savepoints, busy_timeout=sqlite_busy_timeout
    )
    sqlite = _SQLiteDefaults(
        sqlite_foreign_keys,
        sqlite_savepoints,
        sqlite_wal,
        sqlite_busy_timeout,
        sqlite_shared_memory,
    )
    engine = _sa_create_async_engine(parsed, **_engine_options(parsed, engine_options, sqlite))
    # Connection events live on the sync engine that the AsyncEngine drives.
    _install_listeners(engine.sync_engine, parsed, engine_options, sqlite)
    return engine


def _parse_url(
    url: object, *, want_async: bool, functions: tuple[str, str] = _ENGINE_FUNCTIONS
) -> URL:
    """`url` parsed, its dialect checked to exist and to be sync or async as wanted.

    `functions` are the sync and the async function a driver mix-up is pointed at.
    """
    if not isinstance(url, (str, URL)):
        raise InvalidArgumentError(
            f"expected a database URL (a str or sqlalchemy.URL), got {type(url).__name__}; "
            "pass an engine to the session factories instead if you already have one"
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        # SQLAlchemy's message repeats the URL, password included; ours does not.
        raise InvalidArgumentError(
            "could not parse the database URL; expected a form like "
            "'dialect+driver://user:password@host:port/database' or 'sqlite:///app.db'"
        ) from exc
    try:
        dialect = parsed.get_dialect()
        if want_async:
            # Some drivers have a sync and an async dialect under one name (psycopg): ask for
            # the one an async engine would use, as SQLAlchemy's create_async_engine does.
            dialect = dialect.get_async_dialect_cls(parsed)
        is_async = bool(dialect.is_async)
    except NoSuchModuleError as exc:
        raise InvalidArgumentError(
            f"no SQLAlchemy dialect for {parsed.drivername!r}: check the URL's scheme "
            "(for example 'postgresql+psycopg' or 'sqlite+aiosqlite')"
        ) from exc
    sync_function, async_function = functions
    if want_async and not is_async:
        raise InvalidArgumentError(
            f"{parsed.drivername!r} is not an async driver; use {sync_function}() for it, or an "
            "async URL such as 'sqlite+aiosqlite://', 'postgresql+asyncpg://' or "
            f"'postgresql+psycopg://' with {async_function}()"
        )
    if not want_async and is_async:
        raise InvalidArgumentError(
            f"{parsed.drivername!r} is an async driver; use {async_function}() for it, or a "
            f"sync URL such as 'sqlite://' or 'postgresql+psycopg://' with {sync_function}()"
        )
    return parsed


def _check_sqlite_options(
    url: URL, given: dict[str, Any], *, savepoints: bool, busy_timeout: object
) -> None:
    unknown = sorted(name for name in given if name.startswith("sqlite_"))
    if unknown:
        # Checked on every dialect: SQLAlchemy would refuse the keyword there too.
        close = difflib.get_close_matches(unknown[0], _SQLITE_OPTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidArgumentError(
            f"unknown option {unknown[0]!r}; {hint}ormkit's SQLite options are "
            f"{', '.join(_SQLITE_OPTIONS)}"
        )
    if busy_timeout is not None and (
        isinstance(busy_timeout, bool)
        or not isinstance(busy_timeout, (int, float))
        or not math.isfinite(busy_timeout)
        or busy_timeout < 0
    ):
        # Checked on every dialect too: the value is used only on SQLite's first connection,
        # where a wrong one would fail far from here.
        raise InvalidArgumentError(
            f"sqlite_busy_timeout must be a number of seconds >= 0 or None, got "
            f"{busy_timeout!r}; pass a finite number such as 5 or 0.5, or None for the "
            "driver's default"
        )
    if url.get_backend_name() == "sqlite" and savepoints and given.get("skip_autocommit_rollback"):
        # The BEGIN recipe puts the sqlite3 connection in its autocommit mode; with this
        # option SQLAlchemy would then skip the rollbacks that end its transactions.
        raise InvalidArgumentError(
            "skip_autocommit_rollback=True does not work with ormkit's SQLite transaction "
            "handling; pass sqlite_savepoints=False as well, or drop skip_autocommit_rollback"
        )


def _is_sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _engine_options(url: URL, given: dict[str, Any], sqlite: _SQLiteDefaults) -> dict[str, Any]:
    """Merge ormkit's defaults under the caller's engine options (the caller wins)."""
    options = dict(given)
    backend = url.get_backend_name()
    if backend == "postgresql":
        # Pooled connections die with server restarts and idle timeouts; a ping is cheap.
        options.setdefault("pool_pre_ping", True)
    elif (
        backend == "sqlite"
        and sqlite.shared_memory
        and _is_sqlite_memory(url)
        and "poolclass" not in options
        and "pool" not in options
    ):
        # One connection is the one memory database; every session gets it.
        options["poolclass"] = StaticPool
        if url.get_driver_name() != "aiosqlite":
            # pysqlite refuses a connection made on another thread unless told otherwise.
            options["connect_args"] = {"check_same_thread": False, **given.get("connect_args", {})}
    elif (
        url.get_driver_name() == "aiosqlite"
        and not _is_sqlite_memory(url)
        and "poolclass" not in options
        and "pool" not in options
    ):
        # A pool of aiosqlite connections to a file, on every SQLAlchemy release ormkit admits:
        # before 2.0.38 SQLAlchemy gave them NullPool (a new connection, and its thread, per
        # checkout), and it pools them since.
        options["poolclass"] = AsyncAdaptedQueuePool
    return options


def _install_listeners(
    engine: Engine, url: URL, given: dict[str, Any], sqlite: _SQLiteDefaults
) -> None:
    if url.get_backend_name() != "sqlite":
        return
    pragmas: list[str] = []
    if sqlite.foreign_keys:
        pragmas.append("PRAGMA foreign_keys = ON")
    if sqlite.busy_timeout is not None:
        pragmas.append(f"PRAGMA busy_timeout = {round(sqlite.busy_timeout * 1000)}")
    if sqlite.wal and not _is_sqlite_memory(url):
        pragmas.append("PRAGMA journal_mode = WAL")
    savepoints = sqlite.savepoints

    def on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        if savepoints:
            # Stop the sqlite3 module from issuing BEGIN (and COMMIT) on its own; `on_begin`
            # issues BEGIN when SQLAlchemy begins, which makes SAVEPOINTs real.
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "reset", _roll_back_a_failed_commit)
    if url.get_driver_name() == "aiosqlite":
        event.listen(engine, "handle_error", _keep_a_cancelled_aiosqlite_connection)
    if not savepoints:
        return
    engine_level = given.get("isolation_level")

    def on_begin(connection: sqlalchemy.Connection) -> None:
        level = connection.get_execution_options().get("isolation_level", engine_level)
        if level == "AUTOCOMMIT":
            return
        dbapi_connection: Any = connection.connection.dbapi_connection
        if dbapi_connection.isolation_level is not None:
            # Setting a non-AUTOCOMMIT isolation level makes SQLAlchemy hand transaction
            # control back to the sqlite3 module; take it again.
            dbapi_connection.isolation_level = None
        connection.exec_driver_sql("BEGIN")

    event.listen(engine, "begin", on_begin)


def _roll_back_a_failed_commit(
    dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, state: PoolResetState
) -> None:
    """Roll back the transaction SQLite keeps open after a COMMIT it refused.

    A COMMIT can fail and leave SQLite's transaction open (a deferred foreign key, a busy
    database), while SQLAlchemy counts the transaction as ended and skips its rollback when
    the connection goes back to the pool. The next user of the connection would work inside
    that transaction: its BEGIN fails, or, without the BEGIN recipe, its commit commits the
    failed work too.
    """
    if not state.transaction_was_reset or state.terminate_only or not state.asyncio_safe:
        return  # SQLAlchemy rolls back itself, or discards the connection, or cannot wait
    driver_connection = record.driver_connection  # sqlite3's or aiosqlite's: no I/O to ask
    if driver_connection is not None and driver_connection.in_transaction:
        dbapi_connection.rollback()


def _keep_a_cancelled_aiosqlite_connection(context: ExceptionContext) -> None:
    """Roll back, rather than discard, an aiosqlite connection whose task was cancelled.

    SQLAlchemy discards a connection when a task is cancelled in the middle of a statement,
    as a network connection's state is unknown then. aiosqlite's is not: its thread finishes
    the statement, and the rollback of the unit of work runs after it. Discarding it does
    harm: the cancelled statement stays open as long as the traceback holds it, and SQLite
    keeps a closed connection with an open statement alive, its transaction and write lock
    with it, so every other writer fails with "database is locked" until the garbage
    collector runs.
    """
    if isinstance(context.original_exception, asyncio.CancelledError):
        context.is_disconnect = False


def sync_engine_from(bind: object) -> Engine:
    """The engine for a sync session factory: made from a URL, or the one passed in."""
    if isinstance(bind, Engine):
        return bind
    if isinstance(bind, (str, URL)):
        return create_engine(_parse_url(bind, want_async=False, functions=_FACTORY_FUNCTIONS))
    raise _bad_bind(bind, "Engine", "create_async_session_factory")


def async_engine_from(bind: object) -> AsyncEngine:
    """The engine for an async session factory: made from a URL, or the one passed in."""
    if isinstance(bind, AsyncEngine):
        return bind
    if isinstance(bind, (str, URL)):
        return create_async_engine(_parse_url(bind, want_async=True, functions=_FACTORY_FUNCTIONS))
    raise _bad_bind(bind, "AsyncEngine", "create_session_factory")


def _bad_bind(bind: object, wanted: str, other_factory: str) -> InvalidArgumentError:
    if isinstance(bind, (Engine, AsyncEngine)):
        return InvalidArgumentError(
            f"expected a database URL or an {wanted}, got {type(bind).__name__}; "
            f"use {other_factory}() with this engine"
        )
    return InvalidArgumentError(
        f"bind must be a database URL (a str or sqlalchemy.URL) or an {wanted}, "
        f"got {type(bind).__name__}"
    )
