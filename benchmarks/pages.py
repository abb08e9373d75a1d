"""Scenario 11: page 1, page 100 and page 1,000 of 100,000 rows, 100 rows a page.

Keyset pagination against OFFSET, in two orders: by the primary key, and by `category` (1,000
categories of 100 rows each), where the primary key breaks the ties; an index on
`(category, id)` serves both forms. ormkit's `page(order_by=..., limit=100, after=cursor)` takes
the previous page's cursor and sends `WHERE (category, id) > (...)`, which the index answers by
seeking; `find(order_by=..., limit=100, offset=(n - 1) * 100)` makes the database read and skip
the rows of every earlier page. Both are shown next to the hand-written SQLAlchemy statement of
the same form, and advanced-alchemy's `get_many` with its `LimitOffset` filter (it has no keyset
form).

The table is filled once (untimed). The cursors come from one untimed walk through every page
with `page()`; each round fetches one page in a new session and checks (untimed) that it holds
the walk's rows for that page. *statements* gives each column's count, in the columns' order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from advanced_alchemy.filters import LimitOffset
from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import ormkit
from benchmarks.harness import (
    AsyncRound,
    AsyncVariant,
    PageTable,
    Report,
    Result,
    Round,
    Variant,
    measure,
    measure_async,
    page_variant,
)
from benchmarks.models import (
    AAAsyncEntryRepository,
    AAEntryRepository,
    AsyncEntryRepository,
    Entry,
    EntryRepository,
    load_entries,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from sqlalchemy import Engine
    from sqlalchemy.orm import InstrumentedAttribute

    Columns = tuple[InstrumentedAttribute[int], ...]
    # Each way to fetch a page: whether it takes ormkit's session, and the fetch.
    SyncWays = dict[str, tuple[bool, Callable[[Session, "Start"], Sequence[Entry]]]]
    AsyncWays = dict[
        str, tuple[bool, Callable[[AsyncSession, "Start"], Awaitable[Sequence[Entry]]]]
    ]

SCENARIO = "11. Keyset pagination"
KEYSET = "ormkit page(after=...)"
RAW_KEYSET = "SQLAlchemy where(key > last)"
OFFSET = "ormkit find(offset=...)"
RAW_OFFSET = "SQLAlchemy offset()"
AA_OFFSET = "advanced-alchemy LimitOffset"
COLUMNS = [KEYSET, RAW_KEYSET, OFFSET, RAW_OFFSET, AA_OFFSET]
CATEGORY_ROWS = 100  # rows per category at every size: 1,000 categories at full size
# Each order as the columns it sorts by, the primary key last.
ORDERS: dict[str, Columns] = {
    "id": (Entry.id,),
    "category, id": (Entry.category, Entry.id),
}


@dataclass(frozen=True)
class Walked:
    """One page of the untimed walk: its `after`, its keys, its last row's sort values.

    Not the objects: 100,000 of them kept alive would slow every round's `gc.collect()`.
    """

    after: str | None
    keys: list[int]
    last: tuple[Any, ...]


def _walked(after: str | None, entries: Sequence[Entry], columns: Columns) -> Walked:
    last = tuple(getattr(entries[-1], column.key) for column in columns)
    return Walked(after, [entry.id for entry in entries], last)


@dataclass(frozen=True)
class Start:
    """Where one page starts, from the untimed walk, and the keys it must hold."""

    page: int
    after: str | None  # ormkit's cursor: the previous page's .next
    last: tuple[Any, ...] | None  # the previous page's last row, in the order's columns
    keys: list[int]


def _pages(report: Report) -> list[int]:
    """Page 1, the page a tenth of the way, and the last: 1, 100 and 1,000 at full size."""
    count = report.sizes.page_rows // report.sizes.page_size
    return sorted({1, max(1, count // 10), count})


def _order_by(columns: Columns) -> Columns:
    """What `page()` is given: the order without the key, which it appends."""
    return columns[:-1] or columns


def _raw_keyset(columns: Columns, start: Start, size: int) -> Select[Any]:
    statement = select(Entry)
    if start.last is not None:
        if len(columns) == 1:
            statement = statement.where(columns[0] > start.last[0])
        else:
            statement = statement.where(tuple_(*columns) > tuple_(*start.last))
    return statement.order_by(*columns).limit(size)


def _raw_offset(columns: Columns, start: Start, size: int) -> Select[Any]:
    return select(Entry).order_by(*columns).limit(size).offset((start.page - 1) * size)


def _aa_order(columns: Columns) -> list[Any]:
    return [(column, False) for column in columns]  # (attribute, descending)


def _starts(report: Report, walked: list[Walked]) -> dict[int, Start]:
    """From the walk: each timed page's cursor, the previous page's last row, its keys."""
    rows, size = report.sizes.page_rows, report.sizes.page_size
    assert sum(len(page.keys) for page in walked) == rows, "the walk missed rows"
    assert len(walked) == rows // size, f"{len(walked)} pages, expected {rows // size}"
    return {
        page: Start(
            page,
            walked[page - 1].after,
            walked[page - 2].last if page > 1 else None,
            walked[page - 1].keys,
        )
        for page in _pages(report)
    }


def _title(report: Report, order: str) -> str:
    sizes = report.sizes
    return (
        f"{sizes.page_rows:,} rows, {sizes.page_size:,} a page, order_by={order} ({report.backend})"
    )


def _one_each(results: Sequence[Result]) -> Result:
    """The first result that did not send exactly one statement, else the last."""
    return next((r for r in results if r.statements != 1), results[-1])


def _table(report: Report, order: str, results: list[Result]) -> None:
    pages = _pages(report)
    table = PageTable(
        _title(report, order),
        "",
        results,
        pages=pages,
        columns=COLUMNS,
        keyset=KEYSET,
        offset=OFFSET,
    )
    report.add(SCENARIO, table)
    for column, what in ((KEYSET, "page()"), (OFFSET, "find(offset=...)")):
        report.statements(
            f"{what}, order_by={order}: one query per page",
            _one_each([table.result(page_variant(column, page)) for page in pages]),
            1,
        )


def _checked(start: Start, got: list[Sequence[Entry]]) -> None:
    keys = [[entry.id for entry in entries] for entries in got]
    assert keys == [start.keys], f"page {start.page}: not the walk's rows"


# --- sync ---------------------------------------------------------------------------------------


def _sync_ways(columns: Columns, size: int) -> SyncWays:
    order_by = _order_by(columns)

    def keyset(session: Session, start: Start) -> Sequence[Entry]:
        repository = EntryRepository(session)
        return repository.page(order_by=order_by, limit=size, after=start.after).items

    def raw_keyset(session: Session, start: Start) -> Sequence[Entry]:
        return session.scalars(_raw_keyset(columns, start, size)).all()

    def offset(session: Session, start: Start) -> Sequence[Entry]:
        skipped = (start.page - 1) * size
        return EntryRepository(session).find(order_by=columns, limit=size, offset=skipped)

    def raw_offset(session: Session, start: Start) -> Sequence[Entry]:
        return session.scalars(_raw_offset(columns, start, size)).all()

    def aa_offset(session: Session, start: Start) -> Sequence[Entry]:
        filters = LimitOffset(size, (start.page - 1) * size)
        return AAEntryRepository(session=session).get_many(filters, order_by=_aa_order(columns))

    return {
        KEYSET: (True, keyset),
        RAW_KEYSET: (False, raw_keyset),
        OFFSET: (True, offset),
        RAW_OFFSET: (False, raw_offset),
        AA_OFFSET: (False, aa_offset),
    }


def _walk(factory: sessionmaker[Session], columns: Columns, size: int) -> list[Walked]:
    """Every page with `page()`, each in a session of its own."""
    walked: list[Walked] = []
    after: str | None = None
    while True:
        with factory() as session:
            repository = EntryRepository(session)
            page = repository.page(order_by=_order_by(columns), limit=size, after=after)
            walked.append(_walked(after, page.items, columns))
        if page.next is None:
            return walked
        after = page.next


def run(engine: Engine, report: Report) -> None:
    sizes = report.sizes
    with engine.connect() as connection:
        load_entries(connection, sizes.page_rows, sizes.page_rows // CATEGORY_ROWS)
    plain = sessionmaker(engine)
    factory = ormkit.create_session_factory(engine)

    def prepare(
        fetch: Callable[[Session, Start], Sequence[Entry]], start: Start, *, ours: bool
    ) -> Round:
        session = (factory if ours else plain)()
        got: list[Sequence[Entry]] = []

        def cleanup() -> None:
            session.close()
            _checked(start, got)

        return (lambda: got.append(fetch(session, start))), cleanup

    for order, columns in ORDERS.items():
        starts = _starts(report, _walk(factory, columns, sizes.page_size))
        ways = _sync_ways(columns, sizes.page_size)
        variants = [
            Variant(
                page_variant(column, page),
                partial(prepare, fetch, start, ours=ours),
            )
            for page, start in starts.items()
            for column, (ours, fetch) in ways.items()
        ]
        _table(report, order, measure(engine, variants, sizes.rounds))


# --- async --------------------------------------------------------------------------------------


def _async_ways(columns: Columns, size: int) -> AsyncWays:
    order_by = _order_by(columns)

    async def keyset(session: AsyncSession, start: Start) -> Sequence[Entry]:
        repository = AsyncEntryRepository(session)
        return (await repository.page(order_by=order_by, limit=size, after=start.after)).items

    async def raw_keyset(session: AsyncSession, start: Start) -> Sequence[Entry]:
        return (await session.scalars(_raw_keyset(columns, start, size))).all()

    async def offset(session: AsyncSession, start: Start) -> Sequence[Entry]:
        skipped = (start.page - 1) * size
        repository = AsyncEntryRepository(session)
        return await repository.find(order_by=columns, limit=size, offset=skipped)

    async def raw_offset(session: AsyncSession, start: Start) -> Sequence[Entry]:
        return (await session.scalars(_raw_offset(columns, start, size))).all()

    async def aa_offset(session: AsyncSession, start: Start) -> Sequence[Entry]:
        filters = LimitOffset(size, (start.page - 1) * size)
        repository = AAAsyncEntryRepository(session=session)
        return await repository.get_many(filters, order_by=_aa_order(columns))

    return {
        KEYSET: (True, keyset),
        RAW_KEYSET: (False, raw_keyset),
        OFFSET: (True, offset),
        RAW_OFFSET: (False, raw_offset),
        AA_OFFSET: (False, aa_offset),
    }


async def _walk_async(
    factory: async_sessionmaker[AsyncSession], columns: Columns, size: int
) -> list[Walked]:
    walked: list[Walked] = []
    after: str | None = None
    while True:
        async with factory() as session:
            repository = AsyncEntryRepository(session)
            page = await repository.page(order_by=_order_by(columns), limit=size, after=after)
            walked.append(_walked(after, page.items, columns))
        if page.next is None:
            return walked
        after = page.next


async def run_async(engine: AsyncEngine, report: Report) -> None:
    sizes = report.sizes
    async with engine.connect() as connection:
        await connection.run_sync(load_entries, sizes.page_rows, sizes.page_rows // CATEGORY_ROWS)
    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)

    async def prepare(
        fetch: Callable[[AsyncSession, Start], Awaitable[Sequence[Entry]]],
        start: Start,
        *,
        ours: bool,
    ) -> AsyncRound:
        session = (factory if ours else plain)()
        got: list[Sequence[Entry]] = []

        async def timed() -> None:
            got.append(await fetch(session, start))

        async def cleanup() -> None:
            await session.close()
            _checked(start, got)

        return timed, cleanup

    for order, columns in ORDERS.items():
        starts = _starts(report, await _walk_async(factory, columns, sizes.page_size))
        ways = _async_ways(columns, sizes.page_size)
        variants = [
            AsyncVariant(
                page_variant(column, page),
                partial(prepare, fetch, start, ours=ours),
            )
            for page, start in starts.items()
            for column, (ours, fetch) in ways.items()
        ]
        _table(report, order, await measure_async(engine, variants, sizes.rounds))
