"""Read replicas on the embedded default: a SQLite primary and a copy of its file.

A copy is a replica that never catches up by itself, so what a unit of work reads says where it
read: the replica has the old value, the primary the new one. Writes in a read-only unit of work
are refused before any SQL (ormkit) or by the replica's connection (`PRAGMA query_only`).
PostgreSQL, with a real primary and hot standby, is tests/test_replicas_postgres.py.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import URL, String, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    InvalidArgumentError,
    Repository,
    TransactionError,
    UnitOfWork,
)
from ormkit.testing import assert_queries

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "replica_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


class Items(Repository[Item, int]):
    pass


class AsyncItems(AsyncRepository[Item, int]):
    pass


class Files:
    """A primary file with one row, and a replica: a copy of it made then."""

    def __init__(self, directory: Path) -> None:
        self.primary = directory / "primary.db"
        self.replica = directory / "replica.db"
        engine = ormkit.create_engine(URL.create("sqlite+pysqlite", database=str(self.primary)))
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(insert(Item), [{"id": 1, "name": "old"}])
        engine.dispose()
        shutil.copy(self.primary, self.replica)

    def url(self, path: Path, driver: str = "sqlite+pysqlite") -> URL:
        return URL.create(driver, database=str(path))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@pytest.fixture
def factory(files: Files) -> Iterator[Any]:
    replica = ormkit.create_engine(files.url(files.replica))
    made = ormkit.create_session_factory(
        files.url(files.primary), replicas=[replica], replica_retry_after=0.2
    )
    yield made
    for engine in (made.kw["bind"], replica):
        assert engine.pool.checkedout() == 0
        engine.dispose()


def _update_on_the_primary(factory: Any) -> str | None:
    with UnitOfWork(factory) as uow:
        item = uow.repository(Items).by_id_or_raise(1)
        item.name = "new"
    return uow.commit_token


def test_a_read_only_unit_of_work_reads_from_the_replica(factory: Any) -> None:
    token = _update_on_the_primary(factory)
    with UnitOfWork(factory, read_only=True) as uow:
        assert uow.repository(Items).by_id_or_raise(1).name == "old"  # the copy
    with UnitOfWork(factory) as uow:
        assert uow.repository(Items).by_id_or_raise(1).name == "new"  # the primary
    assert token == "sqlite:primary"


def test_after_a_token_the_read_is_on_the_primary(factory: Any) -> None:
    token = _update_on_the_primary(factory)
    with UnitOfWork(factory, read_only=True, after=token) as uow:
        assert uow.repository(Items).by_id_or_raise(1).name == "new"
        with pytest.raises(TransactionError, match="read-only unit of work"):
            uow.repository(Items).by_id(1, for_update=True)
    assert uow.commit_token is None


def test_writes_in_a_read_only_unit_of_work_are_refused_before_any_sql(factory: Any) -> None:
    with UnitOfWork(factory, read_only=True) as uow:
        items = uow.repository(Items)
        item = items.by_id_or_raise(1)
        with assert_queries(factory, 0):
            item.name = "changed"
            with pytest.raises(TransactionError, match="a flush with pending changes is refused"):
                uow.flush()
            with pytest.raises(TransactionError, match=r"by_id\(for_update=True\) is refused"):
                items.by_id(1, for_update=True)
            with pytest.raises(TransactionError, match=r"update_where\(\) is refused"):
                items.update_where({"name": "x"}, Item.id == 1)
            with pytest.raises(TransactionError, match=r"delete_where\(\) is refused"):
                items.delete_where(Item.id == 1)
        uow.session.expunge(item)
    with UnitOfWork(factory, read_only=True) as uow:
        # What ormkit does not see, the replica's connection refuses: PRAGMA query_only.
        with pytest.raises(OperationalError, match="readonly database"):
            uow.session.execute(insert(Item).values(id=2, name="sneaked"))
        uow.session.rollback()
    with UnitOfWork(factory) as uow:
        assert [i.name for i in uow.repository(Items).find()] == ["old"]


async def test_the_async_twin_reads_from_the_replica(files: Files) -> None:
    replica = ormkit.create_async_engine(files.url(files.replica, "sqlite+aiosqlite"))
    factory = ormkit.create_async_session_factory(
        files.url(files.primary, "sqlite+aiosqlite"), replicas=[replica]
    )
    async with AsyncUnitOfWork(factory) as uow:
        (await uow.repository(AsyncItems).by_id_or_raise(1)).name = "new"
    async with AsyncUnitOfWork(factory, read_only=True) as reader:
        assert (await reader.repository(AsyncItems).by_id_or_raise(1)).name == "old"
    async with AsyncUnitOfWork(factory, read_only=True, after=uow.commit_token) as reader:
        item = await reader.repository(AsyncItems).by_id_or_raise(1)
        assert item.name == "new"
        item.name = "changed"
        with pytest.raises(TransactionError, match="a flush with pending changes is refused"):
            await reader.flush()
        reader.session.expunge(item)
    for engine in (factory.kw["bind"], replica):
        assert engine.sync_engine.pool.checkedout() == 0
        await engine.dispose()


def test_a_replica_that_fails_is_skipped_then_tried_again(
    files: Files, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no such directory" / "replica.db"  # SQLite cannot open it
    gone = ormkit.create_engine(files.url(missing))
    factory = ormkit.create_session_factory(
        files.url(files.primary), replicas=[gone], replica_retry_after=0.2
    )
    _update_on_the_primary(factory)
    with caplog.at_level(logging.INFO, logger="ormkit"):
        for _ in range(3):
            with UnitOfWork(factory, read_only=True) as uow:
                # Nothing fails because the replica did: the read is on the primary.
                assert uow.repository(Items).by_id_or_raise(1).name == "new"
        down = [r for r in caplog.records if "is down" in r.getMessage()]
        assert len(down) == 1, caplog.text  # logged when it changed, not at every read
        assert "try it again in 0.2 s" in down[0].getMessage()
        # The replica comes back (the copy is made), and is used after the cool-down.
        missing.parent.mkdir()
        shutil.copy(files.replica, missing)
        time.sleep(0.25)
        with UnitOfWork(factory, read_only=True) as uow:
            assert uow.repository(Items).by_id_or_raise(1).name == "old"  # the replica again
        assert any("usable again" in r.getMessage() for r in caplog.records), caplog.text
    for engine in (factory.kw["bind"], gone):
        assert engine.pool.checkedout() == 0
        engine.dispose()


def test_nesting_keeps_a_read_only_transaction_read_only(factory: Any) -> None:
    with UnitOfWork(factory, read_only=True) as reader:
        refused = pytest.raises(TransactionError, match="would join the open read-only unit")
        with refused, UnitOfWork(factory):
            pass  # pragma: no cover
        with UnitOfWork(factory, read_only=True) as inner:  # joins: same transaction
            assert inner.session is reader.session
    with UnitOfWork(factory) as writer:
        writer.repository(Items).by_id_or_raise(1).name = "uncommitted"
        # A read-only unit of work inside a read-write one joins it: it sees the outer's writes.
        with UnitOfWork(factory, read_only=True) as inner:
            assert inner.repository(Items).by_id_or_raise(1).name == "uncommitted"
        assert inner.commit_token is None
    assert writer.commit_token == "sqlite:primary"


def test_read_only_without_replicas_reads_the_primary_and_refuses_writes(files: Files) -> None:
    factory = ormkit.create_session_factory(files.url(files.primary))
    with UnitOfWork(factory, read_only=True) as uow:
        uow.repository(Items).by_id_or_raise(1).name = "changed"
        with pytest.raises(TransactionError, match="a flush with pending changes is refused"):
            uow.flush()
        uow.session.expunge_all()
    with UnitOfWork(factory) as uow:
        uow.add(Item(id=2, name="two"))
    assert uow.commit_token is None  # no replicas, no token
    with UnitOfWork(factory, read_only=True, after="sqlite:primary") as uow:
        assert len(uow.session.scalars(select(Item)).all()) == 2
    factory.kw["bind"].dispose()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda f, _: UnitOfWork(f, after="sqlite:primary"),
            "after= is for read-only units of work",
        ),
        (
            lambda f, _: UnitOfWork(f, read_only=True, after="pg:0/16B3748"),
            "not a commit token of a SQLite factory",
        ),
        (lambda f, _: UnitOfWork(f, read_only=True, after=42), "after takes a commit token"),
        (lambda f, _: UnitOfWork(f, read_only="yes"), "read_only must be True or False"),
        (
            lambda _, files: ormkit.create_session_factory(
                files.url(files.primary), replicas=str(files.url(files.replica))
            ),
            "replicas takes a list of database URLs or engines",
        ),
        (
            lambda _, files: ormkit.create_session_factory(
                files.url(files.primary), replicas=["postgresql+psycopg://h/db"]
            ),
            "a replica must be a database of the primary's kind (sqlite)",
        ),
        (
            lambda _, files: ormkit.create_session_factory(
                "sqlite://", replicas=[files.url(files.replica)]
            ),
            "replicas need a primary that is a SQLite file, not a memory database",
        ),
        (
            lambda _, files: ormkit.create_session_factory(
                files.url(files.primary), replica_wait=-1
            ),
            "replica_wait must be a number >= 0, got -1",
        ),
        (
            lambda _, files: ormkit.create_session_factory(
                files.url(files.primary), replicas=[files.url(files.replica)], max_replica_lag="5"
            ),
            "max_replica_lag must be a number >= 0, got '5'",
        ),
    ],
)
def test_bad_input_is_refused_before_any_sql(
    factory: Any, files: Files, call: Any, message: str
) -> None:
    with assert_queries(factory, 0), pytest.raises(InvalidArgumentError, match=re.escape(message)):
        call(factory, files)
