"""Model-based: random runs of units of work against a model of what must be committed.

A Hypothesis state machine starts from some committed rows, opens units of work and, inside
them, adds and deletes rows, flushes, registers `on_commit` callbacks, opens savepoints
(released, rolled back by an exception, or rolled back by a failed flush caught inside them;
nested up to three deep), commits and rolls back explicitly, swallows a failed flush (a
duplicate primary key), reads through the session, and leaves the block cleanly or with an
exception. A plain dict models the committed rows. After every unit of work, and after every
explicit commit, the rows another connection reads must be exactly the model's; every callback
must have run once, in order, after the commit that made its work durable, and seen that work
from another connection.

The same machine drives `UnitOfWork` (pysqlite, psycopg) and `AsyncUnitOfWork` (aiosqlite,
psycopg async, asyncpg; run on an event loop of the test's own). Sizes grow under
`nox -s stress`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, NoReturn

import pytest
import sqlalchemy
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, insert, inspect, select
from sqlalchemy.exc import IntegrityError

import ormkit
from ormkit import AsyncUnitOfWork, TransactionError, UnitOfWork
from tests.models import Base, User
from tests.stress import STRESS, scale

pytestmark = pytest.mark.reliability

SETTINGS = settings(
    max_examples=scale(40, 500),
    stateful_step_count=scale(30, 80),
    deadline=None,  # a step waits on a database
    # The default run is the same every time, so its coverage check (every kind of ending was
    # reached) cannot flake; `nox -s stress` explores new runs each time, many more of them.
    derandomize=not STRESS,
)
IDS = list(range(1, 7))  # few keys, so adds, deletes and duplicates meet often

# A savepoint's plan: its steps, how it ends ("release", "raise", "fail"), and for "fail" the
# key of the duplicate row whose flush fails inside it. A step is ("add", key, name),
# ("delete", key), ("flush",), ("on_commit", token) or ("savepoint", plan).
Plan = tuple[list[tuple[Any, ...]], str, int]


class PlannedError(Exception):
    """The exception a block raises on purpose."""


def _raise_planned() -> NoReturn:
    raise PlannedError


# --- drivers: the same operations on a sync and an async unit of work -------------------------


def _forget_a_new_row_instead(session: sqlalchemy.orm.Session, row: User) -> bool:
    """Delete the row of `row`'s key if SQLAlchemy gave back an object already marked deleted.

    After delete(A) and add(B) with the same key, before a flush, `Session.get` returns A (its
    key is still A's in the identity map) and deleting A again does nothing: B would be saved
    (a "row switch"). Deleting that key's row then means forgetting B, which is not sent yet.
    """
    if row not in session.deleted:
        return False
    new = [obj for obj in session.new if isinstance(obj, User) and obj.id == row.id]
    assert len(new) == 1, f"key {row.id} is marked deleted, yet the model has a row for it"
    session.expunge(new[0])
    return True


class SyncDriver:
    """Runs the machine's operations on a `UnitOfWork` over `engine`."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.engine = engine
        self.factory = ormkit.create_session_factory(engine)
        self.uow: UnitOfWork | None = None
        self.ran: list[tuple[int, dict[int, str]]] = []  # callbacks: token, rows they saw

    def reset(self, rows: dict[int, str]) -> None:
        """Start from exactly `rows`, committed."""
        with self.engine.begin() as connection:
            connection.execute(delete(User))
            if rows:
                connection.execute(insert(User), [{"id": k, "name": n} for k, n in rows.items()])

    def committed(self) -> dict[int, str]:
        """The rows another connection reads."""
        with self.engine.connect() as connection:
            return dict(connection.execute(select(User.id, User.name)).all())

    def session_rows(self) -> dict[int, str]:
        """The rows the unit of work's own session reads (its transaction, autoflushed)."""
        return dict(self._open().session.execute(select(User.id, User.name)).all())

    def open(self) -> None:
        self.uow = UnitOfWork(self.factory)
        self.uow.__enter__()

    def exit_cleanly(self) -> None:
        uow, self.uow = self._open(), None
        uow.__exit__(None, None, None)

    def exit_with_exception(self) -> None:
        uow, self.uow = self._open(), None
        try:
            _raise_planned()  # to be handed to __exit__ as a `with` block does
        except PlannedError as error:
            swallowed = uow.__exit__(PlannedError, error, error.__traceback__)
        assert not swallowed, "the unit of work swallowed the block's exception"

    def step(self, op: tuple[Any, ...]) -> None:
        uow = self._open()
        if op[0] == "add":
            uow.add(User(id=op[1], name=op[2]))
        elif op[0] == "delete":
            row = uow.session.get(User, op[1])
            assert row is not None, f"row {op[1]} is in the model but not in the session"
            if not _forget_a_new_row_instead(uow.session, row):
                uow.delete(row)
        elif op[0] == "flush":
            uow.flush()
        elif op[0] == "on_commit":
            token = op[1]
            uow.on_commit(lambda: self.ran.append((token, self.committed())))
        else:
            self.savepoint(op[1])

    def commit(self) -> None:
        self._open().commit()

    def rollback(self) -> None:
        self._open().rollback()

    def failing_flush(self, key: int) -> None:
        """Flush a second row with `key`, catch the IntegrityError and carry on."""
        uow = self._open()
        uow.flush()
        # The row's own object may be in the identity map; SQLAlchemy would warn about a new
        # object with its key instead of letting the database refuse the INSERT.
        loaded = uow.session.identity_map.get(inspect(User).identity_key_from_primary_key((key,)))
        if loaded is not None:
            uow.session.expunge(loaded)
        uow.add(User(id=key, name="duplicate"))
        try:
            uow.flush()
        except IntegrityError:
            return
        raise AssertionError(f"a second row with key {key} was flushed")

    def savepoint(self, plan: Plan) -> None:
        steps, ending, key = plan
        uow = self._open()
        try:
            with uow.savepoint():
                for op in steps:
                    self.step(op)
                if ending == "raise":
                    _raise_planned()
                if ending == "fail":
                    self.failing_flush(key)
        except PlannedError:
            assert ending == "raise"
        else:
            assert ending != "raise", "the savepoint swallowed the exception"

    def _open(self) -> UnitOfWork:
        assert self.uow is not None
        return self.uow


class AsyncDriver:
    """The same operations on an `AsyncUnitOfWork`, each run to its end on `loop`."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.factory = ormkit.create_async_session_factory(engine)
        self.uow: AsyncUnitOfWork | None = None
        self.ran: list[tuple[int, dict[int, str]]] = []

    def _run(self, operation: Any) -> Any:
        return self.loop.run_until_complete(operation)

    def reset(self, rows: dict[int, str]) -> None:
        async def reset() -> None:
            async with self.engine.begin() as connection:
                await connection.execute(delete(User))
                if rows:
                    values = [{"id": key, "name": name} for key, name in rows.items()]
                    await connection.execute(insert(User), values)

        self._run(reset())

    async def _committed(self) -> dict[int, str]:
        async with self.engine.connect() as connection:
            return dict((await connection.execute(select(User.id, User.name))).all())

    def committed(self) -> dict[int, str]:
        return self._run(self._committed())

    def session_rows(self) -> dict[int, str]:
        async def read() -> dict[int, str]:
            result = await self._open().session.execute(select(User.id, User.name))
            return dict(result.all())

        return self._run(read())

    def open(self) -> None:
        self.uow = AsyncUnitOfWork(self.factory)
        self._run(self.uow.__aenter__())

    def exit_cleanly(self) -> None:
        uow, self.uow = self._open(), None
        self._run(uow.__aexit__(None, None, None))

    def exit_with_exception(self) -> None:
        uow, self.uow = self._open(), None
        try:
            _raise_planned()  # to be handed to __aexit__ as an `async with` block does
        except PlannedError as error:
            swallowed = self._run(uow.__aexit__(PlannedError, error, error.__traceback__))
        assert not swallowed, "the unit of work swallowed the block's exception"

    def step(self, op: tuple[Any, ...]) -> None:
        self._run(self._step(op))

    async def _step(self, op: tuple[Any, ...]) -> None:
        uow = self._open()
        if op[0] == "add":
            uow.add(User(id=op[1], name=op[2]))
        elif op[0] == "delete":
            row = await uow.session.get(User, op[1])
            assert row is not None, f"row {op[1]} is in the model but not in the session"
            if not _forget_a_new_row_instead(uow.session.sync_session, row):
                await uow.delete(row)
        elif op[0] == "flush":
            await uow.flush()
        elif op[0] == "on_commit":
            token = op[1]

            async def callback() -> None:
                self.ran.append((token, await self._committed()))

            uow.on_commit(callback)
        else:
            await self._savepoint(op[1])

    def commit(self) -> None:
        self._run(self._open().commit())

    def rollback(self) -> None:
        self._run(self._open().rollback())

    def failing_flush(self, key: int) -> None:
        self._run(self._failing_flush(key))

    async def _failing_flush(self, key: int) -> None:
        uow = self._open()
        await uow.flush()
        loaded = uow.session.identity_map.get(inspect(User).identity_key_from_primary_key((key,)))
        if loaded is not None:
            uow.session.expunge(loaded)
        uow.add(User(id=key, name="duplicate"))
        try:
            await uow.flush()
        except IntegrityError:
            return
        raise AssertionError(f"a second row with key {key} was flushed")

    def savepoint(self, plan: Plan) -> None:
        self._run(self._savepoint(plan))

    async def _savepoint(self, plan: Plan) -> None:
        steps, ending, key = plan
        uow = self._open()
        try:
            async with uow.savepoint():
                for op in steps:
                    await self._step(op)
                if ending == "raise":
                    _raise_planned()
                if ending == "fail":
                    await self._failing_flush(key)
        except PlannedError:
            assert ending == "raise"
        else:
            assert ending != "raise", "the savepoint swallowed the exception"

    def _open(self) -> AsyncUnitOfWork:
        assert self.uow is not None
        return self.uow


# --- the state machine ------------------------------------------------------------------------


class UnitOfWorkMachine(RuleBasedStateMachine):
    """Units of work against the model: `committed` is what the database must hold."""

    make_driver: Any  # set by each test: a function that returns the driver of its backend
    stats: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        self.driver = self.make_driver()
        self.committed: dict[int, str] = {}
        self.current: dict[int, str] = {}  # what a commit now would make durable
        self.open = False
        self.broken = False  # a failed flush was swallowed: the transaction cannot commit
        self.pending: list[int] = []  # callbacks registered since the last commit
        self.expected_ran: list[tuple[int, dict[int, str]]] = []
        self.counter = 0
        self.stats["examples"] += 1

    # --- the model --------------------------------------------------------------------------

    def _name(self) -> str:
        self.counter += 1
        return f"row {self.counter}"

    def _committed_now(self) -> None:
        self.committed = dict(self.current)
        self.expected_ran += [(token, dict(self.committed)) for token in self.pending]
        self.pending = []

    def _rolled_back(self) -> None:
        self.current = dict(self.committed)
        self.pending = []
        self.broken = False

    def _check_database(self) -> None:
        rows = self.driver.committed()
        assert rows == self.committed, f"committed {rows}, the model says {self.committed}"
        self.stats["rows checked"] += len(rows)
        self.stats["database checks"] += 1

    def _free(self) -> list[int]:
        return [key for key in IDS if key not in self.current]

    def _draw_step(self, data: st.DataObject, depth: int) -> tuple[Any, ...]:
        """A step inside a savepoint, applied to the model as it is drawn."""
        kinds = ["flush", "on_commit"]
        kinds += ["add"] if self._free() else []
        kinds += ["delete"] if self.current else []
        kinds += ["savepoint"] if depth < 2 else []
        kind = data.draw(st.sampled_from(kinds), label="step")
        if kind == "add":
            key, name = data.draw(st.sampled_from(self._free()), label="add"), self._name()
            self.current[key] = name
            return ("add", key, name)
        if kind == "delete":
            key = data.draw(st.sampled_from(sorted(self.current)), label="delete")
            del self.current[key]
            return ("delete", key)
        if kind == "on_commit":
            self.counter += 1
            self.pending.append(self.counter)
            return ("on_commit", self.counter)
        if kind == "savepoint":
            return ("savepoint", self._draw_savepoint(data, depth + 1))
        return ("flush",)

    def _draw_savepoint(self, data: st.DataObject, depth: int) -> Plan:
        before, mark = dict(self.current), len(self.pending)
        steps = [self._draw_step(data, depth) for _ in range(data.draw(st.integers(0, 4)))]
        ending = data.draw(
            st.sampled_from(["release", "raise", "fail"] if self.current else ["release", "raise"]),
            label="ending",
        )
        key = 0
        if ending == "fail":
            key = data.draw(st.sampled_from(sorted(self.current)), label="duplicate")
        if ending != "release":  # rolled back to the savepoint: its work and callbacks go
            self.current = before
            del self.pending[mark:]
        self.stats[f"savepoint {ending}"] += 1
        return steps, ending, key

    # --- rules ------------------------------------------------------------------------------

    @initialize(data=st.data())
    def start_from_committed_rows(self, data: st.DataObject) -> None:
        keys = data.draw(st.sets(st.sampled_from(IDS)), label="rows already committed")
        self.committed = {key: self._name() for key in sorted(keys)}
        self.current = dict(self.committed)
        self.driver.reset(self.committed)

    @precondition(lambda self: not self.open)
    @rule()
    def begin(self) -> None:
        self.driver.open()
        self.open = True
        self.stats["units of work"] += 1

    @precondition(lambda self: self.open and not self.broken and len(self.current) < len(IDS))
    @rule(data=st.data())
    def add(self, data: st.DataObject) -> None:
        key, name = data.draw(st.sampled_from(self._free()), label="key"), self._name()
        self.driver.step(("add", key, name))
        self.current[key] = name

    @precondition(lambda self: self.open and not self.broken and self.current)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.current)), label="key")
        self.driver.step(("delete", key))
        del self.current[key]

    @precondition(lambda self: self.open and not self.broken)
    @rule()
    def flush(self) -> None:
        self.driver.step(("flush",))

    @precondition(lambda self: self.open and not self.broken)
    @rule()
    def on_commit(self) -> None:
        self.counter += 1
        self.driver.step(("on_commit", self.counter))
        self.pending.append(self.counter)

    @precondition(lambda self: self.open and not self.broken)
    @rule(data=st.data())
    def savepoint(self, data: st.DataObject) -> None:
        self.driver.savepoint(self._draw_savepoint(data, depth=0))

    @precondition(lambda self: self.open and not self.broken and self.current)
    @rule(data=st.data())
    def swallow_a_failed_flush(self, data: st.DataObject) -> None:
        self.driver.failing_flush(data.draw(st.sampled_from(sorted(self.current)), label="key"))
        self.broken = True
        self.stats["swallowed flush errors"] += 1

    @precondition(lambda self: self.open and not self.broken)
    @rule()
    def read_through_the_session(self) -> None:
        rows = self.driver.session_rows()
        assert rows == self.current, f"the session reads {rows}, the model says {self.current}"
        self.stats["rows checked"] += len(rows)

    @precondition(lambda self: self.open)
    @rule()
    def commit(self) -> None:
        if self.broken:
            with pytest.raises(TransactionError, match="a flush failed"):
                self.driver.commit()
            self.stats["commit refused"] += 1
        else:
            self.driver.commit()
            self._committed_now()
            self.stats["explicit commits"] += 1
        self._check_database()

    @precondition(lambda self: self.open)
    @rule()
    def rollback(self) -> None:
        self.driver.rollback()
        self._rolled_back()
        self.stats["explicit rollbacks"] += 1

    @precondition(lambda self: self.open)
    @rule()
    def leave_cleanly(self) -> None:
        self.open = False
        if self.broken:
            with pytest.raises(TransactionError, match="a flush failed") as caught:
                self.driver.exit_cleanly()
            assert isinstance(caught.value.__cause__, IntegrityError)
            self._rolled_back()
            self.stats["left cleanly, refused to commit"] += 1
        else:
            self.driver.exit_cleanly()
            self._committed_now()
            self.stats["left cleanly, committed"] += 1
        self._check_database()

    @precondition(lambda self: self.open)
    @rule()
    def leave_with_an_exception(self) -> None:
        self.open = False
        self.driver.exit_with_exception()
        self._rolled_back()
        self.stats["left with an exception"] += 1
        self._check_database()

    @invariant()
    def callbacks_ran_once_each_after_their_commit(self) -> None:
        assert self.driver.ran == self.expected_ran
        self.stats["invariant checks"] += 1  # once before the first step, then after each

    def teardown(self) -> None:
        if self.open:
            self.leave_with_an_exception()


def _run(make_driver: Any) -> Counter[str]:
    stats: Counter[str] = Counter()

    class Machine(UnitOfWorkMachine):
        pass

    Machine.make_driver = staticmethod(make_driver)
    Machine.stats = stats
    run_state_machine_as_test(Machine, settings=SETTINGS)
    return stats


def _check_coverage(stats: Counter[str]) -> None:
    """The runs reached every kind of ending they claim to model."""
    for what in (
        "left cleanly, committed",
        "left cleanly, refused to commit",
        "left with an exception",
        "explicit commits",
        "commit refused",
        "savepoint release",
        "savepoint raise",
        "savepoint fail",
        "swallowed flush errors",
    ):
        assert stats[what] > 0, f"no run reached {what!r}: {dict(stats)}"


def test_sync_units_of_work_commit_exactly_the_model(sync_engine: sqlalchemy.Engine) -> None:
    stats = _run(lambda: SyncDriver(sync_engine))
    _check_coverage(stats)


def test_async_units_of_work_commit_exactly_the_model(async_url: sqlalchemy.URL) -> None:
    # Hypothesis drives the machine synchronously; each async step runs to its end on a loop of
    # this test's own (asyncpg ties connections to the loop that made them).
    loop = asyncio.new_event_loop()
    engine = ormkit.create_async_engine(async_url)
    try:

        async def create_tables() -> None:
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)

        loop.run_until_complete(create_tables())
        stats = _run(lambda: AsyncDriver(engine, loop))
        assert engine.pool.checkedout() == 0, "a unit of work left a connection checked out"
    finally:
        loop.run_until_complete(engine.dispose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    _check_coverage(stats)
