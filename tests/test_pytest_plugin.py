"""The pytest plugin, driven as a user's suite would drive it: through pytester, in a subprocess.

Each case writes a small project (a conftest with `ormkit_session_factory` on one of the five
backends, and tests that use ormkit's fixtures), runs pytest on it in a fresh process (so the
plugin comes in through its `pytest11` entry point, as for a user), and checks the outcome:
two tests inserting the same primary key both pass (each ran rolled back), a wrong count fails
with the SQL in the report, and the database is left as it was.
"""

from __future__ import annotations

import textwrap

import pytest
from sqlalchemy import URL

from tests.fresh import fresh_committed_ids

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "plugin_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
"""

SYNC_CONFTEST = """
import pytest

import ormkit
from models import Base

URL = {url!r}


@pytest.fixture(scope="session")
def engine():
    engine = ormkit.create_engine(URL)
    Base.metadata.create_all(engine)
    yield engine
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.fixture
def ormkit_session_factory(engine):
    return ormkit.create_session_factory(engine)
"""

SYNC_TESTS = """
from sqlalchemy import func, select

from models import Item
from ormkit import UnitOfWork


def _count(factory):
    with factory() as session:
        return session.scalar(select(func.count()).select_from(Item))


def test_first_inserts_item_1(ormkit_rolled_back, ormkit_session_factory):
    with UnitOfWork(ormkit_session_factory) as uow:
        uow.add(Item(id=1, name="first"))
    assert _count(ormkit_session_factory) == 1


def test_second_inserts_item_1_too(ormkit_rolled_back, ormkit_session_factory):
    with UnitOfWork(ormkit_session_factory) as uow:  # a duplicate key unless the first was undone
        uow.add(Item(id=1, name="second"))
    assert _count(ormkit_session_factory) == 1


def test_a_wrong_count_fails(ormkit_rolled_back, ormkit_session_factory, ormkit_queries):
    with ormkit_session_factory() as session, ormkit_queries(0):
        session.execute(select(Item).where(Item.name == "needle"))


def test_an_n_plus_one_guard(ormkit_rolled_back, ormkit_session_factory, ormkit_max_queries):
    with ormkit_session_factory() as session, ormkit_max_queries(1):
        session.execute(select(Item))
"""

ASYNC_CONFTEST = """
import pytest
import pytest_asyncio

import ormkit
from models import Base

URL = {url!r}


@pytest_asyncio.fixture
async def ormkit_session_factory():
    # Made per test, inside its event loop: asyncpg ties a connection to one loop.
    engine = ormkit.create_async_engine(URL)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield ormkit.create_async_session_factory(engine)
    assert engine.pool.checkedout() == 0
    await engine.dispose()
"""

ASYNC_TESTS = """
import pytest
from sqlalchemy import func, select

from models import Item
from ormkit import AsyncUnitOfWork


async def _count(factory):
    async with factory() as session:
        return await session.scalar(select(func.count()).select_from(Item))


{mark}
async def test_first_inserts_item_1(ormkit_rolled_back, ormkit_session_factory):
    async with AsyncUnitOfWork(ormkit_session_factory) as uow:
        uow.add(Item(id=1, name="first"))
    assert await _count(ormkit_session_factory) == 1


{mark}
async def test_second_inserts_item_1_too(ormkit_rolled_back, ormkit_session_factory):
    async with AsyncUnitOfWork(ormkit_session_factory) as uow:
        uow.add(Item(id=1, name="second"))
    assert await _count(ormkit_session_factory) == 1


{mark}
async def test_a_wrong_count_fails(ormkit_rolled_back, ormkit_session_factory, ormkit_queries):
    async with ormkit_session_factory() as session:
        with ormkit_queries(0):
            await session.execute(select(Item).where(Item.name == "needle"))


{mark}
async def test_an_n_plus_one_guard(ormkit_rolled_back, ormkit_session_factory, ormkit_max_queries):
    async with ormkit_session_factory() as session:
        with ormkit_max_queries(1):
            await session.execute(select(Item))
"""


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # pytest-asyncio is installed here, and warns (an error under -W error) without a loop scope.
    options = ("-p", "no:cacheprovider", "-W", "error")
    scope = ("-o", "asyncio_default_fixture_loop_scope=function")
    return pytester.runpytest_subprocess(*options, *scope, *args)


def _plugin_items(url: URL) -> list[int]:
    """The rows of the inner suite's table that a brand-new connection sees."""
    return fresh_committed_ids(url, "plugin_item")


def _check(result: pytest.RunResult) -> None:
    result.assert_outcomes(passed=3, failed=1)
    output = result.stdout.str()
    # The failure names the count and lists the SQL that was sent.
    assert "expected 0 statement(s), 1 were sent" in output
    assert "FROM plugin_item" in output
    assert "WHERE plugin_item.name = " in output


def test_the_plugin_isolates_sync_tests(pytester: pytest.Pytester, sync_url: URL) -> None:
    pytester.makepyfile(models=MODELS, test_items=SYNC_TESTS)
    pytester.makeconftest(SYNC_CONFTEST.format(url=_render(sync_url)))
    _check(_run(pytester))
    assert _plugin_items(sync_url) == []  # every test's work was rolled back


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_the_plugin_isolates_async_tests(
    pytester: pytest.Pytester, async_url: URL, mode: str
) -> None:
    mark = "@pytest.mark.asyncio" if mode == "strict" else ""
    pytester.makepyfile(models=MODELS, test_items=ASYNC_TESTS.format(mark=mark))
    pytester.makeconftest(ASYNC_CONFTEST.format(url=_render(async_url)))
    _check(_run(pytester, "-o", f"asyncio_mode={mode}"))
    assert _plugin_items(async_url) == []


def test_the_plugin_is_inert_until_its_fixtures_are_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain=textwrap.dedent(
            """
            def test_without_ormkit():
                assert True
            """
        )
    )
    assert "ormkit_rolled_back" in _run(pytester, "--fixtures").stdout.str()  # loaded
    _run(pytester).assert_outcomes(passed=1)  # and nothing else happens


def test_a_missing_factory_fixture_says_what_to_define(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_missing=textwrap.dedent(
            """
            def test_needs_a_factory(ormkit_rolled_back):
                pass
            """
        )
    )
    result = _run(pytester)
    result.assert_outcomes(errors=1)
    assert "define a fixture named ormkit_session_factory" in result.stdout.str()
