"""What happened in a unit of work's session, as SQLAlchemy's own events tell it.

A unit of work has to know whether its work was committed, rolled back, or spoiled by a
statement whose error was caught, whichever way the code reached the session: ormkit's methods,
`uow.session.commit()`, a repository, Core statements on `uow.session.connection()`. Deciding
that from which ormkit method was called would miss every other route, so a `Journal` is kept
per session from SQLAlchemy's events instead:

- `after_commit` (of the outermost transaction): the work so far is durable; the `on_commit`
  callbacks registered until then become due.
- `after_soft_rollback`: the callbacks and caught errors of what was rolled back (the whole
  transaction, or one savepoint) are forgotten.
- `before_commit`: a commit is refused over a caught statement error (SQLite would commit half
  the work; PostgreSQL silently turns such a COMMIT into a ROLLBACK), from inside a nested block
  (it would commit the block's work before the block decides), and while another task has a
  flush or a statement under way in the session (a partial commit).
- the dialect's `handle_error`, which sees every failed statement of every execution API (ORM,
  `Connection.execute`, `exec_driver_sql`), without touching any result: the error is recorded
  against the savepoint it happened in. `after_begin` says which session holds a connection;
  `before_cursor_execute` and `after_cursor_execute` count the statements under way on it.

Nothing here does I/O or changes what SQLAlchemy returns.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine, event

from ormkit.errors import TransactionError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection
    from sqlalchemy.engine.interfaces import Dialect, ExceptionContext
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = [
    "Callback",
    "Journal",
    "attach",
    "busy",
    "detach",
    "flushing",
    "listen_on",
    "note_refusal",
    "within",
]

_KEY = "_ormkit_journal"


@dataclass(frozen=True)
class Callback:
    """An `on_commit` callback, and the savepoint that was open when it was registered."""

    function: Callable[[], object]
    robust: bool
    savepoint: SessionTransaction | None


@dataclass(eq=False)
class Journal:
    """The commits, rollbacks, caught errors and callbacks of one unit of work's session."""

    # Errors of failed statements not rolled back yet, with the savepoint each happened in.
    errors: list[tuple[BaseException, SessionTransaction | None]] = field(
        default_factory=list[tuple[BaseException, "SessionTransaction | None"]]
    )
    last_error: BaseException | None = None  # kept after rollbacks: the cause of a failed flush
    pending: list[Callback] = field(default_factory=list[Callback])  # waiting for a commit
    due: list[Callback] = field(default_factory=list[Callback])  # committed, not run yet
    commits: int = 0
    # Set when the transaction can no longer be committed whole: a rollback to a savepoint did
    # not complete (what it should have undone may still be in the transaction), or the whole
    # transaction was rolled back from inside a nested block (the work before it is gone).
    broken: BaseException | None = None
    broken_reason: str = ""
    # The savepoints of the nested blocks ormkit has open (`uow.savepoint()`, a joined unit of
    # work), innermost last, and the one ormkit itself is releasing right now.
    blocks: list[SessionTransaction] = field(default_factory=list["SessionTransaction"])
    releasing: SessionTransaction | None = None
    # Statements under way on the session's connections: more than none while this task is at
    # a commit or a close means another task is using the session.
    running: int = 0
    count_statements: bool = False

    def add_callback(
        self, function: Callable[[], object], *, robust: bool, session: Session
    ) -> None:
        self.pending.append(Callback(function, robust, session.get_nested_transaction()))

    def take_due(self) -> list[Callback]:
        due, self.due = self.due, []
        return due

    def first_error_within(self, savepoint: SessionTransaction | None) -> BaseException | None:
        """The first recorded error that happened inside `savepoint` (None: anywhere)."""
        for error, where in self.errors:
            if savepoint is None or within(where, savepoint):
                return error
        return None

    def committed(self) -> None:
        """The outermost transaction committed: what was pending is due."""
        self.commits += 1
        self.due += self.pending
        self.pending = []

    def rolled_back(self, boundary: SessionTransaction) -> None:
        """`boundary` (the whole transaction, or a savepoint) was rolled back."""
        if boundary.parent is None:  # the whole transaction
            self.pending.clear()
            self.errors.clear()
            self.broken, self.broken_reason = None, ""
            if self.blocks:
                # From inside a nested block (uow.session.rollback()): SQLAlchemy cannot be
                # stopped before it, and the outer work is gone, so what follows must not
                # commit as if it were the whole.
                self.broken_reason = (
                    "the whole transaction was rolled back from inside a nested block "
                    "(uow.savepoint() or a nested unit of work), which discarded the work "
                    "before the block; raise inside the block to roll back to its savepoint"
                )
                self.broken = TransactionError(self.broken_reason)
            return
        self.pending = [c for c in self.pending if not within(c.savepoint, boundary)]
        self.errors = [(e, where) for e, where in self.errors if not within(where, boundary)]


