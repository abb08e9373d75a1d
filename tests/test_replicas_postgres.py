"""Read replicas on a real PostgreSQL primary and hot standby, which the suite starts itself.

Lag is made deterministic with `pg_wal_replay_pause()`: while replay is paused, a commit on the
primary is not on the standby, so what a read sees says where it read, and `pg_is_in_recovery()`
through the unit of work's own session says which server that was. Sync (psycopg) and async
(psycopg async, asyncpg) drivers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import String, event, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

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
from tests.pgreplica import ReplicatedPostgres
from tests.stress import scale

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.postgres

ASYNC_DRIVERS = ["postgresql+psycopg_async", "postgresql+asyncpg"]
IN_RECOVERY = text("SELECT pg_is_in_recovery()")
TOKEN = re.compile(r"pg:[0-9A-F]{1,8}/[0-9A-F]{1,8}")
WAIT = 0.3  # replica_wait of these factories
RETRY = 0.3  # replica_retry_after


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "replica_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(40))


class Notes(Repository[Note, int]):
    pass


class AsyncNotes(AsyncRepository[Note, int]):
    pass


@pytest.fixture
def database(replicated_postgres: ReplicatedPostgres) -> Iterator[str]:
    pair = replicated_postgres
    name = pair.create_database()
    engine = ormkit.create_engine(pair.url(database=name))
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(Note), [{"id": i, "text": f"note {i}"} for i in range(1, 11)])
    engine.dispose()
    pair.wait_caught_up()
    try:
        yield name
    finally:
        pair.resume_replay()  # a test that paused it must not leave it paused
        if not pair.standby_running:
            pair.start_standby()
        pair.drop_database(name)


class Sync:
    """A sync factory on the pair, its engines disposed (nothing checked out) at the end."""

    def __init__(self, pair: ReplicatedPostgres, database: str, **settings: Any) -> None:
        self.primary = ormkit.create_engine(pair.url(database=database))
        self.replica = ormkit.create_engine(pair.url(database=database, standby=True))
        self.factory = ormkit.create_session_factory(
            self.primary,
            replicas=[self.replica],
            **{"replica_wait": WAIT, "replica_retry_after": RETRY, **settings},
        )

    def where(self, **uow: Any) -> tuple[bool, list[str]]:
        """Whether a unit of work with `uow`'s arguments ran on the standby, and what it read."""
        with UnitOfWork(self.factory, **uow) as reader:
            standby = bool(reader.session.scalar(IN_RECOVERY))
            texts = [n.text for n in reader.repository(Notes).find(order_by=Note.id)]
        return standby, texts

    def write(self, text_: str, id_: int = 100) -> str:
        with UnitOfWork(self.factory) as uow:
            uow.add(Note(id=id_, text=text_))
        assert uow.commit_token is not None
        assert TOKEN.fullmatch(uow.commit_token)
        return uow.commit_token

    def close(self) -> None:
        for engine in (self.primary, self.replica):
            assert engine.pool.checkedout() == 0
            engine.dispose()


@pytest.fixture
def sync(replicated_postgres: ReplicatedPostgres, database: str) -> Iterator[Sync]:
    made = Sync(replicated_postgres, database, max_replica_lag=60)
    yield made
    made.close()


def test_a_read_only_unit_of_work_runs_on_the_standby(sync: Sync) -> None:
    standby, texts = sync.where(read_only=True)
    assert standby is True
    assert texts == [f"note {i}" for i in range(1, 11)]
    assert sync.where()[0] is False  # the default one: the primary


def test_with_replay_paused_a_token_reads_its_write_and_no_token_does_not(
    replicated_postgres: ReplicatedPostgres, sync: Sync
) -> None:
    pair = replicated_postgres
    pair.pause_replay()
    token = sync.write("fresh")
    # The lag is real: without the token, the standby's reads miss the commit.
    standby, texts = sync.where(read_only=True)
    assert (standby, "fresh" in texts) == (True, False)
    # With it: the standby cannot replay it within replica_wait, so the primary serves it.
    started = time.monotonic()
    standby, texts = sync.where(read_only=True, after=token)
    assert (standby, "fresh" in texts) == (False, True)
    assert time.monotonic() - started < WAIT + 1
    pair.resume_replay()
    pair.wait_caught_up()
    standby, texts = sync.where(read_only=True, after=token)
    assert (standby, "fresh" in texts) == (True, True)  # caught up: the standby again


