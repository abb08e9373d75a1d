"""The example apps, on `ormkit.fastapi` and `ormkit.flask`, through each framework's own test
client and through a real server on 127.0.0.1 (uvicorn; waitress), on every backend.

Their claims: the request's unit of work ends *before the response is sent*, so a failed commit
is never a 2xx, an exception (`HTTPException`, `abort()`) rolls back, `on_commit` callbacks have
run, and no connection is still checked out when the client gets its answer. A wrapper around
each app records what was true at the moment each response started going out, which a test
client alone cannot see (it returns only once the app has finished, after any code a framework
runs once the response is sent).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
import sqlalchemy
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from examples.fastapi_app import Author, Book
from examples.fastapi_app import create_app as create_fastapi_app
from examples.flask_app import create_app as create_flask_app
from tests.servers import serving_asgi, serving_wsgi

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from flask import Flask
    from sqlalchemy import URL
    from starlette.types import Message, Receive, Scope, Send


def _exercise(client) -> None:
    """The same story for both apps, through their own test clients."""

    def code(response) -> int:
        return response.status_code

    body = _json

    created = client.post("/authors", json={"name": "Ursula"})
    assert code(created) == 201
    author = body(created)
    assert author["name"] == "Ursula"
    assert isinstance(author["id"], int)

    # Committed by the request's unit of work: the next request (a new one) sees it.
    assert body(client.get(f"/authors/{author['id']}")) == author
    book = client.post(f"/authors/{author['id']}/books", json={"title": "The Dispossessed"})
    assert code(book) == 201
    books = body(client.get(f"/authors/{author['id']}/books"))
    assert [b["title"] for b in books] == ["The Dispossessed"]

    missing = client.get("/authors/404")
    assert code(missing) == 404
    assert "no Author with primary key 404" in body(missing)["detail"]
    # A 404 inside a write rolls the request's work back: no orphan book.
    assert code(client.post("/authors/404/books", json={"title": "Orphan"})) == 404
    assert code(client.get("/authors/404/books")) == 404

    assert code(client.delete(f"/books/{body(book)['id']}")) == 204
    assert body(client.get(f"/authors/{author['id']}/books")) == []
    assert code(client.delete(f"/books/{body(book)['id']}")) == 404


def test_fastapi_app(async_url: URL) -> None:
    app = create_fastapi_app(async_url)
    with TestClient(app) as client:  # runs the lifespan: engine made in the app's loop
        _exercise(client)
        engine = app.state.sessions.kw["bind"]
        assert engine.pool.checkedout() == 0


def test_flask_app(sync_url: URL) -> None:
    app = create_flask_app(sync_url)
    _exercise(app.test_client())
    engine = app.extensions["ormkit"].kw["bind"]
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.parametrize("create_app", [create_fastapi_app, create_flask_app])
def test_apps_start_on_their_default_sqlite_database(create_app) -> None:
    app = create_app()
    if hasattr(app, "test_client"):
        assert app.test_client().post("/authors", json={"name": "a"}).status_code == 201
        app.extensions["ormkit"].kw["bind"].dispose()  # Python 3.13 warns of unclosed ones
    else:
        with TestClient(app) as client:
            assert client.post("/authors", json={"name": "a"}).status_code == 201


# --- FastAPI: the unit of work ends before the response is sent ---------------------------------

SYNC_TWIN = {
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql+psycopg": "postgresql+psycopg",
    "sqlite+aiosqlite": "sqlite+pysqlite",
    "postgresql+psycopg_async": "postgresql+psycopg",
    "postgresql+asyncpg": "postgresql+psycopg",
}

# Two imports whose work fails only when the unit of work commits (the endpoint never flushes):
# a taken author id fails in the final flush inside commit, a book of an unknown author fails
# at COMMIT itself (its foreign key is DEFERRABLE INITIALLY DEFERRED).
FAILING_IMPORTS = {
    "taken-id": {"authors": [{"id": 100, "name": "New"}, {"id": 1, "name": "Taken"}]},
    "deferred-fk": {
        "authors": [{"id": 100, "name": "New"}],
        "books": [{"id": 100, "author_id": 999, "title": "Orphan"}],
    },
}


def _stored(url: URL) -> dict[str, list[tuple[Any, ...]]]:
    """What a brand-new connection sees in the example's tables: the committed work only."""
    engine = sqlalchemy.create_engine(
        url.set(drivername=SYNC_TWIN[url.drivername]), poolclass=NullPool
    )
    try:
        with engine.connect() as connection:
            authors = connection.execute(select(Author.id, Author.name).order_by(Author.id))
            books = connection.execute(select(Book.id, Book.title).order_by(Book.id))
            return {"authors": [tuple(r) for r in authors], "books": [tuple(r) for r in books]}
    finally:
        engine.dispose()


