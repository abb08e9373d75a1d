"""AsyncUnitOfWork.run: the claims of test_retry.py on asyncpg, psycopg async and aiosqlite."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import exc, insert, select, text

import ormkit
from ormkit import AsyncUnitOfWork, InvalidArgumentError
from ormkit._retry import transient_reason
from tests.helpers import committed_ids_async
from tests.models import Base, Parent, User

if TYPE_CHECKING:
    from pathlib import Path

FAST = {"backoff": 0.001, "max_backoff": 0.05}
SERIALIZATION_FAILURE = "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = '40001'; END $$"


@pytest.fixture
def factory(async_engine):
    return ormkit.create_async_session_factory(async_engine)


@pytest.fixture
def pg_factory(postgres_async_engine):
    return ormkit.create_async_session_factory(postgres_async_engine)


async def test_run_returns_what_work_returns_and_commits(factory, async_engine) -> None:
    async def work(uow: AsyncUnitOfWork) -> int:
        parent = uow.add(Parent(id=7))
        await uow.flush()
        return parent.id

    assert await AsyncUnitOfWork.run(factory, work) == 7
    assert await committed_ids_async(async_engine, Parent) == [7]


async def test_other_errors_are_raised_after_one_call(factory) -> None:
    calls: list[int] = []

    async def work(uow: AsyncUnitOfWork) -> None:
        calls.append(1)
        uow.add(User(id=1, name="a"))
        await uow.flush()
        uow.add(User(id=1, name="duplicate"))
        await uow.flush()

    with pytest.raises(exc.IntegrityError):
        await AsyncUnitOfWork.run(factory, work, attempts=5, **FAST)
    assert len(calls) == 1


async def test_a_permanent_serialization_failure_is_raised_after_every_attempt(
    pg_factory, postgres_async_engine
) -> None:
    calls: list[int] = []

    async def work(uow: AsyncUnitOfWork) -> None:
        calls.append(1)
        uow.add(Parent(id=len(calls)))
        await uow.session.execute(text(SERIALIZATION_FAILURE))

    with pytest.raises(exc.DBAPIError) as caught:
        await AsyncUnitOfWork.run(pg_factory, work, attempts=4, **FAST)
    assert len(calls) == 4
    assert transient_reason(caught.value) == "40001"
    assert await committed_ids_async(postgres_async_engine, Parent) == []


async def test_concurrent_increments_under_serializable_all_land(pg_factory) -> None:
    async with AsyncUnitOfWork(pg_factory) as uow:
        uow.add(Parent(id=1, name="0"))
    workers = 12
    everyone_read = asyncio.Barrier(workers) if hasattr(asyncio, "Barrier") else None
    ran: list[int] = []
    calls: list[int] = []

    async def increment(worker: int) -> None:
        first = [True]

        async def work(uow: AsyncUnitOfWork) -> None:
            calls.append(worker)
            counter = await uow.session.get(Parent, 1)
            assert counter is not None
            if first[0]:
                first[0] = False
                if everyone_read is not None:
                    await everyone_read.wait()  # all read before anyone writes: real conflicts
                else:
                    await asyncio.sleep(0.2)
            counter.name = str(int(counter.name) + 1)
            uow.on_commit(lambda: ran.append(worker))

        await AsyncUnitOfWork.run(
            pg_factory, work, attempts=50, isolation_level="SERIALIZABLE", **FAST
        )

    await asyncio.gather(*(increment(n) for n in range(workers)))
    async with pg_factory() as session:
        assert await session.scalar(select(Parent.name).where(Parent.id == 1)) == "12"
    assert sorted(ran) == list(range(workers))
    assert len(calls) > workers


async def test_a_real_deadlock_is_resolved_by_retrying(pg_factory) -> None:
    async with AsyncUnitOfWork(pg_factory) as uow:
        uow.add_all([Parent(id=1, name="a"), Parent(id=2, name="b")])
    both_hold_one = asyncio.Event()
    holding: list[str] = []
    calls: list[str] = []
    update = text("UPDATE parent SET name = name || :n WHERE id = :id")

    async def update_in_order(name: str, first_id: int, second_id: int) -> None:
        async def work(uow: AsyncUnitOfWork) -> None:
            calls.append(name)
            await uow.session.execute(update, {"n": name, "id": first_id})
            if calls.count(name) == 1:
                holding.append(name)
                if len(holding) == 2:
                    both_hold_one.set()
                await asyncio.wait_for(both_hold_one.wait(), 30)
            await uow.session.execute(update, {"n": name, "id": second_id})

        await AsyncUnitOfWork.run(pg_factory, work, attempts=5, **FAST)

    await asyncio.gather(update_in_order("X", 1, 2), update_in_order("Y", 2, 1))
    # The victim ran again, at least once: its retry can meet the other transaction again (it
    # may take the first row before the survivor does) and be chosen once more, so "exactly
    # once" would only hold on a quiet machine. Each committed exactly once: see the names.
    assert len(calls) >= 3
    async with pg_factory() as session:
        names = {row.id: row.name for row in await session.execute(select(Parent.id, Parent.name))}
    assert sorted(names[1][1:]) == ["X", "Y"]
    assert sorted(names[2][1:]) == ["X", "Y"]


async def test_aiosqlite_busy_is_retried(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}"
    engine = ormkit.create_async_engine(url, sqlite_busy_timeout=0.01)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        factory = ormkit.create_async_session_factory(engine)
        holder = await engine.connect()
        await holder.execute(insert(Parent).values(id=1))  # holds the write lock
        calls: list[int] = []

        async def work(uow: AsyncUnitOfWork) -> None:
            calls.append(1)
            if len(calls) == 3:
                await holder.rollback()  # the other writer finishes while we back off
            uow.add(Parent(id=2))
            await uow.flush()

        await AsyncUnitOfWork.run(factory, work, attempts=20, backoff=0.01, max_backoff=0.05)
        await holder.close()
        assert len(calls) >= 3
        assert await committed_ids_async(engine, Parent) == [2]
    finally:
        await engine.dispose()


async def test_nothing_is_retried_after_a_commit(pg_factory, postgres_async_engine) -> None:
    calls: list[int] = []

    async def work(uow: AsyncUnitOfWork) -> None:
        calls.append(1)
        uow.add(Parent(id=1))
        await uow.commit()
        await uow.session.execute(text(SERIALIZATION_FAILURE))

    with pytest.raises(exc.DBAPIError):
        await AsyncUnitOfWork.run(pg_factory, work, attempts=5, **FAST)
    assert calls == [1]
    assert await committed_ids_async(postgres_async_engine, Parent) == [1]


async def test_bad_options_are_refused_before_anything_runs(factory) -> None:
    calls: list[int] = []

    async def work(_uow: AsyncUnitOfWork) -> None:
        calls.append(1)

    with pytest.raises(InvalidArgumentError, match="attempts must be an int >= 1"):
        await AsyncUnitOfWork.run(factory, work, attempts=0)
    assert calls == []
