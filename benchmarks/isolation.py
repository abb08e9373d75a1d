"""Scenario 7: what test isolation costs, per test, on a 10-table schema.

A "test" here is what a test of application code does: one unit of work that inserts 10 rows
and commits. It runs three ways: with no isolation at all (the floor: the rows are left behind,
and deleted untimed between rounds); inside `ormkit.testing.rolled_back(factory)` (the rows are
rolled back with the test's outer transaction); and after `drop_all()` + `create_all()` of the
schema, which is how a suite without rollback-per-test gets a clean database each time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import ForeignKey, String, delete
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
from ormkit.testing import rolled_back

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

SCENARIO = "7. Test isolation"
PLAIN = "a unit of work of 10 rows, no isolation"
ROLLED_BACK = "the same inside rolled_back(factory)"
RECREATED = "drop_all() + create_all() of 10 tables, then the same"
ROWS = 10


class Schema(DeclarativeBase):
    pass


class Shop(Schema):
    __tablename__ = "iso_shop"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def _table(name: str, parent: str) -> type[Schema]:
    """A table with a foreign key to `parent`: the schema is a chain, as real ones nest."""
    return type(
        name.title().replace("_", ""),
        (Schema,),
        {
            "__tablename__": name,
            "__annotations__": {"id": Mapped[int], "parent_id": Mapped[int], "name": Mapped[str]},
            "id": mapped_column(primary_key=True),
            "parent_id": mapped_column(ForeignKey(f"{parent}.id")),
            "name": mapped_column(String(50)),
        },
    )


_NAMES = ["iso_shop", *(f"iso_table_{n}" for n in range(2, 11))]
TABLES = [_table(name, parent) for name, parent in zip(_NAMES[1:], _NAMES, strict=False)]


def _rows(test: int = 0) -> list[object]:
    """The test's rows; distinct ids per test where nothing removes the last test's rows."""
    return [Shop(id=test * ROWS + n, name="shop") for n in range(1, ROWS + 1)]


def _title(report: Report) -> str:
    return f"{report.sizes.isolated_tests} tests of one unit of work each ({report.backend})"


def _check(report: Report, table: Table) -> None:
    report.same_statements(
        "rolled_back: the statements the unit of work sends alone",
        table.result(ROLLED_BACK),
        table.result(PLAIN),
    )
    report.ratio_at_most("rolled_back <= 1.5x no isolation", table.ratio(ROLLED_BACK), 1.5)
    report.faster_at_least(
        "rolled_back >= 5x faster than drop_all + create_all",
        table.result(ROLLED_BACK),
        table.result(RECREATED),
        5.0,
    )


def run(engine: Engine, report: Report) -> None:
    Schema.metadata.create_all(engine)
    factory = ormkit.create_session_factory(engine)
    tests = range(report.sizes.isolated_tests)

    def emptied() -> None:
        with engine.begin() as connection:
            connection.execute(delete(Shop))

    def test(number: int = 0) -> None:
        with ormkit.UnitOfWork(factory) as uow:
            uow.add_all(_rows(number))

    def plain() -> Round:
        emptied()

        def timed() -> None:
            for number in tests:
                test(number)  # the rows stay: removed after the round, untimed

        return timed, emptied

    def isolated() -> Round:
        emptied()

        def timed() -> None:
            for _ in tests:
                with rolled_back(factory):
                    test()

        return timed, None

    def recreated() -> Round:
        def timed() -> None:
            for _ in tests:
                Schema.metadata.drop_all(engine)
                Schema.metadata.create_all(engine)
                test()

        return timed, None

    variants = [
        Variant(PLAIN, plain),
        Variant(ROLLED_BACK, isolated),
        Variant(RECREATED, recreated),
    ]
    results = measure(engine, variants, report.sizes.rounds)
    table = report.add(SCENARIO, Table(_title(report), "", results))
    _check(report, table)
    Schema.metadata.drop_all(engine)


async def run_async(engine: AsyncEngine, report: Report) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Schema.metadata.create_all)
    factory = ormkit.create_async_session_factory(engine)
    tests = range(report.sizes.isolated_tests)

    async def emptied() -> None:
        async with engine.begin() as connection:
            await connection.execute(delete(Shop))

    async def test(number: int = 0) -> None:
        async with ormkit.AsyncUnitOfWork(factory) as uow:
            uow.add_all(_rows(number))

    async def plain() -> AsyncRound:
        await emptied()

        async def timed() -> None:
            for number in tests:
                await test(number)

        return timed, emptied

    async def isolated() -> AsyncRound:
        await emptied()

        async def timed() -> None:
            for _ in tests:
                async with rolled_back(factory):
                    await test()

        return timed, None

    async def recreated() -> AsyncRound:
        async def timed() -> None:
            for _ in tests:
                async with engine.begin() as connection:
                    await connection.run_sync(Schema.metadata.drop_all)
                    await connection.run_sync(Schema.metadata.create_all)
                await test()

        return timed, None

    variants = [
        AsyncVariant(PLAIN, plain),
        AsyncVariant(ROLLED_BACK, isolated),
        AsyncVariant(RECREATED, recreated),
    ]
    results = await measure_async(engine, variants, report.sizes.rounds)
    table = report.add(SCENARIO, Table(_title(report), "", results))
    _check(report, table)
    async with engine.begin() as connection:
        await connection.run_sync(Schema.metadata.drop_all)
