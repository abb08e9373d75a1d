"""Keyset pagination, I/O-free: `Page`, the cursors, and the statement of each page.

A page is `WHERE <criteria> AND <after the cursor's row> ORDER BY <terms> LIMIT limit + 1`: the
database seeks to where the previous page ended instead of counting past every row before it,
so page 1,000 costs what page 1 does, and rows inserted or deleted behind the cursor cannot make
a later page repeat or skip a row (an OFFSET counts rows, so they move it).

The order is made total by appending the primary key, and NULLs of a nullable sort column are
placed explicitly (by default they sort after every value, as PostgreSQL does; SQLite would put
them first), so the cursor comparison and ORDER BY agree on every dialect.

A cursor is URL-safe base64 of: a format byte, a fingerprint of the model and the order, a
checksum, and the last row's sort values as tagged JSON. The checksum catches a cursor that was
cut, corrupted or edited by hand; it is no signature (anyone can compute it), and need not be:
the values are bound parameters checked against their columns' types, so a forged cursor can
only move where a page starts, within the criteria the application applies.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import json
import re
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Enum,
    Uuid,
    and_,
    false,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy import cast as cast_to
from sqlalchemy.orm import ColumnProperty, Mapper, QueryableAttribute
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression

from ormkit._checks import check_flag, describe, integer_range, is_a
from ormkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sqlalchemy.engine import Row
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.orm import QueryableAttribute as _Attribute

    Criterion = ColumnElement[bool] | _Attribute[bool]
    from sqlalchemy.sql.expression import Executable

__all__ = ["Page", "PageQuery", "plan_page"]

ModelT = TypeVar("ModelT")

_FORMAT = 1
_FINGERPRINT_BYTES = 4
_CHECKSUM_BYTES = 6
_CURSOR = re.compile(r"[A-Za-z0-9_-]+")  # URL-safe base64, unpadded: nothing else decodes
_PG_NUMERIC_DIGITS = 16383  # digits after the point; before it, PostgreSQL allows more
MAX_LIMIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Page(Generic[ModelT]):
    """One page of `Repository.page`: its objects, the cursor of the next page, the total.

    ```python
    first = users.page(order_by=User.name, limit=20)
    second = users.page(order_by=User.name, limit=20, after=first.next)
    ```
    """

    items: tuple[ModelT, ...]
    """The page's objects, in order (identity-map objects, as `find` returns)."""

    next: str | None
    """The cursor to pass as `after=` for the next page; `None` on the last page."""

    total: int | None = None
    """How many rows match the criteria (all pages), with `with_total=True`; else `None`."""


