"""Scenario 10: upsert 10,000 rows by a unique sku, half of them new, in one transaction.

The table starts each round (untimed) with 10,000 products; the 10,000 rows given are the
last 5,000 of them, with new prices, and 5,000 new skus. Every variant matches rows by `sku`
(a unique constraint; the integer primary key is the database's) and commits.

ormkit's `upsert_many(rows, on="sku")` sends one `INSERT ... ON CONFLICT (sku) DO UPDATE ...
RETURNING` per chunk of rows (as many rows as fit in the driver's parameter limit). The loop
is what is written by hand: per row, `session.scalar(select(Product).where(Product.sku ==
...))`, then the attributes set or a new `Product` added, all in one `Session.begin()` block.
With the session's default autoflush, each SELECT first flushes the row before it (one INSERT
or UPDATE per row); the same loop under `Session.no_autoflush` sends them in the commit's one
flush instead. advanced-alchemy's `upsert_many(..., match_fields=["sku"])` takes model
instances (built untimed, as ormkit's dicts are) and uses its native ON CONFLICT path here.

Each round checks the table afterwards (untimed): as many rows, and the same sum of prices,
whoever upserted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
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
    AAAsyncProductRepository,
    AAProductRepository,
    AsyncProductRepository,
    Product,
    ProductRepository,
    load_products,
    sku,
)
from ormkit._checks import MAX_PARAMETERS  # what upsert_many's chunks are sized by

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

SCENARIO = "10. Upsert"
LOOP = "hand-written select-then-insert-or-update loop"
LOOP_NO_AUTOFLUSH = "the same loop under Session.no_autoflush"
ORMKIT = "ormkit upsert_many(rows, on='sku')"
AA = "advanced-alchemy upsert_many(match_fields=['sku'])"
Row = dict[str, Any]


def _rows(count: int) -> list[Row]:
    """The last half of the `count` stored skus with new values, then as many new skus."""
    start = count - count // 2
    return [{"sku": sku(n), "price": 2 * n + 1, "stock": 1} for n in range(start, start + count)]


def _expected(count: int) -> tuple[int, int]:
    """What the table holds after the upsert: its rows, and the sum of their prices."""
    rows = _rows(count)
    untouched = count - count // 2  # skus 0..start-1 keep price n
    return untouched + len(rows), sum(range(untouched)) + sum(row["price"] for row in rows)


def _stored(connection: Connection) -> tuple[int, int]:
    found = connection.execute(select(func.count(), func.sum(Product.price))).one()
    return int(found[0]), int(found[1])


def _chunks(count: int) -> int:
    """How many statements `upsert_many` promises: one per chunk of rows."""
    per_chunk = max(1, MAX_PARAMETERS // len(Product.__table__.columns))
    return math.ceil(count / per_chunk)


def _title(report: Report) -> str:
    rows = report.sizes.upsert_rows
    return f"{rows:,} rows by sku, {rows // 2:,} of them new, committed ({report.backend})"


def _table(report: Report, results: list[Any]) -> Table:
    versus = [(LOOP, ORMKIT), (LOOP_NO_AUTOFLUSH, ORMKIT), (ORMKIT, AA)]
    return report.add(SCENARIO, Table(_title(report), "", results, versus=versus))


def _check(report: Report, table: Table) -> None:
    rows = report.sizes.upsert_rows
    chunks = _chunks(rows)
    report.statements(
        f"upsert_many of {rows:,} rows: one INSERT ... ON CONFLICT per chunk ({chunks:,})",
        table.result(ORMKIT),
        chunks,
    )
    report.faster_at_least(
        "upsert_many >= 10x faster than a select-then-insert-or-update loop",
        table.result(ORMKIT),
        table.result(LOOP),
        10,
    )
    report.faster_at_least(
        "upsert_many >= 10x faster than that loop under no_autoflush",
        table.result(ORMKIT),
        table.result(LOOP_NO_AUTOFLUSH),
        10,
    )


def _by_hand(session: Session, rows: list[Row]) -> None:
    for row in rows:
        found = session.scalar(select(Product).where(Product.sku == row["sku"]))
        if found is None:
            session.add(Product(**row))
        else:
            found.price = row["price"]
            found.stock = row["stock"]


def run(engine: Engine, report: Report) -> None:
    count = report.sizes.upsert_rows
    expected = _expected(count)
    plain = sessionmaker(engine)
    factory = ormkit.create_session_factory(engine)

    def reset() -> None:
        with engine.connect() as connection:
            load_products(connection, count)

    def verified() -> None:
        with engine.connect() as connection:
            stored = _stored(connection)
        assert stored == expected, f"the table holds {stored}, expected {expected}"

    def loop(*, autoflush: bool) -> Round:
        reset()
        rows = _rows(count)

        def timed() -> None:
            with plain.begin() as session:
                if autoflush:
                    _by_hand(session, rows)
                else:
                    with session.no_autoflush:
                        _by_hand(session, rows)

        return timed, verified

    def upsert_many() -> Round:
        reset()
        rows = _rows(count)

        def timed() -> None:
            with ormkit.UnitOfWork(factory) as uow:
                uow.repository(ProductRepository).upsert_many(rows, on="sku")

        return timed, verified

    def aa_upsert_many() -> Round:
        reset()
        products = [Product(**row) for row in _rows(count)]

        def timed() -> None:
            with plain.begin() as session:
                AAProductRepository(session=session).upsert_many(products, match_fields=["sku"])

        return timed, verified

    variants = [
        Variant(LOOP, lambda: loop(autoflush=True)),
        Variant(LOOP_NO_AUTOFLUSH, lambda: loop(autoflush=False), baseline=LOOP),
        Variant(ORMKIT, upsert_many, baseline=LOOP),
        Variant(AA, aa_upsert_many, baseline=LOOP),
    ]
    results = measure(engine, variants, report.sizes.slow_rounds)
    _check(report, _table(report, results))


async def _by_hand_async(session: AsyncSession, rows: list[Row]) -> None:
    for row in rows:
        found = await session.scalar(select(Product).where(Product.sku == row["sku"]))
        if found is None:
            session.add(Product(**row))
        else:
            found.price = row["price"]
            found.stock = row["stock"]


async def run_async(engine: AsyncEngine, report: Report) -> None:
    count = report.sizes.upsert_rows
    expected = _expected(count)
    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)

    async def reset() -> None:
        async with engine.connect() as connection:
            await connection.run_sync(load_products, count)

    async def verified() -> None:
        async with engine.connect() as connection:
            stored = await connection.run_sync(_stored)
        assert stored == expected, f"the table holds {stored}, expected {expected}"

    async def loop(*, autoflush: bool) -> AsyncRound:
        await reset()
        rows = _rows(count)

        async def timed() -> None:
            async with plain.begin() as session:
                if autoflush:
                    await _by_hand_async(session, rows)
                else:
                    with session.no_autoflush:
                        await _by_hand_async(session, rows)

        return timed, verified

    async def upsert_many() -> AsyncRound:
        await reset()
        rows = _rows(count)

        async def timed() -> None:
            async with ormkit.AsyncUnitOfWork(factory) as uow:
                await uow.repository(AsyncProductRepository).upsert_many(rows, on="sku")

        return timed, verified

    async def aa_upsert_many() -> AsyncRound:
        await reset()
        products = [Product(**row) for row in _rows(count)]

        async def timed() -> None:
            async with plain.begin() as session:
                repository = AAAsyncProductRepository(session=session)
                await repository.upsert_many(products, match_fields=["sku"])

        return timed, verified

    variants = [
        AsyncVariant(LOOP, lambda: loop(autoflush=True)),
        AsyncVariant(LOOP_NO_AUTOFLUSH, lambda: loop(autoflush=False), baseline=LOOP),
        AsyncVariant(ORMKIT, upsert_many, baseline=LOOP),
        AsyncVariant(AA, aa_upsert_many, baseline=LOOP),
    ]
    results = await measure_async(engine, variants, report.sizes.slow_rounds)
    _check(report, _table(report, results))