def test_a_token_read_waits_for_a_replica_that_catches_up_in_time(
    replicated_postgres: ReplicatedPostgres, database: str
) -> None:
    pair = replicated_postgres
    made = Sync(pair, database, max_replica_lag=60, replica_wait=10)
    pair.pause_replay()
    token = made.write("late")
    resume = threading.Timer(0.3, pair.resume_replay)  # while the read waits for the standby
    started = time.monotonic()
    resume.start()
    try:
        standby, texts = made.where(read_only=True, after=token)
    finally:
        resume.join()
    assert (standby, "late" in texts) == (True, True)  # waited, then read on the standby
    assert 0.3 <= time.monotonic() - started < 5
    made.close()


def test_a_replica_lagging_past_max_replica_lag_is_skipped_then_used_again(
    replicated_postgres: ReplicatedPostgres, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = replicated_postgres
    made = Sync(pair, database, max_replica_lag=0.2)
    pair.pause_replay()
    with UnitOfWork(made.factory) as uow:  # more than a WAL page of work, waiting unreplayed
        uow.add_all([Note(id=1000 + i, text=f"unreplayed {i}") for i in range(300)])
    pair.wait_received()
    time.sleep(0.4)  # replay is paused with WAL waiting: the standby falls behind
    with caplog.at_level(logging.INFO, logger="ormkit"):
        assert made.where(read_only=True)[0] is False  # skipped: the primary
        assert any("lags" in r.getMessage() for r in caplog.records), caplog.text
        pair.resume_replay()
        pair.wait_caught_up()
        time.sleep(RETRY + 0.1)
        assert made.where(read_only=True)[0] is True  # tried again, and close enough
        assert any("usable again" in r.getMessage() for r in caplog.records), caplog.text
    made.close()


def test_the_standby_killed_mid_run_reads_move_to_the_primary_and_come_back(
    replicated_postgres: ReplicatedPostgres, sync: Sync, caplog: pytest.LogCaptureFixture
) -> None:
    pair = replicated_postgres
    assert sync.where(read_only=True)[0] is True  # a pooled connection to the standby
    with caplog.at_level(logging.INFO, logger="ormkit"):
        pair.kill_standby()
        for _ in range(5):
            standby, texts = sync.where(read_only=True)  # nothing fails
            assert (standby, len(texts)) == (False, 10)
        down = [r for r in caplog.records if "is down" in r.getMessage()]
        assert len(down) == 1, caplog.text
        pair.start_standby()
        pair.wait_caught_up()
        time.sleep(RETRY + 0.1)
        assert sync.where(read_only=True)[0] is True
    assert sync.replica.pool.checkedout() == 0


def test_writes_in_a_read_only_unit_of_work_are_refused(sync: Sync) -> None:
    with UnitOfWork(sync.factory, read_only=True) as reader:
        notes = reader.repository(Notes)
        note = notes.by_id_or_raise(1)
        note.text = "changed"
        with assert_queries(sync.factory, 0):
            with pytest.raises(
                TransactionError,
                match="do the write in a unit of work opened without read_only=True",
            ):
                reader.flush()
            with pytest.raises(TransactionError, match=r"by_id\(for_update=True\) is refused"):
                notes.by_id(1, for_update=True)
        reader.session.expunge(note)
    with UnitOfWork(sync.factory, read_only=True) as reader:
        # Core, which ormkit does not see: the READ ONLY transaction refuses it.
        with pytest.raises(DBAPIError, match="read-only transaction"):
            reader.session.execute(insert(Note).values(id=50, text="sneaked"))
        reader.session.rollback()
    assert sync.where()[1] == [f"note {i}" for i in range(1, 11)]


def test_a_malformed_token_is_refused_before_any_sql(sync: Sync) -> None:
    for token in ("pg:XYZ", "pg:0/1; DROP TABLE replica_note", "16/B374D848", "sqlite:primary"):
        with (
            assert_queries(sync.factory, 0),
            pytest.raises(InvalidArgumentError, match="not a commit token of a PostgreSQL"),
        ):
            UnitOfWork(sync.factory, read_only=True, after=token)


def test_tokens_follow_the_commits(sync: Sync) -> None:
    first = sync.write("one", 101)
    second = sync.write("two", 102)

    def position(token: str) -> tuple[int, int]:
        high, low = token.removeprefix("pg:").split("/")
        return int(high, 16), int(low, 16)

    assert position(first) < position(second)
    with UnitOfWork(sync.factory, read_only=True) as reader:
        pass
    assert reader.commit_token is None  # nothing written


def test_fifty_threads_of_read_only_units_of_work_all_on_the_standby(sync: Sync) -> None:
    count = scale(50, 200)

    def read(_: int) -> tuple[bool, list[str]]:
        return sync.where(read_only=True)

    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(read, range(count)))
    assert results == [(True, [f"note {i}" for i in range(1, 11)])] * count
    assert sync.replica.pool.checkedout() == 0


