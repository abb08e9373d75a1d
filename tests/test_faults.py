"""Faults the block does not cause: a killed connection, a server restart, a COMMIT that
fails, a task cancelled in the middle of a statement.

Each test proves what was committed with a brand-new connection, that no connection is left
checked out, and that the next unit of work on the same factory works without help.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import psycopg
import pytest
from sqlalchemy import URL, ForeignKey, event, exc, make_url, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import AsyncUnitOfWork, UnitOfWork
from tests.conftest import POSTGRES_DRIVERS
from tests.fresh import fresh_committed_ids
from tests.models import Base, Parent
from tests.pgserver import ENV_URL, PostgresServer, PostgresUnavailable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from sqlalchemy.orm import Session, sessionmaker

pytestmark = pytest.mark.reliability


class OwnError(Exception):
    """What the block itself raises."""


# --- killing a unit of work's backend ---------------------------------------------------------

# What each driver raises once the server terminated the backend (checked, not assumed).
# psycopg reads the server's FATAL message; asyncpg has already seen the socket close (see
# `kill_async`) and reports a closed connection, which SQLAlchemy wraps as an InterfaceError.
KILL_ERRORS: dict[str, tuple[type[exc.DBAPIError], str]] = {
    "psycopg": (exc.OperationalError, "terminating connection due to administrator command"),
    "asyncpg": (exc.InterfaceError, "connection is closed"),
}


def kill(server: PostgresServer, pid: int) -> None:
    """Terminate backend `pid` from an admin connection, and wait until it has exited."""
    with psycopg.connect(server.admin_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} did not exit"
            time.sleep(0.005)


def kill_sync(server: PostgresServer, session: Session) -> int:
    pid = int(session.scalar(text("SELECT pg_backend_pid()")))
    kill(server, pid)
    return pid


async def kill_async(server: PostgresServer, session: AsyncSession) -> int:
    pid = int(await session.scalar(text("SELECT pg_backend_pid()")))
    await asyncio.to_thread(kill, server, pid)  # the event loop runs meanwhile, as in an app
    connection = await session.connection()
    driver_connection = (await connection.get_raw_connection()).driver_connection
    if isinstance(driver_connection, asyncpg.Connection):
        # asyncpg reads the socket in the background, so whether it has seen the close yet
        # decides its error. Wait for that: the kill came while the application was awaiting.
        deadline = time.monotonic() + 10
        while not driver_connection.is_closed():
            assert time.monotonic() < deadline, "asyncpg did not notice the killed backend"
            await asyncio.sleep(0.005)
    return pid


def record_invalidations(engine: Engine) -> list[BaseException | None]:
    invalidations: list[BaseException | None] = []
    event.listen(engine, "invalidate", lambda _dbapi, _record, error: invalidations.append(error))
    return invalidations


def assert_the_driver_error(error: BaseException, driver: str) -> None:
    wrapper, message = KILL_ERRORS[driver]
    assert type(error) is wrapper  # SQLAlchemy's own wrapper, not translated by ormkit
    assert isinstance(error, exc.DBAPIError)
    assert error.connection_invalidated  # SQLAlchemy recognised a disconnect
    assert message in str(error)
    if driver == "psycopg":
        assert isinstance(error.orig, psycopg.errors.AdminShutdown)
    else:
        assert isinstance(error.orig.__cause__, asyncpg.exceptions.InterfaceError)


def assert_rollback_failure_was_logged(caplog: pytest.LogCaptureFixture, driver: str) -> None:
    # The rollback after the block's own error fails too (the connection is gone): ormkit
    # logs that one, with its traceback, and lets the block's error propagate.
    logged = [r for r in caplog.records if r.name == "ormkit" and r.exc_info]
    assert [r.getMessage() for r in logged] == ["closing the session after an error failed as well"]
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], KILL_ERRORS[driver][0])


@pytest.fixture
def parent_engine(postgres_sync_url: URL) -> Iterator[Engine]:
    engine = ormkit.create_engine(postgres_sync_url)
    Base.metadata.create_all(engine, tables=[Parent.__table__])
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
async def parent_async_engine(postgres_async_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = ormkit.create_async_engine(postgres_async_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all, tables=[Parent.__table__])
    try:
        yield engine
    finally:
        await engine.dispose()


def assert_recovered(
    engine: Engine,
    factory: sessionmaker[Session],
    killed: int,
    invalidations: list[BaseException | None],
) -> None:
    assert engine.pool.checkedout() == 0
    # Invalidated when the error happened, not found dead by the next checkout's pre-ping.
    assert len(invalidations) == 1
    assert fresh_committed_ids(engine.url, "parent") == []
    with UnitOfWork(factory) as uow:
        uow.add(Parent(id=3))
        pid = uow.session.scalar(text("SELECT pg_backend_pid()"))
    assert pid != killed  # a new connection...
    assert len(invalidations) == 1  # ...and the first the pool handed out: no dead one first
    assert fresh_committed_ids(engine.url, "parent") == [3]
    assert engine.pool.checkedout() == 0


async def assert_recovered_async(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    killed: int,
    invalidations: list[BaseException | None],
) -> None:
    assert engine.pool.checkedout() == 0
    assert len(invalidations) == 1
    assert fresh_committed_ids(engine.url, "parent") == []
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=3))
        pid = await uow.session.scalar(text("SELECT pg_backend_pid()"))
    assert pid != killed
    assert len(invalidations) == 1
    assert fresh_committed_ids(engine.url, "parent") == [3]
    assert engine.pool.checkedout() == 0


def test_a_killed_connection_fails_the_statement_with_the_driver_error(
    parent_engine, postgres_server
) -> None:
    engine = parent_engine
    factory = ormkit.create_session_factory(engine)
    invalidations = record_invalidations(engine)
    with pytest.raises(exc.DBAPIError) as caught, UnitOfWork(factory) as uow:
        uow.add_all([Parent(id=1), Parent(id=2)])
        uow.flush()
        killed = kill_sync(postgres_server, uow.session)
        uow.session.execute(text("SELECT 1"))
    assert_the_driver_error(caught.value, "psycopg")
    assert_recovered(engine, factory, killed, invalidations)


def test_a_killed_connection_fails_the_commit_of_a_clean_exit(
    parent_engine, postgres_server
) -> None:
    engine = parent_engine
    factory = ormkit.create_session_factory(engine)
    invalidations = record_invalidations(engine)
    ran: list[str] = []
    with pytest.raises(exc.DBAPIError) as caught, UnitOfWork(factory) as uow:
        uow.add_all([Parent(id=1), Parent(id=2)])
        uow.flush()
        uow.on_commit(lambda: ran.append("never"))
        killed = kill_sync(postgres_server, uow.session)
    assert_the_driver_error(caught.value, "psycopg")
    assert ran == []
    assert_recovered(engine, factory, killed, invalidations)


def test_a_killed_connection_does_not_mask_the_blocks_own_exception(
    parent_engine, postgres_server, caplog: pytest.LogCaptureFixture
) -> None:
    engine = parent_engine
    factory = ormkit.create_session_factory(engine)
    invalidations = record_invalidations(engine)
    error = OwnError("the block's own error")
    with pytest.raises(OwnError) as caught, UnitOfWork(factory) as uow:
        uow.add_all([Parent(id=1), Parent(id=2)])
        uow.flush()
        killed = kill_sync(postgres_server, uow.session)
        raise error
    assert caught.value is error
    assert caught.value.__context__ is None  # nothing was chained onto it either
    assert_rollback_failure_was_logged(caplog, "psycopg")
    assert_recovered(engine, factory, killed, invalidations)


async def test_a_killed_connection_fails_the_async_statement_with_the_driver_error(
    parent_async_engine, postgres_server
) -> None:
    engine = parent_async_engine
    driver = engine.dialect.driver
    factory = ormkit.create_async_session_factory(engine)
    invalidations = record_invalidations(engine.sync_engine)
    with pytest.raises(exc.DBAPIError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all([Parent(id=1), Parent(id=2)])
            await uow.flush()
            killed = await kill_async(postgres_server, uow.session)
            await uow.session.execute(text("SELECT 1"))
    assert_the_driver_error(caught.value, driver)
    await assert_recovered_async(engine, factory, killed, invalidations)


async def test_a_killed_connection_fails_the_commit_of_a_clean_async_exit(
    parent_async_engine, postgres_server
) -> None:
    engine = parent_async_engine
    driver = engine.dialect.driver
    factory = ormkit.create_async_session_factory(engine)
    invalidations = record_invalidations(engine.sync_engine)
    ran: list[str] = []
    with pytest.raises(exc.DBAPIError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all([Parent(id=1), Parent(id=2)])
            await uow.flush()
            uow.on_commit(lambda: ran.append("never"))
            killed = await kill_async(postgres_server, uow.session)
    assert_the_driver_error(caught.value, driver)
    assert ran == []
    await assert_recovered_async(engine, factory, killed, invalidations)


async def test_a_killed_connection_does_not_mask_the_async_blocks_own_exception(
    parent_async_engine, postgres_server, caplog: pytest.LogCaptureFixture
) -> None:
    engine = parent_async_engine
    driver = engine.dialect.driver
    factory = ormkit.create_async_session_factory(engine)
    invalidations = record_invalidations(engine.sync_engine)
    error = OwnError("the block's own error")
    with pytest.raises(OwnError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all([Parent(id=1), Parent(id=2)])
            await uow.flush()
            killed = await kill_async(postgres_server, uow.session)
            raise error
    assert caught.value is error
    assert caught.value.__context__ is None
    assert_rollback_failure_was_logged(caplog, driver)
    await assert_recovered_async(engine, factory, killed, invalidations)


# --- restarting the server between two units of work -----------------------------------------


class Restartable(NamedTuple):
    server: PostgresServer
    url: URL  # a database of this test's own on that server


def _started_by_this_run(server: PostgresServer) -> bool:
    return server._tmp is not None  # an external server (ORMKIT_TEST_POSTGRES_URL) has none


def _make_sure_it_runs(server: PostgresServer) -> None:
    proc = server._proc
    if proc is not None and proc.poll() is None:
        return
    try:
        server._launch(new_port=False)
    except RuntimeError:
        server._launch(new_port=True)  # the port was taken meanwhile; admin_url follows


@pytest.fixture
def restartable(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Restartable]:
    """A server this test may stop and start, with a database of its own.

    The session's server when this run started it (a restart takes ~0.05 s and every test has
    its own database and engines); it runs again after the test whatever happened. An external
    server must not be restarted: then a private one is started for the test.
    """
    private = not _started_by_this_run(postgres_server)
    server = postgres_server
    if private:
        monkeypatch.delenv(ENV_URL)
        try:
            server = PostgresServer.start()
        except PostgresUnavailable as error:
            reason = (
                f"the restart tests need a server they may restart; {ENV_URL} names one they "
                f"must not, and no private one could be started: {error}"
            )
            if os.environ.get("ORMKIT_REQUIRE_POSTGRES") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
    name = server.create_database()
    try:
        yield Restartable(server, make_url(server.admin_url).set(database=name))
    finally:
        try:
            _make_sure_it_runs(server)
            server.drop_database(name)
        finally:
            if private:
                server.stop()


def restart(server: PostgresServer) -> None:
    # On this thread (the main one): the server dies with the thread that started it (see
    # tests/pgserver.py), so never from asyncio.to_thread.
    server.restart()


def started_at(url: URL) -> object:
    """When the server behind `url` started, asked on a connection of its own."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as connection:
        return connection.execute("SELECT pg_postmaster_start_time()").fetchone()


