"""`Repository` and `AsyncRepository`: typed data access that uses the identity map.

```python
class UserRepository(Repository[User, int]):     # the model is taken from the generic argument
    def by_email(self, email: str) -> User | None:
        return self.find_one(User.email == email)
```

Everything that does no I/O (model inference, key checks, statement building) lives once in
`_RepositoryBase`; the two classes below are thin twins with the same method names, each method
a few lines over the same-named SQLAlchemy call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    TypeAlias,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
)

from sqlalchemy import (
    Column,
    ColumnElement,
    CursorResult,
    delete,
    exists,
    func,
    inspect,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper, QueryableAttribute, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.base import ExecutableOption
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.types import TypeEngine
from typing_extensions import get_original_bases

from ormkit._checks import (
    MAX_PARAMETERS,
    a_noun,
    as_list,
    describe,
    fits_key,
    integer_range,
    is_a,
    python_type,
)
from ormkit._pages import Page, PageQuery, plan_page
from ormkit._replicas import check_writable
from ormkit._upsert import UpsertPlan, plan_upsert
from ormkit.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    MultipleResultsError,
    NotFoundError,
)

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.orm.interfaces import ORMOption
    from sqlalchemy.sql.expression import Executable

__all__ = ["AsyncRepository", "Page", "Repository", "SynchronizeSession"]

ModelT = TypeVar("ModelT")
PKT = TypeVar("PKT")
SessionT = TypeVar("SessionT", Session, AsyncSession)

SynchronizeSession: TypeAlias = Literal["auto", "evaluate", "fetch", False]
"""How a bulk UPDATE/DELETE keeps already-loaded objects in step (see `update_where`)."""

Criterion: TypeAlias = Union["ColumnElement[bool]", "QueryableAttribute[bool]"]
"""A WHERE criterion: `User.name == "roach"`, `User.active`, `sqlalchemy.true()`."""

OrderBy: TypeAlias = Union["ColumnElement[Any]", "QueryableAttribute[Any]"]
"""An ORDER BY term: `User.name`, `User.id.desc()`."""

Attributes: TypeAlias = Union[
    str, "QueryableAttribute[Any]", Iterable[Union[str, "QueryableAttribute[Any]"]]
]
"""Attributes of the model by name or as attributes: `"sku"`, `Product.sku`, `("a", "b")`."""

_SYNCHRONIZE_VALUES = ("auto", "evaluate", "fetch", False)

# Composite keys: PostgreSQL expands `(a, b) IN ((..), ..)` into a chain of ORs and runs out of
# stack ("stack depth limit exceeded") somewhere between 4,000 and 8,000 tuples.
_MAX_COMPOSITE_KEYS = 1_000


@dataclass(frozen=True)
class _KeyShape:
    """What a model's primary key looks like: its columns and their Python types."""

    model_name: str
    mapper: Mapper[Any]
    names: tuple[str, ...]
    types: tuple[type | None, ...]  # None: the column type does not say
    exact: type | None  # a single-column key of exactly this type needs no further check

    @property
    def composite(self) -> bool:
        return len(self.names) > 1

    def describe(self) -> str:
        parts = [
            f"{name}: {kind.__name__ if kind is not None else 'any'}"
            for name, kind in zip(self.names, self.types, strict=True)
        ]
        if self.composite:
            return (
                f"a tuple of {len(self.names)} values in primary-key column order "
                f"({', '.join(parts)})"
            )
        return f"one value ({parts[0]})"


@cache
def _key_shape(model: type) -> _KeyShape:
    mapper: Mapper[Any] = inspect(model)
    columns: tuple[ColumnElement[Any], ...] = mapper.primary_key
    types = tuple(python_type(c) for c in columns)
    return _KeyShape(
        model.__name__,
        mapper,
        tuple(mapper.get_property_by_column(c).key for c in columns),
        types,
        exact=types[0] if len(types) == 1 else None,
    )


# Keyed by the dialect's name, not the dialect: a cache must not keep every engine's alive.
_integer_bounds: dict[tuple[Mapper[Any], str], tuple[tuple[int, int] | None, ...]] = {}


def _bounds_of(mapper: Mapper[Any], dialect: Dialect) -> tuple[tuple[int, int] | None, ...]:
    """Per primary-key column, the integers `dialect` stores in it; None: no known limit."""
    cached = _integer_bounds.get((mapper, dialect.name))
    if cached is not None:
        return cached
    bounds = [integer_range(column.type, dialect) for column in mapper.primary_key]
    result = _integer_bounds[mapper, dialect.name] = tuple(bounds)
    return result


