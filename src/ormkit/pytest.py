"""ormkit's pytest plugin: rollback-per-test isolation and query counts, from one fixture of yours.

Installed with ormkit and loaded through pytest's `pytest11` entry point; it only defines
fixtures, so it does nothing until a test uses one. Give it your application's session factory
in a fixture named `ormkit_session_factory`, in your `conftest.py`:

```python
import pytest

from myapp.db import SessionLocal            # a sessionmaker or an async_sessionmaker


@pytest.fixture
def ormkit_session_factory():
    return SessionLocal


def test_signup(ormkit_rolled_back, ormkit_queries):
    with ormkit_queries(2):                   # fails, listing the SQL, unless exactly 2
        signup("roach")                       # opens UnitOfWork(SessionLocal), commits
```

- `ormkit_rolled_back`: runs the test inside `ormkit.testing.rolled_back(factory)` and gives
  its handle: every session of the factory joins one transaction, rolled back after the test.
  An `async_sessionmaker` needs pytest-asyncio (auto or strict mode).
- `ormkit_queries(n)`: `ormkit.testing.assert_queries(factory, n)`, a context manager.
- `ormkit_max_queries(n)`: `ormkit.testing.assert_max_queries(factory, n)`, an N+1 guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from contextlib import AbstractContextManager

    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlalchemy.orm import sessionmaker

    from ormkit.testing import AsyncRolledBack, QueryLog, QueryTarget, RolledBack

__all__ = [
    "ormkit_max_queries",
    "ormkit_queries",
    "ormkit_rolled_back",
    "ormkit_session_factory",
]

_ASYNC = "_ormkit_async_rolled_back"


@pytest.fixture
def ormkit_session_factory() -> object:
    """Your application's session factory: define this fixture in your conftest.py."""
    pytest.fail(
        "ormkit's fixtures need your application's session factory: define a fixture named "
        "ormkit_session_factory in conftest.py that returns it (a sessionmaker or an "
        "async_sessionmaker, such as ormkit.create_session_factory(engine) makes)",
        pytrace=False,
    )


@pytest.fixture
def ormkit_rolled_back(
    request: pytest.FixtureRequest, ormkit_session_factory: object
) -> Iterator[RolledBack | AsyncRolledBack]:
    """The test runs inside `rolled_back(ormkit_session_factory)`; this is its handle."""
    # Imported here: the plugin is loaded into every pytest run where ormkit is installed.
    from sqlalchemy.ext.asyncio import async_sessionmaker  # noqa: PLC0415

    from ormkit.testing import rolled_back  # noqa: PLC0415

    if isinstance(ormkit_session_factory, async_sessionmaker):
        # An async block needs the test's event loop: pytest-asyncio's fixture runs in it.
        yield cast("AsyncRolledBack", request.getfixturevalue(_ASYNC))
        return
    with rolled_back(cast("sessionmaker[Any]", ormkit_session_factory)) as isolated:
        yield isolated


@pytest.fixture
def ormkit_queries(
    ormkit_session_factory: object,
) -> Callable[[int], AbstractContextManager[QueryLog]]:
    """`ormkit_queries(n)`: a context manager that fails unless exactly n statements are sent."""
    from ormkit.testing import assert_queries  # noqa: PLC0415

    def queries(expected: int) -> AbstractContextManager[QueryLog]:
        return assert_queries(cast("QueryTarget", ormkit_session_factory), expected)

    return queries


@pytest.fixture
def ormkit_max_queries(
    ormkit_session_factory: object,
) -> Callable[[int], AbstractContextManager[QueryLog]]:
    """`ormkit_max_queries(n)`: a context manager that fails if more than n are sent."""
    from ormkit.testing import assert_max_queries  # noqa: PLC0415

    def queries(maximum: int) -> AbstractContextManager[QueryLog]:
        return assert_max_queries(cast("QueryTarget", ormkit_session_factory), maximum)

    return queries


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover (the suite runs with pytest-asyncio installed)

    @pytest.fixture(name=_ASYNC)
    def _no_async_rolled_back() -> None:
        pytest.fail(
            "ormkit_rolled_back with an async_sessionmaker runs in the test's event loop, which "
            "needs pytest-asyncio: pip install pytest-asyncio",
            pytrace=False,
        )

else:

    @pytest_asyncio.fixture(name=_ASYNC)
    async def _ormkit_async_rolled_back(
        ormkit_session_factory: object,
    ) -> AsyncIterator[AsyncRolledBack]:
        from ormkit.testing import rolled_back  # noqa: PLC0415

        async with rolled_back(cast("async_sessionmaker[Any]", ormkit_session_factory)) as isolated:
            yield isolated
