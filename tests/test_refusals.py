"""Refusals that keep a promise: no AUTOCOMMIT unit of work, sync means sync, sane chunk sizes.

Each refusal comes before any SQL, with an `InvalidArgumentError` or `ConfigurationError` whose
message says what to do, and leaves the database as it was (read through a new connection).
"""

from __future__ import annotations

import functools

import pytest

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    ConfigurationError,
    InvalidArgumentError,
    Repository,
    UnitOfWork,
)
from ormkit.testing import count_queries
from tests.fresh import fresh_committed_ids
from tests.models import User


async def _notify() -> None:
    """An async callback: sync code would never await it."""


def _returns_a_coroutine() -> object:
    """A plain function, so on_commit takes it; what it returns is never awaited."""
    return _notify()


class _AsyncCall:
    async def __call__(self) -> None:
        pass


# --- a unit of work is a transaction ----------------------------------------------------------


@pytest.mark.parametrize("level", ["AUTOCOMMIT", "autocommit"])
def test_autocommit_is_refused_before_any_sql(level: str, sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with count_queries(sync_engine) as log:
        with pytest.raises(InvalidArgumentError, match="refuses isolation_level='AUTOCOMMIT'"):
            UnitOfWork(factory, isolation_level=level)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
            UnitOfWork.run(factory, lambda _uow: None, isolation_level="AUTOCOMMIT")
    assert log.count == 0


async def test_autocommit_is_refused_before_any_sql_async(async_engine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    with count_queries(async_engine) as log:
        with pytest.raises(InvalidArgumentError, match="refuses isolation_level='AUTOCOMMIT'"):
            AsyncUnitOfWork(factory, isolation_level="AUTOCOMMIT")

        async def work(uow: AsyncUnitOfWork) -> None:
            pass

        with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
            await AsyncUnitOfWork.run(factory, work, isolation_level="AUTOCOMMIT")
    assert log.count == 0


def test_a_factory_on_an_autocommit_engine_is_refused(sync_url) -> None:
    # An AUTOCOMMIT engine: a failing block would leave its rows committed, row by row.
    for engine in (
        ormkit.create_engine(sync_url, isolation_level="AUTOCOMMIT"),
        ormkit.create_engine(sync_url).execution_options(isolation_level="AUTOCOMMIT"),
    ):
        factory = ormkit.create_session_factory(engine)
        with pytest.raises(InvalidArgumentError, match="engine runs in AUTOCOMMIT"):
            UnitOfWork(factory)
        engine.dispose()


async def test_a_factory_on_an_autocommit_async_engine_is_refused(async_url) -> None:
    for engine in (
        ormkit.create_async_engine(async_url, isolation_level="AUTOCOMMIT"),
        ormkit.create_async_engine(async_url).execution_options(isolation_level="AUTOCOMMIT"),
    ):
        factory = ormkit.create_async_session_factory(engine)
        with pytest.raises(InvalidArgumentError, match="engine runs in AUTOCOMMIT"):
            AsyncUnitOfWork(factory)
        await engine.dispose()


# --- sync means sync --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "callback",
    [_notify, functools.partial(_notify), _AsyncCall()],
    ids=["async-def", "partial-of-async-def", "async-call"],
)
def test_sync_on_commit_refuses_async_callables(callback, sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="kept"))
        with pytest.raises(InvalidArgumentError, match="is async; use AsyncUnitOfWork"):
            uow.on_commit(callback)
    assert fresh_committed_ids(sync_engine.url, "users") == [1]