# --- async ---------------------------------------------------------------------------------------


@pytest.fixture(params=ASYNC_DRIVERS)
async def async_factory(
    request: pytest.FixtureRequest, replicated_postgres: ReplicatedPostgres, database: str
) -> AsyncIterator[Any]:
    pair = replicated_postgres
    primary = ormkit.create_async_engine(pair.url(request.param, database))
    replica = ormkit.create_async_engine(pair.url(request.param, database, standby=True))
    factory = ormkit.create_async_session_factory(
        primary, replicas=[replica], replica_wait=WAIT, replica_retry_after=RETRY
    )
    yield factory
    for engine in (primary, replica):
        assert engine.sync_engine.pool.checkedout() == 0
        await engine.dispose()


async def _where(factory: Any, **uow: Any) -> tuple[bool, list[str]]:
    async with AsyncUnitOfWork(factory, **uow) as reader:
        standby = bool(await reader.session.scalar(IN_RECOVERY))
        notes = await reader.repository(AsyncNotes).find(order_by=Note.id)
        return standby, [n.text for n in notes]


async def test_async_token_reads_and_the_standby(
    replicated_postgres: ReplicatedPostgres, async_factory: Any
) -> None:
    pair = replicated_postgres
    assert (await _where(async_factory, read_only=True))[0] is True
    assert (await _where(async_factory))[0] is False
    pair.pause_replay()
    async with AsyncUnitOfWork(async_factory) as writer:
        writer.add(Note(id=100, text="fresh"))
    token = writer.commit_token
    assert token is not None
    assert TOKEN.fullmatch(token)
    standby, texts = await _where(async_factory, read_only=True)
    assert (standby, "fresh" in texts) == (True, False)
    standby, texts = await _where(async_factory, read_only=True, after=token)
    assert (standby, "fresh" in texts) == (False, True)
    pair.resume_replay()
    pair.wait_caught_up()
    standby, texts = await _where(async_factory, read_only=True, after=token)
    assert (standby, "fresh" in texts) == (True, True)


async def test_async_standby_killed_reads_move_to_the_primary(
    replicated_postgres: ReplicatedPostgres, async_factory: Any
) -> None:
    pair = replicated_postgres
    assert (await _where(async_factory, read_only=True))[0] is True
    pair.kill_standby()
    for _ in range(3):
        assert await _where(async_factory, read_only=True) == (
            False,
            [f"note {i}" for i in range(1, 11)],
        )
    pair.start_standby()
    pair.wait_caught_up()
    await asyncio.sleep(RETRY + 0.1)
    assert (await _where(async_factory, read_only=True))[0] is True