def attach(session: Session, *, count_statements: bool) -> Journal:
    """Start a journal for `session` (the sync session of an `AsyncSession`).

    With `count_statements`, the statements under way on its connections are counted (the
    listeners that count them are added to its engines once).
    """
    listen_on(type(session))
    journal = Journal(count_statements=count_statements)
    session.__dict__[_KEY] = journal
    return journal


def detach(session: Session) -> None:
    """Stop recording for `session`: its unit of work has ended."""
    session.__dict__.pop(_KEY, None)


def note_refusal(session: Session, error: BaseException) -> None:
    """Record an operation SQLAlchemy refused, as a failed statement is recorded."""
    journal = _journal_of(session)
    if journal is not None:
        journal.errors.append((error, session.get_nested_transaction()))
        journal.last_error = error


def flushing(session: Session) -> bool:
    """Whether a flush of `session` is under way (in another task: this one is here)."""
    # SQLAlchemy's own flag, the one its "Session is already flushing" check reads; it has no
    # public accessor.
    return bool(getattr(session, "_flushing", False))


def busy(session: Session) -> bool:
    """Whether another task has a flush or a statement under way in `session`."""
    journal = _journal_of(session)
    return flushing(session) or (journal is not None and journal.running > 0)


def _journal_of(session: Session) -> Journal | None:
    journal: Journal | None = session.__dict__.get(_KEY)
    return journal


