"""ormkit's quickstart, on SQLite: run it with `python examples/quickstart.py`.

It shows, with the SQL each step sends (counted by `ormkit.testing.count_queries`), how ormkit's
session factories treat objects after a commit:

- sync sessions expire them (`expire_on_commit=True`): the next read re-selects fresh data;
- async sessions keep them (`expire_on_commit=False`): reading costs nothing and never needs
  the lazy load that async code cannot do (`MissingGreenlet`).

Then a unit of work with an explicit flush point, on tables linked by a ForeignKey only, and a
repository whose `by_id` answers from the identity map without a query.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import Repository, UnitOfWork
from ormkit.testing import count_queries


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Address(Base):  # linked to User by a ForeignKey only: no relationship()
    __tablename__ = "addresses"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    email: Mapped[str] = mapped_column(String(200))


class UserRepository(Repository[User, int]):
    pass


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

    with count_queries(engine) as log, UnitOfWork(SessionLocal) as uow:
        user = uow.add(User(name="mo"))
        uow.flush()  # explicit flush point: the INSERT runs, user.id is set
        user_id = user.id  # read inside the block: after it, the object is expired and detached
        uow.add(Address(user_id=user_id, email="mo@example.org"))
        uow.on_commit(lambda: print("uow:   committed; on_commit callbacks run now"))
    print(f"uow:   user {user_id} and an address committed with {_queries(log.count)}")

    with SessionLocal() as session:
        users = UserRepository(session)
        with count_queries(session) as log:
            first = users.by_id(1)
            again = users.by_id(1)
        print(f"repo:  by_id twice cost {_queries(log.count)}; same object: {first is again}")
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
