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

from typing import TYPE_CHECKING, Any, cast

try:
    from flask import Flask, current_app, g, got_request_exception, has_request_context
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
# Request-local state, on flask.g: the open unit of work, the first error of the request, and
# whether the unit of work has ended (after which `uow()` must not open a second one).
_OPEN = "_ormkit_unit_of_work"
_ERROR = "_ormkit_request_error"
_ENDED = "_ormkit_unit_of_work_ended"


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
        TransactionError: there is no active request (a CLI command, a thread of its own, the
            app context alone), or the request's unit of work has already ended (the response
            is being sent).
        ConfigurationError: the app has no `Ormkit`.
    """
    if not has_request_context():
        raise TransactionError(
            "ormkit.flask.uow() needs an active request; outside one (a CLI command, a "
            "background job, a test without a request context), open a "
            "`with UnitOfWork(factory) as uow:` block"
        )
    opened: UnitOfWork | None = g.get(_OPEN)
    if opened is not None:
        return opened
    if g.get(_ENDED):
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
    setattr(g, _OPEN, opened)
    return opened


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
    if has_request_context() and g.get(_ERROR) is None:
        setattr(g, _ERROR, error)


def _on_request_exception(_sender: object, exception: BaseException, **_extra: object) -> None:
    _note_error(exception)


def _finish(error: BaseException | None) -> None:
    """End the open unit of work: commit if `error` is None, else roll back."""
    opened: UnitOfWork | None = g.pop(_OPEN, None)
    setattr(g, _ENDED, True)
    if opened is None:
        return
    if error is None:
        opened.__exit__(None, None, None)  # a failed commit raises: Flask makes it a 500
    else:
        opened.__exit__(type(error), error, error.__traceback__)


def _end_unit_of_work(response: Response) -> Response:
    _finish(g.get(_ERROR))
    return response


def _close_unit_of_work(error: BaseException | None) -> None:
    # Still open only if the response was never finalized (an error on the way): roll back.
    if g.get(_OPEN) is not None:
        _finish(error or g.get(_ERROR) or _Unfinished())


class _Unfinished(Exception):  # noqa: N818 - never raised, only passed to a rollback
    """The request ended without its response being finalized."""
