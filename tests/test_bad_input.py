"""A catalogue of bad input across the public API, each refused the same way.

Every case asserts three things: an `OrmkitError` of the expected class whose message names the
problem and the fix (each listed fragment appears in it); no SQL was sent (`count_queries` on
the engine, and no connection taken from the pool); nothing changed (the rows of the tables,
read from another connection, are the same before and after, also after the unit of work that
the call ran in has been left). Cases that touch a database run on every backend of their
flavour: the sync ones on pysqlite and psycopg, the async ones on aiosqlite, psycopg async and
asyncpg; "twin" cases run on all five, the async call awaited. Cases without a database (engine
URLs and options) run once.

Each backend's database is made and filled once per module (a database per case, as the shared
fixtures make, took this module from seconds to minutes); every case proves it left the rows as
they were, so the next starts from the same state.

docs/bad-input.md shows the catalogue as a table; `test_the_docs_table_is_the_catalogue` keeps
the two identical. Known gaps in modules another change owns are cases marked xfail (strict):
they fail today, and pass once fixed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from flask import Flask
from sqlalchemy import URL, BigInteger, SmallInteger, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    OrmkitError,
    Repository,
    TransactionError,
    UnitOfWork,
)
from ormkit.fastapi import repository as fastapi_repository
from ormkit.fastapi import unit_of_work as fastapi_unit_of_work
from ormkit.flask import Ormkit
from ormkit.flask import uow as flask_uow
from ormkit.testing import assert_max_queries, assert_queries, count_queries, rolled_back
from tests.models import Base, Membership, Parent, User
from tests.pgserver import PostgresServer

pytestmark = pytest.mark.reliability

DOCS = Path(__file__).parent.parent / "docs" / "bad-input.md"

SYNC_DRIVERS = {"sqlite": "sqlite+pysqlite", "psycopg": "postgresql+psycopg"}
ASYNC_DRIVERS = {
    "aiosqlite": "sqlite+aiosqlite",
    "psycopg_async": "postgresql+psycopg_async",
    "asyncpg": "postgresql+asyncpg",
}


# --- the repositories and models the cases use -----------------------------------------------


class UserRepository(Repository[User, int]):
    pass


class AsyncUserRepository(AsyncRepository[User, int]):
    pass


class MembershipRepository(Repository[Membership, tuple[int, int]]):
    pass


class AsyncMembershipRepository(AsyncRepository[Membership, tuple[int, int]]):
    pass


class NotMapped:
    pass


class UnmappedRepository(Repository[NotMapped, int]):
    pass


class AsyncUnmappedRepository(AsyncRepository[NotMapped, int]):
    pass


class ModellessRepository(Repository):  # type: ignore[type-arg]
    pass


class AsyncModellessRepository(AsyncRepository):  # type: ignore[type-arg]
    pass


class ZeroChunkRepository(Repository[User, int]):
    pass


class AsyncZeroChunkRepository(AsyncRepository[User, int]):
    pass


# Set after the class is defined (where the class body would be refused at once): by_ids finds
# it at use.
ZeroChunkRepository.key_chunk_size = 0
AsyncZeroChunkRepository.key_chunk_size = 0


async def _async_callback() -> None:
    pass


class StringModelRepository(Repository[User, int]):
    model = "User"  # type: ignore[assignment]


class AsyncStringModelRepository(AsyncRepository[User, int]):
    model = "User"  # type: ignore[assignment]


# --- what a case gets: both flavours behind the same names ------------------------------------


class Ctx:
    """What a case's call works with; the same names for the sync and the async flavour.

    `uow` is open while the call runs (and left cleanly afterwards, so anything the call slipped
    into it would be committed and seen); `users` and `memberships` are repositories over its
    session; `ended` is a unit of work that has been left, `fresh` one never entered.
    """

    def __init__(self, flavour: str, engine: Any) -> None:
        self.flavour = flavour
        self.engine = engine
        self.is_async = flavour == "async"
        make = (
            ormkit.create_async_session_factory if self.is_async else ormkit.create_session_factory
        )
        self.factory = make(engine)
        self.uow_class: Any = AsyncUnitOfWork if self.is_async else UnitOfWork
        self.uow: Any = self.uow_class(self.factory)
        self.ended: Any = self.uow_class(self.factory)
        self.fresh: Any = self.uow_class(self.factory)
        self.users: Any = None
        self.memberships: Any = None

    def pick(self, sync: Any, async_: Any) -> Any:
        """`sync` for the sync flavour, `async_` for the async one."""
        return async_ if self.is_async else sync

    @property
    def other_factory(self) -> Any:
        """A session factory of the other flavour (never used to connect)."""
        if self.is_async:
            return ormkit.create_session_factory(ormkit.create_engine("sqlite://"))
        return ormkit.create_async_session_factory(
            ormkit.create_async_engine("sqlite+aiosqlite://")
        )

    def enter(self, context_manager: Any) -> Any:
        """Enter a context manager as a `with`/`async with` block would."""
        return context_manager.__aenter__() if self.is_async else context_manager.__enter__()

    def exit(self, context_manager: Any) -> Any:
        """Leave a context manager cleanly, as the end of a block would."""
        if self.is_async:
            return context_manager.__aexit__(None, None, None)
        return context_manager.__exit__(None, None, None)

    def run(self, work: Any = None, /, **options: Any) -> Any:
        """`UnitOfWork.run` (awaitable for async) of work that would add a row if it ran."""

        def add_a_row(uow: Any) -> None:
            uow.add(User(id=99, name="from run"))

        async def add_a_row_async(uow: Any) -> None:
            add_a_row(uow)

        chosen = work if work is not None else self.pick(add_a_row, add_a_row_async)
        return self.uow_class.run(self.factory, chosen, **options)


def _watch(target: Any, expected: Any = None) -> None:
    """Enter (and leave) count_queries, or assert_queries when `expected` is given."""
    manager = count_queries(target) if expected is None else assert_queries(target, expected)
    with manager:
        pass


def _watch_max(target: Any, maximum: Any) -> None:
    with assert_max_queries(target, maximum):
        pass


def _rolled_back_twice(c: Ctx) -> object:
    """Enter a rolled_back block of the factory, and the same block again inside it."""
    isolated: Any = rolled_back(c.factory)
    if c.is_async:

        async def twice() -> None:
            async with isolated, isolated:
                pass

        return twice()
    with isolated, isolated:
        pass
    return None


async def _async_work(uow: Any) -> None:
    uow.add(User(id=97, name="never"))


def _watch_a_connection(_c: Ctx) -> None:
    engine = ormkit.create_engine("sqlite://")  # a connection of another engine: no checkout here
    try:
        with engine.connect() as connection:
            _watch(connection)
    finally:
        engine.dispose()


# --- the catalogue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # the call, as the docs table shows it (async: the same call, awaited)
    call: Callable[[Ctx], object] | Callable[[], object]
    error: type[OrmkitError]
    says: tuple[str, ...]  # fragments of the message: the problem and the fix
    where: str = "twin"  # "twin" (all five backends), "sync", "async", "static" (no database)
    only: str | None = None  # a dialect name: run only on its backends
    never: tuple[str, ...] = ()  # must not appear in the message
    gap: str | None = None  # a known gap in a module this change does not own: xfail(strict)


KEY = "one value (id: int)"
COMPOSITE = "a tuple of 2 values in primary-key column order (tenant_id: int, user_id: int)"
SQL_CRITERIA = "takes SQL criteria such as `User.name == 'roach'`"
ORDER_BY = "order_by takes a column or a list of columns such as User.name"
OPTIONS = "options takes a list of loader options such as [joinedload(User.addresses)]"
SYNCHRONIZE = "synchronize_session must be one of 'auto', 'evaluate', 'fetch' or False"
VALUES = "takes the new values as a non-empty mapping such as {'name': 'roach'}"
UPDATE_KEYS = "update_where() sets attributes of User: name them as strings"
ENDED = ("after the unit of work ended", "open a new one with", "UnitOfWork(factory) as uow:")


def _case(
    id_: str,
    input_: str,
    call: Callable[..., object],
    error: type[OrmkitError],
    *says: str,
    **extra: Any,
) -> Case:
    return Case(id_, input_, call, error, says, **extra)


# Never connected: the web cases are refused before anything touches a database.
_UNUSED_ASYNC_FACTORY = ormkit.create_async_session_factory("sqlite+aiosqlite://")


def _two_ormkits() -> None:
    app = Flask("bad_input")
    Ormkit(app, ormkit.create_session_factory("sqlite://"))
    Ormkit(app, ormkit.create_session_factory("sqlite://"))


# fmt: off
CATALOGUE: list[Case] = [
    # --- primary keys ---
    _case("by_id-none", "users.by_id(None)", lambda c: c.users.by_id(None), InvalidKeyError,
          "bad primary key for User", "got None", KEY),
    _case("by_id-str", 'users.by_id("1")', lambda c: c.users.by_id("1"), InvalidKeyError,
          "got '1'", KEY),
    _case("by_id-float", "users.by_id(1.5)", lambda c: c.users.by_id(1.5), InvalidKeyError,
          "got 1.5", KEY),
    _case("by_id-bool", "users.by_id(True)", lambda c: c.users.by_id(True), InvalidKeyError,
          "got True", KEY),
    _case("by_id-tuple", "users.by_id((1,))", lambda c: c.users.by_id((1,)), InvalidKeyError,
          "got (1,)", KEY),
    _case("by_id-list", "users.by_id([1])  (unhashable)", lambda c: c.users.by_id([1]),
          InvalidKeyError, "got [1]", KEY),
    _case("by_id-dict", 'users.by_id({"id": 1})  (unhashable)',
          lambda c: c.users.by_id({"id": 1}), InvalidKeyError, "got {'id': 1}", KEY),
    _case("by_id-set", "users.by_id({1})  (unhashable)", lambda c: c.users.by_id({1}),
          InvalidKeyError, "got {1}", KEY),
    _case("by_id-beyond-64-bits", "users.by_id(2**63)", lambda c: c.users.by_id(2**63),
          InvalidKeyError, "got 9223372036854775808",
          "User.id takes an integer from",
          "so no row has this key"),
    _case("by_id-beyond-int4", "users.by_id(2**31)  (PostgreSQL: an integer column)",
          lambda c: c.users.by_id(2**31), InvalidKeyError, "got 2147483648",
          "User.id takes an integer from -2147483648 to 2147483647 on postgresql",
          only="postgresql"),
    _case("by_id-options-str", 'users.by_id(1, options="x")',
          lambda c: c.users.by_id(1, options="x"), InvalidArgumentError, OPTIONS, "got 'x'"),
    _case("by_id-options-none", "users.by_id(1, options=None)",
          lambda c: c.users.by_id(1, options=None), InvalidArgumentError, OPTIONS,
          "(or () for none)",
          "got None"),
    _case("by_id-for_update-str", 'users.by_id(1, for_update="nowait")',
          lambda c: c.users.by_id(1, for_update="nowait"), InvalidArgumentError,
          "for_update must be True or False, got 'nowait'", "with_for_update={'nowait': True}"),
    _case("by_id_or_raise-none", "users.by_id_or_raise(None)",
          lambda c: c.users.by_id_or_raise(None), InvalidKeyError, "bad primary key for User", KEY),
    _case("by_ids-bad-key", "users.by_ids([1, None])", lambda c: c.users.by_ids([1, None]),
          InvalidKeyError, "got None", KEY),
    _case("by_ids-unhashable-key", "users.by_ids([[1]])", lambda c: c.users.by_ids([[1]]),
          InvalidKeyError, "got [1]", KEY),
    _case("by_ids-key-beyond-64-bits", "users.by_ids([1, 2**63])",
          lambda c: c.users.by_ids([1, 2**63]), InvalidKeyError, "so no row has this key"),
    _case("by_ids-none", "users.by_ids(None)", lambda c: c.users.by_ids(None),
          InvalidArgumentError, "by_ids() takes an iterable of primary keys such as [1, 2, 3]",
          "got None"),
    _case("by_ids-str", 'users.by_ids("123")', lambda c: c.users.by_ids("123"),
          InvalidArgumentError, "by_ids() takes an iterable of primary keys", "got '123'",
          "wrap it in a list"),
    _case("by_ids-int", "users.by_ids(1)", lambda c: c.users.by_ids(1), InvalidArgumentError,
          "by_ids() takes an iterable of primary keys", "got 1 (int)", "use by_id()"),
    _case("composite-scalar", "memberships.by_id(1)", lambda c: c.memberships.by_id(1),
          InvalidKeyError, "bad primary key for Membership", "got 1", COMPOSITE),
    _case("composite-short", "memberships.by_id((1,))", lambda c: c.memberships.by_id((1,)),
          InvalidKeyError, "got (1,)", COMPOSITE),
    _case("composite-long", "memberships.by_id((1, 2, 3))",
          lambda c: c.memberships.by_id((1, 2, 3)), InvalidKeyError, "got (1, 2, 3)", COMPOSITE),
    _case("composite-none-inside", "memberships.by_id((1, None))",
          lambda c: c.memberships.by_id((1, None)), InvalidKeyError, "got (1, None)", COMPOSITE),
    _case("composite-wrong-kind", 'memberships.by_id(("1", 2))',
          lambda c: c.memberships.by_id(("1", 2)), InvalidKeyError, "got ('1', 2)", COMPOSITE),
    _case("composite-list", "memberships.by_id([1, 2])", lambda c: c.memberships.by_id([1, 2]),
          InvalidKeyError, "got [1, 2]", COMPOSITE),
    _case("composite-dict", 'memberships.by_id({"tenant_id": 1, "user_id": 2})',
          lambda c: c.memberships.by_id({"tenant_id": 1, "user_id": 2}), InvalidKeyError,
          COMPOSITE),
    _case("composite-by_ids", "memberships.by_ids([(1, 1), (1,)])",
          lambda c: c.memberships.by_ids([(1, 1), (1,)]), InvalidKeyError, "got (1,)", COMPOSITE),
    _case("composite-beyond-int4", "memberships.by_id((1, 2**31))  (PostgreSQL)",
          lambda c: c.memberships.by_id((1, 2**31)), InvalidKeyError,
          "Membership.user_id takes an integer from -2147483648 to 2147483647", only="postgresql"),
    # --- criteria ---
    _case("find-bool", "users.find(True)", lambda c: c.users.find(True), InvalidArgumentError,
          f"find() {SQL_CRITERIA}", "got True (bool)", "two Python values were compared"),
    _case("find_one-str", "users.find_one(\"name = 'a'\")",
          lambda c: c.users.find_one("name = 'a'"), InvalidArgumentError,
          f"find_one() {SQL_CRITERIA}", "wrap SQL text in sqlalchemy.text()"),
    _case("count-int", "users.count(1)", lambda c: c.users.count(1), InvalidArgumentError,
          f"count() {SQL_CRITERIA}", "got 1 (int)", "compare a column with a value"),
    _case("exists-none", "users.exists(None)", lambda c: c.users.exists(None),
          InvalidArgumentError, f"exists() {SQL_CRITERIA}", "got None"),
    _case("find-class", "users.find(User)", lambda c: c.users.find(User), InvalidArgumentError,
          "got the class User"),
    _case("find-not-true-or-false", "users.find(User.name)", lambda c: c.users.find(User.name),
          InvalidArgumentError, "find() takes true-or-false SQL criteria",
          "got User.name (a str expression)", "compare it with a value"),
    _case("update_where-no-criteria", 'users.update_where({"name": "x"})',
          lambda c: c.users.update_where({"name": "x"}), InvalidArgumentError,
          "update_where() without criteria would touch every row of User",
          "pass sqlalchemy.true() to mean that"),
    _case("delete_where-no-criteria", "users.delete_where()", lambda c: c.users.delete_where(),
          InvalidArgumentError, "delete_where() without criteria would touch every row of User",
          "sqlalchemy.true()"),
    # --- upsert and pages ---
    _case("upsert_many-same-key", 'users.upsert_many([{"id": 1}, {"id": 1}])',
          lambda c: c.users.upsert_many([{"id": 1}, {"id": 1}]), InvalidArgumentError,
          "rows 0 and 1 have the same key (1,) for ['id']", "merge them first"),
    _case("upsert_many-unknown-attribute", 'users.upsert_many([{"id": 1, "nick": "x"}])',
          lambda c: c.users.upsert_many([{"id": 1, "nick": "x"}]), InvalidArgumentError,
          "'nick' (str) is not one", "User has email, id, name"),
    _case("upsert_many-on-not-unique", 'users.upsert_many([{"id": 1, "name": "x"}], on="name")',
          lambda c: c.users.upsert_many([{"id": 1, "name": "x"}], on="name"),
          InvalidArgumentError, "needs a primary key, unique constraint or unique index",
          "its unique keys are (id)"),
    _case("upsert_many-no-key", 'users.upsert_many([{"name": "x"}])',
          lambda c: c.users.upsert_many([{"name": "x"}]), InvalidArgumentError,
          "needs the conflict key ['id'] in every row", "row 0 gives no value"),
    _case("upsert-a-list", 'users.upsert([{"id": 1}])', lambda c: c.users.upsert([{"id": 1}]),
          InvalidArgumentError, "upsert() takes one row as a mapping", "upsert_many()"),
    _case("page-limit-zero", "users.page(order_by=User.name, limit=0)",
          lambda c: c.users.page(order_by=User.name, limit=0), InvalidArgumentError,
          "page() takes limit as an int from 1 to 1,000,000, got 0 (int)"),
    _case("page-expression", "users.page(order_by=func.lower(User.name), limit=10)",
          lambda c: c.users.page(order_by=func.lower(User.name), limit=10),
          InvalidArgumentError, "page() orders by column attributes of User",
          "an expression cannot be a term"),
    _case("page-bad-cursor", 'users.page(order_by=User.name, limit=10, after="abc")',
          lambda c: c.users.page(order_by=User.name, limit=10, after="abc"),
          InvalidArgumentError, "page() got a cursor that", "pass the .next of a Page"),
    _case("update_where-bool", 'users.update_where({"name": "x"}, True)',
          lambda c: c.users.update_where({"name": "x"}, True), InvalidArgumentError,
          f"update_where() {SQL_CRITERIA}", "got True (bool)"),
    _case("delete_where-str", 'users.delete_where("1=1")',
          lambda c: c.users.delete_where("1=1"), InvalidArgumentError,
          f"delete_where() {SQL_CRITERIA}", "got '1=1' (str)", "sqlalchemy.text()"),
    _case("delete_where-int", "users.delete_where(1)", lambda c: c.users.delete_where(1),
          InvalidArgumentError, f"delete_where() {SQL_CRITERIA}", "got 1 (int)"),
    _case("delete_where-not-true-or-false", "users.delete_where(User.id)",
          lambda c: c.users.delete_where(User.id), InvalidArgumentError,
          "delete_where() takes true-or-false SQL criteria", "got User.id (a int expression)"),
    # --- synchronize_session ---
    _case("synchronize-unknown", 'users.update_where(v, c, synchronize_session="always")',
          lambda c: c.users.update_where({"name": "x"}, User.id == 1, synchronize_session="always"),
          InvalidArgumentError, SYNCHRONIZE, "got 'always'"),
    _case("synchronize-none", "users.delete_where(c, synchronize_session=None)",
          lambda c: c.users.delete_where(User.id == 1, synchronize_session=None),
          InvalidArgumentError, SYNCHRONIZE, "got None"),
    _case("synchronize-true", "users.delete_where(c, synchronize_session=True)",
          lambda c: c.users.delete_where(User.id == 1, synchronize_session=True),
          InvalidArgumentError, SYNCHRONIZE, "got True"),
    _case("synchronize-zero", "users.delete_where(c, synchronize_session=0)",
          lambda c: c.users.delete_where(User.id == 1, synchronize_session=0),
          InvalidArgumentError, SYNCHRONIZE, "got 0"),
    # --- update_where values ---
    _case("values-empty", "users.update_where({}, c)",
          lambda c: c.users.update_where({}, User.id == 1), InvalidArgumentError,
          f"update_where() {VALUES}", "got {}"),
    _case("values-none", "users.update_where(None, c)",
          lambda c: c.users.update_where(None, User.id == 1), InvalidArgumentError,
          VALUES, "got None"),
    _case("values-pairs", 'users.update_where([("name", "x")], c)',
          lambda c: c.users.update_where([("name", "x")], User.id == 1), InvalidArgumentError,
          VALUES, "got [('name', 'x')]"),
    _case("values-unknown-name", 'users.update_where({"nmae": "x"}, c)',
          lambda c: c.users.update_where({"nmae": "x"}, User.id == 1), InvalidArgumentError,
          "User has no attribute 'nmae' to update", "it has email, id, name"),
    _case("values-other-model", 'users.update_where({Parent.name: "x"}, c)',
          lambda c: c.users.update_where({Parent.name: "x"}, User.id == 1), InvalidArgumentError,
          UPDATE_KEYS, "got Parent.name (an attribute of Parent)", "User has email, id, name"),
    _case("values-other-table", 'users.update_where({Parent.__table__.c.name: "x"}, c)',
          lambda c: c.users.update_where({Parent.__table__.c.name: "x"}, User.id == 1),
          InvalidArgumentError, UPDATE_KEYS, "(a column of table parent)"),
    _case("values-int-key", 'users.update_where({1: "x"}, c)',
          lambda c: c.users.update_where({1: "x"}, User.id == 1), InvalidArgumentError,
          UPDATE_KEYS, "got 1 (int)"),
    # --- find: limit, offset, order_by, options ---
    _case("limit-negative", "users.find(limit=-1)", lambda c: c.users.find(limit=-1),
          InvalidArgumentError, "limit must be an int >= 0 or None, got -1"),
    _case("limit-float", "users.find(limit=1.5)", lambda c: c.users.find(limit=1.5),
          InvalidArgumentError, "limit must be an int >= 0 or None, got 1.5"),
    _case("limit-bool", "users.find(limit=True)", lambda c: c.users.find(limit=True),
          InvalidArgumentError, "limit must be an int >= 0 or None, got True"),
    _case("offset-negative", "users.find(offset=-1)", lambda c: c.users.find(offset=-1),
          InvalidArgumentError, "offset must be an int >= 0 or None, got -1"),
    _case("offset-str", 'users.find(offset="2")', lambda c: c.users.find(offset="2"),
          InvalidArgumentError, "offset must be an int >= 0 or None, got '2'"),
    _case("order_by-str", 'users.find(order_by="name")', lambda c: c.users.find(order_by="name"),
          InvalidArgumentError, ORDER_BY, "got 'name'", "name the attribute (User.name)"),
    _case("order_by-none", "users.find(order_by=None)", lambda c: c.users.find(order_by=None),
          InvalidArgumentError, ORDER_BY, "got None"),
    _case("order_by-bool", "users.find(order_by=[User.id, True])",
          lambda c: c.users.find(order_by=[User.id, True]), InvalidArgumentError, ORDER_BY,
          "got True (bool)"),
    _case("find-options-str", 'users.find(options="x")', lambda c: c.users.find(options="x"),
          InvalidArgumentError, OPTIONS, "got 'x'"),
    _case("find-options-attribute", "users.find(options=[User.id])",
          lambda c: c.users.find(options=[User.id]), InvalidArgumentError, OPTIONS,
          "got User.id (an attribute)"),
    # --- add, add_all, delete ---
    _case("add-other-model", "users.add(Parent(id=1))", lambda c: c.users.add(Parent(id=1)),
          InvalidArgumentError, "add() takes User objects, got Parent", "User(...)"),
    _case("add-class", "users.add(User)", lambda c: c.users.add(User), InvalidArgumentError,
          "add() takes User objects, got the class User", "pass instances such as User(...)"),
    _case("add-none", "users.add(None)", lambda c: c.users.add(None), InvalidArgumentError,
          "add() takes User objects, got NoneType"),
    _case("add_all-none", "users.add_all(None)", lambda c: c.users.add_all(None),
          InvalidArgumentError, "add_all() takes an iterable of User objects", "got None"),
    _case("add_all-one-bad", 'users.add_all([User(id=9, name="ok"), None])',
          lambda c: c.users.add_all([User(id=9, name="ok"), None]), InvalidArgumentError,
          "add_all() takes User objects, got NoneType"),
    _case("delete-other-model", "users.delete(Parent(id=1))",
          lambda c: c.users.delete(Parent(id=1)), InvalidArgumentError,
          "delete() takes User objects, got Parent"),
    # --- repositories set up wrongly ---
    _case("repository-no-model", "ModellessRepository(session)",
          lambda c: c.pick(ModellessRepository, AsyncModellessRepository)(c.uow.session),
          ConfigurationError, "ModellessRepository has no model",
          "subclass it with the model as generic argument", "or set `model = User`"),
    _case("repository-unmapped", "UnmappedRepository(session)",
          lambda c: c.pick(UnmappedRepository, AsyncUnmappedRepository)(c.uow.session),
          ConfigurationError, "UnmappedRepository.model is", "NotMapped", "not a mapped class",
          "use a class mapped with SQLAlchemy's declarative base or registry"),
    _case("repository-model-str", "StringModelRepository(session)",
          lambda c: c.pick(StringModelRepository, AsyncStringModelRepository)(c.uow.session),
          ConfigurationError, "StringModelRepository.model is 'User'", "not a mapped class"),
    _case("repository-key_chunk_size", "ZeroChunkRepository(session).by_ids([1])  "
          "(key_chunk_size = 0, set after the class)",
          lambda c: c.pick(ZeroChunkRepository, AsyncZeroChunkRepository)(c.uow.session)
          .by_ids([1]), ConfigurationError,
          "ZeroChunkRepository.key_chunk_size must be None", "or a positive int", "got 0 (int)"),
    _case("repository-direct", "Repository(session)",
          lambda c: c.pick(Repository, AsyncRepository)(c.uow.session), ConfigurationError,
          "Repository is not used directly", "subclass it with the model as generic argument"),
    _case("repository-none", "UserRepository(None)",
          lambda _c: UserRepository(None), InvalidArgumentError,
          "UserRepository takes a Session, got None",
          "open one with a factory from ormkit.create_session_factory()", where="sync"),
    _case("async-repository-none", "AsyncUserRepository(None)",
          lambda _c: AsyncUserRepository(None), InvalidArgumentError,
          "AsyncUserRepository takes an AsyncSession, got None",
          "open one with a factory from ormkit.create_async_session_factory()", where="async"),
    _case("repository-async-session", "UserRepository(async_session)",
          lambda c: UserRepository(c.other_factory()), InvalidArgumentError,
          "UserRepository takes a Session, got an OrmkitAsyncSession",
          "use AsyncRepository for an AsyncSession", where="sync"),
    _case("async-repository-sync-session", "AsyncUserRepository(session)",
          lambda c: AsyncUserRepository(c.other_factory()), InvalidArgumentError,
          "AsyncUserRepository takes an AsyncSession", "use Repository for a Session",
          where="async"),
    # --- units of work: wrong factory ---
    _case("uow-async-factory", "UnitOfWork(async_factory)",
          lambda c: UnitOfWork(c.other_factory), InvalidArgumentError,
          "UnitOfWork takes a sessionmaker, got async_sessionmaker",
          "use AsyncUnitOfWork for an async_sessionmaker", where="sync"),
    _case("async-uow-sync-factory", "AsyncUnitOfWork(factory)",
          lambda c: AsyncUnitOfWork(c.other_factory), InvalidArgumentError,
          "AsyncUnitOfWork takes an async_sessionmaker, got sessionmaker",
          "use UnitOfWork for a sessionmaker", where="async"),
    _case("uow-not-a-factory", 'UnitOfWork("sqlite://")', lambda c: c.uow_class("sqlite://"),
          InvalidArgumentError, "got str", "make one with ormkit.create_"),
    _case("uow-session-class", "UnitOfWork(Session)",
          lambda c: c.uow_class(c.pick(Session, AsyncSession)),
          InvalidArgumentError, "got type", "make one with ormkit.create_"),
    _case("uow-isolation-without-bind",
          'UnitOfWork(sessionmaker(), isolation_level="SERIALIZABLE")',
          lambda c: c.uow_class(c.pick(sessionmaker, async_sessionmaker)(),
                                isolation_level="SERIALIZABLE"),
          InvalidArgumentError, "isolation_level needs a factory bound to an engine",
          "sessionmaker(bind=engine)"),
    _case("uow-isolation-unknown", 'UnitOfWork(factory, isolation_level="BOGUS")',
          lambda c: c.uow_class(c.factory, isolation_level="BOGUS"), InvalidArgumentError,
          "isolation_level must be one of", "'SERIALIZABLE'", "'READ COMMITTED'",
          "or None to keep the engine's", "got 'BOGUS'"),
    _case("uow-isolation-not-str", "UnitOfWork(factory, isolation_level=5)",
          lambda c: c.uow_class(c.factory, isolation_level=5), InvalidArgumentError,
          "isolation_level must be one of", "got 5"),
    _case("uow-isolation-autocommit", 'UnitOfWork(factory, isolation_level="AUTOCOMMIT")',
          lambda c: c.uow_class(c.factory, isolation_level="AUTOCOMMIT"), InvalidArgumentError,
          "refuses isolation_level='AUTOCOMMIT'", "a unit of work is one transaction",
          "pick a transaction level"),
    _case("uow-durable-not-bool", 'UnitOfWork(factory, durable="yes")',
          lambda c: c.uow_class(c.factory, durable="yes"), InvalidArgumentError,
          "durable must be True or False", "got 'yes' (str)"),
    _case("uow-durable-nested", "with UnitOfWork(factory, durable=True):  (inside an open one)",
          lambda c: c.enter(c.uow_class(c.factory, durable=True)), TransactionError,
          "is durable=True", "open the durable unit of work outside any other"),
    _case("uow-nested-isolation",
          'with UnitOfWork(factory, isolation_level="SERIALIZABLE"):  (inside an open one)',
          lambda c: c.enter(c.uow_class(c.factory, isolation_level="SERIALIZABLE")),
          TransactionError, "asks for isolation_level='SERIALIZABLE'", "which was given none",
          "give the outermost unit of work the level"),
    # --- units of work: used outside their block ---
    _case("ended-session", "uow.session  (after the block)", lambda c: c.ended.session,
          TransactionError, "UnitOfWork.session is used", *ENDED),
    _case("ended-add", "uow.add(obj)  (after the block)",
          lambda c: c.ended.add(User(id=9, name="late")), TransactionError, *ENDED),
    _case("ended-add_all", "uow.add_all([obj])  (after the block)",
          lambda c: c.ended.add_all([User(id=9, name="late")]), TransactionError, *ENDED),
    _case("ended-delete", "uow.delete(obj)  (after the block)",
          lambda c: c.ended.delete(User(id=1, name="a")), TransactionError, *ENDED),
    _case("ended-flush", "uow.flush()  (after the block)", lambda c: c.ended.flush(),
          TransactionError, "UnitOfWork.flush is used", *ENDED),
    _case("ended-commit", "uow.commit()  (after the block)", lambda c: c.ended.commit(),
          TransactionError, "UnitOfWork.commit is used", *ENDED),
    _case("ended-rollback", "uow.rollback()  (after the block)", lambda c: c.ended.rollback(),
          TransactionError, *ENDED),
    _case("ended-savepoint", "with uow.savepoint()  (after the block)",
          lambda c: c.enter(c.ended.savepoint()), TransactionError, *ENDED),
    _case("ended-on_commit", "uow.on_commit(callback)  (after the block)",
          lambda c: c.ended.on_commit(print), TransactionError, *ENDED),
    _case("ended-repository", "uow.repository(UserRepository)  (after the block)",
          lambda c: c.ended.repository(c.pick(UserRepository, AsyncUserRepository)),
          TransactionError, *ENDED),
    _case("ended-exit", "leaving the block twice", lambda c: c.exit(c.ended), TransactionError,
          *ENDED),
    _case("fresh-flush", "uow.flush()  (before the block)", lambda c: c.fresh.flush(),
          TransactionError, "before the unit of work was opened", "use it inside",
          "UnitOfWork(factory) as uow:"),
    _case("fresh-session", "uow.session  (before the block)", lambda c: c.fresh.session,
          TransactionError, "before the unit of work was opened"),
    _case("entered-twice", "with uow:  (inside its own block)", lambda c: c.enter(c.uow),
          TransactionError, "UnitOfWork is already open", "create a new"),
    _case("entered-again", "with uow:  (after its block)", lambda c: c.enter(c.ended),
          TransactionError, "has ended and cannot be reopened", "create a new"),
    # --- units of work: bad arguments ---
    _case("on_commit-not-callable", "uow.on_commit(42)", lambda c: c.uow.on_commit(42),
          InvalidArgumentError, "on_commit() takes a callable with no arguments, got 42",
          "pass arguments with a lambda or functools.partial"),
    _case("on_commit-none", "uow.on_commit(None)", lambda c: c.uow.on_commit(None),
          InvalidArgumentError, "on_commit() takes a callable", "got None"),
    _case("on_commit-robust-not-bool", "uow.on_commit(callback, robust=1)",
          lambda c: c.uow.on_commit(print, robust=1), InvalidArgumentError,
          "robust must be True or False", "got 1 (int)"),
    _case("on_commit-async-in-sync", "uow.on_commit(async_callback)",
          lambda c: c.uow.on_commit(_async_callback), InvalidArgumentError,
          "UnitOfWork.on_commit() takes a plain function", "_async_callback() is async",
          "use AsyncUnitOfWork", where="sync"),
    _case("uow-repository-model", "uow.repository(User)", lambda c: c.uow.repository(User),
          InvalidArgumentError, "repository() takes a subclass of", "User"),
    _case("uow-repository-other-flavour", "uow.repository(AsyncUserRepository)",
          lambda c: c.uow.repository(c.pick(AsyncUserRepository, UserRepository)),
          InvalidArgumentError, "repository() takes a subclass of"),
    _case("uow-add-none", "uow.add(None)", lambda c: c.uow.add(None), InvalidArgumentError,
          "UnitOfWork.add() takes model objects, got None",
          "pass an instance of a class mapped with SQLAlchemy"),
    _case("uow-add-class", "uow.add(User)", lambda c: c.uow.add(User), InvalidArgumentError,
          "add() takes model objects, got the class User", "pass an instance such as User(...)"),
    _case("uow-add_all-none", "uow.add_all(None)", lambda c: c.uow.add_all(None),
          InvalidArgumentError, "UnitOfWork.add_all() takes an iterable of model objects",
          "got None"),
    _case("uow-add_all-one-bad", 'uow.add_all([User(id=9, name="ok"), None])',
          lambda c: c.uow.add_all([User(id=9, name="ok"), None]), InvalidArgumentError,
          "add_all() takes model objects, got None"),
    _case("uow-delete-none", "uow.delete(None)", lambda c: c.uow.delete(None),
          InvalidArgumentError, "UnitOfWork.delete() takes model objects, got None"),
    # --- UnitOfWork.run and its retry options ---
    _case("run-attempts-zero", "UnitOfWork.run(factory, work, attempts=0)",
          lambda c: c.run(attempts=0), InvalidArgumentError, "attempts must be an int >= 1, got 0"),
    _case("run-attempts-negative", "UnitOfWork.run(factory, work, attempts=-1)",
          lambda c: c.run(attempts=-1), InvalidArgumentError,
          "attempts must be an int >= 1, got -1"),
    _case("run-attempts-float", "UnitOfWork.run(factory, work, attempts=2.5)",
          lambda c: c.run(attempts=2.5), InvalidArgumentError,
          "attempts must be an int >= 1, got 2.5"),
    _case("run-attempts-bool", "UnitOfWork.run(factory, work, attempts=True)",
          lambda c: c.run(attempts=True), InvalidArgumentError,
          "attempts must be an int >= 1, got True"),
    _case("run-attempts-str", 'UnitOfWork.run(factory, work, attempts="3")',
          lambda c: c.run(attempts="3"), InvalidArgumentError,
          "attempts must be an int >= 1, got '3'"),
    _case("run-backoff-negative", "UnitOfWork.run(factory, work, backoff=-1)",
          lambda c: c.run(backoff=-1), InvalidArgumentError,
          "backoff must be a number >= 0, got -1"),
    _case("run-backoff-nan", 'UnitOfWork.run(factory, work, backoff=float("nan"))',
          lambda c: c.run(backoff=float("nan")), InvalidArgumentError,
          "backoff must be a number >= 0, got nan", "pass a finite number of seconds"),
    _case("run-backoff-inf", 'UnitOfWork.run(factory, work, backoff=float("inf"))',
          lambda c: c.run(backoff=float("inf")), InvalidArgumentError,
          "backoff must be a number >= 0, got inf", "pass a finite number of seconds"),
    _case("run-backoff-str", 'UnitOfWork.run(factory, work, backoff="0.1")',
          lambda c: c.run(backoff="0.1"), InvalidArgumentError, "backoff must be a number >= 0"),
    _case("run-max_backoff-negative", "UnitOfWork.run(factory, work, max_backoff=-0.5)",
          lambda c: c.run(max_backoff=-0.5), InvalidArgumentError,
          "max_backoff must be a number >= 0, got -0.5"),
    _case("run-max_backoff-inf", 'UnitOfWork.run(factory, work, max_backoff=float("inf"))',
          lambda c: c.run(max_backoff=float("inf")), InvalidArgumentError,
          "max_backoff must be a number >= 0, got inf", "pass a finite number of seconds"),
    _case("run-async-work-in-sync", "UnitOfWork.run(factory, async_work)",
          lambda c: UnitOfWork.run(c.factory, _async_work), InvalidArgumentError,
          "UnitOfWork.run() takes a plain function", "_async_work() is async",
          "use AsyncUnitOfWork.run() for it", where="sync"),
    _case("run-work-not-callable", 'UnitOfWork.run(factory, "work")', lambda c: c.run("work"),
          InvalidArgumentError, "run() takes the work as a callable of the unit of work",
          "pass arguments with a lambda or functools.partial"),
    _case("run-async-factory", "UnitOfWork.run(async_factory, work)",
          lambda c: UnitOfWork.run(c.other_factory, lambda uow: uow.add(User(id=98, name="x"))),
          InvalidArgumentError, "use AsyncUnitOfWork for an async_sessionmaker", where="sync"),
    _case("async-run-sync-factory", "AsyncUnitOfWork.run(factory, work)",
          lambda c: AsyncUnitOfWork.run(c.other_factory, _async_work),
          InvalidArgumentError, "use UnitOfWork for a sessionmaker", where="async"),
    _case("async-run-sync-work", "AsyncUnitOfWork.run(factory, lambda uow: uow.add(obj))",
          lambda c: c.run(lambda uow: uow.add(User(id=96, name="sync work"))),
          InvalidArgumentError, "run() takes the work as an async function",
          "work returned an object of type User, which cannot be awaited",
          "define it with `async def`",
          "use UnitOfWork.run() for sync work", "Nothing was committed", where="async"),
    # --- session factories given the wrong thing ---
    _case("factory-bind-twice", "create_session_factory(engine, bind=engine)",
          lambda c: c.pick(ormkit.create_session_factory, ormkit.create_async_session_factory)(
              c.engine, bind=c.engine),
          InvalidArgumentError, "bind is given twice",
          "pass the URL or engine as the first argument only"),
    _case("factory-other-engine", "create_async_session_factory(engine)",
          lambda c: c.pick(ormkit.create_async_session_factory, ormkit.create_session_factory)(
              c.engine),
          InvalidArgumentError, "expected a database URL or an", "with this engine"),
    # --- ormkit.testing ---
    _case("assert_queries-negative", "assert_queries(engine, -1)",
          lambda c: _watch(c.engine, -1), InvalidArgumentError,
          "expected must be a count of statements (an int >= 0), got -1"),
    _case("assert_queries-str", 'assert_queries(engine, "0")', lambda c: _watch(c.engine, "0"),
          InvalidArgumentError, "expected must be a count of statements (an int >= 0), got '0'"),
    _case("assert_queries-bool", "assert_queries(engine, True)",
          lambda c: _watch(c.engine, True), InvalidArgumentError,
          "expected must be a count of statements (an int >= 0), got True"),
    _case("assert_max_queries-negative", "assert_max_queries(engine, -1)",
          lambda c: _watch_max(c.engine, -1), InvalidArgumentError,
          "maximum must be a count of statements (an int >= 0), got -1"),
    _case("rolled_back-engine", "rolled_back(engine)", lambda c: rolled_back(c.engine),
          InvalidArgumentError, "rolled_back() takes the application's session factory",
          "a sessionmaker or async_sessionmaker"),
    _case("rolled_back-no-bind", "rolled_back(sessionmaker())",
          lambda c: rolled_back(c.pick(sessionmaker, async_sessionmaker)()), ConfigurationError,
          "rolled_back() needs a factory bound to an engine", "this one has no bind",
          "make it with ormkit.create_session_factory(engine)"),
    _case("rolled_back-twice", "rolled_back(factory)  (inside a rolled_back block of it)",
          _rolled_back_twice, TransactionError, "inside a rolled_back block already",
          "once per test"),
    _case("count_queries-none", "count_queries(None)", lambda: _watch(None), InvalidArgumentError,
          "count_queries() watches an Engine, AsyncEngine, Session, AsyncSession, sessionmaker or "
          "async_sessionmaker", "got NoneType", where="static"),
    _case("count_queries-url", 'count_queries("sqlite://")', lambda: _watch("sqlite://"),
          InvalidArgumentError, "count_queries() watches an Engine", "got str", where="static"),
    _case("count_queries-connection", "count_queries(connection)",
          _watch_a_connection, InvalidArgumentError,
          "count_queries() watches an Engine", "got Connection",
          "watch its engine instead: count_queries(connection.engine)", where="sync"),
    # --- engines and factories made from URLs ---
    _case("engine-not-a-url", "create_engine(42)", lambda: ormkit.create_engine(42),
          InvalidArgumentError, "expected a database URL (a str or sqlalchemy.URL), got int",
          "pass an engine to the session factories", where="static"),
    _case("engine-unparsable-url", 'create_engine("not a url")',
          lambda: ormkit.create_engine("not a url"), InvalidArgumentError,
          "could not parse the database URL",
          "expected a form like 'dialect+driver://user:password@host:port/database'",
          where="static"),
    _case("engine-bad-port", 'create_engine("postgresql+psycopg://user:s3cret@host:port/db")',
          lambda: ormkit.create_engine("postgresql+psycopg://user:s3cret@host:port/db"),
          InvalidArgumentError, "could not parse the database URL", where="static",
          never=("s3cret",)),
    _case("engine-unknown-dialect", 'create_engine("nosuchdb://x")',
          lambda: ormkit.create_engine("nosuchdb://x"), InvalidArgumentError,
          "no SQLAlchemy dialect for 'nosuchdb'", "check the URL's scheme", where="static"),
    _case("engine-unknown-driver", 'create_engine("postgresql+nosuchdriver://host/db")',
          lambda: ormkit.create_engine("postgresql+nosuchdriver://host/db"), InvalidArgumentError,
          "no SQLAlchemy dialect for 'postgresql+nosuchdriver'", "for example 'postgresql+psycopg'",
          where="static"),
    _case("engine-async-driver", 'create_engine("sqlite+aiosqlite://")',
          lambda: ormkit.create_engine("sqlite+aiosqlite://"), InvalidArgumentError,
          "'sqlite+aiosqlite' is an async driver", "use create_async_engine() for it",
          where="static"),
    _case("async-engine-sync-driver", 'create_async_engine("sqlite://")',
          lambda: ormkit.create_async_engine("sqlite://"), InvalidArgumentError,
          "'sqlite' is not an async driver", "use create_engine() for it", where="static"),
    _case("engine-skip-autocommit-rollback",
          'create_engine("sqlite://", skip_autocommit_rollback=True)',
          lambda: ormkit.create_engine("sqlite://", skip_autocommit_rollback=True),
          InvalidArgumentError, "skip_autocommit_rollback=True does not work",
          "pass sqlite_savepoints=False as well", where="static"),
    _case("engine-option-typo", 'create_engine("sqlite://", sqlite_foreign_key=False)',
          lambda: ormkit.create_engine("sqlite://", sqlite_foreign_key=False),
          InvalidArgumentError, "unknown option 'sqlite_foreign_key'",
          "did you mean 'sqlite_foreign_keys'?", "ormkit's SQLite options are", where="static"),
    _case("engine-busy-timeout-str", 'create_engine(url, sqlite_busy_timeout="5")',
          lambda: ormkit.create_engine("sqlite://", sqlite_busy_timeout="5"),
          InvalidArgumentError,
          "sqlite_busy_timeout must be a number of seconds >= 0 or None, got '5'",
          where="static"),
    _case("factory-none", "create_session_factory(None)",
          lambda: ormkit.create_session_factory(None), InvalidArgumentError,
          "bind must be a database URL (a str or sqlalchemy.URL) or an Engine, got NoneType",
          where="static"),
    _case("async-factory-int", "create_async_session_factory(42)",
          lambda: ormkit.create_async_session_factory(42), InvalidArgumentError,
          "bind must be a database URL (a str or sqlalchemy.URL) or an AsyncEngine, got int",
          where="static"),
    _case("factory-unknown-option", 'create_session_factory("sqlite://", bogus=1)',
          lambda: ormkit.create_session_factory("sqlite://", bogus=1), InvalidArgumentError,
          "create_session_factory() got an unknown option 'bogus'",
          "the options of the session factory and the session class", "expire_on_commit",
          where="static"),
    _case("factory-option-typo", 'create_async_session_factory(url, expire_on_comit=True)',
          lambda: ormkit.create_async_session_factory("sqlite+aiosqlite://",
                                                     expire_on_comit=True),
          InvalidArgumentError, "create_async_session_factory() got an unknown option",
          "did you mean 'expire_on_commit'?", where="static"),
    _case("factory-async-url", 'create_session_factory("sqlite+aiosqlite://")',
          lambda: ormkit.create_session_factory("sqlite+aiosqlite://"), InvalidArgumentError,
          "'sqlite+aiosqlite' is an async driver", "use create_async_session_factory() for it",
          never=("create_async_engine",), where="static"),
    _case("async-factory-sync-url", 'create_async_session_factory("sqlite://")',
          lambda: ormkit.create_async_session_factory("sqlite://"), InvalidArgumentError,
          "'sqlite' is not an async driver", "use create_session_factory() for it",
          never=("create_engine",), where="static"),
    # --- web frameworks: refused when the app is declared, or outside a request ---
    _case("fastapi-not-a-factory", 'unit_of_work("sqlite://")',
          lambda: fastapi_unit_of_work("sqlite://"), InvalidArgumentError,
          "ormkit.fastapi takes a session factory, got 'sqlite://'",
          "make one with ormkit.create_async_session_factory(url)", where="static"),
    _case("fastapi-repository-flavour", "repository(UserRepository, async_factory)",
          lambda: fastapi_repository(UserRepository, _UNUSED_ASYNC_FACTORY), InvalidArgumentError,
          "ormkit.fastapi.repository() over an async_sessionmaker takes a subclass of "
          "AsyncRepository", "got the class UserRepository", where="static"),
    _case("flask-async-factory", "Ormkit(app, async_factory)",
          lambda: Ormkit(Flask("bad_input"), _UNUSED_ASYNC_FACTORY), InvalidArgumentError,
          "Ormkit takes a sessionmaker", "Flask views are sync",
          "use ormkit.create_session_factory", where="static"),
    _case("flask-twice", "Ormkit(app, factory)  (a second one on one app)", _two_ormkits,
          ConfigurationError, "already has an Ormkit", where="static"),
    _case("flask-uow-outside-a-request", "uow()  (no request)", flask_uow, TransactionError,
          "ormkit.flask.uow() needs an active request", "`with UnitOfWork(factory) as uow:`",
          where="static"),
]
# fmt: on


def _params(flavour: str, backends: dict[str, str]) -> list[Any]:
    params = []
    for case in CATALOGUE:
        if case.where not in ("twin", flavour):
            continue
        for backend, driver in backends.items():
            if case.only is not None and not driver.startswith(case.only):
                continue
            marks = [_xfail(case)] if case.gap else []
            params.append(pytest.param(backend, case, id=f"{case.id}-{backend}", marks=marks))
    return params


def _xfail(case: Case) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.gap or "")


# --- databases: one per backend and module, with rows that every case must leave alone -------


class Databases:
    """One database per backend, made and filled at its first case; dropped after the module.

    Parametrizing a module-scoped fixture with (backend, case) pairs would make pytest set it up
    again for every pair, so the databases are kept here, by backend.
    """

    def __init__(self, request: pytest.FixtureRequest, tmp: Path) -> None:
        self._request = request
        self._tmp = tmp
        self._urls: dict[str, URL] = {}
        self._engines: dict[str, sqlalchemy.Engine] = {}
        self._drop: list[Callable[[], None]] = []

    def url(self, backend: str) -> URL:
        """The URL of `backend`'s database, which has the catalogue's rows."""
        if backend not in self._urls:
            driver = {**SYNC_DRIVERS, **ASYNC_DRIVERS}[backend]
            url = self._make(driver)
            sync_driver = SYNC_DRIVERS["sqlite" if driver.startswith("sqlite") else "psycopg"]
            seeding = ormkit.create_engine(url.set(drivername=sync_driver))
            try:
                _seed(seeding)
            finally:
                seeding.dispose()
            self._urls[backend] = url
        return self._urls[backend]

    def sync_engine(self, backend: str) -> sqlalchemy.Engine:
        """An engine on `backend`'s database, kept for the module."""
        if backend not in self._engines:
            self._engines[backend] = ormkit.create_engine(self.url(backend))
        return self._engines[backend]

    def _make(self, driver: str) -> URL:
        if driver.startswith("sqlite"):
            return URL.create(driver, database=str(self._tmp / f"{driver}.db"))
        server: PostgresServer = self._request.getfixturevalue("postgres_server")
        name = server.create_database()
        self._drop.append(lambda: server.drop_database(name))
        return sqlalchemy.make_url(server.admin_url).set(drivername=driver, database=name)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        for drop in self._drop:
            drop()


