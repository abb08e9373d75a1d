"""Engines: ormkit's dialect defaults, each proved on a real database, and their switches."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
import sqlalchemy
from sqlalchemy import URL, exc, func, select, text
from sqlalchemy.pool import AsyncAdaptedQueuePool

import ormkit
from tests.models import Base, Child, Parent, User

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine


# --- foreign keys are enforced, SQLite included ----------------------------------------------


def test_orphan_child_is_refused(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        session.add(Child(id=1, parent_id=404))
        with pytest.raises(exc.IntegrityError):
            session.commit()


async def test_orphan_child_is_refused_async(async_engine: AsyncEngine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        session.add(Child(id=1, parent_id=404))
        with pytest.raises(exc.IntegrityError):
            await session.commit()


def test_sqlite_foreign_keys_can_be_switched_off(tmp_path: Path) -> None:
    engine = ormkit.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", sqlite_foreign_keys=False)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(sqlalchemy.insert(Child).values(id=1, parent_id=404))
            assert connection.scalar(text("PRAGMA foreign_keys")) == 0
    finally:
        engine.dispose()


# --- savepoints really roll back -------------------------------------------------------------


def test_savepoint_rolls_back_only_its_own_work(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        session.add(Parent(id=1))
        with pytest.raises(RuntimeError), session.begin_nested():
            session.add(Parent(id=2))
            session.flush()
            raise RuntimeError
        session.commit()
    with factory() as session:
        assert session.scalars(select(Parent.id)).all() == [1]


def test_outer_rollback_undoes_a_released_savepoint(sync_engine: sqlalchemy.Engine) -> None:
    # Without the BEGIN recipe, pysqlite commits the savepoint's rows here.
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        with session.begin_nested():
            session.add(Parent(id=1))
        session.rollback()
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Parent)) == 0


async def test_savepoint_rolls_back_only_its_own_work_async(async_engine: AsyncEngine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        session.add(Parent(id=1))
        with pytest.raises(RuntimeError):
            async with session.begin_nested():
                session.add(Parent(id=2))
                await session.flush()
                raise RuntimeError
        await session.commit()
    async with factory() as session:
        assert (await session.scalars(select(Parent.id))).all() == [1]


async def test_outer_rollback_undoes_a_released_savepoint_async(
    async_engine: AsyncEngine,
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        async with session.begin_nested():
            session.add(Parent(id=1))
        await session.rollback()
    async with factory() as session:
        assert await session.scalar(select(func.count()).select_from(Parent)) == 0


def test_sqlite_savepoint_recipe_can_be_switched_off(tmp_path: Path) -> None:
    # Switched off, pysqlite's own transaction handling is back: the released savepoint's
    # row survives the outer rollback. This is the behaviour ormkit's default prevents.
    engine = ormkit.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", sqlite_savepoints=False)
    try:
        Base.metadata.create_all(engine)
        factory = ormkit.create_session_factory(engine)
        with factory() as session:
            with session.begin_nested():
                session.add(Parent(id=1))
            session.rollback()
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Parent)) == 1
    finally:
        engine.dispose()


def test_sqlite_autocommit_isolation_level_still_autocommits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = ormkit.create_engine(url, isolation_level="AUTOCOMMIT")
    other = ormkit.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.insert(Parent).values(id=1))
            # No BEGIN was sent: the row is visible to another connection at once.
            with other.connect() as reader:
                assert reader.scalar(select(func.count()).select_from(Parent)) == 1
    finally:
        engine.dispose()
        other.dispose()


def test_sqlite_serializable_isolation_level_keeps_savepoints(tmp_path: Path) -> None:
    engine = ormkit.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        Base.metadata.create_all(engine)
        factory = ormkit.create_session_factory(engine)
        with factory() as session:
            session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            with session.begin_nested():
                session.add(Parent(id=1))
            session.rollback()
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Parent)) == 0
    finally:
        engine.dispose()


# --- file databases: WAL and a busy timeout --------------------------------------------------


def test_sqlite_file_database_is_in_wal_mode_with_busy_timeout(tmp_path: Path) -> None:
    # sqlite3's own default is 5 s too: a driver timeout of 0.2 s shows ormkit's PRAGMA wins.
    engine = ormkit.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}", connect_args={"timeout": 0.2}
    )
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("PRAGMA journal_mode")) == "wal"
            assert connection.scalar(text("PRAGMA busy_timeout")) == 5000
            assert connection.scalar(text("PRAGMA foreign_keys")) == 1
    finally:
        engine.dispose()


async def test_aiosqlite_file_database_is_in_wal_mode_with_busy_timeout(tmp_path: Path) -> None:
    engine = ormkit.create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", sqlite_busy_timeout=1.5
    )
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("PRAGMA journal_mode")) == "wal"
            assert await connection.scalar(text("PRAGMA busy_timeout")) == 1500
            assert await connection.scalar(text("PRAGMA foreign_keys")) == 1
    finally:
        await engine.dispose()


async def test_aiosqlite_file_connections_are_pooled_on_every_sqlalchemy(tmp_path: Path) -> None:
    # SQLAlchemy before 2.0.38 gave aiosqlite files NullPool: a new connection per checkout.
    engine = ormkit.create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        assert isinstance(engine.sync_engine.pool, AsyncAdaptedQueuePool)
        seen = []
        for _ in range(2):
            async with engine.connect() as connection:
                seen.append(id((await connection.get_raw_connection()).dbapi_connection))
        assert seen[0] == seen[1]  # the same pooled connection, taken twice
        assert engine.sync_engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


def test_sqlite_wal_and_busy_timeout_can_be_switched_off(tmp_path: Path) -> None:
    engine = ormkit.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        sqlite_wal=False,
        sqlite_busy_timeout=None,
        connect_args={"timeout": 0.2},
    )
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("PRAGMA journal_mode")) == "delete"
            # The driver's own setting is left in place.
            assert connection.scalar(text("PRAGMA busy_timeout")) == 200
    finally:
        engine.dispose()


# --- memory databases: one database per engine -----------------------------------------------


def test_sqlite_memory_database_is_shared_by_sessions_and_threads() -> None:
    engine = ormkit.create_engine("sqlite://")
    try:
        Base.metadata.create_all(engine)
        factory = ormkit.create_session_factory(engine)
        with factory() as session:
            session.add(User(id=1, name="roach"))
            session.commit()
        seen: list[int | None] = []

        def read_in_another_thread() -> None:
            with factory() as session:
                seen.append(session.scalar(select(func.count()).select_from(User)))

        thread = threading.Thread(target=read_in_another_thread)
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        engine.dispose()


async def test_aiosqlite_memory_database_is_shared_by_sessions() -> None:
    engine = ormkit.create_async_engine("sqlite+aiosqlite://")
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        factory = ormkit.create_async_session_factory(engine)
        async with factory() as session:
            session.add(User(id=1, name="roach"))
            await session.commit()
        async with factory() as session:
            assert await session.scalar(select(func.count()).select_from(User)) == 1
    finally:
        await engine.dispose()


def test_sqlite_memory_sharing_can_be_switched_off() -> None:
    engine = ormkit.create_engine("sqlite://", sqlite_shared_memory=False)
    try:
        Base.metadata.create_all(engine)
        seen: list[str] = []

        def look_in_another_thread() -> None:
            with engine.connect() as connection:
                try:
                    connection.execute(text("select count(*) from users"))
                    seen.append("table found")
                except exc.OperationalError:
                    seen.append("no table")
                # The thread's own connection (its memory database) closes with it: the pool
                # keeps one per thread, which Python 3.13 reports unclosed when collected.
                connection.invalidate()

        thread = threading.Thread(target=look_in_another_thread)
        thread.start()
        thread.join()
        # SQLAlchemy's default: a connection per thread, so another thread has another
        # memory database, without the table.
        assert seen == ["no table"]
    finally:
        engine.dispose()


# --- PostgreSQL: pre-ping --------------------------------------------------------------------


def test_postgres_engines_pre_ping_by_default(postgres_url: URL) -> None:
    engine = ormkit.create_engine(postgres_url.set(drivername="postgresql+psycopg"))
    quiet = ormkit.create_engine(
        postgres_url.set(drivername="postgresql+psycopg"), pool_pre_ping=False
    )
    async_engine = ormkit.create_async_engine(postgres_url.set(drivername="postgresql+asyncpg"))
    try:
        assert engine.pool._pre_ping is True
        assert quiet.pool._pre_ping is False
        assert async_engine.sync_engine.pool._pre_ping is True
    finally:
        engine.dispose()
        quiet.dispose()


def test_sqlite_options_are_ignored_by_other_dialects(postgres_url: URL) -> None:
    engine = ormkit.create_engine(
        postgres_url.set(drivername="postgresql+psycopg"),
        sqlite_wal=False,
        sqlite_foreign_keys=False,
    )
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("select 1")) == 1
    finally:
        engine.dispose()


def test_engine_options_win_over_defaults(tmp_path: Path) -> None:
    engine = ormkit.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}", pool_size=3, echo=False, pool_pre_ping=True
    )
    try:
        assert engine.pool.size() == 3
        assert engine.pool._pre_ping is True
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["postgresql+psycopg", "postgresql+psycopg_async"])
async def test_psycopg_urls_serve_async_engines(postgres_url: URL, driver: str) -> None:
    # psycopg has a sync and an async dialect under one name, as SQLAlchemy documents.
    engine = ormkit.create_async_engine(postgres_url.set(drivername=driver))
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("select 1")) == 1
    finally:
        await engine.dispose()


def test_skip_autocommit_rollback_is_refused_with_the_sqlite_transaction_recipe() -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match="sqlite_savepoints=False"):
        ormkit.create_engine("sqlite://", skip_autocommit_rollback=True)


# --- bad URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "could not parse the database URL"),
        ("nosuchdb://x", "no SQLAlchemy dialect"),
        ("sqlite+aiosqlite://", "is an async driver"),
    ],
)
def test_create_engine_refuses_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match=message):
        ormkit.create_engine(url)


def test_create_async_engine_refuses_sync_drivers() -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match="is not an async driver"):
        ormkit.create_async_engine("sqlite://")


def test_bad_url_message_does_not_repeat_the_password() -> None:
    with pytest.raises(ormkit.InvalidArgumentError) as caught:
        ormkit.create_engine("postgresql+psycopg://user:s3cret@host:notaport/db")
    assert "s3cret" not in str(caught.value)


def test_create_engine_refuses_a_non_url() -> None:
    with pytest.raises(ormkit.InvalidArgumentError, match="expected a database URL"):
        ormkit.create_engine(42)  # type: ignore[arg-type]
