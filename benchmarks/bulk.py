"""Scenario 4: bulk UPDATE and DELETE over 10,000 rows, with 1,000 of them loaded.

Each `synchronize_session` value is measured twice. One variant runs a plain ORM-enabled
`update()`/`delete()` with that execution option; the other runs ormkit's
`update_where`/`delete_where` with that argument. Each ormkit row's ratio is against its plain
twin. The values differ a lot in cost: `'evaluate'` (and `'auto'`, which tries it first) checks
the criteria against every loaded object in Python, `'fetch'` brings back the matched keys,
and `False` leaves loaded objects stale.

advanced-alchemy's `delete_where` also returns the deleted objects, so it does more work than
the other variants. It is shown for reference, not as a like-for-like figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Engine, delete, select, update
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
    AAAsyncItemRepository,
    AAItemRepository,
    AsyncItemRepository,
    Data,
    Item,
)
from benchmarks.models import ItemRepository as SyncItemRepository

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

SCENARIO = "4. Bulk update and delete"
MODES: tuple[Literal["auto", "evaluate", "fetch", False], ...] = (
    "auto",
    "evaluate",
    "fetch",
    False,
)
AA_DELETE_WHERE = "advanced-alchemy delete_where (returns the deleted objects)"
EVERY_ROW = Item.value >= 0
# A rolled-back UPDATE or DELETE leaves 10,000 dead rows on PostgreSQL, and scans get slower
# until autovacuum comes at a random moment: each round clears them, untimed, so every round
# starts alike.
VACUUM = "VACUUM item"
NEW_VALUES = {"value": Item.value + 1}


def _names(operation: str, mode: object) -> tuple[str, str]:
    statement, method = (
        ("update()", "update_where")
        if operation == "update"
        else (
            "delete()",
            "delete_where",
        )
    )
    return f"SQLAlchemy {statement}, {mode!r}", f"ormkit {method}, {mode!r}"


def _loaded(session: Session, loaded: int, rows: int) -> None:
    """Load `loaded` of the rows, spread over the table; the session keeps them referenced."""
    step = max(rows // loaded, 1)
    session.info["loaded"] = session.scalars(select(Item).where(Item.id % step == 0)).all()


def _check(report: Report, table: Table, operation: str) -> None:
    for mode in MODES:
        plain, ours = _names(operation, mode)
        report.same_statements(
            f"{operation}, synchronize_session={mode!r}: the statements plain SQLAlchemy sends",
            table.result(ours),
            table.result(plain),
        )
        report.ratio_at_most(
            f"{operation}, synchronize_session={mode!r} <= 1.10x plain", table.ratio(ours), 1.10
        )


def _title(report: Report, operation: str) -> str:
    sizes = report.sizes
    return f"{operation} {sizes.bulk_rows:,} rows, {sizes.bulk_loaded:,} loaded ({report.backend})"


def run(engine: Engine, report: Report) -> None:
    rows, loaded = report.sizes.bulk_rows, report.sizes.bulk_loaded
    with engine.connect() as connection:
        Data(items=rows).load(connection)
    plain = sessionmaker(engine)
    factory = ormkit.create_session_factory(engine)

    def variant(opened: Callable[[], Session], work: Callable[[Session], int]) -> Round:
        session = opened()
        _loaded(session, loaded, rows)
        matched: list[int] = []

        def cleanup() -> None:
            session.rollback()  # every round starts from the same rows
            session.close()
            assert matched == [rows], f"matched {matched}, expected {rows}"
            if engine.dialect.name == "postgresql":
                with engine.connect() as connection:
                    connection.execution_options(isolation_level="AUTOCOMMIT")
                    connection.exec_driver_sql(VACUUM)

        return (lambda: matched.append(work(session))), cleanup

    for operation in ("update", "delete"):
        variants: list[Variant] = []
        for mode in MODES:
            plain_name, ours_name = _names(operation, mode)
            options: dict[str, Any] = {"synchronize_session": mode}

            def sqlalchemy_round(operation: str = operation, options: Any = options) -> Round:
                def work(session: Session) -> int:
                    # Built in the timed part, as ormkit builds its statement there too.
                    statement = (
                        update(Item).where(EVERY_ROW).values(NEW_VALUES)
                        if operation == "update"
                        else delete(Item).where(EVERY_ROW)
                    )
                    return session.execute(statement, execution_options=options).rowcount

                return variant(plain, work)

            def ormkit_round(operation: str = operation, mode: Any = mode) -> Round:
                def work(session: Session) -> int:
                    items = SyncItemRepository(session)
                    if operation == "update":
                        return items.update_where(NEW_VALUES, EVERY_ROW, synchronize_session=mode)
                    return items.delete_where(EVERY_ROW, synchronize_session=mode)

                return variant(factory, work)

            variants += [
                Variant(plain_name, sqlalchemy_round),
                Variant(ours_name, ormkit_round, baseline=plain_name),
            ]
        if operation == "delete":

            def aa_round() -> Round:
                return variant(
                    plain, lambda s: len(AAItemRepository(session=s).delete_where(EVERY_ROW))
                )

            variants.append(Variant(AA_DELETE_WHERE, aa_round))
        results = measure(engine, variants, report.sizes.bulk_rounds)
        table = report.add(SCENARIO, Table(_title(report, operation), "", results))
        _check(report, table, operation)


async def run_async(engine: AsyncEngine, report: Report) -> None:
    rows, loaded = report.sizes.bulk_rows, report.sizes.bulk_loaded
    async with engine.connect() as connection:
        await connection.run_sync(Data(items=rows).load)
    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)

    async def variant(
        opened: Callable[[], AsyncSession], work: Callable[[AsyncSession], Awaitable[int]]
    ) -> AsyncRound:
        session = opened()
        await session.run_sync(_loaded, loaded, rows)
        matched: list[int] = []

        async def timed() -> None:
            matched.append(await work(session))

        async def cleanup() -> None:
            await session.rollback()
            await session.close()
            assert matched == [rows], f"matched {matched}, expected {rows}"
            if engine.dialect.name == "postgresql":
                async with engine.connect() as connection:
                    await connection.execution_options(isolation_level="AUTOCOMMIT")
                    await connection.exec_driver_sql(VACUUM)

        return timed, cleanup

    for operation in ("update", "delete"):
        variants: list[AsyncVariant] = []
        for mode in MODES:
            plain_name, ours_name = _names(operation, mode)
            options: dict[str, Any] = {"synchronize_session": mode}

            async def sqlalchemy_round(
                operation: str = operation, options: Any = options
            ) -> AsyncRound:
                async def work(session: AsyncSession) -> int:
                    statement = (
                        update(Item).where(EVERY_ROW).values(NEW_VALUES)
                        if operation == "update"
                        else delete(Item).where(EVERY_ROW)
                    )
                    result = await session.execute(statement, execution_options=options)
                    return result.rowcount  # type: ignore[attr-defined]

                return await variant(plain, work)

            async def ormkit_round(operation: str = operation, mode: Any = mode) -> AsyncRound:
                async def work(session: AsyncSession) -> int:
                    items = AsyncItemRepository(session)
                    if operation == "update":
                        return await items.update_where(
                            NEW_VALUES, EVERY_ROW, synchronize_session=mode
                        )
                    return await items.delete_where(EVERY_ROW, synchronize_session=mode)

                return await variant(factory, work)

            variants += [
                AsyncVariant(plain_name, sqlalchemy_round),
                AsyncVariant(ours_name, ormkit_round, baseline=plain_name),
            ]
        if operation == "delete":

            async def aa_round() -> AsyncRound:
                async def work(session: AsyncSession) -> int:
                    return len(await AAAsyncItemRepository(session=session).delete_where(EVERY_ROW))

                return await variant(plain, work)

            variants.append(AsyncVariant(AA_DELETE_WHERE, aa_round))
        results = await measure_async(engine, variants, report.sizes.bulk_rounds)
        table = report.add(SCENARIO, Table(_title(report, operation), "", results))
        _check(report, table, operation)