@pytest.fixture(scope="module")
def databases(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Databases]:
    made = Databases(request, tmp_path_factory.mktemp("catalogue"))
    try:
        yield made
    finally:
        made.close()


def _seed(engine: sqlalchemy.Engine) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.insert(User), [{"id": n, "name": f"user {n}"} for n in (1, 2, 3)]
        )
        connection.execute(
            sqlalchemy.insert(Membership), [{"tenant_id": 1, "user_id": n} for n in (1, 2)]
        )


ROWS = [select(User.id, User.name, User.email).order_by(User.id),
        select(Membership.tenant_id, Membership.user_id, Membership.role).order_by(
            Membership.tenant_id, Membership.user_id),
        select(func.count()).select_from(Parent)]  # fmt: skip


# --- running one case --------------------------------------------------------------------------


def _check_error(case: Case, error: BaseException | None) -> None:
    if error is None:
        raise AssertionError(f"{case.id}: accepted; expected {case.error.__name__}")
    if not isinstance(error, case.error):
        raise AssertionError(  # noqa: TRY004 (a failed claim, not an API error)
            f"{case.id}: expected {case.error.__name__}, got {type(error).__name__}: {error}"
        ) from error
    message = str(error)
    missing = [fragment for fragment in case.says if fragment not in message]
    assert not missing, f"{case.id}: the message lacks {missing}:\n{message}"
    leaked = [fragment for fragment in case.never if fragment in message]
    assert not leaked, f"{case.id}: the message shows {leaked}:\n{message}"