def within(savepoint: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    """Whether `savepoint` is `ancestor` or was opened inside it (None: at the top level)."""
    while savepoint is not None:
        if savepoint is ancestor:
            return True
        savepoint = savepoint.parent
    return False


# --- session events ---------------------------------------------------------------------------

# The sessions holding each connection, so a failed statement on it finds its journal. Weak
# both ways: neither a connection nor a session is kept alive by being listed here.
_holders: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = weakref.WeakKeyDictionary()
_listening_dialects: weakref.WeakSet[Dialect] = weakref.WeakSet()
_listening_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_listening_classes: weakref.WeakSet[type[Session]] = weakref.WeakSet()


def _after_begin(
    session: Session, _transaction: SessionTransaction, connection: Connection
) -> None:
    journal = _journal_of(session)
    if journal is None:
        return
    _holders[connection] = weakref.ref(session)
    dialect = connection.dialect
    if dialect not in _listening_dialects:
        # handle_error lives on the dialect (SQLAlchemy 2.0): it sees every statement that
        # fails on any connection of this dialect, whichever API sent it.
        event.listen(dialect, "handle_error", _record_failed_statement)
        _listening_dialects.add(dialect)
    if not journal.count_statements:
        return  # a sync session: one thread at a time, no other task to wait for
    engine = _root_engine(connection.engine)
    if engine not in _listening_engines:
        event.listen(engine, "before_cursor_execute", _statement_started)
        event.listen(engine, "after_cursor_execute", _statement_ended)
        _listening_engines.add(engine)


def _root_engine(engine: Engine) -> Engine:
    # An engine made by execution_options() (a unit of work's isolation level makes one each
    # time) fires the listeners of the engine it was made from: listen there, once. SQLAlchemy
    # names that engine only privately; without it, each such engine gets listeners of its own.
    while isinstance(proxied := getattr(engine, "_proxied", None), Engine):
        engine = proxied
    return engine


def _statement_started(connection: Connection, *_args: object) -> None:
    held = _holding(connection)
    if held is not None:
        held[1].running += 1


def _statement_ended(connection: Connection, *_args: object) -> None:
    held = _holding(connection)
    if held is not None and held[1].running > 0:
        held[1].running -= 1


def _holding(connection: Connection | None) -> tuple[Session, Journal] | None:
    """The unit-of-work session holding `connection`, and its journal, if one does."""
    holder = _holders.get(connection) if connection is not None else None
    session = holder() if holder is not None else None
    journal = _journal_of(session) if session is not None else None
    return None if session is None or journal is None else (session, journal)


def _before_commit(session: Session) -> None:
    journal = _journal_of(session)
    if journal is None:
        return  # not a unit of work's session
    if flushing(session) or journal.running:
        # Another task has a flush or a statement under way in this session (SQLAlchemy does
        # not support two tasks on one session): the commit would skip its own flush while
        # another runs, committing part of the work, or send its COMMIT before that flush has
        # begun a transaction (asyncpg begins at the first statement).
        raise TransactionError(
            "this unit of work's session is in use by another task (a flush or a statement "
            "under way) while it commits; "
            "a session serves one task at a time, so nothing of it was committed. Give each "
            "concurrent task its own unit of work"
        )
    current = session.get_nested_transaction()
    if current is not None and (current not in journal.blocks or journal.releasing is current):
        return  # a savepoint being released: the user's own, or a block's, by ormkit
    if journal.blocks:
        # session.commit() inside a nested block: it would commit the block's work with the
        # rest, and an exception in the block could no longer undo it.
        raise TransactionError(
            "the session is committed from inside a nested block (uow.savepoint() or a nested "
            "unit of work), which would commit the block's work before the block decides; "
            "leave the block first, and commit in the outermost unit of work"
        )
    cause = journal.broken or journal.first_error_within(None)
    if cause is not None:
        raise TransactionError(
            "this unit of work's session cannot commit: a statement failed inside it and its "
            "error was caught, so part of the work is missing. Roll back (uow.rollback()), or "
            "let the error propagate, or run the statement that may fail inside "
            "uow.savepoint() and catch the error outside it"
        ) from cause


def _after_commit(session: Session) -> None:
    journal = _journal_of(session)
    # after_commit also fires when a savepoint is released; only the outermost commit counts.
    if journal is not None and not session.in_nested_transaction():
        journal.committed()


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    journal = _journal_of(session)
    if journal is None:
        return
    # A failed flush rolls back its own subtransaction, which rolls the database back to the
    # nearest savepoint, or the whole transaction: that is what was undone.
    boundary = previous
    while boundary.parent is not None and not boundary.nested:
        boundary = boundary.parent
    journal.rolled_back(boundary)


def _record_failed_statement(context: ExceptionContext) -> None:
    # No connection: a pre-ping on checkout, no statement of anyone's.
    held = _holding(context.connection)
    if held is None:
        return
    session, journal = held
    error = context.sqlalchemy_exception or context.original_exception
    journal.errors.append((error, session.get_nested_transaction()))
    journal.last_error = error
    if context.execution_context is not None and journal.running > 0:
        journal.running -= 1  # a failed statement: no after_cursor_execute follows


_LISTENERS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("after_begin", _after_begin),
    ("before_commit", _before_commit),
    ("after_commit", _after_commit),
    ("after_soft_rollback", _after_soft_rollback),
)


def listen_on(session_class: type[Session]) -> None:
    """Make sure the journal's listeners hear the sessions of `session_class`."""
    if session_class in _listening_classes:
        return
    if not any(base in _listening_classes for base in session_class.__mro__):
        for name, listener in _LISTENERS:
            event.listen(session_class, name, listener)
    _listening_classes.add(session_class)  # heard, directly or through a base class