def _checked_out(app: FastAPI) -> int:
    return app.state.sessions.kw["bind"].pool.checkedout()


class Watched:
    """The app, recording what was true when each response started going out to the client."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_and_look(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.seen.append(
                    {
                        "status": message["status"],
                        "imports": list(self.app.state.imports),
                        "checked_out": _checked_out(self.app),
                    }
                )
            await send(message)

        await self.app(scope, receive, send_and_look)


@contextmanager
def _watched_client(url: URL) -> Iterator[tuple[TestClient, Watched]]:
    watched = Watched(create_fastapi_app(url))
    # raise_server_exceptions=False: the client gets the 500 a real server would send.
    with TestClient(watched, raise_server_exceptions=False) as client:
        yield client, watched
        # Every response, 2xx or not, went out with the request's connection back in the pool.
        assert [seen["checked_out"] for seen in watched.seen] == [0] * len(watched.seen)
        assert _checked_out(watched.app) == 0


def _json(response: Any) -> Any:
    # Starlette's and httpx's responses have a json() method; Flask's has a json property.
    return response.json() if callable(response.json) else response.json


def _create_first_author(client: Any) -> None:
    created = client.post("/authors", json={"name": "First"})
    assert (created.status_code, _json(created)) == (201, {"id": 1, "name": "First"})


@pytest.mark.parametrize("case", FAILING_IMPORTS)
def test_fastapi_failing_commit_is_a_500_and_stores_nothing(async_url: URL, case: str) -> None:
    with _watched_client(async_url) as (client, watched):
        _create_first_author(client)
        response = client.post("/import", json=FAILING_IMPORTS[case])
        assert response.status_code == 500
        assert watched.seen[-1] == {"status": 500, "imports": [], "checked_out": 0}
        assert watched.app.state.imports == []  # the callback never ran
    assert _stored(async_url) == {"authors": [(1, "First")], "books": []}


def test_fastapi_failing_commit_reaches_the_apps_exception_handler(async_url: URL) -> None:
    app = create_fastapi_app(async_url)

    async def conflict(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, IntegrityError)
        return JSONResponse(status_code=409, content={"detail": "conflict"})

    app.add_exception_handler(IntegrityError, conflict)
    with TestClient(app) as client:
        _create_first_author(client)
        response = client.post("/import", json=FAILING_IMPORTS["taken-id"])
        assert (response.status_code, response.json()) == (409, {"detail": "conflict"})
        assert _checked_out(app) == 0
    assert _stored(async_url) == {"authors": [(1, "First")], "books": []}


def test_fastapi_on_commit_callbacks_have_run_when_the_response_goes_out(async_url: URL) -> None:
    catalog = {
        "books": [{"id": 7, "author_id": 7, "title": "Book before its author"}],
        "authors": [{"id": 7, "name": "Seven"}],
    }
    with _watched_client(async_url) as (client, watched):
        response = client.post("/import", json=catalog)
        assert (response.status_code, response.json()) == (201, {"authors": 1, "books": 1})
        assert watched.app.state.imports == [{"authors": 1, "books": 1}]
        # ...and they had run, and the connection was back in the pool, before it was sent.
        assert watched.seen[-1] == {
            "status": 201,
            "imports": [{"authors": 1, "books": 1}],
            "checked_out": 0,
        }
    assert _stored(async_url) == {
        "authors": [(7, "Seven")],
        "books": [(7, "Book before its author")],
    }


def test_fastapi_http_exception_after_a_flush_rolls_back(async_url: URL) -> None:
    with _watched_client(async_url) as (client, watched):
        _create_first_author(client)
        book = {"title": "Twice"}
        assert client.post("/authors/1/books", json=book).status_code == 201
        # The second INSERT is flushed, then the endpoint raises HTTPException(409).
        again = client.post("/authors/1/books", json=book)
        assert again.status_code == 409
        assert again.json() == {"detail": "that author has a book of that title"}
        # Rolled back and the connection returned before the 409 went out: on SQLite the
        # write lock is already released when the client could retry.
        assert watched.seen[-1] == {"status": 409, "imports": [], "checked_out": 0}
        assert [b["title"] for b in client.get("/authors/1/books").json()] == ["Twice"]
    assert _stored(async_url) == {"authors": [(1, "First")], "books": [(1, "Twice")]}


def test_fastapi_through_uvicorn_commit_comes_before_the_answer(async_url: URL) -> None:
    watched = Watched(create_fastapi_app(async_url))
    with (
        serving_asgi(watched) as (base_url, log),
        httpx2.Client(
            # A new connection per request: uvicorn closes one after a 500, and a reused
            # keep-alive connection would race that close.
            base_url=base_url,
            headers={"Connection": "close"},
            timeout=30,
        ) as client,
    ):
        _create_first_author(client)

        ok = client.post("/import", json={"authors": [{"id": 2, "name": "Second"}]})
        assert (ok.status_code, ok.json()) == (201, {"authors": 1, "books": 0})
        # The on_commit callback ran before the answer: it is there as soon as the client is.
        assert watched.app.state.imports == [{"authors": 1, "books": 0}]
        assert watched.seen[-1] == {"status": 201, "imports": [ok.json()], "checked_out": 0}

        for case, catalog in FAILING_IMPORTS.items():
            failed = client.post("/import", json=catalog)
            assert failed.status_code == 500, case
            assert watched.seen[-1]["checked_out"] == 0, case
        assert watched.app.state.imports == [{"authors": 1, "books": 0}]

        assert client.post("/authors/1/books", json={"title": "Twice"}).status_code == 201
        assert client.post("/authors/1/books", json={"title": "Twice"}).status_code == 409
        assert watched.seen[-1] == {"status": 409, "imports": [ok.json()], "checked_out": 0}
        assert _checked_out(watched.app) == 0
    # The two failed commits are the only errors uvicorn logged (each an error response).
    assert len(log.errors) == len(FAILING_IMPORTS), log.errors
    assert _stored(async_url) == {"authors": [(1, "First"), (2, "Second")], "books": [(1, "Twice")]}


# --- Flask: the unit of work ends before the response is sent -----------------------------------


def _flask_checked_out(app: Flask) -> int:
    return app.extensions["ormkit"].kw["bind"].pool.checkedout()


class WatchedWsgi:
    """What was true when each response of the Flask app started going out (see _WsgiAround)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []


