"""The I/O-free half of `UnitOfWork` and `AsyncUnitOfWork`: state, nesting, checks, callbacks.

Everything here decides; nothing here waits on the database. What happened in the session
(commits, rollbacks, failed statements) comes from its `Journal`, which SQLAlchemy's events
fill in, so a unit of work knows about work committed or rolled back through any route, not
only through its own methods.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import UnmappedInstanceError

from ormkit._checks import check_flag, check_isolation_level, describe, is_model_object
from ormkit._journal import Journal, attach, detach, within
from ormkit._nesting import Registration, find_open, register
from ormkit._replicas import (
    READ_ONLY,
    SQLITE_TOKEN,
    UNREACHABLE_TOKEN,
    Replica,
    ReplicaSet,
    format_token,
    parse_token,
    read_only_bind,
    replicas_of,
)
from ormkit._retry import transient_reason
from ormkit._session import flush_error_of
from ormkit.errors import InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from sqlalchemy.orm import SessionTransaction

    from ormkit._journal import Callback
    from ormkit._retry import RetryPolicy

__all__ = ["UnitOfWorkBase", "logger"]

logger = logging.getLogger("ormkit")

T = TypeVar("T")
SessionT = TypeVar("SessionT", Session, AsyncSession)
CallbackT = TypeVar("CallbackT")

_NEW, _OPEN, _ENDED = "new", "open", "ended"


class UnitOfWorkBase(Generic[SessionT, CallbackT]):
    """What both flavours share, none of it I/O."""

    _with = "with"  # how the docs and messages spell the block: `with` or `async with`

    def __init__(
        self,
        factory: Any,
        isolation_level: object,
        *,
        durable: object,
        read_only: object = False,
        after: object = None,
    ) -> None:
        name = type(self).__name__
        check_flag(
            "durable",
            durable,
            meaning="; durable=True refuses to join an open unit of work of the same factory",
        )
        check_flag(
            "read_only",
            read_only,
            meaning="; read_only=True reads from a replica of the factory, if it has any",
        )
        self._factory = factory
        self._isolation_level = (
            None if isolation_level is None else check_isolation_level(isolation_level, name)
        )
        _refuse_autocommit_factory(factory, name)
        self._session_arguments = _session_arguments(factory, self._isolation_level)
        self._durable = bool(durable)
        self._read_only = bool(read_only)
        self._replicas = replicas_of(factory)
        self._after = _token_position(factory, self._replicas, after, read_only=self._read_only)
        self._commit_token: str | None = None
        self._state = _NEW
        self._session: SessionT | None = None
        self._journal: Journal | None = None
        # The unit of work this one joined (its outermost), or None for an outermost one.
        self._outer: UnitOfWorkBase[SessionT, CallbackT] | None = None
        self._registration: Registration[UnitOfWorkBase[SessionT, CallbackT]] | None = None
        self._running_callbacks = False
        # Opened by ormkit.fastapi for a request whose sync endpoint runs in a worker thread.
        self._for_worker_threads = False

    @property
    def session(self) -> SessionT:
        """The session of this unit of work (only inside the block; a joined one shares it)."""
        return self._open_session("session")

    @property
    def commit_token(self) -> str | None:
        """After a commit on the primary of a factory with replicas, where that commit is.

        A short string (no spaces, quotes, commas or semicolons, so it survives a cookie or a
        header): give it to `UnitOfWork(factory, read_only=True, after=token)` to read from a
        replica only once it has that commit. None before a commit, for a read-only or joined
        unit of work, and for a factory without replicas. Readable after the block too.
        """
        return self._commit_token

    def add(self, obj: T) -> T:
        """Add `obj` to the session, to be INSERTed at the next flush; returns it."""
        session = self._open_session("add")
        try:
            session.add(obj)
        except UnmappedInstanceError as error:
            # Checked only once SQLAlchemy has refused: `add` runs once per row.
            if is_model_object(obj):
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
            if not is_model_object(obj):
                raise self._not_a_model_object("add_all", obj)
        session.add_all(added)
        return added

    def on_commit(self, callback: CallbackT, *, robust: bool = False) -> None:
        """Run `callback()` once, after the commit that makes this work durable.

        Callbacks run in the order registered, after the commit (a clean exit's, an explicit
        `commit()`, or `uow.session.commit()`), with the session's connection back in the
        pool. None run if the work is rolled back; those registered inside a savepoint, or a
        nested unit of work, that rolls back are dropped, and a nested unit of work's wait for
        the outermost commit. A callback that raises does not undo the commit: the others
        still run, then the first error is raised (later ones are logged on the `ormkit`
        logger). With `robust=True` its error is only logged, never raised: for
        notifications whose failure must not turn a committed request into an error.
        """
        session = self._open_session("on_commit")
        if not callable(callback):
            raise InvalidArgumentError(
                f"on_commit() takes a callable with no arguments, got {describe(callback)}; "
                "pass arguments with a lambda or functools.partial"
            )
        check_flag("robust", robust, meaning="; robust=True logs the callback's error instead")
        self._check_callback(callback)
        sync_session = _sync(session)
        if sync_session.get_transaction() is None:
            # Begin (no I/O: the connection comes with the first statement), so a rollback
            # that follows, by any route, is a rollback SQLAlchemy reports and drops this.
            sync_session.begin()
        journal = cast("Journal", self._journal)
        journal.add_callback(callback, robust=robust, session=sync_session)

    def _check_callback(self, callback: object) -> None:
        """Refuse a callback this flavour cannot run (the sync one refuses async callables)."""

    def _not_a_model_object(self, method: str, obj: object) -> InvalidArgumentError:
        fix = (
            f"pass an instance such as {obj.__name__}(...)"
            if isinstance(obj, type)
            else "pass an instance of a class mapped with SQLAlchemy (a model object)"
        )
        return InvalidArgumentError(
            f"{type(self).__name__}.{method}() takes model objects, got {describe(obj)}; {fix}"
        )

    # --- entering and leaving ----------------------------------------------------------------

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

    def _outer_to_join(self) -> UnitOfWorkBase[SessionT, CallbackT] | None:
        """Check this unit of work can be entered; the open one it joins, if any."""
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
        # A factory is sync or async, so what it has open is of this flavour.
        outer = cast("UnitOfWorkBase[SessionT, CallbackT] | None", find_open(self._factory))
        if outer is None or not outer._joinable():  # noqa: SLF001 (a unit of work of this class)
            return None
        outer_level = outer._isolation_level  # noqa: SLF001 (likewise)
        if outer._read_only and not self._read_only:  # noqa: SLF001 (likewise)
            raise TransactionError(
                f"this {name} may write, but it would join the open read-only unit of work of "
                "the same factory, whose transaction is on a replica (or read-only); open it "
                "where no read-only unit of work is open, or give it read_only=True"
            )
        if self._durable:
            raise TransactionError(
                f"this {name} is durable=True, but another unit of work of the same factory is "
                "open here, and joining it would leave the commit to that one; open the durable "
                "unit of work outside any other, or drop durable=True to join the open one"
            )
        level = self._isolation_level
        if level is not None and level != outer_level:
            given = "none" if outer_level is None else repr(outer_level)
            raise TransactionError(
                f"this {name} asks for isolation_level={level!r}, but it would join the open "
                f"unit of work of the same factory, which was given {given}, and one "
                "transaction has one isolation level; give the outermost unit of work the "
                "level, or open this one where no other is open"
            )
        return outer

    def _joinable(self) -> bool:
        # Not while its callbacks run: a unit of work opened in a callback commits on its own.
        return self._state == _OPEN and self._outer is None and not self._running_callbacks

    def _opened(self, session: SessionT) -> None:
        self._session = session
        # Two tasks can share an AsyncSession, and a request's worker threads its sync one;
        # only then are its statements worth counting.
        shared = self._for_worker_threads or isinstance(session, AsyncSession)
        self._journal = attach(_sync(session), count_statements=shared)
        self._registration = register(self._factory, self, worker_threads=self._for_worker_threads)
        self._state = _OPEN

    def _joined(self, outer: UnitOfWorkBase[SessionT, CallbackT]) -> None:
        self._outer = outer
        self._session = outer._session
        self._journal = outer._journal
        self._state = _OPEN

    def _end(self) -> SessionT:
        session = self._open_session("__exit__")
        self._state = _ENDED
        self._session = None
        if self._registration is not None:
            # No longer open: a unit of work opened from now on (in a callback) is outermost.
            self._registration.remove()
            self._registration = None
        return session

    def _finished(self, session: SessionT) -> list[Callback]:
        """Stop the journal; the callbacks due to run (their work is committed)."""
        detach(_sync(session))
        journal = cast("Journal", self._journal)
        # What is left refers to the session's transactions: let them go with the session.
        journal.pending, journal.errors = [], []
        return journal.take_due()

    def _read_only_choices(self) -> tuple[list[tuple[dict[str, Any], Replica]], dict[str, Any]]:
        """Where a read-only unit of work may read, as session arguments.

        The replicas to try, in order, each with its arguments; then the primary's, which
        always works.
        """
        bind = self._factory.kw.get("bind")
        if isinstance(bind, (Connection, AsyncConnection)):
            # Bound to one connection (ormkit.testing.rolled_back): read where the test writes.
            return [], {**self._session_arguments, "info": {READ_ONLY: True}}
        level = self._isolation_level
        replicas = self._replicas
        choices: list[tuple[dict[str, Any], Replica]] = []
        if replicas is not None and not (replicas.kind == "sqlite" and self._after is not None):
            choices = [
                (self._read_only_arguments(replica.engine, level), replica)
                for replica in replicas.candidates()
            ]
        return choices, self._read_only_arguments(bind, level)

    def _replica_verdict(self, replica: Replica, lag: object, caught_up: object) -> str:
        """What the probe of `replica` says: "use" it, try the "next", or wait for it."""
        replicas = cast("ReplicaSet", self._replicas)
        if not replicas.judge_lag(replica, lag):
            return "next"
        return "use" if self._after is None or caught_up else "wait"

    def _token_taken(self, position: object) -> None:
        self._commit_token = format_token(position)

    def _token_failed(self, error: BaseException) -> None:
        # The work is committed; only its position is unknown. A token no replica reaches
        # sends the reads that carry it to the primary, which has the commit.
        self._commit_token = UNREACHABLE_TOKEN
        logger.warning(
            "ormkit: the commit is stored, but its WAL position could not be read (%s: %s); "
            "its commit_token sends reads after it to the primary",
            type(error).__name__,
            error,
        )

    def _wants_commit_token(self) -> bool:
        replicas = self._replicas
        if replicas is None or self._read_only or self._outer is not None:
            return False
        if replicas.kind == "sqlite":
            self._commit_token = SQLITE_TOKEN
            return False
        return True

    @staticmethod
    def _read_only_arguments(engine: Any, level: str | None) -> dict[str, Any]:
        read_only = read_only_bind(engine)
        bind = read_only if level is None else read_only.execution_options(isolation_level=level)
        return {"bind": bind, "info": {READ_ONLY: True}}

    def _check_owns_transaction(self, member: str) -> None:
        """Refuse `commit()`/`rollback()` where they would end more than this block's work."""
        name = type(self).__name__
        if self._outer is not None:
            raise TransactionError(
                f"{name}.{member}() is refused: this unit of work joined an open one of the same "
                f"factory, which owns the transaction; leave the block to release its savepoint, "
                f"raise to roll it back, or open it with durable=True outside any other"
            )
        if cast("Journal", self._journal).blocks:
            raise TransactionError(
                f"{name}.{member}() is refused inside uow.savepoint() or a nested unit of work: "
                f"it would end the whole transaction, and the block could no longer undo its own "
                f"work; leave the block first (raise inside it to roll it back)"
            )

    # --- what may be committed ---------------------------------------------------------------

    def _refusal(self, session: Session, *, at_exit: bool) -> TransactionError | None:
        """The error to raise instead of committing a transaction a caught error broke."""
        journal = cast("Journal", self._journal)
        cause: BaseException | None
        if journal.broken is not None:
            what, cause = journal.broken_reason, journal.broken
        elif not session.is_active:
            what = "a flush failed inside this unit of work and its error was caught"
            cause = flush_error_of(session) or journal.last_error
        else:
            cause = journal.first_error_within(None)
            if cause is None:
                return None
            what = "a statement failed inside this unit of work and its error was caught"
        then = (
            "everything was rolled back"
            if at_exit
            else "roll back (uow.rollback()), or let an error leave the block, which rolls back"
        )
        return _chained(
            TransactionError(
                f"{what}, so the transaction cannot commit; {then}. Let the error propagate, or "
                "put the work that may fail in `uow.savepoint()` and catch the error outside it"
            ),
            cause,
        )

    def _block_opened(self, savepoint: SessionTransaction) -> None:
        cast("Journal", self._journal).blocks.append(savepoint)

    def _block_closed(self, savepoint: SessionTransaction) -> None:
        blocks = cast("Journal", self._journal).blocks
        if savepoint in blocks:
            blocks.remove(savepoint)

    @staticmethod
    def _ended_inside(session: Session, savepoint: SessionTransaction) -> bool:
        """Whether `savepoint` was ended by a commit or rollback of the whole, from inside."""
        # Still open while the innermost savepoint is it or one opened inside it.
        return not within(session.get_nested_transaction(), savepoint)

    def _ended_refusal(self) -> TransactionError:
        block = "nested unit of work" if self._outer is not None else "savepoint"
        journal = cast("Journal", self._journal)
        return _chained(
            TransactionError(
                f"this {block}'s savepoint was ended from inside the block: "
                f"{journal.broken_reason or 'the transaction was ended inside it'}; the unit of "
                "work will not commit"
            ),
            journal.broken,
        )

    def _savepoint_refusal(self, savepoint: SessionTransaction) -> TransactionError | None:
        """The error to raise instead of releasing a savepoint whose block swallowed an error."""
        journal = cast("Journal", self._journal)
        cause = journal.first_error_within(savepoint)
        if cause is None:
            return None
        block = "nested unit of work" if self._outer is not None else "savepoint"
        return _chained(
            TransactionError(
                f"a statement failed inside this {block} and its error was caught, so its work "
                f"is incomplete; it was rolled back to its savepoint. Let the error propagate out "
                f"of the {block}, or catch it outside"
            ),
            cause,
        )

    def _savepoint_failed(self, error: BaseException) -> None:
        """A rollback to a savepoint did not complete: the unit of work must not commit."""
        journal = cast("Journal", self._journal)
        if journal.broken is None:
            journal.broken = error
            journal.broken_reason = "a rollback to a savepoint did not complete"
        logger.warning(
            "rolling back to a savepoint failed; the unit of work will roll back everything",
            exc_info=(type(error), error, error.__traceback__),
        )

    @property
    def _committed(self) -> bool:
        """Whether any commit happened: running the work again could apply it twice."""
        return self._journal is not None and self._journal.commits > 0

    def _retry_delay(self, error: Exception, attempt: int, policy: RetryPolicy) -> float | None:
        """Seconds to wait before the next attempt of `run`, or None: raise `error`."""
        # A joined unit of work is part of the outermost one's transaction: only there can a
        # retry start it again.
        if self._outer is not None or self._committed or attempt >= policy.attempts:
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

    @staticmethod
    def _callback_failed(callback: Callback, error: BaseException, *, raise_it: bool) -> bool:
        """Log a callback's error, unless it is to be raised; whether to raise it."""
        if callback.robust:
            logger.error(
                "an on_commit callback (robust=True) failed; the work was committed",
                exc_info=(type(error), error, error.__traceback__),
            )
            return False
        if raise_it:
            return True
        logger.error(
            "an on_commit callback failed; the work was committed (only the first error of "
            "a commit's callbacks is raised, and none when the unit of work failed)",
            exc_info=(type(error), error, error.__traceback__),
        )
        return False


