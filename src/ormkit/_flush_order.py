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

FK cycles are left to SQLAlchemy (`post_update`, per-row processing) only within a cycle: the
FKs between tables of one strongly connected group add no edge, but an FK between two such
groups, or between a group and any other table, orders the flush as any FK does. Rows of one
self-referencing table are SQLAlchemy's business too, as are pairs `relationship()` already
orders.

The graph is built once per set of registries and cached until mappers are configured again.
The cache holds registries and mappers only through weak references, so a registry that is no
longer used is freed, with its classes, as it would be without ormkit.

The flush context's step classes are internal: SQLAlchemy 2.1 renamed `SaveUpdateAll` and
`DeleteAll` to `_SaveUpdateAll` and `_DeleteAll`. Both spellings are looked up, and a flush
fails with `ConfigurationError` rather than run unordered if neither exists.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Table, event
from sqlalchemy.exc import NoReferenceError
from sqlalchemy.orm import Mapper, unitofwork

from ormkit.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Hashable, Iterable

    from sqlalchemy.orm import Session, registry

__all__ = ["order_by_foreign_keys"]

_SAVE: Any = getattr(unitofwork, "_SaveUpdateAll", None) or getattr(
    unitofwork, "SaveUpdateAll", None
)
_DELETE: Any = getattr(unitofwork, "_DeleteAll", None) or getattr(unitofwork, "DeleteAll", None)
# A key SQLAlchemy's own presort actions, keyed by (processor, bool) tuples, never use.
_ACTION_KEY = ("ormkit.order_by_foreign_keys", object())

_NodeT = TypeVar("_NodeT", bound="Hashable")
_Parents = dict["Mapper[Any]", tuple["Mapper[Any]", ...]]
# A cached graph refers to mappers weakly, keys and values: a strong reference from this
# module would keep them, their classes and their registry alive after the application drops
# them. While a flush uses a graph, its mappers are alive (the flush holds their objects).
_WeakParents = weakref.WeakKeyDictionary["Mapper[Any]", tuple["weakref.ref[Mapper[Any]]", ...]]
# Graphs per set of registries (held weakly, see above), for one generation of mapper
# configuration: a graph built while new mappers were being configured is stored under the old
# generation, never used again. Entries of registries that died stay (a few weak references)
# only until the next configuration, which any new registry's first use brings.
_graphs: dict[tuple[int, frozenset[weakref.ref[registry]]], _WeakParents] = {}
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
        graph = _parents_of({m.registry for m in present})

        def parents(child: Mapper[Any]) -> list[Mapper[Any]]:
            found = (ref() for ref in graph.get(child, ()))
            return [p for p in found if p is not None and p in present]

        pairs = [(p, m) for m in new for p in parents(m)]
        pairs += [(m, child) for child in present - new for m in parents(child) if m in new]
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


def _parents_of(registries: set[registry]) -> _WeakParents:
    """Base mapper -> the base mappers its tables reference, edges inside a cycle left out.

    Cached per set of registries until mappers are configured again.
    """
    key = (_generation, frozenset(weakref.ref(r) for r in registries))
    graph = _graphs.get(key)
    if graph is None:
        built = _build(registries)
        graph = _graphs[key] = weakref.WeakKeyDictionary(
            (child, tuple(weakref.ref(p) for p in found)) for child, found in built.items()
        )
    return graph


def _build(registries: Iterable[registry]) -> _Parents:
    # The base mapper is the unit SQLAlchemy saves and deletes by: every table of an
    # inheritance hierarchy belongs to it.
    owners: dict[Table, set[Mapper[Any]]] = defaultdict(set)
    for reg in registries:
        for mapper in reg.mappers:
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
    # Only edges inside one cycle are left out: SQLAlchemy handles those rows itself, and an
    # edge of ours there would make its sort split the work per row. The groups themselves
    # form no cycle, so the edges between them (or to tables in no cycle) are safe to add.
    component = _components(edges)
    parents: dict[Mapper[Any], list[Mapper[Any]]] = defaultdict(list)
    for parent, child in edges:
        if component[parent] != component[child]:
            parents[child].append(parent)
    return {child: tuple(found) for child, found in parents.items()}


def _components(edges: Iterable[tuple[_NodeT, _NodeT]]) -> dict[_NodeT, int]:
    """Each node's strongly connected component, as a number (Tarjan's algorithm).

    Iterative, so a long chain of tables cannot reach Python's recursion limit. SQLAlchemy's
    `topological.find_cycles` only tells which nodes are in some cycle, not which cycle.
    """
    successors: dict[_NodeT, list[_NodeT]] = {}
    for source, target in edges:
        successors.setdefault(source, []).append(target)
        successors.setdefault(target, [])
    index: dict[_NodeT, int] = {}  # visiting order
    low: dict[_NodeT, int] = {}  # the lowest index reachable through the node's subtree
    component: dict[_NodeT, int] = {}
    stack: list[_NodeT] = []  # visited nodes whose component is not known yet
    for root, root_targets in successors.items():
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        path = [(root, iter(root_targets))]  # the depth-first path, as recursion would
        while path:
            node, targets = path[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    path.append((target, iter(successors[target])))
                    break
                if target not in component:  # on the stack: in the current component
                    low[node] = min(low[node], index[target])
            else:  # every target done: node is finished
                path.pop()
                if path:
                    caller = path[-1][0]
                    low[caller] = min(low[caller], low[node])
                if low[node] == index[node]:  # node is its component's first node
                    while True:
                        member = stack.pop()
                        component[member] = index[node]
                        if member == node:
                            break
    return component


@event.listens_for(Mapper, "after_configured")
def _forget_graphs() -> None:
    # New mappers (or new tables) may add foreign keys: build the graphs again on next use.
    global _generation  # noqa: PLW0603 (one counter for the whole process, like the mappers)
    _generation += 1
    _graphs.clear()
