"""Every route the user can take to the database is seen: commits and caught errors alike.

A unit of work learns what happened from SQLAlchemy's events, not from which ormkit method was
called. So a statement that failed and whose error was caught, sent through any execution API
(the ORM, a repository, Core on the session's connection, the driver's SQL), keeps it from
reporting success; a commit made through `uow.session.commit()` stops `run` from running the
work again; `count_queries` on a factory sees a session that began before the block; and an
ormkit session returns exactly what SQLAlchemy returns. Each test checks the database through a
brand-new connection and that no connection is left checked out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import URL, Sequence, exc, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    Repository,
    TransactionError,
    UnitOfWork,
)
from ormkit.testing import assert_queries, count_queries
from tests.fresh import fresh_committed_ids
from tests.models import User

BAD_SQL = "SELECT no_such_column FROM users"  # fails on SQLite and PostgreSQL alike
BAD = text("no_such_column = 1")


class Users(Repository[User, int]):
    pass


class AsyncUsers(AsyncRepository[User, int]):
    pass


def _sync_routes() -> dict[str, Callable[[Session], object]]:
    return {
        "session.execute": lambda s: s.execute(text(BAD_SQL)),
        "session.scalar": lambda s: s.scalar(text(BAD_SQL)),
        "session.scalars": lambda s: s.scalars(text(BAD_SQL)).all(),
        "repository.find": lambda s: Users(s).find(BAD),
        "repository.find_one": lambda s: Users(s).find_one(BAD),
        "repository.count": lambda s: Users(s).count(BAD),
        "repository.exists": lambda s: Users(s).exists(BAD),
        "repository.update_where": lambda s: Users(s).update_where({"name": "x"}, BAD),
        "repository.delete_where": lambda s: Users(s).delete_where(BAD),
        "connection.execute": lambda s: s.connection().execute(text(BAD_SQL)),
        "connection.exec_driver_sql": lambda s: s.connection().exec_driver_sql(BAD_SQL),
    }


def _async_routes() -> dict[str, Callable[[AsyncSession], Awaitable[object]]]:
    async def execute(s: AsyncSession) -> object:
        return await s.execute(text(BAD_SQL))

    async def scalar(s: AsyncSession) -> object:
        return await s.scalar(text(BAD_SQL))

    async def scalars(s: AsyncSession) -> object:
        return (await s.scalars(text(BAD_SQL))).all()

    async def stream(s: AsyncSession) -> object:
        return await (await s.stream(text(BAD_SQL))).all()

    async def core(s: AsyncSession) -> object:
        return await (await s.connection()).execute(text(BAD_SQL))

    async def driver_sql(s: AsyncSession) -> object:
        return await (await s.connection()).exec_driver_sql(BAD_SQL)

    return {
        "session.execute": execute,
        "session.scalar": scalar,
        "session.scalars": scalars,
        "session.stream": stream,
        "repository.find": lambda s: AsyncUsers(s).find(BAD),
        "repository.find_one": lambda s: AsyncUsers(s).find_one(BAD),
        "repository.count": lambda s: AsyncUsers(s).count(BAD),
        "repository.exists": lambda s: AsyncUsers(s).exists(BAD),
        "repository.update_where": lambda s: AsyncUsers(s).update_where({"name": "x"}, BAD),
        "repository.delete_where": lambda s: AsyncUsers(s).delete_where(BAD),
        "connection.execute": core,
        "connection.exec_driver_sql": driver_sql,
    }


def _url(engine: Any) -> URL:
    url: URL = engine.url
    return url


# --- a caught error, through every execution API, is seen --------------------------------------


@pytest.mark.parametrize("route", list(_sync_routes()))
def test_a_swallowed_error_from_any_api_commits_nothing(route: str, sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []
    with pytest.raises(TransactionError, match="a statement failed") as caught:  # noqa: SIM117
        with UnitOfWork(factory) as uow:
            uow.add(User(id=1, name="a"))
            uow.flush()
            try:
                _sync_routes()[route](uow.session)
            except exc.DBAPIError:
                pass
            uow.add(User(id=2, name="b"))
            uow.on_commit(lambda: ran.append("committed"))
    assert isinstance(caught.value.__cause__, exc.DBAPIError)
    assert fresh_committed_ids(_url(sync_engine), "users") == []
    assert ran == []
    assert sync_engine.pool.checkedout() == 0


@pytest.mark.parametrize("route", list(_async_routes()))
async def test_a_swallowed_error_from_any_async_api_commits_nothing(
    route: str, async_engine
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    ran: list[str] = []
    with pytest.raises(TransactionError, match="a statement failed") as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(User(id=1, name="a"))
            await uow.flush()
            try:
                await _async_routes()[route](uow.session)
            except exc.DBAPIError:
                pass
            uow.add(User(id=2, name="b"))
            uow.on_commit(lambda: ran.append("committed"))
    assert isinstance(caught.value.__cause__, exc.DBAPIError)
    assert fresh_committed_ids(_url(async_engine), "users") == []
    assert ran == []
    assert async_engine.pool.checkedout() == 0


def test_a_plain_sessionmaker_is_watched_as_well(sync_engine) -> None:
    # Not an ormkit factory: the journal listens on its session class all the same.
    factory = sessionmaker(sync_engine)
    with pytest.raises(TransactionError), UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.flush()
        try:
            uow.session.connection().exec_driver_sql(BAD_SQL)
        except exc.DBAPIError:
            pass
    assert fresh_committed_ids(_url(sync_engine), "users") == []


async def test_a_plain_async_sessionmaker_is_watched_as_well(async_engine) -> None:
    factory = async_sessionmaker(async_engine)
    with pytest.raises(TransactionError):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(User(id=1, name="a"))
            await uow.flush()
            try:
                await (await uow.session.connection()).exec_driver_sql(BAD_SQL)
            except exc.DBAPIError:
                pass
    assert fresh_committed_ids(_url(async_engine), "users") == []


def test_session_commit_over_a_swallowed_error_is_refused_too(sync_engine) -> None:
    # On PostgreSQL that COMMIT would silently roll back, and its callbacks would run for
    # nothing; on SQLite it would commit the work that surrounds the failed statement.
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []
    with pytest.raises(TransactionError), UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.flush()
        uow.on_commit(lambda: ran.append("committed"))
        try:
            uow.session.execute(text(BAD_SQL))
        except exc.DBAPIError:
            pass
        uow.session.commit()
    assert fresh_committed_ids(_url(sync_engine), "users") == []
    assert ran == []
    assert sync_engine.pool.checkedout() == 0


def test_rolling_back_the_session_directly_forgets_the_error(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []
    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.on_commit(lambda: ran.append("dropped"))
        try:
            uow.session.execute(text(BAD_SQL))
        except exc.DBAPIError:
            pass
        uow.session.rollback()  # as uow.rollback(): the work, its callbacks and the error go
        uow.add(User(id=2, name="b"))
    assert fresh_committed_ids(_url(sync_engine), "users") == [2]
    assert ran == []


# --- a commit through any route is seen -------------------------------------------------------


def _conflict_sql(backend: str) -> str | None:
    # A real serialization failure from the server (SQLSTATE 40001), which run() retries.
    if backend == "postgresql":
        return "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"
    return None


def _hold_the_sqlite_write_lock(url: URL) -> sqlite3.Connection:
    blocker = sqlite3.connect(str(url.database), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def test_run_never_repeats_work_committed_through_the_session(sync_url) -> None:
    # sqlite_busy_timeout=0: a locked database fails at once, as a busy one would at the end
    # of its timeout.
    engine = ormkit.create_engine(sync_url, sqlite_busy_timeout=0)
    User.metadata.create_all(engine)
    factory = ormkit.create_session_factory(engine)
    calls: list[int] = []
    blocker: sqlite3.Connection | None = None

    def work(uow: UnitOfWork) -> None:
        nonlocal blocker
        calls.append(len(calls) + 1)
        uow.add(User(id=len(calls), name="once"))
        uow.session.commit()  # durable from here on
        conflict = _conflict_sql(engine.dialect.name)
        if conflict is not None:
            uow.session.execute(text(conflict))
        else:
            blocker = _hold_the_sqlite_write_lock(sync_url)
            uow.add(User(id=100, name="locked out"))
            uow.flush()

    try:
        with pytest.raises(exc.DBAPIError):
            UnitOfWork.run(factory, work, attempts=3, backoff=0)
        assert calls == [1]  # not run again: that would commit user 2 as well
        assert fresh_committed_ids(sync_url, "users") == [1]
        assert engine.pool.checkedout() == 0
    finally:
        if blocker is not None:
            blocker.close()
        engine.dispose()


async def test_async_run_never_repeats_work_committed_through_the_session(async_url) -> None:
    engine = ormkit.create_async_engine(async_url, sqlite_busy_timeout=0)
    async with engine.begin() as connection:
        await connection.run_sync(User.metadata.create_all)
    factory = ormkit.create_async_session_factory(engine)
    calls: list[int] = []
    blocker: sqlite3.Connection | None = None

    async def work(uow: AsyncUnitOfWork) -> None:
        nonlocal blocker
        calls.append(len(calls) + 1)
        uow.add(User(id=len(calls), name="once"))
        await uow.session.commit()
        conflict = _conflict_sql(engine.dialect.name)
        if conflict is not None:
            await uow.session.execute(text(conflict))
        else:
            blocker = _hold_the_sqlite_write_lock(async_url)
            uow.add(User(id=100, name="locked out"))
            await uow.flush()

    try:
        with pytest.raises(exc.DBAPIError):
            await AsyncUnitOfWork.run(factory, work, attempts=3, backoff=0)
        assert calls == [1]
        assert fresh_committed_ids(async_url, "users") == [1]
        assert engine.pool.checkedout() == 0
    finally:
        if blocker is not None:
            blocker.close()
        await engine.dispose()


def test_callbacks_of_work_committed_through_the_session_run_once(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []
    with pytest.raises(RuntimeError, match="later"), UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.on_commit(lambda: ran.append("first"))
        uow.session.commit()
        uow.add(User(id=2, name="b"))
        uow.on_commit(lambda: ran.append("second"))
        raise RuntimeError("later")
    # The first commit made user 1 durable, so its callback runs; the second never happened.
    assert fresh_committed_ids(_url(sync_engine), "users") == [1]
    assert ran == ["first"]


# --- count_queries on a factory sees sessions that began before the block ---------------------


def test_assert_queries_on_a_factory_sees_a_session_begun_before(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        session.execute(select(User))  # a fixture touched it: its transaction has begun
        with pytest.raises(AssertionError, match="2 were sent"), assert_queries(factory, 0):
            session.execute(select(User))
            session.scalars(select(User.id)).all()
        with count_queries(factory) as log:
            session.execute(select(User))
        assert log.count == 1


async def test_assert_queries_on_an_async_factory_sees_a_session_begun_before(
    async_engine,
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        await session.execute(select(User))
        with pytest.raises(AssertionError, match="2 were sent"), assert_queries(factory, 0):
            await session.execute(select(User))
            (await session.scalars(select(User.id))).all()
        with count_queries(factory) as log:
            await session.execute(select(User))
        assert log.count == 1


def test_count_queries_on_a_factory_ignores_other_factories_sessions(sync_engine) -> None:
    counted = ormkit.create_session_factory(sync_engine)
    other = ormkit.create_session_factory(sync_engine)
    with other() as session:
        session.execute(select(User))
        with assert_queries(counted, 0):
            session.execute(select(User))


# --- an ormkit session returns what SQLAlchemy returns ----------------------------------------


def test_a_sequence_executes_once_and_returns_its_value(postgres_sync_engine) -> None:
    sequence = Sequence("ormkit_test_sequence", start=0, minvalue=0)
    with postgres_sync_engine.begin() as connection:
        sequence.create(connection)
    factory = ormkit.create_session_factory(postgres_sync_engine)
    with UnitOfWork(factory) as uow:
        assert uow.session.scalar(sequence) == 0
        assert uow.session.scalar(sequence) == 1  # advanced once per call, not twice
    with factory() as session:
        assert session.scalar(sequence) == 2


async def test_a_sequence_executes_once_and_returns_its_value_async(
    postgres_async_engine,
) -> None:
    sequence = Sequence("ormkit_test_sequence", start=0, minvalue=0)
    async with postgres_async_engine.begin() as connection:
        await connection.run_sync(sequence.create)
    factory = ormkit.create_async_session_factory(postgres_async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        assert await uow.session.scalar(sequence) == 0
        assert await uow.session.scalar(sequence) == 1
    async with factory() as session:
        assert await session.scalar(sequence) == 2
