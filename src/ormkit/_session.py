"""ormkit's session classes and the two session factories.

Sync factories keep SQLAlchemy's `expire_on_commit=True`: a request-scoped session reads fresh
data after each commit. Async factories default to `expire_on_commit=False`: reading an expired
attribute would need a lazy load, which async code cannot do implicitly (`MissingGreenlet`).
"""

from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from ormkit._checks import check_number, describe
from ormkit._engine import async_engine_from, sync_engine_from
from ormkit._flush_order import order_by_foreign_keys
from ormkit._journal import listen_on, note_refusal
from ormkit._replicas import READ_ONLY, check_writable, listen_query_only
from ormkit._replicas import register as register_replicas
from ormkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "OrmkitAsyncSession",
    "OrmkitSession",
    "create_async_session_factory",
    "create_session_factory",
]


class OrmkitSession(Session):
    """The `Session` class of sessions made by ormkit's factories.

    Its flushes INSERT rows of tables linked only by a `ForeignKey` parents first, and DELETE
    them children first, whatever order they were added or deleted in. It remembers the last
    error a flush raised, so a unit of work that refuses to commit after a failed flush can
    name the cause.
    """

    _ormkit_flush_error: Exception | None = None

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        """Flush pending changes; see `sqlalchemy.orm.Session.flush`."""
        if self.info.get(READ_ONLY) and _has_changes(self):
            check_writable(self, "a flush with pending changes is refused")
        try:
            # `objects` is passed on only when given: SQLAlchemy 2.1 deprecates it.
            if objects is None:
                super().flush()
            else:
                super().flush(objects)
        except Exception as error:
            self._ormkit_flush_error = error
            if self.is_active:
                # Refused before anything was flushed (SQLAlchemy's "Session is already
                # flushing": another task is flushing this session), so nothing was rolled
                # back either: a unit of work must not commit as if this flush had happened.
                note_refusal(self, error)
            raise


def _has_changes(session: Session) -> bool:
    return bool(session.new or session.deleted) or any(
        session.is_modified(obj) for obj in session.dirty
    )


# Every session of ormkit's factories (and of subclasses, such as the ones sessionmaker makes)
# flushes FK-linked tables parents first: see _flush_order.
event.listen(OrmkitSession, "before_flush", order_by_foreign_keys)


# The unit of work's journal hears these sessions' events (commits, rollbacks, failed
# statements); listening once on the class spares each unit of work its own registration.
listen_on(OrmkitSession)


class OrmkitAsyncSession(AsyncSession):
    """The `AsyncSession` class of sessions made by ormkit's async factories."""

    sync_session_class = OrmkitSession


def create_session_factory(
    bind: str | URL | Engine,
    /,
    *,
    replicas: Sequence[str | URL | Engine] = (),
    replica_wait: float = 0.5,
    max_replica_lag: float = 5.0,
    replica_retry_after: float = 5.0,
    **sessionmaker_options: Any,
) -> sessionmaker[Session]:
    """Create a `sessionmaker` for sync sessions, with ormkit's defaults.

    Args:
        bind: a database URL (an engine is made with `ormkit.create_engine`), or an `Engine`,
            used exactly as it is. With `replicas`, the primary.
        replicas: read replicas of `bind` (URLs or engines, of the same kind of database),
            which `UnitOfWork(factory, read_only=True)` reads from; see docs/replicas.md.
        replica_wait: seconds a read-only unit of work given `after=token` waits for a replica
            to replay that commit before it reads from the primary instead.
        max_replica_lag: seconds behind the primary past which a replica is not read from.
        replica_retry_after: seconds a replica that failed or lagged is skipped for.
        **sessionmaker_options: any `sqlalchemy.orm.sessionmaker` option; they win over
            ormkit's defaults, `expire_on_commit=True` and `autoflush=True`.

    ```python
    SessionLocal = create_session_factory("sqlite:///app.db")
    with SessionLocal() as session:
        ...
    ```
    """
    _refuse_bind_option(sessionmaker_options)
    _check_options(
        "create_session_factory",
        sessionmaker_options,
        sessionmaker,
        sessionmaker_options.get("class_", OrmkitSession),
    )
    engine = sync_engine_from(bind)
    replica_engines = [sync_engine_from(r) for r in _replica_binds(replicas)]
    options: dict[str, Any] = {
        "class_": OrmkitSession,
        "expire_on_commit": True,
        "autoflush": True,
        **sessionmaker_options,
    }
    factory = sessionmaker[Session](bind=engine, **options)
    _with_replicas(
        factory,
        engine,
        replica_engines,
        replica_wait=replica_wait,
        max_replica_lag=max_replica_lag,
        replica_retry_after=replica_retry_after,
    )
    return factory


