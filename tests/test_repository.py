"""Repository: by_id through Session.get, by_ids fetching only the misses, queries and bulk
statements, each claim about SQL proved by counting statements. The async twin is tested the
same way in test_repository_async.py."""

from __future__ import annotations

from typing import TypeVar

import pytest
import sqlalchemy
from sqlalchemy import func, inspect, text
from sqlalchemy.orm import Session, joinedload, load_only

import ormkit
from ormkit import (
    InvalidArgumentError,
    InvalidKeyError,
    MultipleResultsError,
    NotFoundError,
    Repository,
    UnitOfWork,
)
from ormkit.testing import assert_queries, count_queries
from tests.models import Author, Book, Engineer, Manager, Membership, User


class UserRepository(Repository[User, int]):
    def by_email(self, email: str) -> User | None:
        return self.find_one(User.email == email)


class MembershipRepository(Repository[Membership, tuple[int, int]]):
    pass


@pytest.fixture
def session(sync_engine: sqlalchemy.Engine):
    factory = ormkit.create_session_factory(sync_engine)
    with factory() as session:
        session.add_all(
            User(id=n, name=f"user {n}", email=f"u{n}@example.org") for n in range(1, 6)
        )
        session.add_all(Membership(tenant_id=t, user_id=u) for t in (1, 2) for u in (1, 2, 3))
        session.commit()
        session.expunge_all()  # start each test with an empty identity map
        yield session


@pytest.fixture
def users(session: Session) -> UserRepository:
    return UserRepository(session)


# --- by_id: always Session.get ---------------------------------------------------------------


def test_by_id_queries_once_then_hits_the_identity_map(users: UserRepository, session) -> None:
    with assert_queries(session, 1):
        first = users.by_id(1)
    with assert_queries(session, 0):
        second = users.by_id(1)
    assert first is second
    assert first is not None
    assert first.name == "user 1"


def test_an_object_loaded_by_find_is_free_by_id(users: UserRepository, session) -> None:
    with assert_queries(session, 1):
        loaded = users.find(User.id <= 3)
    with assert_queries(session, 0):
        assert users.by_id(2) is loaded[1]


def test_find_always_queries_the_identity_map_is_no_query_cache(users, session) -> None:
    users.by_id(1)
    with assert_queries(session, 1):
        assert [u.id for u in users.find(User.id == 1)] == [1]


def test_by_id_refreshes_an_expired_object(users: UserRepository, session) -> None:
    user = users.by_id(1)
    assert user is not None
    session.expire(user)
    with assert_queries(session, 1):
        assert users.by_id(1) is user
    with assert_queries(session, 0):
        assert user.name == "user 1"


def test_by_id_of_a_row_deleted_meanwhile_is_none(users, session, sync_engine) -> None:
    user = users.by_id(1)
    session.commit()  # expires user; the next access must read the row again
    with sync_engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = 1"))
    assert user is not None
    assert users.by_id(1) is None
    assert user not in session  # SQLAlchemy drops the vanished row's object


def test_by_id_of_a_missing_key_is_none(users: UserRepository, session) -> None:
    with assert_queries(session, 1):
        assert users.by_id(404) is None


def test_by_id_or_raise_names_model_and_key(users: UserRepository) -> None:
    assert users.by_id_or_raise(2).id == 2
    with pytest.raises(NotFoundError, match="no User with primary key 404") as caught:
        users.by_id_or_raise(404)
    assert isinstance(caught.value, LookupError)


def test_by_id_passes_loader_options(users: UserRepository) -> None:
    user = users.by_id(1, options=[load_only(User.name)])
    assert user is not None
    assert "email" in inspect(user).unloaded


def test_by_id_for_update_locks_and_returns_current_values(users, session, sync_engine) -> None:
    user = users.by_id(1)
    assert user is not None
    with sync_engine.begin() as connection:  # another transaction changes the row
        connection.execute(text("UPDATE users SET name = 'changed' WHERE id = 1"))
    session.rollback()  # a new transaction, which must read the other one's commit
    user = users.by_id(1)  # expired by the rollback: refreshed
    with sync_engine.begin() as connection:
        connection.execute(text("UPDATE users SET name = 'changed again' WHERE id = 1"))
    with count_queries(session) as log:
        locked = users.by_id(1, for_update=True)
    assert locked is user
    assert locked is not None
    if sync_engine.dialect.name == "postgresql":
        # Read committed: the locking read sees the latest committed row.
        assert locked.name == "changed again"
        assert "FOR UPDATE" in log.statements[0]
    else:
        # SQLite has no FOR UPDATE (its transactions lock the whole database); the row was
        # still read again rather than taken from the identity map.
        assert log.count == 1
    session.rollback()


