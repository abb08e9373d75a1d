"""ormkit against raw SQLAlchemy, measured side by side in one process.

    python benchmarks/run.py            # full sizes (nox -s bench)
    python benchmarks/run.py --smoke    # tiny sizes, one round: checks the benchmarks still run

Each scenario runs its variants in interleaved rounds (A, B, A, B, ...) so a noisy machine slows
all of them alike; the table gives the min and median per variant, the ratio of medians to the
baseline (the first variant) and the SQL statements each variant sent (ormkit.testing).
"""

from __future__ import annotations

import argparse
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import ormkit
from ormkit.testing import count_queries

if TYPE_CHECKING:
    from collections.abc import Callable


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Child(Base):
    __tablename__ = "child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))
    name: Mapped[str] = mapped_column(String(50))


class ParentRepository(ormkit.Repository[Parent, int]):
    pass


# A variant prepares its round (untimed) and returns the timed part and the session to end
# after it (untimed too), if the round opened one.
Round = tuple["Callable[[], object]", "Session | None"]


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list[float])
    statements: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(variants: dict[str, Callable[[], Round]], rounds: int, target: Any) -> list[Result]:
    results = {name: Result(name) for name in variants}
    for _ in range(rounds):
        for name, prepare in variants.items():
            timed, session = prepare()
            with count_queries(target) as log:
                start = time.perf_counter()
                timed()
                elapsed = time.perf_counter() - start
            if session is not None:
                session.rollback()
                session.close()
            results[name].times.append(elapsed)
            results[name].statements = log.count
    return list(results.values())


def report(title: str, target: str, results: list[Result]) -> str:
    base = results[0].median
    lines = [
        f"### {title}",
        "",
        f"Target: {target}",
        "",
        "| variant | min (ms) | median (ms) | ratio to first | statements |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.name} | {min(r.times) * 1e3:.2f} | {r.median * 1e3:.2f} | "
        f"{r.median / base:.2f}x | {r.statements} |"
        for r in results
    ]
    return "\n".join([*lines, ""])


# --- scenarios -------------------------------------------------------------------------------


def fk_ordered_flush(engine: sqlalchemy.Engine, rows: int, rounds: int) -> str:
    """Flush `rows` parents and `rows` children linked by a ForeignKey only."""
    plain = sqlalchemy.orm.sessionmaker(engine)
    ordered = ormkit.create_session_factory(engine)

    def objects() -> tuple[list[Parent], list[Child]]:
        parents = [Parent(id=n, name="p") for n in range(rows)]
        children = [Child(id=n, parent_id=n, name="c") for n in range(rows)]
        return parents, children

    def sqlalchemy_manual_flushes() -> Round:
        session = plain()
        parents, children = objects()

        def timed() -> None:
            # Without relationship(), SQLAlchemy's order is not the tables' FK order: the way
            # that works is adding and flushing one table after the other.
            session.add_all(parents)
            session.flush()
            session.add_all(children)
            session.flush()

        return timed, session

    def ormkit_children_first() -> Round:
        session = ordered()
        parents, children = objects()

        def timed() -> None:
            session.add_all(children)  # the order plain SQLAlchemy cannot flush
            session.add_all(parents)
            session.flush()

        return timed, session

    def ormkit_shuffled() -> Round:
        session = ordered()
        parents, children = objects()
        mixed: list[Parent | Child] = [*children, *parents]
        random.Random(0).shuffle(mixed)

        def timed() -> None:
            session.add_all(mixed)
            session.flush()

        return timed, session

    variants = {
        "SQLAlchemy, parents then children, a flush each": sqlalchemy_manual_flushes,
        "ormkit, children added first, one flush": ormkit_children_first,
        # Random key order costs SQLite's B-tree (and SQLAlchemy's sort) more whoever flushes:
        # this line prices the shuffle, not the ordering.
        "ormkit, rows shuffled, one flush": ormkit_shuffled,
    }
    results = measure(variants, rounds, engine)
    return report(
        f"FK-ordered flush of {rows:,} parents + {rows:,} children (SQLite file)",
        "ormkit <= 1.15x",
        results,
    )


def by_id_hits(engine: sqlalchemy.Engine, lookups: int, rounds: int) -> str:
    """`lookups` by-key reads of 100 objects already in the identity map."""
    factory = ormkit.create_session_factory(engine)
    session = factory()
    loaded = session.scalars(select(Parent).where(Parent.id < 100)).all()
    repository = ParentRepository(session)
    keys = [n % 100 for n in range(lookups)]

    def session_get() -> Round:
        return (lambda: [session.get(Parent, key) for key in keys]), None

    def repository_by_id() -> Round:
        return (lambda: [repository.by_id(key) for key in keys]), None

    def select_where() -> Round:
        statements = [select(Parent).where(Parent.id == key) for key in keys[:1000]]
        return (lambda: [session.scalars(statement).one() for statement in statements]), None

    results = measure(
        {
            "Session.get": session_get,
            "ormkit Repository.by_id": repository_by_id,
            "execute(select().where(pk == ...)), 1,000 of them": select_where,
        },
        rounds,
        session,
    )
    assert len(loaded) == 100
    session.close()
    return report(
        f"by_id on loaded objects: {lookups:,} lookups over 100 objects",
        "ormkit <= 1.25x Session.get; no statements",
        results,
    )


def by_ids_unloaded(engine: sqlalchemy.Engine, keys: int, rounds: int) -> str:
    """Load `keys` objects by key, none of them loaded yet."""
    factory = ormkit.create_session_factory(engine)
    plain = sqlalchemy.orm.sessionmaker(engine)  # the baselines are plain SQLAlchemy
    wanted = list(range(keys))

    def get_loop() -> Round:
        session = plain()
        return (lambda: [session.get(Parent, key) for key in wanted]), session

    def select_in() -> Round:
        session = plain()
        return (lambda: session.scalars(select(Parent).where(Parent.id.in_(wanted))).all()), session

    def repository_by_ids() -> Round:
        repository = ParentRepository(factory())
        return (lambda: repository.by_ids(wanted)), repository.session

    results = measure(
        {
            f"{keys:,} x Session.get": get_loop,
            "ormkit Repository.by_ids": repository_by_ids,
            "one select().where(pk.in_(...))": select_in,
        },
        rounds,
        engine,
    )
    return report(
        f"by_ids of {keys:,} unloaded keys (SQLite file)",
        "ormkit >= 10x faster than the Session.get loop (ratio <= 0.10)",
        results,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    args = parser.parse_args()
    rows, lookups, keys, rounds = (50, 100, 20, 1) if args.smoke else (5_000, 10_000, 1_000, 15)

    with tempfile.TemporaryDirectory() as directory:
        engine = ormkit.create_engine(f"sqlite:///{Path(directory) / 'bench.db'}")
        Base.metadata.create_all(engine)
        sections = [fk_ordered_flush(engine, rows, rounds)]
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.insert(Parent), [{"id": n, "name": "p"} for n in range(max(keys, 100))]
            )
        sections.append(by_id_hits(engine, lookups, rounds))
        sections.append(by_ids_unloaded(engine, keys, rounds))
        engine.dispose()

    print(
        f"ormkit benchmarks{' (smoke run: sizes too small to mean anything)' if args.smoke else ''}"
    )
    print(
        f"\nPython {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"SQLite {sqlite3.sqlite_version}, "
        f"{platform.machine()}, {rounds} interleaved rounds\n"
    )
    print("\n".join(sections))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
