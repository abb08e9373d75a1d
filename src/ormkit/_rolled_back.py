"""Rollback-per-test isolation: every session of a factory joins one transaction, undone at the end.

SQLAlchemy's own recipe for a test suite: one connection in a transaction, and the factory's
sessions bound to it with `join_transaction_mode="create_savepoint"`. A session's commit then
releases a savepoint, its rollback rolls back to one, and the application's code (plain
sessions, units of work, `run` with its retries, savepoints, nested units of work,
`on_commit`) behaves as in production, while the outer transaction, rolled back when the block
ends, leaves the database exactly as it was. The factory is reconfigured for the block only,
and restored as it was, whatever happens.

The sessions share one connection, so they must be used one after another: a statement sent
while another thread or task has one under way on it is refused with a `TransactionError`,
rather than a driver error about a busy connection.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from typing_extensions import Self

from ormkit._cancellation import shielded
from ormkit._checks import describe
from ormkit._nesting import current_owner
from ormkit.errors import ConfigurationError, InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    import asyncio
    from types import TracebackType

    from sqlalchemy import Connection, Transaction
    from sqlalchemy.engine.interfaces import ExceptionContext
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncTransaction

__all__ = ["AsyncRolledBack", "RolledBack"]

# The factories inside a rolled_back block right now: a second block on one of them would bind
# it to a second connection, and restore the first one's configuration at its end.
_isolated: weakref.WeakSet[object] = weakref.WeakSet()


class _Guard:
    """Refuses a statement on the shared connection while another thread or task has one."""

    def __init__(self) -> None:
        self.busy: tuple[int, object] | None = None
        self.lock = threading.Lock()

    def before(self) -> None:
        owner = current_owner()
        with self.lock:
            if self.busy is not None and self.busy != owner:
                raise TransactionError(
                    "inside rolled_back(factory), the factory's sessions share one connection, "
                    "and another thread or task has a statement under way on it; use the "
                    "factory's sessions one after another in a test (a test client that serves "
                    "the app in another thread is fine: it waits for the request), or run "
                    "concurrent work against a database without rolled_back"
                )
            self.busy = owner

    def done(self) -> None:
        with self.lock:
            self.busy = None


# The guarded connections. The listeners are added once per engine and dialect (adding and
# removing them for every test would cost more than the test's own unit of work), and find
# their guard here; a connection that is not guarded costs them one dictionary look-up.
_guards: weakref.WeakKeyDictionary[Connection, _Guard] = weakref.WeakKeyDictionary()
_listening: weakref.WeakSet[object] = weakref.WeakSet()


def _guard(connection: Connection) -> None:
    _listen_once(connection.engine)
    _guards[connection] = _Guard()


def _listen_once(engine: Engine) -> None:
    for target, name, listener in (
        (engine, "before_cursor_execute", _before),
        (engine, "after_cursor_execute", _after),
        # A failed statement fires no after_cursor_execute; the dialect's handle_error does.
        (engine.dialect, "handle_error", _failed),
    ):
        if target not in _listening:
            event.listen(target, name, listener)
    _listening.update((engine, engine.dialect))


def _before(connection: Connection, *_args: object) -> None:
    guard = _guards.get(connection)
    if guard is not None:
        guard.before()


def _after(connection: Connection, *_args: object) -> None:
    guard = _guards.get(connection)
    if guard is not None:
        guard.done()


def _failed(context: ExceptionContext) -> None:
    guard = _guards.get(context.connection) if context.connection is not None else None
    if guard is not None:
        guard.done()


class _Isolation:
    """What both flavours share: the checks, claiming the factory, and restoring it."""

    _with = "with"

    def __init__(self, factory: Any, engine_class: type[Engine | AsyncEngine]) -> None:
        self.factory = factory
        kw: dict[str, Any] = factory.kw
        if kw.get("binds"):
            raise ConfigurationError(
                "rolled_back() needs a factory bound to one engine; this one has binds= for "
                "several, and their transactions could not be rolled back as one"
            )
        bind = kw.get("bind")
        if bind is None:
            raise ConfigurationError(
                "rolled_back() needs a factory bound to an engine, and this one has no bind; "
                "make it with ormkit.create_session_factory(engine) (or "
                "create_async_session_factory), or sessionmaker(bind=engine)"
            )
        if not isinstance(bind, engine_class):
            raise ConfigurationError(
                f"rolled_back() needs a factory bound to an {engine_class.__name__}, and this "
                f"one is bound to {describe(bind)}; is it inside another rolled_back block, or "
                "bound to a connection already?"
            )
        self._engine: Any = bind
        self._saved: dict[str, Any] | None = None

    def _claim(self) -> None:
        if self._saved is not None or self.factory in _isolated:
            raise TransactionError(
                f"this factory is inside a rolled_back block already; `{self._with} "
                "rolled_back(factory)` once per test (the pytest fixture ormkit_rolled_back does "
                "it for you), and nest units of work inside it instead"
            )
        _isolated.add(self.factory)

    def _bind(self, connection: Connection | AsyncConnection) -> None:
        self._saved = dict(self.factory.kw)
        self.factory.configure(bind=connection, join_transaction_mode="create_savepoint")

    def _restore(self) -> None:
        if self._saved is not None:
            self.factory.kw.clear()
            self.factory.kw.update(self._saved)
            self._saved = None
        _isolated.discard(self.factory)

    def _outside(self, member: str) -> TransactionError:
        return TransactionError(
            f"rolled_back(...).{member} is used outside its block; use it inside "
            f"`{self._with} rolled_back(factory) as isolated:`"
        )


class RolledBack(_Isolation):
    """A `sessionmaker` whose sessions join one transaction, rolled back when the block ends.

    ```python
    with rolled_back(SessionLocal) as isolated:
        with UnitOfWork(SessionLocal) as uow:      # commits, as in production: a RELEASE
            uow.add(User(name="roach"))
        with SessionLocal() as session:
            assert session.scalar(select(func.count(User.id))) == 1
    # rolled back: the database is as it was, and SessionLocal as it was configured
    ```
    """

    def __init__(self, factory: sessionmaker[Any]) -> None:
        super().__init__(factory, Engine)
        self._connection: Connection | None = None
        self._transaction: Transaction | None = None

    @property
    def connection(self) -> Connection:
        """The connection every session of the factory uses inside the block."""
        if self._connection is None:
            raise self._outside("connection")
        return self._connection

    def __enter__(self) -> Self:
        self._claim()
        try:
            connection = self._engine.connect()
            try:
                self._transaction = connection.begin()
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            _guard(connection)
            self._bind(connection)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, transaction = self._connection, self._transaction
        self._connection, self._transaction = None, None
        self._restore()  # first: the factory is as it was even if the rollback fails
        if connection is not None:
            _guards.pop(connection, None)
        try:
            if transaction is not None and transaction.is_active:
                transaction.rollback()
        finally:
            if connection is not None:
                connection.close()


class AsyncRolledBack(_Isolation):
    """The async twin of `RolledBack`, for an `async_sessionmaker`, used with `async with`."""

    _with = "async with"

    def __init__(self, factory: async_sessionmaker[Any]) -> None:
        super().__init__(factory, AsyncEngine)
        self._connection: AsyncConnection | None = None
        self._transaction: AsyncTransaction | None = None

    @property
    def connection(self) -> AsyncConnection:
        """The connection every session of the factory uses inside the block."""
        if self._connection is None:
            raise self._outside("connection")
        return self._connection

    async def __aenter__(self) -> Self:
        self._claim()
        try:
            connection = await self._engine.connect()
            try:
                self._transaction = await connection.begin()
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
            # Statements of the async connection run on its sync twin: the guard listens there.
            sync_connection = connection.sync_connection
            if sync_connection is not None:
                _guard(sync_connection)
            self._bind(connection)
        except BaseException:
            self._restore()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, transaction = self._connection, self._transaction
        self._connection, self._transaction = None, None
        self._restore()
        if connection is not None and connection.sync_connection is not None:
            _guards.pop(connection.sync_connection, None)
        # Shielded: a test cancelled (a timeout) at its end still leaves nothing behind.
        cancelled: asyncio.CancelledError | None = None
        try:
            if transaction is not None and transaction.is_active:
                cancelled = await shielded(transaction.rollback())
        finally:
            if connection is not None:
                cancelled = await shielded(connection.close()) or cancelled
        if cancelled is not None:
            raise cancelled


def check_factory(factory: object) -> None:
    """Refuse what is not a session factory."""
    if not isinstance(factory, (sessionmaker, async_sessionmaker)):
        raise InvalidArgumentError(
            f"rolled_back() takes the application's session factory (a sessionmaker or "
            f"async_sessionmaker, such as ormkit.create_session_factory(engine) makes), got "
            f"{describe(factory)}"
        )