@dataclass(frozen=True)
class _Term:
    """One ORDER BY term, made of a column attribute of the model."""

    key: str  # the attribute
    attribute: QueryableAttribute[Any]
    descending: bool
    nulls_last: bool  # in the page order, whether NULLs come after every value
    nullable: bool
    kind: type  # the Python type of the column's values
    bounds: tuple[int, int] | None = None  # the integers the column holds on this database
    postgresql: bool = False
    choices: frozenset[str] | None = None  # the values of a string Enum column
    uuid_text: bool = False  # a Uuid(as_uuid=False) column: its str values are UUIDs

    def _refuses_text(self, value: str) -> str | None:
        if self.postgresql and "\x00" in value:
            return "a NUL character, which PostgreSQL text cannot hold"
        try:
            value.encode()
        except UnicodeEncodeError:
            return "a string that is not Unicode text (a lone surrogate)"
        if self.choices is not None and value not in self.choices:
            return "a value that is not one of the enum's"
        if self.uuid_text:
            try:
                uuid.UUID(value)
            except ValueError:
                return "a string that is not a UUID"
        return None

    @cached_property
    def order(self) -> ColumnElement[Any]:
        """The ORDER BY term (made once: SQL elements are immutable)."""
        term = self.attribute.desc() if self.descending else self.attribute.asc()
        if not self.nullable:
            return term
        return term.nulls_last() if self.nulls_last else term.nulls_first()

    def after(self, value: object) -> ColumnElement[bool]:
        """Rows strictly after `value` in this term's order."""
        column = self.attribute
        if value is None:
            return column.is_not(None) if not self.nulls_last else false()
        bound = self.bound(value)
        beyond = column < bound if self.descending else column > bound
        return or_(beyond, column.is_(None)) if self.nullable and self.nulls_last else beyond

    def equal(self, value: object) -> ColumnElement[bool]:
        return self.attribute.is_(None) if value is None else self.attribute == self.bound(value)

    def bound(self, value: object) -> ColumnElement[Any]:
        # A bound parameter of the column's type, never a bare Python value: SQLAlchemy reads
        # `column > True` as a boolean operator and refuses it.
        parameter = literal(value, self.attribute.type)
        if self.kind is float:
            # A float read from a REAL column is its shortest text (0.7), and compared as
            # double precision it is not the stored 0.699999988: compare in the column's type.
            return cast_to(parameter, self.attribute.type)
        return parameter

    def refuses(self, value: object) -> str | None:
        """Why the database would refuse `value` for this column after the SQL is sent."""
        if self.bounds is not None and isinstance(value, int):
            low, high = self.bounds
            if not low <= value <= high:
                return f"an integer outside {low} to {high}"
        if isinstance(value, str):
            return self._refuses_text(value)
        if isinstance(value, Decimal) and value.is_snan():
            return "a signaling NaN"
        exponent = value.adjusted() if isinstance(value, Decimal) and value.is_finite() else 0
        if self.postgresql and abs(exponent) > _PG_NUMERIC_DIGITS:
            return "a number beyond PostgreSQL's numeric"
        return None


@dataclass(frozen=True)
class PageQuery(Generic[ModelT]):
    """The statements of one page and how to make the `Page` from their rows."""

    statement: Executable
    count: Executable | None
    limit: int
    unique: bool  # joined eager loads of collections repeat rows: Result.unique() needed
    terms: tuple[_Term, ...]
    fingerprint: bytes

    def page(self, rows: Sequence[Row[Any]], total: int | None) -> Page[ModelT]:
        shown = rows[: self.limit]
        more = len(rows) > self.limit
        cursor = _encode(self.fingerprint, tuple(shown[-1][1:])) if more else None
        items = cast("tuple[ModelT, ...]", tuple(row[0] for row in shown))
        return Page(items, cursor, total)