class _RepositoryBase(Generic[ModelT, PKT, SessionT]):
    """The I/O-free half of both repositories: model, keys, statements, checks."""

    model: type[ModelT]
    """The mapped class this repository serves; taken from the generic argument."""

    key_chunk_size: int | None = None
    """At most this many keys per `by_ids` query; `None`: below the driver's limit."""

    upsert_chunk_size: int | None = None
    """At most this many rows per `upsert_many` statement; `None`: below the driver's limit."""

    # Which type parameter of this class holds the model, for subclasses that stay generic
    # (`class BaseRepo(Repository[M, int])`, then `class UserRepo(BaseRepo[User])`).
    _model_parameter: int | None = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("key_chunk_size", "upsert_chunk_size"):
            if name in vars(cls):
                _check_chunk_size(cls, name)
        if "model" in vars(cls):
            return
        argument = cls._model_argument()
        if isinstance(argument, TypeVar):
            parameters: tuple[object, ...] = getattr(cls, "__parameters__", ())
            cls._model_parameter = parameters.index(argument) if argument in parameters else None
        elif isinstance(argument, type):
            cls.model = cast("type[ModelT]", argument)

    _session_type: type[Session | AsyncSession]
    _factory: str  # the ormkit factory that makes the sessions this flavour takes
    _twin: tuple[str, type[Session | AsyncSession]]  # the other flavour and its session

    @classmethod
    def _model_argument(cls) -> object:
        """What `cls` passes for the model parameter of the repository it subclasses."""
        for base in get_original_bases(cls):
            origin: object = get_origin(base)
            index: int | None = getattr(origin, "_model_parameter", None)
            if not (isinstance(origin, type) and issubclass(origin, _RepositoryBase)):
                continue
            arguments = get_args(base)
            if index is not None and index < len(arguments):
                return arguments[index]
        return None

    def __init__(self, session: SessionT) -> None:
        self._check_session(session)
        self.session: SessionT = session
        """The session this repository works in (a unit of work's: `uow.repository(...)`)."""
        self._shape = self._check_model()
        # The integers the key columns hold in the session's database, known at the first key.
        self._bounds: tuple[tuple[int, int] | None, ...] | None = None
        self._dialect_name = "this database"

    def add(self, obj: ModelT) -> ModelT:
        """Add `obj` to the session; returns it. It is INSERTed at the next flush."""
        self._check_instance(obj, "add")
        self.session.add(obj)
        return obj

    def add_all(self, objs: Iterable[ModelT]) -> list[ModelT]:
        """Add several objects; returns them as a list."""
        given = as_list(objs)
        if given is None:
            raise InvalidArgumentError(
                f"{type(self).__name__}.add_all() takes an iterable of "
                f"{self._shape.model_name} objects, such as a list, got {describe(objs)}"
            )
        added = cast("list[ModelT]", given)
        for obj in added:
            self._check_instance(obj, "add_all")
        self.session.add_all(added)
        return added

    # --- checks -------------------------------------------------------------------------------

    def _check_session(self, session: object) -> None:
        if isinstance(session, self._session_type):
            return
        twin, twin_session = self._twin
        hint = (
            f"use {twin} for {a_noun(twin_session.__name__)}, or "
            if isinstance(session, twin_session)
            else ""
        )
        raise InvalidArgumentError(
            f"{type(self).__name__} takes {a_noun(self._session_type.__name__)}, got "
            f"{describe(session)}; {hint}open one with a factory from "
            f"ormkit.{self._factory}()"
        )

    def _check_model(self) -> _KeyShape:
        name = type(self).__name__
        flavour = "AsyncRepository" if self._session_type is AsyncSession else "Repository"
        model: object = getattr(type(self), "model", None)
        if model is None and name == flavour:
            raise ConfigurationError(
                f"{name} is not used directly: subclass it with the model as generic argument "
                f"(class UserRepository({flavour}[User, int])) and use the subclass"
            )
        if model is None:
            raise ConfigurationError(
                f"{name} has no model: subclass it with the model as generic argument "
                f"(class {name}({flavour}[User, int])) or set `model = User` in its body"
            )
        mapper: object = inspect(model, raiseerr=False) if isinstance(model, type) else None
        if not isinstance(mapper, Mapper) or not isinstance(model, type):
            raise ConfigurationError(
                f"{name}.model is {model!r}, which is not a mapped class; "
                "use a class mapped with SQLAlchemy's declarative base or registry"
            )
        return _key_shape(model)

    def _key(self, pk: object) -> object:
        """`pk` checked against the model's primary key, in the form `Session.get` takes."""
        if type(pk) is self._shape.exact:
            # The hot path of every by_id (an int for an int key): one type and one range check,
            # so an identity-map hit stays close to a bare Session.get (benchmarks, scenario 1).
            limit = (self._bounds or self._find_bounds())[0]
            if limit is None or limit[0] <= cast("int", pk) <= limit[1]:
                return pk
        return self._checked_key(pk)

    def _checked_key(self, pk: object) -> object:
        """`_key` for every key off its hot path: composite, of another type, or out of range."""
        shape = self._shape
        bounds = self._bounds or self._find_bounds()
        values: tuple[object, ...] = (pk,)
        if type(pk) is not shape.exact:
            given = _as_tuple(pk) if shape.composite else values
            if (
                given is None
                or len(given) != len(shape.types)
                or not all(fits_key(v, kind) for v, kind in zip(given, shape.types, strict=True))
            ):
                raise InvalidKeyError(
                    f"bad primary key for {shape.model_name}: got {pk!r}; "
                    f"{shape.model_name}'s primary key takes {shape.describe()}"
                )
            values = given
        for value, limit, name in zip(values, bounds, shape.names, strict=True):
            if limit is not None and isinstance(value, int) and not limit[0] <= value <= limit[1]:
                raise InvalidKeyError(
                    f"bad primary key for {shape.model_name}: got {pk!r}; "
                    f"{shape.model_name}.{name} takes an integer from {limit[0]} to {limit[1]} "
                    f"on {self._dialect_name}, so no row has this key"
                )
        return pk

    def _find_bounds(self) -> tuple[tuple[int, int] | None, ...]:
        try:
            bind = _sync_session(self.session).get_bind(self._shape.mapper)
        except UnboundExecutionError:
            bounds: tuple[tuple[int, int] | None, ...] = (None,) * len(self._shape.names)
        else:  # no I/O: the session's engine (or connection) and its dialect
            self._dialect_name = bind.dialect.name
            bounds = _bounds_of(self._shape.mapper, bind.dialect)
        self._bounds = bounds
        return bounds

    def _identity(self, key: object) -> tuple[object, ...]:
        return cast("tuple[object, ...]", key) if self._shape.composite else (key,)

    @staticmethod
    def _check_criteria(criteria: tuple[object, ...], method: str) -> None:
        for criterion in criteria:
            if not _is_sql(criterion):
                if isinstance(criterion, bool):
                    hint = (
                        "a Python bool here usually means two Python values were compared "
                        "instead of a column and a value"
                    )
                elif isinstance(criterion, str):
                    hint = "wrap SQL text in sqlalchemy.text(), or compare a column with a value"
                else:
                    hint = "compare a column with a value, or pass sqlalchemy.true() for every row"
                raise InvalidArgumentError(
                    f"{method}() takes SQL criteria such as `User.name == 'roach'`, got "
                    f"{describe(criterion)}; {hint}"
                )
            kind = _sql_python_type(criterion)
            if kind is not None and kind is not bool:
                # SQLite would filter on the value's truthiness; PostgreSQL refuses it with
                # "argument of WHERE must be type boolean", after sending it.
                raise InvalidArgumentError(
                    f"{method}() takes true-or-false SQL criteria such as "
                    f"`User.name == 'roach'`, got {criterion} (a {kind.__name__} expression); "
                    "compare it with a value"
                )

    def _check_bulk(
        self, criteria: tuple[object, ...], synchronize_session: object, method: str
    ) -> None:
        check_writable(self.session, f"{method}() is refused")
        if not criteria:
            raise InvalidArgumentError(
                f"{method}() without criteria would touch every row of "
                f"{self._shape.model_name}; pass sqlalchemy.true() to mean that"
            )
        self._check_criteria(criteria, method)
        # `is False` and a str check, not `in`: 0 == False would slip through `in`.
        if not (
            synchronize_session is False
            or (isinstance(synchronize_session, str) and synchronize_session in _SYNCHRONIZE_VALUES)
        ):
            raise InvalidArgumentError(
                f"synchronize_session must be one of 'auto', 'evaluate', 'fetch' or False, "
                f"got {synchronize_session!r}"
            )

    def _check_instance(self, obj: object, method: str) -> None:
        if not isinstance(obj, self.model):
            name = self._shape.model_name
            got = f"the class {obj.__name__}" if isinstance(obj, type) else type(obj).__name__
            raise InvalidArgumentError(
                f"{type(self).__name__}.{method}() takes {name} objects, got {got}; "
                f"pass instances such as {name}(...)"
            )

    # --- statements ---------------------------------------------------------------------------

    def _select(
        self,
        criteria: tuple[Criterion, ...],
        method: str,
        *,
        order_by: Iterable[OrderBy] | OrderBy = (),
        limit: int | None = None,
        offset: int | None = None,
        options: Sequence[ORMOption] = (),
    ) -> Executable:
        self._check_criteria(criteria, method)
        _check_count_argument("limit", limit)
        _check_count_argument("offset", offset)
        terms = _order_by_terms(order_by)
        statement = select(self.model).where(*criteria).order_by(*terms)
        statement = statement.options(*_loader_options(options))
        if limit is not None:
            statement = statement.limit(limit)
        if offset is not None:
            statement = statement.offset(offset)
        return statement

    def _count_statement(self, criteria: tuple[Criterion, ...]) -> Executable:
        self._check_criteria(criteria, "count")
        return select(func.count()).select_from(self.model).where(*criteria)

    def _exists_statement(self, criteria: tuple[Criterion, ...]) -> Executable:
        self._check_criteria(criteria, "exists")
        # EXISTS stops at the first row; a count would read them all.
        return select(exists(select(self.model).where(*criteria)))

    def _update_statement(
        self, values: Mapping[Any, Any], criteria: tuple[Criterion, ...], sync: object
    ) -> Any:
        self._check_bulk(criteria, sync, "update_where")
        if not _is_non_empty_mapping(values):
            raise InvalidArgumentError(
                f"update_where() takes the new values as a non-empty mapping such as "
                f"{{'name': 'roach'}}, got {values!r}"
            )
        for key in values:
            self._check_update_key(key)
        return (
            update(self.model)
            .where(*criteria)
            .values(dict(values))
            .execution_options(synchronize_session=sync)
        )

    def _check_update_key(self, key: object) -> None:
        """A key of update_where's values: a name, attribute or column of this model."""
        mapper, model_name = self._shape.mapper, self._shape.model_name
        names = ", ".join(sorted(mapper.attrs.keys()))
        if isinstance(key, str):
            # all_orm_descriptors: columns, relationships and hybrids (with an update_expression).
            if key in mapper.all_orm_descriptors:
                return
            raise InvalidArgumentError(
                f"{model_name} has no attribute {key!r} to update; it has {names}"
            )
        if isinstance(key, QueryableAttribute):
            owner: object = key.class_
            if isinstance(owner, type) and issubclass(self.model, owner):
                return
            what = f"{key} (an attribute of {getattr(owner, '__name__', owner)})"
        elif isinstance(key, Column):
            if key.table in mapper.tables:
                return
            what = f"{key} (a column of table {key.table.name})"
        else:
            what = describe(key)
        raise InvalidArgumentError(
            f"update_where() sets attributes of {model_name}: name them as strings "
            f"({{'name': ...}}) or attributes ({{{model_name}.name: ...}}), got {what}; "
            f"{model_name} has {names}"
        )

    def _delete_statement(self, criteria: tuple[Criterion, ...], sync: object) -> Any:
        self._check_bulk(criteria, sync, "delete_where")
        return delete(self.model).where(*criteria).execution_options(synchronize_session=sync)

    # --- upsert_many and page: their checks and statements live in _upsert.py and _pages.py ---

    def _upsert_plan(self, rows: object, on: object, update: object, method: str) -> UpsertPlan:
        check_writable(self.session, f"{method}() is refused")
        if method == "upsert" and not is_a(rows, Mapping):
            raise InvalidArgumentError(
                f"upsert() takes one row as a mapping of attribute names to values, such as "
                f"{{'sku': 'A1', 'stock': 3}}, got {describe(rows)}; for several, upsert_many()"
            )
        given: object = [rows] if method == "upsert" else rows
        return plan_upsert(
            self._shape.mapper,
            given,
            on=on,
            update=update,
            dialect=_sync_session(self.session).get_bind(self._shape.mapper).dialect,
            chunk_size=_check_chunk_size(type(self), "upsert_chunk_size"),
            method=method,
        )

    def _page_query(
        self,
        criteria: tuple[Criterion, ...],
        order_by: object,
        limit: object,
        after: object,
        with_total: object,
    ) -> PageQuery[ModelT]:
        self._check_criteria(criteria, "page")
        return plan_page(
            self.model,
            self._shape.mapper,
            criteria,
            order_by=order_by,
            limit=limit,
            after=after,
            with_total=with_total,
            dialect=_sync_session(self.session).get_bind(self._shape.mapper).dialect,
        )

    # --- by_ids: the identity map first, then the misses ---------------------------------------

    def _split_loaded(
        self, pks: Iterable[PKT]
    ) -> tuple[list[tuple[object, ...]], dict[tuple[object, ...], ModelT], list[Any]]:
        """The asked identities in order (each once), those loaded and unexpired, the misses."""
        _check_key_iterable(pks)
        keys = [self._key(pk) for pk in pks]  # every key is checked before any SQL
        mapper = self._shape.mapper
        identity_map = _sync_session(self.session).identity_map
        order: dict[tuple[object, ...], Any] = {}
        for key in keys:
            order.setdefault(self._identity(key), key)
        found: dict[tuple[object, ...], ModelT] = {}
        misses: list[Any] = []
        for identity, key in order.items():
            obj = identity_map.get(mapper.identity_key_from_primary_key(identity))
            if obj is not None:
                if not isinstance(obj, self.model):
                    # Under inheritance the identity map is keyed by the base class: the row
                    # is of a sibling class, so it is known not to be one of ours (as
                    # Session.get answers None for it, without SQL).
                    continue
                state = instance_state(obj)
                # An expired object would need a load per object (and async code cannot
                # lazy-load): let the one query refresh it instead.
                if not state.expired and not state.expired_attributes:
                    found[identity] = obj
                    continue
            misses.append(key)
        return list(order), found, misses

    def _miss_statements(self, misses: list[Any]) -> list[Executable]:
        shape = self._shape
        columns = shape.mapper.primary_key
        size = _check_chunk_size(type(self), "key_chunk_size") or (
            _MAX_COMPOSITE_KEYS if shape.composite else MAX_PARAMETERS
        )
        statements: list[Executable] = []
        for start in range(0, len(misses), size):
            chunk = misses[start : start + size]
            condition = tuple_(*columns).in_(chunk) if shape.composite else columns[0].in_(chunk)
            statements.append(select(self.model).where(condition))
        return statements

    def _collect(self, found: dict[tuple[object, ...], ModelT], loaded: Iterable[ModelT]) -> None:
        for obj in loaded:
            identity = instance_state(obj).identity
            if identity is not None:
                found[identity] = obj

    def _not_found(self, pk: object) -> NotFoundError:
        return NotFoundError(f"no {self._shape.model_name} with primary key {pk!r}")

    @staticmethod
    def _one_or_none(rows: Sequence[ModelT], model_name: str) -> ModelT | None:
        if len(rows) > 1:
            raise MultipleResultsError(
                f"find_one() matched more than one {model_name}; narrow the criteria, "
                "or use find() for several rows"
            )
        return rows[0] if rows else None


