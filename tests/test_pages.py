"""page(): keyset pagination. Every row exactly once in the documented order under several
orders, no repeat or skip while rows come and go between pages, one query per page, and cursors
that are refused before any SQL when malformed, altered or made for another query. Sync tests
run on pysqlite and psycopg, async ones on aiosqlite, psycopg async and asyncpg."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import func
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    InvalidArgumentError,
    Page,
    Repository,
    UnitOfWork,
)
from ormkit._pages import _decode, _encode, _fingerprint, _Term, _terms
from ormkit.testing import assert_queries, count_queries
from tests.models import Event, User

# SQLite has no decimal type: SQLAlchemy stores Numeric as REAL and says so. The amounts here
# are multiples of 1/8, exact in binary floating point.
pytestmark = pytest.mark.filterwarnings("ignore:Dialect sqlite.*Decimal:sqlalchemy.exc.SAWarning")

ROWS = 1000
BASE = dt.datetime(2026, 3, 29, 0, 59, tzinfo=dt.timezone.utc)


class Events(Repository[Event, uuid.UUID]):
    pass


class AsyncEvents(AsyncRepository[Event, uuid.UUID]):
    pass


def _row(i: int) -> dict[str, Any]:
    # Few distinct values per column, so every order has long runs of ties for the later
    # terms (and the primary key) to break; names compare the same under any collation.
    return {
        "id": uuid.UUID(int=(i * 2654435761) % 2**128),
        "seq": i % 37,
        "name": f"n{i % 13:02d}",
        "at": BASE + dt.timedelta(seconds=i % 50, microseconds=i % 3),
        "amount": Decimal(i % 17) / 8,
        "tag": None if i % 5 == 0 else f"t{i % 7}",
    }


def _asc_nulls_last(value: object) -> tuple[int, object]:
    return (1, "") if value is None else (0, value)


# order_by, and the key Python sorts the rows by to get the documented order.
ORDERS: dict[str, tuple[Any, Any]] = {
    "ascending": ([Event.seq], lambda r: (r["seq"], r["id"])),
    "descending": (
        Event.seq.desc(),
        lambda r: (-r["seq"], r["id"]),
    ),
    "mixed": (
        [Event.name, Event.at.desc(), Event.amount],
        lambda r: (r["name"], -(r["at"] - BASE).total_seconds(), r["amount"], r["id"]),
    ),
    "nullable ascending": (
        [Event.tag],  # NULLs after every value
        lambda r: (_asc_nulls_last(r["tag"]), r["id"]),
    ),
    "nullable descending, then decimal": (
        [Event.tag.desc(), Event.amount.desc()],  # NULLs first
        lambda r: (r["tag"] is not None, _Reversed(r["tag"]), -r["amount"], r["id"]),
    ),
    "nullable, NULLs first asked": (
        [Event.tag.asc().nulls_first(), Event.at],
        lambda r: (r["tag"] is not None, r["tag"] or "", r["at"], r["id"]),
    ),
    "descending key": (
        [Event.amount, Event.id.desc()],
        lambda r: (r["amount"], _Reversed(r["id"])),
    ),
}


@dataclasses.dataclass(frozen=True)
class _Reversed:
    """Sorts in the reverse order of its value (None: equal to every other None)."""

    value: Any

    def __lt__(self, other: _Reversed) -> bool:
        if self.value is None or other.value is None:
            return False
        return bool(self.value > other.value)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return [_row(i) for i in range(ROWS)]


def _seed(engine: sqlalchemy.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as connection:
        connection.execute(sqlalchemy.insert(Event), rows)


async def _seed_async(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as connection:
        await connection.execute(sqlalchemy.insert(Event), rows)


# --- every row once, in order ----------------------------------------------------------------


@pytest.mark.parametrize("order", list(ORDERS))
def test_walking_every_page_yields_each_row_once_in_order(sync_engine, rows, order) -> None:
    _seed(sync_engine, rows)
    order_by, key = ORDERS[order]
    expected = [r["id"] for r in sorted(rows, key=key)]
    factory = ormkit.create_session_factory(sync_engine)
    seen: list[uuid.UUID] = []
    with UnitOfWork(factory) as uow:
        events = uow.repository(Events)
        after: str | None = None
        while True:
            with assert_queries(sync_engine, 1):
                page = events.page(order_by=order_by, limit=37, after=after)
            assert isinstance(page, Page)
            seen += [e.id for e in page.items]
            if page.next is None:
                break
            assert len(page.items) == 37
            after = page.next
    assert seen == expected


@pytest.mark.parametrize("order", list(ORDERS))
async def test_walking_every_page_yields_each_row_once_in_order_async(
    async_engine, rows, order
) -> None:
    await _seed_async(async_engine, rows)
    order_by, key = ORDERS[order]
    expected = [r["id"] for r in sorted(rows, key=key)]
    factory = ormkit.create_async_session_factory(async_engine)
    seen: list[uuid.UUID] = []
    async with AsyncUnitOfWork(factory) as uow:
        events = uow.repository(AsyncEvents)
        after: str | None = None
        while True:
            with assert_queries(async_engine, 1):
                page = await events.page(order_by=order_by, limit=37, after=after)
            seen += [e.id for e in page.items]
            if page.next is None:
                break
            after = page.next
    assert seen == expected


def test_criteria_totals_and_the_last_page(sync_engine, rows) -> None:
    _seed(sync_engine, rows)
    factory = ormkit.create_session_factory(sync_engine)
    matching = sorted((r for r in rows if r["seq"] < 3), key=lambda r: r["id"])
    with UnitOfWork(factory) as uow:
        events = uow.repository(Events)
        with count_queries(sync_engine) as log:
            first = events.page(Event.seq < 3, order_by=Event.id, limit=50, with_total=True)
        assert log.count == 2  # the page and one COUNT
        assert first.total == len(matching) == 82
        assert [e.id for e in first.items] == [r["id"] for r in matching[:50]]
        last = events.page(Event.seq < 3, order_by=Event.id, limit=50, after=first.next)
        assert [e.id for e in last.items] == [r["id"] for r in matching[50:]]
        assert (last.next, last.total) == (None, None)
        exact = events.page(Event.seq == 0, order_by=Event.id, limit=28)  # 28 rows: no next
        assert (len(exact.items), exact.next) == (28, None)
        empty = events.page(Event.seq > 99, order_by=Event.id, limit=5, with_total=True)
        assert (empty.items, empty.next, empty.total) == ((), None, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.next = None  # type: ignore[misc]


async def test_criteria_totals_and_the_last_page_async(async_engine, rows) -> None:
    await _seed_async(async_engine, rows)
    factory = ormkit.create_async_session_factory(async_engine)
    matching = sorted((r for r in rows if r["seq"] < 3), key=lambda r: r["id"])
    async with AsyncUnitOfWork(factory) as uow:
        events = uow.repository(AsyncEvents)
        with count_queries(async_engine) as log:
            first = await events.page(Event.seq < 3, order_by=Event.id, limit=50, with_total=True)
        assert log.count == 2
        assert first.total == 82
        last = await events.page(Event.seq < 3, order_by=Event.id, limit=50, after=first.next)
        assert [e.id for e in first.items + last.items] == [r["id"] for r in matching]
        assert last.next is None


# --- rows that come and go between pages ------------------------------------------------------


def test_inserts_and_deletes_between_pages_never_repeat_or_skip(sync_engine, rows) -> None:
    _seed(sync_engine, rows)
    factory = ormkit.create_session_factory(sync_engine)
    throughout = {r["id"] for r in rows}  # rows that exist from the first page to the last
    seen: list[uuid.UUID] = []
    added = 0
    after: str | None = None
    while True:
        with UnitOfWork(factory) as uow:  # a unit of work per page, as a web request would
            page = uow.repository(Events).page(
                order_by=[Event.seq.desc(), Event.tag], limit=40, after=after
            )
            seen += [e.id for e in page.items]
        if page.next is None:
            break
        after = page.next
        # Between pages, another writer inserts rows on both sides of the cursor and deletes
        # rows already seen and rows not seen yet.
        with sync_engine.begin() as connection:
            new = [_row(ROWS + added + k) for k in range(6)]
            added += 6
            connection.execute(sqlalchemy.insert(Event), new)
            gone = [r["id"] for r in rows[added * 3 : added * 3 + 4]] + seen[-2:]
            connection.execute(sqlalchemy.delete(Event).where(Event.id.in_(gone)))
            throughout -= set(gone)
    assert len(seen) == len(set(seen)), "a row repeated"
    assert throughout <= set(seen), "a row that existed throughout was skipped"


async def test_inserts_and_deletes_between_pages_never_repeat_or_skip_async(
    async_engine, rows
) -> None:
    await _seed_async(async_engine, rows)
    factory = ormkit.create_async_session_factory(async_engine)
    throughout = {r["id"] for r in rows}
    seen: list[uuid.UUID] = []
    added = 0
    after: str | None = None
    while True:
        async with AsyncUnitOfWork(factory) as uow:
            page = await uow.repository(AsyncEvents).page(
                order_by=[Event.amount, Event.tag.desc()], limit=40, after=after
            )
        seen += [e.id for e in page.items]
        if page.next is None:
            break
        after = page.next
        async with async_engine.begin() as connection:
            new = [_row(ROWS + added + k) for k in range(6)]
            added += 6
            await connection.execute(sqlalchemy.insert(Event), new)
            gone = [r["id"] for r in rows[added * 3 : added * 3 + 4]] + seen[-2:]
            await connection.execute(sqlalchemy.delete(Event).where(Event.id.in_(gone)))
            throughout -= set(gone)
    assert len(seen) == len(set(seen))
    assert throughout <= set(seen)


# --- cursors ---------------------------------------------------------------------------------

TRICKY = [
    dt.datetime(2026, 10, 25, 1, 30, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-9.5))),
    dt.datetime(1999, 12, 31, 23, 59, 59),  # noqa: DTZ001 - naive, as SQLite returns them
    dt.date(2000, 2, 29),
    dt.time(23, 59, 59, 999999, tzinfo=dt.timezone.utc),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    uuid.UUID("00000000-0000-4000-8000-0000000000ff"),
    Decimal("1.10"),
    Decimal("-0.000000000000000000000000001"),
    Decimal("12345678901234567890.123456789"),
    2**63 - 1,
    -(2**63),
    0.1,
    float("-inf"),
    "",
    'naïve ☃ \u2028 "quoted" \\ , [ ]',
    b"\x00\xff bytes",
    True,
    None,
]


@pytest.mark.parametrize("value", TRICKY, ids=repr)
def test_cursor_values_round_trip_exactly(value: object) -> None:
    kind = type(value) if value is not None else str
    term = _Term("v", Event.tag, descending=False, nulls_last=True, nullable=True, kind=kind)
    fingerprint = b"abcd"
    cursor = _encode(fingerprint, (value,))
    assert cursor.isascii()
    assert all(c.isalnum() or c in "-_" for c in cursor)  # URL-safe, no padding
    (back,) = _decode(cursor, fingerprint, (term,), "M")
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, (dt.datetime, dt.time)):
        assert back.utcoffset() == value.utcoffset()  # type: ignore[union-attr]
    if isinstance(value, Decimal):
        assert str(back) == str(value)  # the exponent too: 1.10 stays 1.10


def test_cursors_are_compact() -> None:
    terms = _terms(Event.__mapper__, [Event.at.desc(), Event.amount], postgresql.dialect())
    values = (BASE, Decimal("12.125"), uuid.uuid4())
    cursor = _encode(_fingerprint(Event.__mapper__, terms), values)
    assert len(cursor) < 110, cursor


def _first_page_cursor(sync_engine) -> tuple[Any, str]:
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        cursor = uow.repository(Events).page(order_by=[Event.seq, Event.tag], limit=10).next
    assert cursor is not None
    return factory, cursor


def test_altered_cursors_are_refused_before_any_sql(sync_engine, rows) -> None:
    _seed(sync_engine, rows[:30])
    factory, cursor = _first_page_cursor(sync_engine)
    original = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    refused = 0
    with UnitOfWork(factory) as uow, assert_queries(factory, 0):
        events = uow.repository(Events)
        for position in range(len(cursor)):
            for replacement in (alphabet[(alphabet.index(cursor[position]) + 1) % 64], "*"):
                altered = cursor[:position] + replacement + cursor[position + 1 :]
                try:
                    same = base64.urlsafe_b64decode(altered + "=" * (-len(altered) % 4))
                except ValueError:
                    same = b""
                if same == original:
                    continue  # the last character's spare bits, or a character base64 skips
                with pytest.raises(InvalidArgumentError, match="cursor"):
                    events.page(order_by=[Event.seq, Event.tag], limit=10, after=altered)
                refused += 1
        for malformed in ("", "x", "not a cursor!", "ĉu", cursor[:-4], cursor + "AAAA"):
            with pytest.raises(InvalidArgumentError, match="cursor"):
                events.page(order_by=[Event.seq, Event.tag], limit=10, after=malformed)
        uow.rollback()
    assert refused >= len(cursor)


def test_cursors_of_another_query_are_refused_before_any_sql(sync_engine, rows) -> None:
    _seed(sync_engine, rows[:30])
    factory, cursor = _first_page_cursor(sync_engine)

    class Users(Repository[User, int]):
        pass

    with UnitOfWork(factory) as uow, assert_queries(factory, 0):
        events = uow.repository(Events)
        for other in (
            [Event.seq],
            [Event.tag, Event.seq],
            [Event.seq.desc(), Event.tag],
            [Event.seq, Event.tag.nulls_first()],
            [Event.seq, Event.tag, Event.id.desc()],
            [Event.seq, Event.name],
        ):
            with pytest.raises(InvalidArgumentError, match="another query"):
                events.page(order_by=other, limit=10, after=cursor)
        with pytest.raises(InvalidArgumentError, match="another query"):
            uow.repository(Users).page(order_by=User.id, limit=10, after=cursor)
        uow.rollback()
    with UnitOfWork(factory) as uow:  # other criteria, the same order: the cursor holds
        page = uow.repository(Events).page(
            Event.name != "x", order_by=[Event.seq, Event.tag], limit=10, after=cursor
        )
        assert len(page.items) == 10


async def test_bad_cursors_are_refused_before_any_sql_async(async_engine, rows) -> None:
    await _seed_async(async_engine, rows[:30])
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        events = uow.repository(AsyncEvents)
        cursor = (await events.page(order_by=Event.seq, limit=10)).next
        assert cursor is not None
        with assert_queries(factory, 0):
            middle = len(cursor) // 2
            altered = (
                cursor[:middle] + ("A" if cursor[middle] != "A" else "B") + cursor[middle + 1 :]
            )
            for bad, words in ((altered, "cursor"), ("x" * 40, "cursor")):
                with pytest.raises(InvalidArgumentError, match=words):
                    await events.page(order_by=Event.seq, limit=10, after=bad)
            with pytest.raises(InvalidArgumentError, match="another query"):
                await events.page(order_by=Event.seq.desc(), limit=10, after=cursor)


# --- bad arguments -----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"order_by": Event.seq, "limit": 0}, "limit"),
    ({"order_by": Event.seq, "limit": -1}, "limit"),
    ({"order_by": Event.seq, "limit": True}, "limit"),
    ({"order_by": Event.seq, "limit": "10"}, "limit"),
    ({"order_by": "seq", "limit": 10}, "order"),
    ({"order_by": [], "limit": 10}, "needs an order_by"),
    ({"order_by": func.lower(Event.name), "limit": 10}, "expression"),
    ({"order_by": User.id, "limit": 10}, "column attributes of Event"),
    ({"order_by": [Event.seq, Event.seq.desc()], "limit": 10}, "twice"),
    ({"order_by": Event.seq, "limit": 10, "with_total": "yes"}, "with_total"),
    ({"order_by": Event.seq, "limit": 10, "after": 123}, "cursor string"),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_sql(sync_engine, kwargs, words) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow, assert_queries(factory, 0):
        with pytest.raises(InvalidArgumentError, match=words):
            uow.repository(Events).page(**kwargs)
        with pytest.raises(InvalidArgumentError, match="SQL criteria"):
            uow.repository(Events).page("seq > 3", order_by=Event.seq, limit=10)  # type: ignore[arg-type]
        uow.rollback()
