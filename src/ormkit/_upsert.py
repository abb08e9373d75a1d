"""The I/O-free half of `upsert_many`: checking the rows and building the statement.

One `INSERT ... ON CONFLICT (target) DO UPDATE SET ... RETURNING` per chunk, from SQLAlchemy's
dialect inserts, so there is no window between a SELECT and an INSERT for another writer to
fill. Everything is checked here before any SQL is sent; the twins in `_repository.py` only
execute the statement and put the returned objects back in the order the rows were given.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Index,
    PrimaryKeyConstraint,
    Table,
    UniqueConstraint,
    bindparam,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import ColumnProperty, Mapper, QueryableAttribute
from sqlalchemy.orm.attributes import instance_state

from ormkit._checks import (
    MAX_PARAMETERS,
    describe,
    fits_key,
    integer_range,
    is_a,
    python_type,
)
from ormkit.errors import ConfigurationError, InvalidArgumentError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.expression import Executable

__all__ = ["UpsertPlan", "plan_upsert"]

# RETURNING came to SQLite in 3.35; ON CONFLICT ... DO UPDATE in 3.24.
_SQLITE_RETURNING = (3, 35)


@dataclass(frozen=True)
class UpsertPlan:
    """The statement of one `upsert_many` call, its rows, and how to put them back in order."""

    statement: Executable
    rows: list[dict[str, object]]  # in the order they are sent
    order: list[int]  # per row sent, its index among the rows given
    keys: list[tuple[object, ...]]  # per row given, its conflict key
    on: tuple[str, ...]  # the conflict target's attribute names
    model: str
    options: dict[str, Any]  # the execution options: a chunk per statement, populate_existing

    def in_order(self, returned: list[object]) -> list[Any]:
        """The objects returned, one per row given, in the order given."""
        by_key: dict[tuple[object, ...], object] = {}
        for obj in returned:
            loaded = instance_state(obj).dict
            by_key[tuple(loaded.get(name) for name in self.on)] = obj
        if all(key in by_key for key in self.keys):
            return [by_key[key] for key in self.keys]
        if len(returned) < len(self.keys):
            # The conflict's WHERE left a row alone: one of another class of the model's
            # single-table hierarchy, which this class's upsert must not take over.
            missing = [key for key in self.keys if key not in by_key]
            raise InvalidArgumentError(
                f"upsert_many() found rows with the keys {missing[:5]} that are not "
                f"{self.model}s but of another class of its table (single-table inheritance), "
                "and left them alone; upsert them with that class's repository"
            )
        # A key the database gave back in another form than it was given (a naive datetime
        # for a timestamptz): fall back to the order of RETURNING, which PostgreSQL and SQLite
        # give in the order of VALUES (in practice; neither promises it, hence the keys first).
        ordered: list[object] = [None] * len(self.keys)
        for index, obj in zip(self.order, returned, strict=True):
            ordered[index] = obj
        return ordered


def plan_upsert(
    mapper: Mapper[Any],
    rows: object,
    *,
    on: object,
    update: object,
    dialect: Dialect,
    chunk_size: int | None,
    method: str,
) -> UpsertPlan:
    """Check an `upsert_many` call and build its statement; no I/O, no SQL sent.

    One statement with the rows as its parameters: SQLAlchemy's "insertmanyvalues" sends them
    as multi-row VALUES, a chunk per statement, and compiles the statement once (building a
    VALUES list of thousands of rows as one statement costs several times more).
    """
    model = mapper.class_.__name__
    table = _single_table(mapper)
    insert = _dialect_insert(dialect, model)
    given = _check_rows(rows, method)
    columns = _column_attributes(mapper, table)
    names = _row_names(given, columns, model, method)
    target = _conflict_target(mapper, table, on, columns)
    updated = _updated(mapper, update, names, target, columns)
    keys = _keys(given, target, columns, model, dialect)
    given, only_own = _with_identity(mapper, given, method)

    # Rows go out in conflict-key order, so concurrent upserts of overlapping keys take their
    # row locks in one order and cannot deadlock each other (a shuffled order can, on PostgreSQL).
    order = list(range(len(given)))
    with suppress(TypeError):  # keys that do not compare (mixed types): the order given
        order.sort(key=lambda index: cast("Any", keys[index]))
    size = chunk_size or max(1, MAX_PARAMETERS // max(1, len(table.columns)))

    target_columns = [columns[name] for name in target]
    statement = insert(mapper.class_)
    set_: dict[Any, Any]
    if updated:
        excluded = statement.excluded
        set_ = {columns[name]: excluded[columns[name].key] for name in updated}
        set_.update(_on_update_defaults(table, names, set_))
    else:
        # DO NOTHING would return no row for a key that exists: set a key column to its own
        # value instead, which changes nothing and still returns (and locks) the row.
        set_ = {target_columns[0]: target_columns[0]}
    # A subclass of single-table inheritance leaves its siblings' rows alone: a key of one of
    # those comes back as no row (see in_order).
    statement = statement.on_conflict_do_update(
        index_elements=target_columns, set_=set_, where=only_own
    ).returning(mapper.class_)
    return UpsertPlan(
        statement,
        [dict(given[index]) for index in order],
        order,
        keys,
        target,
        model,
        {"populate_existing": True, "insertmanyvalues_page_size": size},
    )


def _single_table(mapper: Mapper[Any]) -> Table:
    model = mapper.class_.__name__
    if mapper.version_id_col is not None:
        # ON CONFLICT's UPDATE would neither check nor bump the version: it would undo the
        # optimistic locking the model asks for.
        raise ConfigurationError(
            f"upsert_many() cannot keep {model}'s version_id_col: ON CONFLICT ... DO UPDATE "
            "neither checks nor increments it. Load the objects (by_ids) and change them, so "
            "each UPDATE checks the version"
        )
    tables = mapper.tables
    table: object = mapper.local_table
    if len(tables) != 1 or not is_a(table, Table):  # a join, a select
        raise ConfigurationError(
            f"upsert_many() inserts into one table, and {model} is mapped to "
            f"{len(tables)} ({', '.join(t.name for t in tables)}); upsert into each table's own "
            "model, or insert the objects with add_all()"
        )
    return cast("Table", table)


def _dialect_insert(dialect: Dialect, model: str) -> Any:
    if dialect.name == "postgresql":
        return postgresql.insert
    if dialect.name == "sqlite":
        if sqlite3.sqlite_version_info < _SQLITE_RETURNING:
            raise ConfigurationError(
                f"upsert_many() needs SQLite {'.'.join(map(str, _SQLITE_RETURNING))} or later "
                f"for INSERT ... RETURNING; this Python has SQLite {sqlite3.sqlite_version}"
            )
        return sqlite_dialect.insert
    raise ConfigurationError(
        f"upsert_many() uses INSERT ... ON CONFLICT, which ormkit builds for PostgreSQL and "
        f"SQLite; {model}'s session is bound to {dialect.name}"
    )


def _check_rows(rows: object, method: str) -> list[Mapping[str, object]]:
    if isinstance(rows, Mapping):
        raise InvalidArgumentError(
            f"{method}() takes a list of rows (mappings of attribute names to values), got one "
            "mapping; wrap it in a list, or use upsert() for one row"
        )
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise InvalidArgumentError(
            f"{method}() takes a list of rows such as [{{'sku': 'A1', 'stock': 3}}], got "
            f"{describe(rows)}"
        )
    given = list(cast("Iterable[object]", rows))
    for index, row in enumerate(given):
        if not is_a(row, Mapping) or not cast("Mapping[object, object]", row):
            raise InvalidArgumentError(
                f"{method}() takes rows as non-empty mappings of attribute names to values, "
                f"such as {{'sku': 'A1', 'stock': 3}}; row {index} is {describe(row)}"
            )
    return cast("list[Mapping[str, object]]", given)


def _column_attributes(mapper: Mapper[Any], table: Table) -> dict[str, Column[Any]]:
    """The model's attributes that are one column of its table, by attribute name."""
    found: dict[str, Column[Any]] = {}
    for prop in mapper.column_attrs:
        column = prop.columns[0] if len(prop.columns) == 1 else None
        if isinstance(column, Column) and column.table is table:
            found[prop.key] = column
    return found