def _call_sync(case: Case, c: Ctx) -> BaseException | None:
    try:
        result = case.call(c)
    except Exception as error:  # noqa: BLE001 (which error it was is the claim under test)
        return error
    assert not inspect.isawaitable(result), f"{case.id}: the sync call returned an awaitable"
    return None


async def _call_async(case: Case, c: Ctx) -> BaseException | None:
    try:
        result = case.call(c)
        if inspect.isawaitable(result):
            await result
    except Exception as error:  # noqa: BLE001 (which error it was is the claim under test)
        return error
    return None


def _rows(connection: sqlalchemy.Connection) -> list[list[tuple[Any, ...]]]:
    return [[tuple(row) for row in connection.execute(statement)] for statement in ROWS]


@pytest.mark.parametrize(("backend", "case"), _params("sync", SYNC_DRIVERS))
def test_sync_bad_input_is_refused_before_any_sql(databases, backend: str, case: Case) -> None:
    engine = databases.sync_engine(backend)
    with engine.connect() as connection:
        before = _rows(connection)
    c = Ctx("sync", engine)
    with c.ended:
        pass
    with c.uow:
        c.users = c.uow.repository(UserRepository)
        c.memberships = c.uow.repository(MembershipRepository)
        with count_queries(engine) as log:
            error = _call_sync(case, c)
        taken = engine.pool.checkedout()
    _check_error(case, error)
    assert log.count == 0, f"{case.id}: SQL was sent:\n{log}"
    assert taken == 0, f"{case.id}: a connection was taken from the pool"
    with engine.connect() as connection:
        assert _rows(connection) == before, f"{case.id}: the rows changed"
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize(("backend", "case"), _params("async", ASYNC_DRIVERS))
async def test_async_bad_input_is_refused_before_any_sql(
    databases, backend: str, case: Case
) -> None:
    # An engine per test: asyncpg ties connections to the event loop, which is per test.
    engine: AsyncEngine = ormkit.create_async_engine(databases.url(backend))
    try:
        async with engine.connect() as connection:
            before = await connection.run_sync(_rows)
        c = Ctx("async", engine)
        async with c.ended:
            pass
        async with c.uow:
            c.users = c.uow.repository(AsyncUserRepository)
            c.memberships = c.uow.repository(AsyncMembershipRepository)
            with count_queries(engine) as log:
                error = await _call_async(case, c)
            taken = engine.pool.checkedout()
        _check_error(case, error)
        assert log.count == 0, f"{case.id}: SQL was sent:\n{log}"
        assert taken == 0, f"{case.id}: a connection was taken from the pool"
        async with engine.connect() as connection:
            assert await connection.run_sync(_rows) == before, f"{case.id}: the rows changed"
        assert engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=case.id, marks=[_xfail(case)] if case.gap else [])
        for case in CATALOGUE
        if case.where == "static"
    ],
)
def test_bad_input_without_a_database_is_refused(case: Case) -> None:
    try:
        case.call()
    except Exception as error:  # noqa: BLE001 (which error it was is the claim under test)
        _check_error(case, error)
    else:
        _check_error(case, None)


