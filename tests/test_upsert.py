"""upsert_many / upsert: one INSERT ... ON CONFLICT ... RETURNING per chunk, the identity map kept
in step, concurrent writers of the same keys, and every refusal before any SQL. Sync tests run
on pysqlite and psycopg, async ones on aiosqlite, psycopg async and asyncpg."""

from __future__ import annotations

import asyncio
import math
import random
import threading

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    ConfigurationError,
    InvalidArgumentError,
    Repository,
    TransactionError,
    UnitOfWork,
)
from ormkit._checks import MAX_PARAMETERS
from ormkit.testing import assert_queries, count_queries
from tests.models import Engineer, Membership, Product


class Products(Repository[Product, int]):
    pass


class AsyncProducts(AsyncRepository[Product, int]):
    pass


class SmallChunks(Products):
    upsert_chunk_size = 7


class AsyncSmallChunks(AsyncProducts):
    upsert_chunk_size = 7


def _seed(engine: sqlalchemy.Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.insert(Product),
            [{"id": n, "sku": f"sku-{n}", "stock": n, "name": f"product {n}"} for n in (1, 2)],
        )


async def _seed_async(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            sqlalchemy.insert(Product),
            [{"id": n, "sku": f"sku-{n}", "stock": n, "name": f"product {n}"} for n in (1, 2)],
        )


def _stored(engine: sqlalchemy.Engine) -> dict[str, tuple[int, str, bool]]:
    with engine.connect() as connection:
        rows = connection.execute(select(Product.sku, Product.stock, Product.name, Product.touched))
        return {sku: (stock, name, touched) for sku, stock, name, touched in rows}


async def _stored_async(engine: AsyncEngine) -> dict[str, tuple[int, str, bool]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(Product.sku, Product.stock, Product.name, Product.touched)
        )
        return {sku: (stock, name, touched) for sku, stock, name, touched in rows}


# --- what it does --------------------------------------------------------------------------------


def test_inserts_new_and_updates_existing_in_one_statement(sync_engine) -> None:
    _seed(sync_engine)
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        products = uow.repository(Products)
        loaded = products.by_id(1)
        assert loaded is not None
        with assert_queries(sync_engine, 1) as log:
            result = products.upsert_many(
                [
                    {"id": 3, "sku": "sku-3", "stock": 30},
                    {"id": 1, "sku": "sku-1", "stock": 10},
                ]
            )
        assert "ON CONFLICT (id) DO UPDATE" in log.statements[0]
        assert "RETURNING" in log.statements[0]
        assert [p.id for p in result] == [3, 1]  # the order given
        assert result[1] is loaded  # the identity map's object...
        with assert_queries(sync_engine, 0):
            assert (loaded.stock, loaded.touched) == (10, True)  # ...with the new values, no SQL
            assert (result[0].stock, result[0].touched) == (30, False)
    stored = _stored(sync_engine)
    assert stored["sku-1"] == (10, "product 1", True)  # name not given: kept
    assert stored["sku-3"] == (30, "", False)  # inserted with the model's defaults


async def test_inserts_new_and_updates_existing_in_one_statement_async(async_engine) -> None:
    await _seed_async(async_engine)
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        products = uow.repository(AsyncProducts)
        loaded = await products.by_id(1)
        assert loaded is not None
        with assert_queries(async_engine, 1) as log:
            result = await products.upsert_many(
                [
                    {"id": 3, "sku": "sku-3", "stock": 30},
                    {"id": 1, "sku": "sku-1", "stock": 10},
                ]
            )
        assert "ON CONFLICT (id) DO UPDATE" in log.statements[0]
        assert [p.id for p in result] == [3, 1]
        assert result[1] is loaded
        with assert_queries(async_engine, 0):
            assert (loaded.stock, loaded.touched) == (10, True)
            assert (result[0].stock, result[0].touched) == (30, False)
    stored = await _stored_async(async_engine)
    assert stored["sku-1"] == (10, "product 1", True)
    assert stored["sku-3"] == (30, "", False)


