"""Scenario 8: a FastAPI request that reads three objects by id, updates one and commits.

The request goes through the ASGI app in-process (httpx2's `ASGITransport`: no socket), one
after the other, and each one is timed from the client's call to its answer. Three apps over
the same engine and tables run the same endpoint: ormkit's `unit_of_work` and `repository`
dependencies with `by_id`; a hand-written `yield` dependency around
`async with factory() as session, session.begin()`, declared with `scope="function"` so that
it too commits before the response is sent, with `Session.get`; and advanced-alchemy's FastAPI
extension (`AdvancedAlchemy`, `commit_mode="autocommit"`, `provide_session()`) with its
repository's `get`. Each request renames the first of its three rows, so every variant sends
3 SELECTs and 1 UPDATE.

advanced-alchemy has no commit before the response: its ASGI middleware commits after the
app has sent the response (the status decides between commit and rollback), and a commit
that fails is logged, not answered. The work and the statements are the same, and the
in-process transport answers only once the app has returned, so its latency includes its
commit too. Its `provide_session()` is a plain `def`, which FastAPI runs in its thread pool.

Async backends only: the scenario is about the async flavour. Each round makes a new client
and sends one untimed request first; *statements per request* is the last round's count
divided by its requests. On a SQLite file every commit waits for the disk.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time,
# and the dependencies they name are local to the functions that make the apps.

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import httpx2
from advanced_alchemy.extensions.fastapi import (
    AdvancedAlchemy,
    AsyncSessionConfig,
    SQLAlchemyAsyncConfig,
)
from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import ormkit
from benchmarks.harness import Report, RequestRound, RequestTable, RequestVariant, measure_requests
from benchmarks.models import AAAsyncParentRepository, AsyncParentRepository, Data, Parent
from ormkit import AsyncUnitOfWork
from ormkit.fastapi import repository, unit_of_work

SCENARIO = "8. A FastAPI request"
PLAIN = "hand-written AsyncSession dependency"
ORMKIT = "ormkit.fastapi unit_of_work + repository"
AA = "advanced-alchemy AdvancedAlchemy, autocommit"
ROWS = 300  # request n reads rows 3n, 3n + 1, 3n + 2 (modulo ROWS) and renames the first
STATEMENTS = 4  # per request: 3 SELECTs and 1 UPDATE


def _title(report: Report) -> str:
    return f"{report.sizes.requests:,} requests per round, one after the other ({report.backend})"


def _check(report: Report, table: RequestTable) -> None:
    requests = report.sizes.requests
    report.statements(
        "a FastAPI request through ormkit.fastapi: 3 SELECTs and 1 UPDATE each",
        table.result(ORMKIT),
        STATEMENTS * requests,
    )
    report.same_statements(
        "a FastAPI request: the statements a hand-written dependency sends",
        table.result(ORMKIT),
        table.result(PLAIN),
    )
    report.ratio_at_most(
        "FastAPI request <= 1.10x a hand-written AsyncSession dependency",
        table.ratio(ORMKIT),
        1.10,
    )


def _keys(key: int) -> list[int]:
    return [(key + n) % ROWS for n in range(3)]


def _ormkit_app(factory: async_sessionmaker[AsyncSession], rename: Callable[[], str]) -> FastAPI:
    app = FastAPI()
    request_uow = Depends(unit_of_work(factory))
    request_parents = Depends(repository(AsyncParentRepository, factory))

    @app.post("/parents/{key}")
    async def touch(
        key: int,
        parents: Annotated[AsyncParentRepository, request_parents],
        _uow: Annotated[AsyncUnitOfWork, request_uow],
    ) -> list[str]:
        # `_uow` asked for as an app that flushes or registers callbacks would: the unit of work
        # the repository is over, so asking for both costs one more (cached) dependency.
        found = [await parents.by_id(k) for k in _keys(key)]
        loaded = [parent for parent in found if parent is not None]
        loaded[0].name = rename()
        return [parent.name for parent in loaded]

    return app


def _plain_app(factory: async_sessionmaker[AsyncSession], rename: Callable[[], str]) -> FastAPI:
    app = FastAPI()

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with factory() as session, session.begin():
            yield session

    request_session = Depends(get_session, scope="function")

    @app.post("/parents/{key}")
    async def touch(key: int, session: Annotated[AsyncSession, request_session]) -> list[str]:
        found = [await session.get(Parent, k) for k in _keys(key)]
        loaded = [parent for parent in found if parent is not None]
        loaded[0].name = rename()
        return [parent.name for parent in loaded]

    return app


def _aa_app(engine: AsyncEngine, rename: Callable[[], str]) -> FastAPI:
    app = FastAPI()
    alchemy = AdvancedAlchemy(
        SQLAlchemyAsyncConfig(
            engine_instance=engine,
            commit_mode="autocommit",
            session_config=AsyncSessionConfig(expire_on_commit=False),
        ),
        app=app,
    )
    request_session = Depends(alchemy.provide_session())

    async def provide_parents(
        session: Annotated[AsyncSession, request_session],
    ) -> AAAsyncParentRepository:
        return AAAsyncParentRepository(session=session)

    request_parents = Depends(provide_parents)

    @app.post("/parents/{key}")
    async def touch(
        key: int, parents: Annotated[AAAsyncParentRepository, request_parents]
    ) -> list[str]:
        found = [await parents.get(k) for k in _keys(key)]
        found[0].name = rename()
        return [parent.name for parent in found]

    return app


async def run_async(engine: AsyncEngine, report: Report) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(Data(parents=ROWS).load)
    # One counter for every app: each request sets a name no row has had, so each sends an UPDATE.
    counter = itertools.count()

    def rename() -> str:
        return f"r{next(counter)}"

    plain = async_sessionmaker(engine, expire_on_commit=False)
    factory = ormkit.create_async_session_factory(engine)

    def client_of(app: FastAPI) -> Callable[[], Awaitable[RequestRound]]:
        async def prepare() -> RequestRound:
            client = httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=app), base_url="http://test"
            )
            answers: list[tuple[int, httpx2.Response]] = []

            async def request(n: int) -> None:
                answers.append((3 * n, await client.post(f"/parents/{3 * n}")))

            async def cleanup() -> None:
                await client.aclose()
                # Every request answered 200, and the last one's rename was committed.
                for _, answer in answers:
                    assert answer.status_code == 200, answer.text
                key, answer = answers[-1]
                name = answer.json()[0]
                async with plain() as session:
                    stored = await session.get(Parent, _keys(key)[0])
                    assert stored is not None
                    assert stored.name == name, (stored.name, name)

            await request(-1)  # untimed: the app's first request of the round
            return request, cleanup

        return prepare

    variants = [
        RequestVariant(PLAIN, client_of(_plain_app(plain, rename))),
        RequestVariant(ORMKIT, client_of(_ormkit_app(factory, rename))),
        RequestVariant(AA, client_of(_aa_app(engine, rename))),
    ]
    sizes = report.sizes
    results = await measure_requests(engine, variants, sizes.slow_rounds, sizes.requests)
    table = RequestTable(_title(report), "", list(results), versus=[(ORMKIT, AA)])
    report.add(SCENARIO, table)
    _check(report, table)
