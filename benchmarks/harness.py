"""Timing, counting and reporting, shared by every scenario.

A variant is measured in rounds. Each round has three parts: `prepare` (untimed: build objects,
load what must be loaded), the timed part, and `cleanup` (untimed: roll back, close). Variants
run interleaved (A, B, C, A, B, C, ...) so a noisy machine slows all of them alike, and every
ratio compares medians taken in the same run.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from ormkit.testing import count_queries

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

# prepare() -> (timed, cleanup); cleanup may be None.
Round: TypeAlias = tuple[Callable[[], object], Callable[[], object] | None]
AsyncRound: TypeAlias = tuple[
    Callable[[], Awaitable[object]], Callable[[], Awaitable[object]] | None
]
# prepare() -> (request, cleanup): request(n) sends the round's n-th request; cleanup may be None.
RequestRound: TypeAlias = tuple[
    Callable[[int], Awaitable[object]], Callable[[], Awaitable[object]] | None
]


@dataclass
class Variant:
    """One way of doing a scenario's job; `baseline` names the variant its ratio is against."""

    name: str
    prepare: Callable[[], Round]
    baseline: str | None = None


@dataclass
class AsyncVariant:
    name: str
    prepare: Callable[[], Awaitable[AsyncRound]]
    baseline: str | None = None


@dataclass
class RequestVariant:
    """A variant timed request by request: a round is `requests` calls of its request."""

    name: str
    prepare: Callable[[], Awaitable[RequestRound]]
    baseline: str | None = None


@dataclass
class Result:
    name: str
    baseline: str | None
    times: list[float] = field(default_factory=list[float])
    statements: int = 0
    unit: str = "ms"

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Table:
    """One measured scenario: its results and the statement-count facts that must hold.

    `versus` adds ratios of medians that no row's baseline shows, under the table.
    """

    title: str
    target: str
    results: list[Result]
    versus: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])

    def result(self, name: str) -> Result:
        return next(r for r in self.results if r.name == name)

    def ratio(self, name: str) -> float:
        result = self.result(name)
        base = self.result(result.baseline) if result.baseline else self.results[0]
        return result.median / base.median

    def ratio_of(self, name: str, other: str) -> float:
        return self.result(name).median / self.result(other).median

    def markdown(self) -> str:
        unit = self.results[0].unit
        scale = 1e3 if unit == "ms" else 1 / 2**20  # seconds to ms, or bytes to MiB
        lines = [f"#### {self.title}", ""]
        if self.target:
            lines += [f"Target: {self.target}", ""]
        lines += [
            f"| variant | min ({unit}) | median ({unit}) | ratio | against | statements |",
            "| --- | ---: | ---: | ---: | --- | ---: |",
        ]
        first = self.results[0].name
        for r in self.results:
            against = "" if r.name == (r.baseline or first) else (r.baseline or first)
            ratio = "1.00x" if not against else f"{self.ratio(r.name):.2f}x"
            lines.append(
                f"| {r.name} | {min(r.times) * scale:,.2f} | {r.median * scale:,.2f} | "
                f"{ratio} | {against} | {r.statements:,} |"
            )
        for name, other in self.versus:
            lines += ["", f"{name} / {other}: {self.ratio_of(name, other):.2f}x (median)"]
        return "\n".join([*lines, ""])


@dataclass
class RequestResult(Result):
    """`times` holds every request's latency, all rounds together; `rounds` each round's total."""

    requests: int = 1
    rounds: list[float] = field(default_factory=list[float])

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.times, n=100, method="inclusive")[98]

    @property
    def per_second(self) -> float:
        """Requests per second, one after the other, in the median round."""
        return self.requests / statistics.median(self.rounds)


