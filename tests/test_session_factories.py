"""Session factories: ormkit's expire_on_commit defaults, overrides, binds, session classes."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import URL, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import ormkit
from ormkit._session import OrmkitAsyncSession, OrmkitSession
from ormkit.testing import assert_queries
from tests.models import Base, User

# --- sync: expire_on_commit=True -------------------------------------------------------------


def test_sync_factory_expires_on_commit(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        user = User(id=1, name="roach")
        session.add(user)
        session.commit()
        assert "name" in inspect(user).expired_attributes
        # Reading after commit refreshes the row: one SELECT, fresh data.
        with assert_queries(session, 1) as log:
            assert user.name == "roach"
        assert log.statements[0].lstrip().upper().startswith("SELECT")


def test_sync_factory_override_keeps_objects_loaded(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine, expire_on_commit=False)
    with factory() as session:
        user = User(id=1, name="roach")
        session.add(user)
        session.commit()
        with assert_queries(session, 0):
            assert user.name == "roach"


def test_sync_factory_options_are_passed_through(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine, autoflush=False, info={"app": "x"})
    with factory() as session:
        assert session.autoflush is False
        assert session.info == {"app": "x"}
        session.add(User(id=1, name="roach"))
        # Without autoflush the pending row is not sent before the query.
        assert session.scalars(select(User)).all() == []


# --- async: expire_on_commit=False -----------------------------------------------------------


async def test_async_factory_keeps_objects_readable_after_commit(
    async_engine: AsyncEngine,
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        user = User(id=1, name="roach")
        session.add(user)
        await session.commit()
        assert inspect(user).expired_attributes == set()
        # No lazy load: no SQL and no MissingGreenlet.
        with assert_queries(session, 0):
            assert user.name == "roach"


async def test_async_factory_override_expires(async_engine: AsyncEngine) -> None:
    factory = ormkit.create_async_session_factory(async_engine, expire_on_commit=True)
    async with factory() as session:
        user = User(id=1, name="roach")
        session.add(user)
        await session.commit()
        assert "name" in inspect(user).expired_attributes
        with assert_queries(session, 1):
            await session.refresh(user)
        assert user.name == "roach"


async def test_async_factory_options_are_passed_through(async_engine: AsyncEngine) -> None:
    factory = ormkit.create_async_session_factory(async_engine, autoflush=False, info={"a": 1})
    async with factory() as session:
        assert session.sync_session.autoflush is False
        assert session.info == {"a": 1}
        session.add(User(id=1, name="roach"))
        assert (await session.scalars(select(User))).all() == []


# --- binds and session classes ---------------------------------------------------------------


def test_sync_factory_from_url_string_and_url(sync_url: URL) -> None:
    for bind in (sync_url.render_as_string(hide_password=False), sync_url):
        factory = ormkit.create_session_factory(bind)
        engine = factory.kw["bind"]
        try:
            assert isinstance(engine, sqlalchemy.Engine)
            assert engine.url == sync_url
            Base.metadata.create_all(engine)
            with factory() as session:
                assert isinstance(session, OrmkitSession)
                session.add(User(id=1, name="roach"))
                session.commit()
            with factory() as session:
                assert session.get(User, 1) is not None
                session.delete(session.get(User, 1))
                session.commit()
            assert engine.pool.checkedout() == 0
        finally:
            engine.dispose()


async def test_async_factory_from_url_string_and_url(async_url: URL) -> None:
    for bind in (async_url.render_as_string(hide_password=False), async_url):
        factory = ormkit.create_async_session_factory(bind)
        engine = factory.kw["bind"]
        try:
            assert isinstance(engine, AsyncEngine)
            assert engine.url == async_url
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
            async with factory() as session:
                assert isinstance(session, OrmkitAsyncSession)
                assert isinstance(session.sync_session, OrmkitSession)
                session.add(User(id=1, name="roach"))
                await session.commit()
            async with factory() as session:
                user = await session.get(User, 1)
                assert user is not None
                await session.delete(user)
                await session.commit()
            assert engine.pool.checkedout() == 0
        finally:
            await engine.dispose()


def _listener_counts(engine: sqlalchemy.Engine) -> tuple[int, ...]:
    return (
        len(engine.pool.dispatch.connect),
        len(engine.dispatch.begin),
        len(engine.dispatch.before_cursor_execute),
    )


def test_passed_in_engine_is_used_as_it_is(sync_url: URL) -> None:
    # A plain SQLAlchemy engine: ormkit's factory must neither replace nor alter it.
    engine = sqlalchemy.create_engine(sync_url, pool_pre_ping=False)
    try:
        before = _listener_counts(engine)
        factory = ormkit.create_session_factory(engine)
        assert factory.kw["bind"] is engine
        Base.metadata.create_all(engine)
        with factory() as session:
            session.add(User(id=1, name="roach"))
            session.commit()
        assert _listener_counts(engine) == before
        assert engine.pool._pre_ping is False
    finally:
        engine.dispose()


async def test_passed_in_async_engine_is_used_as_it_is(async_url: URL) -> None:
    engine = sqlalchemy.ext.asyncio.create_async_engine(async_url, pool_pre_ping=False)
    try:
        before = _listener_counts(engine.sync_engine)
        factory = ormkit.create_async_session_factory(engine)
        assert factory.kw["bind"] is engine
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with factory() as session:
            session.add(User(id=1, name="roach"))
            await session.commit()
        assert _listener_counts(engine.sync_engine) == before
        assert engine.sync_engine.pool._pre_ping is False
    finally:
        await engine.dispose()


def test_sessions_close_without_leaking_connections(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    for n in range(5):
        with factory() as session:
            session.add(User(id=n, name="x"))
            session.flush()
            assert sync_engine.pool.checkedout() == 1
            if n % 2:
                session.rollback()
            else:
                session.commit()
    assert sync_engine.pool.checkedout() == 0


async def test_async_sessions_close_without_leaking_connections(
    async_engine: AsyncEngine,
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    for n in range(5):
        async with factory() as session:
            session.add(User(id=n, name="x"))
            await session.flush()
            assert async_engine.pool.checkedout() == 1
            if n % 2:
                await session.rollback()
            else:
                await session.commit()
    assert async_engine.pool.checkedout() == 0


def test_each_async_factory_has_its_own_sync_session_class() -> None:
    first = ormkit.create_async_session_factory("sqlite+aiosqlite://")
    second = ormkit.create_async_session_factory("sqlite+aiosqlite://")
    first_class = first.kw["sync_session_class"]
    assert issubclass(first_class, OrmkitSession)
    assert first_class is not second.kw["sync_session_class"]


def test_custom_session_classes_are_respected() -> None:
    class MySession(Session):
        pass

    class MyAsyncSession(AsyncSession):
        pass

    factory = ormkit.create_session_factory("sqlite://", class_=MySession)
    with factory() as session:
        assert isinstance(session, MySession)
    async_factory = ormkit.create_async_session_factory(
        "sqlite+aiosqlite://", class_=MyAsyncSession
    )
    assert async_factory.class_ is MyAsyncSession
    # ormkit adds no sync session class of its own to a custom async session class.
    assert "sync_session_class" not in async_factory.kw


# --- bad binds -------------------------------------------------------------------------------


def test_sync_factory_refuses_an_async_engine() -> None:
    engine = ormkit.create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ormkit.InvalidArgumentError, match="create_async_session_factory"):
        ormkit.create_session_factory(engine)  # type: ignore[arg-type]


def test_async_factory_refuses_a_sync_engine() -> None:
    engine = ormkit.create_engine("sqlite://")
    with pytest.raises(ormkit.InvalidArgumentError, match="create_session_factory"):
        ormkit.create_async_session_factory(engine)  # type: ignore[arg-type]


@pytest.mark.parametrize("bind", [None, 42, object()])
def test_factories_refuse_what_is_not_a_bind(bind: object) -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match="bind must be a database URL"):
        ormkit.create_session_factory(bind)  # type: ignore[arg-type]
    with pytest.raises(ormkit.InvalidArgumentError, match="bind must be a database URL"):
        ormkit.create_async_session_factory(bind)  # type: ignore[arg-type]


def test_factories_refuse_bind_given_twice() -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match="bind is given twice"):
        ormkit.create_session_factory("sqlite://", bind=ormkit.create_engine("sqlite://"))


def test_async_url_for_sync_factory_says_what_to_use() -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match="is an async driver"):
        ormkit.create_session_factory("sqlite+aiosqlite://")
    with pytest.raises(ormkit.InvalidArgumentError, match="is not an async driver"):
        ormkit.create_async_session_factory("sqlite://")


def test_factory_types_are_sqlalchemys() -> None:
    factory = ormkit.create_session_factory("sqlite://")
    async_factory = ormkit.create_async_session_factory("sqlite+aiosqlite://")
    assert isinstance(factory, sessionmaker)
    assert isinstance(async_factory, async_sessionmaker)
    with factory() as session:
        assert session.autoflush is True
