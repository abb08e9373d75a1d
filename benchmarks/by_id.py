"""Scenario 1: `by_id` on 100 loaded objects, looked up again and again.

The session has already loaded the 100 objects. `Repository.by_id` goes through
`Session.get()`, which finds each one in the identity map and sends nothing. A hand-written
`select().where(pk == key)` and advanced-alchemy's `get` send a SELECT for every lookup,
because a query always goes to the database.
"""

from __future__ import annotations

from sqlalchemy import Engine, select
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
from benchmarks.models import (
    AAAsyncParentRepository,
    AAParentRepository,
    AsyncParentRepository,
    Data,
    Parent,
    ParentRepository,
)

SCENARIO = "1. by_id on loaded objects"
LOADED = 100
GET = "SQLAlchemy Session.get"
BY_ID = "ormkit Repository.by_id"
SELECT = "SQLAlchemy execute(select().where(pk == key))"
AA_GET = "advanced-alchemy get"


def _title(report: Report) -> str:
    return f"{report.sizes.lookups:,} lookups over {LOADED} loaded objects ({report.backend})"


def _check(report: Report, table: Table) -> None:
    lookups = report.sizes.lookups
    report.statements("by_id on a loaded object sends no SQL", table.result(BY_ID), 0)
    report.statements("advanced-alchemy get always sends a SELECT", table.result(AA_GET), lookups)
    report.ratio_at_most("by_id hit <= 1.15x Session.get", table.ratio(BY_ID), 1.15)
    report.faster_at_least(
        "by_id hit >= 20x faster than advanced-alchemy get",
        table.result(BY_ID),
        table.result(AA_GET),
        20,
    )


def run(engine: Engine, report: Report) -> None:
    with engine.connect() as connection:
        Data(parents=LOADED).load(connection)
    plain = sessionmaker(engine)()
    session = ormkit.create_session_factory(engine)()
    # The identity map holds objects weakly: keep the loaded ones referenced.
    loaded = [s.scalars(select(Parent)).all() for s in (plain, session)]
    repository = ParentRepository(session)
    aa = AAParentRepository(session=plain)
    keys = [n % LOADED for n in range(report.sizes.lookups)]

    def get() -> Round:
        return (lambda: [plain.get(Parent, key) for key in keys]), None

    def by_id() -> Round:
        return (lambda: [repository.by_id(key) for key in keys]), None

    def select_where() -> Round:
        def timed() -> None:
            for key in keys:
                plain.execute(select(Parent).where(Parent.id == key)).scalar_one()

        return timed, None

    def aa_get() -> Round:
        return (lambda: [aa.get(key) for key in keys]), None

    variants = [
        Variant(GET, get),
        Variant(BY_ID, by_id),
        Variant(SELECT, select_where),
        Variant(AA_GET, aa_get),
    ]
    results = measure(engine, variants, report.sizes.slow_rounds)
    assert all(len(objects) == LOADED for objects in loaded)
    plain.close()
    session.close()
    table = report.add(SCENARIO, Table(_title(report), "", results))
    _check(report, table)


async def run_async(engine: AsyncEngine, report: Report) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(Data(parents=LOADED).load)
    plain = async_sessionmaker(engine, expire_on_commit=False)()
    session = ormkit.create_async_session_factory(engine)()
    loaded = [(await s.scalars(select(Parent))).all() for s in (plain, session)]
    repository = AsyncParentRepository(session)
    aa = AAAsyncParentRepository(session=plain)
    keys = [n % LOADED for n in range(report.sizes.lookups)]

    async def get() -> AsyncRound:
        async def timed() -> None:
            for key in keys:
                await plain.get(Parent, key)

        return timed, None

    async def by_id() -> AsyncRound:
        async def timed() -> None:
            for key in keys:
                await repository.by_id(key)

        return timed, None

    async def select_where() -> AsyncRound:
        async def timed() -> None:
            for key in keys:
                (await plain.execute(select(Parent).where(Parent.id == key))).scalar_one()

        return timed, None

    async def aa_get() -> AsyncRound:
        async def timed() -> None:
            for key in keys:
                await aa.get(key)

        return timed, None

    variants = [
        AsyncVariant(GET, get),
        AsyncVariant(BY_ID, by_id),
        AsyncVariant(SELECT, select_where),
        AsyncVariant(AA_GET, aa_get),
    ]
    results = await measure_async(engine, variants, report.sizes.slow_rounds)
    assert all(len(objects) == LOADED for objects in loaded)
    await plain.close()
    await session.close()
    table = report.add(SCENARIO, Table(_title(report), "", results))
    _check(report, table)
