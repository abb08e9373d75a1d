"""`UnitOfWork` and `AsyncUnitOfWork`: one transaction, committed whole or not at all.

```python
with UnitOfWork(SessionLocal) as uow:
    parent = uow.add(Parent(name="p"))
    uow.flush()                                   # explicit flush point: parent.id is set
    uow.add(Child(parent_id=parent.id))
    uow.on_commit(lambda: print("committed"))     # runs only after a successful commit
```

A clean exit commits, then runs the `on_commit` callbacks; an exception rolls back and
propagates; the session is closed for good either way. A unit of work entered inside an open
one of the same factory (same thread, or same task) joins it as a savepoint. The state, the
checks and the callbacks live in an I/O-free base (`_uow_base`); the two classes here differ
only where they wait on the database, line for line.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, TypeAlias, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.orm.exc import UnmappedInstanceError
from typing_extensions import Self

from ormkit._cancellation import aclose, aclose_after_error, close_after_error, shielded
from ormkit._checks import check_sync_callable, is_model_object, refuse_awaitable
from ormkit._journal import attach, detach
from ormkit._replicas import CAUGHT_UP, COMMIT_POSITION, POLL_INTERVAL, PROBE
from ormkit._repository import AsyncRepository, Repository
from ormkit._retry import RetryPolicy
from ormkit._uow_base import (
    UnitOfWorkBase,
    check_factory,
    check_repository_class,
    check_work,
)
from ormkit.errors import InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
    from types import TracebackType
    from typing import Any

    from sqlalchemy.engine.interfaces import IsolationLevel

    from ormkit._journal import Callback, Journal
    from ormkit._replicas import Replica, ReplicaSet

__all__ = ["AsyncUnitOfWork", "UnitOfWork"]

R = TypeVar("R")
RepositoryT = TypeVar("RepositoryT", bound="Repository[Any, Any]")
AsyncRepositoryT = TypeVar("AsyncRepositoryT", bound="AsyncRepository[Any, Any]")

SyncCallback: TypeAlias = "Callable[[], object]"
AsyncCallback: TypeAlias = "Callable[[], object] | Callable[[], Awaitable[object]]"

_SYNC_FIX = "use AsyncUnitOfWork for async work, or call the coroutine from a plain function"


class UnitOfWork(UnitOfWorkBase[Session, SyncCallback]):
    """One transaction over a session from `factory`: committed whole on a clean exit.

    ```python
    with UnitOfWork(SessionLocal) as uow:
        users = uow.repository(UserRepository)
        user = users.add(User(name="roach"))
        uow.flush()                                 # user.id is set now
        uow.add(Address(user_id=user.id, email="roach@example.org"))
    ```

    Entered while another unit of work of the same factory is open in this thread, it joins
    that one: its block is a savepoint, and the outermost unit of work commits.

    Args:
        factory: a `sessionmaker`, such as one from `ormkit.create_session_factory`.
        isolation_level: the isolation level of every transaction of this unit of work
            (`"SERIALIZABLE"`, `"REPEATABLE READ"`, ...); `None` keeps the engine's.
            `"AUTOCOMMIT"` is refused: a unit of work is a transaction.
        durable: refuse to join an open unit of work (`TransactionError`): for work that must
            be committed when its own block ends.
    """

    _savepoint: SessionTransaction | None = None  # a joined unit of work's

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        isolation_level: IsolationLevel | None = None,
        durable: bool = False,
        read_only: bool = False,
        after: str | None = None,
    ) -> None:
        check_factory(factory, want_async=False)
        super().__init__(
            factory, isolation_level, durable=durable, read_only=read_only, after=after
        )

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
        again once a commit has happened, by whatever route (`uow.commit()`,
        `uow.session.commit()`, a callback that failed after the final commit): that could
        apply the work twice. Inside an open unit of work of the same factory, `run` joins it
        and runs `work` once: a conflict aborts the whole transaction, so only a retry of the
        outermost can help.

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
        check_work(work)
        check_sync_callable(work, "UnitOfWork.run()", fix="use AsyncUnitOfWork.run() for it")
        attempt = 0
        while True:
            attempt += 1
            uow = cls(factory, isolation_level=isolation_level)
            try:
                with uow:
                    result = work(uow)
                    # Inside the block: the unit of work rolls back whatever the call did.
                    refuse_awaitable(result, "the work given to UnitOfWork.run()", fix=_SYNC_FIX)
                    return result
            except Exception as error:
                delay = uow._retry_delay(error, attempt, policy)
                if delay is None:
                    raise
            time.sleep(delay)

    def __enter__(self) -> Self:
        outer = self._outer_to_join()
        if outer is None:
            # close_resets_only=False: once the block ends, the session refuses all further use
            # instead of starting a new transaction that nobody would commit.
            if self._read_only:
                self._opened(self._open_read_only())
            else:
                self._opened(self._factory(close_resets_only=False, **self._session_arguments))
            return self
        # begin_nested() flushes first: a flush error surfaces here, before the block runs.
        self._savepoint = outer.session.begin_nested()
        self._joined(outer)
        self._block_opened(self._savepoint)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session = self._end()
        if self._savepoint is not None:  # joined: its block is a savepoint of the outer one's
            self._leave_savepoint(session, self._savepoint, exc)
            return
        error = exc or self._refusal(session, at_exit=True)
        if error is not None:
            close_after_error(session)
            self._run_callbacks(self._finished(session), raise_errors=False)
            if exc is None:
                raise error
            return
        try:
            session.commit()
        except BaseException:
            close_after_error(session)
            self._run_callbacks(self._finished(session), raise_errors=False)
            raise
        session.close()
        self._take_commit_token()
        self._run_callbacks(self._finished(session), raise_errors=True)

    def _open_read_only(self) -> Session:
        """The session of a read-only unit of work, read-only wherever it reads.

        On the first replica that passes its probe (see `_replicas`), else on the primary.
        """
        choices, primary = self._read_only_choices()
        for arguments, replica in choices:
            session: Session = self._factory(close_resets_only=False, **arguments)
            # Heard from the first statement on: the probe begins the transaction the reads use.
            attach(session, count_statements=False)
            try:
                verdict = self._probe(session, replica)
            except Exception as error:  # noqa: BLE001 - a failing replica is skipped, whatever failed
                detach(session)
                close_after_error(session)
                cast("ReplicaSet", self._replicas).failed(replica, error)
                continue
            except BaseException:
                detach(session)
                close_after_error(session)
                raise
            if verdict == "use":
                return session
            detach(session)
            session.close()
            if verdict == "primary":
                break
        reader: Session = self._factory(close_resets_only=False, **primary)
        return reader

    def _probe(self, session: Session, replica: Replica) -> str:
        """Whether to "use" `replica`, try the "next" one, or read from the "primary"."""
        replicas = cast("ReplicaSet", self._replicas)
        if replicas.kind == "sqlite":
            session.connection()  # a replica that is gone fails here, before any read
            replicas.serving(replica)
            return "use"
        lag, caught_up = session.execute(PROBE, {"token": self._after}).one()
        verdict = self._replica_verdict(replica, lag, caught_up)
        if verdict != "wait":
            return verdict
        deadline = time.monotonic() + replicas.replica_wait
        while time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
            if session.execute(CAUGHT_UP, {"token": self._after}).scalar():
                session.rollback()  # the reads get a snapshot taken once the commit is there
                return "use"
        return "primary"

    def _take_commit_token(self) -> None:
        if not self._wants_commit_token():
            return
        replicas = cast("ReplicaSet", self._replicas)
        try:
            with replicas.primary.connect() as connection:
                # AUTOCOMMIT: one round trip, no BEGIN or ROLLBACK around it.
                connection.execution_options(isolation_level="AUTOCOMMIT")
                self._token_taken(connection.execute(COMMIT_POSITION).scalar_one())
        except Exception as error:  # noqa: BLE001 - the commit happened; only its position is lost
            self._token_failed(error)

    def flush(self) -> None:
        """Send pending changes now, so server-generated keys and defaults are set."""
        self._open_session("flush").flush()

    def delete(self, obj: object) -> None:
        """Mark `obj` for deletion at the next flush."""
        session = self._open_session("delete")
        try:
            session.delete(obj)
        except UnmappedInstanceError as error:
            if is_model_object(obj):
                raise  # SQLAlchemy refused another object, reached from this one
            raise self._not_a_model_object("delete", obj) from error

    def commit(self) -> None:
        """Commit now, run the callbacks registered so far, and keep working.

        What follows runs in a new transaction (with the same isolation level) and is
        committed at the end of the block, or by another `commit()`. Refused in a unit of work
        that joined another: the outermost one commits.
        """
        session = self._open_session("commit")
        self._check_owns_transaction("commit")
        error = self._refusal(session, at_exit=False)
        if error is not None:
            raise error
        session.commit()
        self._take_commit_token()
        self._run_due()

    def repository(self, repository_class: type[RepositoryT]) -> RepositoryT:
        """A repository over this unit of work's session: `uow.repository(UserRepository)`."""
        check_repository_class(repository_class, Repository, "UnitOfWork")
        return repository_class(self._open_session("repository"))

    def rollback(self) -> None:
        """Roll back everything not yet committed, drop its callbacks, and keep working.

        The errors caught so far are forgotten with the work they spoiled. Refused in a unit
        of work that joined another: raise inside it to roll back to its savepoint.
        """
        session = self._open_session("rollback")
        self._check_owns_transaction("rollback")
        session.rollback()

    @contextmanager
    def savepoint(self) -> Generator[None, None, None]:
        """A SAVEPOINT: an exception inside rolls back to it and propagates.

        The work before the savepoint survives; catch the error outside the block to carry on.
        `on_commit` callbacks registered inside a savepoint that rolls back are dropped. A
        block that caught a failed statement's error inside is rolled back to the savepoint
        too, and raises `TransactionError`: its work is incomplete.

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
        nested = session.begin_nested()
        self._block_opened(nested)
        try:
            yield
        except BaseException as error:
            self._leave_savepoint(session, nested, error)
            raise
        self._leave_savepoint(session, nested, None)

    def _leave_savepoint(
        self, session: Session, nested: SessionTransaction, exc: BaseException | None
    ) -> None:
        """Release `nested` after a clean block; otherwise roll back to it."""
        try:
            if self._ended_inside(session, nested):
                if exc is None:
                    raise self._ended_refusal()
                return
            error = None if exc is not None else self._savepoint_refusal(nested)
            if exc is None and error is None and nested.is_active:
                self._release_savepoint(session, nested)
                return
            # Inactive: a flush failed inside, and SQLAlchemy already rolled back to it.
            self._undo_savepoint(session, nested, quiet=exc is not None)
            if error is not None:
                raise error
        finally:
            self._block_closed(nested)

    def _release_savepoint(self, session: Session, nested: SessionTransaction) -> None:
        journal = cast("Journal", self._journal)
        journal.releasing = nested
        try:
            nested.commit()  # RELEASE SAVEPOINT
        except BaseException:
            journal.releasing = None
            self._undo_savepoint(session, nested, quiet=True)
            raise
        finally:
            journal.releasing = None

    def _undo_savepoint(self, session: Session, nested: SessionTransaction, *, quiet: bool) -> None:
        """Roll back to `nested`; if that fails, the unit of work must not commit.

        With `quiet` (an error is already on its way out of the block), a failure is logged and
        that error propagates rather than this one.
        """
        if self._ended_inside(session, nested):
            return  # already ended (a rollback of the whole transaction ended it too)
        try:
            nested.rollback()
        except Exception as error:
            self._savepoint_failed(error)
            if not quiet:
                raise
        except BaseException as error:
            self._savepoint_failed(error)
            raise

    def _run_due(self) -> None:
        journal = self._journal
        if journal is None:
            return
        self._running_callbacks = True
        try:
            self._run_callbacks(journal.take_due(), raise_errors=True)
        finally:
            self._running_callbacks = False

    def _run_callbacks(self, callbacks: list[Callback], *, raise_errors: bool) -> None:
        first: BaseException | None = None
        for callback in callbacks:
            try:
                refuse_awaitable(callback.function(), "an on_commit callback", fix=_SYNC_FIX)
            except Exception as error:  # noqa: BLE001, PERF203 (each runs; the first error is raised)
                if self._callback_failed(callback, error, raise_it=raise_errors and first is None):
                    first = error
        if first is not None:
            raise first

    def _check_callback(self, callback: object) -> None:
        check_sync_callable(callback, "UnitOfWork.on_commit()", fix=_SYNC_FIX)


class AsyncUnitOfWork(UnitOfWorkBase[AsyncSession, AsyncCallback]):
    """The async twin of `UnitOfWork`, used with `async with`.

    ```python
    async with AsyncUnitOfWork(AsyncSessionLocal) as uow:
        user = uow.add(User(name="roach"))
        await uow.flush()
        uow.on_commit(notify)                       # a plain or an async callable
    ```

    A task cancelled inside the block (a timeout, `CancelledError`) rolls back and returns its
    connection to the pool. COMMIT, ROLLBACK, ROLLBACK TO SAVEPOINT and closing are shielded
    from the cancellation: they finish, then the cancellation is raised.
    """

    _with = "async with"
    _savepoint: AsyncSessionTransaction | None = None  # a joined unit of work's

    def __init__(
        self,
        factory: async_sessionmaker[AsyncSession],
        *,
        isolation_level: IsolationLevel | None = None,
        durable: bool = False,
        read_only: bool = False,
        after: str | None = None,
    ) -> None:
        check_factory(factory, want_async=True)
        super().__init__(
            factory, isolation_level, durable=durable, read_only=read_only, after=after
        )

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
        check_work(work)
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
        outer = self._outer_to_join()
        if outer is None:
            if self._read_only:
                self._opened(await self._open_read_only())
            else:
                self._opened(self._factory(close_resets_only=False, **self._session_arguments))
            return self
        self._savepoint = await outer.session.begin_nested()
        self._joined(outer)
        self._block_opened(_sync_transaction(self._savepoint))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session = self._end()
        if self._savepoint is not None:  # joined: its block is a savepoint of the outer one's
            await self._leave_savepoint(session, self._savepoint, exc)
            return
        error = exc or self._refusal(session.sync_session, at_exit=True)
        if error is not None:
            await aclose_after_error(session)
            await self._run_callbacks(self._finished(session), raise_errors=False)
            if exc is None:
                raise error
            return
        try:
            # Shielded: a cancellation arriving during COMMIT waits for its outcome, so the
            # work is known to be committed (and its callbacks run) or not.
            cancelled = await shielded(session.commit())
        except BaseException:
            await aclose_after_error(session)
            await self._run_callbacks(self._finished(session), raise_errors=False)
            raise
        cancelled = await aclose(session) or cancelled
        cancelled = await shielded(self._take_commit_token()) or cancelled
        await self._run_callbacks(self._finished(session), raise_errors=True)
        if cancelled is not None:
            raise cancelled

    async def _open_read_only(self) -> AsyncSession:
        """Async version of `UnitOfWork._open_read_only`."""
        choices, primary = self._read_only_choices()
        for arguments, replica in choices:
            session: AsyncSession = self._factory(close_resets_only=False, **arguments)
            attach(session.sync_session, count_statements=True)
            try:
                verdict = await self._probe(session, replica)
            except Exception as error:  # noqa: BLE001 - a failing replica is skipped, whatever failed
                detach(session.sync_session)
                await aclose_after_error(session)
                cast("ReplicaSet", self._replicas).failed(replica, error)
                continue
            except BaseException:
                detach(session.sync_session)
                await aclose_after_error(session)
                raise
            if verdict == "use":
                return session
            detach(session.sync_session)
            await aclose(session)
            if verdict == "primary":
                break
        reader: AsyncSession = self._factory(close_resets_only=False, **primary)
        return reader

    async def _probe(self, session: AsyncSession, replica: Replica) -> str:
        """Async version of `UnitOfWork._probe`."""
        replicas = cast("ReplicaSet", self._replicas)
        if replicas.kind == "sqlite":
            await session.connection()
            replicas.serving(replica)
            return "use"
        lag, caught_up = (await session.execute(PROBE, {"token": self._after})).one()
        verdict = self._replica_verdict(replica, lag, caught_up)
        if verdict != "wait":
            return verdict
        deadline = time.monotonic() + replicas.replica_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
            if (await session.execute(CAUGHT_UP, {"token": self._after})).scalar():
                await session.rollback()
                return "use"
        return "primary"

    async def _take_commit_token(self) -> None:
        if not self._wants_commit_token():
            return
        replicas = cast("ReplicaSet", self._replicas)
        try:
            async with replicas.primary.connect() as connection:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                result = await connection.execute(COMMIT_POSITION)
                self._token_taken(result.scalar_one())
        except Exception as error:  # noqa: BLE001 - the commit happened; only its position is lost
            self._token_failed(error)

    async def flush(self) -> None:
        """Async version of `UnitOfWork.flush`."""
        await self._open_session("flush").flush()

    async def delete(self, obj: object) -> None:
        """Async version of `UnitOfWork.delete`."""
        session = self._open_session("delete")
        try:
            await session.delete(obj)
        except UnmappedInstanceError as error:
            if is_model_object(obj):
                raise  # SQLAlchemy refused another object, reached from this one
            raise self._not_a_model_object("delete", obj) from error

    async def commit(self) -> None:
        """Async version of `UnitOfWork.commit`, shielded from cancellation like the last one.

        If the task is cancelled meanwhile, the COMMIT still completes and the callbacks
        registered before it run; then the cancellation is raised.
        """
        session = self._open_session("commit")
        self._check_owns_transaction("commit")
        error = self._refusal(session.sync_session, at_exit=False)
        if error is not None:
            raise error
        cancelled = await shielded(session.commit())
        cancelled = await shielded(self._take_commit_token()) or cancelled
        await self._run_due()
        if cancelled is not None:
            raise cancelled

    def repository(self, repository_class: type[AsyncRepositoryT]) -> AsyncRepositoryT:
        """An async repository over this unit of work's session."""
        check_repository_class(repository_class, AsyncRepository, "AsyncUnitOfWork")
        return repository_class(self._open_session("repository"))

    async def rollback(self) -> None:
        """Async version of `UnitOfWork.rollback`, shielded from cancellation."""
        session = self._open_session("rollback")
        self._check_owns_transaction("rollback")
        cancelled = await shielded(session.rollback())
        if cancelled is not None:
            raise cancelled

    @asynccontextmanager
    async def savepoint(self) -> AsyncGenerator[None, None]:
        """Async version of `UnitOfWork.savepoint`, used with `async with`.

        Rolling back to the savepoint is shielded from cancellation: a timeout that lands on
        the ROLLBACK TO SAVEPOINT waits for it, so the rows it undoes are never committed.
        """
        session = self._open_session("savepoint")
        nested = await session.begin_nested()
        self._block_opened(_sync_transaction(nested))
        try:
            yield
        except BaseException as error:
            await self._leave_savepoint(session, nested, error)
            raise
        await self._leave_savepoint(session, nested, None)

    async def _leave_savepoint(
        self, session: AsyncSession, nested: AsyncSessionTransaction, exc: BaseException | None
    ) -> None:
        """Async version of `UnitOfWork._leave_savepoint`."""
        sync_nested = _sync_transaction(nested)
        try:
            if self._ended_inside(session.sync_session, sync_nested):
                if exc is None:
                    raise self._ended_refusal()
                return
            error = None if exc is not None else self._savepoint_refusal(sync_nested)
            if exc is None and error is None and nested.is_active:
                await self._release_savepoint(session, nested)
                return
            await self._undo_savepoint(session, nested, quiet=exc is not None)
            if error is not None:
                raise error
        finally:
            self._block_closed(sync_nested)

    async def _release_savepoint(
        self, session: AsyncSession, nested: AsyncSessionTransaction
    ) -> None:
        journal = cast("Journal", self._journal)
        journal.releasing = _sync_transaction(nested)
        try:
            cancelled = await shielded(nested.commit())  # RELEASE SAVEPOINT
        except BaseException:
            journal.releasing = None
            await self._undo_savepoint(session, nested, quiet=True)
            raise
        finally:
            journal.releasing = None
        if cancelled is not None:
            raise cancelled

    async def _undo_savepoint(
        self, session: AsyncSession, nested: AsyncSessionTransaction, *, quiet: bool
    ) -> None:
        """Async version of `UnitOfWork._undo_savepoint`, shielded from cancellation."""
        if self._ended_inside(session.sync_session, _sync_transaction(nested)):
            return  # already ended (a rollback of the whole transaction ended it too)
        try:
            cancelled = await shielded(nested.rollback())
        except Exception as error:
            self._savepoint_failed(error)
            if not quiet:
                raise
            return
        except BaseException as error:
            self._savepoint_failed(error)
            raise
        if cancelled is not None:
            raise cancelled

    async def _run_due(self) -> None:
        journal = self._journal
        if journal is None:
            return
        self._running_callbacks = True
        try:
            await self._run_callbacks(journal.take_due(), raise_errors=True)
        finally:
            self._running_callbacks = False

    async def _run_callbacks(self, callbacks: list[Callback], *, raise_errors: bool) -> None:
        first: BaseException | None = None
        cancelled: asyncio.CancelledError | None = None
        for callback in callbacks:
            try:
                result = callback.function()
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError as error:  # noqa: PERF203
                # The work is committed: the callbacks after this one still run, then the
                # cancellation is raised.
                cancelled = error
            except Exception as error:  # noqa: BLE001 (each runs; the first error is raised)
                if self._callback_failed(callback, error, raise_it=raise_errors and first is None):
                    first = error
        if cancelled is not None:
            raise cancelled
        if first is not None:
            raise first


def _sync_transaction(nested: AsyncSessionTransaction) -> SessionTransaction:
    # Set once the AsyncSessionTransaction has started, which `await begin_nested()` did.
    transaction = nested.sync_transaction
    if transaction is None:  # pragma: no cover (SQLAlchemy sets it when the savepoint starts)
        raise TransactionError("the savepoint was never started")
    return transaction


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
