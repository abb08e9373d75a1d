"""ormkit.testing: count_queries counts what each kind of target sends, and nothing else."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import ormkit
from ormkit import AsyncUnitOfWork, UnitOfWork
from ormkit.testing import QueryLog, assert_max_queries, assert_queries, count_queries
from tests.models import Parent, User

SELECT_1 = text("select 1")


def test_engine_target_counts_every_statement(sync_engine: sqlalchemy.Engine) -> None:
    with count_queries(sync_engine) as log:
        with sync_engine.connect() as connection:
            connection.execute(SELECT_1)
            connection.execute(text("select 2"))
        with sync_engine.connect() as other:
            other.execute(text("select 3"))
    assert log.statements == ["select 1", "select 2", "select 3"]
    assert log.count == 3


async def test_async_engine_target_counts_every_statement(async_engine: AsyncEngine) -> None:
    with count_queries(async_engine) as log:
        async with async_engine.connect() as connection:
            await connection.execute(SELECT_1)
    assert log.statements == ["select 1"]


def test_session_target_counts_only_that_session(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session, factory() as other:
        session.execute(SELECT_1)  # begun before the block: must still be watched
        with count_queries(session) as log:
            session.execute(text("select 2"))
            other.execute(text("select 3"))
            with sync_engine.connect() as connection:
                connection.execute(text("select 4"))
            session.commit()
            session.execute(text("select 5"))  # a new transaction, maybe a new connection
        session.execute(text("select 6"))  # after the block
    assert log.statements == ["select 2", "select 5"]


async def test_async_session_target_counts_only_that_session(async_engine: AsyncEngine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session, factory() as other:
        await session.execute(SELECT_1)
        with count_queries(session) as log:
            await session.execute(text("select 2"))
            await other.execute(text("select 3"))
            await session.commit()
            await session.execute(text("select 5"))
    assert log.statements == ["select 2", "select 5"]


def test_factory_target_counts_its_sessions_only(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    other_factory = ormkit.create_session_factory(sync_engine)
    with count_queries(factory) as log:
        with factory() as session:
            session.execute(SELECT_1)
        with factory() as session:
            session.execute(text("select 2"))
        with other_factory() as session:
            session.execute(text("select 3"))
    assert log.statements == ["select 1", "select 2"]


async def test_async_factory_target_counts_its_sessions_only(async_engine: AsyncEngine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    other_factory = ormkit.create_async_session_factory(async_engine)
    with count_queries(factory) as log:
        async with factory() as session:
            await session.execute(SELECT_1)
        async with other_factory() as session:
            await session.execute(text("select 3"))
    assert log.statements == ["select 1"]


async def test_plain_async_factory_target_counts_sessions_on_its_engine(
    async_engine: AsyncEngine,
) -> None:
    factory = async_sessionmaker(async_engine)
    with count_queries(factory) as log:
        async with factory() as session:
            await session.execute(SELECT_1)
        async with AsyncSession(async_engine) as session:
            # Same sync session class and engine: counted, as the docstring says.
            await session.execute(text("select 2"))
    assert log.statements == ["select 1", "select 2"]


def test_units_of_work_with_an_isolation_level_are_counted_once(sync_engine) -> None:
    # The unit of work binds its session to sync_engine.execution_options(...): another
    # Engine object over the same pool, whose connections also fire sync_engine's listeners.
    factory = ormkit.create_session_factory(sync_engine)
    level = "SERIALIZABLE"
    with count_queries(factory) as by_factory, count_queries(sync_engine) as by_engine:  # noqa: SIM117
        with UnitOfWork(factory, isolation_level=level) as uow, count_queries(uow.session) as log:
            uow.session.execute(SELECT_1)
            uow.session.execute(text("select 2"))
    assert log.statements == ["select 1", "select 2"]
    assert by_factory.statements == ["select 1", "select 2"]
    assert by_engine.statements == ["select 1", "select 2"]


async def test_async_units_of_work_with_an_isolation_level_are_counted(async_engine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    with count_queries(factory) as log:
        async with AsyncUnitOfWork(factory, isolation_level="SERIALIZABLE") as uow:
            await uow.session.execute(SELECT_1)
    assert log.statements == ["select 1"]


def test_every_batch_of_a_batched_insert_counts_once(sync_engine) -> None:
    # Server-generated keys make SQLAlchemy send the INSERT in batches (insertmanyvalues),
    # which share one execution context: each batch is still a round trip. Watched through the
    # factory, the engine and the option engine of an isolation_level at once, every batch
    # counts exactly once, as many as the cursor executions the driver saw.
    executions: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            executions.append(statement)

    event.listen(sync_engine, "before_cursor_execute", seen)
    factory = ormkit.create_session_factory(sync_engine)
    try:
        with (
            count_queries(factory) as by_factory,
            count_queries(sync_engine) as by_engine,
            UnitOfWork(factory, isolation_level="SERIALIZABLE") as uow,
        ):
            with count_queries(uow.session) as by_session:
                uow.add_all(Parent(name="batched") for _ in range(2500))
                uow.flush()
            uow.rollback()
    finally:
        event.remove(sync_engine, "before_cursor_execute", seen)
    assert len(executions) >= 3  # batched: more than one round trip
    assert by_session.count == by_factory.count == by_engine.count == len(executions)


def test_transaction_control_is_not_counted(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with count_queries(sync_engine) as log, factory() as session:
        session.add(Parent(id=1))
        with session.begin_nested():
            session.add(Parent(id=2))
        session.commit()
    # Two INSERT round trips (one per flush); no BEGIN, SAVEPOINT, RELEASE or COMMIT.
    assert log.count == 2
    assert all(sql.lstrip().upper().startswith("INSERT") for sql in log.statements)


def test_flush_batches_count_as_round_trips(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session, count_queries(session) as log:
        session.add_all(User(id=n, name=f"user {n}") for n in range(10))
        session.flush()
    # SQLAlchemy batches the ten INSERTs (insertmanyvalues or executemany): one round trip.
    assert log.count == 1


def test_listeners_are_removed_after_the_block(sync_engine: sqlalchemy.Engine) -> None:
    before = len(sync_engine.dispatch.before_cursor_execute)
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        with count_queries(session):
            session.execute(SELECT_1)
        with count_queries(factory):
            pass
        with count_queries(sync_engine):
            pass
    assert len(sync_engine.dispatch.before_cursor_execute) == before


def test_assert_queries_passes_on_the_exact_count(sync_engine: sqlalchemy.Engine) -> None:
    with assert_queries(sync_engine, 1) as log, sync_engine.connect() as connection:
        connection.execute(SELECT_1)
    assert isinstance(log, QueryLog)


def test_assert_queries_fails_listing_the_sql(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with (
        pytest.raises(AssertionError) as caught,
        assert_queries(factory, 0),
        factory() as session,
    ):
        session.scalars(select(User).where(User.name == "roach")).all()
    message = str(caught.value)
    assert "expected 0 statement(s), 1 were sent" in message
    assert "FROM users" in message


def test_assert_max_queries_passes_up_to_the_maximum_and_fails_above(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        with assert_max_queries(factory, 2) as log:
            session.execute(SELECT_1)
            session.execute(text("select 2"))
        assert log.count == 2  # at the maximum: passes
        with assert_max_queries(factory, 5):
            session.execute(SELECT_1)  # below: passes
        with pytest.raises(AssertionError) as caught, assert_max_queries(factory, 1):
            session.execute(SELECT_1)
            session.scalars(select(User).where(User.name == "n plus one")).all()
    message = str(caught.value)
    assert "expected at most 1 statement(s), 2 were sent" in message
    assert "FROM users" in message


async def test_async_assert_max_queries_fails_above_the_maximum(async_engine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        with pytest.raises(AssertionError, match="at most 0 statement"):  # noqa: SIM117
            with assert_max_queries(factory, 0):
                await session.execute(SELECT_1)
        with assert_max_queries(session, 1):
            await session.execute(SELECT_1)


def test_assert_queries_lets_errors_of_the_block_through(sync_engine: sqlalchemy.Engine) -> None:
    with pytest.raises(KeyError), assert_queries(sync_engine, 5):
        raise KeyError


@pytest.mark.parametrize("expected", [-1, "0", 1.0, True, None])
def test_assert_queries_refuses_a_bad_count(expected: object) -> None:
    engine = ormkit.create_engine("sqlite://")
    with (
        pytest.raises(ormkit.InvalidArgumentError, match="count of statements"),
        assert_queries(engine, expected),  # type: ignore[arg-type]
    ):
        pass


def test_count_queries_refuses_an_unknown_target() -> None:
    with (
        pytest.raises(ormkit.InvalidArgumentError, match="watches an Engine"),
        count_queries("sqlite://"),  # type: ignore[arg-type]
    ):
        pass