def test_a_sync_callback_returning_a_coroutine_is_an_error_not_a_lost_call(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []
    with pytest.raises(InvalidArgumentError, match="returned a coroutine"):  # noqa: SIM117
        with UnitOfWork(factory) as uow:
            uow.add(User(id=1, name="committed"))
            uow.on_commit(_returns_a_coroutine)
            uow.on_commit(lambda: ran.append("the next one still runs"))
    # The commit stands (a callback never undoes it); the coroutine was closed, not leaked
    # (the suite turns "coroutine ... was never awaited" warnings into errors).
    assert fresh_committed_ids(sync_engine.url, "users") == [1]
    assert ran == ["the next one still runs"]


def test_sync_run_refuses_async_work_and_rolls_it_back(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)

    async def work(uow: UnitOfWork) -> None:
        uow.add(User(id=1, name="never"))

    with count_queries(sync_engine) as log:  # noqa: SIM117
        with pytest.raises(InvalidArgumentError, match=r"is async; use AsyncUnitOfWork\.run"):
            UnitOfWork.run(factory, work)  # type: ignore[arg-type]
    assert log.count == 0
    calls: list[int] = []

    def returns_a_coroutine(uow: UnitOfWork) -> object:
        calls.append(1)
        uow.add(User(id=2, name="rolled back"))
        uow.flush()
        return _notify()

    with pytest.raises(InvalidArgumentError, match="returned a coroutine"):
        UnitOfWork.run(factory, returns_a_coroutine, attempts=3)
    assert calls == [1]  # not retried
    assert fresh_committed_ids(sync_engine.url, "users") == []
    assert sync_engine.pool.checkedout() == 0


def test_robust_and_durable_take_booleans(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with pytest.raises(InvalidArgumentError, match="durable must be True or False"):
        UnitOfWork(factory, durable="yes")  # type: ignore[arg-type]
    with UnitOfWork(factory) as uow:  # noqa: SIM117
        with pytest.raises(InvalidArgumentError, match="robust must be True or False"):
            uow.on_commit(print, robust=1)  # type: ignore[arg-type]


# --- robust callbacks -------------------------------------------------------------------------


def test_a_robust_callback_error_is_logged_never_raised(sync_engine, caplog) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    ran: list[str] = []

    def fails() -> None:
        raise RuntimeError("mail server down")

    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="committed"))
        uow.on_commit(fails, robust=True)
        uow.on_commit(lambda: ran.append("next"))
    assert ran == ["next"]
    assert fresh_committed_ids(sync_engine.url, "users") == [1]
    assert "robust=True" in caplog.text
    assert "mail server down" in caplog.text


async def test_a_robust_async_callback_error_is_logged_never_raised(async_engine, caplog) -> None:
    factory = ormkit.create_async_session_factory(async_engine)

    async def fails() -> None:
        raise RuntimeError("mail server down")

    async with AsyncUnitOfWork(factory) as uow:
        uow.add(User(id=1, name="committed"))
        uow.on_commit(fails, robust=True)
    assert fresh_committed_ids(async_engine.url, "users") == [1]
    assert "mail server down" in caplog.text


# --- key_chunk_size ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "10"])
def test_a_bad_key_chunk_size_is_refused_when_the_class_is_defined(size: object) -> None:
    with pytest.raises(ConfigurationError, match="key_chunk_size must be None"):

        class Users(Repository[User, int]):
            key_chunk_size = size  # type: ignore[assignment]


@pytest.mark.parametrize("size", [0, -1, 2.5])
def test_a_bad_key_chunk_size_set_later_is_refused_at_use(size: object, sync_engine) -> None:
    class Users(Repository[User, int]):
        pass

    factory = ormkit.create_session_factory(sync_engine)
    with factory.begin() as session:
        session.add(User(id=1, name="exists"))
    Users.key_chunk_size = size  # type: ignore[assignment]
    with factory() as session, count_queries(sync_engine) as log:  # noqa: SIM117
        # Never a silent []: the row exists.
        with pytest.raises(ConfigurationError, match="key_chunk_size must be None"):
            Users(session).by_ids([1])
    assert log.count == 0


async def test_a_bad_key_chunk_size_is_refused_async(async_engine) -> None:
    class Users(AsyncRepository[User, int]):
        pass

    Users.key_chunk_size = -1
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        with pytest.raises(ConfigurationError, match="key_chunk_size must be None"):
            await Users(session).by_ids([1])


def test_a_good_key_chunk_size_still_chunks(sync_engine) -> None:
    class Users(Repository[User, int]):
        key_chunk_size = 2

    factory = ormkit.create_session_factory(sync_engine)
    with factory.begin() as session:
        session.add_all([User(id=i, name=str(i)) for i in range(1, 6)])
    with factory() as session, count_queries(session) as log:
        assert [u.id for u in Users(session).by_ids([1, 2, 3, 4, 5])] == [1, 2, 3, 4, 5]
    assert log.count == 3