def test_composite_keys_are_tuples_in_column_order(session) -> None:
    memberships = MembershipRepository(session)
    with assert_queries(session, 1):
        found = memberships.by_id((2, 3))
    assert found is not None
    assert (found.tenant_id, found.user_id) == (2, 3)
    with assert_queries(session, 0):
        assert memberships.by_id((2, 3)) is found
    assert memberships.by_id((3, 2)) is None


# --- by_ids: the identity map first, one query for the misses --------------------------------


def test_by_ids_fetches_only_the_misses_in_one_query(users: UserRepository, session) -> None:
    two = users.by_id(2)
    with assert_queries(session, 1) as log:
        found = users.by_ids([3, 2, 404, 1, 3])
    assert [u.id for u in found] == [3, 2, 1]
    assert found[1] is two
    assert " IN " in log.statements[0].upper()


def test_by_ids_of_loaded_objects_sends_no_sql(users: UserRepository, session) -> None:
    loaded = users.find(User.id <= 3)
    with assert_queries(session, 0):
        assert users.by_ids([3, 1, 2]) == [loaded[2], loaded[0], loaded[1]]


def test_by_ids_refreshes_expired_objects_in_the_same_query(users, session) -> None:
    loaded = users.find(User.id <= 2)
    session.expire(loaded[0])
    with assert_queries(session, 1):
        found = users.by_ids([1, 2, 3])
    assert found[0] is loaded[0]
    with assert_queries(session, 0):
        assert found[0].name == "user 1"  # refreshed by that query, not lazily


def test_by_ids_of_nothing_sends_no_sql(users: UserRepository, session) -> None:
    with assert_queries(session, 0):
        assert users.by_ids([]) == []


def test_by_ids_of_thousands_of_keys_is_one_query(session) -> None:
    session.add_all(User(id=n, name=f"bulk {n}") for n in range(100, 2600))
    session.commit()
    session.expunge_all()
    users = UserRepository(session)
    keys = list(range(2599, 99, -1))  # 2,500 keys, in descending order
    with assert_queries(session, 1):
        found = users.by_ids(keys)
    assert [u.id for u in found] == keys


def test_by_ids_chunks_the_misses(session) -> None:
    session.add_all(User(id=n, name=f"bulk {n}") for n in range(100, 2600))
    session.commit()
    session.expunge_all()

    class SmallChunks(UserRepository):
        key_chunk_size = 1000

    with assert_queries(session, 3):
        found = SmallChunks(session).by_ids(range(100, 2600))
    assert len(found) == 2500


def test_by_ids_with_composite_keys(session) -> None:
    memberships = MembershipRepository(session)
    loaded = memberships.by_id((1, 1))
    with assert_queries(session, 1):
        found = memberships.by_ids([(2, 2), (1, 1), (9, 9), (1, 3)])
    assert [(m.tenant_id, m.user_id) for m in found] == [(2, 2), (1, 1), (1, 3)]
    assert found[1] is loaded


