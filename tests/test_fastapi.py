"""`ormkit.fastapi`: one unit of work per request, shared by every dependency, on every backend.

The example app (tests/test_integrations.py) proves the async flavour end to end; here: the
sync flavour (a `sessionmaker`, endpoints in FastAPI's thread pool), the sharing of one unit of
work by every dependency of a request, the refusals when the app is declared, and the imports.
No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time,
and the dependencies they name are local to each test.
"""

import importlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import fastapi
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sqlalchemy import URL, event, func, select

import ormkit
from examples.fastapi_app import Author, AuthorRepository, Base, Book, BookRepository
from ormkit import AsyncUnitOfWork, InvalidArgumentError, TransactionError, UnitOfWork
from ormkit.fastapi import repository, unit_of_work
from tests.web_apps import SyncAuthorRepository, create_sync_fastapi_app

FAILING_IMPORTS = {
    "taken-id": {"authors": [{"id": 100, "name": "New"}, {"id": 1, "name": "Taken"}]},
    "deferred-fk": {
        "authors": [{"id": 100, "name": "New"}],
        "books": [{"id": 100, "author_id": 999, "title": "Orphan"}],
    },
}


def _stored_authors(app: FastAPI) -> list[tuple[int, str]]:
    engine = app.state.sessions.kw["bind"]
    with engine.connect() as connection:
        rows = connection.execute(select(Author.id, Author.name).order_by(Author.id))
        return [(r.id, r.name) for r in rows]


@pytest.fixture
def sync_app(sync_url: URL) -> Any:
    app = create_sync_fastapi_app(sync_url)
    yield app
    engine = app.state.sessions.kw["bind"]
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_sync_factory_commits_before_the_response(sync_app: FastAPI) -> None:
    seen: list[list[tuple[int, str]]] = []

    @sync_app.middleware("http")
    async def look_when_the_response_goes_out(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        seen.append(_stored_authors(sync_app))  # from another connection: committed rows only
        return response

    with TestClient(sync_app) as client:
        created = client.post("/authors", json={"name": "Ursula"})
        assert (created.status_code, created.json()) == (201, {"id": 1, "name": "Ursula"})
        assert seen == [[(1, "Ursula")]]
        assert client.get("/authors/1").json() == {"id": 1, "name": "Ursula"}


@pytest.mark.parametrize("case", FAILING_IMPORTS)
def test_sync_factory_failing_commit_is_a_500_and_stores_nothing(
    sync_app: FastAPI, case: str
) -> None:
    with TestClient(sync_app, raise_server_exceptions=False) as client:
        assert client.post("/authors", json={"name": "First"}).status_code == 201
        assert client.post("/import", json=FAILING_IMPORTS[case]).status_code == 500
        assert sync_app.state.imports == []
    assert _stored_authors(sync_app) == [(1, "First")]


def test_sync_factory_callbacks_run_and_http_exception_rolls_back(sync_app: FastAPI) -> None:
    with TestClient(sync_app) as client:
        imported = client.post("/import", json={"authors": [{"id": 5, "name": "Five"}]})
        assert imported.status_code == 201
        assert sync_app.state.imports == [{"authors": 1, "books": 0}]
        assert client.post("/authors/5/books", json={"title": "Twice"}).status_code == 201
        assert client.post("/authors/5/books", json={"title": "Twice"}).status_code == 409
    with sync_app.state.sessions() as session:
        assert session.scalar(select(func.count(Book.id))) == 1


def test_every_dependency_of_a_request_gets_the_same_unit_of_work(async_url: URL) -> None:
    engine = ormkit.create_async_engine(async_url)
    sessions = ormkit.create_async_session_factory(engine)
    begun: list[object] = []
    event.listen(engine.sync_engine, "begin", begun.append)
    seen: dict[str, Any] = {}

    # Declared twice, separately: still one unit of work per request.
    async def audit(uow: Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))]) -> Any:
        return uow

    async def current_author(
        authors: Annotated[AuthorRepository, Depends(repository(AuthorRepository, sessions))],
        audited: Annotated[Any, Depends(audit)],
    ) -> Any:
        seen["nested repository session"] = authors.session
        seen["nested audit"] = audited
        return await authors.by_id(1)

    app = FastAPI()

    @app.get("/")
    async def endpoint(
        uow: Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))],
        books: Annotated[BookRepository, Depends(repository(BookRepository, sessions))],
        author: Annotated[Any, Depends(current_author)],
    ) -> dict[str, bool]:
        seen["uow"], seen["session"], seen["author"] = uow, uow.session, author
        seen["books session"] = books.session
        return {"ok": True}

    async def create_tables() -> None:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with AsyncUnitOfWork(sessions) as uow:
            uow.add(Author(id=1, name="One"))

    with TestClient(app) as client:
        client.portal.call(create_tables)  # type: ignore[union-attr]
        begun.clear()
        assert client.get("/").json() == {"ok": True}
        first = seen["uow"]
        assert seen["nested audit"] is first
        assert seen["books session"] is seen["session"]
        assert seen["nested repository session"] is seen["session"]
        assert seen["author"].name == "One"
        assert len(begun) == 1  # one transaction for the whole request
        assert client.get("/").json() == {"ok": True}
        assert seen["uow"] is not first  # the next request has its own
        client.portal.call(engine.dispose)  # type: ignore[union-attr]
    assert unit_of_work(sessions) is unit_of_work(sessions)


