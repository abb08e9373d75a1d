"""Flask integration: the request's unit of work, committed before the response is sent.

```python
from flask import Flask

import ormkit
from ormkit.flask import Ormkit, uow

app = Flask(__name__)
Ormkit(app, ormkit.create_session_factory("sqlite:///app.db"))


@app.post("/users")
def sign_up():
    user = uow().repository(UserRepository).add(User(name=request.json["name"]))
    uow().flush()
    return {"id": user.id, "name": user.name}, 201
```

`uow()` opens the request's `UnitOfWork` on first use (a request that never calls it never
touches the database). It is committed after the view returns and before the response is sent,
so a commit that fails is a 500, never a 2xx for work that was not stored. An exception raised
by the view or a `before_request` function rolls it back, an `abort()` included, although Flask
turns that into a response; so does one raised while the response is finalized. It is closed at
the end of the request in every case.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

try:
    from flask import Flask, current_app, got_request_exception, has_request_context, request
except ImportError as error:  # pragma: no cover - proven in a test that hides Flask
    raise ImportError(
        "ormkit.flask needs Flask: install it with `pip install 'ormkit[flask]'`"
    ) from error

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

from ormkit._checks import describe
from ormkit._uow import UnitOfWork
from ormkit.errors import ConfigurationError, InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from flask import Response
    from sqlalchemy.orm import Session

__all__ = ["Ormkit", "uow"]

_EXTENSION = "ormkit"
_STATE = "ormkit.request"  # the WSGI environ key of a request's _RequestState


class Ormkit:
    """Gives each request of a Flask app one `UnitOfWork` of `factory`, through `uow()`.

    `Ormkit(app, factory)`, or `Ormkit(factory=factory)` then `init_app(app)` in an app
    factory. The factory is a `sessionmaker` (Flask views are sync), for example
    `ormkit.create_session_factory(url)`.
    """

    def __init__(
        self, app: Flask | None = None, factory: sessionmaker[Session] | None = None
    ) -> None:
        self.factory = factory
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, factory: sessionmaker[Session] | None = None) -> None:
        """Install the request hooks on `app`, with `factory` or the one given to `Ormkit`.

        Raises:
            InvalidArgumentError: `app` is not a Flask app, or there is no `sessionmaker`.
            ConfigurationError: `app` already has an `Ormkit`.
        """
        # Checked at run time: a Blueprint is a common mistake.
        if not isinstance(cast("object", app), Flask):
            raise InvalidArgumentError(f"Ormkit takes a Flask app, got {describe(app)}")
        factory = factory if factory is not None else self.factory
        _check_factory(factory)
        if _EXTENSION in app.extensions:
            raise ConfigurationError(
                f"the app {app.name!r} already has an Ormkit; give it one, with one factory"
            )
        app.extensions[_EXTENSION] = factory
        app.after_request(_end_unit_of_work)
        app.teardown_request(_close_unit_of_work)
        # An exception that an error handler turns into a response (`abort(404)` among them)
        # reaches no hook or signal of Flask's, only this method: wrap it on this app.
        handle_user_exception = app.handle_user_exception

        def note_then_handle(error: Exception) -> Any:
            _note_error(error)
            return handle_user_exception(error)

        setattr(app, "handle_user_exception", note_then_handle)  # noqa: B010 - not the method
        # An unhandled one, from the view or from finalizing the response, is signalled.
        got_request_exception.connect(_on_request_exception, app)


def uow() -> UnitOfWork:
    """The current request's unit of work, opened on first use.

    Raises:
        TransactionError: there is no active request (a CLI command, the app context alone),
            the call comes from another thread than the one handling the request (one that
            copied the request context), or the request's unit of work has already ended (the
            response is being sent).
        ConfigurationError: the app has no `Ormkit`.
    """
    if not has_request_context():
        raise TransactionError(
            "ormkit.flask.uow() needs an active request; outside one (a CLI command, a "
            "background job, a test without a request context), open a "
            "`with UnitOfWork(factory) as uow:` block"
        )
    state = _state()
    if state.thread != threading.get_ident():
        # A copied request context (copy_current_request_context) in a thread of its own: a
        # session is for one thread at a time, and a second unit of work would be rolled
        # back, unseen, when the copy's context ends.
        raise TransactionError(
            "ormkit.flask.uow() is the request's unit of work, for the thread that handles the "
            "request; a thread of its own needs a `with UnitOfWork(factory) as uow:` block"
        )
    if state.opened is not None:
        return state.opened
    if state.ended:
        raise TransactionError(
            "this request's unit of work has ended (it commits before the response is sent); "
            "work done while the response streams, or at teardown, needs a "
            "`with UnitOfWork(factory) as uow:` block of its own"
        )
    factory: sessionmaker[Session] | None = current_app.extensions.get(_EXTENSION)
    if factory is None:
        raise ConfigurationError(
            f"the app {current_app.name!r} has no Ormkit: call `Ormkit(app, factory)` (or "
            "`init_app(app)`) where the app is made"
        )
    opened = UnitOfWork(factory)
    opened.__enter__()
    state.opened = opened
    return opened


class _RequestState:
    """One request's unit of work, kept in its WSGI environ.

    Copies of the request context (another thread's) share it, where each would have a
    `flask.g` of its own.
    """

    __slots__ = ("ended", "error", "opened", "thread")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.opened: UnitOfWork | None = None
        self.error: BaseException | None = None
        self.ended = False


def _state() -> _RequestState:
    environ = request.environ
    state = environ.get(_STATE)
    if not isinstance(state, _RequestState):
        state = environ[_STATE] = _RequestState()
    return state


def _check_factory(factory: object) -> None:
    given = describe(factory)
    if isinstance(factory, sessionmaker):
        return
    hint = (
        " (Flask views are sync: use ormkit.create_session_factory, not the async one)"
        if isinstance(factory, async_sessionmaker)
        else ""
    )
    raise InvalidArgumentError(
        f"Ormkit takes a sessionmaker, got {given}{hint}; "
        "make one with "
        "ormkit.create_session_factory(url)"
    )


def _note_error(error: BaseException) -> None:
    if has_request_context():
        state = _state()
        if state.error is None and state.thread == threading.get_ident():
            state.error = error


def _on_request_exception(_sender: object, exception: BaseException, **_extra: object) -> None:
    _note_error(exception)


def _finish(state: _RequestState, error: BaseException | None) -> None:
    """End the open unit of work: commit if `error` is None, else roll back."""
    opened, state.opened, state.ended = state.opened, None, True
    if opened is None:
        return
    if error is None:
        opened.__exit__(None, None, None)  # a failed commit raises: Flask makes it a 500
    else:
        opened.__exit__(type(error), error, error.__traceback__)


def _end_unit_of_work(response: Response) -> Response:
    state = _state()
    if state.thread == threading.get_ident():
        _finish(state, state.error)
    return response


def _close_unit_of_work(error: BaseException | None) -> None:
    state = _state()
    if state.opened is None or state.thread != threading.get_ident():
        return  # ended already; or the teardown of another thread's copy of the context
    if error is not None or state.error is not None:
        _finish(state, error or state.error)  # an error on the way: roll back
        return
    # No error, and no response was finalized: a request context pushed by hand (a test's
    # app.test_request_context()). Its work is rolled back, and said so rather than lost.
    _finish(state, _Unfinished())
    raise TransactionError(
        "the request context ended with its unit of work still open and no response made "
        "(a request context pushed by hand, such as app.test_request_context()), so its work "
        "was rolled back; there, use a `with UnitOfWork(factory) as uow:` block, or send the "
        "request through app.test_client()"
    )


class _Unfinished(Exception):  # noqa: N818 - never raised, only passed to a rollback
    """The request ended without its response being finalized."""
