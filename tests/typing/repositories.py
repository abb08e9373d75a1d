"""What users see of repositories and units of work; read by mypy and pyright, never run."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from typing_extensions import assert_type

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork, Repository, UnitOfWork


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))


class UserRepository(Repository[User, int]):
    def by_email(self, email: str) -> User | None:
        return self.find_one(User.email == email)


class AsyncUserRepository(AsyncRepository[User, int]):
    pass


def sync_use(session: Session) -> None:
    users = UserRepository(session)
    assert_type(users.model, type[User])
    assert_type(users.session, Session)
    assert_type(users.by_id(1), User | None)
    assert_type(users.by_id(1, for_update=True), User | None)
    assert_type(users.by_id_or_raise(1), User)
    assert_type(users.by_ids([1, 2]), list[User])
    assert_type(users.find(User.id > 1, order_by=User.id, limit=2), list[User])
    assert_type(users.find_one(User.email == "x"), User | None)
    assert_type(users.count(), int)
    assert_type(users.exists(User.id == 1), bool)
    assert_type(users.add(User()), User)
    assert_type(users.add_all([User()]), list[User])
    assert_type(users.update_where({"email": "x"}, User.id == 1), int)
    assert_type(users.delete_where(User.id == 1, synchronize_session="fetch"), int)

    assert_type(users.upsert_many([{"id": 1, "email": "x"}]), list[User])
    assert_type(users.upsert({"email": "x"}, on="email", update=()), User)
    assert_type(users.upsert({"email": "x"}, on=[User.email], update=[User.email]), User)
    page = users.page(User.id > 1, order_by=[User.email.desc()], limit=20, with_total=True)
    assert_type(page, ormkit.Page[User])
    assert_type(page.items, tuple[User, ...])
    assert_type(page.next, str | None)
    assert_type(page.total, int | None)
    assert_type(users.page(order_by=User.id, limit=20, after=page.next), ormkit.Page[User])
    users.page(order_by=User.id)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    users.page(order_by=User.id, limit=20, after=3)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    page.next = None  # type: ignore[misc]  # pyright: ignore[reportAttributeAccessIssue]

    mode: ormkit.SynchronizeSession = "evaluate"  # application code can annotate with it
    assert_type(users.update_where({"email": "x"}, User.id == 1, synchronize_session=mode), int)

    users.by_id("1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    users.by_ids(["1"])  # type: ignore[list-item]  # pyright: ignore[reportArgumentType]
    users.delete_where(User.id == 1, synchronize_session="always")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

    factory = ormkit.create_session_factory("sqlite://")
    with UnitOfWork(factory) as uow:
        assert_type(uow, UnitOfWork)
        assert_type(uow.session, Session)
        assert_type(uow.repository(UserRepository), UserRepository)
        assert_type(uow.add(User()), User)
        uow.on_commit(lambda: None)
        uow.on_commit(lambda: None, robust=True)
        uow.on_commit(lambda: None, robust="yes")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        with uow.savepoint():
            pass

    def count_users(uow: UnitOfWork) -> int:
        return uow.repository(UserRepository).count()

    assert_type(UnitOfWork.run(factory, count_users, attempts=5), int)
    assert_type(UnitOfWork.run(factory, lambda uow: uow.add(User())), User)
    UnitOfWork.run(factory, lambda _uow, _extra: None)  # type: ignore[arg-type,misc]  # pyright: ignore[reportArgumentType, reportUnknownLambdaType]
    UnitOfWork(ormkit.create_async_session_factory("sqlite+aiosqlite://"))  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    assert_type(UnitOfWork(factory, durable=True), UnitOfWork)


async def async_use(session: AsyncSession) -> None:
    users = AsyncUserRepository(session)
    assert_type(users.session, AsyncSession)
    assert_type(await users.by_id(1), User | None)
    assert_type(await users.by_id_or_raise(1), User)
    assert_type(await users.by_ids([1]), list[User])
    assert_type(await users.find(), list[User])
    assert_type(await users.count(), int)
    assert_type(users.add(User()), User)
    assert_type(await users.upsert_many([{"id": 1}], on=("id",)), list[User])
    assert_type(await users.upsert({"id": 1}), User)
    assert_type(await users.page(order_by=User.email, limit=5), ormkit.Page[User])
    await users.by_id("1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

    async def notify() -> None:
        pass

    factory = ormkit.create_async_session_factory("sqlite+aiosqlite://")
    async with AsyncUnitOfWork(factory, isolation_level="SERIALIZABLE") as uow:
        assert_type(uow, AsyncUnitOfWork)
        assert_type(uow.session, AsyncSession)
        assert_type(uow.repository(AsyncUserRepository), AsyncUserRepository)
        uow.on_commit(notify)
        uow.on_commit(lambda: None)
        async with uow.savepoint():
            await uow.flush()
        uow.repository(UserRepository)  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]

    async def count_users(uow: AsyncUnitOfWork) -> int:
        return await uow.repository(AsyncUserRepository).count()

    assert_type(await AsyncUnitOfWork.run(factory, count_users), int)
