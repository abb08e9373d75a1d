"""A thousand units of work of every ending, and not one connection or row astray.

Each run mixes clean exits, errors raised in the block, swallowed failed flushes (ormkit then
raises TransactionError), savepoints rolled back, explicit commits mid-block and, for async,
cancellations. A model keeps which rows must be committed and which `on_commit` callbacks must
have run; after every unit of work no connection may be checked out, and at the end the table
must hold exactly the model's rows, read through a brand-new connection.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import exc, text

import ormkit
from ormkit import AsyncUnitOfWork, TransactionError, UnitOfWork
from tests.fresh import fresh_committed_ids
from tests.models import Parent
from tests.stress import scale

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from sqlalchemy.orm import Session, sessionmaker

pytestmark = pytest.mark.reliability

UNITS_OF_WORK = scale(1_000, 10_000)
SEED = 8  # fixed, so a failure names its step and replays the same run


class PlannedError(Exception):
    """Raised inside a block on purpose."""


@dataclass
class Model:
    """What must be true: the committed ids, and whose callbacks ran (once each)."""

    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    committed: list[int] = field(default_factory=list)
    callbacks: list[int] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    cancelled_while_waiting: int = 0  # cancellations that struck the long wait itself

    def new(self) -> int:
        """An id never used before."""
        return next(self.ids)

    def a_committed_id(self) -> int:
        return self.rng.choice(self.committed)

    def on_commit(self, ident: int) -> Callable[[], None]:
        """The on_commit callback of the row `ident`: it records that it ran."""
        return lambda: self.callbacks.append(ident)


# --- sync: each function runs one unit of work and returns the ids it must have committed ----


def clean_exit(factory: sessionmaker[Session], model: Model) -> list[int]:
    ids = [model.new(), model.new()]
    with UnitOfWork(factory) as uow:
        for ident in ids:
            uow.add(Parent(id=ident))
            uow.on_commit(model.on_commit(ident))
    return ids


def error_in_the_block(factory: sessionmaker[Session], model: Model) -> list[int]:
    row = model.new()
    with pytest.raises(PlannedError), UnitOfWork(factory) as uow:
        uow.add(Parent(id=row))
        uow.on_commit(model.on_commit(row))
        uow.flush()
        raise PlannedError
    return []


def swallowed_failed_flush(factory: sessionmaker[Session], model: Model) -> list[int]:
    row, duplicate = model.new(), model.a_committed_id()
    with pytest.raises(TransactionError) as caught, UnitOfWork(factory) as uow:
        uow.add(Parent(id=row))
        uow.on_commit(model.on_commit(row))
        uow.flush()
        uow.add(Parent(id=duplicate))
        try:
            uow.flush()
        except exc.IntegrityError:
            pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    return []


def savepoint_rolled_back(factory: sessionmaker[Session], model: Model) -> list[int]:
    before, inside, after = model.new(), model.new(), model.new()
    failed_flush = model.rng.random() < 0.5
    with UnitOfWork(factory) as uow:
        uow.add(Parent(id=before))
        uow.on_commit(model.on_commit(before))
        with pytest.raises(exc.IntegrityError if failed_flush else PlannedError), uow.savepoint():
            uow.add(Parent(id=inside))
            uow.on_commit(model.on_commit(inside))  # dropped with the savepoint
            if failed_flush:
                uow.add(Parent(id=model.a_committed_id()))
            uow.flush()
            raise PlannedError
        uow.add(Parent(id=after))
        uow.on_commit(model.on_commit(after))
    return [before, after]


def commit_mid_block(factory: sessionmaker[Session], model: Model) -> list[int]:
    first, second = model.new(), model.new()
    fails = model.rng.random() < 0.5
    with pytest.raises(PlannedError) if fails else nullcontext(), UnitOfWork(factory) as uow:
        uow.add(Parent(id=first))
        uow.on_commit(model.on_commit(first))
        uow.commit()
        uow.add(Parent(id=second))
        uow.on_commit(model.on_commit(second))
        uow.flush()
        if fails:
            raise PlannedError
    return [first] if fails else [first, second]


SYNC_KINDS = {
    clean_exit: 30,
    error_in_the_block: 15,
    swallowed_failed_flush: 15,
    savepoint_rolled_back: 20,
    commit_mid_block: 20,
}


def test_mixed_endings_leak_no_connection_and_commit_exactly_the_model(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    model = Model()
    model.committed += clean_exit(factory, model)  # a committed id for the duplicates
    kinds = model.rng.choices(list(SYNC_KINDS), weights=list(SYNC_KINDS.values()), k=UNITS_OF_WORK)
    for step, kind in enumerate(kinds):
        model.committed += kind(factory, model)
        assert sync_engine.pool.checkedout() == 0, f"{kind.__name__} at step {step} leaked"
    assert fresh_committed_ids(sync_engine.url, "parent") == sorted(model.committed)
    assert model.callbacks == model.committed  # each committed row's callback, once, in order


# --- async: the same endings, plus cancellations ---------------------------------------------


async def clean_exit_async(factory: async_sessionmaker[AsyncSession], model: Model) -> list[int]:
    ids = [model.new(), model.new()]
    async with AsyncUnitOfWork(factory) as uow:
        for ident in ids:
            uow.add(Parent(id=ident))
            uow.on_commit(model.on_commit(ident))
    return ids


async def error_in_the_block_async(
    factory: async_sessionmaker[AsyncSession], model: Model
) -> list[int]:
    row = model.new()
    with pytest.raises(PlannedError):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=row))
            uow.on_commit(model.on_commit(row))
            await uow.flush()
            raise PlannedError
    return []


async def swallowed_failed_flush_async(
    factory: async_sessionmaker[AsyncSession], model: Model
) -> list[int]:
    row, duplicate = model.new(), model.a_committed_id()
    with pytest.raises(TransactionError) as caught:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=row))
            uow.on_commit(model.on_commit(row))
            await uow.flush()
            uow.add(Parent(id=duplicate))
            try:
                await uow.flush()
            except exc.IntegrityError:
                pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    return []


async def savepoint_rolled_back_async(
    factory: async_sessionmaker[AsyncSession], model: Model
) -> list[int]:
    before, inside, after = model.new(), model.new(), model.new()
    failed_flush = model.rng.random() < 0.5
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=before))
        uow.on_commit(model.on_commit(before))
        with pytest.raises(exc.IntegrityError if failed_flush else PlannedError):
            async with uow.savepoint():
                uow.add(Parent(id=inside))
                uow.on_commit(model.on_commit(inside))
                if failed_flush:
                    uow.add(Parent(id=model.a_committed_id()))
                await uow.flush()
                raise PlannedError
        uow.add(Parent(id=after))
        uow.on_commit(model.on_commit(after))
    return [before, after]


async def commit_mid_block_async(
    factory: async_sessionmaker[AsyncSession], model: Model
) -> list[int]:
    first, second = model.new(), model.new()
    fails = model.rng.random() < 0.5
    with pytest.raises(PlannedError) if fails else nullcontext():
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=first))
            uow.on_commit(model.on_commit(first))
            await uow.commit()
            uow.add(Parent(id=second))
            uow.on_commit(model.on_commit(second))
            await uow.flush()
            if fails:
                raise PlannedError
    return [first] if fails else [first, second]


async def wait_long(session: AsyncSession, model: Model) -> None:
    """Never ends by itself; on PostgreSQL it starts with a server-side sleep to cancel.

    The sleep is short: a cancel request that reaches the server while it is still reading
    the query is ignored, and psycopg then waits for the query to end.
    """
    try:
        if session.bind.dialect.name == "postgresql":
            await session.execute(text("SELECT pg_sleep(0.2)"))
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        model.cancelled_while_waiting += 1
        raise


async def timed_out(factory: async_sessionmaker[AsyncSession], model: Model) -> list[int]:
    # The timeout may strike anywhere before the block's end (the block cannot finish), so
    # nothing of it is ever committed: no explicit commit here, whose outcome would depend on
    # where the cancellation landed.
    row = model.new()

    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=row))
            uow.on_commit(model.on_commit(row))
            await uow.flush()
            await wait_long(uow.session, model)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(work(), timeout=model.rng.uniform(0.001, 0.005))
    return []


async def cancelled_after_a_commit(
    factory: async_sessionmaker[AsyncSession], model: Model
) -> list[int]:
    first, second = model.new(), model.new()
    waiting = asyncio.Event()

    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=first))
            uow.on_commit(model.on_commit(first))
            await uow.commit()
            uow.add(Parent(id=second))
            uow.on_commit(model.on_commit(second))
            await uow.flush()
            waiting.set()
            await wait_long(uow.session, model)

    task = asyncio.create_task(work())
    await waiting.wait()
    await asyncio.sleep(model.rng.uniform(0, 0.002))  # sometimes before the sleep is sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return [first]


ASYNC_KINDS: dict[Callable[..., Awaitable[list[int]]], int] = {
    clean_exit_async: 25,
    error_in_the_block_async: 12,
    swallowed_failed_flush_async: 12,
    savepoint_rolled_back_async: 17,
    commit_mid_block_async: 17,
    timed_out: 6,
    cancelled_after_a_commit: 6,
}


async def test_mixed_async_endings_and_cancellations_leak_nothing_and_commit_the_model(
    async_engine,
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    model = Model()
    model.committed += await clean_exit_async(factory, model)
    kinds = model.rng.choices(
        list(ASYNC_KINDS), weights=list(ASYNC_KINDS.values()), k=UNITS_OF_WORK
    )
    for step, kind in enumerate(kinds):
        model.committed += await kind(factory, model)
        assert async_engine.pool.checkedout() == 0, f"{kind.__name__} at step {step} leaked"
    assert fresh_committed_ids(async_engine.url, "parent") == sorted(model.committed)
    assert model.callbacks == model.committed
    assert model.cancelled_while_waiting > 0  # some struck in the middle of the long wait
