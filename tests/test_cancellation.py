"""A cancelled task never commits part of a unit of work, never loses a callback, never leaks.

Three reported bugs first: a timeout landing on ROLLBACK TO SAVEPOINT (the row it was to undo
got committed), a task cancelled during an explicit `await uow.commit()` (the COMMIT landed,
its callbacks never ran), both made to happen exactly there from SQLAlchemy's events; and two
tasks sharing one unit of work's session (a raw error, a connection left checked out), swept
over head starts, with deterministic cases for the interleavings that went wrong until the
unit of work learnt to wait for another task's flush or statement before it commits or closes
(the journal counts them from SQLAlchemy's events).

Then a sweep: each scenario runs as a task that is cancelled at its k-th suspension, for every k
up to the number of suspensions an uncancelled run makes, so a cancellation lands at every await
point of every public coroutine of `AsyncUnitOfWork`. Two ways per point: "now" (the awaited
operation is cancelled as the task suspends, as a timeout striking mid-statement does) and
"late" (the operation completes, and the task resumes with CancelledError instead of its
result). Whatever the point, a brand-new connection must see one of the scenario's legal
outcomes, the callbacks of exactly the committed work must have run, once each and in order,
and no connection may stay checked out once the task is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import sqlalchemy
from sqlalchemy import event, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool.base import _ConnectionFairy
from sqlalchemy.util import greenlet_spawn

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork
from tests.fresh import fresh_committed_ids
from tests.models import Parent, User

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Generator

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

T = TypeVar("T")

needs_asyncio_timeout = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11"
)


class PlannedError(Exception):
    """Raised inside a block on purpose."""


class SerializationFailureError(Exception):
    """What a serialization failure looks like to `run`: SQLSTATE 40001, retried."""

    sqlstate = "40001"


def fail() -> None:
    raise PlannedError


def ended(task: asyncio.Task[Any]) -> str | BaseException:
    """How a done task ended: "finished", "cancelled", or the exception it raised."""
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    return "finished" if error is None else error


# --- 1a. a timeout landing on ROLLBACK TO SAVEPOINT -----------------------------------------


async def _savepoint_under_timeout(
    factory: async_sessionmaker[AsyncSession], timeouts: list[asyncio.Timeout]
) -> str:
    """Row 1 outside, row 2 in a savepoint that fails, row 3 after; how the savepoint ended.

    The timeout wraps only the savepoint, and its error is caught inside the unit of work, which
    then exits normally: the reported shape.
    """
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=1))
        await uow.flush()
        ending = "failed"
        try:
            async with asyncio.timeout(None) as timeout:
                timeouts.append(timeout)
                async with uow.savepoint():
                    uow.add(Parent(id=2))
                    await uow.flush()
                    fail()
        except TimeoutError:
            ending = "timed out"
        except PlannedError:
            pass
        uow.add(Parent(id=3))
    return ending


def _expire_on_rollback_to_savepoint(
    engine: AsyncEngine, timeouts: list[asyncio.Timeout], fired: list[str]
) -> None:
    def expire_now(_connection: object, name: str, _context: object) -> None:
        # Sent from inside the ROLLBACK TO SAVEPOINT: the timeout strikes while it is under way.
        fired.append(name)
        timeouts[-1].reschedule(asyncio.get_running_loop().time())

    event.listen(engine.sync_engine, "rollback_savepoint", expire_now)


@needs_asyncio_timeout
async def test_a_timeout_on_rollback_to_savepoint_never_commits_the_savepoint_row(
    async_engine,
) -> None:
    # Reported: with asyncio.timeout(~1.5 ms) the cancellation landed on ROLLBACK TO SAVEPOINT
    # and row 2, which it was to undo, was committed. Here the timeout strikes exactly there.
    factory = ormkit.create_async_session_factory(async_engine)
    timeouts: list[asyncio.Timeout] = []
    fired: list[str] = []
    _expire_on_rollback_to_savepoint(async_engine, timeouts, fired)
    task = asyncio.create_task(_savepoint_under_timeout(factory, timeouts))
    await asyncio.wait([task])
    outcome = ended(task)
    assert len(fired) == 1  # the timeout struck during the rollback to the savepoint
    assert async_engine.pool.checkedout() == 0
    committed = fresh_committed_ids(async_engine.url, "parent")
    assert 2 not in committed
    # Either the unit of work exited normally and committed the outer rows, or it raised and
    # nothing is committed.
    assert committed == ([1, 3] if outcome == "finished" else []), outcome


@needs_asyncio_timeout
async def test_a_timeout_on_rollback_to_savepoint_waits_for_it_then_the_outer_rows_commit(
    async_engine,
) -> None:
    # The shield's own claim: the ROLLBACK TO SAVEPOINT finishes, then the timeout is raised out
    # of the savepoint, so the unit of work is intact and commits what is outside it.
    factory = ormkit.create_async_session_factory(async_engine)
    timeouts: list[asyncio.Timeout] = []
    fired: list[str] = []
    _expire_on_rollback_to_savepoint(async_engine, timeouts, fired)
    ending = await _savepoint_under_timeout(factory, timeouts)
    assert (ending, len(fired)) == ("timed out", 1)
    assert fresh_committed_ids(async_engine.url, "parent") == [1, 3]


@needs_asyncio_timeout
async def test_a_tiny_timeouts_around_a_failing_savepoint_never_commit_its_row(
    async_engine,
) -> None:
    # The reported shape itself, with real timers, for a bounded time: delays spread from 0 to
    # 1.5 times what the savepoint block takes here. Each run has ids of its own: 10n+1
    # outside the savepoint, 10n+2 inside, 10n+3 after.
    factory = ormkit.create_async_session_factory(async_engine)
    expected: list[int] = []
    block = []
    for run in range(1, 6):
        started = time.perf_counter()
        assert await _numbered_savepoint_run(factory, run, None) == "failed"
        block.append(time.perf_counter() - started)
        expected += [10 * run + 1, 10 * run + 3]
    typical = sorted(block)[len(block) // 2]
    endings: dict[str, int] = {"timed out": 0, "failed": 0, "raised": 0}
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        run += 1
        delay = typical * (run % 31) / 20
        task = asyncio.create_task(_numbered_savepoint_run(factory, run, delay))
        await asyncio.wait([task])
        assert async_engine.pool.checkedout() == 0, f"run {run} left a connection checked out"
        if ended(task) == "finished":
            endings[task.result()] += 1
            expected += [10 * run + 1, 10 * run + 3]
        else:  # it raised (a timeout that struck a statement can break the transaction)
            assert isinstance(task.exception(), SQLAlchemyError | ormkit.OrmkitError)
            endings["raised"] += 1
    committed = fresh_committed_ids(async_engine.url, "parent")
    assert [ident for ident in committed if ident % 10 == 2] == []  # no savepoint row, ever
    assert committed == expected  # the outer rows of exactly the runs that exited normally
    assert endings["timed out"] > 0, endings  # some timeouts struck inside the savepoint
    assert endings["failed"] > 0, endings  # some delays let it fail by itself


async def _numbered_savepoint_run(
    factory: async_sessionmaker[AsyncSession], run: int, delay: float | None
) -> str:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(Parent(id=10 * run + 1))
        await uow.flush()
        ending = "failed"
        try:
            async with asyncio.timeout(delay), uow.savepoint():
                uow.add(Parent(id=10 * run + 2))
                await uow.flush()
                fail()
        except TimeoutError:
            ending = "timed out"
        except PlannedError:
            pass
        uow.add(Parent(id=10 * run + 3))
    return ending


# --- 1b. a task cancelled during an explicit `await uow.commit()` ---------------------------


async def test_b_cancelled_during_explicit_commit_the_commit_lands_and_its_callbacks_run(
    async_engine,
) -> None:
    # Reported: the COMMIT landed but the callbacks registered before it never ran. Here the
    # task is cancelled from the connection's `commit` event, as the COMMIT is being sent.
    factory = ormkit.create_async_session_factory(async_engine)
    ran: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def notify() -> None:
        ran.append("async")
        await asyncio.sleep(0)
        ran.append("async, finished")

    async def work() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            uow.on_commit(lambda: ran.append("sync"))
            uow.on_commit(notify)
            await uow.commit()
            uow.add(Parent(id=2))
            ran.append("went on after the cancellation")

    event.listen(async_engine.sync_engine, "commit", lambda _c: tasks[0].cancel(), once=True)
    tasks.append(asyncio.create_task(work()))
    await asyncio.wait(tasks)
    assert ended(tasks[0]) == "cancelled"
    assert async_engine.pool.checkedout() == 0
    committed = fresh_committed_ids(async_engine.url, "parent")
    if committed:
        assert ran == ["sync", "async", "async, finished"]  # once each, in order
    assert committed == [1]  # shielded: the COMMIT was not abandoned half-way


# --- 1c. two tasks using one unit of work's session ------------------------------------------

HEAD_STARTS = range(16)  # how many loop turns the second task starts after the first
REPEATS = 6  # each head start this often: which interleaving a head start gives varies a little
ROWS_PER_TASK = 10


@dataclass
class SharedRun:
    """One unit of work whose session two tasks use at once."""

    base: int
    added: list[int] = field(default_factory=list)  # ids whose uow.add() returned
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    error: Exception | None = None  # what the `async with` raised
    caught: SQLAlchemyError | None = None  # what the block caught (the catching variant)
    checked_out: int = -1  # right after the `async with` exited
    checked_out_later: int = -1  # once both tasks were done too


async def _write(uow: AsyncUnitOfWork, run: SharedRun, first_id: int, head_start: int) -> None:
    for _ in range(head_start):
        await asyncio.sleep(0)
    for n in range(ROWS_PER_TASK):
        uow.add(User(id=first_id + n, name="shared"))
        run.added.append(first_id + n)
        if n % 2:
            await uow.flush()
        else:
            await uow.session.execute(select(User.id).where(User.id == first_id + n))


async def _shared_session_run(
    engine: AsyncEngine, base: int, head_start: int, *, catch: bool
) -> SharedRun:
    factory = ormkit.create_async_session_factory(engine)
    run = SharedRun(base)
    try:
        async with AsyncUnitOfWork(factory) as uow:
            run.tasks += [
                asyncio.create_task(_write(uow, run, base, 0)),
                asyncio.create_task(_write(uow, run, base + 100, head_start)),
            ]
            try:
                await asyncio.gather(*run.tasks)
            except SQLAlchemyError as error:
                if not catch:
                    raise
                run.caught = error
    except (SQLAlchemyError, ormkit.OrmkitError) as error:
        run.error = error
    finally:
        run.checked_out = engine.pool.checkedout()
        # Every task's exception is retrieved, the one gather did not raise too.
        await asyncio.gather(*run.tasks, return_exceptions=True)
        run.checked_out_later = engine.pool.checkedout()
    return run


async def _shared_session_problems(engine: AsyncEngine, *, catch: bool) -> tuple[list[str], int]:
    """Run every head start REPEATS times; what went wrong, and how many runs met an error."""
    problems: list[str] = []
    met_an_error = 0
    for repeat in range(REPEATS):
        for head_start in HEAD_STARTS:
            base = 1000 * (len(HEAD_STARTS) * repeat + head_start + 1)
            run = await _shared_session_run(engine, base, head_start, catch=catch)
            met_an_error += (run.caught or run.error) is not None
            where = f"head start {head_start} (repeat {repeat})"
            problems += [f"{where}: {problem}" for problem in _shared_run_problems(engine, run)]
            if run.checked_out_later:
                await reclaim_leaked_connections(engine)
    return problems, met_an_error


def _shared_run_problems(engine: AsyncEngine, run: SharedRun) -> list[str]:
    problems: list[str] = []
    committed = [i for i in fresh_committed_ids(engine.url, "users") if 0 <= i - run.base < 1000]
    if run.caught is None and isinstance(run.error, ormkit.OrmkitError):
        problems.append(f"the caller got {run.error!r:.80}, not SQLAlchemy's error")
    if run.caught is None and run.error is not None:
        legal = [[]]  # SQLAlchemy's refusal reached the caller: nothing may be committed
    elif run.caught is None:
        legal = [sorted(run.added)]  # no refusal at all: everything
    else:
        legal = [[], sorted(run.added)]  # caught inside: all or nothing
    if committed not in legal:
        problems.append(
            f"caught {run.caught!r:.50}, raised {run.error!r:.50}; committed {committed} of "
            f"the {len(run.added)} rows added"
        )
    if run.checked_out or run.checked_out_later:
        problems.append(
            f"checked out: {run.checked_out} right after the block, {run.checked_out_later} "
            "once both tasks were done"
        )
    return problems


async def reclaim_leaked_connections(engine: AsyncEngine) -> None:
    """Invalidate the connections of `engine` still checked out, returning them to its pool.

    Test hygiene only, once a leak was recorded: a known leak must not fail the tests that
    follow too (the engine fixture checks the pool at teardown).
    """
    leaked = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, _ConnectionFairy)
        and obj._pool is engine.pool
        and obj._connection_record is not None
        and obj.dbapi_connection is not None
    ]
    for fairy in leaked:
        await greenlet_spawn(fairy.invalidate)


def _ormkit_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ormkit" and r.levelno >= 40]


ADD_DURING_FLUSH = "ignore:Usage of the 'Session.add\\(\\)' operation:sqlalchemy.exc.SAWarning"


@pytest.mark.filterwarnings(ADD_DURING_FLUSH)  # one task adds while the other flushes
async def test_c_two_tasks_on_one_session_the_error_reaches_the_caller_nothing_leaks(
    async_engine, caplog
) -> None:
    # Reported: a raw IllegalStateChangeError, "closing the session after an error failed as
    # well" logged, and a connection still checked out after the `async with` exited.
    caplog.set_level(logging.WARNING, logger="ormkit")
    problems, met_an_error = await _shared_session_problems(async_engine, catch=False)
    assert problems == [], f"{len(problems)} problems:\n" + "\n".join(problems[:12])
    assert _ormkit_errors(caplog) == []
    assert met_an_error > 0  # SQLAlchemy refused the concurrent use in some runs


@pytest.mark.filterwarnings(ADD_DURING_FLUSH)
async def test_c_two_tasks_on_one_session_error_caught_inside_all_or_nothing(
    async_engine, caplog
) -> None:
    # The caller catches SQLAlchemy's refusal inside the block and exits normally: the unit of
    # work may refuse to commit (TransactionError) or commit, but never a part of the rows.
    caplog.set_level(logging.WARNING, logger="ormkit")
    problems, met_an_error = await _shared_session_problems(async_engine, catch=True)
    assert problems == [], f"{len(problems)} problems:\n" + "\n".join(problems[:12])
    assert _ormkit_errors(caplog) == []
    assert met_an_error > 0


SLOW_STATEMENT = {  # a few tenths of a second on the server, whichever backend
    "postgresql": "SELECT pg_sleep(0.3)",
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
    "SELECT count(*) FROM c",
}


@pytest.mark.parametrize("ending", ["error", "clean exit"])
async def test_c_the_block_ends_while_another_task_runs_a_statement_nothing_leaks(
    async_engine, caplog, ending: str
) -> None:
    # The deterministic core of the shared-session case: the unit of work ends while a task it
    # started still has a statement under way on its connection.
    caplog.set_level(logging.WARNING, logger="ormkit")
    factory = ormkit.create_async_session_factory(async_engine)
    slow = text(SLOW_STATEMENT[async_engine.dialect.name])
    others: list[asyncio.Task[object]] = []
    sent = asyncio.Event()
    event.listen(
        async_engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _cursor, statement, *_: statement == slow.text and sent.set(),
    )

    async def block() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            uow.add(Parent(id=1))
            await uow.flush()
            others.append(asyncio.create_task(uow.session.execute(slow)))
            await sent.wait()
            await asyncio.sleep(0.02)
            assert not others[0].done()  # the other task's statement is under way
            if ending == "error":
                fail()

    task = asyncio.create_task(block())
    await asyncio.wait([task])
    checked_out = async_engine.pool.checkedout()
    await asyncio.wait(others)
    ended(others[0])  # its exception, if any, is retrieved
    checked_out_later = async_engine.pool.checkedout()
    if checked_out_later:
        await reclaim_leaked_connections(async_engine)
    outcome = ended(task)
    committed = fresh_committed_ids(async_engine.url, "parent")
    assert (checked_out, checked_out_later) == (0, 0)
    assert _ormkit_errors(caplog) == []
    if ending == "error":
        assert isinstance(outcome, PlannedError)
    assert committed == ([1] if outcome == "finished" else [])


@pytest.mark.parametrize("ending", ["error", "clean exit", "one more row, clean exit"])
@pytest.mark.filterwarnings(ADD_DURING_FLUSH)
async def test_c_the_block_ends_while_another_task_flushes_all_or_nothing(
    async_engine, caplog, ending: str
) -> None:
    # Deterministic too: the block ends right after the other task's flush has its connection
    # in a transaction (the session's after_begin event), with its INSERT still to come.
    # With "one more row", the block adds a row while the other task flushes, then exits.
    caplog.set_level(logging.WARNING, logger="ormkit")
    factory = ormkit.create_async_session_factory(async_engine)
    began = asyncio.Event()
    others: list[asyncio.Task[None]] = []
    ran: list[str] = []

    async def block() -> None:
        async with AsyncUnitOfWork(factory) as uow:
            event.listen(uow.session.sync_session, "after_begin", lambda *_: began.set())
            uow.on_commit(lambda: ran.append("on_commit"))
            uow.add(Parent(id=1))
            others.append(asyncio.create_task(uow.flush()))
            await began.wait()
            assert not others[0].done()  # the other task is flushing
            if ending == "error":
                fail()
            if ending.startswith("one more row"):
                uow.add(Parent(id=2))

    task = asyncio.create_task(block())
    await asyncio.wait([task])
    checked_out = async_engine.pool.checkedout()
    await asyncio.wait(others)
    ended(others[0])  # its exception, if any, is retrieved
    checked_out_later = async_engine.pool.checkedout()
    if checked_out_later:
        await reclaim_leaked_connections(async_engine)
    outcome = ended(task)
    committed = fresh_committed_ids(async_engine.url, "parent")
    everything = [1, 2] if ending.startswith("one more row") else [1]
    expected = (everything, ["on_commit"]) if outcome == "finished" else ([], [])
    assert (committed, ran) == expected, outcome
    assert (checked_out, checked_out_later) == (0, 0)
    assert _ormkit_errors(caplog) == []
    if ending == "error":
        assert isinstance(outcome, PlannedError)


# --- 2. the sweep: a cancellation at every suspension point ---------------------------------


@dataclass
class Striker:
    """Cancels a scenario's task, or, while it is inside a timeout zone, expires that timeout.

    Expiring is what `asyncio.timeout` does when its deadline passes (its timer calls
    `_on_timeout`, which cancels the task and marks the timeout as expiring).
    """

    rec: Recorder
    task: asyncio.Task[Any] | None = None
    struck: str | None = None  # "cancelled" the task, or "timed out" a zone

    def strike(self) -> None:
        assert self.task is not None
        zone = self.rec.timeout
        if zone is not None and not zone.expired():
            zone._on_timeout()
            self.struck = "timed out"
        elif self.task.cancel():
            self.struck = "cancelled"


class CancelAtSuspension(Coroutine[Any, Any, T]):
    """Runs `coro`, striking the task that runs it at its `at`-th suspension (from 0).

    `late=False`: the strike comes as `coro` suspends, so the future it waits on is cancelled
    at once. `late=True`: it comes when that future completes, before `coro` resumes, which
    then gets CancelledError instead of the result. `at=-1` never strikes and counts the
    suspensions of an uncancelled run.
    """

    def __init__(
        self, coro: Coroutine[Any, Any, T], striker: Striker, at: int, *, late: bool
    ) -> None:
        self._coro, self._striker, self.at, self.late = coro, striker, at, late
        self.suspensions = 0

    def send(self, value: Any) -> Any:
        return self._suspending(self._coro.send(value))

    def throw(self, *error: Any) -> Any:
        return self._suspending(self._coro.throw(*error))

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    def _suspending(self, awaited: Any) -> Any:
        if self.suspensions == self.at:
            if self.late and isinstance(awaited, asyncio.Future):
                awaited.add_done_callback(lambda _future: self._striker.strike())
            else:
                self._striker.strike()
        self.suspensions += 1
        return awaited


@dataclass
class Recorder:
    """A scenario run's rows (ids of its own), which callbacks ran, its open timeout zone."""

    base: int
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    timeout: asyncio.Timeout | None = None

    def row(self, n: int) -> Parent:
        return Parent(id=self.base + n)

    def sync(self, name: str) -> Callable[[], None]:
        def callback() -> None:
            self.started.append(name)
            self.finished.append(name)

        return callback

    def async_(self, name: str) -> Callable[[], Awaitable[None]]:
        async def callback() -> None:
            self.started.append(name)
            await asyncio.sleep(0)  # a suspension point inside the callback
            self.finished.append(name)

        return callback

    @contextlib.asynccontextmanager
    async def zone(self) -> AsyncIterator[None]:
        """A part of the work under a timeout; its TimeoutError is caught, and the work goes on.

        The deadline never passes by itself: the sweep expires it when it strikes inside.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None) as timeout:
                self.timeout = timeout
                try:
                    yield
                finally:
                    self.timeout = None


@dataclass(frozen=True)
class Outcome:
    """What may be committed, and then the callbacks that must have run, in order."""

    rows: frozenset[int]
    callbacks: tuple[str, ...]


@dataclass(frozen=True)
class Scenario:
    """A body, its legal outcomes (the last: the uncancelled one), and rows never committed.

    `after_timeout`: the outcomes (indexes) legal for a run that finished normally after one of
    its timeout zones expired.
    """

    body: Callable[[async_sessionmaker[AsyncSession], Recorder], Awaitable[object]]
    outcomes: tuple[Outcome, ...]
    never: frozenset[int] = frozenset()
    after_timeout: tuple[int, ...] = ()


def prefixes(*transactions: tuple[set[int], tuple[str, ...]]) -> tuple[Outcome, ...]:
    """The outcomes of transactions committed one after another: none, the first, ..., all."""
    outcomes = [Outcome(frozenset(), ())]
    for rows, callbacks in transactions:
        last = outcomes[-1]
        outcomes.append(Outcome(last.rows | rows, last.callbacks + callbacks))
    return tuple(outcomes)


async def clean_exit(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:  # entering does no I/O: no await point
        uow.add(rec.row(1))
        uow.on_commit(rec.sync("c1"))
        await uow.flush()
        uow.add(rec.row(2))
        uow.on_commit(rec.async_("c2"))
        uow.on_commit(rec.sync("c3"))


async def explicit_commit(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(rec.row(1))
        uow.on_commit(rec.async_("c1"))
        uow.on_commit(rec.sync("c2"))
        await uow.commit()
        uow.add(rec.row(2))
        uow.on_commit(rec.sync("c3"))
        await uow.flush()


async def savepoints(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(rec.row(1))
        async with uow.savepoint():  # released
            uow.add(rec.row(2))
            uow.on_commit(rec.sync("c2"))
            await uow.flush()
        with contextlib.suppress(PlannedError):
            async with uow.savepoint():  # rolled back
                uow.add(rec.row(3))
                uow.on_commit(rec.sync("c3"))
                await uow.flush()
                fail()
        uow.add(rec.row(4))
        uow.on_commit(rec.async_("c4"))


async def rollback_then_more(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(rec.row(1))
        uow.on_commit(rec.sync("c1"))
        await uow.flush()
        await uow.rollback()
        uow.add(rec.row(2))
        uow.on_commit(rec.sync("c2"))


async def nested(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as outer:
        outer.add(rec.row(1))
        async with AsyncUnitOfWork(factory) as inner:  # joins: its enter awaits begin_nested()
            inner.add(rec.row(2))
            inner.on_commit(rec.async_("c2"))
            await inner.flush()
        with contextlib.suppress(PlannedError):
            async with AsyncUnitOfWork(factory) as inner:
                inner.add(rec.row(3))
                inner.on_commit(rec.sync("c3"))
                await inner.flush()
                fail()
        outer.on_commit(rec.sync("c4"))


def _retried_work(rec: Recorder) -> Callable[[AsyncUnitOfWork], Awaitable[int]]:
    attempts: list[int] = []

    async def work(uow: AsyncUnitOfWork) -> int:
        attempts.append(len(attempts) + 1)
        uow.add(rec.row(attempts[-1]))
        uow.on_commit(rec.sync(f"attempt {attempts[-1]}"))
        await uow.flush()
        if attempts[-1] == 1:
            raise SerializationFailureError  # retried, after a backoff of up to 2 ms
        return attempts[-1]

    return work


async def run_with_retry(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> int:
    return await AsyncUnitOfWork.run(factory, _retried_work(rec), attempts=2, backoff=0.002)


# The same, with a part of the work under a timeout that is caught inside the unit of work,
# which then goes on: what the first reported bug needed.


async def timed_savepoint(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(rec.row(1))
        uow.on_commit(rec.sync("c1"))
        await uow.flush()
        with contextlib.suppress(PlannedError):
            async with rec.zone(), uow.savepoint():
                uow.add(rec.row(2))
                uow.on_commit(rec.sync("c2"))
                await uow.flush()
                fail()
        uow.add(rec.row(3))
        uow.on_commit(rec.sync("c3"))


async def timed_commit(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(rec.row(1))
        uow.on_commit(rec.async_("c1"))
        uow.on_commit(rec.sync("c2"))
        async with rec.zone():
            await uow.commit()
        uow.add(rec.row(2))
        uow.on_commit(rec.sync("c3"))


async def timed_rollback(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as uow:
        uow.add(rec.row(1))
        uow.on_commit(rec.sync("c1"))
        await uow.flush()
        async with rec.zone():
            await uow.rollback()
        uow.add(rec.row(2))
        uow.on_commit(rec.sync("c2"))


async def timed_nested(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with AsyncUnitOfWork(factory) as outer:
        outer.add(rec.row(1))
        outer.on_commit(rec.sync("c1"))
        await outer.flush()
        async with rec.zone(), AsyncUnitOfWork(factory) as inner:
            inner.add(rec.row(2))
            inner.on_commit(rec.sync("c2"))
            await inner.flush()
        outer.add(rec.row(3))
        outer.on_commit(rec.sync("c3"))


async def timed_run(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    async with rec.zone():
        await AsyncUnitOfWork.run(factory, _retried_work(rec), attempts=2, backoff=0.002)


class _Parents(AsyncRepository[Parent, int]):
    pass


async def upsert_and_pages(factory: async_sessionmaker[AsyncSession], rec: Recorder) -> None:
    # The repository's statements of their own: one INSERT ... ON CONFLICT per call (a chunk)
    # and one SELECT per page, each an await point like a flush.
    async with AsyncUnitOfWork(factory) as uow:
        parents = uow.repository(_Parents)
        await parents.upsert_many([{"id": rec.base + 1}, {"id": rec.base + 2}])
        uow.on_commit(rec.sync("c1"))
        first = await parents.page(Parent.id > rec.base, order_by=Parent.id, limit=1)
        await parents.page(Parent.id > rec.base, order_by=Parent.id, limit=1, after=first.next)
        await parents.upsert({"id": rec.base + 1, "name": "upserted twice"})
        uow.on_commit(rec.async_("c2"))


NESTED_RELEASED = Outcome(frozenset({1, 2, 3}), ("c1", "c2", "c3"))
SCENARIOS = {
    "clean exit": Scenario(clean_exit, prefixes(({1, 2}, ("c1", "c2", "c3")))),
    "upsert and pages": Scenario(upsert_and_pages, prefixes(({1, 2}, ("c1", "c2")))),
    "explicit commit": Scenario(explicit_commit, prefixes(({1}, ("c1", "c2")), ({2}, ("c3",)))),
    "savepoints": Scenario(savepoints, prefixes(({1, 2, 4}, ("c2", "c4"))), frozenset({3})),
    "rollback": Scenario(rollback_then_more, prefixes(({2}, ("c2",))), frozenset({1})),
    "nested": Scenario(nested, prefixes(({1, 2}, ("c2", "c4"))), frozenset({3})),
    "run with retry": Scenario(run_with_retry, prefixes(({2}, ("attempt 2",))), frozenset({1})),
    "timeout caught: savepoint": Scenario(
        timed_savepoint, prefixes(({1, 3}, ("c1", "c3"))), frozenset({2}), after_timeout=(1,)
    ),
    "timeout caught: explicit commit": Scenario(
        timed_commit, prefixes(({1}, ("c1", "c2")), ({2}, ("c3",))), after_timeout=(2,)
    ),
    "timeout caught: rollback": Scenario(
        timed_rollback, prefixes(({2}, ("c2",))), frozenset({1}), after_timeout=(1,)
    ),
    "timeout caught: nested": Scenario(
        timed_nested,
        (Outcome(frozenset(), ()), Outcome(frozenset({1, 3}), ("c1", "c3")), NESTED_RELEASED),
        after_timeout=(1, 2),
    ),
    "timeout caught: run": Scenario(
        timed_run, prefixes(({2}, ("attempt 2",))), frozenset({1}), after_timeout=(0, 1)
    ),
}
MAX_POINTS = 200  # suspensions swept per scenario and backend (an uncancelled run needs fewer)


@dataclass
class Sweep:
    engine: AsyncEngine
    scenario: Scenario
    runs: int = 0

    async def at_suspension(self, at: int, *, late: bool) -> tuple[int, list[str]]:
        """One run struck at its suspension `at`; how often it suspended, what it got wrong."""
        rec, striker = self._new_run()
        factory = ormkit.create_async_session_factory(self.engine)
        wrapper = CancelAtSuspension(self.scenario.body(factory, rec), striker, at, late=late)
        striker.task = asyncio.create_task(wrapper)
        await asyncio.wait([striker.task])
        return wrapper.suspensions, self._problems(rec, striker)

    async def after_iterations(self, iterations: int | None) -> tuple[int, list[str]]:
        """One run struck after `iterations` turns of the event loop (None: never)."""
        rec, striker = self._new_run()
        factory = ormkit.create_async_session_factory(self.engine)
        striker.task = task = asyncio.create_task(self.scenario.body(factory, rec))
        turns = 0
        while not task.done():
            if turns == iterations:
                striker.strike()
            await asyncio.sleep(0)
            turns += 1
        return turns, self._problems(rec, striker)

    def _new_run(self) -> tuple[Recorder, Striker]:
        self.runs += 1
        rec = Recorder(base=100 * self.runs)
        return rec, Striker(rec)

    def _problems(self, rec: Recorder, striker: Striker) -> list[str]:
        assert striker.task is not None
        leaked = self.engine.pool.checkedout()
        problems = [f"{leaked} connection(s) checked out once the task was done"] if leaked else []
        committed = {
            ident - rec.base
            for ident in fresh_committed_ids(self.engine.url, "parent")
            if rec.base < ident < rec.base + 100
        }
        return problems + judge(self.scenario, rec, ended(striker.task), striker.struck, committed)


def judge(
    scenario: Scenario,
    rec: Recorder,
    outcome: str | BaseException,
    struck: str | None,
    committed: set[int],
) -> list[str]:
    """What is wrong with a run, per the scenario's legal outcomes."""
    matching = [o for o in scenario.outcomes if o.rows == committed]
    if committed & scenario.never or not matching:
        return [f"ended {outcome!r:.100}; committed {sorted(committed)}: not a legal outcome"]
    done = matching[0]
    problems = _ending_problems(scenario, outcome, struck, done)
    if rec.started != list(done.callbacks):
        problems.append(f"callbacks started {rec.started}; the committed work's: {done.callbacks}")
    unfinished = [name for name in rec.started if name not in rec.finished]
    if len(unfinished) > (struck is not None):  # only the one the strike landed in
        problems.append(f"callbacks cut short: {unfinished}")
    return problems