def test_on_a_unique_column_and_a_composite_unique_constraint(sync_engine) -> None:
    _seed(sync_engine)
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        products = uow.repository(Products)
        by_sku = products.upsert_many(
            [{"id": 9, "sku": "sku-2", "stock": 20}, {"id": 5, "sku": "sku-5", "stock": 5}],
            on="sku",
            update=["stock"],
        )
        assert [(p.id, p.sku, p.stock) for p in by_sku] == [(2, "sku-2", 20), (5, "sku-5", 5)]
        one = products.upsert(
            {"id": 6, "sku": "sku-6", "region": "us", "code": "A", "stock": 1},
            on=(Product.region, Product.code),
        )
        again = products.upsert(
            {"id": 7, "sku": "sku-7", "region": "us", "code": "A", "stock": 2},
            on=(Product.code, Product.region),  # the constraint's columns, in any order
            update=("stock",),
        )
        assert again is one
        assert (one.id, one.sku, one.stock) == (6, "sku-6", 2)
    assert _stored(sync_engine)["sku-6"][0] == 2


async def test_on_a_unique_column_and_a_composite_unique_constraint_async(async_engine) -> None:
    await _seed_async(async_engine)
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        products = uow.repository(AsyncProducts)
        by_sku = await products.upsert_many(
            [{"id": 9, "sku": "sku-2", "stock": 20}, {"id": 5, "sku": "sku-5", "stock": 5}],
            on="sku",
            update=["stock"],
        )
        assert [(p.id, p.sku, p.stock) for p in by_sku] == [(2, "sku-2", 20), (5, "sku-5", 5)]
        one = await products.upsert(
            {"id": 6, "sku": "sku-6", "region": "us", "code": "A", "stock": 1},
            on=(Product.region, Product.code),
        )
        again = await products.upsert(
            {"id": 7, "sku": "sku-7", "region": "us", "code": "A", "stock": 2},
            on=(Product.code, Product.region),
            update=("stock",),
        )
        assert again is one
        assert (one.id, one.sku, one.stock) == (6, "sku-6", 2)


def test_update_empty_returns_existing_rows_unchanged(sync_engine) -> None:
    _seed(sync_engine)
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        products = uow.repository(Products)
        with assert_queries(sync_engine, 1):
            result = products.upsert_many(
                [{"id": 1, "sku": "sku-1", "stock": 99}, {"id": 4, "sku": "sku-4", "stock": 4}],
                update=(),
            )
        assert [(p.id, p.stock, p.touched) for p in result] == [(1, 1, False), (4, 4, False)]
    stored = _stored(sync_engine)
    assert stored["sku-1"] == (1, "product 1", False)
    assert stored["sku-4"] == (4, "", False)


async def test_update_empty_returns_existing_rows_unchanged_async(async_engine) -> None:
    await _seed_async(async_engine)
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        products = uow.repository(AsyncProducts)
        with assert_queries(async_engine, 1):
            result = await products.upsert_many(
                [{"id": 1, "sku": "sku-1", "stock": 99}, {"id": 4, "sku": "sku-4", "stock": 4}],
                update=(),
            )
        assert [(p.id, p.stock, p.touched) for p in result] == [(1, 1, False), (4, 4, False)]
    stored = await _stored_async(async_engine)
    assert stored["sku-1"] == (1, "product 1", False)


def _many(n: int, offset: int = 0) -> list[dict[str, object]]:
    return [{"id": i, "sku": f"sku-{i}", "stock": i + offset} for i in range(1, n + 1)]


def test_one_statement_per_chunk(sync_engine) -> None:
    _seed(sync_engine)
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        small = uow.repository(SmallChunks)
        with assert_queries(sync_engine, 3):  # 20 rows, 7 per statement
            result = small.upsert_many(list(reversed(_many(20, offset=100))))
        assert [p.id for p in result] == list(range(20, 0, -1))
        assert all(p.stock == p.id + 100 for p in result)
        products = uow.repository(Products)
        with assert_queries(sync_engine, 1):  # below the parameter limit: one statement
            assert len(products.upsert_many(_many(3000))) == 3000
        with assert_queries(sync_engine, 0):
            assert products.upsert_many([]) == []
    assert len(_stored(sync_engine)) == 3000


async def test_one_statement_per_chunk_async(async_engine) -> None:
    await _seed_async(async_engine)
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        small = uow.repository(AsyncSmallChunks)
        with assert_queries(async_engine, 3):
            result = await small.upsert_many(list(reversed(_many(20, offset=100))))
        assert [p.id for p in result] == list(range(20, 0, -1))
        assert all(p.stock == p.id + 100 for p in result)
        products = uow.repository(AsyncProducts)
        with assert_queries(async_engine, 1):
            assert len(await products.upsert_many(_many(3000))) == 3000
    assert len(await _stored_async(async_engine)) == 3000