@contextmanager
def _watched_flask(url: URL) -> Iterator[tuple[Any, WatchedWsgi]]:
    app = create_flask_app(url)
    watched = WatchedWsgi(app)
    app.wsgi_app = _WsgiAround(app.wsgi_app, watched)  # type: ignore[method-assign]
    try:
        yield app.test_client(), watched
        assert [seen["checked_out"] for seen in watched.seen] == [0] * len(watched.seen)
        assert _flask_checked_out(app) == 0
    finally:
        app.extensions["ormkit"].kw["bind"].dispose()


class _WsgiAround:
    """Puts `watched`'s start_response between Flask and the client (test client or server)."""

    def __init__(self, wsgi_app: Any, watched: WatchedWsgi) -> None:
        self.wsgi_app, self.watched = wsgi_app, watched

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def start_and_look(status: str, headers: Any, exc_info: Any = None) -> Any:
            app = self.watched.app
            self.watched.seen.append(
                {
                    "status": int(status.split(maxsplit=1)[0]),
                    "imports": list(app.config["imports"]),
                    "checked_out": _flask_checked_out(app),
                }
            )
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, start_and_look)


@pytest.mark.parametrize("case", FAILING_IMPORTS)
def test_flask_failing_commit_is_a_500_and_stores_nothing(sync_url: URL, case: str) -> None:
    with _watched_flask(sync_url) as (client, watched):
        _create_first_author(client)
        response = client.post("/import", json=FAILING_IMPORTS[case])
        assert response.status_code == 500
        assert watched.seen[-1] == {"status": 500, "imports": [], "checked_out": 0}
        assert watched.app.config["imports"] == []  # the callback never ran
    assert _stored(sync_url) == {"authors": [(1, "First")], "books": []}


