"""ormkit's quickstart, on SQLite: run it with `python examples/quickstart.py`.

It shows, with the SQL each step sends (counted by `ormkit.testing.count_queries`), how ormkit's
session factories treat objects after a commit:

- sync sessions expire them (`expire_on_commit=True`): the next read re-selects fresh data;
- async sessions keep them (`expire_on_commit=False`): reading costs nothing and never needs
  the lazy load that async code cannot do (`MissingGreenlet`).
"""

from __future__ import annotations

import asyncio

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit.testing import count_queries


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


def _queries(count: int) -> str:
    return f"{count} query" if count == 1 else f"{count} queries"


def sync_part() -> None:
    engine = ormkit.create_engine("sqlite://")  # one shared memory database
    Base.metadata.create_all(engine)
    SessionLocal = ormkit.create_session_factory(engine)  # noqa: N806 (a factory, named like a class)

    with SessionLocal() as session:
        user = User(name="roach")
        session.add(user)
        session.commit()
        with count_queries(session) as log:
            print(f"sync:  after commit, user.name = {user.name!r}")
        print(f"sync:  reading it cost {_queries(log.count)} (expired on commit, re-selected)")
    engine.dispose()


async def async_part() -> None:
    engine = ormkit.create_async_engine("sqlite+aiosqlite://")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    SessionLocal = ormkit.create_async_session_factory(engine)  # noqa: N806

    async with SessionLocal() as session:
        user = User(name="roach")
        session.add(user)
        await session.commit()
        with count_queries(session) as log:
            print(f"async: after commit, user.name = {user.name!r}")
        print(f"async: reading it cost {_queries(log.count)} (kept loaded, no lazy load)")
    await engine.dispose()


if __name__ == "__main__":
    sync_part()
    asyncio.run(async_part())