def _ending_problems(
    scenario: Scenario, outcome: str | BaseException, struck: str | None, done: Outcome
) -> list[str]:
    index = scenario.outcomes.index(done)
    if struck is None:  # never struck: the whole work, committed
        ok = outcome == "finished" and index == len(scenario.outcomes) - 1
    elif struck == "cancelled":  # the task stops with CancelledError, whatever was committed
        ok = outcome == "cancelled"
    elif outcome == "finished":  # a zone timed out, was caught, and the work went on
        ok = index in scenario.after_timeout
    else:  # or the unit of work could not go on after the timeout, and raised: nothing kept
        ok = isinstance(outcome, SQLAlchemyError | ormkit.OrmkitError) and not done.rows
    return (
        [] if ok else [f"struck: {struck}; ended {outcome!r:.100}; committed {sorted(done.rows)}"]
    )


SCENARIO_NAMES = [
    pytest.param(name, marks=[needs_asyncio_timeout] if name.startswith("timeout") else [])
    for name in SCENARIOS
]


def _known_gap(request: pytest.FixtureRequest, engine: Any, name: str) -> None:
    """A known gap: on SQLAlchemy 2.0 with aiosqlite, a cancellation inside the scenario's
    RETURNING statements leaves a statement in progress on the pooled connection, and a later
    COMMIT on it fails ("cannot commit transaction - SQL statements in progress"); nothing is
    committed that should not be. Most likely SQLAlchemy 2.0's aiosqlite cursor adapter, which
    closes its cursor only after fetching (read in its source, not proven); 2.1 passes. Not
    strict: it fails on Python 3.11 every time and passed once on 3.10, whose event loop
    suspends elsewhere, and the timed sweep's strikes can miss the window."""
    if (
        name == "upsert and pages"
        and engine.dialect.driver == "aiosqlite"
        and sqlalchemy.__version__.startswith("2.0.")
    ):
        request.applymarker(pytest.mark.xfail(strict=False, reason=_known_gap.__doc__ or ""))


