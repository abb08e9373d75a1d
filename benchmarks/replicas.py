"""Scenario 9: a read-only unit of work on a read replica, against a plain session on it.

PostgreSQL only, on a primary and a hot standby of the scenario's own (tests/pgreplica.py: a
`pg_basebackup` clone streaming from the primary, on the same machine), started once per run
for both backends. Each backend gets a fresh database of 100 rows, replayed by the standby
before anything is timed. Every unit of work reads the same 10 objects by id in a fresh
session, so each read is a SELECT on the standby:

- the baseline: a plain `Session` of a `sessionmaker` bound to the standby, in
  `with session.begin()`, with `Session.get`;
- `UnitOfWork(factory, read_only=True)`, where `factory` is
  `create_session_factory(primary, replicas=[standby])`, with `Repository.by_id`: one
  statement more, the probe that asks the replica how far behind it is;
- the same with `after=token`, the commit token of a write made before the timing, which the
  standby has already replayed: the same probe checks the token, so no statement more.

A second table is what taking a commit token costs: a read-write unit of work that renames one
row, through that factory (after its commit, `SELECT pg_current_wal_insert_lsn()` on the
primary, in autocommit) and through one made without replicas. What the statements do not
show: that SELECT takes a connection from the pool again, after the commit gave the unit of
work's back, and so pays the pool's pre-ping too (one round trip on psycopg; three on asyncpg,
whose ping is BEGIN, the ping, ROLLBACK).

Times are per unit of work (a round's time divided by its units of work), and so are the
statements. The baseline's engine is a second engine on the standby, with the same settings,
so neither variant's pooled connections are the other's. Both servers share the machine with
the benchmark, which makes these rounds noisier than the others.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

import ormkit
from benchmarks.harness import (
    AsyncRound,
    AsyncVariant,
    Report,
    Result,
    Round,
    Table,
    Variant,
    measure,
    measure_async,
)
from benchmarks.models import AsyncParentRepository, Base, Data, Parent, ParentRepository
from ormkit.testing import count_queries

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy import URL, Engine
    from sqlalchemy.orm import Session

SCENARIO = "9. Read replicas"
# run.py: PostgreSQL backends only, and `run` / `run_async` take the primary + standby pair.
REPLICATED = True
PLAIN = "SQLAlchemy Session on the replica, session.begin()"
READ_ONLY = "ormkit UnitOfWork(read_only=True)"
AFTER = "ormkit UnitOfWork(read_only=True, after=token), caught up"
WRITE = "ormkit UnitOfWork, factory without replicas"
TOKEN = "ormkit UnitOfWork, factory with replicas (commit token)"  # noqa: S105 - a label
ROWS = 100
KEYS = range(10)  # the objects every read-only unit of work reads
IN_RECOVERY = text("SELECT pg_is_in_recovery()")


@dataclass
class PerUnitTable(Table):
    """Times per unit of work; `extra` adds what one variant costs over another, per unit."""

    extra: list[tuple[str, str, str]] = field(default_factory=list[tuple[str, str, str]])

    def markdown(self) -> str:
        lines = [super().markdown()]
        for what, name, other in self.extra:
            cost = self.result(name).median - self.result(other).median
            lines.append(f"{what}: {cost * 1e3:+.3f} ms per unit of work (medians)\n")
        return "\n".join(lines)


def _urls(pair: Any, driver: str) -> tuple[URL, URL]:
    """A fresh database of the pair's for this backend: its primary's and its standby's URL."""
    name = pair.create_database()
    return pair.url(driver, name), pair.url(driver, name, standby=True)


def _per_unit(results: list[Result], units: int) -> list[Result]:
    for result in results:
        result.times = [elapsed / units for elapsed in result.times]
        if result.statements % units == 0:  # otherwise the check shows the round's total
            result.statements //= units
    return results


