"""FK ordering next to what SQLAlchemy orders itself: relationship() pairs, joined inheritance,
self-referencing rows, FK cycles; and the FK graph cache. The core cases (three tables deep,
deletes, autoflush) are in test_uow.py and test_uow_async.py."""

from __future__ import annotations

import gc
import random
import warnings
import weakref

import sqlalchemy
import sqlalchemy.orm
from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import ormkit
from ormkit import AsyncUnitOfWork, UnitOfWork
from ormkit import _flush_order as flush_order
from ormkit._flush_order import _build, _components
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


# Two FK cycles (z1 <-> z2, b1 <-> b2, broken with use_alter so the tables can be created), an FK
# from one cycle to the other (b1 -> z1), from a cycle to a plain table (z2 -> root) and from a
# plain table to a cycle (leaf -> b2). Only the FKs inside a cycle are SQLAlchemy's business.
class CycleBase(DeclarativeBase):
    pass


class Root(CycleBase):
    __tablename__ = "cycle_root"

    id: Mapped[int] = mapped_column(primary_key=True)


class Z1(CycleBase):
    __tablename__ = "z1"

    id: Mapped[int] = mapped_column(primary_key=True)
    z2_id: Mapped[int | None] = mapped_column(
        ForeignKey("z2.id", use_alter=True, name="fk_z1_z2"), default=None
    )


class Z2(CycleBase):
    __tablename__ = "z2"

    id: Mapped[int] = mapped_column(primary_key=True)
    z1_id: Mapped[int | None] = mapped_column(
        ForeignKey("z1.id", use_alter=True, name="fk_z2_z1"), default=None
    )
    root_id: Mapped[int | None] = mapped_column(ForeignKey("cycle_root.id"), default=None)


class B1(CycleBase):
    __tablename__ = "b1"

    id: Mapped[int] = mapped_column(primary_key=True)
    b2_id: Mapped[int | None] = mapped_column(
        ForeignKey("b2.id", use_alter=True, name="fk_b1_b2"), default=None
    )
    z1_id: Mapped[int | None] = mapped_column(ForeignKey("z1.id"), default=None)


class B2(CycleBase):
    __tablename__ = "b2"

    id: Mapped[int] = mapped_column(primary_key=True)
    b1_id: Mapped[int | None] = mapped_column(
        ForeignKey("b1.id", use_alter=True, name="fk_b2_b1"), default=None
    )


class Leaf(CycleBase):
    __tablename__ = "cycle_leaf"

    id: Mapped[int] = mapped_column(primary_key=True)
    b2_id: Mapped[int | None] = mapped_column(ForeignKey("b2.id"), default=None)


def test_fk_edges_are_dropped_only_inside_one_cycle() -> None:
    parents = _build([CycleBase.registry])
    mapper = sqlalchemy.inspect
    assert parents[mapper(B1)] == (mapper(Z1),)  # between two cycles
    assert parents[mapper(Z2)] == (mapper(Root),)  # from a cycle to a plain table
    assert parents[mapper(Leaf)] == (mapper(B2),)  # from a plain table to a cycle
    assert mapper(Z1) not in parents  # z1 -> z2 is inside a cycle
    assert mapper(B2) not in parents


def test_components_are_strongly_connected_groups_found_without_recursion() -> None:
    chain = [(n, n + 1) for n in range(10_000)]  # far deeper than Python's recursion limit
    component = _components([*chain, (20, 10), (30, 25), (27, 31), (31, 27)])
    assert len({component[n] for n in range(10, 21)}) == 1  # one cycle, 10 -> ... -> 20 -> 10
    assert len({component[n] for n in range(25, 32)}) == 1  # 25..30 with 27 <-> 31 inside
    assert len(set(component.values())) == 10_001 - 10 - 6
    assert component[9] != component[10] != component[21] != component[25]


def _rows_across_cycles() -> list[object]:
    # Insert order matters only along the FKs that leave a cycle: z1 before b1 (what failed),
    # cycle_root before z2, b2 before cycle_leaf.
    return [
        Leaf(id=1, b2_id=1),
        B1(id=1, z1_id=1),
        B2(id=1),
        Z2(id=1, root_id=1),
        Z1(id=1),
        Root(id=1),
    ]


def _delete_rows_across_cycles(session: sqlalchemy.orm.Session) -> None:
    # Everything loaded before the first delete (a query would autoflush it), parents first:
    # the wrong order for deletes.
    models: list[type[CycleBase]] = [Root, Z1, Z2, B1, B2, Leaf]
    rows = [row for model in models for row in session.scalars(select(model))]
    for row in rows:
        session.delete(row)


def test_fk_between_cycles_orders_the_flush(sync_engine) -> None:
    CycleBase.metadata.create_all(sync_engine)
    try:
        factory = ormkit.create_session_factory(sync_engine)
        with UnitOfWork(factory) as uow:
            uow.add_all(_rows_across_cycles())
        assert committed_ids(sync_engine, B1) == [1]
        assert committed_ids(sync_engine, Leaf) == [1]
        with UnitOfWork(factory) as uow:
            _delete_rows_across_cycles(uow.session)
        assert committed_ids(sync_engine, Z1) == []
        assert committed_ids(sync_engine, Root) == []
    finally:
        CycleBase.metadata.drop_all(sync_engine)