@pytest.mark.parametrize("name", SCENARIO_NAMES)
async def test_sweep_a_cancellation_at_every_await_point(
    async_engine, name: str, request: pytest.FixtureRequest
) -> None:
    _known_gap(request, async_engine, name)
    sweep = Sweep(async_engine, SCENARIOS[name])
    points, problems = await sweep.at_suspension(-1, late=False)
    assert problems == [], f"the uncancelled run is wrong: {problems}"
    assert 0 < points <= MAX_POINTS
    failures: list[str] = []
    for at in range(points + 2):  # two more: a run may suspend more often than the first did
        for late in (False, True):
            suspensions, problems = await sweep.at_suspension(at, late=late)
            where = f"{'late' if late else 'now'} at {at}/{suspensions}"
            failures += [f"{where}: {problem}" for problem in problems]
    assert failures == [], f"{len(failures)} problems in {sweep.runs} runs:\n" + "\n".join(
        failures[:20]
    )


ITERATION_RUNS = 24  # runs per scenario and backend, spread over an uncancelled run's turns


@pytest.mark.parametrize("name", SCENARIO_NAMES)
async def test_sweep_a_cancellation_after_every_few_event_loop_turns(
    async_engine, name: str, request: pytest.FixtureRequest
) -> None:
    _known_gap(request, async_engine, name)
    # The same judge, with strikes timed as a timer's would be: after k turns of the event
    # loop, wherever the task is then (suspended in a driver, or woken and about to resume).
    # An uncancelled run takes from tens to hundreds of turns, so k is spread over them.
    sweep = Sweep(async_engine, SCENARIOS[name])
    await sweep.after_iterations(None)  # the pool holds a connection from now on
    turns, problems = await sweep.after_iterations(None)
    assert problems == [], f"the uncancelled run is wrong: {problems}"
    stride = max(1, turns // ITERATION_RUNS)
    failures: list[str] = []
    for iterations in range(0, turns + stride, stride):
        _turns, problems = await sweep.after_iterations(iterations)
        failures += [f"after {iterations}/{turns} turns: {problem}" for problem in problems]
    assert failures == [], f"{len(failures)} problems in {sweep.runs} runs:\n" + "\n".join(
        failures[:20]
    )