def test_chunks_split_below_the_parameter_limit(sync_engine) -> None:
    # Each row binds one parameter per column at most: 7 columns, 30,000 parameters a statement
    # (999 on an SQLite before 3.32) give 4,285 rows a statement, so 9,000 rows take 3.
    per_statement = MAX_PARAMETERS // len(Product.__table__.columns)
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow, count_queries(sync_engine) as log:
        result = uow.repository(Products).upsert_many(_many(9000))
    assert log.count == math.ceil(9000 / per_statement) >= 3
    assert len(result) == 9000


def test_a_failed_upsert_rolls_the_unit_of_work_back(sync_engine) -> None:
    _seed(sync_engine)
    factory = ormkit.create_session_factory(sync_engine)
    # sku-2 exists with id 2: an INSERT of id 8 with it conflicts on sku, not on the id.
    with pytest.raises(sqlalchemy.exc.IntegrityError), UnitOfWork(factory) as uow:
        products = uow.repository(Products)
        products.upsert({"id": 5, "sku": "sku-5", "stock": 5})
        products.upsert_many([{"id": 8, "sku": "sku-2", "stock": 8}])
    assert set(_stored(sync_engine)) == {"sku-1", "sku-2"}  # nothing of the unit of work kept


# --- concurrent writers -------------------------------------------------------------------------

WRITERS = 20
KEYS = 40


def _writer_rows(writer: int) -> list[dict[str, object]]:
    rows = [{"sku": f"key-{k}", "stock": writer, "name": f"w{writer}"} for k in range(KEYS)]
    random.Random(writer).shuffle(rows)  # each writer its own order: a deadlock without sorting
    return rows


def _check_concurrent_result(stored: dict[str, tuple[int, str, bool]]) -> None:
    assert sorted(stored) == sorted(f"key-{k}" for k in range(KEYS))  # one row per key
    for stock, name, _ in stored.values():
        assert name == f"w{stock}"  # each row whole from one writer
        assert 0 <= stock < WRITERS


@pytest.mark.reliability
def test_concurrent_writers_of_the_same_keys(sync_url) -> None:
    engine = ormkit.create_engine(sync_url, pool_size=WRITERS, max_overflow=0)
    try:
        Product.__table__.create(engine)
        factory = ormkit.create_session_factory(engine)
        errors: list[BaseException] = []
        start = threading.Barrier(WRITERS)

        def write(writer: int) -> None:
            try:
                start.wait()
                with UnitOfWork(factory) as uow:
                    uow.repository(Products).upsert_many(
                        [
                            dict(row, id=10_000 * writer + i)
                            for i, row in enumerate(_writer_rows(writer))
                        ],
                        on="sku",
                        update=("stock", "name"),
                    )
            except BaseException as exc:  # noqa: BLE001 - every error fails the test below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        _check_concurrent_result(_stored(engine))
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


@pytest.mark.reliability
async def test_concurrent_writers_of_the_same_keys_async(async_url) -> None:
    engine = ormkit.create_async_engine(async_url, pool_size=WRITERS, max_overflow=0)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Product.__table__.create)
        factory = ormkit.create_async_session_factory(engine)

        async def write(writer: int) -> None:
            async with AsyncUnitOfWork(factory) as uow:
                await uow.repository(AsyncProducts).upsert_many(
                    [
                        dict(row, id=10_000 * writer + i)
                        for i, row in enumerate(_writer_rows(writer))
                    ],
                    on="sku",
                    update=("stock", "name"),
                )

        results = await asyncio.wait_for(
            asyncio.gather(*(write(w) for w in range(WRITERS)), return_exceptions=True), 60
        )
        assert [r for r in results if r is not None] == []
        _check_concurrent_result(await _stored_async(engine))
        assert engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


# --- refused before any SQL ---------------------------------------------------------------------

