"""AsyncUnitOfWork: the same rules as UnitOfWork (test_uow.py), plus cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import URL, event, exc, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import ormkit
from ormkit import AsyncUnitOfWork, TransactionError
from ormkit.testing import count_queries
from tests.conftest import POSTGRES_DRIVERS
from tests.helpers import committed_ids_async, three_generations
from tests.models import Base, Child, GrandChild, Parent, User


@pytest.fixture
def factory(async_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return ormkit.create_async_session_factory(async_engine)


# --- commit, rollback, close -----------------------------------------------------------------


async def test_clean_exit_commits_and_closes(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
    assert await committed_ids_async(async_engine, Parent) == [1]
    assert async_engine.pool.checkedout() == 0


async def test_exception_rolls_back_and_propagates_the_same_error(factory, async_engine) -> None:
    error = RuntimeError("boom")
    with pytest.raises(RuntimeError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            await uow.flush()
            raise error
    assert caught.value is error
    assert await committed_ids_async(async_engine, Parent) == []
    assert async_engine.pool.checkedout() == 0


async def test_explicit_flush_point_sets_server_generated_keys(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        parent = uow.add(Parent(name="server keyed"))
        await uow.flush()
        assert isinstance(parent.id, int)
        uow.add(Child(id=1, parent_id=parent.id))
    assert await committed_ids_async(async_engine, Child) == [1]


async def test_add_all_returns_a_list_and_delete_deletes(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        users = uow.add_all(User(id=n, name=f"u{n}") for n in (1, 2, 3))
        assert [u.id for u in users] == [1, 2, 3]
    async with AsyncUnitOfWork(factory) as uow:
        await uow.delete(await uow.session.get(User, 2))
    assert await committed_ids_async(async_engine, User) == [1, 3]


# --- foreign-key ordering without relationship() ---------------------------------------------


async def test_plain_sqlalchemy_session_inserts_the_child_first(async_engine) -> None:
    async with AsyncSession(async_engine) as session:
        session.add_all([Parent(id=10), Child(id=1, parent_id=10)])
        with pytest.raises(exc.IntegrityError):
            await session.commit()


async def test_child_first_rows_three_tables_deep_commit(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add_all(three_generations(40))
    assert len(await committed_ids_async(async_engine, GrandChild)) == 40
    assert len(await committed_ids_async(async_engine, Child)) == 40
    assert len(await committed_ids_async(async_engine, Parent)) == 40


async def test_fk_ordered_flush_batches_each_table(factory) -> None:
    with count_queries(factory) as log:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all(three_generations(40))
    tables = [sql.split()[2] for sql in log.statements]
    assert tables == ["parent", "child", "grandchild"]


async def test_deletes_in_any_order_delete_children_first(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add_all(three_generations(40))
    async with AsyncUnitOfWork(factory) as uow:
        rows = [
            *(await uow.session.scalars(select(Parent))),
            *(await uow.session.scalars(select(Child))),
            *(await uow.session.scalars(select(GrandChild))),
        ]
        random.Random(7).shuffle(rows)
        for row in rows:
            await uow.delete(row)
    assert await committed_ids_async(async_engine, Parent) == []
    assert await committed_ids_async(async_engine, GrandChild) == []


async def test_autoflush_before_a_query_respects_fk_order(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(GrandChild(id=1, child_id=1))
        uow.add(Child(id=1, parent_id=1))
        uow.add(Parent(id=1))
        with count_queries(uow.session) as log:
            assert (await uow.session.scalars(select(GrandChild.id))).all() == [1]
        assert [sql.split()[0] for sql in log.statements] == ["INSERT"] * 3 + ["SELECT"]
    assert await committed_ids_async(async_engine, GrandChild) == [1]


# --- savepoints ------------------------------------------------------------------------------


async def test_savepoint_rolls_back_to_itself_and_the_outer_work_survives(
    factory, async_engine
) -> None:
    ran: list[str] = []
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: ran.append("outer"))
        with pytest.raises(RuntimeError):
            async with uow.savepoint():
                uow.add(Parent(id=2))
                await uow.flush()
                uow.on_commit(lambda: ran.append("inner"))
                raise RuntimeError
        async with uow.savepoint():
            uow.add(Parent(id=3))
            uow.on_commit(lambda: ran.append("kept"))
    assert await committed_ids_async(async_engine, Parent) == [1, 3]
    assert ran == ["outer", "kept"]


async def test_failed_flush_inside_a_savepoint_keeps_the_rest(factory, async_engine) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(User(id=1, name="first"))
        with pytest.raises(exc.IntegrityError):
            async with uow.savepoint():
                uow.add(User(id=1, name="duplicate"))
                await uow.flush()
        uow.add(User(id=2, name="second"))
    assert await committed_ids_async(async_engine, User) == [1, 2]


# --- on_commit -------------------------------------------------------------------------------


async def test_plain_and_async_callbacks_run_in_order_after_commit(factory, async_engine) -> None:
    seen: list[object] = []

    async def look() -> None:
        seen.append(await committed_ids_async(async_engine, Parent))

    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(look)
        uow.on_commit(lambda: seen.append("plain"))
        assert seen == []
    assert seen == [[1], "plain"]


async def test_callbacks_never_run_on_rollback(factory) -> None:
    ran: list[str] = []
    with pytest.raises(KeyError):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            uow.on_commit(lambda: ran.append("no"))
            raise KeyError
    assert ran == []


async def test_a_raising_callback_keeps_the_commit_and_the_others_run(
    factory, async_engine, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    async def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="first"):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            uow.on_commit(lambda: fail("first"))
            uow.on_commit(lambda: ran.append("still ran"))
            uow.on_commit(lambda: fail("second"))
    assert ran == ["still ran"]
    assert await committed_ids_async(async_engine, Parent) == [1]
    failures = [r for r in caplog.records if r.name == "ormkit" and r.exc_info]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["second"]


# --- explicit commit and rollback ------------------------------------------------------------


async def test_commit_inside_the_block_is_durable_and_work_goes_on(factory, async_engine) -> None:
    ran: list[str] = []
    with pytest.raises(RuntimeError):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            uow.on_commit(lambda: ran.append("committed"))
            await uow.commit()
            assert ran == ["committed"]
            uow.add(Parent(id=2))
            await uow.flush()
            raise RuntimeError
    assert await committed_ids_async(async_engine, Parent) == [1]
    assert ran == ["committed"]


async def test_rollback_drops_the_work_and_its_callbacks(factory, async_engine) -> None:
    ran: list[str] = []
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: ran.append("dropped"))
        await uow.flush()
        await uow.rollback()
        uow.add(Parent(id=2))
        uow.on_commit(lambda: ran.append("kept"))
    assert await committed_ids_async(async_engine, Parent) == [2]
    assert ran == ["kept"]


# --- a swallowed failed flush never commits --------------------------------------------------


async def test_swallowed_failed_flush_commits_nothing(factory, async_engine) -> None:
    with pytest.raises(TransactionError, match="a flush failed") as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(User(id=1, name="kept?"))
            await uow.flush()
            uow.add(User(id=1, name="duplicate"))
            try:
                await uow.flush()
            except exc.IntegrityError:
                pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    assert await committed_ids_async(async_engine, User) == []
    assert async_engine.pool.checkedout() == 0


async def test_swallowed_failed_autoflush_commits_nothing(factory, async_engine) -> None:
    with pytest.raises(TransactionError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            await uow.flush()
            uow.add(Child(id=1, parent_id=404))
            try:
                await uow.session.scalars(select(Child))
            except exc.IntegrityError:
                pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    assert await committed_ids_async(async_engine, Parent) == []


async def test_swallowed_failed_statement_commits_nothing(factory, async_engine) -> None:
    ran: list[str] = []
    with pytest.raises(TransactionError, match="a statement failed") as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all([User(id=1, name="a"), User(id=2, name="b")])
            await uow.flush()
            uow.on_commit(lambda: ran.append("no"))
            try:
                await uow.session.execute(text("UPDATE users SET id = 1 WHERE id = 2"))
            except exc.IntegrityError:
                pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    assert await committed_ids_async(async_engine, User) == []
    assert ran == []


async def test_a_later_savepoint_does_not_forget_a_swallowed_statement_error(
    factory, async_engine
) -> None:
    with pytest.raises((TransactionError, exc.DBAPIError)):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all([User(id=1, name="a"), User(id=2, name="b")])
            await uow.flush()
            try:
                await uow.session.execute(text("UPDATE users SET id = 1 WHERE id = 2"))
            except exc.IntegrityError:
                pass
            async with uow.savepoint():
                uow.add(User(id=3, name="c"))
    assert await committed_ids_async(async_engine, User) == []


async def test_a_flush_error_caught_inside_a_savepoint_drops_its_callbacks(
    factory, async_engine
) -> None:
    ran: list[str] = []
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.on_commit(lambda: ran.append("outer"))
        async with uow.savepoint():
            uow.on_commit(lambda: ran.append("inner"))
            uow.add(User(id=1, name="duplicate"))
            try:
                await uow.flush()
            except exc.IntegrityError:
                pass
    assert await committed_ids_async(async_engine, User) == [1]
    assert ran == ["outer"]


async def test_a_cancellation_during_commit_keeps_the_commit_and_its_callbacks(
    factory, async_engine
) -> None:
    ran: list[str] = []
    task: asyncio.Task[None] | None = None

    def cancel_now(_session: object) -> None:
        assert task is not None
        task.cancel()  # arrives while the commit is finishing

    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            uow.on_commit(lambda: ran.append("committed"))
            event.listen(uow.session.sync_session, "after_commit", cancel_now)

    task = asyncio.create_task(work())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await committed_ids_async(async_engine, Parent) == [1]
    assert ran == ["committed"]  # the commit happened, so its callbacks ran
    assert async_engine.pool.checkedout() == 0


# --- cancellation ----------------------------------------------------------------------------


async def test_cancelled_task_rolls_back_and_returns_the_connection(factory, async_engine) -> None:
    flushed = asyncio.Event()

    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            await uow.flush()
            flushed.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(work())
    await flushed.wait()
    assert async_engine.pool.checkedout() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert async_engine.pool.checkedout() == 0
    assert await committed_ids_async(async_engine, Parent) == []


async def test_timeout_rolls_back_and_returns_the_connection(factory, async_engine) -> None:
    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            await uow.flush()
            await asyncio.sleep(30)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(work(), timeout=0.2)
    assert async_engine.pool.checkedout() == 0
    assert await committed_ids_async(async_engine, Parent) == []


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
async def test_cancelled_mid_query_rolls_back_and_returns_the_connection(
    driver: str, postgres_url: URL
) -> None:
    # A server-side sleep is a query to cancel in the middle of; SQLite has none that stops.
    engine = ormkit.create_async_engine(postgres_url.set(drivername=POSTGRES_DRIVERS[driver]))
    factory = ormkit.create_async_session_factory(engine)
    started = asyncio.Event()

    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(User(id=1, name="never committed"))
            await uow.session.run_sync(lambda s: Base.metadata.create_all(s.connection()))
            await uow.flush()
            started.set()
            await uow.session.execute(text("select pg_sleep(30)"))

    try:
        task = asyncio.create_task(work())
        await started.wait()
        await asyncio.sleep(0.2)  # the sleep is running on the server now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.pool.checkedout() == 0
        # The pool still works, and nothing of the cancelled work was committed (not even the
        # tables, created inside the cancelled transaction).
        async with AsyncUnitOfWork(factory) as uow:
            tables = await uow.session.scalar(
                text("select count(*) from pg_tables where tablename = 'users'")
            )
        assert tables == 0
    finally:
        await engine.dispose()


# --- misuse ----------------------------------------------------------------------------------


async def test_members_before_the_block_say_to_open_it(factory) -> None:
    uow = AsyncUnitOfWork(factory)
    with pytest.raises(TransactionError, match=r"before the unit of work was opened.*async with"):
        await uow.flush()
    with pytest.raises(TransactionError, match="before the unit of work was opened"):
        uow.add(Parent(id=1))
    with pytest.raises(TransactionError, match="before the unit of work was opened"):
        async with uow.savepoint():
            pass


async def test_members_after_the_block_say_to_open_a_new_one(factory) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        pass
    with pytest.raises(TransactionError, match="after the unit of work ended"):
        await uow.commit()
    with pytest.raises(TransactionError, match="after the unit of work ended"):
        await uow.delete(Parent(id=1))


async def test_entering_twice_or_again_is_refused(factory, async_engine) -> None:
    uow = AsyncUnitOfWork(factory)
    async with uow:
        uow.add(Parent(id=1))
        with pytest.raises(TransactionError, match="already open"):
            async with uow:
                pass
    with pytest.raises(TransactionError, match="cannot be reopened"):
        async with uow:
            pass
    assert await committed_ids_async(async_engine, Parent) == [1]


def test_a_sync_factory_is_refused_with_a_pointer_to_the_twin() -> None:
    factory = ormkit.create_session_factory("sqlite://")
    with pytest.raises(ormkit.InvalidArgumentError, match="use UnitOfWork"):
        AsyncUnitOfWork(factory)  # type: ignore[arg-type]


# --- isolation level -------------------------------------------------------------------------


async def _isolation(session: AsyncSession) -> str:
    if session.bind.dialect.name == "sqlite":
        value = await session.scalar(text("PRAGMA read_uncommitted"))
        return "read uncommitted" if value else "serializable"
    return str(await session.scalar(text("SHOW transaction_isolation")))


async def test_isolation_level_holds_for_every_transaction(factory, async_engine) -> None:
    level = "READ UNCOMMITTED" if async_engine.dialect.name == "sqlite" else "SERIALIZABLE"
    async with AsyncUnitOfWork(factory, isolation_level=level) as uow:
        assert await _isolation(uow.session) == level.lower()
        uow.add(Parent(id=1))
        await uow.commit()
        assert await _isolation(uow.session) == level.lower()
        uow.add(Parent(id=2))
    assert await committed_ids_async(async_engine, Parent) == [1, 2]
    async with AsyncUnitOfWork(factory) as uow:
        assert await _isolation(uow.session) != level.lower()