# --- the rule the catalogue rests on, and the docs that show it -------------------------------


def test_every_case_has_its_own_id_and_runs_somewhere() -> None:
    ids = [case.id for case in CATALOGUE]
    assert len(ids) == len(set(ids)), "two cases share an id"
    for case in CATALOGUE:
        assert case.where in ("twin", "sync", "async", "static"), case.id
        assert case.only in (None, "postgresql"), case.id
        assert case.says, f"{case.id} checks no part of the message"


class OtherBase(DeclarativeBase):
    pass


class WideKey(OtherBase):
    __tablename__ = "wide_key"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class NarrowKey(OtherBase):
    __tablename__ = "narrow_key"
    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)


class WideKeyRepository(Repository[WideKey, int]):
    pass


class NarrowKeyRepository(Repository[NarrowKey, int]):
    pass


def test_key_ranges_follow_the_column_type_and_the_database(sync_engine) -> None:
    OtherBase.metadata.create_all(sync_engine)
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        session.add_all([WideKey(id=2**40), NarrowKey(id=2**15 - 1)])
        session.commit()
    postgres = sync_engine.dialect.name == "postgresql"
    with factory() as session:
        wide, narrow = WideKeyRepository(session), NarrowKeyRepository(session)
        users = UserRepository(session)
        assert wide.by_id(2**40) is not None
        assert narrow.by_id(2**15 - 1) is not None
        assert users.by_id(2**31 - 1) is None  # the largest int4: a key, of no row
        assert wide.by_id(-(2**63)) is None
        with assert_queries(session, 0), pytest.raises(InvalidKeyError, match="so no row"):
            wide.by_id(2**63)
        if postgres:
            with assert_queries(session, 0):
                with pytest.raises(InvalidKeyError, match="from -32768 to 32767 on postgresql"):
                    narrow.by_id(2**15)
                with pytest.raises(InvalidKeyError, match="to 2147483647 on postgresql"):
                    users.by_ids([1, 2**31])
        else:  # SQLite: every INTEGER column holds 64 bits, whatever its declared size
            assert narrow.by_id(2**15) is None
            assert users.by_ids([1, 2**31]) == []


