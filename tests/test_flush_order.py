"""FK ordering next to what SQLAlchemy orders itself: relationship() pairs, joined inheritance,
self-referencing rows, FK cycles. The core cases (three tables deep, deletes, autoflush) are in
test_uow.py and test_uow_async.py."""

from __future__ import annotations

import random
import warnings

import sqlalchemy
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

import ormkit
from ormkit import AsyncUnitOfWork, UnitOfWork
from ormkit._flush_order import _build
from ormkit.testing import count_queries
from tests.helpers import committed_ids, committed_ids_async
from tests.models import (
    Author,
    Base,
    Book,
    Child,
    Employee,
    Engineer,
    Left,
    Node,
    Parent,
    Right,
    Ticket,
)


def _mixed_rows() -> list[object]:
    author = Author(id=1)
    rows: list[object] = [
        Ticket(id=1, engineer_id=7),  # FK only, to a joined-inheritance subclass table
        Book(id=1, author=author),  # relationship(): SQLAlchemy's own ordering
        Engineer(id=7),
        author,
        Node(id=2, parent=Node(id=1)),  # self-referencing rows: SQLAlchemy's business
    ]
    random.Random(1).shuffle(rows)
    return rows


def test_relationship_inheritance_and_self_reference_still_flush(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        uow.add_all(_mixed_rows())
    assert committed_ids(sync_engine, Ticket) == [1]
    assert committed_ids(sync_engine, Book) == [1]
    assert committed_ids(sync_engine, Node) == [1, 2]
    with UnitOfWork(factory) as uow:  # and deletes, children first
        rows = [*uow.session.scalars(select(Ticket)), *uow.session.scalars(select(Engineer))]
        rows += [*uow.session.scalars(select(Book)), *uow.session.scalars(select(Author))]
        for row in reversed(rows):
            uow.session.delete(row)
    assert committed_ids(sync_engine, Ticket) == []


async def test_relationship_inheritance_and_self_reference_still_flush_async(
    async_engine: AsyncEngine,
) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        uow.add_all(_mixed_rows())
    assert await committed_ids_async(async_engine, Ticket) == [1]
    assert await committed_ids_async(async_engine, Node) == [1, 2]


def test_fk_cycles_add_no_edges_and_other_tables_keep_theirs() -> None:
    parents = _build([Base.registry])
    mapper = sqlalchemy.inspect
    assert mapper(Left) not in parents  # left_side <-> right_side is a cycle: left alone
    assert mapper(Right) not in parents
    assert parents[mapper(Child)] == (mapper(Parent),)
    assert set(parents[mapper(Ticket)]) == {mapper(Employee)}  # through the inheritance base


def test_fk_cycles_are_left_to_sqlalchemy(sync_engine) -> None:
    # Rows of a table cycle without references between them: no ordering needed, and the
    # cycle adds no edge that could deadlock SQLAlchemy's sort.
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        uow.add_all([Right(id=1), Left(id=1)])
    assert committed_ids(sync_engine, Left) == [1]


def test_ordering_raises_no_warning_and_keeps_one_flush(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with count_queries(factory) as log, UnitOfWork(factory) as uow:
            uow.add_all([Ticket(id=n, engineer_id=n) for n in range(1, 6)])
            uow.add_all([Engineer(id=n) for n in range(1, 6)])
    # employee, engineer, ticket: one batched round trip each (SQLAlchemy's own batching).
    assert [sql.split()[2] for sql in log.statements] == ["employee", "engineer", "ticket"]
