"""The I/O-free half of `upsert_many`: checking the rows and building the statements.

One `INSERT ... ON CONFLICT (target) DO UPDATE SET ... RETURNING` per chunk, from SQLAlchemy's
dialect inserts, so there is no window between a SELECT and an INSERT for another writer to
fill. Everything is checked here before any SQL is sent; the twins in `_repository.py` only
execute the statements and put the returned objects back in the order the rows were given.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Column, Index, Table, UniqueConstraint
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import ColumnProperty, Mapper, QueryableAttribute
from sqlalchemy.orm.attributes import instance_state

from ormkit._checks import MAX_PARAMETERS, describe, is_a
from ormkit.errors import ConfigurationError, InvalidArgumentError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.expression import Executable

__all__ = ["UpsertPlan", "plan_upsert"]

# RETURNING came to SQLite in 3.35; ON CONFLICT ... DO UPDATE in 3.24.
_SQLITE_RETURNING = (3, 35)


@dataclass(frozen=True)
class UpsertPlan:
    """The statements of one `upsert_many` call and how to put their rows back in order."""

    statements: list[Executable]
    chunks: list[list[int]]  # per statement, the indexes (into the rows given) it sends, in order
    keys: list[tuple[object, ...]]  # per row given, its conflict key
    on: tuple[str, ...]  # the conflict target's attribute names

    def in_order(self, returned: list[list[object]]) -> list[Any]:
        """The objects returned per statement, one per row given, in the order given."""
        by_key: dict[tuple[object, ...], object] = {}
        for objects in returned:
            for obj in objects:
                loaded = instance_state(obj).dict
                by_key[tuple(loaded.get(name) for name in self.on)] = obj
        if all(key in by_key for key in self.keys):
            return [by_key[key] for key in self.keys]
        # A key the database gave back in another form than it was given (a str for a UUID
        # column, a naive datetime for a timestamptz): fall back to the order of RETURNING,
        # which is the order of VALUES on both PostgreSQL and SQLite.
        ordered: list[object] = [None] * len(self.keys)
        for indexes, objects in zip(self.chunks, returned, strict=True):
            for index, obj in zip(indexes, objects, strict=True):
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
    """Check an `upsert_many` call and build its statements; no I/O, no SQL sent."""
    model = mapper.class_.__name__
    table = _single_table(mapper)
    insert = _dialect_insert(dialect, model)
    given = _check_rows(rows, method)
    columns = _column_attributes(mapper, table)
    names = _row_names(given, columns, model, method)
    target = _conflict_target(table, on, columns, model)
    updated = _updated(update, names, target, columns, model)
    keys = _keys(given, target, model)

    # Rows go out in conflict-key order, so concurrent upserts of overlapping keys take their
    # row locks in one order and cannot deadlock each other (a shuffled order can, on PostgreSQL).
    order = list(range(len(given)))
    with suppress(TypeError):  # keys that do not compare (mixed types): the order given
        order.sort(key=lambda index: cast("Any", keys[index]))
    size = chunk_size or max(1, MAX_PARAMETERS // max(1, len(table.columns)))
    chunks = [order[start : start + size] for start in range(0, len(order), size)]

    target_columns = [columns[name] for name in target]
    statements: list[Executable] = []
    for chunk in chunks:
        statement = insert(mapper.class_).values([dict(given[index]) for index in chunk])
        set_: dict[Any, Any]
        if updated:
            excluded = statement.excluded
            set_ = {columns[name]: excluded[columns[name].name] for name in updated}
            set_.update(_on_update_defaults(table, names, set_))
        else:
            # DO NOTHING would return no row for a key that exists: set a key column to its own
            # value instead, which changes nothing and still returns (and locks) the row.
            set_ = {target_columns[0]: target_columns[0]}
        statements.append(
            statement.on_conflict_do_update(index_elements=target_columns, set_=set_).returning(
                mapper.class_
            )
        )
    return UpsertPlan(statements, chunks, keys, target)


def _single_table(mapper: Mapper[Any]) -> Table:
    model = mapper.class_.__name__
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


def _attribute_names(value: object, columns: dict[str, Column[Any]], what: str) -> tuple[str, ...]:
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
        if (
            not isinstance(name, str)
            or name not in columns
            or (prop is not None and not isinstance(prop, ColumnProperty))
        ):
            raise InvalidArgumentError(
                f"{what} names column attributes of the model, got {describe(item)}; "
                f"it has {', '.join(sorted(columns))}"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _unique_keys(table: Table) -> list[frozenset[str]]:
    """Column-name sets that ON CONFLICT can name.

    The primary key, unique constraints, and unique indexes over plain columns with no WHERE (a
    partial index would need its predicate repeated in the statement).
    """
    keys = [frozenset(column.name for column in table.primary_key.columns)]
    keys.extend(
        frozenset(column.name for column in constraint.columns)
        for constraint in table.constraints
        if isinstance(constraint, UniqueConstraint) and constraint.columns
    )
    keys.extend(
        frozenset(column.name for column in index.columns)
        for index in table.indexes
        if _is_plain_unique(index)
    )
    return keys


def _is_plain_unique(index: Index) -> bool:
    if not index.unique or len(index.expressions) != len(index.columns):
        return False  # not unique, or over an expression such as lower(email)
    return all(
        index.dialect_options[name].get("where") is None for name in ("postgresql", "sqlite")
    )


def _conflict_target(
    table: Table,
    on: object,
    columns: dict[str, Column[Any]],
    model: str,
) -> tuple[str, ...]:
    by_column = {column.name: name for name, column in columns.items()}
    keys = _unique_keys(table)
    if on is None:
        return tuple(by_column[column.name] for column in table.primary_key.columns)
    target = _attribute_names(on, columns, "upsert_many(on=...)")
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
    update: object,
    names: tuple[str, ...],
    target: tuple[str, ...],
    columns: dict[str, Column[Any]],
    model: str,
) -> tuple[str, ...]:
    if update is None:
        return tuple(name for name in names if name not in target)
    chosen = _attribute_names(update, columns, "upsert_many(update=...)")
    missing = [name for name in chosen if name not in names]
    if missing and names:
        # SET col = excluded.col would write the INSERT's default, not anything the caller gave.
        raise InvalidArgumentError(
            f"upsert_many(update=...) names {missing}, which the rows do not give; give "
            f"{model}'s new values for them in every row, or leave them out of update"
        )
    return chosen


def _keys(
    rows: list[Mapping[str, object]], target: tuple[str, ...], model: str
) -> list[tuple[object, ...]]:
    keys: list[tuple[object, ...]] = []
    seen: dict[tuple[object, ...], int] = {}
    for index, row in enumerate(rows):
        absent = [name for name in target if row.get(name) is None]
        if absent:
            # NULLs never conflict: such a row would always be inserted, never upserted.
            raise InvalidArgumentError(
                f"upsert_many() needs the conflict key {list(target)} in every row, and row "
                f"{index} gives no value (or None) for {absent}; give {model}'s key, or insert "
                "new rows with add_all()"
            )
        key = tuple(row[name] for name in target)
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
    return extra