def create_async_session_factory(
    bind: str | URL | AsyncEngine,
    /,
    *,
    replicas: Sequence[str | URL | AsyncEngine] = (),
    replica_wait: float = 0.5,
    max_replica_lag: float = 5.0,
    replica_retry_after: float = 5.0,
    **sessionmaker_options: Any,
) -> async_sessionmaker[AsyncSession]:
    """Create an `async_sessionmaker`, with ormkit's defaults.

    Args:
        bind: an async database URL (an engine is made with `ormkit.create_async_engine`), or
            an `AsyncEngine`, used exactly as it is. With `replicas`, the primary.
        replicas: read replicas of `bind` (async URLs or engines); see
            `create_session_factory` and docs/replicas.md.
        replica_wait: as for `create_session_factory`.
        max_replica_lag: as for `create_session_factory`.
        replica_retry_after: as for `create_session_factory`.
        **sessionmaker_options: any `sqlalchemy.ext.asyncio.async_sessionmaker` option; they
            win over ormkit's defaults, `expire_on_commit=False` and `autoflush=True`.

    ```python
    SessionLocal = create_async_session_factory("sqlite+aiosqlite:///app.db")
    async with SessionLocal() as session:
        ...
    ```
    """
    _refuse_bind_option(sessionmaker_options)
    async_class = sessionmaker_options.get("class_", OrmkitAsyncSession)
    _check_options(
        "create_async_session_factory",
        sessionmaker_options,
        async_sessionmaker,
        async_class,
        # AsyncSession passes the options it does not take on to its sync session class.
        sessionmaker_options.get("sync_session_class")
        or getattr(async_class, "sync_session_class", None),
    )
    engine = async_engine_from(bind)
    options: dict[str, Any] = {"expire_on_commit": False, "autoflush": True}
    if "class_" not in sessionmaker_options:
        options["class_"] = OrmkitAsyncSession
        # A sync session class of this factory's own (as `sessionmaker` makes for sync
        # sessions), so events, and `ormkit.testing.count_queries(factory)`, can target
        # exactly the sessions of this factory.
        options["sync_session_class"] = type("OrmkitSession", (OrmkitSession,), {})
    options.update(sessionmaker_options)
    replica_engines = [async_engine_from(r) for r in _replica_binds(replicas)]
    factory = async_sessionmaker[AsyncSession](bind=engine, **options)
    _with_replicas(
        factory,
        engine,
        replica_engines,
        replica_wait=replica_wait,
        max_replica_lag=max_replica_lag,
        replica_retry_after=replica_retry_after,
    )
    return factory


def _replica_binds(replicas: object) -> list[object]:
    if isinstance(replicas, (str, bytes)) or not isinstance(replicas, (list, tuple)):
        raise InvalidArgumentError(
            f"replicas takes a list of database URLs or engines, got {describe(replicas)}; "
            "pass one replica as a list of one: replicas=[url]"
        )
    return list(cast("list[object]", replicas))


def _with_replicas(
    factory: object,
    primary: Any,
    replicas: list[Any],
    *,
    replica_wait: object,
    max_replica_lag: object,
    replica_retry_after: object,
) -> None:
    if not replicas:
        # The settings are still checked: a typo must not wait for the first replica.
        for name, value in (
            ("replica_wait", replica_wait),
            ("max_replica_lag", max_replica_lag),
            ("replica_retry_after", replica_retry_after),
        ):
            check_number(name, value, minimum=0, unit=" of seconds")
        return
    register_replicas(
        factory,
        primary,
        replicas,
        replica_wait=replica_wait,
        max_replica_lag=max_replica_lag,
        replica_retry_after=replica_retry_after,
    )
    if primary.dialect.name == "sqlite":
        for replica in replicas:
            listen_query_only(replica)


def flush_error_of(session: Session) -> Exception | None:
    """The last error a flush of `session` raised, if it is an ormkit session."""
    return getattr(session, "_ormkit_flush_error", None)


def _refuse_bind_option(options: dict[str, Any]) -> None:
    if "bind" in options:
        raise InvalidArgumentError(
            "bind is given twice: pass the URL or engine as the first argument only"
        )


def _check_options(function: str, given: dict[str, Any], *takers: Any) -> None:
    """Refuse an option that none of `takers` (the factory, the session classes) accepts.

    Each taker accepts its keyword parameters; a `**kw` of a session factory or an
    `AsyncSession` goes on to the next taker (the session class, its sync session class). Any
    other `**kw`, or a taker whose signature cannot be read, may take anything: then nothing
    is refused, and SQLAlchemy has the last word when a session is made.
    """
    if not given:
        return
    accepted: set[str] = set()
    for taker in (taker for taker in takers if taker is not None):
        try:
            parameters = inspect.signature(taker).parameters.values()
        except (TypeError, ValueError):
            return
        named = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        accepted.update(named)
        if all(p.kind is not p.VAR_KEYWORD for p in parameters):
            break  # takes only its named parameters
        if not _forwards_options(taker):
            return
    else:
        return  # the last taker's **kw goes somewhere not known here
    unknown = sorted(name for name in given if name not in accepted)
    if not unknown:
        return
    accepted.discard("bind")  # given as the first argument
    close = difflib.get_close_matches(unknown[0], accepted, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InvalidArgumentError(
        f"{function}() got an unknown option {unknown[0]!r}; {hint}it takes the options of "
        f"the session factory and the session class: {', '.join(sorted(accepted))}"
    )


def _forwards_options(taker: object) -> bool:
    """Whether `taker` passes the keywords it does not take itself on to the next one."""
    return (
        taker is sessionmaker
        or taker is async_sessionmaker
        or (isinstance(taker, type) and issubclass(taker, AsyncSession))
    )