def test_the_unit_of_work_after_a_server_restart_succeeds(restartable) -> None:
    server, url = restartable
    engine = ormkit.create_engine(url.set(drivername=POSTGRES_DRIVERS["psycopg"]))
    try:
        Base.metadata.create_all(engine, tables=[Parent.__table__])
        factory = ormkit.create_session_factory(engine)
        invalidations = record_invalidations(engine)
        with UnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
        assert engine.pool.checkedin() == 1  # the connection waits in the pool...
        before = started_at(url)
        restart(server)
        assert started_at(url) != before  # ...and the server it was connected to is gone
        with UnitOfWork(factory) as uow:  # the application does nothing special
            uow.add(Parent(id=2))
        assert len(invalidations) == 1  # the pre-ping found the dead connection and replaced it
        assert fresh_committed_ids(url, "parent") == [1, 2]
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
async def test_the_async_unit_of_work_after_a_server_restart_succeeds(
    restartable, driver: str
) -> None:
    server, url = restartable
    engine = ormkit.create_async_engine(url.set(drivername=POSTGRES_DRIVERS[driver]))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all, tables=[Parent.__table__])
        factory = ormkit.create_async_session_factory(engine)
        invalidations = record_invalidations(engine.sync_engine)
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
        assert engine.pool.checkedin() == 1
        before = started_at(url)
        restart(server)
        assert started_at(url) != before
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=2))
        assert len(invalidations) == 1
        assert fresh_committed_ids(url, "parent") == [1, 2]
        assert engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


