"""One set of fixtures drives every backend: SQLite (pysqlite, aiosqlite) and a real PostgreSQL
server (psycopg, psycopg async, asyncpg) that the test suite starts itself.

Sync tests take `sync_url`/`sync_engine` (pysqlite, psycopg); async tests take
`async_url`/`async_engine` (aiosqlite, psycopg async, asyncpg). Each test gets a database of its
own, and fails if it leaves a connection checked out of the pool.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import URL, make_url

import ormkit
from tests.models import Base
from tests.pgreplica import replicated_postgres  # noqa: F401 - a primary and hot standby
from tests.pgserver import PostgresServer, PostgresUnavailable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

SYNC_BACKENDS = ("sqlite", "psycopg")
ASYNC_BACKENDS = ("aiosqlite", "psycopg_async", "asyncpg")
POSTGRES_DRIVERS = {
    "psycopg": "postgresql+psycopg",
    "psycopg_async": "postgresql+psycopg_async",
    "asyncpg": "postgresql+asyncpg",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark PostgreSQL cases so `pytest -m "not postgres"` runs the SQLite half alone.
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if any(p in POSTGRES_DRIVERS for p in params if isinstance(p, str)):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        if os.environ.get("ORMKIT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (ORMKIT_REQUIRE_POSTGRES=1): {exc}")
        pytest.skip(f"no PostgreSQL server for these tests: {exc}")
    with server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[URL]:
    """A fresh database on the test server, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield make_url(postgres_server.admin_url).set(database=name)
    finally:
        postgres_server.drop_database(name)


def _url_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    if backend in POSTGRES_DRIVERS:
        base: URL = request.getfixturevalue("postgres_url")
        return base.set(drivername=POSTGRES_DRIVERS[backend])
    driver = "sqlite+aiosqlite" if backend == "aiosqlite" else "sqlite+pysqlite"
    return URL.create(driver, database=str(tmp_path / "test.db"))


@pytest.fixture(params=SYNC_BACKENDS)
def sync_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    return _url_for(request.param, request, tmp_path)


@pytest.fixture(params=ASYNC_BACKENDS)
def async_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    return _url_for(request.param, request, tmp_path)


@pytest.fixture(params=["psycopg"])
def postgres_sync_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """For claims only PostgreSQL can show (SQLSTATEs, row locks, server-side sleeps)."""
    return _url_for(request.param, request, tmp_path)


@pytest.fixture(params=["psycopg_async", "asyncpg"])
def postgres_async_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    return _url_for(request.param, request, tmp_path)


def _sync_engine(url: URL) -> Iterator[Engine]:
    engine = ormkit.create_engine(url)
    Base.metadata.create_all(engine)
    try:
        yield engine
        assert engine.pool.checkedout() == 0, "the test left a connection checked out"
    finally:
        engine.dispose()


async def _async_engine(url: URL) -> AsyncIterator[AsyncEngine]:
    engine = ormkit.create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        yield engine
        assert engine.pool.checkedout() == 0, "the test left a connection checked out"
    finally:
        await engine.dispose()


@pytest.fixture
def sync_engine(sync_url: URL) -> Iterator[Engine]:
    """An ormkit engine with the test tables; fails the test if a connection leaked."""
    yield from _sync_engine(sync_url)


@pytest.fixture
async def async_engine(async_url: URL) -> AsyncIterator[AsyncEngine]:
    """The async twin of `sync_engine`, made per test (asyncpg ties it to one event loop)."""
    async for engine in _async_engine(async_url):
        yield engine


@pytest.fixture
def postgres_sync_engine(postgres_sync_url: URL) -> Iterator[Engine]:
    yield from _sync_engine(postgres_sync_url)


@pytest.fixture
async def postgres_async_engine(postgres_async_url: URL) -> AsyncIterator[AsyncEngine]:
    async for engine in _async_engine(postgres_async_url):
        yield engine
