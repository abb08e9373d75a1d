"""A real PostgreSQL primary and hot standby pair on 127.0.0.1, for read-replica tests (POSIX).

Built on tests/pgserver.py: the same binaries, run-as user, death signal, ports and temp dirs
(each server has its own ``/tmp/ormkit-pg-*``, so the sweep there covers both).  The primary is
initdb'd with replication settings; the standby is a ``pg_basebackup -R`` of it, streaming
through a physical replication slot.  ORMKIT_TEST_POSTGRES_URL is not used: a pair needs servers
that this process starts, pauses and kills.

The ``replicated_postgres`` fixture works through ``pytest_plugins = ("tests.pgreplica",)`` or
imported into a module.  A fixture imported into two modules is two fixtures to pytest; they
share one pair all the same.  (PYTEST_DONT_REWRITE: naming this module as a plugin after
something imported it would otherwise raise PytestAssertRewriteWarning, an error here.)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import URL, make_url

from tests.pgserver import (
    _PREFIX,
    PostgresServer,
    PostgresUnavailable,
    _sweep,
    find_server_binaries,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from psycopg import Connection
    from typing_extensions import LiteralString, Self

_SLOT = "ormkit_standby"
# Appended to the primary's postgresql.conf, which pg_basebackup copies to the standby: each
# server ignores the other's half.  pgserver's -c flags (fsync=off...) apply to both as well.
_REPLICATION_CONF = """
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
# Vacuum on the primary does not cancel the standby's queries.
hot_standby_feedback = on
wal_receiver_status_interval = 1s
# With synchronous_commit=off a commit's WAL waits for the WAL writer: make that ~10 ms.
wal_writer_delay = 10ms
recovery_min_apply_delay = 0
# A restarted standby retries its primary connection after this, not after 5 s.
wal_retrieve_retry_interval = 100ms
# A restartpoint at least every 30 s, not 5 min: a killed standby has less WAL to replay.
checkpoint_timeout = 30s
"""
# initdb --auth=trust writes such lines already; say it, whatever a build's template holds.
_HBA_LINE = "\nhost replication postgres 127.0.0.1/32 trust\n"
_BASEBACKUP_TIMEOUT = 60.0


def _connect(url: str) -> Connection[tuple[Any, ...]]:
    try:
        psycopg = importlib.import_module("psycopg")
    except ImportError:
        msg = "psycopg is not installed (the replica harness queries the servers with it)"
        raise PostgresUnavailable(msg) from None
    conn: Connection[tuple[Any, ...]] = psycopg.connect(url, autocommit=True, connect_timeout=5)
    return conn


def _scalar(
    conn: Connection[tuple[Any, ...]], sql: LiteralString, params: tuple[Any, ...] = ()
) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _lsn(text: str | None) -> int:
    """Turn a pg_lsn such as ``0/3000148`` into a byte position (NULL: 0)."""
    if text is None:
        return 0
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def _wait_for(what: str, timeout: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout} s waiting for {what}"
            raise TimeoutError(msg)
        time.sleep(0.005)


def _group_alive(pgid: int) -> bool:
    """Tell whether a process group has a member that is not a zombie.

    Zombies hold no shared memory, and in a container PID 1 may never reap them; /proc tells
    them apart (Linux).  Elsewhere any member counts, and the caller's timeout bounds the wait.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