# --- a COMMIT that fails: a deferred foreign key ------------------------------------------------


class DeferredBase(DeclarativeBase):
    pass


class Owner(DeferredBase):
    __tablename__ = "owner"

    id: Mapped[int] = mapped_column(primary_key=True)


class Pet(DeferredBase):
    """Its foreign key is checked at COMMIT only, so every statement before it succeeds."""

    __tablename__ = "pet"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(
        ForeignKey("owner.id", deferrable=True, initially="DEFERRED")
    )


# The messages a deferred foreign key's failed COMMIT carries, per backend.
FK_MESSAGES = {
    "sqlite": "FOREIGN KEY constraint failed",
    "postgresql": 'violates foreign key constraint "pet_owner_id_fkey"',
}


@pytest.fixture
def deferred_engine(sync_url: URL) -> Iterator[Engine]:
    engine = ormkit.create_engine(sync_url)
    DeferredBase.metadata.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
async def deferred_async_engine(async_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = ormkit.create_async_engine(async_url)
    async with engine.begin() as connection:
        await connection.run_sync(DeferredBase.metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


def test_a_commit_that_fails_commits_nothing_and_runs_no_callbacks(deferred_engine) -> None:
    engine = deferred_engine
    factory = ormkit.create_session_factory(engine)
    ran: list[str] = []
    with pytest.raises(exc.IntegrityError) as caught, UnitOfWork(factory) as uow:
        uow.add_all([Owner(id=1), Pet(id=1, owner_id=1), Pet(id=2, owner_id=99)])
        uow.flush()  # the INSERTs succeed: the foreign key waits for COMMIT
        uow.on_commit(lambda: ran.append("never"))
    assert FK_MESSAGES[engine.dialect.name] in str(caught.value)
    assert caught.value.statement is None  # raised by the COMMIT, not by a statement
    assert ran == []
    assert engine.pool.checkedout() == 0
    assert fresh_committed_ids(engine.url, "owner") == []
    assert fresh_committed_ids(engine.url, "pet") == []
    # The next unit of work on the same factory (and pooled connection) starts clean: adding
    # the missing owner must not carry the failed unit of work's rows into its commit.
    with UnitOfWork(factory) as uow:
        uow.add(Owner(id=99))
    assert fresh_committed_ids(engine.url, "owner") == [99]
    assert fresh_committed_ids(engine.url, "pet") == []
    assert engine.pool.checkedout() == 0


def test_an_explicit_commit_that_fails_propagates_and_commits_nothing(deferred_engine) -> None:
    engine = deferred_engine
    factory = ormkit.create_session_factory(engine)
    ran: list[str] = []
    with pytest.raises(exc.IntegrityError), UnitOfWork(factory) as uow:
        uow.add(Pet(id=1, owner_id=99))
        uow.on_commit(lambda: ran.append("never"))
        uow.commit()
    assert ran == []
    assert engine.pool.checkedout() == 0
    assert fresh_committed_ids(engine.url, "pet") == []
    with UnitOfWork(factory) as uow:
        uow.add(Owner(id=99))
    assert fresh_committed_ids(engine.url, "pet") == []


async def test_an_async_commit_that_fails_commits_nothing_and_runs_no_callbacks(
    deferred_async_engine,
) -> None:
    engine = deferred_async_engine
    factory = ormkit.create_async_session_factory(engine)
    ran: list[str] = []
    with pytest.raises(exc.IntegrityError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all([Owner(id=1), Pet(id=1, owner_id=1), Pet(id=2, owner_id=99)])
            await uow.flush()
            uow.on_commit(lambda: ran.append("never"))
    assert FK_MESSAGES[engine.dialect.name] in str(caught.value)
    assert caught.value.statement is None
    assert ran == []
    assert engine.pool.checkedout() == 0
    assert fresh_committed_ids(engine.url, "owner") == []
    assert fresh_committed_ids(engine.url, "pet") == []
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Owner(id=99))
    assert fresh_committed_ids(engine.url, "owner") == [99]
    assert fresh_committed_ids(engine.url, "pet") == []
    assert engine.pool.checkedout() == 0


def test_a_failed_commit_leaves_no_open_sqlite_transaction_without_savepoints(tmp_path) -> None:
    # Without ormkit's BEGIN recipe the sqlite3 module begins by itself before the next write,
    # inside a transaction still open from the failed COMMIT: the next commit would then
    # commit the failed unit of work's rows too.
    engine = ormkit.create_engine(f"sqlite:///{tmp_path / 'app.db'}", sqlite_savepoints=False)
    try:
        DeferredBase.metadata.create_all(engine)
        factory = ormkit.create_session_factory(engine)
        with pytest.raises(exc.IntegrityError), UnitOfWork(factory) as uow:
            uow.add(Pet(id=1, owner_id=99))
        with UnitOfWork(factory) as uow:
            uow.add(Owner(id=99))
        assert fresh_committed_ids(engine.url, "pet") == []
        assert fresh_committed_ids(engine.url, "owner") == [99]
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


# --- a task cancelled in the middle of a SQLite statement ---------------------------------------

# Counting to a million: a statement that keeps aiosqlite's thread busy for a while.
SLOW_SQLITE_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000) "
    "SELECT max(x) FROM c"
)