def _as_tuple(value: object) -> tuple[object, ...] | None:
    return cast("tuple[object, ...]", value) if isinstance(value, tuple) else None


def _check_chunk_size(cls: type[_RepositoryBase[Any, Any, Any]], name: str) -> int | None:
    """`cls.<name>` (a chunk size), refused unless it is None or a positive int.

    Checked when the class is defined and again at use, since the attribute can be set on the
    class later: a chunk size of 0 or less would make by_ids send no query and return nothing.
    """
    size: object = getattr(cls, name)
    if size is None or (type(size) is int and size > 0):
        return size
    raise ConfigurationError(
        f"{cls.__name__}.{name} must be None (below the driver's parameter limit) or "
        f"a positive int such as 500, got {describe(size)}"
    )


def _check_count_argument(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidArgumentError(f"{name} must be an int >= 0 or None, got {value!r}")


def _check_key_iterable(pks: object) -> None:
    # A str is iterable too: by_ids("abc") would look up "a", "b" and "c".
    if isinstance(pks, (str, bytes)) or not isinstance(pks, Iterable):
        hint = "; for one key, use by_id() or wrap it in a list" if pks is not None else ""
        raise InvalidArgumentError(
            f"by_ids() takes an iterable of primary keys such as [1, 2, 3], got "
            f"{describe(pks)}{hint}"
        )


def _order_by_terms(order_by: object) -> tuple[OrderBy, ...]:
    if _is_sql(order_by):
        return (cast("OrderBy", order_by),)
    terms = (
        tuple(cast("Iterable[object]", order_by))
        if isinstance(order_by, Iterable) and not isinstance(order_by, (str, bytes))
        else (order_by,)
    )
    for term in terms:
        if not _is_sql(term):
            # A str would be iterated letter by letter, or read as a label that may not exist.
            hint = (
                f"; name the attribute (User.{term}), not a string" if isinstance(term, str) else ""
            )
            raise InvalidArgumentError(
                "order_by takes a column or a list of columns such as User.name or "
                f"[User.name, User.id.desc()], got {describe(term)}{hint}"
            )
    return cast("tuple[OrderBy, ...]", terms)


def _loader_options(options: object) -> tuple[ExecutableOption, ...]:
    given = None if isinstance(options, (str, bytes)) else as_list(options)
    wrong = (
        [options] if given is None else [o for o in given if not isinstance(o, ExecutableOption)]
    )
    if wrong:
        raise InvalidArgumentError(
            "options takes a list of loader options such as [joinedload(User.addresses)] "
            f"(or () for none), got {describe(wrong[0])}"
        )
    return tuple(cast("list[ExecutableOption]", given))


def _get_arguments(for_update: object, options: object) -> dict[str, Any]:
    """Session.get's arguments for by_id's `for_update` and `options`, both checked."""
    if not isinstance(for_update, bool):
        raise InvalidArgumentError(
            f"for_update must be True or False, got {for_update!r}; for NOWAIT or SKIP LOCKED "
            "use session.get(Model, key, with_for_update={'nowait': True})"
        )
    return {
        "options": _loader_options(options),
        "with_for_update": True if for_update else None,
        "populate_existing": for_update,
    }


def _sql_python_type(element: object) -> type | None:
    """The Python type of an SQL expression's values, or None when its SQL type is unknown."""
    unwrap: object = getattr(element, "__clause_element__", None)  # an ORM attribute
    clause: object = unwrap() if callable(unwrap) else element
    sql_type: object = getattr(clause, "type", None)
    if not isinstance(sql_type, TypeEngine):
        return None
    try:
        kind: type = sql_type.python_type
    except NotImplementedError:
        return None
    return None if kind is object else kind  # object: NullType, as text() and func.x() have


def _is_non_empty_mapping(values: object) -> bool:
    return isinstance(values, Mapping) and len(cast("Mapping[object, object]", values)) > 0


def _is_sql(value: object) -> bool:
    return isinstance(value, ClauseElement) or hasattr(value, "__clause_element__")


def _has_pending(session: Session, model: type) -> bool:
    """Whether `session` holds changes to objects of `model` not flushed yet."""
    return any(
        isinstance(obj, model)
        for group in (session.new, session.dirty, session.deleted)
        for obj in group
    )


def _sync_session(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


class Repository(_RepositoryBase[ModelT, PKT, Session]):
    """Data access for one mapped class, over a sync `Session`.

    ```python
    class UserRepository(Repository[User, int]):
        def by_email(self, email: str) -> User | None:
            return self.find_one(User.email == email)

    users = UserRepository(session)                # or uow.repository(UserRepository)
    user = users.by_id(1)                          # no SQL if user 1 is already loaded
    ```

    A repository never commits: the unit of work (or the caller) owns the transaction.
    """

    _session_type = Session
    _factory = "create_session_factory"
    _twin = ("AsyncRepository", AsyncSession)

    def by_id(
        self, pk: PKT, *, for_update: bool = False, options: Sequence[ORMOption] = ()
    ) -> ModelT | None:
        """The object with primary key `pk`, or `None`; always through `Session.get()`.

        An object already loaded (and not expired) is returned without any SQL. With
        `for_update=True`, `SELECT ... FOR UPDATE` locks the row and the object gets the row's
        current values, even if it was loaded before. A composite key is a tuple in
        primary-key column order.
        """
        if for_update is False and options == () and type(pk) is self._shape.exact:
            # The identity-map hit path, kept lean (benchmarks, scenario 1): `_key`'s own fast
            # check, inlined, as a call costs a tenth of a bare Session.get.
            limit = (self._bounds or self._find_bounds())[0]
            if limit is None or limit[0] <= cast("int", pk) <= limit[1]:
                return self.session.get(self.model, pk)
        key = self._key(pk)
        if for_update is False and options == ():
            return self.session.get(self.model, key)
        if for_update is True:
            check_writable(self.session, "by_id(for_update=True) is refused")
        return self.session.get(self.model, key, **_get_arguments(for_update, options))

    def by_id_or_raise(
        self, pk: PKT, *, for_update: bool = False, options: Sequence[ORMOption] = ()
    ) -> ModelT:
        """Like `by_id`, but raise `NotFoundError` (a `LookupError`) when there is no row."""
        obj = self.by_id(pk, for_update=for_update, options=options)
        if obj is None:
            raise self._not_found(pk)
        return obj

    def by_ids(self, pks: Iterable[PKT]) -> list[ModelT]:
        """The objects with these keys, in the order asked, each once; missing keys left out.

        Loaded objects come from the identity map; the rest (expired ones included) come from
        one `SELECT ... WHERE pk IN (...)` (more only past the driver's parameter limit). When
        every key is loaded, no SQL is sent.
        """
        order, found, misses = self._split_loaded(pks)
        for statement in self._miss_statements(misses):
            self._collect(found, self.session.scalars(statement).unique())
        return [found[identity] for identity in order if identity in found]

    def find(
        self,
        *criteria: Criterion,
        order_by: Iterable[OrderBy] | OrderBy = (),
        limit: int | None = None,
        offset: int | None = None,
        options: Sequence[ORMOption] = (),
    ) -> list[ModelT]:
        """The objects matching every criterion. Always a query: the identity map is no cache."""
        statement = self._select(
            criteria, "find", order_by=order_by, limit=limit, offset=offset, options=options
        )
        # unique(): joined eager loads of collections repeat the parent row.
        return list(self.session.scalars(statement).unique())

    def find_one(self, *criteria: Criterion) -> ModelT | None:
        """The one object matching, or `None`; `MultipleResultsError` if several match."""
        rows = list(self.session.scalars(self._select(criteria, "find_one", limit=2)).unique())
        return self._one_or_none(rows, self._shape.model_name)

    def count(self, *criteria: Criterion) -> int:
        """How many rows match."""
        return int(self.session.scalar(self._count_statement(criteria)) or 0)

    def exists(self, *criteria: Criterion) -> bool:
        """Whether any row matches (`SELECT EXISTS (...)`: stops at the first)."""
        return bool(self.session.scalar(self._exists_statement(criteria)))

    def delete(self, obj: ModelT) -> None:
        """Mark `obj` for deletion at the next flush."""
        self._check_instance(obj, "delete")
        self.session.delete(obj)

    def update_where(
        self,
        values: Mapping[Any, Any],
        *criteria: Criterion,
        synchronize_session: SynchronizeSession = "auto",
    ) -> int:
        """UPDATE every matching row with `values`; returns how many rows matched.

        `synchronize_session` says what happens to objects of this model already loaded in
        the session: `"auto"` (the default) evaluates the criteria in Python where it can and
        otherwise fetches the matched keys, so loaded objects show the new values; `"evaluate"`
        only evaluates (and fails on criteria Python cannot evaluate); `"fetch"` fetches the
        matched keys (with RETURNING where the database has it); `False` leaves loaded objects
        as they were, stale until refreshed or expired. Without criteria this refuses; pass
        `sqlalchemy.true()` to update every row.
        """
        statement = self._update_statement(values, criteria, synchronize_session)
        result = cast("CursorResult[Any]", self.session.execute(statement))
        return result.rowcount

    def delete_where(
        self, *criteria: Criterion, synchronize_session: SynchronizeSession = "auto"
    ) -> int:
        """DELETE every matching row; returns how many rows matched.

        `synchronize_session` works as in `update_where`: by default, deleted objects that
        were loaded leave the session; with `False` they stay, although their rows are gone.
        """
        statement = self._delete_statement(criteria, synchronize_session)
        result = cast("CursorResult[Any]", self.session.execute(statement))
        return result.rowcount

    def upsert_many(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        on: Attributes | None = None,
        update: Attributes | None = None,
    ) -> list[ModelT]:
        """INSERT the rows, or UPDATE those whose conflict key exists; returns their objects.

        One `INSERT ... ON CONFLICT (on) DO UPDATE SET ... RETURNING` per chunk: no SELECT
        first, so no other writer can slip in between. `on` is the conflict target (default:
        the primary key), which a primary key, unique constraint or unique index must back;
        `update` the attributes overwritten on conflict (default: every given attribute not in
        `on`, nor the primary key when `on` is another unique key; `()` leaves existing rows as
        they are). The objects are the identity map's, with the rows' current values, in the
        order the rows were given. Rows are sent in conflict-key order, so concurrent upserts
        of the same keys cannot deadlock each other.
        """
        return self._upserted(self._upsert_plan(rows, on, update, "upsert_many"))

    def upsert(
        self,
        row: Mapping[str, Any],
        *,
        on: Attributes | None = None,
        update: Attributes | None = None,
    ) -> ModelT:
        """`upsert_many` for one row: its object, inserted or updated."""
        return self._upserted(self._upsert_plan(row, on, update, "upsert"))[0]

    def _upserted(self, plan: UpsertPlan) -> list[ModelT]:
        if not plan.rows:
            return []
        if _has_pending(self.session, self.model):
            # Also with autoflush off: what the session holds of this model must be in the
            # database before the upsert looks, or the upsert would overwrite an unflushed
            # change, collide with an unflushed object, or update a row the flush then deletes.
            self.session.flush()
        returned = self.session.scalars(plan.statement, plan.rows, execution_options=plan.options)
        return cast("list[ModelT]", plan.in_order(list(returned)))

    def page(
        self,
        *criteria: Criterion,
        order_by: Iterable[OrderBy] | OrderBy,
        limit: int,
        after: str | None = None,
        with_total: bool = False,
    ) -> Page[ModelT]:
        """One page of the objects matching the criteria, in `order_by` order (keyset).

        Pass the previous page's `.next` as `after` for the next page. One query per page
        (`limit + 1` rows), and one COUNT more with `with_total=True`. The primary key is
        appended to `order_by` so the order is total; NULLs sort after every value in an
        ascending term and first in a descending one, unless the term says `.nulls_first()` or
        `.nulls_last()`.
        """
        query = self._page_query(criteria, order_by, limit, after, with_total)
        result = self.session.execute(query.statement)
        rows = (result.unique() if query.unique else result).all()
        total = None if query.count is None else int(self.session.scalar(query.count) or 0)
        return query.page(rows, total)


class AsyncRepository(_RepositoryBase[ModelT, PKT, AsyncSession]):
    """The async twin of `Repository`, over an `AsyncSession`; I/O methods are coroutines."""

    _session_type = AsyncSession
    _factory = "create_async_session_factory"
    _twin = ("Repository", Session)

    async def by_id(
        self, pk: PKT, *, for_update: bool = False, options: Sequence[ORMOption] = ()
    ) -> ModelT | None:
        """Async version of `Repository.by_id`."""
        key = self._key(pk)
        if for_update is False and options == ():
            session = self.session.sync_session
            identity = self._shape.mapper.identity_key_from_primary_key(self._identity(key))
            loaded = session.identity_map.get(identity)
            if loaded is not None and not instance_state(loaded).expired:
                # Session.get answers a loaded, unexpired object from the identity map without
                # I/O, so the sync session can answer it directly: AsyncSession.get would hop
                # into a greenlet first, several times the cost of the lookup itself.
                return session.get(self.model, key)
            return await self.session.get(self.model, key)
        if for_update is True:
            check_writable(self.session, "by_id(for_update=True) is refused")
        return await self.session.get(self.model, key, **_get_arguments(for_update, options))

    async def by_id_or_raise(
        self, pk: PKT, *, for_update: bool = False, options: Sequence[ORMOption] = ()
    ) -> ModelT:
        """Async version of `Repository.by_id_or_raise`."""
        obj = await self.by_id(pk, for_update=for_update, options=options)
        if obj is None:
            raise self._not_found(pk)
        return obj

    async def by_ids(self, pks: Iterable[PKT]) -> list[ModelT]:
        """Async version of `Repository.by_ids`."""
        order, found, misses = self._split_loaded(pks)
        for statement in self._miss_statements(misses):
            self._collect(found, (await self.session.scalars(statement)).unique())
        return [found[identity] for identity in order if identity in found]

    async def find(
        self,
        *criteria: Criterion,
        order_by: Iterable[OrderBy] | OrderBy = (),
        limit: int | None = None,
        offset: int | None = None,
        options: Sequence[ORMOption] = (),
    ) -> list[ModelT]:
        """Async version of `Repository.find`."""
        statement = self._select(
            criteria, "find", order_by=order_by, limit=limit, offset=offset, options=options
        )
        return list((await self.session.scalars(statement)).unique())

    async def find_one(self, *criteria: Criterion) -> ModelT | None:
        """Async version of `Repository.find_one`."""
        rows = list(
            (await self.session.scalars(self._select(criteria, "find_one", limit=2))).unique()
        )
        return self._one_or_none(rows, self._shape.model_name)

    async def count(self, *criteria: Criterion) -> int:
        """Async version of `Repository.count`."""
        return int(await self.session.scalar(self._count_statement(criteria)) or 0)

    async def exists(self, *criteria: Criterion) -> bool:
        """Async version of `Repository.exists`."""
        return bool(await self.session.scalar(self._exists_statement(criteria)))

    async def delete(self, obj: ModelT) -> None:
        """Async version of `Repository.delete`."""
        self._check_instance(obj, "delete")
        await self.session.delete(obj)

    async def update_where(
        self,
        values: Mapping[Any, Any],
        *criteria: Criterion,
        synchronize_session: SynchronizeSession = "auto",
    ) -> int:
        """Async version of `Repository.update_where`."""
        statement = self._update_statement(values, criteria, synchronize_session)
        result = cast("CursorResult[Any]", await self.session.execute(statement))
        return result.rowcount

    async def delete_where(
        self, *criteria: Criterion, synchronize_session: SynchronizeSession = "auto"
    ) -> int:
        """Async version of `Repository.delete_where`."""
        statement = self._delete_statement(criteria, synchronize_session)
        result = cast("CursorResult[Any]", await self.session.execute(statement))
        return result.rowcount

    async def upsert_many(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        on: Attributes | None = None,
        update: Attributes | None = None,
    ) -> list[ModelT]:
        """Async version of `Repository.upsert_many`."""
        return await self._upserted(self._upsert_plan(rows, on, update, "upsert_many"))

    async def upsert(
        self,
        row: Mapping[str, Any],
        *,
        on: Attributes | None = None,
        update: Attributes | None = None,
    ) -> ModelT:
        """Async version of `Repository.upsert`."""
        return (await self._upserted(self._upsert_plan(row, on, update, "upsert")))[0]

    async def _upserted(self, plan: UpsertPlan) -> list[ModelT]:
        if not plan.rows:
            return []
        if _has_pending(self.session.sync_session, self.model):
            await self.session.flush()  # as in Repository._upserted
        returned = await self.session.scalars(
            plan.statement, plan.rows, execution_options=plan.options
        )
        return cast("list[ModelT]", plan.in_order(list(returned)))

    async def page(
        self,
        *criteria: Criterion,
        order_by: Iterable[OrderBy] | OrderBy,
        limit: int,
        after: str | None = None,
        with_total: bool = False,
    ) -> Page[ModelT]:
        """Async version of `Repository.page`."""
        query = self._page_query(criteria, order_by, limit, after, with_total)
        result = await self.session.execute(query.statement)
        rows = (result.unique() if query.unique else result).all()
        total = None if query.count is None else int(await self.session.scalar(query.count) or 0)
        return query.page(rows, total)