def test_by_ids_of_composite_keys_past_postgresqls_or_chain_limit(session) -> None:
    # PostgreSQL runs out of stack on (a, b) IN (...) with some thousands of tuples: 8,000
    # failed before composite keys got chunks of their own.
    session.execute(
        sqlalchemy.insert(Membership),
        [{"tenant_id": 100 + n // 100, "user_id": n % 100} for n in range(8000)],
    )
    session.commit()
    session.expunge_all()
    keys = [(100 + n // 100, n % 100) for n in range(8000)]
    with assert_queries(session, 8):
        found = MembershipRepository(session).by_ids(keys)
    assert [(m.tenant_id, m.user_id) for m in found] == keys


def test_by_ids_leaves_out_objects_of_a_sibling_class(session) -> None:
    class ManagerRepository(Repository[Manager, int]):
        pass

    staff = [Engineer(id=1), Manager(id=2)]  # kept referenced: the identity map is weak
    session.add_all(staff)
    session.flush()
    managers = ManagerRepository(session)
    assert managers.by_id(1) is None  # Session.get refuses the Engineer
    with assert_queries(session, 0):
        assert [m.id for m in managers.by_ids([1, 2])] == [2]  # and so does by_ids
    session.expunge_all()
    with assert_queries(session, 1):  # fetched: only managers come back
        assert [m.id for m in managers.by_ids([1, 2])] == [2]
    session.rollback()


def test_joined_eager_collections_come_back_once(session) -> None:
    class AuthorRepository(Repository[Author, int]):
        pass

    session.add_all([Author(id=1, books=[Book(id=1), Book(id=2)]), Author(id=2)])
    session.flush()
    session.expunge_all()
    authors = AuthorRepository(session)
    found = authors.find(options=[joinedload(Author.books)], order_by=Author.id)
    assert [(a.id, len(a.books)) for a in found] == [(1, 2), (2, 0)]
    assert (
        authors.find_one(
            Author.id == 1,
        )
        is found[0]
    )
    session.rollback()


def test_update_where_takes_hybrid_attributes(users: UserRepository, session) -> None:
    assert users.update_where({"display_name": "renamed"}, User.id == 1) == 1
    assert users.by_id_or_raise(1).name == "renamed"
    session.rollback()


# --- queries ---------------------------------------------------------------------------------


def test_find_filters_orders_and_pages(users: UserRepository) -> None:
    found = users.find(User.id > 1, order_by=User.id.desc(), limit=2, offset=1)
    assert [u.id for u in found] == [4, 3]
    assert [u.id for u in users.find(order_by=[User.name, User.id])] == [1, 2, 3, 4, 5]
    assert users.find(User.name == "nobody") == []


def test_find_one(users: UserRepository) -> None:
    user = users.by_email("u2@example.org")
    assert user is not None
    assert user.id == 2
    assert users.by_email("nobody@example.org") is None
    with pytest.raises(MultipleResultsError, match="more than one User"):
        users.find_one(User.id > 1)


def test_count_and_exists(users: UserRepository, session) -> None:
    assert users.count() == 5
    assert users.count(User.id > 3) == 2
    with assert_queries(session, 1) as log:
        assert users.exists(User.name == "user 3") is True
    assert "EXISTS" in log.statements[0].upper()
    assert users.exists(User.name == "nobody") is False


def test_add_add_all_delete_never_commit(users: UserRepository, session, sync_engine) -> None:
    added = users.add(User(id=10, name="ten"))
    assert added.id == 10
    assert len(users.add_all([User(id=11, name="a"), User(id=12, name="b")])) == 2
    users.delete(users.by_id_or_raise(1))
    session.flush()
    with sync_engine.connect() as connection:  # nothing is committed by a repository
        ids = connection.scalars(text("SELECT id FROM users ORDER BY id")).all()
    assert 10 not in ids
    assert 1 in ids
    session.rollback()


# --- bulk update and delete ------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch"])
def test_update_where_keeps_loaded_objects_in_step(users, session, sync) -> None:
    loaded = users.find(order_by=User.id)
    matched = users.update_where({"name": "renamed"}, User.id <= 2, synchronize_session=sync)
    assert matched == 2
    with assert_queries(session, 0):
        assert [u.name for u in loaded] == ["renamed", "renamed", "user 3", "user 4", "user 5"]


def test_update_where_without_synchronizing_leaves_loaded_objects_stale(users, session) -> None:
    loaded = users.find(order_by=User.id)
    assert users.update_where({User.name: "renamed"}, User.id <= 2, synchronize_session=False) == 2
    with assert_queries(session, 0):
        assert loaded[0].name == "user 1"  # stale, as documented
    session.refresh(loaded[0])
    assert loaded[0].name == "renamed"


def test_update_where_evaluate_refuses_criteria_python_cannot_evaluate(users) -> None:
    users.find()
    with pytest.raises(sqlalchemy.exc.InvalidRequestError):
        users.update_where(
            {"name": "x"}, func.lower(User.name) == "user 1", synchronize_session="evaluate"
        )


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch"])
def test_delete_where_removes_deleted_objects_from_the_session(users, session, sync) -> None:
    loaded = users.find(order_by=User.id)
    assert users.delete_where(User.id <= 2, synchronize_session=sync) == 2
    assert loaded[0] not in session
    assert loaded[2] in session
    with assert_queries(session, 1):
        assert users.by_id(1) is None  # gone from the identity map too: Session.get asks


def test_delete_where_without_synchronizing_keeps_deleted_objects(users, session) -> None:
    loaded = users.find(order_by=User.id)
    assert users.delete_where(User.id <= 2, synchronize_session=False) == 2
    with assert_queries(session, 0):
        assert users.by_id(1) is loaded[0]  # stale: its row is gone
    assert users.count() == 3


def test_every_row_means_sqlalchemy_true(users: UserRepository) -> None:
    assert users.update_where({"email": None}, sqlalchemy.true()) == 5
    assert users.delete_where(sqlalchemy.true()) == 5
    assert users.count() == 0


# --- bad input: refused before any SQL -------------------------------------------------------


BAD_SINGLE_KEYS = [None, [1], {"id": 1}, (1,), "1", 1.5, True, {1}]
BAD_COMPOSITE_KEYS = [None, 1, (1,), (1, 2, 3), (1, None), [1, 2], {"tenant_id": 1}, ("1", 2)]


@pytest.mark.parametrize("key", BAD_SINGLE_KEYS)
def test_bad_keys_are_refused_before_any_sql(users: UserRepository, session, key) -> None:
    with assert_queries(session, 0):
        for call in (users.by_id, users.by_id_or_raise, lambda k: users.by_ids([1, k])):
            with pytest.raises(InvalidKeyError, match=r"User.*one value \(id: int\)"):
                call(key)


@pytest.mark.parametrize("key", BAD_COMPOSITE_KEYS)
def test_bad_composite_keys_are_refused_before_any_sql(session, key) -> None:
    memberships = MembershipRepository(session)
    with assert_queries(session, 0):
        for call in (memberships.by_id, lambda k: memberships.by_ids([(1, 1), k])):
            with pytest.raises(
                InvalidKeyError, match=r"Membership.*tuple of 2 values.*tenant_id: int, user_id"
            ):
                call(key)


def test_invalid_key_error_is_a_value_error(users: UserRepository) -> None:
    with pytest.raises(ValueError, match="bad primary key"):
        users.by_id(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.update_where({"name": "x"}), "without criteria"),
        (lambda r: r.delete_where(), "without criteria"),
        (lambda r: r.update_where({"name": "x"}, User.id == 1, synchronize_session="no"), "one of"),
        (lambda r: r.delete_where(User.id == 1, synchronize_session=0), "one of"),
        (lambda r: r.delete_where(User.id == 1, synchronize_session=True), "one of"),
        (lambda r: r.update_where({}, User.id == 1), "non-empty mapping"),
        (lambda r: r.update_where({"nmae": "x"}, User.id == 1), "no attribute 'nmae'"),
        (lambda r: r.find(True), "SQL criteria"),
        (lambda r: r.count(1), "SQL criteria"),
        (lambda r: r.find(limit=-1), "limit must be"),
        (lambda r: r.find(offset="2"), "offset must be"),
        (lambda r: r.by_ids("123"), "iterable of primary keys"),
        (lambda r: r.add("not a user"), "takes User objects"),
        (lambda r: r.delete(Membership(tenant_id=1, user_id=1)), "takes User objects"),
    ],
)
def test_bad_arguments_are_refused_before_any_sql(users, session, call, message) -> None:
    with assert_queries(session, 0), pytest.raises(InvalidArgumentError, match=message):
        call(users)
    assert users.count() == 5  # nothing changed


# --- model inference and set-up errors -------------------------------------------------------


def test_model_comes_from_the_generic_argument() -> None:
    assert UserRepository.model is User
    assert MembershipRepository.model is Membership


M = TypeVar("M")


def test_intermediate_generic_repositories_stay_generic(session) -> None:
    class TimestampedRepository(Repository[M, int]):
        pass

    class ConcreteUsers(TimestampedRepository[User]):
        pass

    class Subclassed(ConcreteUsers):
        pass

    assert not hasattr(TimestampedRepository, "model")
    assert ConcreteUsers.model is User
    assert Subclassed.model is User
    assert ConcreteUsers(session).by_id(1) is not None


def test_model_can_be_set_explicitly(session) -> None:
    class Explicit(Repository[User, int]):
        model = User

    assert Explicit(session).by_id(1) is not None


def test_a_repository_without_model_names_itself(session) -> None:
    class Nameless(Repository):  # type: ignore[type-arg]
        pass

    with pytest.raises(ormkit.ConfigurationError, match="Nameless has no model"):
        Nameless(session)


def test_a_repository_of_an_unmapped_class_names_it(session) -> None:
    class NotMapped:
        pass

    class Wrong(Repository[NotMapped, int]):
        pass

    with pytest.raises(
        ormkit.ConfigurationError, match=r"Wrong.model is .*NotMapped.*not a mapped"
    ):
        Wrong(session)


def test_a_repository_refuses_an_async_session() -> None:
    async_session = ormkit.create_async_session_factory("sqlite+aiosqlite://")()
    with pytest.raises(InvalidArgumentError, match="use AsyncRepository"):
        UserRepository(async_session)  # type: ignore[arg-type]


def test_unit_of_work_makes_repositories(sync_engine: sqlalchemy.Engine) -> None:
    factory = ormkit.create_session_factory(sync_engine)
    with UnitOfWork(factory) as uow:
        users = uow.repository(UserRepository)
        assert users.session is uow.session
        users.add(User(id=1, name="roach"))
    with UnitOfWork(factory) as uow:
        assert uow.repository(UserRepository).by_id_or_raise(1).name == "roach"
        with pytest.raises(InvalidArgumentError, match="subclass of Repository"):
            uow.repository(User)  # type: ignore[type-var]