async def test_a_task_cancelled_mid_statement_leaves_no_sqlite_lock_behind(tmp_path) -> None:
    url = URL.create("sqlite+aiosqlite", database=str(tmp_path / "app.db"))
    engine = ormkit.create_async_engine(url, sqlite_busy_timeout=0.5)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all, tables=[Parent.__table__])
        factory = ormkit.create_async_session_factory(engine)
        interrupted: list[BaseException] = []
        event.listen(
            engine.sync_engine,
            "handle_error",
            lambda context: interrupted.append(context.original_exception),
        )
        writing = asyncio.Event()

        async def work() -> None:
            async with AsyncUnitOfWork(factory) as uow:
                uow.add(Parent(id=1))
                await uow.flush()  # this transaction holds SQLite's write lock now
                writing.set()
                await uow.session.execute(text(SLOW_SQLITE_QUERY))
                await asyncio.sleep(30)

        task = asyncio.create_task(work())
        await writing.wait()
        await asyncio.sleep(0.02)  # the slow query is running in aiosqlite's thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as caught:
            await task
        assert [type(error) for error in interrupted] == [asyncio.CancelledError]  # mid-query
        # `caught` keeps the traceback alive, as an error handler or a log record may: the
        # cancelled statement must not keep the rolled-back transaction's lock meanwhile.
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=2))
        assert caught.value is not None
        assert fresh_committed_ids(url, "parent") == [2]
        assert engine.pool.checkedout() == 0
    finally:
        await engine.dispose()
