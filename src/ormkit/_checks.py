"""Argument checks and message helpers that several modules share; no I/O here.

Each check refuses a bad value before any SQL is sent, with an `OrmkitError` whose message says
what was wrong and what to pass instead.
"""

from __future__ import annotations

import inspect
import math
import sqlite3
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import BigInteger, Integer, SmallInteger
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import NO_STATE

from ormkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.types import TypeEngine

__all__ = [
    "MAX_PARAMETERS",
    "a_noun",
    "as_list",
    "check_flag",
    "check_isolation_level",
    "check_number",
    "check_sync_callable",
    "describe",
    "fits_key",
    "integer_range",
    "is_a",
    "is_model_object",
    "python_type",
    "refuse_awaitable",
]

_LONGEST_REPR = 60

# Bound parameters per statement (by_ids' IN lists, upsert's VALUES rows): below every supported
# driver's limit (asyncpg 32767, psycopg 65535; SQLite 32766, or 999 before SQLite 3.32).
MAX_PARAMETERS = 999 if sqlite3.sqlite_version_info < (3, 32) else 30_000


def describe(value: object) -> str:
    """`value` for a message: a class by its name, else its repr and type (or just the type)."""
    if isinstance(value, type):
        return f"the class {value.__name__}"  # not its metaclass
    if value is None:
        return "None"
    if isinstance(value, QueryableAttribute):
        return f"{value} (an attribute)"
    text = repr(value)
    if (text.startswith("<") and " at 0x" in text) or len(text) > _LONGEST_REPR:
        return a_noun(type(value).__name__)  # the repr says no more than the type, or far too much
    return f"{text} ({type(value).__name__})"


def a_noun(noun: str) -> str:
    """`noun` with its article: "an AsyncSession", "a Session", "a User"."""
    # A leading U is mostly said "you".
    return f"{'an' if noun[:1] in 'AEIO' else 'a'} {noun}"


def as_list(values: object) -> list[object] | None:
    """`values` as a list, or None if it is not iterable."""
    return list(cast("Iterable[object]", values)) if isinstance(values, Iterable) else None


# The integers a column can hold, where the database refuses a bound value outside them
# (PostgreSQL: "integer out of range" after the statement is sent, which also aborts the
# transaction; SQLite's driver: OverflowError past 64 bits). Checked before any SQL instead.
_INT16, _INT32, _INT64 = (-(2**15), 2**15 - 1), (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1)


def integer_range(sql_type: TypeEngine[Any], dialect: Dialect) -> tuple[int, int] | None:
    """The integers a column of `sql_type` holds on `dialect`; None: not an integer, or unknown."""
    if dialect.name not in ("sqlite", "postgresql"):
        return None  # a database ormkit does not test on
    kind = sql_type.dialect_impl(dialect)  # resolves with_variant() for this dialect
    if not isinstance(kind, Integer):
        return None  # not an integer, or a TypeDecorator over one
    if dialect.name == "sqlite" or isinstance(kind, BigInteger):
        return _INT64  # SQLite: INTEGER is 64-bit, whatever the declared size
    return _INT16 if isinstance(kind, SmallInteger) else _INT32


def python_type(column: Any) -> type | None:
    """The Python type of `column`'s values, or None when its SQL type does not say."""
    try:
        kind: type = column.type.python_type
    except NotImplementedError:
        return None
    return kind


def fits_key(value: object, kind: type | None) -> bool:
    """Whether `value` can be a key value of a column whose values are of `kind`."""
    if value is None:
        return False
    if kind is None:
        return not isinstance(value, (list, dict, set, tuple))
    if isinstance(value, bool) and kind is not bool:
        return False  # True is an int to Python, but never a sensible integer key
    if kind is float or kind is Decimal:
        return isinstance(value, (int, float, Decimal))
    return isinstance(value, kind)


def is_a(value: object, kind: type) -> bool:
    """`isinstance`, without narrowing `value`.

    Narrowing to a generic class leaves its type arguments unknown to pyright, so the caller
    casts the checked value to the type it uses instead.
    """
    return isinstance(value, kind)


