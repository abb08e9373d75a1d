"""Helpers for tests: claims about SQL ("no query on an identity-map hit"), and isolation.

```python
from ormkit.testing import assert_queries, count_queries

with assert_queries(session, 0):         # fails, listing the SQL, if anything is sent
    users.by_id(1)

with count_queries(engine) as log:
    ...
print(log.count, log.statements)
```

Statements are counted as they reach the driver's cursor (SQLAlchemy's
`before_cursor_execute` event), so a batched INSERT counts once per round trip. Transaction
control (`BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE`) is not counted: some drivers send
it as a statement and others as a protocol call, and a claim about queries should not depend on
which.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, cast, overload

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.orm import session as orm_session

from ormkit._rolled_back import AsyncRolledBack, RolledBack, check_factory
from ormkit.errors import ConfigurationError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

__all__ = [
    "AsyncRolledBack",
    "QueryLog",
    "QueryTarget",
    "RolledBack",
    "assert_max_queries",
    "assert_queries",
    "count_queries",
    "rolled_back",
]

QueryTarget: TypeAlias = (
    "Engine | AsyncEngine | Session | AsyncSession | sessionmaker[Any] | async_sessionmaker[Any]"
)
"""What `count_queries` can watch."""

_TRANSACTION_CONTROL = re.compile(
    r"\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|END|START\s+TRANSACTION)\b", re.IGNORECASE
)


@dataclass
class QueryLog:
    """The statements recorded by `count_queries`, in the order they were sent."""

    statements: list[str] = field(default_factory=list[str])

    @property
    def count(self) -> int:
        """How many statements were sent."""
        return len(self.statements)

    def __str__(self) -> str:
        if not self.statements:
            return "no statements"
        return "\n".join(f"{n}. {sql}" for n, sql in enumerate(self.statements, 1))


class _Recorder:
    """Listens on engines and keeps the statements of the connections it accepts."""

    def __init__(self, log: QueryLog) -> None:
        self.log = log
        self.connections: set[Connection] | None = None  # None: every connection counts
        self.engines: list[Engine] = []
        self.last_call: tuple[object, object] | None = None

    def listen(self, engine: Engine) -> None:
        if engine not in self.engines:
            event.listen(engine, "before_cursor_execute", self.before_cursor_execute)
            self.engines.append(engine)

    def watch(self, connection: Connection) -> None:
        if self.connections is None:
            self.connections = set()
        self.connections.add(connection)
        self.listen(connection.engine)

    def before_cursor_execute(
        self,
        conn: Connection,
        _cursor: object,
        statement: str,
        parameters: object,
        context: object,
        _executemany: bool,  # noqa: FBT001
    ) -> None:
        if self.connections is not None and conn not in self.connections:
            return
        # An engine made by execution_options() fires its parent engine's listeners too: when
        # both are watched, one cursor execution arrives twice, back to back, with the very
        # same context and parameters. (Batches of one insertmanyvalues statement share the
        # context but not the parameters: each batch is a round trip and counts.)
        call = (context, parameters)
        if self.last_call is not None and all(
            a is b for a, b in zip(call, self.last_call, strict=True)
        ):
            return
        self.last_call = call
        if not _TRANSACTION_CONTROL.match(statement):
            self.log.statements.append(statement)

    def close(self) -> None:
        for engine in self.engines:
            event.remove(engine, "before_cursor_execute", self.before_cursor_execute)


@contextmanager
def count_queries(target: QueryTarget) -> Generator[QueryLog, None, None]:
    """Record the SQL statements sent through `target` while the block runs.

    Args:
        target: what to watch. An `Engine` or `AsyncEngine`: every statement on it. A `Session`
            or `AsyncSession`: what that session sends. A `sessionmaker` or
            `async_sessionmaker`: what every session it made sends, including sessions whose
            transaction began before the block. (For an `async_sessionmaker` not made by
            ormkit, that is every session of its sync session class on its engine.)

    Yields:
        A `QueryLog`, filled in as statements are sent.
    """
    log = QueryLog()
    recorder = _Recorder(log)
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    try:
        cleanup = _attach(recorder, target)
        yield log
    finally:
        cleanup()
        recorder.close()


@contextmanager
def assert_queries(target: QueryTarget, expected: int) -> Generator[QueryLog, None, None]:
    """Fail unless exactly `expected` statements are sent through `target` in the block.

    The failure lists the statements that were sent. An exception raised inside the block
    propagates as it is, unchecked.

    ```python
    with assert_queries(session, 0):
        users.by_id(1)     # already loaded: must not query
    ```
    """
    _check_count(expected)
    with count_queries(target) as log:
        yield log
    if log.count != expected:
        msg = f"expected {expected} statement(s), {log.count} were sent:\n{log}"
        raise AssertionError(msg)


@contextmanager
def assert_max_queries(target: QueryTarget, maximum: int) -> Generator[QueryLog, None, None]:
    """Fail if more than `maximum` statements are sent through `target` in the block.

    An N+1 guard: a page that loads 20 rows and their relations must not cost a query per row.
    The failure lists the statements that were sent, as `assert_queries` does.

    ```python
    with assert_max_queries(session, 2):
        render_orders_page(session)
    ```
    """
    _check_count(maximum, "maximum")
    with count_queries(target) as log:
        yield log
    if log.count > maximum:
        msg = f"expected at most {maximum} statement(s), {log.count} were sent:\n{log}"
        raise AssertionError(msg)


@overload
def rolled_back(factory: async_sessionmaker[Any]) -> AsyncRolledBack: ...
@overload
def rolled_back(factory: sessionmaker[Any]) -> RolledBack: ...
def rolled_back(factory: object) -> RolledBack | AsyncRolledBack:
    """Run the block with every session of `factory` inside one transaction, then roll it back.

    For a test: the code under test opens its sessions and units of work as in production
    (they commit, roll back, retry, nest, run their `on_commit` callbacks), and when the block
    ends, also by an exception, the database and the factory are exactly as before. A
    `sessionmaker` gives a `with` block, an `async_sessionmaker` an `async with` block.

    ```python
    with rolled_back(SessionLocal):
        create_user("roach")                       # opens UnitOfWork(SessionLocal), commits
        with SessionLocal() as session:
            assert session.scalar(select(func.count(User.id))) == 1
    ```

    The sessions share one connection: use them one after another (a statement while another
    thread or task has one under way is a `TransactionError`). An `isolation_level` a unit of
    work asks for is not applied inside: the outer transaction's level holds. Works on SQLite
    with ormkit's engines (their SAVEPOINTs are real) and on PostgreSQL.
    """
    check_factory(factory)
    if isinstance(factory, async_sessionmaker):
        return AsyncRolledBack(factory)  # pyright: ignore[reportUnknownArgumentType]
    return RolledBack(cast("sessionmaker[Any]", factory))


def _check_count(expected: object, name: str = "expected") -> None:
    # A typo such as `assert_queries(session, "0")` must not turn into a check that passes.
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidArgumentError(
            f"{name} must be a count of statements (an int >= 0), got {expected!r}"
        )


def _attach(recorder: _Recorder, target: object) -> Callable[[], None]:
    """Start recording what `target` sends; return what stops the session-level listening."""
    if isinstance(target, AsyncEngine):
        target = target.sync_engine
    if isinstance(target, AsyncSession):
        target = target.sync_session
    if isinstance(target, Engine):
        recorder.listen(target)
        return lambda: None
    if isinstance(target, Session):
        return _attach_session(recorder, target)
    if isinstance(target, sessionmaker):
        factory_class: type[Session] = target.class_  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        _watch_open_sessions(recorder, factory_class, engine=None)
        return _attach_session_events(recorder, target, engine=None)  # pyright: ignore[reportUnknownArgumentType]
    if isinstance(target, async_sessionmaker):
        return _attach_async_factory(recorder, target)  # pyright: ignore[reportUnknownArgumentType]
    hint = (
        "; watch its engine instead: count_queries(connection.engine)"
        if isinstance(target, (Connection, AsyncConnection))
        else ""
    )
    raise InvalidArgumentError(
        "count_queries() watches an Engine, AsyncEngine, Session, AsyncSession, sessionmaker or "
        f"async_sessionmaker; got {type(target).__name__}{hint}"
    )


def _attach_session(recorder: _Recorder, session: Session) -> Callable[[], None]:
    transaction = session.get_transaction()
    if transaction is not None:
        for connection in _connections_of(transaction):
            recorder.watch(connection)
    return _attach_session_events(recorder, session, engine=None)


def _attach_async_factory(
    recorder: _Recorder, factory: async_sessionmaker[Any]
) -> Callable[[], None]:
    # async_sessionmaker takes no session events itself; its sessions' sync class does.
    sync_class: type[Session] = factory.kw.get(
        "sync_session_class", factory.class_.sync_session_class
    )
    bind = factory.kw.get("bind")
    engine = bind.sync_engine if isinstance(bind, AsyncEngine) else None
    _watch_open_sessions(recorder, sync_class, engine=engine)
    return _attach_session_events(recorder, sync_class, engine=engine)


def _watch_open_sessions(
    recorder: _Recorder, session_class: type[Session], *, engine: Engine | None
) -> None:
    """Watch the connections of the factory's sessions whose transaction began before the block.

    A session a fixture touched before the block already holds its connection: it fires no
    `after_begin` in the block, and without this its statements would go uncounted, so that
    `assert_queries(factory, 0)` would pass wrongly.
    """
    if recorder.connections is None:
        recorder.connections = set()
    for session in _live_sessions():
        transaction = session.get_transaction() if isinstance(session, session_class) else None
        if transaction is None:
            continue
        for connection in _connections_of(transaction):
            if engine is None or connection.engine.pool is engine.pool:
                recorder.watch(connection)


def _live_sessions() -> list[Session]:
    # SQLAlchemy keeps every live session in a weak registry (what close_all_sessions() walks);
    # it has no public accessor. Without it a count could miss statements and pass wrongly,
    # so its absence is an error, not an empty list.
    registry: object = getattr(orm_session, "_sessions", None)
    if not isinstance(registry, Mapping):
        raise ConfigurationError(
            "count_queries() cannot find the sessions a factory has open in this SQLAlchemy; "
            "count on the engine instead: count_queries(engine)"
        )
    return [
        s
        for s in list(cast("Mapping[object, object]", registry).values())
        if isinstance(s, Session)
    ]


def _attach_session_events(
    recorder: _Recorder, target: object, *, engine: Engine | None
) -> Callable[[], None]:
    if recorder.connections is None:
        recorder.connections = set()

    def after_begin(
        _session: Session, _transaction: SessionTransaction, connection: Connection
    ) -> None:
        # Compare pools, not engines: an engine made by execution_options() (as a unit of
        # work's isolation_level makes) is another Engine object over the same pool.
        if engine is None or connection.engine.pool is engine.pool:
            recorder.watch(connection)

    event.listen(target, "after_begin", after_begin)
    return lambda: event.remove(target, "after_begin", after_begin)


def _connections_of(transaction: SessionTransaction) -> list[Connection]:
    # SQLAlchemy has no public list of the connections a session transaction holds. Without
    # them, statements of a session that began before the block would go uncounted and a
    # "no SQL" assertion could pass wrongly, so read the private mapping, which has the same
    # shape in SQLAlchemy 2.0 and 2.1 (bind -> (Connection, Transaction, ...)).
    held: dict[Any, tuple[Any, ...]] = getattr(transaction, "_connections", {})
    return [entry[0] for entry in held.values() if isinstance(entry[0], Connection)]