def test_every_refusal_of_a_bad_value_is_a_value_error() -> None:
    for case in CATALOGUE:
        if issubclass(case.error, InvalidArgumentError):
            assert issubclass(case.error, ValueError), case.id
    assert issubclass(InvalidKeyError, InvalidArgumentError)
    assert not issubclass(TransactionError, ValueError)  # misuse, not a bad value


def _where(case: Case) -> str:
    if case.where == "static":
        return "no database"
    flavours = {"twin": "sync + async", "sync": "sync", "async": "async"}[case.where]
    return f"{flavours}, PostgreSQL only" if case.only == "postgresql" else flavours


def _cell(text: str) -> str:
    ticks = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def docs_row(case: Case) -> str:
    """The row of the docs table for `case`."""
    says = ", ".join(_cell(fragment) for fragment in case.says)
    if case.never:
        says += " (never " + ", ".join(_cell(word) for word in case.never) + ")"
    code, _, note = case.input.partition("  ")  # "users.by_id([1])  (unhashable)"
    call = _cell(code) + (f" {note}" if note else "")
    return f"| `{case.id}` | {call} | `{case.error.__name__}` | {says} | {_where(case)} |"


def test_the_docs_table_is_the_catalogue() -> None:
    documented = [
        line for line in DOCS.read_text().splitlines() if re.match(r"\| `[^`]+` \|", line)
    ]
    expected = [docs_row(case) for case in CATALOGUE if case.gap is None]
    ids = [re.match(r"\| `([^`]+)`", line).group(1) for line in documented]  # type: ignore[union-attr]
    assert sorted(set(ids)) == sorted(case.id for case in CATALOGUE if case.gap is None), (
        "docs/bad-input.md and the catalogue name different cases"
    )
    assert documented == expected, (
        "docs/bad-input.md's table differs; it should read:\n" + "\n".join(expected)
    )
    gaps = [case.id for case in CATALOGUE if case.gap is not None]
    assert not set(gaps) & set(ids), "a known gap is documented as refused"
