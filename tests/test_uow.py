"""UnitOfWork: commit whole on a clean exit, roll back on error, FK-ordered flushes, savepoints,
on_commit, misuse. The async twin is tested the same way in test_uow_async.py."""

from __future__ import annotations

import random

import pytest
import sqlalchemy
from sqlalchemy import exc, select, text

import ormkit
from ormkit import TransactionError, UnitOfWork
from ormkit.testing import count_queries
from tests.helpers import committed_ids, three_generations
from tests.models import Child, GrandChild, Parent, User


@pytest.fixture
def factory(sync_engine: sqlalchemy.Engine) -> sqlalchemy.orm.sessionmaker[sqlalchemy.orm.Session]:
    return ormkit.create_session_factory(sync_engine)


# --- commit, rollback, close -----------------------------------------------------------------


def test_clean_exit_commits_and_closes(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        session = uow.session
        assert sync_engine.pool.checkedout() == 0  # nothing sent yet: no connection taken
    assert committed_ids(sync_engine, Parent) == [1]
    assert session.get_transaction() is None  # closed
    assert sync_engine.pool.checkedout() == 0


def test_exception_rolls_back_and_propagates_the_same_error(factory, sync_engine) -> None:
    error = RuntimeError("boom")
    with pytest.raises(RuntimeError) as caught, UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.flush()
        raise error
    assert caught.value is error
    assert committed_ids(sync_engine, Parent) == []
    assert sync_engine.pool.checkedout() == 0


def test_explicit_flush_point_sets_server_generated_keys(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        parent = uow.add(Parent(name="server keyed"))
        assert parent.id is None
        uow.flush()
        assert isinstance(parent.id, int)
        uow.add(Child(id=1, parent_id=parent.id))
    assert committed_ids(sync_engine, Child) == [1]


def test_add_all_returns_a_list_and_delete_deletes(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        users = uow.add_all(User(id=n, name=f"u{n}") for n in (1, 2, 3))
        assert [u.id for u in users] == [1, 2, 3]
    with UnitOfWork(factory) as uow:
        uow.delete(uow.session.get(User, 2))
    assert committed_ids(sync_engine, User) == [1, 3]


# --- foreign-key ordering without relationship() ---------------------------------------------


def test_plain_sqlalchemy_session_inserts_the_child_first(sync_engine) -> None:
    # The trap ormkit fixes: without relationship(), SQLAlchemy's own order fails here.
    plain = sqlalchemy.orm.sessionmaker(sync_engine)
    with plain() as session:
        session.add_all([Parent(id=10), Child(id=1, parent_id=10)])
        with pytest.raises(exc.IntegrityError):
            session.commit()


def test_child_first_rows_three_tables_deep_commit(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        uow.add_all(three_generations(40))
    assert len(committed_ids(sync_engine, GrandChild)) == 40
    assert len(committed_ids(sync_engine, Child)) == 40
    assert len(committed_ids(sync_engine, Parent)) == 40


def test_fk_ordered_flush_batches_each_table(factory) -> None:
    # One INSERT round trip per table, parents first: the order comes from SQLAlchemy's own
    # unit of work, not from row-by-row flushing.
    with count_queries(factory) as log, UnitOfWork(factory) as uow:
        uow.add_all(three_generations(40))
    tables = [sql.split()[2] for sql in log.statements]
    assert tables == ["parent", "child", "grandchild"]


def test_deletes_in_any_order_delete_children_first(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        uow.add_all(three_generations(40))
    with UnitOfWork(factory) as uow:
        # Load everything first: a get() of an unloaded row would autoflush the deletes so far.
        rows = [
            *uow.session.scalars(select(Parent)),
            *uow.session.scalars(select(Child)),
            *uow.session.scalars(select(GrandChild)),
        ]
        random.Random(7).shuffle(rows)
        for row in rows:
            uow.session.delete(row)
    assert committed_ids(sync_engine, Parent) == []
    assert committed_ids(sync_engine, GrandChild) == []


def test_autoflush_before_a_query_respects_fk_order(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        uow.add(GrandChild(id=1, child_id=1))
        uow.add(Child(id=1, parent_id=1))
        uow.add(Parent(id=1))
        with count_queries(uow.session) as log:
            # The query autoflushes the three pending rows first.
            assert uow.session.scalars(select(GrandChild.id)).all() == [1]
        assert [sql.split()[0] for sql in log.statements] == ["INSERT"] * 3 + ["SELECT"]
    assert committed_ids(sync_engine, GrandChild) == [1]


def test_explicit_flush_respects_fk_order(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        child, parent = uow.add_all([Child(id=1, parent_id=1), Parent(id=1)])
        uow.flush()
        uow.delete(parent)
        uow.delete(child)
        uow.flush()
    assert committed_ids(sync_engine, Child) == []


# --- savepoints ------------------------------------------------------------------------------


def test_savepoint_rolls_back_to_itself_and_the_outer_work_survives(factory, sync_engine) -> None:
    ran: list[str] = []
    with UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: ran.append("outer"))
        with pytest.raises(RuntimeError), uow.savepoint():
            uow.add(Parent(id=2))
            uow.flush()
            uow.on_commit(lambda: ran.append("inner"))
            raise RuntimeError
        with uow.savepoint():
            uow.add(Parent(id=3))
            uow.on_commit(lambda: ran.append("kept"))
    assert committed_ids(sync_engine, Parent) == [1, 3]
    assert ran == ["outer", "kept"]


def test_failed_flush_inside_a_savepoint_keeps_the_rest(factory, sync_engine) -> None:
    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="first"))
        with pytest.raises(exc.IntegrityError), uow.savepoint():
            uow.add(User(id=1, name="duplicate"))
            uow.flush()
        uow.add(User(id=2, name="second"))
    assert committed_ids(sync_engine, User) == [1, 2]


# --- on_commit -------------------------------------------------------------------------------


def test_callbacks_run_in_order_after_commit_and_see_committed_rows(factory, sync_engine) -> None:
    seen: list[object] = []
    with UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        # Another connection: it sees the row only if the commit already happened.
        uow.on_commit(lambda: seen.append(committed_ids(sync_engine, Parent)))
        uow.on_commit(lambda: seen.append("second"))
        assert seen == []
    assert seen == [[1], "second"]


def test_callbacks_never_run_on_rollback(factory) -> None:
    ran: list[str] = []
    with pytest.raises(KeyError), UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: ran.append("no"))
        raise KeyError
    assert ran == []


def test_callbacks_do_not_run_when_the_commit_fails(factory, sync_engine) -> None:
    ran: list[str] = []
    with pytest.raises(exc.IntegrityError), UnitOfWork(factory) as uow:
        uow.add(Child(id=1, parent_id=404))  # fails at the commit's flush
        uow.on_commit(lambda: ran.append("no"))
    assert ran == []
    assert committed_ids(sync_engine, Child) == []


def test_a_raising_callback_keeps_the_commit_and_the_others_run(
    factory, sync_engine, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="first") as caught, UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: fail("first"))
        uow.on_commit(lambda: ran.append("still ran"))
        uow.on_commit(lambda: fail("second"))
    assert isinstance(caught.value, ValueError)
    assert ran == ["still ran"]
    assert committed_ids(sync_engine, Parent) == [1]
    failures = [r for r in caplog.records if r.name == "ormkit" and r.exc_info]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["second"]


def test_on_commit_refuses_what_is_not_callable(factory) -> None:
    with UnitOfWork(factory) as uow, pytest.raises(ormkit.InvalidArgumentError, match="callable"):
        uow.on_commit("not callable")  # type: ignore[arg-type]


# --- explicit commit and rollback ------------------------------------------------------------


def test_commit_inside_the_block_is_durable_and_work_goes_on(factory, sync_engine) -> None:
    ran: list[list[int]] = []
    with pytest.raises(RuntimeError), UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: ran.append(committed_ids(sync_engine, Parent)))
        uow.commit()
        assert ran == [[1]]
        uow.add(Parent(id=2))
        uow.flush()
        raise RuntimeError  # rolls back only what came after the commit
    assert committed_ids(sync_engine, Parent) == [1]
    assert ran == [[1]]  # ran once, not again at exit


def test_rollback_drops_the_work_and_its_callbacks(factory, sync_engine) -> None:
    ran: list[str] = []
    with UnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        uow.on_commit(lambda: ran.append("dropped"))
        uow.flush()
        uow.rollback()
        uow.add(Parent(id=2))
        uow.on_commit(lambda: ran.append("kept"))
    assert committed_ids(sync_engine, Parent) == [2]
    assert ran == ["kept"]


# --- a swallowed failed flush never commits --------------------------------------------------


def test_swallowed_failed_flush_commits_nothing(factory, sync_engine) -> None:
    ran: list[str] = []
    with pytest.raises(TransactionError, match="a flush failed") as caught:  # noqa: SIM117
        with UnitOfWork(factory) as uow:
            uow.add(User(id=1, name="kept?"))
            uow.flush()
            uow.on_commit(lambda: ran.append("no"))
            uow.add(User(id=1, name="duplicate"))
            try:
                uow.flush()
            except exc.IntegrityError:
                pass  # swallowed
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    assert committed_ids(sync_engine, User) == []
    assert ran == []
    assert sync_engine.pool.checkedout() == 0


def test_swallowed_failed_autoflush_commits_nothing(factory, sync_engine) -> None:
    with pytest.raises(TransactionError) as caught:  # noqa: SIM117
        with UnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            uow.flush()
            uow.add(Child(id=1, parent_id=404))
            try:
                uow.session.scalars(select(Child)).all()  # autoflush fails
            except exc.IntegrityError:
                pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    assert committed_ids(sync_engine, Parent) == []


def test_commit_after_a_swallowed_failed_flush_refuses(factory, sync_engine) -> None:
    with pytest.raises(TransactionError), UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.flush()
        uow.add(User(id=1, name="duplicate"))
        try:
            uow.flush()
        except exc.IntegrityError:
            pass
        uow.commit()
    assert committed_ids(sync_engine, User) == []


def test_swallowed_failed_statement_commits_nothing(factory, sync_engine) -> None:
    # PostgreSQL would turn the COMMIT into a silent ROLLBACK; SQLite would commit the first
    # row. Both must end the same way: nothing committed, an error, no callbacks.
    ran: list[str] = []
    with pytest.raises(TransactionError, match="a statement failed") as caught:  # noqa: SIM117
        with UnitOfWork(factory) as uow:
            uow.add(User(id=1, name="a"))
            uow.add(User(id=2, name="b"))
            uow.flush()
            uow.on_commit(lambda: ran.append("no"))
            try:
                uow.session.execute(text("UPDATE users SET id = 1 WHERE id = 2"))
            except exc.IntegrityError:
                pass
    assert isinstance(caught.value.__cause__, exc.IntegrityError)
    assert committed_ids(sync_engine, User) == []
    assert ran == []


def test_a_later_savepoint_does_not_forget_a_swallowed_statement_error(
    factory, sync_engine
) -> None:
    # SQLite raises TransactionError at the end; PostgreSQL already refuses the SAVEPOINT in
    # its aborted transaction. Either way: an error, and nothing committed.
    with pytest.raises((TransactionError, exc.DBAPIError)):  # noqa: SIM117
        with UnitOfWork(factory) as uow:
            uow.add_all([User(id=1, name="a"), User(id=2, name="b")])
            uow.flush()
            try:
                uow.session.execute(text("UPDATE users SET id = 1 WHERE id = 2"))
            except exc.IntegrityError:
                pass
            with uow.savepoint():
                uow.add(User(id=3, name="c"))
    assert committed_ids(sync_engine, User) == []


def test_a_statement_error_undone_by_its_savepoint_does_not_block_the_commit(
    factory, sync_engine
) -> None:
    with UnitOfWork(factory) as uow:
        uow.add_all([User(id=1, name="a"), User(id=2, name="b")])
        uow.flush()
        with pytest.raises(exc.IntegrityError), uow.savepoint():
            uow.session.execute(text("UPDATE users SET id = 1 WHERE id = 2"))
        with pytest.raises(exc.IntegrityError), uow.session.begin_nested():
            uow.session.execute(text("UPDATE users SET id = 1 WHERE id = 2"))
    assert committed_ids(sync_engine, User) == [1, 2]


def test_a_flush_error_caught_inside_a_savepoint_drops_its_callbacks(factory, sync_engine) -> None:
    ran: list[str] = []
    with UnitOfWork(factory) as uow:
        uow.add(User(id=1, name="a"))
        uow.on_commit(lambda: ran.append("outer"))
        with uow.savepoint():
            uow.on_commit(lambda: ran.append("inner"))
            uow.add(User(id=1, name="duplicate"))
            try:
                uow.flush()  # SQLAlchemy rolls back to the savepoint by itself
            except exc.IntegrityError:
                pass
    assert committed_ids(sync_engine, User) == [1]
    assert ran == ["outer"]


# --- misuse ----------------------------------------------------------------------------------


def test_members_before_the_block_say_to_open_it(factory) -> None:
    uow = UnitOfWork(factory)
    for use in (
        lambda: uow.session,
        lambda: uow.add(Parent(id=1)),
        lambda: uow.add_all([]),
        lambda: uow.delete(Parent(id=1)),
        uow.flush,
        uow.commit,
        uow.rollback,
        lambda: uow.on_commit(print),
        lambda: uow.savepoint().__enter__(),
    ):
        with pytest.raises(TransactionError, match=r"before the unit of work was opened.*with"):
            use()


def test_members_after_the_block_say_to_open_a_new_one(factory) -> None:
    with UnitOfWork(factory) as uow:
        pass
    for use in (lambda: uow.session, uow.flush, uow.commit, lambda: uow.add(Parent(id=1))):
        with pytest.raises(TransactionError, match="after the unit of work ended"):
            use()


def test_entering_twice_or_again_is_refused(factory, sync_engine) -> None:
    uow = UnitOfWork(factory)
    with uow:
        uow.add(Parent(id=1))
        with pytest.raises(TransactionError, match="already open"), uow:
            pass
    with pytest.raises(TransactionError, match="cannot be reopened"), uow:
        pass
    assert committed_ids(sync_engine, Parent) == [1]


def test_an_async_factory_is_refused_with_a_pointer_to_the_twin() -> None:
    async_factory = ormkit.create_async_session_factory("sqlite+aiosqlite://")
    with pytest.raises(ormkit.InvalidArgumentError, match="use AsyncUnitOfWork"):
        UnitOfWork(async_factory)  # type: ignore[arg-type]
    with pytest.raises(ormkit.InvalidArgumentError, match="takes a sessionmaker"):
        UnitOfWork("sqlite://")  # type: ignore[arg-type]


# --- isolation level -------------------------------------------------------------------------


def _isolation(session: sqlalchemy.orm.Session) -> str:
    if session.bind is not None and session.bind.dialect.name == "sqlite":
        return (
            "read uncommitted"
            if session.scalar(text("PRAGMA read_uncommitted"))
            else "serializable"
        )
    return str(session.scalar(text("SHOW transaction_isolation")))


def test_isolation_level_holds_for_every_transaction(factory, sync_engine) -> None:
    level = "READ UNCOMMITTED" if sync_engine.dialect.name == "sqlite" else "SERIALIZABLE"
    with UnitOfWork(factory, isolation_level=level) as uow:
        assert _isolation(uow.session) == level.lower()
        uow.add(Parent(id=1))
        uow.commit()
        assert _isolation(uow.session) == level.lower()
        uow.add(Parent(id=2))
    assert committed_ids(sync_engine, Parent) == [1, 2]
    # The level does not leak into the pool's connections.
    with UnitOfWork(factory) as uow:
        assert _isolation(uow.session) != level.lower()
