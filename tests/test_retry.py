"""UnitOfWork.run: retries serialization failures, deadlocks and SQLite busy, under real
concurrency; everything else is raised at once. The async twin is in test_retry_async.py."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import pytest
import sqlalchemy
from sqlalchemy import exc, select, text

import ormkit
from ormkit import InvalidArgumentError, UnitOfWork
from ormkit._retry import RetryPolicy, transient_reason
from tests.helpers import committed_ids
from tests.models import Parent, User

if TYPE_CHECKING:
    from pathlib import Path

FAST = {"backoff": 0.001, "max_backoff": 0.05}
SERIALIZATION_FAILURE = "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = '40001'; END $$"


@pytest.fixture
def factory(sync_engine: sqlalchemy.Engine):
    return ormkit.create_session_factory(sync_engine)


# SQLSTATE 40001 and 40P01 are PostgreSQL's: those claims run there; SQLite's busy case has a
# test of its own below.
@pytest.fixture
def pg_factory(postgres_sync_engine: sqlalchemy.Engine):
    return ormkit.create_session_factory(postgres_sync_engine)


def test_run_returns_what_work_returns_and_commits(factory, sync_engine) -> None:
    def work(uow: UnitOfWork) -> int:
        return uow.add(Parent(id=7)).id

    assert UnitOfWork.run(factory, work) == 7
    assert committed_ids(sync_engine, Parent) == [7]


def test_other_errors_are_raised_after_one_call(factory, sync_engine) -> None:
    calls: list[int] = []

    def work(uow: UnitOfWork) -> None:
        calls.append(1)
        uow.add(User(id=1, name="a"))
        uow.flush()
        uow.add(User(id=1, name="duplicate"))
        uow.flush()

    with pytest.raises(exc.IntegrityError):
        UnitOfWork.run(factory, work, attempts=5, **FAST)
    assert len(calls) == 1
    assert committed_ids(sync_engine, User) == []


def test_a_permanent_serialization_failure_is_raised_after_every_attempt(
    pg_factory, postgres_sync_engine, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def work(uow: UnitOfWork) -> None:
        calls.append(1)
        uow.add(Parent(id=len(calls)))
        uow.on_commit(lambda: pytest.fail("no attempt committed"))
        uow.session.execute(text(SERIALIZATION_FAILURE))

    with caplog.at_level(logging.WARNING, logger="ormkit"), pytest.raises(exc.DBAPIError) as caught:
        UnitOfWork.run(pg_factory, work, attempts=4, **FAST)
    assert len(calls) == 4
    assert transient_reason(caught.value) == "40001"
    retries = [r.getMessage() for r in caplog.records if r.name == "ormkit"]
    assert len(retries) == 3
    assert all("40001" in message for message in retries)
    assert "attempt 1 of 4" in retries[0]
    assert committed_ids(postgres_sync_engine, Parent) == []  # nothing of any attempt leaked


def test_concurrent_increments_under_serializable_all_land(pg_factory) -> None:
    with UnitOfWork(pg_factory) as uow:
        uow.add(Parent(id=1, name="0"))
    workers = 12
    start = threading.Barrier(workers)
    ran: list[int] = []
    calls: list[int] = []
    errors: list[BaseException] = []

    def increment(worker: int) -> None:
        first = [True]

        def work(uow: UnitOfWork) -> None:
            calls.append(worker)
            counter = uow.session.get(Parent, 1)
            assert counter is not None
            if first[0]:
                first[0] = False
                start.wait(timeout=30)  # everyone reads before anyone writes: real conflicts
            counter.name = str(int(counter.name) + 1)
            uow.on_commit(lambda: ran.append(worker))

        try:
            UnitOfWork.run(pg_factory, work, attempts=50, isolation_level="SERIALIZABLE", **FAST)
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=increment, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with pg_factory() as session:
        assert session.scalar(select(Parent.name).where(Parent.id == 1)) == "12"
    assert sorted(ran) == list(range(workers))  # each worker's callback ran exactly once
    assert len(calls) > workers  # conflicts happened, and were retried


def test_a_real_deadlock_is_resolved_by_retrying(pg_factory) -> None:
    with UnitOfWork(pg_factory) as uow:
        uow.add_all([Parent(id=1, name="a"), Parent(id=2, name="b")])
    both_locked_one = threading.Barrier(2)
    calls: list[str] = []
    errors: list[BaseException] = []

    def update_in_order(name: str, first_id: int, second_id: int) -> None:
        def work(uow: UnitOfWork) -> None:
            calls.append(name)
            uow.session.execute(
                text("UPDATE parent SET name = name || :n WHERE id = :id"),
                {"n": name, "id": first_id},
            )
            if calls.count(name) == 1:
                both_locked_one.wait(timeout=30)  # each holds one row: the next update deadlocks
            uow.session.execute(
                text("UPDATE parent SET name = name || :n WHERE id = :id"),
                {"n": name, "id": second_id},
            )

        try:
            UnitOfWork.run(pg_factory, work, attempts=5, **FAST)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [
        threading.Thread(target=update_in_order, args=("X", 1, 2)),
        threading.Thread(target=update_in_order, args=("Y", 2, 1)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # The victim ran again, at least once: its retry can meet the other transaction again (it
    # may take the first row before the survivor does) and be chosen once more, so "exactly
    # once" would only hold on a quiet machine. Each committed exactly once: see the names.
    assert len(calls) >= 3
    with pg_factory() as session:
        names = {row.id: row.name for row in session.execute(select(Parent.id, Parent.name))}
    assert sorted(names[1][1:]) == ["X", "Y"]
    assert sorted(names[2][1:]) == ["X", "Y"]


def test_sqlite_busy_is_retried(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    engine = ormkit.create_engine(url, sqlite_busy_timeout=0.01)
    try:
        Parent.metadata.create_all(engine)
        factory = ormkit.create_session_factory(engine)
        locked, release = threading.Event(), threading.Event()

        def hold_the_write_lock() -> None:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.insert(Parent).values(id=1))  # a write lock
                locked.set()
                release.wait(timeout=30)
                connection.rollback()

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        locked.wait(timeout=30)
        calls: list[int] = []

        def work(uow: UnitOfWork) -> None:
            calls.append(1)
            if len(calls) == 3:
                release.set()  # the other writer finishes while we back off
            uow.add(Parent(id=2))
            uow.flush()

        UnitOfWork.run(factory, work, attempts=20, backoff=0.01, max_backoff=0.05)
        holder.join()
        assert len(calls) >= 3
        assert committed_ids(engine, Parent) == [2]
    finally:
        engine.dispose()


def test_nothing_is_retried_after_a_commit(pg_factory, postgres_sync_engine) -> None:
    calls: list[int] = []

    def work(uow: UnitOfWork) -> None:
        calls.append(1)
        uow.add(Parent(id=1))
        uow.commit()  # durable now: running again could apply the work twice
        uow.session.execute(text(SERIALIZATION_FAILURE))

    with pytest.raises(exc.DBAPIError):
        UnitOfWork.run(pg_factory, work, attempts=5, **FAST)
    assert len(calls) == 1
    assert committed_ids(postgres_sync_engine, Parent) == [1]


def test_a_callback_failing_after_commit_is_not_retried(factory, sync_engine) -> None:
    calls: list[int] = []

    def fail() -> None:
        # Even an error that looks transient: the work is committed.
        raise exc.OperationalError("x", {}, _SerializationError())

    def work(uow: UnitOfWork) -> None:
        calls.append(1)
        uow.add(Parent(id=len(calls)))
        uow.on_commit(fail)

    with pytest.raises(exc.OperationalError):
        UnitOfWork.run(factory, work, attempts=5, **FAST)
    assert calls == [1]
    assert committed_ids(sync_engine, Parent) == [1]


class _SerializationError(Exception):
    sqlstate = "40001"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": 0}, "attempts must be an int >= 1"),
        ({"attempts": 2.5}, "attempts must be an int"),
        ({"attempts": True}, "attempts must be an int"),
        ({"backoff": -1}, "backoff must be a number >= 0"),
        ({"max_backoff": "1"}, "max_backoff must be a number"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(factory, options, message) -> None:
    calls: list[int] = []
    with pytest.raises(InvalidArgumentError, match=message):
        UnitOfWork.run(factory, lambda _uow: calls.append(1), **options)
    assert calls == []


def test_work_must_be_callable(factory) -> None:
    with pytest.raises(InvalidArgumentError, match="callable"):
        UnitOfWork.run(factory, "work")  # type: ignore[arg-type]


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(attempts=10, backoff=0.1, max_backoff=0.5)
    delays = [policy.delay(n) for n in range(1, 10) for _ in range(50)]
    assert all(0 <= d <= 0.5 for d in delays)
    assert len(set(delays)) > 100  # jittered, not a fixed schedule
    assert max(policy.delay(1) for _ in range(200)) <= 0.1