@dataclass
class RequestTable(Table):
    """Per-request latencies; `versus` compares medians of latency."""

    def markdown(self) -> str:
        lines = [f"#### {self.title}", ""]
        if self.target:
            lines += [f"Target: {self.target}", ""]
        lines += [
            (
                "| variant | median (ms) | p99 (ms) | requests/s | ratio | against "
                "| statements per request |"
            ),
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        first = self.results[0].name
        for r in self.results:
            assert isinstance(r, RequestResult)
            against = "" if r.name == (r.baseline or first) else (r.baseline or first)
            ratio = "1.00x" if not against else f"{self.ratio(r.name):.2f}x"
            statements = r.statements / r.requests
            lines.append(
                f"| {r.name} | {r.median * 1e3:,.2f} | {r.p99 * 1e3:,.2f} | "
                f"{r.per_second:,.0f} | {ratio} | {against} | {statements:,.4g} |"
            )
        for name, other in self.versus:
            lines += ["", f"{name} / {other}: {self.ratio_of(name, other):.2f}x (median latency)"]
        return "\n".join([*lines, ""])


def page_variant(column: str, page: int) -> str:
    """The name of a `PageTable` result: one column's way of fetching one page."""
    return f"{column}, page {page:,}"


@dataclass
class PageTable(Table):
    """One page fetched several ways: the pages down, the ways (`columns`) across.

    Each result is named `page_variant(column, page)`; the last column but one divides the
    `offset` column's median by the `keyset` column's, page by page.
    """

    pages: list[int] = field(default_factory=list[int])
    columns: list[str] = field(default_factory=list[str])
    keyset: str = ""
    offset: str = ""

    def page_ratio(self, page: int) -> float:
        return self.ratio_of(page_variant(self.offset, page), page_variant(self.keyset, page))

    def markdown(self) -> str:
        lines = [f"#### {self.title}", ""]
        if self.target:
            lines += [f"Target: {self.target}", ""]
        lines += [
            "| page | " + " | ".join(f"{c}, median (ms)" for c in self.columns) + " | "
            "offset/keyset | statements |",
            "| ---: |" + " ---: |" * len(self.columns) + " ---: | ---: |",
        ]
        for page in self.pages:
            results = [self.result(page_variant(column, page)) for column in self.columns]
            medians = " | ".join(f"{r.median * 1e3:,.2f}" for r in results)
            statements = " / ".join(f"{r.statements:,}" for r in results)
            lines.append(f"| {page:,} | {medians} | {self.page_ratio(page):.2f}x | {statements} |")
        lines += ["", f"offset/keyset: {self.offset} / {self.keyset} (medians)"]
        return "\n".join([*lines, ""])


def _results(variants: list[Variant] | list[AsyncVariant]) -> dict[str, Result]:
    return {v.name: Result(v.name, v.baseline) for v in variants}


@contextmanager
def _counted(engines: Engine | AsyncEngine | list[Any]) -> Iterator[Callable[[], int]]:
    """Count the statements sent on one engine, or on each of a list (scenario 9's servers)."""
    with ExitStack() as stack:
        logs = [
            stack.enter_context(count_queries(engine))
            for engine in (engines if isinstance(engines, list) else [engines])
        ]
        yield lambda: sum(log.count for log in logs)


def measure(engine: Engine | list[Engine], variants: list[Variant], rounds: int) -> list[Result]:
    results = _results(variants)
    for _ in range(rounds):
        for variant in variants:
            timed, cleanup = variant.prepare()
            gc.collect()  # no collection left over from the last round lands in this one
            with _counted(engine) as count:
                start = time.perf_counter()
                timed()
                elapsed = time.perf_counter() - start
            if cleanup is not None:
                cleanup()
            results[variant.name].times.append(elapsed)
            results[variant.name].statements = count()
    return list(results.values())


async def measure_async(
    engine: AsyncEngine | list[AsyncEngine], variants: list[AsyncVariant], rounds: int
) -> list[Result]:
    results = _results(variants)
    for _ in range(rounds):
        for variant in variants:
            timed, cleanup = await variant.prepare()
            gc.collect()
            with _counted(engine) as count:
                start = time.perf_counter()
                await timed()
                elapsed = time.perf_counter() - start
            if cleanup is not None:
                await cleanup()
            results[variant.name].times.append(elapsed)
            results[variant.name].statements = count()
    return list(results.values())


async def measure_requests(
    engine: AsyncEngine, variants: list[RequestVariant], rounds: int, requests: int
) -> list[RequestResult]:
    """Like `measure_async`, but each of a round's `requests` requests is timed on its own."""
    results = {v.name: RequestResult(v.name, v.baseline, requests=requests) for v in variants}
    clock = time.perf_counter
    for _ in range(rounds):
        for variant in variants:
            request, cleanup = await variant.prepare()
            result = results[variant.name]
            gc.collect()
            with count_queries(engine) as log:
                start = clock()
                for n in range(requests):
                    began = clock()
                    await request(n)
                    result.times.append(clock() - began)
                elapsed = clock() - start
            if cleanup is not None:
                await cleanup()
            result.rounds.append(elapsed)
            result.statements = log.count
    return list(results.values())


def peak_memory(engine: Engine, variants: list[Variant], rounds: int) -> list[Result]:
    """Like `measure`, but each round records tracemalloc's peak (bytes) of the timed part."""
    results = _results(variants)
    for result in results.values():
        result.unit = "MiB"
    for _ in range(rounds):
        for variant in variants:
            gc.collect()
            # Everything the variant allocates counts, the objects it inserts included: both
            # variants build the same objects, so the difference is the session layer's.
            tracemalloc.start()
            timed, cleanup = variant.prepare()
            with count_queries(engine) as log:
                timed()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            if cleanup is not None:
                cleanup()
            results[variant.name].times.append(peak)
            results[variant.name].statements = log.count
    return list(results.values())


async def peak_memory_async(
    engine: AsyncEngine, variants: list[AsyncVariant], rounds: int
) -> list[Result]:
    results = _results(variants)
    for result in results.values():
        result.unit = "MiB"
    for _ in range(rounds):
        for variant in variants:
            gc.collect()
            tracemalloc.start()
            timed, cleanup = await variant.prepare()
            with count_queries(engine) as log:
                await timed()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            if cleanup is not None:
                await cleanup()
            results[variant.name].times.append(peak)
            results[variant.name].statements = log.count
    return list(results.values())


@dataclass
class Check:
    """A claim the run verifies: a statement count (always) or a target ratio (full runs)."""

    claim: str
    measured: str
    ok: bool
    fact: bool = False  # a statement count: true at any size, so a miss fails the run


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; the smoke run shrinks them all."""

    smoke: bool = False
    lookups: int = 10_000  # 1: by_id lookups over 100 loaded objects
    keys: int = 1_000  # 2: keys per by_ids call
    insert_rows: int = 10_000  # 3: parents, and as many children
    bulk_rows: int = 10_000  # 4: rows each bulk UPDATE/DELETE matches
    bulk_loaded: int = 1_000  # 4: of them, loaded in the session
    transactions: int = 1_000  # 5: tiny transactions per round
    isolated_tests: int = 50  # 7: tests of one unit of work per round
    requests: int = 1_000  # 8: FastAPI requests per round, one after the other
    replica_units: int = 300  # 9: units of work per round, each of 10 reads (or 1 update)
    memory_rows: int = 50_000  # 6: scenario 3's parents, and as many children: 100,000 rows
    upsert_rows: int = 10_000  # 10: rows per upsert_many, half of them new
    page_rows: int = 100_000  # 11: rows paged through
    page_size: int = 100  # 11: rows per page
    rounds: int = 15  # rounds of the scenarios that take milliseconds
    slow_rounds: int = 5  # rounds of those that take seconds
    memory_rounds: int = 1
    bulk_rounds: int = 25  # a bulk statement takes a few ms: more rounds steady the median

    @classmethod
    def smoke_run(cls) -> Sizes:
        return cls(
            smoke=True,
            lookups=100,
            keys=20,
            insert_rows=50,
            bulk_rows=100,
            bulk_loaded=10,
            transactions=10,
            isolated_tests=2,
            requests=5,
            replica_units=3,
            memory_rows=200,
            upsert_rows=50,
            page_rows=1_000,
            page_size=10,
            rounds=1,
            slow_rounds=1,
            bulk_rounds=1,
        )


@dataclass
class Report:
    """Everything a run measured and checked, grouped by scenario, then backend."""

    sizes: Sizes
    backend: str = ""
    tables: dict[str, dict[str, list[Table]]] = field(
        default_factory=dict[str, dict[str, list[Table]]]
    )
    checks: list[tuple[str, Check]] = field(default_factory=list[tuple[str, Check]])
    notes: dict[str, str] = field(default_factory=dict[str, str])

    def describe(self, scenario: str, notes: str | None) -> None:
        """What the scenario measures and how to read it, shown under its heading."""
        text = inspect.cleandoc(notes or "")
        _summary, _, body = text.partition("\n\n")  # the summary line repeats the heading
        self.notes.setdefault(scenario, body or text)

    def add(self, scenario: str, table: Table) -> Table:
        self.tables.setdefault(scenario, {}).setdefault(self.backend, []).append(table)
        return table

    def statements(self, claim: str, result: Result, expected: int) -> None:
        """A statement count: a fact at any size, checked in smoke runs too."""
        measured = f"{result.statements:,} statement{'' if result.statements == 1 else 's'}"
        ok = result.statements == expected
        self.checks.append((self.backend, Check(claim, measured, ok, fact=True)))

    def same_statements(self, claim: str, result: Result, other: Result) -> None:
        measured = f"{result.statements:,} vs {other.statements:,}"
        ok = result.statements == other.statements
        self.checks.append((self.backend, Check(claim, measured, ok, fact=True)))

    def ratio_at_most(self, claim: str, ratio: float, limit: float) -> None:
        """A timing target; meaningless at smoke sizes, so only full runs check it."""
        if not self.sizes.smoke:
            self.checks.append((self.backend, Check(claim, f"{ratio:.2f}x", ratio <= limit)))

    def faster_at_least(self, claim: str, fast: Result, slow: Result, factor: float) -> None:
        if not self.sizes.smoke:
            speedup = slow.median / fast.median
            self.checks.append((self.backend, Check(claim, f"{speedup:.1f}x", speedup >= factor)))

    @property
    def failed(self) -> list[tuple[str, Check]]:
        return [(backend, check) for backend, check in self.checks if not check.ok]
