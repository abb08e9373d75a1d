"""FastAPI dependencies: one unit of work per request, committed before the response is sent.

```python
from typing import Annotated

from fastapi import Depends, FastAPI

import ormkit
from ormkit import AsyncUnitOfWork
from ormkit.fastapi import repository, unit_of_work

sessions = ormkit.create_async_session_factory("sqlite+aiosqlite:///app.db")
UoW = Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))]
Users = Annotated[UserRepository, Depends(repository(UserRepository, sessions))]

app = FastAPI()


@app.post("/users", status_code=201)
async def sign_up(body: SignUp, users: Users, uow: UoW) -> UserOut:
    user = users.add(User(name=body.name))
    await uow.flush()
    return UserOut(id=user.id, name=user.name)
```

The request's unit of work commits when the endpoint returns and before FastAPI sends the
response, so a commit that fails is the error the app's exception handlers see (a 500 by
default), never a 2xx for work that was not stored; an exception raised by the endpoint or a
dependency (an `HTTPException` too) rolls it back; `on_commit` callbacks have run when the client
gets its answer. Every dependency of one request that asks for the unit of work, directly or
through `repository`, gets the same one.

How: the unit of work is entered by a `yield` dependency declared with `scope="function"`,
whose exit FastAPI runs right after the endpoint returns. A dependency with the default scope
exits only after the response is sent (FastAPI 0.118 and later), too late to report a failed
commit; `scope` exists from FastAPI 0.121 on, the floor of the `ormkit[fastapi]` extra.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref

# At run time, not only for type checkers: FastAPI reads a dependency's annotations, its
# return annotation included (some releases evaluate it), in this module's namespace.
from collections.abc import AsyncIterator  # noqa: TC003
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

try:
    import fastapi
    from fastapi import Depends
except ImportError as error:  # pragma: no cover - proven in a test that hides FastAPI
    raise ImportError(
        "ormkit.fastapi needs FastAPI: install it with `pip install 'ormkit[fastapi]'`"
    ) from error

import anyio
import anyio.to_thread
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

from ormkit._cancellation import shielded, wait_until_idle
from ormkit._checks import describe
from ormkit._repository import AsyncRepository, Repository
from ormkit._uow import AsyncUnitOfWork, UnitOfWork
from ormkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

if "scope" not in inspect.signature(Depends).parameters:
    raise ImportError(
        f"ormkit.fastapi needs FastAPI 0.121 or later, found {fastapi.__version__}: it commits "
        "in a dependency declared with scope='function', which older releases do not have; "
        "install a newer one with `pip install 'ormkit[fastapi]'`"
    )

__all__ = ["repository", "unit_of_work"]

logger = logging.getLogger("ormkit")

RepositoryT = TypeVar("RepositoryT", bound="Repository[Any, Any]")
AsyncRepositoryT = TypeVar("AsyncRepositoryT", bound="AsyncRepository[Any, Any]")

# factory -> the dependency that gives its request's unit of work. One per factory, so every
# `unit_of_work(factory)` and `repository(..., factory)` of a request shares FastAPI's cached
# value: one unit of work per request and factory.
_dependencies: weakref.WeakKeyDictionary[object, Callable[..., Any]] = weakref.WeakKeyDictionary()


def _opener(factory: object) -> Callable[..., Any]:
    """The `yield` dependency entering the unit of work; FastAPI exits it with the endpoint."""
    if isinstance(factory, async_sessionmaker):
        async_factory = cast("async_sessionmaker[AsyncSession]", factory)

        async def open_async_unit_of_work() -> AsyncIterator[AsyncUnitOfWork]:
            async with AsyncUnitOfWork(async_factory) as uow:
                yield uow

        return open_async_unit_of_work
    sync_factory = cast("sessionmaker[Session]", factory)

    async def open_unit_of_work() -> AsyncIterator[UnitOfWork]:
        uow = UnitOfWork(sync_factory)
        # Entered here, in the request's task (no I/O: the session connects at its first
        # statement), and listed for the worker threads FastAPI runs a sync endpoint in: a
        # `with UnitOfWork(factory)` in the endpoint joins it, as it would in async code.
        uow._for_worker_threads = True  # noqa: SLF001  # pyright: ignore[reportPrivateUsage]
        uow.__enter__()
        try:
            yield uow
        except BaseException as error:
            await _end_in_a_thread(uow, error)
            raise
        await _end_in_a_thread(uow, None)

    return open_unit_of_work


async def _end_in_a_thread(uow: UnitOfWork, error: BaseException | None) -> None:
    """Commit (or roll back) in a worker thread, through any cancellation of the request.

    A limiter of its own: the commit never waits for a thread of FastAPI's pool, which
    endpoints waiting for a pooled connection may all hold. Shielded: a cancelled request (a
    timeout, a server shutting down) still ends its unit of work, and is cancelled after.
    """
    end = functools.partial(_end, uow, error)
    cancelled = await shielded(anyio.to_thread.run_sync(end, limiter=anyio.CapacityLimiter(1)))
    if cancelled is not None:
        raise cancelled


def _end(uow: UnitOfWork, error: BaseException | None) -> None:
    # A cancellation can leave the endpoint's thread inside a statement: let it finish first,
    # or the rollback would run under its feet (and its statement after it, outside any
    # transaction). Past the wait, its connection is discarded rather than pooled.
    session = uow.session
    if not wait_until_idle(session):
        logger.error("the request's endpoint kept its session busy; its connection is discarded")
        session.invalidate()
    if error is None:
        uow.__exit__(None, None, None)
    else:
        uow.__exit__(type(error), error, error.__traceback__)


def _dependency(factory: object) -> Callable[..., Any]:
    if not isinstance(factory, (sessionmaker, async_sessionmaker)):
        raise InvalidArgumentError(
            f"ormkit.fastapi takes a session factory, got {describe(factory)}; make one with "
            "ormkit.create_async_session_factory(url) (or create_session_factory for sync code)"
        )
    known = cast("sessionmaker[Session] | async_sessionmaker[AsyncSession]", factory)
    dependency = _dependencies.get(known)
    if dependency is None:
        opener = _opener(known)

        # A plain function over the scoped one: the user's `Depends(unit_of_work(f))` keeps its
        # default scope, and FastAPI lets that depend on a function-scoped dependency.
        async def request_unit_of_work(
            uow: Any = Depends(opener, scope="function"),  # noqa: B008 - FastAPI's idiom
        ) -> Any:
            return uow

        dependency = _dependencies[known] = request_unit_of_work
    return dependency


@overload
def unit_of_work(
    factory: async_sessionmaker[AsyncSession],
) -> Callable[..., Awaitable[AsyncUnitOfWork]]: ...
@overload
def unit_of_work(factory: sessionmaker[Session]) -> Callable[..., Awaitable[UnitOfWork]]: ...
def unit_of_work(factory: object) -> Callable[..., Awaitable[object]]:
    """A dependency giving the request's unit of work of `factory`.

    An `AsyncUnitOfWork` for an `async_sessionmaker`; a `UnitOfWork` for a `sessionmaker`,
    for `def` endpoints, which FastAPI runs in worker threads: a `with UnitOfWork(factory)` in
    the endpoint joins it, and it commits in a worker thread of its own (its objects expire at
    that commit, after the endpoint returned, as in any sync unit of work). Use it as
    `Annotated[AsyncUnitOfWork, Depends(unit_of_work(factory))]`.

    Raises:
        InvalidArgumentError: `factory` is not a session factory (when the app is declared).
    """
    return _dependency(factory)


@overload
def repository(
    repository_class: type[AsyncRepositoryT], factory: async_sessionmaker[AsyncSession]
) -> Callable[..., Awaitable[AsyncRepositoryT]]: ...
@overload
def repository(
    repository_class: type[RepositoryT], factory: sessionmaker[Session]
) -> Callable[..., Awaitable[RepositoryT]]: ...
def repository(repository_class: object, factory: object) -> Callable[..., Awaitable[Any]]:
    """A dependency giving a `repository_class` over the request's unit of work of `factory`.

    The same unit of work as `unit_of_work(factory)` gives in that request: use both in one
    endpoint to flush, or to register `on_commit` callbacks, next to the repository.

    Raises:
        InvalidArgumentError: `repository_class` is not a repository class of the factory's
            flavour (`AsyncRepository` for an `async_sessionmaker`, `Repository` for a
            `sessionmaker`), checked when the app is declared.
    """
    opener = _dependency(factory)  # refuses what is not a session factory
    given = describe(repository_class)
    is_async = isinstance(factory, async_sessionmaker)
    flavour, wanted = (
        ("an async_sessionmaker", AsyncRepository) if is_async else ("a sessionmaker", Repository)
    )
    if not (isinstance(repository_class, type) and issubclass(repository_class, wanted)):
        raise InvalidArgumentError(
            f"ormkit.fastapi.repository() over {flavour} takes a subclass of "
            f"{wanted.__name__}, got {given}"
        )

    async def request_repository(
        uow: Any = Depends(opener),  # noqa: B008 - FastAPI's idiom
    ) -> Any:
        return uow.repository(repository_class)

    return request_repository


def _uncalled(name: str, example: str) -> inspect.Signature:
    """A signature for FastAPI's eyes only, should `Depends({name})` be given the function.

    FastAPI would read the parameters as query parameters: every request a 422 that asks the
    client for a `factory`. Each is a dependency that raises instead, with what to write.
    """

    def refuse() -> None:
        raise InvalidArgumentError(
            f"Depends({name}) is given the function itself; give it the dependency that "
            f"{name}(...) returns: Depends({example})"
        )

    return inspect.Signature(
        [
            inspect.Parameter(parameter, inspect.Parameter.KEYWORD_ONLY, default=Depends(refuse))
            for parameter in inspect.signature(globals()[name]).parameters
        ]
    )


# inspect.signature (FastAPI's) prefers __signature__; type checkers and the docs read the code.
unit_of_work.__signature__ = _uncalled(  # type: ignore[attr-defined]
    "unit_of_work", "unit_of_work(SessionLocal)"
)
repository.__signature__ = _uncalled(  # type: ignore[attr-defined]
    "repository", "repository(UserRepository, SessionLocal)"
)
