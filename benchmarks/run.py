"""ormkit against raw SQLAlchemy and advanced-alchemy, measured side by side in one process.

    nox -s bench                # full sizes; rewrites docs/benchmarks.md
    nox -s bench_smoke          # tiny sizes, one round: the benchmarks still run
    python -m benchmarks.run --backend sqlite --scenario by_id     # a part of it

Every scenario runs on SQLite (a file, pysqlite and aiosqlite) and PostgreSQL (psycopg and
asyncpg); one without a `run` (scenario 8, async only) skips the sync backends. PostgreSQL is
the test suite's throwaway server (tests/pgserver.py), or the one named by
ORMKIT_TEST_POSTGRES_URL. Scenario 9 (read replicas) runs on PostgreSQL only, on a primary and
hot standby pair of its own (tests/pgreplica.py, which needs the server binaries: it is skipped
without them), started once and shared by both backends. The run checks the statement counts
ormkit promises (at any size) and, at full size, the issue's timing targets; a wrong statement
count fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sqlite3
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy
from sqlalchemy import URL, make_url

import ormkit
from benchmarks import (
    bulk,
    by_id,
    by_ids,
    insert,
    isolation,
    pages,
    replicas,
    transactions,
    upsert,
    web,
)
from benchmarks.harness import Report, Sizes
from benchmarks.models import Base

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS: dict[str, ModuleType] = {
    "by_id": by_id,
    "by_ids": by_ids,
    "insert": insert,  # scenario 3, and scenario 6 (its peak memory)
    "bulk": bulk,
    "transactions": transactions,
    "isolation": isolation,
    "web": web,  # async only
    "replicas": replicas,  # PostgreSQL only, on a primary + standby pair (REPLICATED)
    "upsert": upsert,
    "pages": pages,
}
BACKENDS = {  # name: (driver, label)
    "sqlite": ("sqlite+pysqlite", "SQLite file, pysqlite"),
    "aiosqlite": ("sqlite+aiosqlite", "SQLite file, aiosqlite"),
    "psycopg": ("postgresql+psycopg", "PostgreSQL, psycopg"),
    "asyncpg": ("postgresql+asyncpg", "PostgreSQL, asyncpg"),
}
ASYNC = {"aiosqlite", "asyncpg"}
POSTGRES = {"psycopg", "asyncpg"}


def _pgserver() -> ModuleType:
    """The test suite's PostgreSQL harness (tests/ is not a package users install)."""
    return _load_tests_module("pgserver")


def _pgreplica() -> ModuleType:
    """The test suite's primary + hot standby harness, built on tests/pgserver.py.

    It imports `tests.pgserver`, found through the checkout's root on sys.path: there already
    for `python -m benchmarks.run` run from the root (which is how `benchmarks` is found).
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return _load_tests_module("pgreplica")


def _load_tests_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise RuntimeError(f"tests/{name}.py is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Databases:
    """One fresh database per backend: a SQLite file, or a database on the PostgreSQL server."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.server: object | None = None
        self.admin_url: URL | None = None
        self.server_version = ""
        self.pair: object | None = None  # scenario 9's primary + standby, once started
        self.no_pair = ""  # why there is none, once that is known

    def url(self, backend: str) -> URL:
        driver, _ = BACKENDS[backend]
        if driver.startswith("sqlite"):
            return URL.create(driver, database=str(self.directory / f"{backend}.db"))
        if self.admin_url is None:
            self._start_postgres()
        assert self.admin_url is not None
        name = f"bench_{backend}"
        engine = sqlalchemy.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
            self.server_version = str(connection.exec_driver_sql("SHOW server_version").scalar())
        engine.dispose()
        return self.admin_url.set(drivername=driver, database=name)

    def _start_postgres(self) -> None:
        external = os.environ.get("ORMKIT_TEST_POSTGRES_URL")
        if external:
            self.admin_url = make_url(external).set(drivername="postgresql+psycopg")
            return
        self.server = _pgserver().PostgresServer.start()
        self.admin_url = make_url(self.server.admin_url)  # type: ignore[attr-defined]

    def replicated(self) -> object | None:
        """The primary + hot standby pair, started on first use; None without server binaries."""
        if self.pair is None and not self.no_pair:
            module = _pgreplica()
            try:
                self.pair = module.ReplicatedPostgres.start()
            except module.PostgresUnavailable as error:
                self.no_pair = f"no primary + standby pair: {error}"
        return self.pair

    def close(self) -> None:
        try:
            if self.pair is not None:
                self.pair.stop()  # type: ignore[attr-defined]
        finally:
            if self.server is not None:
                self.server.stop()  # type: ignore[attr-defined]


