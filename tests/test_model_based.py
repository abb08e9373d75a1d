"""Model-based: random runs of units of work against a model of what must be committed.

A Hypothesis state machine starts from some committed rows, opens units of work and, inside
them, adds and deletes rows, flushes, INSERTs rows with Core statements on the unit of work's
own connection (`connection.execute`, `exec_driver_sql`), registers `on_commit` callbacks,
reads through the session, and opens blocks nested up to three deep: savepoints and nested
units of work (a `UnitOfWork` of the same factory, which joins the open one). A block is
released, rolled back by an exception, or ends after a caught error: a failed flush (a duplicate
primary key), or a failed Core statement (a duplicate key, SQL naming a missing column). Inside
a nested unit of work, its own `commit()` and `rollback()` must be refused, and a durable unit
of work must refuse to join. At the top, the machine commits and rolls back through the unit of
work and through `uow.session`, swallows a failed flush or statement (after which every commit
must be refused until a rollback), and leaves the block cleanly or with an exception.

A plain dict models the committed rows. After every unit of work, and after every commit by
any route, the rows another connection reads must be exactly the model's; every callback must
have run once, in order, at the commit point after the commit that made its work durable (a
commit through the session makes it durable; the unit of work's next commit or its exit runs
it), and seen that work from another connection.

The same machine drives `UnitOfWork` (pysqlite, psycopg) and `AsyncUnitOfWork` (aiosqlite,
psycopg async, asyncpg; run on an event loop of the test's own, each unit of work's block in a
task of its own, as an `async with` is). Sizes grow under `nox -s stress`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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
from sqlalchemy import delete, insert, inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, PendingRollbackError

import ormkit
from ormkit import AsyncUnitOfWork, TransactionError, UnitOfWork
from tests.models import Base, User
from tests.stress import STRESS, scale

pytestmark = pytest.mark.reliability

SETTINGS = settings(
    max_examples=scale(100, 500),
    stateful_step_count=scale(30, 80),
    deadline=None,  # a step waits on a database
    # The default run is the same every time, so its coverage check (every kind of ending was
    # reached) cannot flake; `nox -s stress` explores new runs each time, many more of them.
    derandomize=not STRESS,
)
IDS = list(range(1, 7))  # few keys, so adds, deletes and duplicates meet often

# A step is ("add", key, name), ("delete", key), ("flush",), ("on_commit", token),
# ("read", rows the session must read), ("insert", key, name, route), ("fail", failure),
# ("durable",), ("refused", "commit" | "rollback") (inside a nested unit of work only),
# ("commit",), ("rollback",), ("session commit",), ("session rollback",) (outside any block;
# inside one they end more than the block, and are refused or fail the unit of work:
# tests/test_nesting.py proves those), or ("block", plan).
#
# A failure is (what, route, key): what is "flush" (a second row with `key`), "duplicate"
# (a Core INSERT of `key`) or "bad sql" (an INSERT naming a missing column); route is how a
# Core statement is sent: "execute" (`connection.execute`) or "driver sql" (`exec_driver_sql`).
Failure = tuple[str, str, int]
# A block's plan: its kind ("savepoint", "nested"), its steps, the failure that ends its steps
# (or None), and how it is left: "exit" (normally) or "raise".
Plan = tuple[str, list[tuple[Any, ...]], Failure | None, str]
STATEMENT_FAILURES = ("duplicate", "bad sql")
ROUTES = ("execute", "driver sql")


class PlannedError(Exception):
    """The exception a block raises on purpose."""


def _raise_planned() -> NoReturn:
    raise PlannedError


def _is_the_failure(what: str, error: BaseException | None) -> bool:
    """Whether `error` is the one the failure `what` raises (the cause a refusal names)."""
    if what in ("flush", "duplicate"):
        return isinstance(error, IntegrityError)
    return isinstance(error, DBAPIError) and "no_such_column" in str(error)


def _outcome(plan: Plan) -> str:
    """How a block must end: "raise" (the planned error), "refuse" (TransactionError), "quiet"."""
    _, _, failure, then = plan
    if then == "raise":
        return "raise"
    if failure is not None and failure[0] in STATEMENT_FAILURES:
        # A Core statement failed and its error was caught: the block's work is incomplete.
        return "refuse"
    # Released; or, after a failed flush, SQLAlchemy already rolled back to the savepoint.
    return "quiet"


def _check_block_ending(plan: Plan, error: BaseException | None) -> None:
    outcome = _outcome(plan)
    if outcome == "raise":
        assert isinstance(error, PlannedError), f"{plan[0]} block: {error!r} for the planned error"
    elif outcome == "refuse":
        assert isinstance(error, TransactionError), f"{plan[0]} block did not refuse: {error!r}"
        assert "a statement failed" in str(error), str(error)
        assert plan[2] is not None
        assert _is_the_failure(plan[2][0], error.__cause__), repr(error.__cause__)
    else:
        assert error is None, f"{plan[0]} block raised {error!r}"


def _statement(what: str, route: str, key: int, name: str) -> Any:
    """An INSERT through Core: of a row (`what` "insert"), or one that fails."""
    if what == "bad sql":
        sql = "INSERT INTO users (id, no_such_column) VALUES (0, 'x')"
        return sql if route == "driver sql" else text(sql)
    if route == "driver sql":
        return f"INSERT INTO users (id, name) VALUES ({key}, '{name}')"
    return insert(User).values(id=key, name=name)


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


def _forget_a_stale_object(session: sqlalchemy.orm.Session, key: int) -> None:
    """Expunge an object of `key` that outlived its row, before a new row of that key is added.

    The identity map knows nothing of Core statements: a row INSERTed through the connection,
    loaded, and then rolled back leaves its object behind, and SQLAlchemy would warn about a
    new object with its key. The model says `key` has no row here (an INSERT of a row that is
    still there fails the run); an object marked deleted stays, for a row switch.
    """
    loaded = session.identity_map.get(inspect(User).identity_key_from_primary_key((key,)))
    if loaded is not None and loaded not in session.deleted:
        session.expunge(loaded)


# --- drivers: the same operations on a sync and an async unit of work -------------------------


class SyncDriver:
    """Runs the machine's operations on a `UnitOfWork` over `engine`."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.engine = engine
        self.factory = ormkit.create_session_factory(engine)
        self.uows: list[UnitOfWork] = []  # the open one, then the nested ones that joined it
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

    def open(self) -> None:
        uow = UnitOfWork(self.factory)
        uow.__enter__()
        self.uows = [uow]

    def exit_cleanly(self) -> None:
        uow, self.uows = self.uows[0], []
        uow.__exit__(None, None, None)

    def exit_with_exception(self) -> None:
        uow, self.uows = self.uows[0], []
        try:
            _raise_planned()  # to be handed to __exit__ as a `with` block does
        except PlannedError as error:
            swallowed = uow.__exit__(PlannedError, error, error.__traceback__)
        assert not swallowed, "the unit of work swallowed the block's exception"

    def step(self, op: tuple[Any, ...]) -> None:
        uow = self.uows[-1]
        session = uow.session
        kind = op[0]
        if kind == "add":
            _forget_a_stale_object(session, op[1])
            uow.add(User(id=op[1], name=op[2]))
        elif kind == "delete":
            row = session.get(User, op[1])
            assert row is not None, f"row {op[1]} is in the model but not in the session"
            if not _forget_a_new_row_instead(session, row):
                uow.delete(row)
        elif kind == "flush":
            uow.flush()
        elif kind == "on_commit":
            token = op[1]
            uow.on_commit(lambda: self.ran.append((token, self.committed())))
        elif kind == "read":
            rows = dict(session.execute(select(User.id, User.name)).all())
            assert rows == op[1], f"the session reads {rows}, the model says {op[1]}"
        elif kind == "insert":
            uow.flush()  # Core does not autoflush: the rows pending in the session go first
            self._execute(_statement("insert", op[3], op[1], op[2]), op[3])
        else:
            self._control(uow, op)

    def _control(self, uow: UnitOfWork, op: tuple[Any, ...]) -> None:
        """The steps that end or refuse work: failures, blocks, commits and rollbacks."""
        kind = op[0]
        if kind == "fail":
            self.fail(op[1])
        elif kind == "durable":
            with pytest.raises(TransactionError, match="durable=True"):  # noqa: SIM117
                with UnitOfWork(self.factory, durable=True):
                    raise AssertionError("a durable unit of work joined an open one")
        elif kind == "refused":
            with pytest.raises(TransactionError, match="joined an open one"):
                uow.commit() if op[1] == "commit" else uow.rollback()
        elif kind == "commit":
            uow.commit()
        elif kind == "rollback":
            uow.rollback()
        elif kind == "session commit":
            uow.session.commit()
        elif kind == "session rollback":
            uow.session.rollback()
        else:
            self.block(op[1])

    def _execute(self, statement: Any, route: str) -> None:
        connection = self.uows[-1].session.connection()
        if route == "driver sql":
            connection.exec_driver_sql(statement)
        else:
            connection.execute(statement)

    def fail(self, failure: Failure) -> None:
        """Send a statement that fails, catch its error and carry on."""
        what, route, key = failure
        uow = self.uows[-1]
        uow.flush()
        if what == "flush":
            # The row's own object may be in the identity map; SQLAlchemy would warn about a new
            # object with its key instead of letting the database refuse the INSERT.
            loaded = uow.session.identity_map.get(
                inspect(User).identity_key_from_primary_key((key,))
            )
            if loaded is not None:
                uow.session.expunge(loaded)
            uow.add(User(id=key, name="duplicate"))
        with pytest.raises(DBAPIError) as caught:
            if what == "flush":
                uow.flush()
            else:
                self._execute(_statement(what, route, key, "duplicate"), route)
        assert _is_the_failure(what, caught.value), repr(caught.value)

    def block(self, plan: Plan) -> None:
        kind, steps, failure, then = plan
        error: BaseException | None = None
        try:
            with self._entered(kind):
                for op in steps:
                    self.step(op)
                if failure is not None:
                    self.fail(failure)
                if then == "raise":
                    _raise_planned()
        except (PlannedError, TransactionError) as raised:
            error = raised
        _check_block_ending(plan, error)

    @contextmanager
    def _entered(self, kind: str) -> Iterator[None]:
        if kind == "savepoint":
            with self.uows[-1].savepoint():
                yield
            return
        with UnitOfWork(self.factory) as inner:
            assert inner.session is self.uows[0].session, "a nested unit of work did not join"
            self.uows.append(inner)
            try:
                yield
            finally:
                self.uows.pop()


