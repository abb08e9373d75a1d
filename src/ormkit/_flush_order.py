"""Foreign-key ordering for the flushes of ormkit's sessions.

SQLAlchemy's unit of work orders the INSERT/UPDATE ("save") and DELETE steps of different
mappers only along the edges `relationship()` contributes. Two classes whose tables are linked
by a `ForeignKey` alone get no edge, so a child's INSERT can run before its parent's, and a
parent's DELETE before its children's.

`order_by_foreign_keys` is a `before_flush` listener. It gives the flush a presort action that
runs after every object of the flush (cascades included) is registered and before the steps are
sorted, and adds, for each FK-linked pair of mappers present, the same edges a many-to-one
`relationship()` adds: parent saves before child saves, child saves before parent deletes,
child deletes before parent deletes. The flush stays one flush with batched statements per
table; only the order of the per-mapper steps changes.

FK cycles between tables and self-referencing rows are left to SQLAlchemy (`post_update`,
per-row processing), as are pairs `relationship()` already orders.

The flush context's step classes are internal: SQLAlchemy 2.1 renamed `SaveUpdateAll` and
`DeleteAll` to `_SaveUpdateAll` and `_DeleteAll`. Both spellings are looked up, and a flush
fails with `ConfigurationError` rather than run unordered if neither exists.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event
from sqlalchemy.exc import NoReferenceError
from sqlalchemy.orm import Mapper, unitofwork
from sqlalchemy.util import topological

from ormkit.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.orm import Session

__all__ = ["order_by_foreign_keys"]

_SAVE: Any = getattr(unitofwork, "_SaveUpdateAll", None) or getattr(
    unitofwork, "SaveUpdateAll", None
)
_DELETE: Any = getattr(unitofwork, "_DeleteAll", None) or getattr(unitofwork, "DeleteAll", None)
# A key SQLAlchemy's own presort actions, keyed by (processor, bool) tuples, never use.
_ACTION_KEY = ("ormkit.order_by_foreign_keys", object())

_Parents = dict["Mapper[Any]", tuple["Mapper[Any]", ...]]
# Graphs per set of registries, for one generation of mapper configuration: a graph built while
# new mappers were being configured is stored under the old generation, never used again.
_graphs: dict[tuple[int, frozenset[Any]], _Parents] = {}
_generation = 0


def order_by_foreign_keys(session: Session, flush_context: Any, instances: object) -> None:  # noqa: ARG001 (the before_flush signature)
    """`before_flush` listener: order this flush's steps by the tables' foreign keys."""
    actions = getattr(flush_context, "presort_actions", None)
    if _SAVE is None or _DELETE is None or not isinstance(actions, dict):
        raise ConfigurationError(
            "ormkit's foreign-key flush ordering does not recognise this SQLAlchemy's unit of "
            "work internals; ormkit supports SQLAlchemy 2.0 and 2.1"
        )
    actions[_ACTION_KEY] = _OrderAction()


class _OrderAction:
    """A presort action: add FK edges between the base mappers present in this flush.

    SQLAlchemy runs presort actions in rounds until none registers more objects; cascades can
    bring new mappers in between rounds, so each round handles the mappers not yet seen.
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: set[Mapper[Any]] = set()

    def execute(self, uow: Any) -> bool:
        present = {m.base_mapper for m, states in uow.mappers.items() if states}
        new = present - self.seen
        if not new:
            return False
        parents = _parents_of({m.registry for m in present})
        pairs = [(p, m) for m in new for p in parents.get(m, ()) if p in present]
        pairs += [(m, child) for child in present - new for m in parents.get(child, ()) if m in new]
        for parent, child in pairs:
            save_parent, save_child = _SAVE(uow, parent), _SAVE(uow, child)
            delete_parent, delete_child = _DELETE(uow, parent), _DELETE(uow, child)
            uow.dependencies.update(
                [
                    (save_parent, save_child),
                    (save_child, delete_parent),  # children re-pointed before parents go
                    (delete_child, delete_parent),
                ]
            )
        self.seen |= new
        return False  # it registers no objects itself


def _parents_of(registries: set[Any]) -> _Parents:
    """Base mapper -> the base mappers its tables reference, FK cycles left out. Cached."""
    key = (_generation, frozenset(registries))
    graph = _graphs.get(key)
    if graph is None:
        graph = _graphs[key] = _build(registries)
    return graph


def _build(registries: Iterable[Any]) -> _Parents:
    # The base mapper is the unit SQLAlchemy saves and deletes by: every table of an
    # inheritance hierarchy belongs to it.
    owners: dict[Table, set[Mapper[Any]]] = defaultdict(set)
    for registry in registries:
        for mapper in registry.mappers:
            for table in mapper.tables:
                if isinstance(table, Table):
                    owners[table].add(mapper.base_mapper)
    edges: set[tuple[Mapper[Any], Mapper[Any]]] = set()
    for table, children in owners.items():
        for foreign_key in table.foreign_keys:
            try:
                referenced = foreign_key.column.table
            except NoReferenceError:
                continue  # an FK to a table this metadata does not know: nothing to order by
            edges.update(
                (parent, child)
                for parent in owners.get(referenced, ())
                for child in children
                if parent is not child  # self-references stay SQLAlchemy's business
            )
    nodes = {node for edge in edges for node in edge}
    cyclic = topological.find_cycles(edges, nodes)
    parents: dict[Mapper[Any], list[Mapper[Any]]] = defaultdict(list)
    for parent, child in edges:
        if not (parent in cyclic and child in cyclic):
            parents[child].append(parent)
    return {child: tuple(found) for child, found in parents.items()}


@event.listens_for(Mapper, "after_configured")
def _forget_graphs() -> None:
    # New mappers (or new tables) may add foreign keys: build the graphs again on next use.
    global _generation  # noqa: PLW0603 (one counter for the whole process, like the mappers)
    _generation += 1
    _graphs.clear()