def test_a_sessionmaker_gives_a_sync_unit_of_work(sync_url: URL) -> None:
    sessions = ormkit.create_session_factory(sync_url)
    app = FastAPI()
    got: list[object] = []

    @app.get("/")
    def endpoint(
        uow: Annotated[UnitOfWork, Depends(unit_of_work(sessions))],
        authors: Annotated[
            SyncAuthorRepository, Depends(repository(SyncAuthorRepository, sessions))
        ],
    ) -> None:
        got.extend([uow, authors.session is uow.session])

    with TestClient(app) as client:
        assert client.get("/").status_code == 200
    assert isinstance(got[0], UnitOfWork)
    assert got[1] is True
    sessions.kw["bind"].dispose()


# Never connected: the refusals come before any SQL, when the app is declared.
SYNC_SESSIONS = ormkit.create_session_factory("sqlite://")
ASYNC_SESSIONS = ormkit.create_async_session_factory("sqlite+aiosqlite://")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: unit_of_work("sqlite://"), "takes a session factory, got 'sqlite://'"),
        (
            lambda: repository(
                SyncAuthorRepository, ormkit.create_async_session_factory("sqlite+aiosqlite://")
            ),
            (
                "over an async_sessionmaker takes a subclass of AsyncRepository, got the class "
                "SyncAuthorRepository"
            ),
        ),
        (
            lambda: repository(AuthorRepository, SYNC_SESSIONS),
            "over a sessionmaker takes a subclass of Repository, got the class AuthorRepository",
        ),
        (
            lambda: repository(Author, SYNC_SESSIONS),
            "takes a subclass of Repository, got the class Author",
        ),
        (lambda: repository(AuthorRepository, None), "takes a session factory, got None"),
    ],
)
def test_bad_input_is_refused_when_the_app_is_declared(call: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        call()


def test_importing_it_without_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ormkit.fastapi")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what `import fastapi` finds missing
    with pytest.raises(ImportError, match=r"pip install 'ormkit\[fastapi\]'"):
        importlib.import_module("ormkit.fastapi")


def test_importing_it_with_a_fastapi_older_than_0_121_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def depends_without_scope(dependency: Any = None, *, use_cache: bool = True) -> Any:
        raise AssertionError((dependency, use_cache))  # pragma: no cover

    monkeypatch.delitem(sys.modules, "ormkit.fastapi")
    monkeypatch.setattr(fastapi, "Depends", depends_without_scope)
    monkeypatch.setattr(fastapi, "__version__", "0.120.4")
    with pytest.raises(ImportError, match=r"needs FastAPI 0\.121 or later, found 0\.120\.4"):
        importlib.import_module("ormkit.fastapi")


def test_importing_ormkit_imports_no_web_framework() -> None:
    code = (
        "import sys, ormkit, ormkit.testing\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'flask', 'werkzeug') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_http_exception_raised_by_a_dependency_rolls_back(async_url: URL) -> None:
    engine = ormkit.create_async_engine(async_url)
    sessions = ormkit.create_async_session_factory(engine)

    async def add_then_refuse(
        uow: Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))],
    ) -> None:
        uow.add(Author(id=2, name="Refused"))
        await uow.flush()
        raise HTTPException(status_code=403)

    app = FastAPI()

    @app.post("/", dependencies=[Depends(add_then_refuse)])
    async def endpoint() -> None:
        raise AssertionError  # pragma: no cover

    async def create_tables() -> None:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)

    async def stored() -> list[int]:
        async with AsyncUnitOfWork(sessions) as uow:
            return list(await uow.session.scalars(select(Author.id)))

    with TestClient(app) as client:
        client.portal.call(create_tables)  # type: ignore[union-attr]
        assert client.post("/").status_code == 403
        assert client.portal.call(stored) == []  # type: ignore[union-attr]
        assert engine.sync_engine.pool.checkedout() == 0
        client.portal.call(engine.dispose)  # type: ignore[union-attr]


def test_a_streaming_body_cannot_use_the_ended_unit_of_work(async_url: URL) -> None:
    engine = ormkit.create_async_engine(async_url)
    sessions = ormkit.create_async_session_factory(engine)
    statements: list[str] = []
    event.listen(
        engine.sync_engine, "before_cursor_execute", lambda *args: statements.append(args[2])
    )
    app = FastAPI()

    @app.get("/")
    async def endpoint(
        uow: Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))],
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            # The response is being sent: the request's unit of work has ended.
            try:
                await uow.session.execute(select(1))
            except TransactionError as error:
                yield str(error).encode()

        return StreamingResponse(body())

    with TestClient(app) as client:
        text = client.get("/").text
        client.portal.call(engine.dispose)  # type: ignore[union-attr]
    assert "used after the unit of work ended" in text
    assert statements == []