async def test_two_hundred_concurrent_async_read_only_units_of_work(async_factory: Any) -> None:
    count = scale(200, 1000)
    results = await asyncio.gather(*(_where(async_factory, read_only=True) for _ in range(count)))
    assert results == [(True, [f"note {i}" for i in range(1, 11)])] * count
    async with AsyncUnitOfWork(async_factory, read_only=True) as reader:
        assert await reader.session.scalar(select(Note.text).where(Note.id == 1)) == "note 1"


def test_the_replica_engine_serves_plain_sessions_after_a_read_only_unit_of_work(
    sync: Sync,
) -> None:
    # SQLAlchemy resets a READ ONLY connection to read_only=False when it goes back to the pool;
    # psycopg then begins every transaction with BEGIN READ WRITE, which a standby refuses.
    assert sync.where(read_only=True)[0] is True
    with Session(sync.replica) as session:
        assert session.scalar(IN_RECOVERY) is True
        assert session.scalar(select(Note.text).where(Note.id == 1)) == "note 1"


async def test_the_async_replica_engine_serves_plain_sessions_after_read_only_work(
    replicated_postgres: ReplicatedPostgres, database: str
) -> None:
    pair = replicated_postgres
    for driver in ASYNC_DRIVERS:
        primary = ormkit.create_async_engine(pair.url(driver, database))
        replica = ormkit.create_async_engine(pair.url(driver, database, standby=True))
        factory = ormkit.create_async_session_factory(primary, replicas=[replica])
        try:
            assert (await _where(factory, read_only=True))[0] is True
            async with AsyncSession(replica) as session:
                assert await session.scalar(IN_RECOVERY) is True
                assert await session.scalar(select(Note.text).where(Note.id == 1)) == "note 1"
        finally:
            await primary.dispose()
            await replica.dispose()


def _fail_the_position_query(engine: Any) -> None:
    """Make reading the WAL position fail on `engine`, as a connection lost right after the
    commit would; every other statement goes through."""

    def refuse(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "pg_current_wal_insert_lsn" in statement:
            raise ConnectionResetError("the connection went away")

    event.listen(engine, "before_cursor_execute", refuse)


def test_a_commit_whose_position_cannot_be_read_gets_a_token_for_the_primary(
    sync: Sync, caplog: pytest.LogCaptureFixture
) -> None:
    _fail_the_position_query(sync.primary)
    with caplog.at_level(logging.WARNING, logger="ormkit"), UnitOfWork(sync.factory) as uow:
        uow.add(Note(id=100, text="stored"))
    assert uow.commit_token == "pg:FFFFFFFF/FFFFFFFF"  # no replica ever reaches it
    assert "the commit is stored, but its WAL position could not be read" in caplog.text
    standby, texts = sync.where(read_only=True, after=uow.commit_token)
    assert (standby, "stored" in texts) == (False, True)  # read on the primary, which has it


async def test_async_a_commit_whose_position_cannot_be_read_gets_a_token_for_the_primary(
    async_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    primary = async_factory.kw["bind"]
    _fail_the_position_query(primary.sync_engine)
    with caplog.at_level(logging.WARNING, logger="ormkit"):
        async with AsyncUnitOfWork(async_factory) as uow:
            uow.add(Note(id=100, text="stored"))
    assert uow.commit_token == "pg:FFFFFFFF/FFFFFFFF"
    assert "its WAL position could not be read" in caplog.text
    standby, texts = await _where(async_factory, read_only=True, after=uow.commit_token)
    assert (standby, "stored" in texts) == (False, True)


def test_a_caught_up_standby_of_an_idle_primary_is_not_lagging(
    replicated_postgres: ReplicatedPostgres, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The last replayed commit's age is no lag when there is nothing left to replay: a standby
    # of a primary idle for longer than max_replica_lag must still serve reads.
    made = Sync(replicated_postgres, database, max_replica_lag=0.3)
    made.write("last write for a while")
    replicated_postgres.wait_caught_up()
    time.sleep(0.8)
    with caplog.at_level(logging.WARNING, logger="ormkit"):
        assert made.where(read_only=True)[0] is True
    assert "lags" not in caplog.text
    made.close()