def plan_page(
    model: type[ModelT],
    mapper: Mapper[Any],
    criteria: tuple[Criterion, ...],
    *,
    order_by: object,
    limit: object,
    after: object,
    with_total: object,
    dialect: Dialect,
) -> PageQuery[ModelT]:
    """Check a `page` call and build its statement; no I/O, no SQL sent."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgumentError(
            f"page() takes limit as an int from 1 to {MAX_LIMIT:,}, got {describe(limit)}; "
            "a page is loaded whole, so walk more pages for more rows"
        )
    check_flag("with_total", with_total)
    if after is not None and not isinstance(after, str):
        raise InvalidArgumentError(
            "page() takes after as a cursor string (a Page's .next) or None for the first "
            f"page, got {describe(after)}"
        )
    terms = _terms(mapper, order_by, dialect)
    fingerprint = _fingerprint(mapper, terms)
    statement = select(model, *(term.attribute for term in terms)).where(*criteria)
    if after is not None:
        values = _decode(after, fingerprint, terms, mapper.class_.__name__)
        statement = statement.where(_after(terms, values))
    statement = statement.order_by(*(term.order for term in terms)).limit(limit + 1)
    count = select(func.count()).select_from(model).where(*criteria) if with_total else None
    return PageQuery(statement, count, limit, _joins_collections(mapper), terms, fingerprint)


def _joins_collections(mapper: Mapper[Any]) -> bool:
    """Whether the model's loader strategies may join a collection (`lazy="joined"`).

    Any joined relationship counts: a joined many-to-one can lead on to a joined collection.
    """
    return any(rel.lazy == "joined" for rel in mapper.relationships)


# --- the order ----------------------------------------------------------------------------------

_NULLS_MODIFIERS = {operators.nulls_first_op: False, operators.nulls_last_op: True}
_DIRECTION_MODIFIERS = {operators.asc_op: False, operators.desc_op: True}


def _terms(mapper: Mapper[Any], order_by: object, dialect: Dialect) -> tuple[_Term, ...]:
    given: list[object]
    if isinstance(order_by, (ColumnElement, QueryableAttribute)):
        given = [order_by]
    elif isinstance(order_by, Iterable) and not isinstance(order_by, (str, bytes)):
        given = list(cast("Iterable[object]", order_by))
    else:
        given = [order_by]
    if not given:
        raise InvalidArgumentError(
            "page() needs an order_by, such as User.name or [User.created_at.desc()]; the "
            "primary key is appended to it"
        )
    terms = [_term(mapper, item, dialect) for item in given]
    seen = {term.key for term in terms}
    if len(seen) != len(terms):
        raise InvalidArgumentError(
            "page() order_by names a column twice; each column once, with its direction"
        )
    keys = (mapper.get_property_by_column(column).key for column in mapper.primary_key)
    # The primary key makes the order total.
    terms.extend(
        _term(mapper, getattr(mapper.class_, key), dialect) for key in keys if key not in seen
    )
    return tuple(terms)


def _term(mapper: Mapper[Any], item: object, dialect: Dialect) -> _Term:
    element, nulls = _modifier(item, _NULLS_MODIFIERS)
    element, descending = _modifier(element, _DIRECTION_MODIFIERS)
    prop = _column_property(mapper, element)
    if prop is None:
        raise InvalidArgumentError(
            f"page() orders by column attributes of {mapper.class_.__name__}, each optionally "
            f"with .asc()/.desc() and .nulls_first()/.nulls_last(), got {describe(item)}; "
            "the cursor carries each term's value, so an expression cannot be a term"
        )
    nulls_last = not descending if nulls is None else nulls
    made = _made_terms.setdefault(mapper, {})
    key = (prop.key, bool(descending), nulls_last, dialect.name)
    known = made.get(key)
    if known is not None:
        return known  # its ORDER BY element made once, too
    column = cast("Column[Any]", prop.columns[0])
    kind = _cursor_type(column)
    if kind is None:
        raise InvalidArgumentError(
            f"page() cannot order by {mapper.class_.__name__}.{prop.key}: a cursor holds "
            "ints, floats, strings, Decimals, dates, times, datetimes, intervals, UUIDs, bytes, "
            f"booleans and enums, and its type is {column.type!r}"
        )
    term = made[key] = _Term(
        prop.key,
        getattr(mapper.class_, prop.key),
        bool(descending),
        nulls_last=nulls_last,
        nullable=bool(column.nullable),
        kind=kind,
        bounds=integer_range(column.type, dialect),
        postgresql=dialect.name == "postgresql",
        choices=_string_choices(column),
        uuid_text=isinstance(column.type, Uuid) and not column.type.as_uuid,
    )
    return term


# Per mapper, the terms made so far: a page's terms are parsed each call (each `User.id.desc()`
# is a new object), but built once. Weak: a mapper that goes away takes its terms with it.
_made_terms: weakref.WeakKeyDictionary[Mapper[Any], dict[tuple[str, bool, bool, str], _Term]] = (
    weakref.WeakKeyDictionary()
)


def _modifier(element: object, modifiers: dict[Any, bool]) -> tuple[object, bool | None]:
    """`element` without an outer modifier of `modifiers` (`.desc()`), and what it says."""
    if not is_a(element, UnaryExpression):  # first: an ORM attribute's getattr is costly
        return element, None
    unary = cast("UnaryExpression[Any]", element)
    if unary.modifier not in modifiers:
        return element, None
    inner: object = unary.element
    return inner, modifiers[unary.modifier]


def _column_property(mapper: Mapper[Any], element: object) -> ColumnProperty[Any] | None:
    prop = _mapped_property(mapper, element)
    if not is_a(prop, ColumnProperty):
        return None
    # One column, or the key of joined inheritance: the subclass's column and the base's,
    # equal in every row (prop.columns[0] is the one the subclass's table holds).
    found = cast("ColumnProperty[Any]", prop)
    columns = found.columns
    inherited = len(columns) > 1 and all(is_a(c, Column) and c.primary_key for c in columns)
    return found if is_a(columns[0], Column) and (len(columns) == 1 or inherited) else None


def _mapped_property(mapper: Mapper[Any], element: object) -> object:
    """The property of `mapper` that `element` (an attribute or a column) stands for."""
    if is_a(element, QueryableAttribute):
        attribute = cast("QueryableAttribute[Any]", element)
        owner: object = attribute.class_
        if not (isinstance(owner, type) and issubclass(mapper.class_, owner)):
            return None  # another model's
        try:
            return attribute.property
        except AttributeError:  # a hybrid over an expression has no mapped property
            return None
    if is_a(element, ColumnElement):
        try:
            return mapper.get_property_by_column(cast("ColumnElement[Any]", element))
        except UnmappedColumnError:
            return None
    return None


def _after(terms: tuple[_Term, ...], values: tuple[object, ...]) -> ColumnElement[bool]:
    """Rows after the cursor's row in the order of `terms`."""
    direction = {term.descending for term in terms}
    if len(terms) > 1 and len(direction) == 1 and not any(term.nullable for term in terms):
        # One direction, no NULLs: a row-value comparison, which an index on the columns serves.
        row = tuple_(*(term.attribute for term in terms))
        given = tuple_(*(term.bound(value) for value, term in zip(values, terms, strict=True)))
        return row < given if terms[0].descending else row > given
    # Otherwise: after on the first term, or equal there and after on the next, and so on.
    branches: list[ColumnElement[bool]] = []
    for index, term in enumerate(terms):
        equal = [terms[j].equal(values[j]) for j in range(index)]
        branches.append(and_(*equal, term.after(values[index])))
    return or_(*branches)


