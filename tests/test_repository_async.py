"""AsyncRepository: the claims of test_repository.py, on aiosqlite, psycopg async and asyncpg."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import ormkit
from ormkit import (
    AsyncRepository,
    AsyncUnitOfWork,
    InvalidArgumentError,
    InvalidKeyError,
    MultipleResultsError,
    NotFoundError,
)
from ormkit.testing import assert_queries, count_queries
from tests.models import Membership, User


class UserRepository(AsyncRepository[User, int]):
    async def by_email(self, email: str) -> User | None:
        return await self.find_one(User.email == email)


class MembershipRepository(AsyncRepository[Membership, tuple[int, int]]):
    pass


@pytest.fixture
async def session(async_engine: AsyncEngine):
    factory = ormkit.create_async_session_factory(async_engine)
    async with factory() as session:
        session.add_all(
            User(id=n, name=f"user {n}", email=f"u{n}@example.org") for n in range(1, 6)
        )
        session.add_all(Membership(tenant_id=t, user_id=u) for t in (1, 2) for u in (1, 2, 3))
        await session.commit()
        session.expunge_all()
        yield session


@pytest.fixture
def users(session: AsyncSession) -> UserRepository:
    return UserRepository(session)


async def test_by_id_queries_once_then_hits_the_identity_map(users, session) -> None:
    with assert_queries(session, 1):
        first = await users.by_id(1)
    with assert_queries(session, 0):
        second = await users.by_id(1)
    assert first is second
    assert first is not None


async def test_an_object_loaded_by_find_is_free_by_id(users, session) -> None:
    loaded = await users.find(User.id <= 3)
    with assert_queries(session, 0):
        assert await users.by_id(2) is loaded[1]
    with assert_queries(session, 1):
        await users.find(User.id == 2)  # the identity map is no query cache


async def test_by_id_refreshes_an_expired_object(users, session) -> None:
    user = await users.by_id(1)
    session.expire(user)
    with assert_queries(session, 1):
        assert await users.by_id(1) is user
    with assert_queries(session, 0):
        assert user.name == "user 1"


async def test_by_id_hits_answer_as_session_get_does_without_sql(users, session) -> None:
    # by_id answers identity-map hits without AsyncSession's greenlet hop: the answers must
    # stay Session.get's own, including for an object with only some attributes expired.
    memberships = MembershipRepository(session)
    loaded = [*await memberships.find(), await users.by_id(1)]
    user = loaded[-1]
    assert user is not None
    session.expire(user, ["name"])  # not the whole object: Session.get does not reload it
    with assert_queries(session, 0):
        assert await users.by_id(1) is user is await session.get(User, 1)
        assert await memberships.by_id((1, 2)) is await session.get(Membership, (1, 2))
    assert inspect(user).expired_attributes == {"name"}


async def test_by_id_of_a_row_deleted_meanwhile_is_none(users, session, async_engine) -> None:
    user = await users.by_id(1)
    session.expire(user)
    async with async_engine.begin() as connection:
        await connection.execute(text("DELETE FROM users WHERE id = 1"))
    await session.rollback()
    assert await users.by_id(1) is None


async def test_by_id_or_raise(users) -> None:
    assert (await users.by_id_or_raise(2)).id == 2
    with pytest.raises(NotFoundError, match="no User with primary key 404"):
        await users.by_id_or_raise(404)


async def test_by_id_for_update_returns_current_values(users, session, async_engine) -> None:
    user = await users.by_id(1)
    async with async_engine.begin() as connection:
        await connection.execute(text("UPDATE users SET name = 'changed' WHERE id = 1"))
    with count_queries(session) as log:
        locked = await users.by_id(1, for_update=True)
    assert locked is user
    assert log.count == 1
    if async_engine.dialect.name == "postgresql":
        assert locked is not None
        assert locked.name == "changed"  # loaded before, yet read again under the lock
        assert "FOR UPDATE" in log.statements[0]
    await session.rollback()


async def test_composite_keys(session) -> None:
    memberships = MembershipRepository(session)
    with assert_queries(session, 1):
        found = await memberships.by_id((2, 3))
    assert found is not None
    with assert_queries(session, 0):
        assert await memberships.by_id((2, 3)) is found
    with assert_queries(session, 1):
        many = await memberships.by_ids([(2, 2), (2, 3), (9, 9)])
    assert [(m.tenant_id, m.user_id) for m in many] == [(2, 2), (2, 3)]


async def test_by_ids_fetches_only_the_misses_in_one_query(users, session) -> None:
    two = await users.by_id(2)
    with assert_queries(session, 1):
        found = await users.by_ids([3, 2, 404, 1, 3])
    assert [u.id for u in found] == [3, 2, 1]
    assert found[1] is two


async def test_by_ids_of_loaded_objects_sends_no_sql(users, session) -> None:
    loaded = await users.find(order_by=User.id)  # kept referenced: the identity map is weak
    with assert_queries(session, 0):
        assert await users.by_ids([5, 1]) == [loaded[4], loaded[0]]


async def test_by_ids_refreshes_expired_objects_without_lazy_loads(users, session) -> None:
    loaded = await users.find(User.id <= 2)
    await session.commit()  # expire_on_commit=False: still loaded
    session.expire(loaded[0])
    with assert_queries(session, 1):
        found = await users.by_ids([1, 2])
    with assert_queries(session, 0):
        # A lazy load here would raise MissingGreenlet: the query refreshed it.
        assert found[0].name == "user 1"
    assert inspect(found[0]).expired_attributes == set()


async def test_by_ids_of_thousands_of_keys_is_one_query(session) -> None:
    session.add_all(User(id=n, name=f"bulk {n}") for n in range(100, 2600))
    await session.commit()
    session.expunge_all()
    users = UserRepository(session)
    with assert_queries(session, 1):
        found = await users.by_ids(range(2599, 99, -1))
    assert [u.id for u in found] == list(range(2599, 99, -1))


async def test_queries(users, session) -> None:
    assert [u.id for u in await users.find(User.id > 1, order_by=User.id.desc(), limit=2)] == [5, 4]
    assert (await users.by_email("u2@example.org")).id == 2  # type: ignore[union-attr]
    with pytest.raises(MultipleResultsError):
        await users.find_one(User.id > 1)
    assert await users.count(User.id > 3) == 2
    with assert_queries(session, 1) as log:
        assert await users.exists(User.id == 3) is True
    assert "EXISTS" in log.statements[0].upper()
    assert await users.exists(User.id == 404) is False


async def test_add_and_delete(users, session) -> None:
    users.add(User(id=10, name="ten"))
    users.add_all([User(id=11, name="eleven")])
    await users.delete(await users.by_id_or_raise(1))
    await session.flush()
    assert await users.count() == 6


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch"])
async def test_update_where_keeps_loaded_objects_in_step(users, session, sync) -> None:
    loaded = await users.find(order_by=User.id)
    assert (
        await users.update_where({"name": "renamed"}, User.id <= 2, synchronize_session=sync) == 2
    )
    with assert_queries(session, 0):
        assert [u.name for u in loaded[:3]] == ["renamed", "renamed", "user 3"]


async def test_update_where_without_synchronizing_leaves_objects_stale(users, session) -> None:
    loaded = await users.find(order_by=User.id)
    assert await users.update_where({"name": "x"}, User.id == 1, synchronize_session=False) == 1
    with assert_queries(session, 0):
        assert loaded[0].name == "user 1"


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch"])
async def test_delete_where_removes_deleted_objects_from_the_session(users, session, sync) -> None:
    loaded = await users.find(order_by=User.id)
    assert await users.delete_where(User.id <= 2, synchronize_session=sync) == 2
    assert loaded[0] not in session
    with assert_queries(session, 1):
        assert await users.by_id(1) is None


async def test_delete_where_without_synchronizing_keeps_deleted_objects(users, session) -> None:
    loaded = await users.find(order_by=User.id)
    assert await users.delete_where(User.id <= 2, synchronize_session=False) == 2
    with assert_queries(session, 0):
        assert await users.by_id(1) is loaded[0]


@pytest.mark.parametrize("key", [None, [1], {"id": 1}, (1,), "1", True])
async def test_bad_keys_are_refused_before_any_sql(users, session, key) -> None:
    with assert_queries(session, 0):
        with pytest.raises(InvalidKeyError, match="one value"):
            await users.by_id(key)
        with pytest.raises(InvalidKeyError, match="one value"):
            await users.by_ids([1, key])


async def test_bad_arguments_are_refused_before_any_sql(users, session) -> None:
    with assert_queries(session, 0):
        with pytest.raises(InvalidArgumentError, match="without criteria"):
            await users.delete_where()
        with pytest.raises(InvalidArgumentError, match="one of"):
            await users.update_where({"name": "x"}, User.id == 1, synchronize_session="nope")
        with pytest.raises(InvalidArgumentError, match="SQL criteria"):
            await users.find(False)
    assert await users.count() == 5


async def test_every_row_means_sqlalchemy_true(users) -> None:
    assert await users.delete_where(sqlalchemy.true()) == 5


def test_an_async_repository_refuses_a_sync_session() -> None:
    session = ormkit.create_session_factory("sqlite://")()
    with pytest.raises(InvalidArgumentError, match="use Repository"):
        UserRepository(session)  # type: ignore[arg-type]


async def test_unit_of_work_makes_repositories(async_engine) -> None:
    factory = ormkit.create_async_session_factory(async_engine)
    async with AsyncUnitOfWork(factory) as uow:
        uow.repository(UserRepository).add(User(id=1, name="roach"))
    async with AsyncUnitOfWork(factory) as uow:
        assert (await uow.repository(UserRepository).by_id_or_raise(1)).name == "roach"
