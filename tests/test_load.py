"""Many units of work at once on a small pool: all of them complete, and a full pool fails
clearly.

The pool has 10 connections and no overflow. Far more concurrent units of work than that wait
their turn and all commit; with a short `pool_timeout` while every connection is held, the next
one gets SQLAlchemy's `TimeoutError` naming the limit, and once everything is released the pool
is empty of checkouts and works again.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import exc, func, select

import ormkit
from ormkit import AsyncUnitOfWork, UnitOfWork
from tests.fresh import fresh_committed_ids
from tests.models import Base, Parent
from tests.stress import scale

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from sqlalchemy import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from sqlalchemy.orm import Session, sessionmaker

pytestmark = pytest.mark.reliability

POOL_SIZE = 10
SMALL_POOL = {"pool_size": POOL_SIZE, "max_overflow": 0}
TASKS = scale(200, 2_000)
THREADS = scale(50, 200)
HOLD = 0.002  # seconds each unit of work keeps its connection, as real work would
# SQLAlchemy's message when the pool stays full for pool_timeout seconds.
POOL_FULL = re.compile(
    rf"QueuePool limit of size {POOL_SIZE} overflow 0 reached, connection timed out, "
    r"timeout 0\.50"
)


@pytest.fixture
def small_pool_engine(sync_url: URL) -> Iterator[Engine]:
    engine = ormkit.create_engine(sync_url, **SMALL_POOL)
    Base.metadata.create_all(engine, tables=[Parent.__table__])
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
async def small_pool_async_engine(async_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = ormkit.create_async_engine(async_url, **SMALL_POOL)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all, tables=[Parent.__table__])
    try:
        yield engine
    finally:
        await engine.dispose()


# --- async: many tasks, one small pool ---------------------------------------------------------


async def insert_and_read(
    factory: async_sessionmaker[AsyncSession], engine: AsyncEngine, ident: int, seen: list[int]
) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        await uow.session.connection()  # the pool hands out a connection, or this task waits
        seen.append(engine.pool.checkedout())
        await asyncio.sleep(HOLD)
        uow.add(Parent(id=ident))
        await uow.flush()
        mine = select(func.count()).select_from(Parent).where(Parent.id == ident)
        assert await uow.session.scalar(mine) == 1
        assert await uow.session.scalar(select(func.count()).select_from(Parent)) >= 1


async def test_many_concurrent_async_units_of_work_all_commit_through_a_small_pool(
    small_pool_async_engine,
) -> None:
    engine = small_pool_async_engine
    factory = ormkit.create_async_session_factory(engine)
    seen: list[int] = []
    results = await asyncio.gather(
        *(insert_and_read(factory, engine, n, seen) for n in range(1, TASKS + 1)),
        return_exceptions=True,
    )
    assert [r for r in results if r is not None] == []
    assert max(seen) == POOL_SIZE  # the pool was full, and never more than full
    assert fresh_committed_ids(engine.url, "parent") == list(range(1, TASKS + 1))
    assert engine.pool.checkedout() == 0


async def test_a_full_pool_times_out_clearly_and_recovers(postgres_async_url) -> None:
    engine = ormkit.create_async_engine(postgres_async_url, **SMALL_POOL, pool_timeout=0.5)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all, tables=[Parent.__table__])
        factory = ormkit.create_async_session_factory(engine)
        release = asyncio.Event()

        async def hold(ident: int) -> None:
            async with AsyncUnitOfWork(factory) as uow:
                uow.add(Parent(id=ident))
                await uow.flush()
                await release.wait()

        holders = [asyncio.create_task(hold(n)) for n in range(1, POOL_SIZE + 1)]
        try:
            deadline = time.monotonic() + 10
            while engine.pool.checkedout() < POOL_SIZE:
                assert time.monotonic() < deadline, "the holders never filled the pool"
                await asyncio.sleep(0.005)
            started = time.monotonic()
            with pytest.raises(exc.TimeoutError, match=POOL_FULL):
                async with AsyncUnitOfWork(factory) as uow:
                    uow.add(Parent(id=999))
                    await uow.flush()
            assert time.monotonic() - started >= 0.45  # it waited its pool_timeout first
            assert engine.pool.checkedout() == POOL_SIZE  # it took nothing, broke nothing
        finally:
            release.set()
            await asyncio.gather(*holders)
        assert engine.pool.checkedout() == 0
        assert fresh_committed_ids(engine.url, "parent") == list(range(1, POOL_SIZE + 1))
        async with AsyncUnitOfWork(factory) as uow:  # the pool works again
            uow.add(Parent(id=999))
        assert fresh_committed_ids(engine.url, "parent") == [*range(1, POOL_SIZE + 1), 999]
        assert engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


# --- sync: many threads, one small pool --------------------------------------------------------


def insert_and_read_sync(
    factory: sessionmaker[Session],
    engine: Engine,
    ident: int,
    seen: list[int],
    start: threading.Barrier,
) -> None:
    start.wait(timeout=30)  # every thread asks the pool at once
    with UnitOfWork(factory) as uow:
        uow.session.connection()
        seen.append(engine.pool.checkedout())
        time.sleep(HOLD)
        uow.add(Parent(id=ident))
        uow.flush()
        mine = select(func.count()).select_from(Parent).where(Parent.id == ident)
        assert uow.session.scalar(mine) == 1
        assert (uow.session.scalar(select(func.count()).select_from(Parent)) or 0) >= 1


def test_many_threads_all_commit_through_a_small_pool(small_pool_engine) -> None:
    engine = small_pool_engine
    factory = ormkit.create_session_factory(engine)
    seen: list[int] = []
    start = threading.Barrier(THREADS)
    with ThreadPoolExecutor(max_workers=THREADS) as threads:
        futures = [
            threads.submit(insert_and_read_sync, factory, engine, n, seen, start)
            for n in range(1, THREADS + 1)
        ]
    assert [f.exception() for f in futures if f.exception() is not None] == []
    assert max(seen) == POOL_SIZE
    assert fresh_committed_ids(engine.url, "parent") == list(range(1, THREADS + 1))
    assert engine.pool.checkedout() == 0


def test_a_full_pool_times_out_clearly_and_recovers_with_threads(postgres_sync_url) -> None:
    engine = ormkit.create_engine(postgres_sync_url, **SMALL_POOL, pool_timeout=0.5)
    try:
        Base.metadata.create_all(engine, tables=[Parent.__table__])
        factory = ormkit.create_session_factory(engine)
        release = threading.Event()

        def hold(ident: int) -> None:
            with UnitOfWork(factory) as uow:
                uow.add(Parent(id=ident))
                uow.flush()
                release.wait(timeout=60)

        with ThreadPoolExecutor(max_workers=POOL_SIZE) as threads:
            try:
                holders = [threads.submit(hold, n) for n in range(1, POOL_SIZE + 1)]
                deadline = time.monotonic() + 10
                while engine.pool.checkedout() < POOL_SIZE:
                    assert time.monotonic() < deadline, "the holders never filled the pool"
                    time.sleep(0.005)
                started = time.monotonic()
                with pytest.raises(exc.TimeoutError, match=POOL_FULL), UnitOfWork(factory) as uow:
                    uow.add(Parent(id=999))
                    uow.flush()
                assert time.monotonic() - started >= 0.45
                assert engine.pool.checkedout() == POOL_SIZE
            finally:
                release.set()
        assert [h.exception() for h in holders] == [None] * POOL_SIZE
        assert engine.pool.checkedout() == 0
        assert fresh_committed_ids(engine.url, "parent") == list(range(1, POOL_SIZE + 1))
        with UnitOfWork(factory) as uow:
            uow.add(Parent(id=999))
        assert fresh_committed_ids(engine.url, "parent") == [*range(1, POOL_SIZE + 1), 999]
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()
