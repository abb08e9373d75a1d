"""Scenario 2: `by_ids` of 1,000 keys, with none, half or all of them already loaded.

`Repository.by_ids` takes the loaded objects from the identity map and fetches the rest in one
`SELECT ... WHERE pk IN (...)`. With every key loaded, it sends nothing. A loop of
`Session.get` also skips the loaded keys, but it sends one SELECT per miss. One hand-written
`select().where(pk.in_(keys))` and advanced-alchemy's `get_many` with the same IN filter send
one query whatever is loaded.
"""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

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

SCENARIO = "2. by_ids"
LOOP = "Session.get in a loop"
BY_IDS = "ormkit Repository.by_ids"
SELECT_IN = "SQLAlchemy one select().where(pk.in_(keys))"
AA_GET_MANY = "advanced-alchemy get_many(pk.in_(keys))"
LOADED = {"none": 0, "half": 2, "all": 1}  # how many loaded: none, every 2nd key, every key


def _preloaded(keys: list[int], loaded: str) -> list[int]:
    step = LOADED[loaded]
    return keys[::step] if step else []


def _check(report: Report, table: Table, loaded: str) -> None:
    by_ids = table.result(BY_IDS)
    if loaded == "all":
        report.statements("by_ids, every key loaded: no SQL", by_ids, 0)
        return
    report.statements(f"by_ids, {loaded} loaded: the misses in one query", by_ids, 1)
    if loaded == "none":
        report.faster_at_least(
            "by_ids of unloaded keys >= 10x faster than a Session.get loop",
            by_ids,
            table.result(LOOP),
            10,
        )


def _title(report: Report, loaded: str) -> str:
    return f"{report.sizes.keys:,} keys, {loaded} of them loaded ({report.backend})"


def run(engine: Engine, report: Report) -> None:
    keys = list(range(report.sizes.keys))
    with engine.connect() as connection:
        Data(parents=len(keys)).load(connection)
    plain = sessionmaker(engine)
    factory = ormkit.create_session_factory(engine)

    for loaded in LOADED:

        def opened(session: Session, loaded: str = loaded) -> Session:
            # Load this round's share of the keys; the session keeps them referenced.
            wanted = _preloaded(keys, loaded)
            rows = session.scalars(select(Parent).where(Parent.id.in_(wanted)))
            session.info["loaded"] = rows.all()
            return session

        def loop() -> Round:
            session = opened(plain())
            return (lambda: [session.get(Parent, key) for key in keys]), session.close

        def by_ids() -> Round:
            repository = ParentRepository(opened(factory()))
            return (lambda: repository.by_ids(keys)), repository.session.close

        def select_in() -> Round:
            session = opened(plain())
            statement = select(Parent).where(Parent.id.in_(keys))
            return (lambda: session.scalars(statement).all()), session.close

        def aa_get_many() -> Round:
            aa = AAParentRepository(session=opened(plain()))
            return (lambda: aa.get_many(Parent.id.in_(keys))), aa.session.close

        variants = [
            Variant(LOOP, loop),
            Variant(BY_IDS, by_ids),
            Variant(SELECT_IN, select_in),
            Variant(AA_GET_MANY, aa_get_many),
        ]
        results = measure(engine, variants, report.sizes.rounds)
        table = report.add(SCENARIO, Table(_title(report, loaded), "", results))
        _check(report, table, loaded)


async def run_async(engine: AsyncEngine, report: Report) -> None:
    keys = list(range(report.sizes.keys))
    async with engine.connect() as connection:
        await connection.run_sync(Data(parents=len(keys)).load)
    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)

    for loaded in LOADED:

        async def opened(session: AsyncSession, loaded: str = loaded) -> AsyncSession:
            wanted = _preloaded(keys, loaded)
            rows = await session.scalars(select(Parent).where(Parent.id.in_(wanted)))
            session.info["loaded"] = rows.all()
            return session

        async def loop() -> AsyncRound:
            session = await opened(plain())

            async def timed() -> None:
                for key in keys:
                    await session.get(Parent, key)

            return timed, session.close

        async def by_ids() -> AsyncRound:
            repository = AsyncParentRepository(await opened(factory()))
            return (lambda: repository.by_ids(keys)), repository.session.close

        async def select_in() -> AsyncRound:
            session = await opened(plain())
            statement = select(Parent).where(Parent.id.in_(keys))

            async def timed() -> None:
                (await session.scalars(statement)).all()

            return timed, session.close

        async def aa_get_many() -> AsyncRound:
            aa = AAAsyncParentRepository(session=await opened(plain()))
            return (lambda: aa.get_many(Parent.id.in_(keys))), aa.session.close

        variants = [
            AsyncVariant(LOOP, loop),
            AsyncVariant(BY_IDS, by_ids),
            AsyncVariant(SELECT_IN, select_in),
            AsyncVariant(AA_GET_MANY, aa_get_many),
        ]
        results = await measure_async(engine, variants, report.sizes.rounds)
        table = report.add(SCENARIO, Table(_title(report, loaded), "", results))
        _check(report, table, loaded)
