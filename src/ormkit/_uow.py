"""`UnitOfWork` and `AsyncUnitOfWork`: one transaction, committed whole or not at all.

```python
with UnitOfWork(SessionLocal) as uow:
    parent = uow.add(Parent(name="p"))
    uow.flush()                                   # explicit flush point: parent.id is set
    uow.add(Child(parent_id=parent.id))
    uow.on_commit(lambda: print("committed"))     # runs only after a successful commit
```

A clean exit commits, then runs the `on_commit` callbacks; an exception rolls back and
propagates; the session is closed either way. The state machine, the callbacks and the checks
live in an I/O-free base; the two classes differ only where they wait on the database.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import NO_STATE, UnmappedInstanceError
from typing_extensions import Self

from ormkit._repository import AsyncRepository, Repository, describe
from ormkit._retry import RetryPolicy, transient_reason
from ormkit._session import flush_error_of, statement_error_of
from ormkit.errors import InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
    from types import TracebackType

    from sqlalchemy.engine.interfaces import IsolationLevel

__all__ = ["AsyncUnitOfWork", "UnitOfWork"]

logger = logging.getLogger("ormkit")

T = TypeVar("T")
R = TypeVar("R")
SessionT = TypeVar("SessionT", Session, AsyncSession)
CallbackT = TypeVar("CallbackT")
RepositoryT = TypeVar("RepositoryT", bound="Repository[Any, Any]")
AsyncRepositoryT = TypeVar("AsyncRepositoryT", bound="AsyncRepository[Any, Any]")

SyncCallback: TypeAlias = "Callable[[], object]"
AsyncCallback: TypeAlias = "Callable[[], object] | Callable[[], Awaitable[object]]"

_NEW, _OPEN, _ENDED = "new", "open", "ended"


class _UnitOfWorkBase(Generic[SessionT, CallbackT]):
    """What both flavours share, none of it I/O: state, checks, callbacks, the session."""

    _with = "with"  # how the docs and messages spell the block: `with` or `async with`

    def __init__(self) -> None:
        self._state = _NEW
        self._session: SessionT | None = None
        self._callbacks: list[CallbackT] = []
        self._committed = False  # once True, running the work again could apply it twice

    @property
    def session(self) -> SessionT:
        """The session of this unit of work (only inside the block)."""
        return self._open_session("session")

    def add(self, obj: T) -> T:
        """Add `obj` to the session, to be INSERTed at the next flush; returns it."""
        session = self._open_session("add")
        try:
            session.add(obj)
        except UnmappedInstanceError as error:
            # Checked only once SQLAlchemy has refused: `add` runs once per row.
            if _is_model_object(obj):
                raise  # SQLAlchemy refused another object, reached from this one
            raise self._not_a_model_object("add", obj) from error
        return obj

    def add_all(self, objs: Iterable[T]) -> list[T]:
        """Add several objects; returns them as a list."""
        session = self._open_session("add_all")
        if not isinstance(cast("object", objs), Iterable):
            raise InvalidArgumentError(
                f"{type(self).__name__}.add_all() takes an iterable of model objects, such as "
                f"a list, got {describe(objs)}"
            )
        added = list(objs)
        for obj in added:
            # All checked before any is added: Session.add_all would add those before a bad one.
            if not _is_model_object(obj):
                raise self._not_a_model_object("add_all", obj)
        session.add_all(added)
        return added

    def on_commit(self, callback: CallbackT) -> None:
        """Run `callback()` once, after the commit that makes this work durable.

        Callbacks run in the order registered, after a clean exit's commit or an explicit
        `commit()`, with the session's connection already back in the pool. None run if the
        work is rolled back; those registered inside a savepoint that rolls back are dropped.
        A callback that raises does not undo the commit: the others still run, then the first
        error is raised (later ones are logged on the `ormkit` logger).
        """
        self._open_session("on_commit")
        if not callable(callback):
            raise InvalidArgumentError(
                f"on_commit() takes a callable with no arguments, got {callback!r}; "
                "pass arguments with a lambda or functools.partial"
            )
        self._callbacks.append(callback)

    def _not_a_model_object(self, method: str, obj: object) -> InvalidArgumentError:
        fix = (
            f"pass an instance such as {obj.__name__}(...)"
            if isinstance(obj, type)
            else "pass an instance of a class mapped with SQLAlchemy (a model object)"
        )
        return InvalidArgumentError(
            f"{type(self).__name__}.{method}() takes model objects, got {describe(obj)}; {fix}"
        )

    # --- the I/O-free parts of entering, leaving and committing ------------------------------

    def _open_session(self, member: str) -> SessionT:
        if self._state == _OPEN and self._session is not None:
            return self._session
        name = type(self).__name__
        if self._state == _NEW:
            raise TransactionError(
                f"{name}.{member} is used before the unit of work was opened; use it inside "
                f"`{self._with} {name}(factory) as uow:`"
            )
        raise TransactionError(
            f"{name}.{member} is used after the unit of work ended (it was committed or rolled "
            f"back and closed); open a new one with `{self._with} {name}(factory) as uow:`"
        )

    def _begin(self, session: SessionT) -> None:
        name = type(self).__name__
        if self._state == _OPEN:
            raise TransactionError(
                f"this {name} is already open; a unit of work is entered once, so create a new "
                f"{name}(factory) for separate work"
            )
        if self._state == _ENDED:
            raise TransactionError(
                f"this {name} has ended and cannot be reopened; create a new {name}(factory)"
            )
        self._session = session
        self._state = _OPEN

    def _end(self) -> SessionT:
        session = self._open_session("__exit__")
        self._state = _ENDED
        self._session = None
        return session

    def _broken_transaction_error(self, session: Session) -> TransactionError | None:
        """The error to raise instead of committing a transaction a caught error broke."""
        if not session.is_active:
            what, cause = "a flush", flush_error_of(session)
        else:
            statement_error = statement_error_of(session)
            if statement_error is None:
                return None
            what, cause = "a statement", statement_error
        error = TransactionError(
            f"{what} failed inside this unit of work and its error was caught, so the "
            "transaction cannot commit; everything was rolled back. Let the error propagate, or "
            "put the work that may fail in `uow.savepoint()` and catch the error outside it"
        )
        error.__cause__ = cause
        return error

    def _retry_delay(self, error: Exception, attempt: int, policy: RetryPolicy) -> float | None:
        """Seconds to wait before the next attempt of `run`, or None: raise `error`."""
        if self._committed or attempt >= policy.attempts:
            return None
        reason = transient_reason(error)
        if reason is None:
            return None
        delay = policy.delay(attempt)
        logger.warning(
            "transaction conflict (%s) on attempt %d of %d; running the work again in %.3f s",
            reason,
            attempt,
            policy.attempts,
            delay,
        )
        return delay

    def _take_callbacks(self) -> list[CallbackT]:
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    @staticmethod
    def _log_callback_error(error: BaseException) -> None:
        logger.error(
            "an on_commit callback failed after another one had already failed",
            exc_info=(type(error), error, error.__traceback__),
        )


def _check_factory(factory: object, *, want_async: bool) -> None:
    got = type(factory).__name__
    if want_async and not isinstance(factory, async_sessionmaker):
        hint = "use UnitOfWork for a sessionmaker; " if isinstance(factory, sessionmaker) else ""
        raise InvalidArgumentError(
            f"AsyncUnitOfWork takes an async_sessionmaker, got {got}; "
            f"{hint}make one with ormkit.create_async_session_factory(url)"
        )
    if not want_async and not isinstance(factory, sessionmaker):
        hint = (
            "use AsyncUnitOfWork for an async_sessionmaker; "
            if isinstance(factory, async_sessionmaker)
            else ""
        )
        raise InvalidArgumentError(
            f"UnitOfWork takes a sessionmaker, got {got}; "
            f"{hint}make one with ormkit.create_session_factory(url)"
        )


def _check_work(work: object) -> None:
    if not callable(work):
        raise InvalidArgumentError(
            f"run() takes the work as a callable of the unit of work, got {work!r}; "
            "pass arguments with a lambda or functools.partial"
        )


def _is_model_object(obj: object) -> bool:
    """Whether `obj` is an instance of a mapped class (one that a session can add)."""
    try:
        instance_state(obj)
    except NO_STATE:
        return False
    return True


async def _awaited_work(work: Callable[[AsyncUnitOfWork], Awaitable[R]], uow: AsyncUnitOfWork) -> R:
    """`await work(uow)`, refusing a `work` that is not async.

    Only calling it tells (a lambda or a partial may return a coroutine), so this runs inside
    the unit of work, which rolls back whatever the call did.
    """
    result: object = work(uow)
    if not inspect.isawaitable(result):
        name = getattr(work, "__name__", None)
        what = "work" if name in (None, "<lambda>") else f"work {name}()"
        got = "None" if result is None else f"an object of type {type(result).__name__}"
        raise InvalidArgumentError(
            f"AsyncUnitOfWork.run() takes the work as an async function of the unit of work, but "
            f"{what} returned {got}, which cannot be awaited; define it with "
            "`async def`, or use UnitOfWork.run() for sync work. Nothing was committed"
        )
    value: R = await result  # Any, from isawaitable: what work's type says it returns
    return value


def _check_repository_class(repository_class: object, wanted: type, owner: str) -> None:
    if not (isinstance(repository_class, type) and issubclass(repository_class, wanted)):
        raise InvalidArgumentError(
            f"{owner}.repository() takes a subclass of {wanted.__name__}, got {repository_class!r}"
        )


# The isolation levels of SQLAlchemy's dialects, as SQLAlchemy spells them once normalized
# (upper case, spaces for underscores). Each dialect takes some of them: SQLite has no READ
# COMMITTED, only SQL Server has SNAPSHOT. The dialect answers at the first statement; a name
# none of them knows is refused here.
_ISOLATION_LEVELS = (
    "SERIALIZABLE",
    "REPEATABLE READ",
    "READ COMMITTED",
    "READ UNCOMMITTED",
    "AUTOCOMMIT",
    "SNAPSHOT",
)


def _check_isolation_level(level: object) -> str:
    """`level` as SQLAlchemy normalizes it, refused if it is no level SQLAlchemy knows."""
    normalized = level.replace("_", " ").upper() if isinstance(level, str) else None
    if normalized not in _ISOLATION_LEVELS:
        known = ", ".join(repr(name) for name in _ISOLATION_LEVELS)
        raise InvalidArgumentError(
            f"isolation_level must be one of {known} (each database takes some of them), "
            f"or None to keep the engine's; got {level!r}"
        )
    return normalized


def _bound(factory: Any, level: IsolationLevel | None) -> dict[str, Any]:
    """Session arguments that give every transaction of the session `level`."""
    if level is None:
        return {}
    level = cast("IsolationLevel", _check_isolation_level(level))
    # An engine with the isolation level as an execution option: each connection the session
    # takes from it, for every transaction (also after commit()), starts at that level, and
    # SQLAlchemy resets the level when the connection goes back to the pool.
    bind = factory.kw.get("bind")
    binds = factory.kw.get("binds")
    if bind is None and not binds:
        raise InvalidArgumentError(
            "isolation_level needs a factory bound to an engine (sessionmaker(bind=engine)); "
            "this factory has no bind"
        )
    arguments: dict[str, Any] = {}
    if bind is not None:
        arguments["bind"] = bind.execution_options(isolation_level=level)
    if binds:
        arguments["binds"] = {
            key: engine.execution_options(isolation_level=level) for key, engine in binds.items()
        }
    return arguments


class UnitOfWork(_UnitOfWorkBase[Session, SyncCallback]):
    """One transaction over a session from `factory`: committed whole on a clean exit.

    ```python
    with UnitOfWork(SessionLocal) as uow:
        users = uow.repository(UserRepository)
        user = users.add(User(name="roach"))
        uow.flush()                                 # user.id is set now
        uow.add(Address(user_id=user.id, email="roach@example.org"))
    ```

    Args:
        factory: a `sessionmaker`, such as one from `ormkit.create_session_factory`.
        isolation_level: the isolation level of every transaction of this unit of work
            (`"SERIALIZABLE"`, `"REPEATABLE READ"`, ...); `None` keeps the engine's.
    """

    def __init__(
        self, factory: sessionmaker[Session], *, isolation_level: IsolationLevel | None = None
    ) -> None:
        _check_factory(factory, want_async=False)
        super().__init__()
        self._factory = factory
        self._session_arguments = _bound(factory, isolation_level)

    @classmethod
    def run(
        cls,
        factory: sessionmaker[Session],
        work: Callable[[UnitOfWork], R],
        /,
        *,
        attempts: int = 3,
        isolation_level: IsolationLevel | None = None,
        backoff: float = 0.02,
        max_backoff: float = 1.0,
    ) -> R:
        """Run `work(uow)` in a fresh unit of work and return its result, retrying conflicts.

        A serialization failure (SQLSTATE 40001), a deadlock (40P01) or SQLite being busy
        aborts a transaction without effect, and running it again is the fix: `run` does so,
        each time in a brand-new unit of work, up to `attempts` calls in all, waiting a random
        time between 0 and `min(max_backoff, backoff * 2 ** (attempt - 1))` seconds in
        between. Any other error, or the last attempt's, is raised as it is. Nothing is run
        again once a commit has happened (an explicit `uow.commit()`, or a callback that
        failed after the final commit): that could apply the work twice.

        `work` must be safe to run more than once: keep side effects outside the database
        (e-mails, messages) in `uow.on_commit`, which runs once, for the attempt that
        committed. Pass arguments with a lambda or `functools.partial`.

        ```python
        def transfer(uow: UnitOfWork) -> None:
            source = uow.session.get(Account, 1)
            source.balance -= 10

        UnitOfWork.run(SessionLocal, transfer, attempts=5, isolation_level="SERIALIZABLE")
        ```
        """
        policy = RetryPolicy(attempts, backoff, max_backoff)
        _check_work(work)
        attempt = 0
        while True:
            attempt += 1
            uow = cls(factory, isolation_level=isolation_level)
            try:
                with uow:
                    return work(uow)
            except Exception as error:
                delay = uow._retry_delay(error, attempt, policy)
                if delay is None:
                    raise
            time.sleep(delay)

    def __enter__(self) -> Self:
        self._begin(self._factory(**self._session_arguments))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session = self._end()
        error = exc or self._broken_transaction_error(session)
        if error is not None:
            _close_after_error(session)
            self._take_callbacks()
            if exc is None:
                raise error
            return
        try:
            session.commit()
        except BaseException:
            _close_after_error(session)
            self._take_callbacks()
            raise
        self._committed = True
        session.close()
        self._run_callbacks()

    def flush(self) -> None:
        """Send pending changes now, so server-generated keys and defaults are set."""
        self._open_session("flush").flush()

    def delete(self, obj: object) -> None:
        """Mark `obj` for deletion at the next flush."""
        session = self._open_session("delete")
        try:
            session.delete(obj)
        except UnmappedInstanceError as error:
            if _is_model_object(obj):
                raise  # SQLAlchemy refused another object, reached from this one
            raise self._not_a_model_object("delete", obj) from error

    def commit(self) -> None:
        """Commit now, run the callbacks registered so far, and keep working.

        What follows runs in a new transaction (with the same isolation level) and is
        committed at the end of the block, or by another `commit()`.
        """
        session = self._open_session("commit")
        error = self._broken_transaction_error(session)
        if error is not None:
            raise error
        session.commit()
        self._committed = True
        self._run_callbacks()

    def repository(self, repository_class: type[RepositoryT]) -> RepositoryT:
        """A repository over this unit of work's session: `uow.repository(UserRepository)`."""
        _check_repository_class(repository_class, Repository, "UnitOfWork")
        return repository_class(self._open_session("repository"))

    def rollback(self) -> None:
        """Roll back everything not yet committed, drop its callbacks, and keep working."""
        self._open_session("rollback").rollback()
        self._take_callbacks()

    @contextmanager
    def savepoint(self) -> Generator[None, None, None]:
        """A SAVEPOINT: an exception inside rolls back to it and propagates.

        The work before the savepoint survives; catch the error outside the block to carry on.
        `on_commit` callbacks registered inside a savepoint that rolls back are dropped.

        ```python
        with UnitOfWork(SessionLocal) as uow:
            uow.add(Order(id=1))
            try:
                with uow.savepoint():
                    uow.add(Coupon(code="DUPLICATE"))
                    uow.flush()                     # IntegrityError: only the coupon is undone
            except IntegrityError:
                pass
        ```
        """
        session = self._open_session("savepoint")
        mark = len(self._callbacks)
        try:
            with session.begin_nested() as nested:
                yield
                if not nested.is_active:
                    # A flush failed inside and its error was caught there: SQLAlchemy has
                    # already rolled back to the savepoint, so its callbacks go too.
                    del self._callbacks[mark:]
        except BaseException:
            del self._callbacks[mark:]
            raise

    def _run_callbacks(self) -> None:
        first: BaseException | None = None
        for callback in self._take_callbacks():
            try:
                callback()
            except Exception as error:  # noqa: BLE001, PERF203 (each runs; the first error is raised)
                if first is None:
                    first = error
                else:
                    self._log_callback_error(error)
        if first is not None:
            raise first


