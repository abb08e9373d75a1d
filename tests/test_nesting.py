"""Nesting composes: a unit of work opened inside another of the same factory joins it.

As Django's nested `atomic`: the inner block is a savepoint (an exception inside rolls back to
it and propagates; a clean exit releases it), its callbacks wait for the outermost commit, and
it never commits or rolls back on its own. `durable=True` refuses to be nested. Other threads
and other tasks get independent transactions. The cases follow Django's own transaction tests
(`AtomicTests`, `AtomicInsideTransactionTests`, `DurableTests`, `TestConnectionOnCommit`).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import exc, text

import ormkit
from ormkit import AsyncUnitOfWork, TransactionError, UnitOfWork
from ormkit.testing import count_queries
from tests.fresh import fresh_committed_ids
from tests.helpers import ConflictError
from tests.models import User


@pytest.fixture
def factory(sync_engine):
    return ormkit.create_session_factory(sync_engine)


@pytest.fixture
def async_factory(async_engine):
    return ormkit.create_async_session_factory(async_engine)


def _ids(engine) -> list[int]:
    return fresh_committed_ids(engine.url, "users")


# --- the inner block is a savepoint of the outer transaction -----------------------------------


def test_the_outer_failing_undoes_the_inner_work(factory, sync_engine) -> None:
    with pytest.raises(RuntimeError), UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        with UnitOfWork(factory) as inner:
            assert inner.session is outer.session
            inner.add(User(id=2, name="inner"))
        assert _ids(sync_engine) == []  # released, not committed: the outer owns the commit
        raise RuntimeError
    assert _ids(sync_engine) == []
    assert sync_engine.pool.checkedout() == 0


async def test_the_outer_failing_undoes_the_inner_work_async(async_factory, async_engine) -> None:
    with pytest.raises(RuntimeError):
        async with AsyncUnitOfWork(async_factory) as outer:
            outer.add(User(id=1, name="outer"))
            async with AsyncUnitOfWork(async_factory) as inner:
                assert inner.session is outer.session
                inner.add(User(id=2, name="inner"))
            assert _ids(async_engine) == []
            raise RuntimeError
    assert _ids(async_engine) == []
    assert async_engine.pool.checkedout() == 0


def test_the_inner_failing_rolls_back_to_its_savepoint_only(factory, sync_engine) -> None:
    ran: list[str] = []
    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        outer.on_commit(lambda: ran.append("outer"))
        with pytest.raises(RuntimeError), UnitOfWork(factory) as inner:
            inner.add(User(id=2, name="inner"))
            inner.flush()
            inner.on_commit(lambda: ran.append("inner, rolled back"))
            raise RuntimeError
        with UnitOfWork(factory) as released:
            released.add(User(id=3, name="released"))
            released.on_commit(lambda: ran.append("released"))
        assert ran == []  # callbacks wait for the outermost commit
    assert _ids(sync_engine) == [1, 3]
    assert ran == ["outer", "released"]


async def test_the_inner_failing_rolls_back_to_its_savepoint_only_async(
    async_factory, async_engine
) -> None:
    ran: list[str] = []
    async with AsyncUnitOfWork(async_factory) as outer:
        outer.add(User(id=1, name="outer"))
        outer.on_commit(lambda: ran.append("outer"))
        with pytest.raises(RuntimeError):
            async with AsyncUnitOfWork(async_factory) as inner:
                inner.add(User(id=2, name="inner"))
                await inner.flush()
                inner.on_commit(lambda: ran.append("inner, rolled back"))
                raise RuntimeError
        async with AsyncUnitOfWork(async_factory) as released:
            released.add(User(id=3, name="released"))
            released.on_commit(lambda: ran.append("released"))
        assert ran == []
    assert _ids(async_engine) == [1, 3]
    assert ran == ["outer", "released"]


def test_three_levels_deep(factory, sync_engine) -> None:
    with UnitOfWork(factory) as first:
        first.add(User(id=1, name="1"))
        with UnitOfWork(factory) as second:
            second.add(User(id=2, name="2"))
            with pytest.raises(RuntimeError), UnitOfWork(factory) as third:
                third.add(User(id=3, name="3"))
                third.flush()
                raise RuntimeError
            with UnitOfWork(factory) as fourth:
                fourth.add(User(id=4, name="4"))
    assert _ids(sync_engine) == [1, 2, 4]


def test_a_joined_unit_of_work_neither_commits_nor_rolls_back(factory, sync_engine) -> None:
    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        with UnitOfWork(factory) as inner:
            with pytest.raises(TransactionError, match="joined an open one"):
                inner.commit()
            with pytest.raises(TransactionError, match="joined an open one"):
                inner.rollback()
            inner.add(User(id=2, name="inner"))
    assert _ids(sync_engine) == [1, 2]


async def test_a_joined_unit_of_work_neither_commits_nor_rolls_back_async(
    async_factory, async_engine
) -> None:
    async with AsyncUnitOfWork(async_factory) as outer:
        outer.add(User(id=1, name="outer"))
        async with AsyncUnitOfWork(async_factory) as inner:
            with pytest.raises(TransactionError, match="joined an open one"):
                await inner.commit()
            with pytest.raises(TransactionError, match="joined an open one"):
                await inner.rollback()
            inner.add(User(id=2, name="inner"))
    assert _ids(async_engine) == [1, 2]


def test_an_error_swallowed_in_the_inner_block_fails_only_the_inner(factory, sync_engine) -> None:
    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        with pytest.raises(TransactionError, match="nested unit of work"):  # noqa: SIM117
            with UnitOfWork(factory) as inner:
                inner.add(User(id=2, name="inner"))
                inner.flush()
                try:
                    inner.session.execute(text("SELECT no_such_column FROM users"))
                except exc.DBAPIError:
                    pass
        # Rolled back to its savepoint: the error is undone with it, the outer goes on.
        outer.add(User(id=3, name="after"))
    assert _ids(sync_engine) == [1, 3]


def test_a_memory_database_nests_too() -> None:
    # One shared connection: a second session inside the first used to fail with "cannot
    # start a transaction within a transaction"; the inner unit of work now joins the outer.
    engine = ormkit.create_engine("sqlite://")
    User.metadata.create_all(engine)
    factory = ormkit.create_session_factory(engine)
    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        outer.flush()  # the shared connection is inside a transaction now
        with UnitOfWork(factory) as inner:
            inner.add(User(id=2, name="inner"))
    with engine.connect() as connection:
        assert list(connection.scalars(text("SELECT id FROM users ORDER BY id"))) == [1, 2]
    engine.dispose()


def test_other_factories_are_independent(sync_engine) -> None:
    first = ormkit.create_session_factory(sync_engine)
    second = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(first) as outer:
        with UnitOfWork(second) as other:
            assert other.session is not outer.session
            other.add(User(id=1, name="own transaction"))
        assert _ids(sync_engine) == [1]


# --- durable, isolation levels, run -----------------------------------------------------------


def test_durable_refuses_to_be_nested(factory, sync_engine) -> None:
    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        with count_queries(sync_engine) as log:  # noqa: SIM117
            with pytest.raises(TransactionError, match="durable=True"):
                with UnitOfWork(factory, durable=True):
                    pass
        assert log.count == 0
    with UnitOfWork(factory, durable=True) as alone:  # outermost: fine
        alone.add(User(id=2, name="durable"))
    assert _ids(sync_engine) == [1, 2]


async def test_durable_refuses_to_be_nested_async(async_factory, async_engine) -> None:
    async with AsyncUnitOfWork(async_factory):
        with pytest.raises(TransactionError, match="durable=True"):
            async with AsyncUnitOfWork(async_factory, durable=True):
                pass
    async with AsyncUnitOfWork(async_factory, durable=True) as alone:
        alone.add(User(id=2, name="durable"))
    assert _ids(async_engine) == [2]


def test_a_different_isolation_level_cannot_join(factory) -> None:
    with UnitOfWork(factory, isolation_level="SERIALIZABLE"):
        with pytest.raises(TransactionError, match="isolation_level='REPEATABLE READ'"):  # noqa: SIM117
            with UnitOfWork(factory, isolation_level="REPEATABLE READ"):
                pass
        with UnitOfWork(factory, isolation_level="SERIALIZABLE"), UnitOfWork(factory):
            pass  # the same level, or none, joins
    with UnitOfWork(factory):  # noqa: SIM117
        with pytest.raises(TransactionError, match="which was given none"):
            with UnitOfWork(factory, isolation_level="SERIALIZABLE"):
                pass


def test_run_inside_an_open_unit_of_work_joins_and_never_retries(factory, sync_engine) -> None:
    calls: list[int] = []

    def work(uow: UnitOfWork) -> None:
        calls.append(1)
        uow.add(User(id=10 + len(calls), name="work"))
        raise ConflictError

    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        with pytest.raises(ConflictError):
            UnitOfWork.run(factory, work, attempts=5, backoff=0)
        assert calls == [1]  # a conflict aborts the whole transaction: only the outer can retry
        assert UnitOfWork.run(factory, lambda uow: uow.session is outer.session)
    assert _ids(sync_engine) == [1]


async def test_run_inside_an_open_unit_of_work_joins_and_never_retries_async(
    async_factory, async_engine
) -> None:
    calls: list[int] = []

    async def work(uow: AsyncUnitOfWork) -> None:
        calls.append(1)
        uow.add(User(id=10 + len(calls), name="work"))
        raise ConflictError

    async with AsyncUnitOfWork(async_factory) as outer:
        outer.add(User(id=1, name="outer"))
        with pytest.raises(ConflictError):
            await AsyncUnitOfWork.run(async_factory, work, attempts=5, backoff=0)
        assert calls == [1]
    assert _ids(async_engine) == [1]


# --- callbacks ---------------------------------------------------------------------------------


def test_a_unit_of_work_opened_in_a_callback_commits_on_its_own(factory, sync_engine) -> None:
    seen: list[list[int]] = []

    def audit() -> None:
        with UnitOfWork(factory) as uow:  # the first one is no longer open: this is outermost
            uow.add(User(id=2, name="audit"))
        seen.append(_ids(sync_engine))

    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="work"))
        uow.on_commit(audit)
    assert seen == [[1, 2]]


def test_a_unit_of_work_opened_in_a_callback_of_commit_is_outermost(factory, sync_engine) -> None:
    seen: list[list[int]] = []

    def audit() -> None:
        with UnitOfWork(factory) as uow:
            uow.add(User(id=2, name="audit"))
        seen.append(_ids(sync_engine))

    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="work"))
        uow.on_commit(audit)
        uow.commit()  # the callback runs here, while this unit of work stays open
        assert seen == [[1, 2]]
        uow.add(User(id=3, name="more"))
    assert _ids(sync_engine) == [1, 2, 3]


async def test_a_unit_of_work_opened_in_a_callback_commits_on_its_own_async(
    async_factory, async_engine
) -> None:
    seen: list[list[int]] = []

    async def audit() -> None:
        async with AsyncUnitOfWork(async_factory) as uow:
            uow.add(User(id=2, name="audit"))
        seen.append(_ids(async_engine))

    async with AsyncUnitOfWork(async_factory) as uow:
        uow.add(User(id=1, name="work"))
        uow.on_commit(audit)
        await uow.commit()
        assert seen == [[1, 2]]
    assert seen == [[1, 2]]


# --- other threads and tasks are independent -------------------------------------------------


def test_another_thread_gets_its_own_transaction(factory, sync_engine) -> None:
    sessions: list[object] = []

    def elsewhere() -> None:
        with UnitOfWork(factory) as uow:
            sessions.append(uow.session)
            uow.add(User(id=2, name="other thread"))

    with UnitOfWork(factory) as outer:  # writes nothing before the thread: no lock is held
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(timeout=30)
        assert len(sessions) == 1
        assert sessions[0] is not outer.session
        assert _ids(sync_engine) == [2]  # committed on its own
        outer.add(User(id=1, name="outer"))
    assert _ids(sync_engine) == [1, 2]


async def test_a_thread_that_copied_the_context_gets_its_own_transaction(
    factory, sync_engine
) -> None:
    # asyncio.to_thread (and frameworks' thread pools) copy the context into the thread.
    def elsewhere() -> object:
        with UnitOfWork(factory) as uow:
            uow.add(User(id=2, name="other thread"))
            return uow.session

    with UnitOfWork(factory) as outer:
        other = await asyncio.to_thread(elsewhere)
        assert other is not outer.session
        assert _ids(sync_engine) == [2]


async def test_another_task_gets_its_own_transaction(async_factory, async_engine) -> None:
    async def elsewhere() -> object:
        async with AsyncUnitOfWork(async_factory) as uow:
            uow.add(User(id=2, name="other task"))
            return uow.session

    async with AsyncUnitOfWork(async_factory) as outer:
        other = await asyncio.create_task(elsewhere())  # copies this task's context
        assert other is not outer.session
        assert _ids(async_engine) == [2]
        outer.add(User(id=1, name="outer"))
    assert _ids(async_engine) == [1, 2]


# --- the whole transaction cannot be ended from inside a nested block --------------------------


def test_committing_the_session_inside_a_nested_block_is_refused(factory, sync_engine) -> None:
    with UnitOfWork(factory) as outer:
        outer.add(User(id=1, name="outer"))
        with pytest.raises(ValueError, match="decided against"), UnitOfWork(factory) as inner:
            with pytest.raises(TransactionError, match="committed from inside a nested block"):
                inner.session.commit()  # would commit the block's work before it decides
            inner.add(User(id=3, name="undone by the raise"))
            raise ValueError("decided against")
        with pytest.raises(ValueError, match="decided against"), outer.savepoint():
            with pytest.raises(TransactionError, match=r"refused inside uow\.savepoint"):
                outer.commit()
            with pytest.raises(TransactionError, match=r"refused inside uow\.savepoint"):
                outer.rollback()
            outer.add(User(id=4, name="undone by the raise"))
            raise ValueError("decided against")
    assert _ids(sync_engine) == [1]


async def test_committing_the_session_inside_a_nested_block_is_refused_async(
    async_factory, async_engine
) -> None:
    async with AsyncUnitOfWork(async_factory) as outer:
        outer.add(User(id=1, name="outer"))
        with pytest.raises(ValueError, match="decided against"):
            async with AsyncUnitOfWork(async_factory) as inner:
                with pytest.raises(TransactionError, match="committed from inside a nested"):
                    await inner.session.commit()
                inner.add(User(id=3, name="undone by the raise"))
                raise ValueError("decided against")
        with pytest.raises(ValueError, match="decided against"):
            async with outer.savepoint():
                with pytest.raises(TransactionError, match=r"refused inside uow\.savepoint"):
                    await outer.commit()
                outer.add(User(id=4, name="undone by the raise"))
                raise ValueError("decided against")
    assert _ids(async_engine) == [1]


def test_rolling_back_the_session_inside_a_nested_block_commits_nothing(
    factory, sync_engine
) -> None:
    # SQLAlchemy cannot be stopped before a rollback of the whole: the outer work is gone,
    # so the unit of work must not commit what follows as if it were the whole.
    ran: list[str] = []
    with pytest.raises(TransactionError, match="rolled back from inside a nested block"):  # noqa: SIM117
        with UnitOfWork(factory) as outer:
            outer.add(User(id=1, name="outer"))
            outer.on_commit(lambda: ran.append("never"))
            with UnitOfWork(factory) as inner:
                inner.session.rollback()
                inner.add(User(id=3, name="after the rollback"))
            outer.add(User(id=4, name="after the block"))
    assert _ids(sync_engine) == []
    assert ran == []
    assert sync_engine.pool.checkedout() == 0


async def test_rolling_back_the_session_inside_a_savepoint_commits_nothing_async(
    async_factory, async_engine
) -> None:
    with pytest.raises(TransactionError, match="rolled back from inside a nested block"):
        async with AsyncUnitOfWork(async_factory) as outer:
            outer.add(User(id=1, name="outer"))
            async with outer.savepoint():
                await outer.session.rollback()
                outer.add(User(id=3, name="after the rollback"))
    assert _ids(async_engine) == []
    assert async_engine.pool.checkedout() == 0


def test_a_savepoint_of_the_users_own_inside_a_block_still_releases(factory, sync_engine) -> None:
    with UnitOfWork(factory) as outer, UnitOfWork(factory) as inner:
        with inner.session.begin_nested():  # the user's own savepoint: released as usual
            inner.add(User(id=2, name="inner"))
        outer.add(User(id=1, name="outer"))
    assert _ids(sync_engine) == [1, 2]