def _fingerprint(mapper: Mapper[Any], terms: tuple[_Term, ...]) -> bytes:
    model = mapper.class_
    identity = [f"{model.__module__}.{model.__qualname__}", mapper.local_table.description]
    identity += [
        f"{t.key}:{'d' if t.descending else 'a'}:{'l' if t.nulls_last else 'f'}" for t in terms
    ]
    return hashlib.blake2b("|".join(identity).encode(), digest_size=_FINGERPRINT_BYTES).digest()


# --- the cursor ---------------------------------------------------------------------------------

_SCALARS: tuple[type, ...] = (
    bool,
    int,
    float,
    str,
    Decimal,
    dt.datetime,
    dt.date,
    dt.time,
    dt.timedelta,
    uuid.UUID,
    bytes,
)


def _cursor_type(column: Column[Any]) -> type | None:
    try:
        kind: type = column.type.python_type
    except NotImplementedError:
        return None
    return kind if kind in _SCALARS or _is_enum(kind) else None


def _string_choices(column: Column[Any]) -> frozenset[str] | None:
    """The values of an Enum column of strings (one of an enum class gives members)."""
    sql_type = column.type
    if isinstance(sql_type, Enum) and sql_type.enum_class is None:
        return frozenset(sql_type.enums)
    return None


def _is_enum(kind: type) -> bool:
    return issubclass(kind, enum.Enum)


def _interval(text: str) -> dt.timedelta:
    days, seconds, microseconds = map(int, text.split(","))
    return dt.timedelta(days, seconds, microseconds)


def _encode(fingerprint: bytes, values: tuple[object, ...]) -> str:
    body = json.dumps([_tag(value) for value in values], separators=(",", ":")).encode()
    head = bytes([_FORMAT]) + fingerprint
    return _b64(head + _checksum(head, body) + body)


