"""Scenario 3: parents and children linked by a ForeignKey only, inserted in one unit of work.

Without `relationship()`, plain SQLAlchemy does not order the two tables' INSERTs by the
foreign key. The way that works is to add and flush the parents, then the children, and plain
SQLAlchemy does that here, in one `Session.begin()` block. ormkit's unit of work takes the rows
in any order, here the children first, and flushes the parents first by itself.
advanced-alchemy's `add_many` runs once per table, which flushes each table in turn.

Each round is committed, and each round's table emptying is untimed. Rows inserted in random
key order cost the database's B-tree more, whoever inserts them. So the shuffled ormkit variant
is compared with plain SQLAlchemy inserting each table's rows in the same shuffled key order.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

import ormkit
from benchmarks.harness import (
    AsyncRound,
    AsyncVariant,
    Report,
    Round,
    Table,
    Variant,
    measure,
    measure_async,
    peak_memory,
    peak_memory_async,
)
from benchmarks.models import (
    AAAsyncChildRepository,
    AAAsyncParentRepository,
    AAChildRepository,
    AAParentRepository,
    Child,
    Data,
    Parent,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

SCENARIO = "3. FK-ordered insert"
MEMORY = "6. Peak memory of the FK-ordered insert"
MEMORY_NOTES = """
Scenario 3's job at 100,000 rows (50,000 parents and 50,000 children), measured with
`tracemalloc`: the peak of Python memory from building the objects to the end of the commit.
The objects alone are shown too, so what each session layer adds on top of them can be read
off.
"""
PLAIN = "SQLAlchemy Session.begin(): parents, flush(), children"
PLAIN_SHUFFLED = "SQLAlchemy, as above, keys in the shuffled order"
ORMKIT = "ormkit UnitOfWork, children added first"
ORMKIT_SHUFFLED = "ormkit UnitOfWork, all rows shuffled"
AA_ADD_MANY = "advanced-alchemy add_many per table"
OBJECTS = "the objects alone, no session (for reference)"
# Each variant's ratio is against the plain SQLAlchemy variant doing the same kind of work.
_BASELINES = {ORMKIT_SHUFFLED: PLAIN_SHUFFLED, AA_ADD_MANY: PLAIN}
_TIMED = (PLAIN, ORMKIT, PLAIN_SHUFFLED, ORMKIT_SHUFFLED, AA_ADD_MANY)
_MEMORY = (PLAIN, ORMKIT, OBJECTS)


def _rows(count: int) -> tuple[list[Parent], list[Child]]:
    parents = [Parent(id=n, name=f"p{n}") for n in range(count)]
    children = [Child(id=n, parent_id=n, name=f"c{n}") for n in range(count)]
    return parents, children


def _mixed(count: int) -> list[Parent | Child]:
    """Every row in one random order: children before their parents, keys out of order."""
    parents, children = _rows(count)
    rows: list[Parent | Child] = [*children, *parents]
    random.Random(count).shuffle(rows)
    return rows


def _tables(count: int, *, shuffled: bool) -> tuple[list[Parent], list[Child]]:
    """The rows table by table; shuffled, in the same key order `_mixed` gives each table."""
    if not shuffled:
        return _rows(count)
    rows = _mixed(count)
    parents = [row for row in rows if isinstance(row, Parent)]
    return parents, [row for row in rows if isinstance(row, Child)]


def _check(report: Report, table: Table) -> None:
    report.same_statements(
        "FK-ordered insert: as many statements as table-by-table flushes",
        table.result(ORMKIT),
        table.result(PLAIN),
    )
    report.ratio_at_most("FK-ordered insert <= 1.15x manual flushes", table.ratio(ORMKIT), 1.15)
    report.ratio_at_most(
        "FK-ordered insert, shuffled <= 1.15x manual flushes, shuffled",
        table.ratio(ORMKIT_SHUFFLED),
        1.15,
    )


def _sync_variants(engine: Engine, rows: int) -> dict[str, Callable[[], Round]]:
    plain = sessionmaker(engine)
    factory = ormkit.create_session_factory(engine)

    def emptied() -> None:
        with engine.connect() as connection:
            Data().load(connection)

    def manual_flushes(*, shuffled: bool) -> Callable[[], Round]:
        def prepare() -> Round:
            emptied()
            parents, children = _tables(rows, shuffled=shuffled)

            def timed() -> None:
                with plain.begin() as session:
                    session.add_all(parents)
                    session.flush()  # without relationship(), the parents must go first
                    session.add_all(children)

            return timed, None

        return prepare

    def unit_of_work(*, shuffled: bool) -> Callable[[], Round]:
        def prepare() -> Round:
            emptied()
            if shuffled:
                mixed = _mixed(rows)
            else:
                parents, children = _rows(rows)
                mixed = [*children, *parents]  # the order plain SQLAlchemy cannot flush

            def timed() -> None:
                with ormkit.UnitOfWork(factory) as uow:
                    uow.add_all(mixed)

            return timed, None

        return prepare

    def aa_add_many() -> Round:
        emptied()
        parents, children = _rows(rows)

        def timed() -> None:
            with plain() as session:
                AAParentRepository(session=session).add_many(parents)
                AAChildRepository(session=session).add_many(children)
                session.commit()

        return timed, None

    def objects_alone() -> Round:
        emptied()
        rows_made = _rows(rows)
        return (lambda: rows_made), None

    return {
        PLAIN: manual_flushes(shuffled=False),
        ORMKIT: unit_of_work(shuffled=False),
        PLAIN_SHUFFLED: manual_flushes(shuffled=True),
        ORMKIT_SHUFFLED: unit_of_work(shuffled=True),
        AA_ADD_MANY: aa_add_many,
        OBJECTS: objects_alone,
    }


def _async_variants(engine: AsyncEngine, rows: int) -> dict[str, Callable[[], AsyncRound]]:
    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)

    async def emptied() -> None:
        async with engine.connect() as connection:
            await connection.run_sync(Data().load)

    def manual_flushes(*, shuffled: bool) -> Callable[[], AsyncRound]:
        async def prepare() -> AsyncRound:
            await emptied()
            parents, children = _tables(rows, shuffled=shuffled)

            async def timed() -> None:
                async with plain.begin() as session:
                    session.add_all(parents)
                    await session.flush()
                    session.add_all(children)

            return timed, None

        return prepare

    def unit_of_work(*, shuffled: bool) -> Callable[[], AsyncRound]:
        async def prepare() -> AsyncRound:
            await emptied()
            if shuffled:
                mixed = _mixed(rows)
            else:
                parents, children = _rows(rows)
                mixed = [*children, *parents]

            async def timed() -> None:
                async with ormkit.AsyncUnitOfWork(factory) as uow:
                    uow.add_all(mixed)

            return timed, None

        return prepare

    async def aa_add_many() -> AsyncRound:
        await emptied()
        parents, children = _rows(rows)

        async def timed() -> None:
            async with plain() as session:
                await AAAsyncParentRepository(session=session).add_many(parents)
                await AAAsyncChildRepository(session=session).add_many(children)
                await session.commit()

        return timed, None

    async def objects_alone() -> AsyncRound:
        await emptied()
        rows_made = _rows(rows)

        async def timed() -> object:
            return rows_made

        return timed, None

    return {
        PLAIN: manual_flushes(shuffled=False),
        ORMKIT: unit_of_work(shuffled=False),
        PLAIN_SHUFFLED: manual_flushes(shuffled=True),
        ORMKIT_SHUFFLED: unit_of_work(shuffled=True),
        AA_ADD_MANY: aa_add_many,
        OBJECTS: objects_alone,
    }


def _title(report: Report, rows: int) -> str:
    return f"{rows:,} parents + {rows:,} children, committed ({report.backend})"


def _memory_title(report: Report) -> str:
    rows = report.sizes.memory_rows
    return f"Peak traced memory, {rows:,} parents + {rows:,} children ({report.backend})"


def _check_memory(report: Report, table: Table) -> None:
    report.ratio_at_most("FK-ordered insert peak memory <= 1.2x", table.ratio(ORMKIT), 1.2)


def run(engine: Engine, report: Report) -> None:
    prepares = _sync_variants(engine, report.sizes.insert_rows)
    variants = [Variant(name, prepares[name], _BASELINES.get(name)) for name in _TIMED]
    results = measure(engine, variants, report.sizes.slow_rounds)
    table = report.add(SCENARIO, Table(_title(report, report.sizes.insert_rows), "", results))
    _check(report, table)

    prepares = _sync_variants(engine, report.sizes.memory_rows)
    variants = [Variant(name, prepares[name]) for name in _MEMORY]
    results = peak_memory(engine, variants, report.sizes.memory_rounds)
    table = report.add(MEMORY, Table(_memory_title(report), "", results))
    _check_memory(report, table)


async def run_async(engine: AsyncEngine, report: Report) -> None:
    prepares = _async_variants(engine, report.sizes.insert_rows)
    variants = [AsyncVariant(name, prepares[name], _BASELINES.get(name)) for name in _TIMED]
    results = await measure_async(engine, variants, report.sizes.slow_rounds)
    table = report.add(SCENARIO, Table(_title(report, report.sizes.insert_rows), "", results))
    _check(report, table)

    prepares = _async_variants(engine, report.sizes.memory_rows)
    variants = [AsyncVariant(name, prepares[name]) for name in _MEMORY]
    results = await peak_memory_async(engine, variants, report.sizes.memory_rounds)
    table = report.add(MEMORY, Table(_memory_title(report), "", results))
    _check_memory(report, table)