class AsyncDriver:
    """The same operations on an `AsyncUnitOfWork`, on `loop`.

    The unit of work's block is a task of its own, as an `async with` in a request handler is:
    a nested unit of work joins only one entered in the same task. Each operation is handed to
    that task and run there to its end.
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.factory = ormkit.create_async_session_factory(engine)
        self.uows: list[AsyncUnitOfWork] = []
        self.ran: list[tuple[int, dict[int, str]]] = []
        self._inbox: asyncio.Queue[tuple[Any, asyncio.Future[None] | None]] | None = None
        self._block: asyncio.Task[None] | None = None

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

    def open(self) -> None:
        self._inbox = asyncio.Queue()
        entered: asyncio.Future[None] = self.loop.create_future()
        self._block = self.loop.create_task(self._hold(self._inbox, entered))
        self._run(entered)

    async def _hold(
        self,
        inbox: asyncio.Queue[tuple[Any, asyncio.Future[None] | None]],
        entered: asyncio.Future[None],
    ) -> None:
        """The unit of work's `async with` block: runs the operations it is handed."""
        try:
            async with AsyncUnitOfWork(self.factory) as uow:
                self.uows = [uow]
                entered.set_result(None)
                while True:
                    op, done = await inbox.get()
                    if op == "leave cleanly":
                        return
                    if op == "leave with an exception":
                        _raise_planned()
                    assert done is not None
                    try:
                        await self._step(op)
                    # Handed to the step's caller, pytest's failures (`DID NOT RAISE`) too.
                    except (Exception, pytest.fail.Exception) as error:  # noqa: BLE001
                        done.set_exception(error)
                    else:
                        done.set_result(None)
        except BaseException as error:
            if not entered.done():
                entered.set_exception(error)
            raise
        finally:
            self.uows = []

    def _leave(self, how: str) -> None:
        assert self._inbox is not None
        assert self._block is not None
        self._inbox.put_nowait((how, None))
        block, self._block = self._block, None
        self._run(block)

    def exit_cleanly(self) -> None:
        self._leave("leave cleanly")

    def exit_with_exception(self) -> None:
        try:
            self._leave("leave with an exception")
        except PlannedError:
            return
        raise AssertionError("the unit of work swallowed the block's exception")

    def step(self, op: tuple[Any, ...]) -> None:
        assert self._inbox is not None
        assert self._block is not None
        done: asyncio.Future[None] = self.loop.create_future()
        self._inbox.put_nowait((op, done))
        self._run(asyncio.wait([done, self._block], return_when=asyncio.FIRST_COMPLETED))
        if not done.done():  # the block ended instead (it cannot, but must not hang the run)
            self._block.result()
            raise AssertionError(f"the unit of work's block ended during {op}")
        done.result()

    async def _step(self, op: tuple[Any, ...]) -> None:
        uow = self.uows[-1]
        session = uow.session
        kind = op[0]
        if kind == "add":
            _forget_a_stale_object(session.sync_session, op[1])
            uow.add(User(id=op[1], name=op[2]))
        elif kind == "delete":
            row = await session.get(User, op[1])
            assert row is not None, f"row {op[1]} is in the model but not in the session"
            if not _forget_a_new_row_instead(session.sync_session, row):
                await uow.delete(row)
        elif kind == "flush":
            await uow.flush()
        elif kind == "on_commit":
            token = op[1]

            async def callback() -> None:
                self.ran.append((token, await self._committed()))

            uow.on_commit(callback)
        elif kind == "read":
            rows = dict((await session.execute(select(User.id, User.name))).all())
            assert rows == op[1], f"the session reads {rows}, the model says {op[1]}"
        elif kind == "insert":
            await uow.flush()
            await self._execute(_statement("insert", op[3], op[1], op[2]), op[3])
        else:
            await self._control(uow, op)

    async def _control(self, uow: AsyncUnitOfWork, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "fail":
            await self._fail(op[1])
        elif kind == "durable":
            with pytest.raises(TransactionError, match="durable=True"):
                async with AsyncUnitOfWork(self.factory, durable=True):
                    raise AssertionError("a durable unit of work joined an open one")
        elif kind == "refused":
            with pytest.raises(TransactionError, match="joined an open one"):
                await (uow.commit() if op[1] == "commit" else uow.rollback())
        elif kind == "commit":
            await uow.commit()
        elif kind == "rollback":
            await uow.rollback()
        elif kind == "session commit":
            await uow.session.commit()
        elif kind == "session rollback":
            await uow.session.rollback()
        else:
            await self._block_of(op[1])

    async def _execute(self, statement: Any, route: str) -> None:
        connection = await self.uows[-1].session.connection()
        if route == "driver sql":
            await connection.exec_driver_sql(statement)
        else:
            await connection.execute(statement)

    async def _fail(self, failure: Failure) -> None:
        what, route, key = failure
        uow = self.uows[-1]
        await uow.flush()
        if what == "flush":
            loaded = uow.session.identity_map.get(
                inspect(User).identity_key_from_primary_key((key,))
            )
            if loaded is not None:
                uow.session.expunge(loaded)
            uow.add(User(id=key, name="duplicate"))
        with pytest.raises(DBAPIError) as caught:
            if what == "flush":
                await uow.flush()
            else:
                await self._execute(_statement(what, route, key, "duplicate"), route)
        assert _is_the_failure(what, caught.value), repr(caught.value)

    async def _block_of(self, plan: Plan) -> None:
        kind, steps, failure, then = plan
        error: BaseException | None = None
        try:
            async with self._entered(kind):
                for op in steps:
                    await self._step(op)
                if failure is not None:
                    await self._fail(failure)
                if then == "raise":
                    _raise_planned()
        except (PlannedError, TransactionError) as raised:
            error = raised
        _check_block_ending(plan, error)

    @asynccontextmanager
    async def _entered(self, kind: str) -> AsyncIterator[None]:
        if kind == "savepoint":
            async with self.uows[-1].savepoint():
                yield
            return
        async with AsyncUnitOfWork(self.factory) as inner:
            assert inner.session is self.uows[0].session, "a nested unit of work did not join"
            self.uows.append(inner)
            try:
                yield
            finally:
                self.uows.pop()


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
        # The error swallowed outside any block ("flush", "duplicate", "bad sql"), or None:
        # until a rollback forgets it, the transaction must not commit.
        self.broken: str | None = None
        self.pending: list[int] = []  # callbacks whose work is not committed yet
        self.due: list[int] = []  # callbacks whose work a commit through the session made durable
        self.expected_ran: list[tuple[int, dict[int, str]]] = []
        self.counter = 0
        self.stats["examples"] += 1

    # --- the model --------------------------------------------------------------------------

    def _name(self) -> str:
        self.counter += 1
        return f"row {self.counter}"

    def _commit_point(self) -> None:
        """The callbacks whose work is durable run now, in order, and see the committed rows."""
        self.expected_ran += [(token, dict(self.committed)) for token in self.due]
        self.due = []

    def _committed_now(self) -> None:
        self.committed = dict(self.current)
        self.due += self.pending
        self.pending = []

    def _rolled_back(self) -> None:
        self.current = dict(self.committed)
        self.pending = []
        self.broken = None

    def _check_database(self) -> None:
        rows = self.driver.committed()
        assert rows == self.committed, f"committed {rows}, the model says {self.committed}"
        self.stats["rows checked"] += len(rows)
        self.stats["database checks"] += 1

    def _free(self) -> list[int]:
        return [key for key in IDS if key not in self.current]

    def _draw_step(self, data: st.DataObject, depth: int, *, joined: bool) -> tuple[Any, ...]:
        """A step inside a block, applied to the model as it is drawn."""
        kinds = ["flush", "on_commit", "read"]
        kinds += ["add", "insert"] if self._free() else []
        kinds += ["delete"] if self.current else []
        kinds += ["savepoint", "nested"] if depth < 2 else []
        kinds += ["durable"]
        kinds += ["refused"] if joined else []
        kind = data.draw(st.sampled_from(kinds), label="step")
        op: tuple[Any, ...] = (kind,)  # flush, durable
        if kind in ("add", "insert", "delete"):
            op = self._draw_row_step(data, kind)
        elif kind == "on_commit":
            self.counter += 1
            self.pending.append(self.counter)
            op = ("on_commit", self.counter)
        elif kind == "read":
            op = ("read", dict(self.current))
        elif kind in ("savepoint", "nested"):
            op = ("block", self._draw_block(data, kind, depth + 1, joined=joined))
        elif kind == "refused":
            what = data.draw(st.sampled_from(["commit", "rollback"]), label="refused")
            self.stats[f"nested {what} refused"] += 1
            op = ("refused", what)
        self.stats["durable refused"] += kind == "durable"
        return op

    def _draw_row_step(self, data: st.DataObject, kind: str) -> tuple[Any, ...]:
        if kind == "delete":
            key = data.draw(st.sampled_from(sorted(self.current)), label="delete")
            del self.current[key]
            return ("delete", key)
        key, name = data.draw(st.sampled_from(self._free()), label=kind), self._name()
        self.current[key] = name
        if kind == "add":
            return ("add", key, name)
        route = data.draw(st.sampled_from(ROUTES), label="route")
        self.stats["core inserts"] += 1
        self.stats[f"core statements through {route}"] += 1
        return ("insert", key, name, route)

    def _draw_failure(self, data: st.DataObject) -> Failure:
        kinds = ["bad sql", "flush", "duplicate"] if self.current else ["bad sql"]
        what = data.draw(st.sampled_from(kinds), label="failure")
        route, key = "", 0
        if what != "flush":
            route = data.draw(st.sampled_from(ROUTES), label="route")
            self.stats[f"core statements through {route}"] += 1
        if what != "bad sql":
            key = data.draw(st.sampled_from(sorted(self.current)), label="key")
        return what, route, key

    def _draw_block(self, data: st.DataObject, kind: str, depth: int, *, joined: bool) -> Plan:
        before, mark = dict(self.current), len(self.pending)
        inside = joined or kind == "nested"
        self.stats["blocks three deep"] += depth == 2
        count = data.draw(st.integers(0, 4), label="steps")
        steps = [self._draw_step(data, depth, joined=inside) for _ in range(count)]
        failure = self._draw_failure(data) if data.draw(st.booleans(), label="fails") else None
        then = data.draw(st.sampled_from(["exit", "raise"]), label="then")
        plan: Plan = (kind, steps, failure, then)
        if failure is not None or then == "raise":  # rolled back to the savepoint
            self.current = before
            del self.pending[mark:]
        ending = {"raise": "raised", "refuse": "refused", "quiet": "released"}[_outcome(plan)]
        if failure is not None and failure[0] == "flush" and then == "exit":
            ending = "rolled back by its failed flush"
        self.stats[f"{kind} {ending}"] += 1
        return plan

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

    @precondition(lambda self: self.open and not self.broken and len(self.current) < len(IDS))
    @rule(data=st.data())
    def insert_through_the_connection(self, data: st.DataObject) -> None:
        key, name = data.draw(st.sampled_from(self._free()), label="key"), self._name()
        route = data.draw(st.sampled_from(ROUTES), label="route")
        self.driver.step(("insert", key, name, route))
        self.current[key] = name
        self.stats["core inserts"] += 1
        self.stats[f"core statements through {route}"] += 1

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

    @precondition(lambda self: self.open)
    @rule()
    def on_commit(self) -> None:
        # Also in a transaction a swallowed error spoiled: that callback must never run.
        self.counter += 1
        self.driver.step(("on_commit", self.counter))
        self.pending.append(self.counter)

    @precondition(lambda self: self.open and not self.broken)
    @rule(data=st.data())
    def savepoint(self, data: st.DataObject) -> None:
        self.driver.step(("block", self._draw_block(data, "savepoint", depth=0, joined=False)))

    @precondition(lambda self: self.open and not self.broken)
    @rule(data=st.data())
    def nested_unit_of_work(self, data: st.DataObject) -> None:
        self.driver.step(("block", self._draw_block(data, "nested", depth=0, joined=False)))

    @precondition(lambda self: self.open)
    @rule()
    def durable_refuses_to_join(self) -> None:
        self.driver.step(("durable",))
        self.stats["durable refused"] += 1

    @precondition(lambda self: self.open and not self.broken)
    @rule(data=st.data())
    def swallow_a_failed_statement(self, data: st.DataObject) -> None:
        failure = self._draw_failure(data)
        self.driver.step(("fail", failure))
        self.broken = failure[0]
        self.stats[f"swallowed {failure[0]} errors"] += 1

    @precondition(lambda self: self.open and not self.broken)
    @rule()
    def read_through_the_session(self) -> None:
        self.driver.step(("read", dict(self.current)))
        self.stats["rows checked"] += len(self.current)

    def _refused(self, how: str, error: BaseException) -> None:
        """A commit refused over the swallowed error: named as its cause, nothing committed."""
        assert isinstance(error, TransactionError), f"{how}: {error!r}"
        assert self.broken is not None
        assert _is_the_failure(self.broken, error.__cause__), f"{how}: {error.__cause__!r}"

    @precondition(lambda self: self.open)
    @rule()
    def commit(self) -> None:
        if self.broken:
            what = "a flush" if self.broken == "flush" else "a statement"
            with pytest.raises(TransactionError, match=f"{what} failed") as caught:
                self.driver.step(("commit",))
            self._refused("uow.commit()", caught.value)
            self.stats["commit refused"] += 1
        else:
            self.driver.step(("commit",))
            self._committed_now()
            self._commit_point()
            self.stats["explicit commits"] += 1
        self._check_database()

    @precondition(lambda self: self.open)
    @rule()
    def commit_through_the_session(self) -> None:
        if self.broken == "flush":
            # SQLAlchemy's own refusal: the failed flush left the session's transaction inactive.
            with pytest.raises(PendingRollbackError):
                self.driver.step(("session commit",))
            self.stats["session commit refused"] += 1
        elif self.broken:
            with pytest.raises(TransactionError, match="cannot commit") as caught:
                self.driver.step(("session commit",))
            self._refused("uow.session.commit()", caught.value)
            self.stats["session commit refused"] += 1
        else:
            self.driver.step(("session commit",))
            self._committed_now()  # durable now; its callbacks run at the next commit point
            self.stats["session commits"] += 1
            self.stats["session commits with callbacks"] += bool(self.due)
        self._check_database()

    @precondition(lambda self: self.open)
    @rule(through=st.sampled_from(["uow", "session"]))
    def rollback(self, through: str) -> None:
        self.driver.step(("rollback",) if through == "uow" else ("session rollback",))
        self.stats["rollbacks of a spoiled transaction"] += bool(self.broken)
        self._rolled_back()
        self.stats[f"rollbacks through the {through}"] += 1

    @precondition(lambda self: self.open)
    @rule()
    def leave_cleanly(self) -> None:
        self.open = False
        if self.broken:
            with pytest.raises(TransactionError, match="cannot commit") as caught:
                self.driver.exit_cleanly()
            self._refused("leaving the block", caught.value)
            self._rolled_back()
            self.stats["left cleanly, refused to commit"] += 1
        else:
            self.driver.exit_cleanly()
            self._committed_now()
            self.stats["left cleanly, committed"] += 1
        self.stats["left with callbacks due from a session commit"] += bool(self.due)
        self._commit_point()
        self._check_database()

    @precondition(lambda self: self.open)
    @rule()
    def leave_with_an_exception(self) -> None:
        self.open = False
        self.driver.exit_with_exception()
        self._rolled_back()
        # Committed through the session before the exception: those callbacks still run.
        self.stats["raised with callbacks due from a session commit"] += bool(self.due)
        self._commit_point()
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
    """The runs reached every kind of step and ending they claim to model."""
    for what in (
        "left cleanly, committed",
        "left cleanly, refused to commit",
        "left with an exception",
        "left with callbacks due from a session commit",
        "raised with callbacks due from a session commit",
        "explicit commits",
        "commit refused",
        "session commits",
        "session commits with callbacks",
        "session commit refused",
        "rollbacks through the uow",
        "rollbacks through the session",
        "rollbacks of a spoiled transaction",
        "core inserts",
        *(f"core statements through {route}" for route in ROUTES),
        "blocks three deep",
        "durable refused",
        "nested commit refused",
        "nested rollback refused",
        *(
            f"{kind} {ending}"
            for kind in ("savepoint", "nested")
            for ending in ("released", "raised", "refused", "rolled back by its failed flush")
        ),
        "swallowed flush errors",
        "swallowed duplicate errors",
        "swallowed bad sql errors",
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