REFUSALS = [
    # (rows, keyword arguments, error, words of the message)
    ([{"id": 1, "sku": "a"}, {"id": 1, "sku": "b"}], {}, InvalidArgumentError, "same key"),
    (
        [{"id": 1, "sku": "a"}, {"id": 2, "sku": "a"}],
        {"on": "sku"},
        InvalidArgumentError,
        "same key",
    ),
    ([{"id": 1, "colour": "red"}], {}, InvalidArgumentError, "colour"),
    ([{"id": 1, "sku": "a"}], {"on": "stock"}, InvalidArgumentError, "unique"),
    ([{"id": 1, "sku": "a"}], {"on": ("region",)}, InvalidArgumentError, "unique"),
    ([{"id": 1, "sku": "a"}], {"on": "nope"}, InvalidArgumentError, "nope"),
    ([{"id": 1, "sku": "a"}], {"on": ()}, InvalidArgumentError, "at least one"),
    ([{"id": 1, "sku": "a"}], {"update": ["colour"]}, InvalidArgumentError, "colour"),
    ([{"id": 1, "sku": "a"}], {"update": ["stock"]}, InvalidArgumentError, "do not give"),
    ([{"id": 1, "sku": "a"}], {"on": 3}, InvalidArgumentError, "attribute names"),
    ([{"sku": "a"}], {}, InvalidArgumentError, "conflict key"),
    ([{"id": None, "sku": "a"}], {}, InvalidArgumentError, "conflict key"),
    ([{"id": 1, "sku": "a"}, {"id": 2}], {}, InvalidArgumentError, "same attributes"),
    ([{"id": 1}, "row"], {}, InvalidArgumentError, "row 1"),
    ([{}], {}, InvalidArgumentError, "non-empty"),
    ({"id": 1, "sku": "a"}, {}, InvalidArgumentError, "upsert()"),
    ("rows", {}, InvalidArgumentError, "list of rows"),
    ([{"id": [1], "sku": "a"}], {}, InvalidArgumentError, "takes int values"),
    ([{"id": "1", "sku": "a"}], {}, InvalidArgumentError, "takes int values"),
]


@pytest.mark.parametrize(("rows", "kwargs", "error", "words"), REFUSALS)
def test_refusals_before_any_sql(sync_engine, rows, kwargs, error, words) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow, assert_queries(factory, 0):
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            uow.repository(Products).upsert_many(rows, **kwargs)
        uow.rollback()


@pytest.mark.parametrize(("rows", "kwargs", "error", "words"), REFUSALS[:3])
async def test_refusals_before_any_sql_async(async_engine, rows, kwargs, error, words) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        with assert_queries(factory, 0), pytest.raises(error, match=words):
            await uow.repository(AsyncProducts).upsert_many(rows, **kwargs)
        await uow.rollback()


def test_upsert_refuses_several_rows_and_models_of_two_tables(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)

    class Engineers(Repository[Engineer, int]):
        pass

    class Memberships(Repository[Membership, tuple[int, int]]):
        pass

    with UnitOfWork(factory) as uow, assert_queries(factory, 0):
        with pytest.raises(InvalidArgumentError, match="one row as a mapping"):
            uow.repository(Products).upsert([{"id": 1, "sku": "a"}])  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="2 \\(employee, engineer\\)"):
            uow.repository(Engineers).upsert_many([{"id": 1, "kind": "engineer"}])
        uow.rollback()
    # A composite primary key is the default target.
    with UnitOfWork(factory) as uow:
        memberships = uow.repository(Memberships)
        first = memberships.upsert({"tenant_id": 1, "user_id": 2, "role": "owner"})
        second = memberships.upsert({"tenant_id": 1, "user_id": 2, "role": "admin"})
        assert second is first
        assert first.role == "admin"


def test_upsert_chunk_size_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="upsert_chunk_size must be None"):

        class Bad(Products):
            upsert_chunk_size = 0


def test_read_only_units_of_work_refuse_upserts(sync_engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with (
        UnitOfWork(factory, read_only=True) as uow,
        assert_queries(factory, 0),
        pytest.raises(TransactionError, match="upsert_many\\(\\) is refused"),
    ):
        uow.repository(Products).upsert_many([{"id": 1, "sku": "a"}])


async def test_read_only_units_of_work_refuse_upserts_async(async_engine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory, read_only=True) as uow:
        with (
            assert_queries(factory, 0),
            pytest.raises(TransactionError, match="upsert\\(\\) is refused"),
        ):
            await uow.repository(AsyncProducts).upsert({"id": 1, "sku": "a"})


async def test_unflushed_objects_are_flushed_before_the_upsert_async(async_engine) -> None:
    # The async twin's own check: with autoflush off, a pending object of the same key must
    # reach the database first, or the upsert inserts the row and the flush collides with it.
    await _seed_async(async_engine)
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        products = uow.repository(AsyncProducts)
        with uow.session.no_autoflush:
            pending = products.add(Product(id=5, sku="sku-5", stock=5))
            changed = await products.by_id(1)
            assert changed is not None
            changed.stock = 111
            assert await products.upsert({"id": 5, "sku": "sku-5", "stock": 50}) is pending
            assert await products.upsert({"id": 1, "sku": "sku-1"}, update=()) is changed
        assert (pending.stock, changed.stock) == (50, 111)
    stored = await _stored_async(async_engine)
    assert (stored["sku-1"][0], stored["sku-5"][0]) == (111, 50)
