"""The session dies with the block: used late, it refuses, sends nothing and holds nothing.

A repository made by `uow.repository(...)` keeps the unit of work's session. After the block,
that session is closed for good (SQLAlchemy's `close_resets_only=False`): a late `add()` is not
silently dropped, a late `update_where()` is not run in a transaction nobody commits, and a
SQLite file is not left locked for every later writer.
"""

from __future__ import annotations

import pytest
from sqlalchemy import exc, select, text

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork, Repository, TransactionError, UnitOfWork
from ormkit.testing import count_queries
from tests.fresh import fresh_committed_ids
from tests.models import User

# SQLAlchemy's own refusal of a session closed for good, or ormkit's.
LATE = (exc.InvalidRequestError, TransactionError)


class Users(Repository[User, int]):
    pass


class AsyncUsers(AsyncRepository[User, int]):
    pass


def test_a_repository_used_after_its_block_refuses_everything(sync_url) -> None:
    engine = ormkit.create_engine(sync_url, sqlite_busy_timeout=0)  # a lock would fail at once
    User.metadata.create_all(engine)
    factory = ormkit.create_session_factory(engine)
    try:
        with UnitOfWork(factory) as uow:
            users = uow.repository(Users)
            users.add(User(id=1, name="in the block"))
            session = uow.session
        with count_queries(engine) as log:
            for late in (
                lambda: users.add(User(id=2, name="late")),
                lambda: users.update_where({"name": "late"}, User.id == 1),
                lambda: users.delete_where(User.id == 1),
                lambda: users.by_id(1),
                lambda: users.by_ids([1]),
                users.find,
                users.count,
                lambda: session.execute(select(User)),
                session.connection,
                session.commit,
            ):
                with pytest.raises(LATE, match=r"permanently closed|after the unit of work ended"):
                    late()
                    session.flush()  # an add() accepted would show here
        assert log.count == 0
        assert engine.pool.checkedout() == 0
        # Nothing holds the write lock: another writer gets it at once (busy timeout 0).
        with factory.begin() as other:
            other.add(User(id=3, name="next writer"))
        assert fresh_committed_ids(sync_url, "users") == [1, 3]
    finally:
        engine.dispose()


async def test_an_async_repository_used_after_its_block_refuses_everything(async_url) -> None:
    engine = ormkit.create_async_engine(async_url, sqlite_busy_timeout=0)
    async with engine.begin() as connection:
        await connection.run_sync(User.metadata.create_all)
    factory = ormkit.create_async_session_factory(engine)
    try:
        async with AsyncUnitOfWork(factory) as uow:
            users = uow.repository(AsyncUsers)
            users.add(User(id=1, name="in the block"))
            session = uow.session
        with count_queries(engine) as log:
            with pytest.raises(LATE, match="permanently closed"):
                users.add(User(id=2, name="late"))
            with pytest.raises(LATE, match="permanently closed"):
                await users.update_where({"name": "late"}, User.id == 1)
            with pytest.raises(LATE, match="permanently closed"):
                await users.by_id(1)
            with pytest.raises(LATE, match="permanently closed"):
                await users.find()
            with pytest.raises(LATE, match="permanently closed"):
                await session.execute(select(User))
            with pytest.raises(LATE, match="permanently closed"):
                await session.commit()
        assert log.count == 0
        assert engine.pool.checkedout() == 0
        async with factory.begin() as other:
            other.add(User(id=3, name="next writer"))
        assert fresh_committed_ids(async_url, "users") == [1, 3]
    finally:
        await engine.dispose()


def test_closing_the_session_inside_the_block_is_no_success(sync_engine) -> None:
    # close() discards the transaction: the block must not then report that it committed.
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []
    with pytest.raises(LATE), UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="discarded by close()"))
        uow.flush()
        uow.on_commit(lambda: ran.append("committed"))
        uow.session.close()
    assert fresh_committed_ids(sync_engine.url, "users") == []
    assert ran == []
    assert sync_engine.pool.checkedout() == 0


async def test_closing_the_async_session_inside_the_block_is_no_success(async_engine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    ran: list[str] = []
    with pytest.raises(LATE):
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(User(id=1, name="discarded by close()"))
            await uow.flush()
            uow.on_commit(lambda: ran.append("committed"))
            await uow.session.close()
    assert fresh_committed_ids(async_engine.url, "users") == []
    assert ran == []
    assert async_engine.pool.checkedout() == 0


def test_the_factory_keeps_making_sessions_that_reset_on_close(sync_engine) -> None:
    # Only a unit of work's session is closed for good; the factory's other sessions keep
    # SQLAlchemy's default (close() resets them, and they can be used again).
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory):
        pass
    session = factory()
    session.execute(text("SELECT 1"))
    session.close()
    session.execute(text("SELECT 1"))
    session.close()
    assert sync_engine.pool.checkedout() == 0
