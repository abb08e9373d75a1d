"""`ormkit.flask`: the request's unit of work, its lifetime and the refusals, on both sync backends.

The example app (tests/test_integrations.py) proves the request cycle end to end; here: the
lazy opening, errors from every place Flask runs code (a view, a `before_request` function, an
`after_request` function), `uow()` where there is no request or after its unit of work ended,
and the set-up mistakes.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import TYPE_CHECKING, Any

import pytest
from flask import Blueprint, Flask, abort
from sqlalchemy import event, select

import ormkit
from examples.flask_app import Author, Base
from ormkit import ConfigurationError, InvalidArgumentError, TransactionError, UnitOfWork
from ormkit.flask import Ormkit, uow

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import URL
    from sqlalchemy.orm import Session, sessionmaker


@pytest.fixture
def sessions(sync_url: URL) -> Iterator[sessionmaker[Session]]:
    engine = ormkit.create_engine(sync_url)
    Base.metadata.create_all(engine)
    yield ormkit.create_session_factory(engine)
    assert engine.pool.checkedout() == 0
    engine.dispose()


def _stored(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(Author.name).order_by(Author.id)))


def _app(sessions: sessionmaker[Session]) -> Flask:
    app = Flask(__name__)
    Ormkit(app, sessions)

    @app.post("/<name>")
    def add(name: str) -> tuple[str, int]:
        uow().add(Author(name=name))
        uow().flush()
        if name == "abort":
            abort(418)
        if name == "raise":
            raise ValueError(name)
        return name, 201

    return app


def test_a_request_that_never_asks_touches_no_database(sessions: sessionmaker[Session]) -> None:
    app = _app(sessions)
    checkouts: list[object] = []
    event.listen(sessions.kw["bind"], "checkout", lambda *args: checkouts.append(args))

    @app.get("/nothing")
    def nothing() -> str:
        return "no database here"

    assert app.test_client().get("/nothing").status_code == 200
    assert checkouts == []


def test_one_unit_of_work_per_request(sessions: sessionmaker[Session]) -> None:
    app = _app(sessions)
    seen: list[UnitOfWork] = []

    @app.get("/twice")
    def twice() -> str:
        seen.extend([uow(), uow()])
        return "ok"

    client = app.test_client()
    assert client.get("/twice").status_code == 200
    assert client.get("/twice").status_code == 200
    assert seen[0] is seen[1]
    assert seen[2] is seen[3]
    assert seen[0] is not seen[2]


@pytest.mark.parametrize(("name", "status"), [("abort", 418), ("raise", 500)])
def test_an_error_in_the_view_after_a_flush_rolls_back(
    sessions: sessionmaker[Session], name: str, status: int
) -> None:
    client = _app(sessions).test_client()
    assert client.post("/kept").status_code == 201
    assert client.post(f"/{name}").status_code == status
    assert _stored(sessions) == ["kept"]


def test_an_error_in_a_before_request_function_rolls_back(sessions: sessionmaker[Session]) -> None:
    app = _app(sessions)

    @app.before_request
    def add_then_refuse() -> None:
        uow().add(Author(name="before"))
        uow().flush()
        abort(403)

    assert app.test_client().post("/view").status_code == 403
    assert _stored(sessions) == []


def test_an_error_in_a_later_after_request_function_rolls_back(
    sessions: sessionmaker[Session],
) -> None:
    app = _app(sessions)

    # Registered after Ormkit, so Flask runs it before ormkit's commit: its error must stop it.
    @app.after_request
    def fail(_response: Any) -> Any:
        raise RuntimeError("after_request failed")

    assert app.test_client().post("/lost").status_code == 500
    assert _stored(sessions) == []


def test_a_view_returning_what_is_no_response_rolls_back(sessions: sessionmaker[Session]) -> None:
    app = _app(sessions)

    @app.post("/none")
    def returns_none() -> Any:
        uow().add(Author(name="lost"))
        # Flask fails to make a response of None, after the view returned: a 500, no commit.

    assert app.test_client().post("/none").status_code == 500
    assert _stored(sessions) == []


def test_uow_after_the_unit_of_work_ended_is_refused(sessions: sessionmaker[Session]) -> None:
    app = Flask(__name__)
    errors: list[Exception] = []

    # Registered before Ormkit, so Flask runs it after ormkit's commit.
    @app.after_request
    def too_late(response: Any) -> Any:
        try:
            uow()
        except TransactionError as error:
            errors.append(error)
        return response

    Ormkit(app, sessions)

    @app.post("/")
    def add() -> tuple[str, int]:
        uow().add(Author(name="stored"))
        return "", 201

    assert app.test_client().post("/").status_code == 201
    assert len(errors) == 1
    assert "this request's unit of work has ended" in str(errors[0])
    assert _stored(sessions) == ["stored"]


def test_uow_outside_a_request_says_it_needs_one(sessions: sessionmaker[Session]) -> None:
    app = _app(sessions)
    with pytest.raises(TransactionError, match="needs an active request"):
        uow()
    with app.app_context(), pytest.raises(TransactionError, match="needs an active request"):
        uow()  # an app context (a CLI command) is not a request


def test_uow_in_an_app_without_ormkit_says_how_to_add_it() -> None:
    app = Flask(__name__)
    with (
        app.test_request_context(),
        pytest.raises(ConfigurationError, match=re.escape("call `Ormkit(app, factory)`")),
    ):
        uow()


def test_init_app_in_an_app_factory(sessions: sessionmaker[Session]) -> None:
    extension = Ormkit(factory=sessions)
    app = Flask(__name__)
    extension.init_app(app)

    @app.post("/")
    def add() -> tuple[str, int]:
        uow().add(Author(name="factory"))
        return "", 201

    assert app.test_client().post("/").status_code == 201
    assert _stored(sessions) == ["factory"]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: Ormkit(Flask(__name__)), InvalidArgumentError, "takes a sessionmaker, got None"),
        (
            lambda: Ormkit(
                Flask(__name__), ormkit.create_async_session_factory("sqlite+aiosqlite://")
            ),
            InvalidArgumentError,
            "Flask views are sync: use ormkit.create_session_factory",
        ),
        (
            lambda: Ormkit(Blueprint("bp", __name__), ormkit.create_session_factory("sqlite://")),  # type: ignore[arg-type]
            InvalidArgumentError,
            "Ormkit takes a Flask app, got <Blueprint 'bp'>",
        ),
    ],
)
def test_set_up_mistakes_are_refused(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_a_second_ormkit_on_one_app_is_refused() -> None:
    app = Flask(__name__)
    Ormkit(app, ormkit.create_session_factory("sqlite://"))
    with pytest.raises(ConfigurationError, match="already has an Ormkit"):
        Ormkit(app, ormkit.create_session_factory("sqlite://"))


def test_importing_it_without_flask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ormkit.flask")
    monkeypatch.setitem(sys.modules, "flask", None)
    with pytest.raises(ImportError, match=r"pip install 'ormkit\[flask\]'"):
        importlib.import_module("ormkit.flask")