async def test_fk_between_cycles_orders_the_flush_async(async_engine: AsyncEngine) -> None:
    async with async_engine.begin() as connection:
        await connection.run_sync(CycleBase.metadata.create_all)
    try:
        factory = ormkit.create_async_session_factory(async_engine)
        async with AsyncUnitOfWork(factory) as uow:
            uow.add_all(_rows_across_cycles())
        assert await committed_ids_async(async_engine, B1) == [1]
        assert await committed_ids_async(async_engine, Leaf) == [1]
        async with AsyncUnitOfWork(factory) as uow:
            await uow.session.run_sync(_delete_rows_across_cycles)
        assert await committed_ids_async(async_engine, Z1) == []
        assert await committed_ids_async(async_engine, Root) == []
    finally:
        async with async_engine.begin() as connection:
            await connection.run_sync(CycleBase.metadata.drop_all)


# The graph cache must not keep a registry, its mappers or its classes alive.
def _flush_through_a_fresh_base(*, through_ormkit: bool) -> tuple[weakref.ref[object], ...]:
    class FreshBase(DeclarativeBase):
        pass

    class Owner(FreshBase):
        __tablename__ = "owner"

        id: Mapped[int] = mapped_column(primary_key=True)

    class Pet(FreshBase):
        __tablename__ = "pet"

        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owner.id"))

    engine = ormkit.create_engine("sqlite://")
    FreshBase.metadata.create_all(engine)
    if through_ormkit:  # one flush, ordered by the FK graph
        with UnitOfWork(ormkit.create_session_factory(engine)) as uow:
            uow.add_all([Pet(id=1, owner_id=1), Owner(id=1)])
    else:  # plain SQLAlchemy does not order FK-only pairs: flush the parent first
        with Session(engine) as session, session.begin():
            session.add(Owner(id=1))
            session.flush()
            session.add(Pet(id=1, owner_id=1))
    assert committed_ids(engine, Pet) == [1]
    engine.dispose()
    return weakref.ref(FreshBase.registry), weakref.ref(Pet), weakref.ref(sqlalchemy.inspect(Pet))


def test_flush_order_cache_keeps_no_registry_alive(monkeypatch) -> None:
    builds = _count_builds(monkeypatch)
    # Plain SQLAlchemy first: its classes' configuration would also clear ormkit's cache.
    plain = _flush_through_a_fresh_base(through_ormkit=False)
    gc.collect()
    assert [ref() for ref in plain] == [None, None, None]
    assert builds == []
    kept = _flush_through_a_fresh_base(through_ormkit=True)
    assert len(builds) == 1  # the graph was built, and cached
    gc.collect()
    assert [ref() for ref in kept] == [None, None, None]


def _count_builds(monkeypatch) -> list[int]:
    builds: list[int] = []  # only a count: keeping what _build was given would keep it alive
    real_build = flush_order._build

    def counting_build(registries):
        builds.append(len(builds) + 1)
        return real_build(registries)

    monkeypatch.setattr(flush_order, "_build", counting_build)
    return builds


def test_flush_order_graph_is_cached_until_new_mappers_are_configured(monkeypatch) -> None:
    class FreshBase(DeclarativeBase):
        pass

    class Owner(FreshBase):
        __tablename__ = "owner"

        id: Mapped[int] = mapped_column(primary_key=True)

    class Pet(FreshBase):
        __tablename__ = "pet"

        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owner.id"))

    sqlalchemy.orm.configure_mappers()
    builds = _count_builds(monkeypatch)
    engine = ormkit.create_engine("sqlite://")
    factory = ormkit.create_session_factory(engine)
    try:
        FreshBase.metadata.create_all(engine)
        for n in (1, 2):
            with UnitOfWork(factory) as uow:
                uow.add_all([Pet(id=n, owner_id=n), Owner(id=n)])
        assert len(builds) == 1  # the second flush used the cached graph

        class Collar(FreshBase):  # a new mapper with a new FK: the graph must be built again
            __tablename__ = "collar"

            id: Mapped[int] = mapped_column(primary_key=True)
            pet_id: Mapped[int] = mapped_column(ForeignKey("pet.id"))

        sqlalchemy.orm.configure_mappers()
        FreshBase.metadata.create_all(engine)
        with UnitOfWork(factory) as uow:
            uow.add_all([Collar(id=1, pet_id=3), Pet(id=3, owner_id=3), Owner(id=3)])
        assert len(builds) == 2
        assert committed_ids(engine, Collar) == [1]
        with UnitOfWork(factory) as uow:
            uow.add_all([Collar(id=2, pet_id=4), Pet(id=4, owner_id=1)])
        assert len(builds) == 2
    finally:
        engine.dispose()