def is_model_object(obj: object) -> bool:
    """Whether `obj` is an instance of a mapped class (one that a session can add)."""
    try:
        instance_state(obj)
    except NO_STATE:
        return False
    return True


def check_flag(name: str, value: object, *, meaning: str = "") -> None:
    """Refuse `value` unless it is True or False (a truthy string would pass an `if`)."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {describe(value)}{meaning}")


def check_number(
    name: str, value: object, *, minimum: float, whole: bool = False, unit: str = ""
) -> None:
    """Refuse `value` unless it is a finite number (an int if `whole`) of at least `minimum`.

    `unit` ends the hint for an infinite value: " of seconds".
    """
    kind = "an int" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if whole else (int, float)):
        raise InvalidArgumentError(f"{name} must be {kind} >= {minimum:g}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        # An endless wait, or NaN (which time.sleep refuses), would only show much later.
        raise InvalidArgumentError(
            f"{name} must be {kind} >= {minimum:g}, got {value!r}; pass a finite number{unit}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be {kind} >= {minimum:g}, got {value!r}")


# The isolation levels of SQLAlchemy's dialects, as SQLAlchemy spells them once normalized
# (upper case, spaces for underscores). Each dialect takes some of them: SQLite has no READ
# COMMITTED, only SQL Server has SNAPSHOT. The dialect answers at the first statement; a name
# none of them knows is refused here. AUTOCOMMIT is a level SQLAlchemy knows, but no
# transaction: a unit of work refuses it (see `check_isolation_level`).
_ISOLATION_LEVELS = (
    "SERIALIZABLE",
    "REPEATABLE READ",
    "READ COMMITTED",
    "READ UNCOMMITTED",
    "SNAPSHOT",
)


def check_isolation_level(level: object, owner: str) -> str:
    """`level` as SQLAlchemy normalizes it; refused if unknown, or AUTOCOMMIT."""
    normalized = level.replace("_", " ").upper() if isinstance(level, str) else None
    if normalized == "AUTOCOMMIT":
        # Every statement would commit on its own: a failing block would leave its rows behind.
        raise InvalidArgumentError(
            f"{owner} refuses isolation_level='AUTOCOMMIT': a unit of work is one transaction, "
            "committed whole or not at all, and AUTOCOMMIT commits each statement on its own. "
            "Use a connection with autocommit for that (engine.connect() with "
            "execution_options(isolation_level='AUTOCOMMIT')), or pick a transaction level"
        )
    if normalized not in _ISOLATION_LEVELS:
        known = ", ".join(repr(name) for name in _ISOLATION_LEVELS)
        raise InvalidArgumentError(
            f"isolation_level must be one of {known} (each database takes some of them), "
            f"or None to keep the engine's; got {describe(level)}"
        )
    return normalized


def check_sync_callable(value: object, what: str, *, fix: str) -> None:
    """Refuse an `async def` function (or a partial of one) where sync code will call it.

    Sync code would call it, get a coroutine and never await it: the work would silently
    not happen (Python only warns "coroutine ... was never awaited").
    """
    if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(
        getattr(value, "__call__", None)  # noqa: B004 (an instance with an async __call__)
    ):
        name = getattr(value, "__name__", None)
        shown = f"{name}()" if isinstance(name, str) and name != "<lambda>" else "the callable"
        raise InvalidArgumentError(f"{what} takes a plain function, but {shown} is async; {fix}")


def refuse_awaitable(result: object, what: str, *, fix: str) -> None:
    """Refuse (and close, so Python does not warn) an awaitable that sync code got back."""
    if not inspect.isawaitable(result):
        return
    close = getattr(result, "close", None)
    if callable(close):
        close()  # a coroutine: never run, and no "was never awaited" warning
    raise InvalidArgumentError(
        f"{what} returned {a_noun(type(result).__name__)}, which sync code cannot await; {fix}"
    )
