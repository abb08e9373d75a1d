"""Scenario 5: what a unit of work costs, over 1,000 tiny transactions of one row each.

Each transaction inserts one row and commits. The middle variant uses ormkit's session class
without a unit of work, which separates the session's listeners from the unit of work's own
cost.

On a SQLite file, every commit waits for the disk (WAL, `synchronous=FULL`), so those rounds
vary more than the others.
"""

from __future__ import annotations

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
)
from benchmarks.models import Data, Item

if TYPE_CHECKING:
    from sqlalchemy import Engine

SCENARIO = "5. Unit-of-work overhead"
PLAIN = "SQLAlchemy with sessionmaker.begin()"
SESSION = "ormkit's session, with factory.begin()"
UOW = "ormkit with UnitOfWork(factory)"


def _title(report: Report) -> str:
    return f"{report.sizes.transactions:,} transactions of one INSERT each ({report.backend})"


def _check(report: Report, table: Table) -> None:
    report.same_statements(
        "tiny transactions: the statements plain SQLAlchemy sends",
        table.result(UOW),
        table.result(PLAIN),
    )
    report.ratio_at_most("UnitOfWork <= 1.10x Session.begin()", table.ratio(UOW), 1.10)


def run(engine: Engine, report: Report) -> None:
    plain = sessionmaker(engine)
    factory = ormkit.create_session_factory(engine)
    ids = range(report.sizes.transactions)

    def emptied() -> None:
        with engine.connect() as connection:
            Data().load(connection)

    def session_begin() -> Round:
        emptied()

        def timed() -> None:
            for n in ids:
                with plain.begin() as session:
                    session.add(Item(id=n, value=n, name="t"))

        return timed, None

    def factory_begin() -> Round:
        emptied()

        def timed() -> None:
            for n in ids:
                with factory.begin() as session:
                    session.add(Item(id=n, value=n, name="t"))

        return timed, None

    def unit_of_work() -> Round:
        emptied()

        def timed() -> None:
            for n in ids:
                with ormkit.UnitOfWork(factory) as uow:
                    uow.add(Item(id=n, value=n, name="t"))

        return timed, None

    variants = [
        Variant(PLAIN, session_begin),
        Variant(SESSION, factory_begin),
        Variant(UOW, unit_of_work),
    ]
    results = measure(engine, variants, report.sizes.slow_rounds)
    _check(report, report.add(SCENARIO, Table(_title(report), "", results)))


async def run_async(engine: AsyncEngine, report: Report) -> None:
    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)
    ids = range(report.sizes.transactions)

    async def emptied() -> None:
        async with engine.connect() as connection:
            await connection.run_sync(Data().load)

    async def session_begin() -> AsyncRound:
        await emptied()

        async def timed() -> None:
            for n in ids:
                async with plain.begin() as session:
                    session.add(Item(id=n, value=n, name="t"))

        return timed, None

    async def factory_begin() -> AsyncRound:
        await emptied()

        async def timed() -> None:
            for n in ids:
                async with factory.begin() as session:
                    session.add(Item(id=n, value=n, name="t"))

        return timed, None

    async def unit_of_work() -> AsyncRound:
        await emptied()

        async def timed() -> None:
            for n in ids:
                async with ormkit.AsyncUnitOfWork(factory) as uow:
                    uow.add(Item(id=n, value=n, name="t"))

        return timed, None

    variants = [
        AsyncVariant(PLAIN, session_begin),
        AsyncVariant(SESSION, factory_begin),
        AsyncVariant(UOW, unit_of_work),
    ]
    results = await measure_async(engine, variants, report.sizes.slow_rounds)
    _check(report, report.add(SCENARIO, Table(_title(report), "", results)))
