"""The example apps, driven through each framework's own test client, on every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from examples.fastapi_app import create_app as create_fastapi_app
from examples.flask_app import create_app as create_flask_app

if TYPE_CHECKING:
    from sqlalchemy import URL


def _exercise(client) -> None:
    """The same story for both apps, through their own test clients."""

    def code(response) -> int:
        return response.status_code

    def body(response):
        # Starlette's response has a json() method; Flask's has a json property.
        return response.json() if callable(response.json) else response.json

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
    else:
        with TestClient(app) as client:
            assert client.post("/authors", json={"name": "a"}).status_code == 201