def applicable(backend: str, scenarios: list[str]) -> list[str]:
    """The scenarios with a `run` (sync backends) or a `run_async` (async ones) for `backend`.

    A scenario that is `REPLICATED` (scenario 9) runs on the PostgreSQL backends only.
    """
    entry = "run_async" if backend in ASYNC else "run"
    return [
        name
        for name in scenarios
        if hasattr(SCENARIOS[name], entry)
        and (backend in POSTGRES or not getattr(SCENARIOS[name], "REPLICATED", False))
    ]


def _not_applicable(backend: str, scenario: str) -> str:
    if getattr(SCENARIOS[scenario], "REPLICATED", False) and backend not in POSTGRES:
        return "PostgreSQL only"
    return "sync only" if backend in ASYNC else "async only"


def _arguments(scenario: str, databases: Databases) -> dict[str, object] | None:
    """What `scenario` takes besides the engine and the report; None: it cannot run."""
    if not getattr(SCENARIOS[scenario], "REPLICATED", False):
        return {}
    pair = databases.replicated()
    if pair is None:
        return None
    return {"pair": pair}


def run_backend(
    backend: str, url: URL, scenarios: list[str], report: Report, databases: Databases
) -> None:
    report.backend = BACKENDS[backend][1]
    if backend in ASYNC:
        asyncio.run(_run_async(url, scenarios, report, databases))
        return
    engine = ormkit.create_engine(url)
    Base.metadata.create_all(engine)
    try:
        for name in scenarios:
            arguments = _arguments(name, databases)
            if arguments is None:
                _skipped(report, name, databases.no_pair)
                continue
            with _progress(report, name):
                SCENARIOS[name].run(engine, report, **arguments)
    finally:
        engine.dispose()


async def _run_async(url: URL, scenarios: list[str], report: Report, databases: Databases) -> None:
    engine = ormkit.create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        for name in scenarios:
            arguments = _arguments(name, databases)
            if arguments is None:
                _skipped(report, name, databases.no_pair)
                continue
            with _progress(report, name):
                await SCENARIOS[name].run_async(engine, report, **arguments)
    finally:
        await engine.dispose()


def _skipped(report: Report, scenario: str, why: str) -> None:
    print(f"... {report.backend}: {scenario} (skipped: {why})", file=sys.stderr)