def test_flask_on_commit_callbacks_have_run_when_the_response_goes_out(sync_url: URL) -> None:
    catalog = {
        "books": [{"id": 7, "author_id": 7, "title": "Book before its author"}],
        "authors": [{"id": 7, "name": "Seven"}],
    }
    with _watched_flask(sync_url) as (client, watched):
        response = client.post("/import", json=catalog)
        assert (response.status_code, response.json) == (201, {"authors": 1, "books": 1})
        assert watched.seen[-1] == {
            "status": 201,
            "imports": [{"authors": 1, "books": 1}],
            "checked_out": 0,
        }
    assert _stored(sync_url) == {
        "authors": [(7, "Seven")],
        "books": [(7, "Book before its author")],
    }


def test_flask_abort_after_a_flush_rolls_back(sync_url: URL) -> None:
    with _watched_flask(sync_url) as (client, watched):
        _create_first_author(client)
        book = {"title": "Twice"}
        assert client.post("/authors/1/books", json=book).status_code == 201
        # The second INSERT is flushed, then the view calls abort(409).
        again = client.post("/authors/1/books", json=book)
        assert again.status_code == 409
        assert watched.seen[-1] == {"status": 409, "imports": [], "checked_out": 0}
        assert [b["title"] for b in client.get("/authors/1/books").json] == ["Twice"]
    assert _stored(sync_url) == {"authors": [(1, "First")], "books": [(1, "Twice")]}


def test_flask_through_waitress_commit_comes_before_the_answer(sync_url: URL) -> None:
    with _watched_flask(sync_url) as (_client, watched):
        app = watched.app
        with (
            serving_wsgi(app, loggers=(app.name,)) as (base_url, log),
            httpx2.Client(base_url=base_url, timeout=30) as client,
        ):
            _create_first_author(client)
            ok = client.post("/import", json={"authors": [{"id": 2, "name": "Second"}]})
            assert (ok.status_code, ok.json()) == (201, {"authors": 1, "books": 0})
            assert watched.seen[-1] == {"status": 201, "imports": [ok.json()], "checked_out": 0}
            for case, catalog in FAILING_IMPORTS.items():
                assert client.post("/import", json=catalog).status_code == 500, case
            assert client.post("/authors/1/books", json={"title": "Twice"}).status_code == 201
            assert client.post("/authors/1/books", json={"title": "Twice"}).status_code == 409
            assert app.config["imports"] == [{"authors": 1, "books": 0}]
        # Flask logs each failed commit (a 500); nothing else went wrong.
        assert len(log.errors) == len(FAILING_IMPORTS), log.errors
    assert _stored(sync_url) == {"authors": [(1, "First"), (2, "Second")], "books": [(1, "Twice")]}