class AsyncUnitOfWork(_UnitOfWorkBase[AsyncSession, AsyncCallback]):
    """The async twin of `UnitOfWork`, used with `async with`.

    ```python
    async with AsyncUnitOfWork(AsyncSessionLocal) as uow:
        user = uow.add(User(name="roach"))
        await uow.flush()
        uow.on_commit(notify)                       # a plain or an async callable
    ```

    A task cancelled inside the block (a timeout, `CancelledError`) rolls back and returns its
    connection to the pool; closing is shielded from the cancellation.
    """

    _with = "async with"

    def __init__(
        self,
        factory: async_sessionmaker[AsyncSession],
        *,
        isolation_level: IsolationLevel | None = None,
    ) -> None:
        _check_factory(factory, want_async=True)
        super().__init__()
        self._factory = factory
        self._session_arguments = _bound(factory, isolation_level)

    @classmethod
    async def run(
        cls,
        factory: async_sessionmaker[AsyncSession],
        work: Callable[[AsyncUnitOfWork], Awaitable[R]],
        /,
        *,
        attempts: int = 3,
        isolation_level: IsolationLevel | None = None,
        backoff: float = 0.02,
        max_backoff: float = 1.0,
    ) -> R:
        """Async version of `UnitOfWork.run`: `work` is an async function of the unit of work."""
        policy = RetryPolicy(attempts, backoff, max_backoff)
        _check_work(work)
        attempt = 0
        while True:
            attempt += 1
            uow = cls(factory, isolation_level=isolation_level)
            try:
                async with uow:
                    return await _awaited_work(work, uow)
            except Exception as error:
                delay = uow._retry_delay(error, attempt, policy)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def __aenter__(self) -> Self:
        self._begin(self._factory(**self._session_arguments))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session = self._end()
        error = exc or self._broken_transaction_error(session.sync_session)
        if error is not None:
            await _aclose_after_error(session)
            self._take_callbacks()
            if exc is None:
                raise error
            return
        try:
            # Shielded: a cancellation arriving during COMMIT waits for its outcome, so the
            # work is known to be committed (and its callbacks run) or not.
            cancelled = await _shielded(session.commit())
        except BaseException:
            await _aclose_after_error(session)
            self._take_callbacks()
            raise
        self._committed = True
        cancelled = await _shielded(session.close()) or cancelled
        await self._run_callbacks()
        if cancelled is not None:
            raise cancelled

    async def flush(self) -> None:
        """Async version of `UnitOfWork.flush`."""
        await self._open_session("flush").flush()

    async def delete(self, obj: object) -> None:
        """Async version of `UnitOfWork.delete`."""
        session = self._open_session("delete")
        try:
            await session.delete(obj)
        except UnmappedInstanceError as error:
            if _is_model_object(obj):
                raise  # SQLAlchemy refused another object, reached from this one
            raise self._not_a_model_object("delete", obj) from error

    async def commit(self) -> None:
        """Async version of `UnitOfWork.commit`."""
        session = self._open_session("commit")
        error = self._broken_transaction_error(session.sync_session)
        if error is not None:
            raise error
        await session.commit()
        self._committed = True
        await self._run_callbacks()

    def repository(self, repository_class: type[AsyncRepositoryT]) -> AsyncRepositoryT:
        """An async repository over this unit of work's session."""
        _check_repository_class(repository_class, AsyncRepository, "AsyncUnitOfWork")
        return repository_class(self._open_session("repository"))

    async def rollback(self) -> None:
        """Async version of `UnitOfWork.rollback`."""
        await self._open_session("rollback").rollback()
        self._take_callbacks()

    @asynccontextmanager
    async def savepoint(self) -> AsyncGenerator[None, None]:
        """Async version of `UnitOfWork.savepoint`, used with `async with`."""
        session = self._open_session("savepoint")
        mark = len(self._callbacks)
        try:
            async with session.begin_nested() as nested:
                yield
                if not nested.is_active:
                    del self._callbacks[mark:]  # rolled back inside: see UnitOfWork.savepoint
        except BaseException:
            del self._callbacks[mark:]
            raise

    async def _run_callbacks(self) -> None:
        first: BaseException | None = None
        for callback in self._take_callbacks():
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as error:  # noqa: BLE001, PERF203 (each runs; the first error is raised)
                if first is None:
                    first = error
                else:
                    self._log_callback_error(error)
        if first is not None:
            raise first


def _close_after_error(session: Session) -> None:
    # Closing rolls back and returns the connection. If that fails too (the connection is
    # gone), the error the block raised matters more: log this one, let that one propagate.
    try:
        session.close()
    except Exception:
        logger.exception("closing the session after an error failed as well")


async def _aclose_after_error(session: AsyncSession) -> None:
    try:
        cancelled = await _shielded(session.close())
    except Exception:
        logger.exception("closing the session after an error failed as well")
        return
    if cancelled is not None:
        raise cancelled


async def _shielded(operation: Awaitable[None]) -> asyncio.CancelledError | None:
    """Run `operation` to its end even if the task is cancelled meanwhile.

    Returns the cancellation that arrived (for the caller to raise once it is safe), or None.
    An error of the operation itself propagates.
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
    task.result()  # the operation's own error, if it failed
    return cancelled