@contextmanager
def _progress(report: Report, scenario: str) -> Iterator[None]:
    print(f"... {report.backend}: {scenario}", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f" ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


# --- the report ------------------------------------------------------------------------------


def _versions(databases: Databases) -> Iterator[tuple[str, str]]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    yield "machine", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    yield "Python", platform.python_version()
    yield "ormkit", ormkit.__version__
    yield "SQLAlchemy", sqlalchemy.__version__
    yield "advanced-alchemy", version("advanced-alchemy")
    yield "SQLite", sqlite3.sqlite_version
    if databases.server_version:
        yield "PostgreSQL", databases.server_version
    drivers = ", ".join(f"{d} {version(d)}" for d in ("psycopg", "asyncpg", "aiosqlite"))
    yield "drivers", drivers


def _matrix(report: Report, *, fact: bool) -> list[str]:
    """Claims down, backends across: each cell the measured figure and whether it is met."""
    backends = list(dict.fromkeys(backend for backend, _ in report.checks))
    cells: dict[str, dict[str, str]] = {}
    for backend, check in report.checks:
        if check.fact == fact:
            mark = "yes" if check.ok else "**MISSED**"
            cells.setdefault(check.claim, {})[backend] = f"{check.measured}: {mark}"
    if not cells:
        return []
    return [
        f"| {'statement count' if fact else 'target'} | {' | '.join(backends)} |",
        f"| --- |{' ---: |' * len(backends)}",
        *[
            f"| {claim} | {' | '.join(row.get(b, '') for b in backends)} |"
            for claim, row in cells.items()
        ],
        "",
    ]


def markdown(report: Report, databases: Databases, command: str, seconds: float) -> str:
    sizes = report.sizes
    lines = [
        "# Benchmarks",
        "",
        "ormkit measured against plain SQLAlchemy doing the same job the way SQLAlchemy's",
        "documentation suggests, and against advanced-alchemy's repositories where they have an",
        "equivalent. All variants use the same engine (made by `ormkit.create_engine`), so the",
        "figures compare the session layers, not the engine settings.",
        "",
        "Variants run in interleaved rounds (A, B, C, A, B, C, ...) so a noisy machine slows all",
        "of them alike; every ratio compares medians from this one run. *statements* is what",
        "the variant sent in its last round, counted with `ormkit.testing.count_queries`",
        "(transaction control not included). Untimed in each round: building the objects,",
        "loading what the scenario says is loaded, and rolling back or emptying the tables.",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in _versions(databases)],
        f"| date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} |",
        f"| command | {command}, {seconds / 60:.1f} minutes |",
        (
            f"| rounds | {sizes.rounds} (milliseconds scenarios), {sizes.slow_rounds} (seconds "
            f"scenarios), {sizes.memory_rounds} (memory) |"
        ),
        "",
        "## Targets",
        "",
        "The issue's timing targets (checked at full size only), then the statement counts",
        "ormkit promises (checked at any size, in the smoke run of every `nox` too).",
        "",
        *_matrix(report, fact=False),
        *_matrix(report, fact=True),
    ]
    for scenario, by_backend in report.tables.items():
        lines += [f"## {scenario}", "", report.notes.get(scenario, ""), ""]
        for tables in by_backend.values():
            lines += [table.markdown() for table in tables]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--write", type=Path, help="write the Markdown report to this file")
    parser.add_argument("--backend", action="append", choices=list(BACKENDS), help="repeatable")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="repeatable")
    args = parser.parse_args()
    sizes = Sizes.smoke_run() if args.smoke else Sizes()
    backends: list[str] = args.backend or list(BACKENDS)
    scenarios: list[str] = args.scenario or list(SCENARIOS)
    report = Report(sizes)
    for name in scenarios:
        report.describe(SCENARIOS[name].SCENARIO, SCENARIOS[name].__doc__)
    if "insert" in scenarios:
        report.describe(insert.MEMORY, insert.MEMORY_NOTES)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        databases = Databases(Path(directory))
        try:
            for backend in backends:
                runs = applicable(backend, scenarios)
                if runs:  # else no database to make
                    run_backend(backend, databases.url(backend), runs, report, databases)
                for name in (name for name in scenarios if name not in runs):
                    label = BACKENDS[backend][1]
                    why = _not_applicable(backend, name)
                    print(f"... {label}: {name} (skipped: {why})", file=sys.stderr)
        finally:
            databases.close()
    seconds = time.perf_counter() - start

    command = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
    if args.write and not args.backend and not args.scenario and not args.smoke:
        command = f"`{command}` (what `nox -s bench` runs)"
    else:
        command = f"`{command}`"
    document = markdown(report, databases, command.strip(), seconds)
    if args.smoke:
        document = document.replace(
            "# Benchmarks\n", "# Benchmarks (smoke run: sizes too small to mean anything)\n", 1
        )
    print(document)
    if args.write and not args.smoke:
        args.write.write_text(document)
        print(f"written to {args.write}", file=sys.stderr)
    failed = report.failed
    for backend, check in failed:
        print(f"MISSED on {backend}: {check.claim} ({check.measured})", file=sys.stderr)
    # Timings are reported, statement counts are enforced: they hold on any machine.
    return 1 if any(check.fact for _, check in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