def _tables(
    report: Report, reads: list[Result], writes: list[Result], on_primary: int
) -> tuple[PerUnitTable, PerUnitTable]:
    units = report.sizes.replica_units
    read_table = PerUnitTable(
        f"{units:,} units of work per round, each reading 10 objects by id; time per unit of "
        f"work ({report.backend})",
        "",
        _per_unit(reads, units),
        extra=[
            (
                "a read-only unit of work over a plain session (the probe, and ormkit)",
                READ_ONLY,
                PLAIN,
            ),
            (
                "the token check on a caught-up replica (after=token over no token)",
                AFTER,
                READ_ONLY,
            ),
        ],
    )
    write_table = PerUnitTable(
        f"{units:,} read-write units of work per round, each renaming one row; time per unit "
        f"of work ({report.backend})",
        "",
        _per_unit(writes, units),
        extra=[("taking the commit token (with replicas over without)", TOKEN, WRITE)],
    )
    report.add(SCENARIO, read_table)
    report.add(SCENARIO, write_table)
    report.statements(
        "a plain session on a replica: 10 SELECTs per unit of work", read_table.result(PLAIN), 10
    )
    report.statements(
        "a read-only unit of work on a replica: 10 SELECTs and the probe",
        read_table.result(READ_ONLY),
        11,
    )
    report.statements(
        "a read-only unit of work after a token, replica caught up: the same, no statement more",
        read_table.result(AFTER),
        11,
    )
    report.statements(
        "read-only units of work with a usable replica: no statement on the primary",
        Result("on the primary", None, statements=on_primary),
        0,
    )
    report.statements(
        "a read-write unit of work renaming a row: 1 SELECT and 1 UPDATE",
        write_table.result(WRITE),
        2,
    )
    report.statements(
        "the same with replicas: and the SELECT of its commit token",
        write_table.result(TOKEN),
        3,
    )
    report.ratio_at_most(
        "read-only unit of work <= 1.10x a plain session on the replica",
        read_table.ratio(READ_ONLY),
        1.10,
    )
    return read_table, write_table


def _check_served_by_standby(session: Session) -> None:
    """Untimed, once per variant: the reads of `session` are the standby's, and find the rows."""
    assert session.execute(IN_RECOVERY).scalar() is True
    assert all(session.get(Parent, key) is not None for key in KEYS)


def run(engine: Engine, report: Report, pair: Any) -> None:
    primary_url, standby_url = _urls(pair, engine.url.drivername)
    primary = ormkit.create_engine(primary_url)
    standby = ormkit.create_engine(standby_url)
    baseline_standby = ormkit.create_engine(standby_url)  # its own pool: see the docstring
    try:
        Base.metadata.create_all(primary)
        with primary.connect() as connection:
            Data(parents=ROWS).load(connection)
        _run(report, pair, primary, standby, baseline_standby)
    finally:
        for each in (primary, standby, baseline_standby):
            each.dispose()


def _run(report: Report, pair: Any, primary: Engine, standby: Engine, baseline: Engine) -> None:
    plain = sessionmaker(baseline)
    factory = ormkit.create_session_factory(primary, replicas=[standby])
    without_replicas = ormkit.create_session_factory(primary)
    with ormkit.UnitOfWork(factory) as uow:
        uow.repository(ParentRepository).by_id_or_raise(0).name = "written"
    token = uow.commit_token
    assert token is not None
    assert token.startswith("pg:")
    pair.wait_caught_up()
    with plain() as session, session.begin():
        _check_served_by_standby(session)
    for after in (None, token):
        with ormkit.UnitOfWork(factory, read_only=True, after=after) as uow:
            _check_served_by_standby(uow.session)
    units = range(report.sizes.replica_units)

    def plain_reads() -> Round:
        def timed() -> None:
            for _ in units:
                with plain() as session, session.begin():
                    for key in KEYS:
                        session.get(Parent, key)

        return timed, None

    def read_only(after: str | None) -> Callable[[], Round]:
        def prepare() -> Round:
            def timed() -> None:
                for _ in units:
                    with ormkit.UnitOfWork(factory, read_only=True, after=after) as uow:
                        parents = uow.repository(ParentRepository)
                        for key in KEYS:
                            parents.by_id(key)

            return timed, None

        return prepare

    names = itertools.count()

    def renames(target: sessionmaker[Session], *, tokens: bool) -> Callable[[], Round]:
        def prepare() -> Round:
            last: list[ormkit.UnitOfWork] = []

            def timed() -> None:
                for n in units:
                    with ormkit.UnitOfWork(target) as uow:
                        parent = uow.repository(ParentRepository).by_id_or_raise(n % ROWS)
                        parent.name = f"r{next(names)}"
                last.append(uow)

            def cleanup() -> None:
                token = last[-1].commit_token
                assert (token is not None and token.startswith("pg:")) if tokens else token is None

            return timed, cleanup

        return prepare

    rounds = report.sizes.rounds
    with count_queries(primary) as on_primary:
        reads = measure(
            [baseline, standby],
            [
                Variant(PLAIN, plain_reads),
                Variant(READ_ONLY, read_only(None)),
                Variant(AFTER, read_only(token)),
            ],
            rounds,
        )
    writes = measure(
        primary,
        [
            Variant(WRITE, renames(without_replicas, tokens=False)),
            Variant(TOKEN, renames(factory, tokens=True)),
        ],
        rounds,
    )
    _tables(report, reads, writes, on_primary.count)


