"""rolled_back(factory): the application's real units of work inside, nothing left behind.

Inside the block, every session the factory makes joins one transaction on one connection:
commits release savepoints, rollbacks roll back to them, callbacks run after each commit, and
units of work keep their own rules. When the block ends, also by an exception, a brand-new
connection sees the database exactly as before, and the factory is configured as before.
Every backend: SQLite files and memory (ormkit's engines), PostgreSQL with all three drivers.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import exc, func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import ormkit
from ormkit import (
    AsyncUnitOfWork,
    ConfigurationError,
    InvalidArgumentError,
    TransactionError,
    UnitOfWork,
)
from ormkit.testing import assert_max_queries, assert_queries, rolled_back
from tests.fresh import fresh_committed_ids
from tests.helpers import ConflictError
from tests.models import Base, User


@pytest.fixture
def factory(sync_engine):
    factory = ormkit.create_session_factory(sync_engine)
    with factory.begin() as session:
        session.add(User(id=1, name="there before"))
    return factory


@pytest.fixture
async def async_factory(async_engine):
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory.begin() as session:
        session.add(User(id=1, name="there before"))
    return factory


def _count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(User)) or 0)


def test_units_of_work_commit_inside_and_nothing_is_left(factory, sync_engine) -> None:
    configured = dict(factory.kw)
    ran: list[list[int]] = []
    with rolled_back(factory) as isolated:
        with UnitOfWork(factory) as uow:
            uow.add(User(id=2, name="inside"))
            # As in production: a callback runs after the commit, and sees the rows (here,
            # through the shared connection: only the test's transaction holds them).
            uow.on_commit(lambda: ran.append(sorted(isolated.connection.scalars(select(User.id)))))
        with factory() as session:
            assert _count(session) == 2
        with UnitOfWork(factory) as uow:
            uow.add(User(id=3, name="second commit"))
            uow.commit()
            uow.add(User(id=4, name="after the commit"))
    assert ran == [[1, 2]]
    assert fresh_committed_ids(sync_engine.url, "users") == [1]
    assert factory.kw == configured
    assert sync_engine.pool.checkedout() == 0


async def test_async_units_of_work_commit_inside_and_nothing_is_left(
    async_factory, async_engine
) -> None:
    configured = dict(async_factory.kw)
    ran: list[str] = []
    async with rolled_back(async_factory):
        async with AsyncUnitOfWork(async_factory) as uow:
            uow.add(User(id=2, name="inside"))
            uow.on_commit(lambda: ran.append("committed"))
        async with async_factory() as session:
            assert await session.scalar(select(func.count()).select_from(User)) == 2
    assert ran == ["committed"]
    assert fresh_committed_ids(async_engine.url, "users") == [1]
    assert async_factory.kw == configured
    assert async_engine.pool.checkedout() == 0


def test_a_block_that_raises_leaves_nothing_either(factory, sync_engine) -> None:
    configured = dict(factory.kw)
    with pytest.raises(RuntimeError, match="test failed"), rolled_back(factory):
        with UnitOfWork(factory) as uow:
            uow.add(User(id=2, name="inside"))
        raise RuntimeError("test failed")
    assert fresh_committed_ids(sync_engine.url, "users") == [1]
    assert factory.kw == configured
    assert sync_engine.pool.checkedout() == 0


def test_units_of_work_keep_their_rules_inside(factory, sync_engine) -> None:
    with rolled_back(factory):
        # A failing block leaves nothing behind, even inside.
        with pytest.raises(RuntimeError, match="fails"), UnitOfWork(factory) as uow:
            uow.add(User(id=2, name="rolled back"))
            uow.flush()
            raise RuntimeError("fails")
        # A swallowed error still refuses to commit.
        with pytest.raises(TransactionError), UnitOfWork(factory) as uow:
            uow.add(User(id=3, name="refused"))
            uow.flush()
            try:
                uow.session.execute(text("SELECT no_such_column FROM users"))
            except exc.DBAPIError:
                pass
        # Savepoints and nested units of work.
        with UnitOfWork(factory) as outer:
            outer.add(User(id=4, name="outer"))
            with pytest.raises(RuntimeError, match="inner"), UnitOfWork(factory) as inner:
                inner.add(User(id=5, name="inner"))
                inner.flush()
                raise RuntimeError("inner")
            with pytest.raises(exc.IntegrityError), outer.savepoint():
                outer.add(User(id=4, name="duplicate"))
                outer.flush()
        with factory() as session:
            assert sorted(session.scalars(select(User.id))) == [1, 4]
    assert fresh_committed_ids(sync_engine.url, "users") == [1]


def test_run_retries_inside(factory, sync_engine) -> None:
    attempts: list[int] = []

    def work(uow: UnitOfWork) -> int:
        attempts.append(1)
        uow.add(User(id=10 + len(attempts), name="attempt"))
        uow.flush()
        if len(attempts) == 1:
            raise ConflictError
        return len(attempts)

    with rolled_back(factory):
        assert UnitOfWork.run(factory, work, attempts=3, backoff=0) == 2
        with factory() as session:
            assert sorted(session.scalars(select(User.id))) == [1, 12]  # the first was undone
    assert fresh_committed_ids(sync_engine.url, "users") == [1]


async def test_async_run_retries_and_nests_inside(async_factory, async_engine) -> None:
    attempts: list[int] = []

    async def work(uow: AsyncUnitOfWork) -> None:
        attempts.append(1)
        uow.add(User(id=10 + len(attempts), name="attempt"))
        await uow.flush()
        if len(attempts) == 1:
            raise ConflictError

    async with rolled_back(async_factory):
        await AsyncUnitOfWork.run(async_factory, work, backoff=0)
        async with AsyncUnitOfWork(async_factory) as outer:
            with pytest.raises(RuntimeError, match="inner"):
                async with AsyncUnitOfWork(async_factory) as inner:
                    inner.add(User(id=20, name="inner"))
                    await inner.flush()
                    raise RuntimeError("inner")
            async with outer.savepoint():
                outer.add(User(id=21, name="kept"))
        async with async_factory() as session:
            assert sorted(await session.scalars(select(User.id))) == [1, 12, 21]
    assert fresh_committed_ids(async_engine.url, "users") == [1]
    assert async_engine.pool.checkedout() == 0


def test_an_isolation_level_asked_for_inside_is_not_applied(factory, sync_engine) -> None:
    with rolled_back(factory), UnitOfWork(factory, isolation_level="SERIALIZABLE") as uow:
        uow.add(User(id=2, name="the outer transaction's level holds"))
    assert fresh_committed_ids(sync_engine.url, "users") == [1]


def test_count_queries_sees_the_factorys_sessions_inside(factory) -> None:
    with rolled_back(factory):
        with factory() as session, assert_queries(factory, 1):
            session.execute(select(User))
        with factory() as session, assert_max_queries(factory, 1):
            session.get(User, 1)


def test_a_memory_database_is_rolled_back_too() -> None:
    engine = ormkit.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    factory = ormkit.create_session_factory(engine)
    with rolled_back(factory), UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="gone afterwards"))
    with factory() as session:
        assert _count(session) == 0
    engine.dispose()


def test_plain_sqlalchemy_factories_work_too(sync_engine) -> None:
    factory = sessionmaker(sync_engine)
    with rolled_back(factory):
        with factory() as session:
            session.add(User(id=2, name="plain"))
            session.commit()
        with factory() as session:
            assert _count(session) == 1
    assert fresh_committed_ids(sync_engine.url, "users") == []


# --- bad input and misuse ---------------------------------------------------------------------


def test_what_is_not_a_factory_is_refused(sync_engine) -> None:
    for wrong in (sync_engine, Session, None, "sqlite://"):
        with pytest.raises(InvalidArgumentError, match="takes the application's session factory"):
            rolled_back(wrong)  # type: ignore[call-overload]


def test_a_factory_without_an_engine_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="this one has no bind"):
        rolled_back(sessionmaker())
    with pytest.raises(ConfigurationError, match="this one has no bind"):
        rolled_back(async_sessionmaker())


def test_entering_twice_at_once_is_refused(factory, sync_engine) -> None:
    with (
        rolled_back(factory),
        pytest.raises(ConfigurationError, match="inside another rolled_back"),
    ):
        rolled_back(factory)
    isolated = rolled_back(factory)
    with isolated:
        with pytest.raises(TransactionError, match="inside a rolled_back block already"):  # noqa: SIM117
            with isolated:
                pass
        with factory() as session:
            assert _count(session) == 1  # the first block still works
    assert sync_engine.pool.checkedout() == 0


def test_the_connection_is_only_there_inside(factory) -> None:
    isolated = rolled_back(factory)
    with pytest.raises(TransactionError, match="outside its block"):
        _ = isolated.connection


def _slow_statement(dialect: str) -> str:
    """A statement that runs for a while, long enough for another to try to overlap it."""
    if dialect == "sqlite":  # the sqlite3 module lets other threads run while it computes
        return (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
            "SELECT count(*) FROM c"
        )
    return "SELECT pg_sleep(0.3)"


def test_two_threads_at_once_get_a_clear_error(factory, sync_engine) -> None:
    errors: list[BaseException] = []
    started = threading.Event()

    def slow() -> None:
        try:
            with factory() as session:
                started.set()
                session.execute(text(_slow_statement(sync_engine.dialect.name)))
        except TransactionError as error:  # the main thread's statement got there first
            errors.append(error)

    with rolled_back(factory):
        thread = threading.Thread(target=slow)
        thread.start()
        started.wait(timeout=10)
        try:
            with factory() as session:
                for _ in range(50):  # until the other thread's statement is under way
                    session.execute(text("SELECT 1"))
        except TransactionError as error:
            errors.append(error)
        thread.join(timeout=30)
    assert len(errors) == 1
    assert "another thread or task has a statement under way" in str(errors[0])
    assert sync_engine.pool.checkedout() == 0


async def test_two_tasks_at_once_get_a_clear_error(async_factory, async_engine) -> None:
    async def one(statement: str) -> None:
        async with async_factory() as session:
            await session.execute(text(statement))

    async with rolled_back(async_factory):
        results = await asyncio.gather(
            one(_slow_statement(async_engine.dialect.name)), one("SELECT 1"), return_exceptions=True
        )
    # Whichever reached the connection second is refused, with ormkit's error.
    refused = [r for r in results if r is not None]
    assert len(refused) == 1
    assert isinstance(refused[0], TransactionError)
    assert "another thread or task has a statement under way" in str(refused[0])
    assert fresh_committed_ids(async_engine.url, "users") == [1]
    assert async_engine.pool.checkedout() == 0


def test_read_only_units_of_work_read_the_tests_rows_and_refuse_writes(
    factory, sync_engine
) -> None:
    with rolled_back(factory):
        with UnitOfWork(factory) as uow:
            uow.add(User(id=2, name="inside"))
        with UnitOfWork(factory, read_only=True) as reader:
            assert sorted(reader.session.scalars(select(User.id))) == [1, 2]
            reader.add(User(id=3, name="refused"))
            with pytest.raises(TransactionError, match="read-only unit of work"):
                reader.flush()
            reader.rollback()
    assert fresh_committed_ids(sync_engine.url, "users") == [1]
    assert sync_engine.pool.checkedout() == 0


async def test_async_read_only_units_of_work_read_the_tests_rows(
    async_factory, async_engine
) -> None:
    async with rolled_back(async_factory):
        async with AsyncUnitOfWork(async_factory) as uow:
            uow.add(User(id=2, name="inside"))
        async with AsyncUnitOfWork(async_factory, read_only=True) as reader:
            assert sorted(await reader.session.scalars(select(User.id))) == [1, 2]
    assert fresh_committed_ids(async_engine.url, "users") == [1]
    assert async_engine.pool.checkedout() == 0


def test_with_replicas_read_only_units_of_work_read_the_shared_connection(tmp_path) -> None:
    # Inside the block the test's rows exist only in its transaction: a read-only unit of
    # work must read them there, not on a replica (here a copy made before they were added).
    primary = ormkit.create_engine(f"sqlite:///{tmp_path / 'primary.db'}")
    Base.metadata.create_all(primary)
    primary.dispose()
    (tmp_path / "replica.db").write_bytes((tmp_path / "primary.db").read_bytes())
    replica = ormkit.create_engine(f"sqlite:///{tmp_path / 'replica.db'}")
    factory = ormkit.create_session_factory(primary, replicas=[replica])
    with UnitOfWork(factory, read_only=True) as reader:  # outside: the replica
        assert reader.session.get_bind() is replica
    with rolled_back(factory):
        with UnitOfWork(factory) as uow:
            uow.add(User(id=7, name="inside"))
        with UnitOfWork(factory, read_only=True) as reader:
            assert list(reader.session.scalars(select(User.id))) == [7]
    assert primary.pool.checkedout() == replica.pool.checkedout() == 0
    primary.dispose()
    replica.dispose()