class ReplicatedPostgres:
    """A running primary and a hot standby streaming from it; a context manager.

    Use :meth:`start`.  ``primary`` and ``standby`` are the two servers (``PostgresServer``
    API: ``port``, ``admin_url``...).  ``timings`` holds how long each step of the start took.
    """

    def __init__(self) -> None:
        self.primary = PostgresServer("127.0.0.1", 0)
        self.standby = PostgresServer("127.0.0.1", 0)
        self.timings: dict[str, float] = {}
        self._block_size, self._segment_size = 8192, 16 << 20

    @classmethod
    def start(cls, timeout: float = 30.0) -> ReplicatedPostgres:
        """Start a primary, clone it with pg_basebackup, start the clone as a hot standby.

        Returns once the standby accepts connections, is in recovery and streams.
        """
        bindir = find_server_binaries()
        if bindir is None:
            raise PostgresUnavailable
        if not (bindir / "pg_basebackup").is_file():
            msg = f"no pg_basebackup next to the server in {bindir}"
            raise PostgresUnavailable(msg)
        _sweep()
        pair = cls()
        try:
            pair._start(bindir, timeout)
        except BaseException:
            pair.stop()
            raise
        return pair

    def _start(self, bindir: Path, timeout: float) -> None:
        clock = time.monotonic()

        def lap(step: str) -> None:
            nonlocal clock
            now = time.monotonic()
            self.timings[step], clock = now - clock, now

        primary, standby = self.primary, self.standby
        primary._initdb(bindir)
        assert primary._tmp is not None
        data = primary._tmp / "data"
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(_REPLICATION_CONF)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(_HBA_LINE)
        lap("initdb")
        primary._launch(new_port=True)
        lap("primary")
        with _connect(primary.admin_url) as conn:
            self._block_size = int(_scalar(conn, "SELECT current_setting('wal_block_size')"))
            sql = "SELECT pg_size_bytes(current_setting('wal_segment_size'))"
            self._segment_size = int(_scalar(conn, sql))
        lap("query")
        self._basebackup(timeout)
        lap("pg_basebackup")
        standby._launch(new_port=True)
        lap("standby")
        self._wait_streaming(timeout)
        lap("streaming")

    def _basebackup(self, timeout: float) -> None:
        primary, standby = self.primary, self.standby
        # The standby's own temp dir, like _initdb's: the server user owns it.
        standby._as, standby._bindir = primary._as, primary._bindir
        standby._tmp = tmp = Path(tempfile.mkdtemp(prefix=_PREFIX, dir="/tmp"))
        (tmp / "owner.pid").write_text(f"{os.getpid()}\n")
        if standby._as:
            os.chown(tmp, *standby._as)
        cmd = [str(standby._bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port)]
        cmd += ["-U", "postgres", "-D", str(tmp / "data"), "-R", "-X", "stream"]
        # -c fast: the default "spread" checkpoint can take minutes on an idle primary.
        cmd += ["-c", "fast", "--no-sync", "--no-manifest", "-C", "-S", _SLOT]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=False,
                timeout=max(timeout, _BASEBACKUP_TIMEOUT),
                **standby._spawn_kw(),
            )
        except subprocess.TimeoutExpired as exc:
            msg = f"pg_basebackup did not finish in {exc.timeout:.0f} s"
            raise RuntimeError(msg) from None
        if done.returncode != 0:
            msg = f"pg_basebackup failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            raise RuntimeError(msg)

    def _wait_streaming(self, timeout: float) -> None:
        with _connect(self.standby_url) as conn:
            if not _scalar(conn, "SELECT pg_is_in_recovery()"):
                msg = "the standby is not in recovery"
                raise RuntimeError(msg)
            sql = "SELECT status FROM pg_stat_wal_receiver"
            _wait_for("the standby to stream", timeout, lambda: _scalar(conn, sql) == "streaming")

    @property
    def primary_url(self) -> str:
        """DSN of the primary's admin database: ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return self.primary.admin_url

    @property
    def standby_url(self) -> str:
        """DSN of the standby's admin database (read-only: it is in recovery)."""
        return self.standby.admin_url

    def url(
        self,
        driver: str = "postgresql+psycopg",
        database: str = "postgres",
        *,
        standby: bool = False,
    ) -> URL:
        """A SQLAlchemy URL of the primary (or, with ``standby=True``, the standby)."""
        node = self.standby if standby else self.primary
        return make_url(node.admin_url).set(drivername=driver, database=database)

    @property
    def standby_running(self) -> bool:
        """Tell whether the standby's postmaster is running (False after :meth:`kill_standby`)."""
        proc = self.standby._proc
        return proc is not None and proc.poll() is None

    def primary_insert_lsn(self) -> int:
        """The primary's ``pg_current_wal_insert_lsn()``, as a byte position."""
        with _connect(self.primary_url) as conn:
            return _lsn(_scalar(conn, "SELECT pg_current_wal_insert_lsn()::text"))

    def standby_replay_lsn(self) -> int:
        """The standby's ``pg_last_wal_replay_lsn()``, as a byte position."""
        with _connect(self.standby_url) as conn:
            return _lsn(_scalar(conn, "SELECT pg_last_wal_replay_lsn()::text"))

    def standby_receive_lsn(self) -> int:
        """The standby's ``pg_last_wal_receive_lsn()`` (streamed and flushed there), in bytes."""
        with _connect(self.standby_url) as conn:
            return _lsn(_scalar(conn, "SELECT pg_last_wal_receive_lsn()::text"))

    def _record_end(self, insert_lsn: int) -> int:
        """Where the last record ended, given the insert position after it.

        At a page boundary the insert position skips the next page's header (24 bytes, 40 at
        a segment start) while the standby's replay position stops before it.
        """
        in_page = insert_lsn % self._block_size
        header = 40 if insert_lsn % self._segment_size == in_page else 24
        return insert_lsn - header if in_page == header else insert_lsn

    def _wait_standby_lsn(self, function: LiteralString, timeout: float) -> None:
        target = self._record_end(self.primary_insert_lsn())
        with _connect(self.standby_url) as conn:
            sql: LiteralString = f"SELECT {function}()::text"
            _wait_for(
                f"the standby's {function}() to reach {target >> 32:X}/{target & 0xFFFFFFFF:X}",
                timeout,
                lambda: _lsn(_scalar(conn, sql)) >= target,
            )

    def wait_caught_up(self, timeout: float = 10.0) -> None:
        """Wait until the standby has replayed all WAL the primary had inserted at this call.

        WAL of a transaction still open on the primary may never be flushed, hence never
        sent: commit (or roll back) first.  Fails with TimeoutError while replay is paused.
        """
        self._wait_standby_lsn("pg_last_wal_replay_lsn", timeout)

    def wait_received(self, timeout: float = 10.0) -> None:
        """Wait until the standby has received (maybe not replayed) the WAL inserted so far.

        With replay paused, this shows that a commit has reached the standby unapplied.
        """
        self._wait_standby_lsn("pg_last_wal_receive_lsn", timeout)

    def create_database(self, timeout: float = 10.0) -> str:
        """Create a database on the primary, wait until the standby has it, return its name."""
        name = self.primary.create_database()
        self.wait_caught_up(timeout)
        with _connect(self.standby_url) as conn:
            if not _scalar(conn, "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)):
                msg = f"database {name} is not on the standby after catching up"
                raise RuntimeError(msg)
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database on the primary (the standby drops it when it replays that)."""
        self.primary.drop_database(name)

    def pause_replay(self, timeout: float = 10.0) -> None:
        """Pause WAL replay on the standby and wait until it is paused (PostgreSQL 14+).

        WAL still streams in and is kept; nothing new becomes visible on the standby.
        """
        with _connect(self.standby_url) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            sql = "SELECT pg_get_wal_replay_pause_state()"
            _wait_for("replay to pause", timeout, lambda: _scalar(conn, sql) == "paused")

    def resume_replay(self) -> None:
        """Resume WAL replay on the standby."""
        with _connect(self.standby_url) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def kill_standby(self, timeout: float = 10.0, *, restartpoint: bool = True) -> None:
        """SIGKILL the standby's postmaster and all its children, as a crash would.

        Returns once none of them runs and its port refuses connections.  With
        ``restartpoint``, a ``CHECKPOINT`` on the standby first (a restartpoint, as it makes
        every ``checkpoint_timeout`` anyway): its restart then replays seconds of WAL, not the
        whole session's (each CREATE DATABASE writes ~4 MB of it).
        """
        proc, self.standby._proc = self.standby._proc, None
        if proc is None:
            return
        if restartpoint and proc.poll() is None:
            with contextlib.suppress(Exception), _connect(self.standby_url) as conn:
                conn.execute("CHECKPOINT")  # best effort: the standby may be why it is killed
        with contextlib.suppress(ProcessLookupError):
            # start_new_session: the postmaster leads a process group holding all its children.
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
        _wait_for("the standby's processes to exit", timeout, lambda: not _group_alive(proc.pid))
        port = self.standby.port
        _wait_for(f"port {port} to refuse connections", timeout, lambda: _refuses(port))

    def start_standby(self, timeout: float = 30.0) -> None:
        """Start the standby again, same data dir and port: crash recovery, then streaming."""
        if self.standby_running:
            msg = "the standby is running already"
            raise RuntimeError(msg)
        self.standby._launch(new_port=False)
        self._wait_streaming(timeout)

    def stop(self) -> None:
        """Stop both servers (standby first) and delete their files."""
        self.standby.stop()
        self.primary.stop()

    def __enter__(self) -> Self:
        """Return the pair itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop both servers."""
        self.stop()


class _Shared:
    """The one pair that every copy of the fixture (one per importing module) hands out."""

    pair: ReplicatedPostgres | None = None
    users = 0


@pytest.fixture(scope="session")
def replicated_postgres() -> Iterator[ReplicatedPostgres]:
    """A running primary and hot standby, shared by the whole test session."""
    pair = _Shared.pair
    if pair is None:
        try:
            pair = ReplicatedPostgres.start()
        except PostgresUnavailable as exc:
            if os.environ.get("ORMKIT_REQUIRE_POSTGRES") == "1":
                pytest.fail(f"PostgreSQL is required here (ORMKIT_REQUIRE_POSTGRES=1): {exc}")
            pytest.skip(f"no PostgreSQL primary and standby for these tests: {exc}")
        _Shared.pair = pair
    _Shared.users += 1
    try:
        yield pair
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            _Shared.pair = None
            pair.stop()