def _chained(error: TransactionError, cause: BaseException | None) -> TransactionError:
    error.__cause__ = cause
    return error


def _sync(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def check_factory(factory: object, *, want_async: bool) -> None:
    """Refuse what is not a session factory of the wanted flavour."""
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


def check_repository_class(repository_class: object, wanted: type, owner: str) -> None:
    """Refuse what is not a repository class of the wanted flavour."""
    if not (isinstance(repository_class, type) and issubclass(repository_class, wanted)):
        raise InvalidArgumentError(
            f"{owner}.repository() takes a subclass of {wanted.__name__}, got "
            f"{describe(repository_class)}"
        )


def check_work(work: object) -> None:
    """Refuse work that is not callable."""
    if not callable(work):
        raise InvalidArgumentError(
            f"run() takes the work as a callable of the unit of work, got {describe(work)}; "
            "pass arguments with a lambda or functools.partial"
        )


# Factories found fine, with the bind they had then: the check runs once per factory and bind,
# not for every unit of work (a tiny transaction would pay for it each time).
_checked: weakref.WeakKeyDictionary[object, tuple[object, ...]] = weakref.WeakKeyDictionary()


def _refuse_autocommit_factory(factory: Any, owner: str) -> None:
    """Refuse a factory whose sessions would run without a transaction (AUTOCOMMIT)."""
    options: dict[str, Any] = factory.kw
    seen = _checked.get(factory)
    key = (options.get("bind"), options.get("binds"), options.get("execution_options"))
    if seen is not None and all(a is b for a, b in zip(seen, key, strict=True)):
        return
    _check_autocommit(options, owner)
    _checked[factory] = key


def _check_autocommit(options: dict[str, Any], owner: str) -> None:
    execution_options: dict[str, object] = options.get("execution_options") or {}
    levels: list[object] = [execution_options.get("isolation_level")]
    bound: dict[object, object] = options.get("binds") or {}
    binds: list[object] = [options.get("bind"), *bound.values()]
    for bind in binds:
        engine = bind.sync_engine if isinstance(bind, AsyncEngine) else bind
        if isinstance(engine, (Engine, Connection)):
            levels.append(engine.get_execution_options().get("isolation_level"))
            # create_engine(isolation_level=...) is kept on the dialect, applied on connect.
            levels.append(getattr(engine.dialect, "_on_connect_isolation_level", None))
    if any(isinstance(level, str) and level.upper() == "AUTOCOMMIT" for level in levels):
        raise InvalidArgumentError(
            f"{owner} refuses a factory whose engine runs in AUTOCOMMIT: every statement would "
            "commit on its own, and a unit of work is committed whole or not at all. Bind the "
            "factory to an engine without isolation_level='AUTOCOMMIT'"
        )


def _session_arguments(factory: Any, level: str | None) -> dict[str, Any]:
    """Session arguments that give every transaction of the session `level`."""
    if level is None:
        return {}
    # An engine with the isolation level as an execution option: each connection the session
    # takes from it, for every transaction (also after commit()), starts at that level, and
    # SQLAlchemy resets the level when the connection goes back to the pool.
    bind = factory.kw.get("bind")
    binds = factory.kw.get("binds")
    if isinstance(bind, (Connection, AsyncConnection)):
        # Bound to a connection in a transaction (ormkit.testing.rolled_back): the level of
        # that transaction holds, and it cannot change in the middle of it.
        return {}
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


def _token_position(
    factory: Any, replicas: ReplicaSet | None, after: object, *, read_only: bool
) -> str | None:
    """The WAL position `after` names, checked before any SQL (None: no token to wait for)."""
    if after is None:
        return None
    if not read_only:
        raise InvalidArgumentError(
            "after= is for read-only units of work (a read-write one reads from the primary, "
            "which has every commit): UnitOfWork(factory, read_only=True, after=token)"
        )
    if replicas is not None:
        # SQLite has no replay position: after a token, read from the primary.
        return parse_token(after, replicas.kind) or SQLITE_TOKEN
    bind = getattr(factory, "kw", {}).get("bind")
    name = getattr(getattr(bind, "dialect", None), "name", None)
    # Without replicas every read is on the primary: the token is only checked.
    parse_token(after, "postgresql" if name == "postgresql" else "sqlite")
    return None