def _row_names(
    rows: list[Mapping[str, object]], columns: dict[str, Column[Any]], model: str, method: str
) -> tuple[str, ...]:
    if not rows:
        return ()
    first = rows[0]
    for key in cast("Iterable[object]", first):  # the caller's keys may be of any type
        if not isinstance(key, str) or key not in columns:
            raise InvalidArgumentError(
                f"{method}() rows name {model}'s column attributes as strings; "
                f"{describe(key)} is not one. {model} has {', '.join(sorted(columns))}"
            )
    names = tuple(first)
    expected = set(names)
    for index, row in enumerate(rows[1:], start=1):
        if set(row) != expected:
            # One INSERT ... VALUES list has one set of columns for every row.
            raise InvalidArgumentError(
                f"{method}() takes rows that all give the same attributes; row 0 gives "
                f"{sorted(expected)}, row {index} gives {sorted(map(str, row))}. Upsert rows of "
                "different shapes in separate calls"
            )
    return names


def _attribute_names(
    mapper: Mapper[Any], value: object, columns: dict[str, Column[Any]], what: str
) -> tuple[str, ...]:
    """`on`/`update` as attribute names: given as strings or as the model's attributes."""
    if isinstance(value, (str, bytes, QueryableAttribute)):
        items: list[object] = [value]  # one name, not its letters
    elif isinstance(value, Iterable):
        items = list(cast("Iterable[object]", value))
    else:
        raise InvalidArgumentError(
            f"{what} takes attribute names such as ('sku',) or [Product.sku], got {describe(value)}"
        )
    names: list[str] = []
    for item in items:
        attribute = cast("QueryableAttribute[Any]", item)
        is_attribute = isinstance(item, QueryableAttribute)
        name: object = attribute.key if is_attribute else item
        prop: object = attribute.property if is_attribute else None
        owner: object = attribute.class_ if is_attribute else mapper.class_
        if (
            not isinstance(name, str)
            or name not in columns
            or (prop is not None and not isinstance(prop, ColumnProperty))
            or not (isinstance(owner, type) and issubclass(mapper.class_, owner))
        ):
            raise InvalidArgumentError(
                f"{what} names column attributes of {mapper.class_.__name__}, got "
                f"{describe(item)}; it has {', '.join(sorted(columns))}"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _unique_keys(table: Table) -> list[frozenset[str]]:
    """Column-name sets that ON CONFLICT can name.

    The primary key, unique constraints (neither DEFERRABLE), and unique indexes over plain
    columns with no WHERE (a partial index would need its predicate repeated in the statement).
    """
    # A DEFERRABLE constraint cannot be an arbiter: PostgreSQL refuses it in ON CONFLICT.
    keys = [
        frozenset(column.name for column in constraint.columns)
        for constraint in table.constraints
        if isinstance(constraint, (PrimaryKeyConstraint, UniqueConstraint))
        and constraint.columns
        and not constraint.deferrable
    ]
    keys.extend(
        frozenset(column.name for column in index.columns)
        for index in table.indexes
        if _is_plain_unique(index)
    )
    return keys


def _is_plain_unique(index: Index) -> bool:
    if not index.unique or not all(isinstance(e, Column) for e in index.expressions):
        return False  # not unique, or over an expression such as lower(email)
    return all(
        index.dialect_options[name].get("where") is None for name in ("postgresql", "sqlite")
    )


def _conflict_target(
    mapper: Mapper[Any], table: Table, on: object, columns: dict[str, Column[Any]]
) -> tuple[str, ...]:
    model = mapper.class_.__name__
    by_column = {column.name: name for name, column in columns.items()}
    keys = _unique_keys(table)
    if on is None:
        return tuple(by_column[column.name] for column in table.primary_key.columns)
    target = _attribute_names(mapper, on, columns, "upsert_many(on=...)")
    if not target:
        raise InvalidArgumentError(
            "upsert_many(on=...) takes at least one attribute; leave it out for the primary key"
        )
    if frozenset(columns[name].name for name in target) not in keys:
        choices = "; ".join(
            f"({', '.join(by_column.get(c, c) for c in sorted(key))})" for key in keys
        )
        raise InvalidArgumentError(
            f"upsert_many(on={list(target)}) needs a primary key, unique constraint or unique "
            f"index of {model}'s table on exactly those columns, and there is none; its unique "
            f"keys are {choices}. Add a UniqueConstraint (and its migration), or pick one of those"
        )
    return target


def _updated(
    mapper: Mapper[Any],
    update: object,
    names: tuple[str, ...],
    target: tuple[str, ...],
    columns: dict[str, Column[Any]],
) -> tuple[str, ...]:
    model = mapper.class_.__name__
    # Never the discriminator of an inheritance hierarchy: an update would change the row's class.
    discriminator: object = mapper.polymorphic_on
    if update is None:
        # Nor the primary key, when the conflict is on another unique key: the row keeps its
        # identity (and the rows that refer to it), and the loaded object stays its object.
        kept = {columns[name] for name in columns if columns[name].primary_key}
        return tuple(
            name
            for name in names
            if name not in target
            and columns[name] not in kept
            and columns[name] is not discriminator
        )
    chosen = _attribute_names(mapper, update, columns, "upsert_many(update=...)")
    classed = [name for name in chosen if columns[name] is discriminator]
    if classed:
        raise InvalidArgumentError(
            f"upsert_many(update=...) names {classed[0]}, the column that says which class of "
            f"{model}'s hierarchy a row is: an update would change the row's class; leave it out"
        )
    missing = [name for name in chosen if name not in names]
    if missing and names:
        # SET col = excluded.col would write the INSERT's default, not anything the caller gave.
        raise InvalidArgumentError(
            f"upsert_many(update=...) names {missing}, which the rows do not give; give "
            f"{model}'s new values for them in every row, or leave them out of update"
        )
    return chosen


def _keys(
    rows: list[Mapping[str, object]],
    target: tuple[str, ...],
    columns: dict[str, Column[Any]],
    model: str,
    dialect: Dialect,
) -> list[tuple[object, ...]]:
    kinds = tuple(python_type(columns[name]) for name in target)
    ranges: list[tuple[str, tuple[int, int]]] = []
    for name in target:
        limits = integer_range(columns[name].type, dialect)
        if limits is not None:
            ranges.append((name, limits))
    keys: list[tuple[object, ...]] = []
    seen: dict[tuple[object, ...], int] = {}
    for index, row in enumerate(rows):
        key = tuple(map(row.get, target))
        if tuple(map(type, key)) == kinds:
            pass  # the usual row: every key value of its column's exact type
        elif None in key:
            # NULLs never conflict: such a row would always be inserted, never upserted.
            absent = [name for name, value in zip(target, key, strict=True) if value is None]
            raise InvalidArgumentError(
                f"upsert_many() needs the conflict key {list(target)} in every row, and row "
                f"{index} gives no value (or None) for {absent}; give {model}'s key, or insert "
                "new rows with add_all()"
            )
        else:
            for name, value, kind in zip(target, key, kinds, strict=True):
                # A key in another form ("7" for 7, a str for a UUID) is the same key to the
                # database, but not to the duplicate check below, nor to the objects returned.
                if kind is not None and not fits_key(value, kind):
                    raise InvalidArgumentError(
                        f"upsert_many() row {index} gives {model}.{name} as {describe(value)}, "
                        f"and that column takes {kind.__name__} values; give the key as the "
                        "column's type"
                    )
        for name, (low, high) in ranges:
            value = cast("int", row[name])
            if not low <= value <= high:
                # Sent, PostgreSQL would refuse it ("integer out of range") and abort the
                # transaction; SQLite's driver raises OverflowError past 64 bits.
                raise InvalidArgumentError(
                    f"upsert_many() row {index} gives {model}.{name} as {value}, and that column "
                    f"holds integers from {low} to {high} on {dialect.name}"
                )
        try:
            earlier = seen.setdefault(key, index)
        except TypeError:
            raise InvalidArgumentError(
                f"upsert_many() row {index} has an unhashable conflict key {key!r}; "
                "key values are single values such as ints, strings or UUIDs"
            ) from None
        if earlier != index:
            # PostgreSQL: "ON CONFLICT DO UPDATE command cannot affect row a second time".
            raise InvalidArgumentError(
                f"upsert_many() rows {earlier} and {index} have the same key {key!r} for "
                f"{list(target)}; one statement can write a row once, so merge them first"
            )
        keys.append(key)
    return keys


def _called(function: Callable[[object], object]) -> Callable[[], object]:
    return lambda: function(None)


def _with_identity(
    mapper: Mapper[Any], rows: list[Mapping[str, object]], method: str
) -> tuple[list[Mapping[str, object]], ColumnElement[bool] | None]:
    """Rows of a single-table subclass with its discriminator, and the condition of its rows.

    `Manager(...)` gets `kind = "manager"` from the ORM; a row of upsert_many must get it
    too, and its conflict must only update a row that is a Manager's.
    """
    discriminator: object = mapper.polymorphic_on
    identity: object = mapper.polymorphic_identity
    if not is_a(discriminator, Column) or identity is None:
        return rows, None
    column = cast("Column[Any]", discriminator)
    name = mapper.get_property_by_column(column).key
    for index, row in enumerate(rows):
        if name in row and row[name] != identity:
            raise InvalidArgumentError(
                f"{method}() row {index} gives {name}={row[name]!r}, and rows of "
                f"{mapper.class_.__name__} have {name}={identity!r}; upsert other classes "
                "with their own repositories"
            )
    given: list[Mapping[str, object]] = [{**row, name: identity} for row in rows]
    # The base class's repository covers its subclasses' rows; a subclass's only its own.
    return given, (column == identity) if mapper.inherits is not None else None


def _on_update_defaults(
    table: Table, names: tuple[str, ...], set_: dict[Any, Any]
) -> dict[Any, Any]:
    """`onupdate=` values of columns the rows do not give: ON CONFLICT's UPDATE skips them."""
    given = {column.key for column in set_} | set(names)
    extra: dict[Any, Any] = {}
    for column in table.columns:
        default = column.onupdate
        if default is None or column.key in given or column.name in given:
            continue
        if getattr(default, "is_scalar", False) or getattr(default, "is_clause_element", False):
            extra[column] = getattr(default, "arg", None)
        elif getattr(default, "is_callable", False):
            # Called when the statement runs, once for the statement (a flush calls it once
            # per row): SQLAlchemy wraps a callable taking no context in one that takes it.
            function: Callable[[object], object] = cast("Any", default).arg
            if getattr(function, "__wrapped__", None) is None:
                raise ConfigurationError(
                    f"upsert_many() cannot apply {table.name}.{column.name}'s onupdate=: it "
                    "takes SQLAlchemy's execution context, which an ON CONFLICT update has no "
                    "row of; give the column's value in the rows, or use a callable of no "
                    "arguments"
                )
            extra[column] = bindparam(None, callable_=_called(function), type_=column.type)
    return extra