async def run_async(engine: AsyncEngine, report: Report, pair: Any) -> None:
    primary_url, standby_url = _urls(pair, engine.url.drivername)
    primary = ormkit.create_async_engine(primary_url)
    standby = ormkit.create_async_engine(standby_url)
    baseline_standby = ormkit.create_async_engine(standby_url)
    try:
        async with primary.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with primary.connect() as connection:
            await connection.run_sync(Data(parents=ROWS).load)
        await _run_async(report, pair, primary, standby, baseline_standby)
    finally:
        for each in (primary, standby, baseline_standby):
            await each.dispose()


async def _run_async(
    report: Report, pair: Any, primary: AsyncEngine, standby: AsyncEngine, baseline: AsyncEngine
) -> None:
    plain = async_sessionmaker(baseline, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(primary, replicas=[standby])
    without_replicas = ormkit.create_async_session_factory(primary)
    async with ormkit.AsyncUnitOfWork(factory) as uow:
        (await uow.repository(AsyncParentRepository).by_id_or_raise(0)).name = "written"
    token = uow.commit_token
    assert token is not None
    assert token.startswith("pg:")
    pair.wait_caught_up()  # blocks the loop: nothing else runs on it yet
    async with plain() as session, session.begin():
        await session.run_sync(_check_served_by_standby)
    for after in (None, token):
        async with ormkit.AsyncUnitOfWork(factory, read_only=True, after=after) as uow:
            await uow.session.run_sync(_check_served_by_standby)
    units = range(report.sizes.replica_units)

    async def plain_reads() -> AsyncRound:
        async def timed() -> None:
            for _ in units:
                async with plain() as session, session.begin():
                    for key in KEYS:
                        await session.get(Parent, key)

        return timed, None

    def read_only(after: str | None) -> Callable[[], Awaitable[AsyncRound]]:
        async def prepare() -> AsyncRound:
            async def timed() -> None:
                for _ in units:
                    async with ormkit.AsyncUnitOfWork(factory, read_only=True, after=after) as uow:
                        parents = uow.repository(AsyncParentRepository)
                        for key in KEYS:
                            await parents.by_id(key)

            return timed, None

        return prepare

    names = itertools.count()

    def renames(target: Any, *, tokens: bool) -> Callable[[], Awaitable[AsyncRound]]:
        async def prepare() -> AsyncRound:
            last: list[ormkit.AsyncUnitOfWork] = []

            async def timed() -> None:
                for n in units:
                    async with ormkit.AsyncUnitOfWork(target) as uow:
                        parents = uow.repository(AsyncParentRepository)
                        (await parents.by_id_or_raise(n % ROWS)).name = f"r{next(names)}"
                last.append(uow)

            async def cleanup() -> None:
                token = last[-1].commit_token
                assert (token is not None and token.startswith("pg:")) if tokens else token is None

            return timed, cleanup

        return prepare

    rounds = report.sizes.rounds
    with count_queries(primary) as on_primary:
        reads = await measure_async(
            [baseline, standby],
            [
                AsyncVariant(PLAIN, plain_reads),
                AsyncVariant(READ_ONLY, read_only(None)),
                AsyncVariant(AFTER, read_only(token)),
            ],
            rounds,
        )
    writes = await measure_async(
        primary,
        [
            AsyncVariant(WRITE, renames(without_replicas, tokens=False)),
            AsyncVariant(TOKEN, renames(factory, tokens=True)),
        ],
        rounds,
    )
    _tables(report, reads, writes, on_primary.count)
