"""ormkit's session classes and the two session factories.

Sync factories keep SQLAlchemy's `expire_on_commit=True`: a request-scoped session reads fresh
data after each commit. Async factories default to `expire_on_commit=False`: reading an expired
attribute would need a lazy load, which async code cannot do implicitly (`MissingGreenlet`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from ormkit._engine import async_engine_from, sync_engine_from
from ormkit._flush_order import order_by_foreign_keys
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
    error a flush raised, so a unit of work that finds its transaction broken by a caught flush
    error can say which error that was.
    """

    _ormkit_flush_error: Exception | None = None

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        """Flush pending changes; see `sqlalchemy.orm.Session.flush`."""
        try:
            # `objects` is passed on only when given: SQLAlchemy 2.1 deprecates it.
            if objects is None:
                super().flush()
            else:
                super().flush(objects)
        except Exception as error:
            self._ormkit_flush_error = error
            raise


# Every session of ormkit's factories (and of subclasses, such as the ones sessionmaker makes)
# flushes FK-linked tables parents first: see _flush_order.
event.listen(OrmkitSession, "before_flush", order_by_foreign_keys)


class OrmkitAsyncSession(AsyncSession):
    """The `AsyncSession` class of sessions made by ormkit's async factories."""

    sync_session_class = OrmkitSession


def create_session_factory(
    bind: str | URL | Engine, /, **sessionmaker_options: Any
) -> sessionmaker[Session]:
    """Create a `sessionmaker` for sync sessions, with ormkit's defaults.

    Args:
        bind: a database URL (an engine is made with `ormkit.create_engine`), or an `Engine`,
            used exactly as it is.
        **sessionmaker_options: any `sqlalchemy.orm.sessionmaker` option; they win over
            ormkit's defaults, `expire_on_commit=True` and `autoflush=True`.

    ```python
    SessionLocal = create_session_factory("sqlite:///app.db")
    with SessionLocal() as session:
        ...
    ```
    """
    _refuse_bind_option(sessionmaker_options)
    engine = sync_engine_from(bind)
    options: dict[str, Any] = {
        "class_": OrmkitSession,
        "expire_on_commit": True,
        "autoflush": True,
        **sessionmaker_options,
    }
    return sessionmaker[Session](bind=engine, **options)


def create_async_session_factory(
    bind: str | URL | AsyncEngine, /, **sessionmaker_options: Any
) -> async_sessionmaker[AsyncSession]:
    """Create an `async_sessionmaker`, with ormkit's defaults.

    Args:
        bind: an async database URL (an engine is made with `ormkit.create_async_engine`), or
            an `AsyncEngine`, used exactly as it is.
        **sessionmaker_options: any `sqlalchemy.ext.asyncio.async_sessionmaker` option; they
            win over ormkit's defaults, `expire_on_commit=False` and `autoflush=True`.

    ```python
    SessionLocal = create_async_session_factory("sqlite+aiosqlite:///app.db")
    async with SessionLocal() as session:
        ...
    ```
    """
    _refuse_bind_option(sessionmaker_options)
    engine = async_engine_from(bind)
    options: dict[str, Any] = {"expire_on_commit": False, "autoflush": True}
    if "class_" not in sessionmaker_options:
        options["class_"] = OrmkitAsyncSession
        # A sync session class of this factory's own (as `sessionmaker` makes for sync
        # sessions), so events, and `ormkit.testing.count_queries(factory)`, can target
        # exactly the sessions of this factory.
        options["sync_session_class"] = type("OrmkitSession", (OrmkitSession,), {})
    options.update(sessionmaker_options)
    return async_sessionmaker[AsyncSession](bind=engine, **options)


def flush_error_of(session: Session) -> Exception | None:
    """The last error a flush of `session` raised, if it is an ormkit session."""
    return getattr(session, "_ormkit_flush_error", None)


def _refuse_bind_option(options: dict[str, Any]) -> None:
    if "bind" in options:
        raise InvalidArgumentError(
            "bind is given twice: pass the URL or engine as the first argument only"
        )