def _checksum(head: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=head, digest_size=_CHECKSUM_BYTES).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError(text)
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Values other than ints, bools and NULLs: a string of a one-letter tag and the value's text,
# read back as the column's type.
_FORMS: tuple[tuple[str, type, Callable[[Any], str], Callable[[str], object]], ...] = (
    ("s", str, str, str),
    ("f", float, float.hex, float.fromhex),  # exact, and inf/nan stay valid JSON
    ("n", Decimal, str, Decimal),
    ("t", dt.datetime, dt.datetime.isoformat, dt.datetime.fromisoformat),  # keeps the offset
    ("d", dt.date, dt.date.isoformat, dt.date.fromisoformat),
    ("h", dt.time, dt.time.isoformat, dt.time.fromisoformat),
    ("i", dt.timedelta, lambda v: f"{v.days},{v.seconds},{v.microseconds}", _interval),
    ("u", uuid.UUID, lambda v: _b64(v.bytes), lambda t: uuid.UUID(bytes=_unb64(t))),
    ("b", bytes, _b64, _unb64),
)
_BY_TAG = {form[0]: form for form in _FORMS}
_PLAIN = (bool, int)  # JSON holds these as themselves


def _tag(value: object) -> object:
    """A sort value as JSON that decodes to an equal value of the same type."""
    if isinstance(value, enum.Enum):  # before int and str: IntEnum and StrEnum are both
        return f"e{value.name}"
    if value is None or type(value) in _PLAIN:
        return value
    for tag, kind, write, _ in _FORMS:
        if isinstance(value, kind):
            return tag + write(value)
    msg = f"a sort value of type {type(value).__name__} has no cursor form"
    raise InvalidArgumentError(msg)


def _untag(item: object, kind: type) -> object:
    """The value `_tag` made `item` from, refused (TypeError) unless of the column's type."""
    if item is None:
        return None
    if type(item) in _PLAIN:
        if kind is float and type(item) is int:
            return float(item)  # SQLite reads a whole Numeric(asdecimal=False) value as an int
        if type(item) is not kind:
            raise TypeError
        return item
    if not isinstance(item, str) or not item:
        raise TypeError
    tag, text = item[0], item[1:]
    if tag == "e" and _is_enum(kind):
        return cast("type[enum.Enum]", kind)[text]
    form = _BY_TAG.get(tag)
    if form is None or form[1] is not kind:
        raise TypeError
    return form[3](text)


def _decode(
    cursor: str, fingerprint: bytes, terms: tuple[_Term, ...], model: str
) -> tuple[object, ...]:
    def refuse(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"page() got a cursor that {why}; pass the .next of a Page from this same query "
            "(same model and order_by), or after=None for the first page"
        )

    try:
        token = _unb64(cursor) if _CURSOR.fullmatch(cursor) else b""
    except (binascii.Error, ValueError):
        token = b""
    if not token or _b64(token) != cursor:  # what base64 would skip, or spare bits set
        raise refuse("is not a cursor (not unpadded URL-safe base64 as ormkit writes it)")
    split = 1 + _FINGERPRINT_BYTES
    head, checksum, body = (
        token[:split],
        token[split : split + _CHECKSUM_BYTES],
        token[split + _CHECKSUM_BYTES :],
    )
    if len(token) < split + _CHECKSUM_BYTES or head[0] != _FORMAT:
        raise refuse("is not a cursor of this version of ormkit")
    if head[1:] != fingerprint:
        raise refuse(
            f"was made for another query (another model than {model}, or another order_by)"
        )
    if checksum != _checksum(head, body):
        raise refuse("was altered or cut short")
    try:
        tagged = json.loads(body)
    except ValueError:
        raise refuse("holds no values") from None
    if not isinstance(tagged, list) or len(cast("list[object]", tagged)) != len(terms):
        raise refuse("holds another number of values than the order has terms")
    values: list[object] = []
    for item, term in zip(cast("list[object]", tagged), terms, strict=True):
        try:
            value = _untag(item, term.kind)
        except (TypeError, ValueError, KeyError, InvalidOperation, OverflowError):
            raise refuse(f"holds a bad value for {model}.{term.key}") from None
        if value is None and not term.nullable:
            raise refuse(f"holds NULL for {model}.{term.key}, which has no NULLs")
        why = term.refuses(value)
        if why is not None:
            raise refuse(f"holds {why} for {model}.{term.key}")
        values.append(value)
    return tuple(values)
