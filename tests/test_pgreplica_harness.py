"""The primary/hot standby harness (tests/pgreplica.py) does what read-replica tests rely on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from tests.pgreplica import ReplicatedPostgres

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import URL

# As a plugin, the fixture needs no noqa here (F401 on an import, F811 on each parameter).
pytest_plugins = ("tests.pgreplica",)
pytestmark = pytest.mark.postgres


def _execute(url: URL, *statements: str) -> None:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def _scalar(url: URL, sql: str) -> Any:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


@pytest.fixture
def database(replicated_postgres: ReplicatedPostgres) -> Iterator[str]:
    """A fresh database holding an empty table ``t``, on the primary and on the standby."""
    name = replicated_postgres.create_database()
    _execute(replicated_postgres.url(database=name), "CREATE TABLE t (n int PRIMARY KEY)")
    replicated_postgres.wait_caught_up()
    try:
        yield name
    finally:
        if not replicated_postgres.standby_running:  # a failed test must not break the next
            replicated_postgres.start_standby()
        replicated_postgres.resume_replay()
        replicated_postgres.drop_database(name)


def test_the_standby_is_in_recovery_and_the_primary_is_not(
    replicated_postgres: ReplicatedPostgres,
) -> None:
    assert _scalar(replicated_postgres.url(), "SELECT pg_is_in_recovery()") is False
    assert _scalar(replicated_postgres.url(standby=True), "SELECT pg_is_in_recovery()") is True
    standby = replicated_postgres.url(standby=True)
    assert _scalar(standby, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
    assert replicated_postgres.primary_url.startswith("postgresql://postgres@127.0.0.1:")
    assert replicated_postgres.standby_url.endswith(f":{replicated_postgres.standby.port}/postgres")


def test_a_database_created_on_the_primary_exists_on_the_standby(
    replicated_postgres: ReplicatedPostgres,
    database: str,
) -> None:
    standby = replicated_postgres.url(database=database, standby=True)
    assert _scalar(standby, "SELECT current_database()") == database
    assert _scalar(standby, "SELECT count(*) FROM t") == 0


def test_the_standby_is_read_only(
    replicated_postgres: ReplicatedPostgres,
    database: str,
) -> None:
    standby = replicated_postgres.url(database=database, standby=True)
    with pytest.raises(DBAPIError, match="read-only transaction"):
        _execute(standby, "INSERT INTO t VALUES (1)")


def test_a_commit_on_the_primary_reaches_the_standby(
    replicated_postgres: ReplicatedPostgres,
    database: str,
) -> None:
    _execute(replicated_postgres.url(database=database), "INSERT INTO t VALUES (1)")
    replicated_postgres.wait_caught_up()
    standby = replicated_postgres.url(database=database, standby=True)
    assert _scalar(standby, "SELECT count(*) FROM t WHERE n = 1") == 1


def test_with_replay_paused_a_commit_stays_invisible_until_resumed(
    replicated_postgres: ReplicatedPostgres,
    database: str,
) -> None:
    primary = replicated_postgres.url(database=database)
    standby = replicated_postgres.url(database=database, standby=True)
    replicated_postgres.pause_replay()
    _execute(primary, "INSERT INTO t VALUES (2)")
    replicated_postgres.wait_received()  # the commit is on the standby, not replayed
    assert _scalar(standby, "SELECT count(*) FROM t") == 0
    assert _scalar(standby, "SELECT pg_get_wal_replay_pause_state()") == "paused"
    replayed = replicated_postgres.standby_replay_lsn()
    assert replayed < replicated_postgres.primary_insert_lsn()
    assert replayed < replicated_postgres.standby_receive_lsn()
    with pytest.raises(TimeoutError, match="replay"):
        replicated_postgres.wait_caught_up(timeout=0.3)
    replicated_postgres.resume_replay()
    replicated_postgres.wait_caught_up()
    assert _scalar(standby, "SELECT count(*) FROM t WHERE n = 2") == 1


def test_a_killed_standby_refuses_connections_and_comes_back_replicating(
    replicated_postgres: ReplicatedPostgres,
    database: str,
) -> None:
    primary = replicated_postgres.url(database=database)
    standby = replicated_postgres.url(database=database, standby=True)
    _execute(primary, "INSERT INTO t VALUES (3)")
    replicated_postgres.wait_caught_up()
    port = replicated_postgres.standby.port

    replicated_postgres.kill_standby()
    assert not replicated_postgres.standby_running
    with pytest.raises(OperationalError):
        _scalar(standby, "SELECT 1")
    _execute(primary, "INSERT INTO t VALUES (4)")  # written while the standby is down

    replicated_postgres.start_standby()
    assert replicated_postgres.standby.port == port
    assert _scalar(standby, "SELECT pg_is_in_recovery()") is True
    replicated_postgres.wait_caught_up()
    assert _scalar(standby, "SELECT array_agg(n ORDER BY n) FROM t") == [3, 4]
    _execute(primary, "INSERT INTO t VALUES (5)")
    replicated_postgres.wait_caught_up()
    assert _scalar(standby, "SELECT count(*) FROM t WHERE n = 5") == 1


def test_an_insert_position_past_a_page_header_counts_as_the_record_end() -> None:
    pair = ReplicatedPostgres()  # 8 kB pages, 16 MB segments until start() asks the server
    assert pair._record_end(0x2002018) == 0x2002000  # short header: 24 bytes
    assert pair._record_end(0x3000028) == 0x3000000  # a segment's first page: 40 bytes
    assert pair._record_end(0x2002030) == 0x2002030
    assert pair._record_end(0x3000040) == 0x3000040
