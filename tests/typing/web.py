"""What users see of ormkit.fastapi and ormkit.flask; read by the type checkers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, FastAPI
from flask import Flask
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from typing_extensions import assert_type

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork, Repository, UnitOfWork
from ormkit.fastapi import repository, unit_of_work
from ormkit.flask import Ormkit, uow


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "user"
    id: Mapped[int] = mapped_column(primary_key=True)


class UserRepository(Repository[User, int]):
    pass


class AsyncUserRepository(AsyncRepository[User, int]):
    pass


sessions = ormkit.create_async_session_factory("sqlite+aiosqlite://")
sync_sessions = ormkit.create_session_factory("sqlite://")

assert_type(unit_of_work(sessions), Callable[..., Awaitable[AsyncUnitOfWork]])
assert_type(unit_of_work(sync_sessions), Callable[..., Awaitable[UnitOfWork]])
assert_type(
    repository(AsyncUserRepository, sessions), Callable[..., Awaitable[AsyncUserRepository]]
)
assert_type(repository(UserRepository, sync_sessions), Callable[..., Awaitable[UserRepository]])

# The flavours must match: a sync repository over an async factory is refused.
repository(UserRepository, sessions)  # type: ignore[type-var]  # pyright: ignore[reportCallIssue, reportArgumentType]
unit_of_work("sqlite://")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]

UoW = Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))]
Users = Annotated[AsyncUserRepository, Depends(repository(AsyncUserRepository, sessions))]
app = FastAPI()


@app.get("/users/{user_id}")
async def get_user(user_id: int, users: Users, uow: UoW) -> int | None:
    assert_type(users, AsyncUserRepository)
    assert_type(uow, AsyncUnitOfWork)
    user = await users.by_id(user_id)
    return None if user is None else user.id


flask_app = Flask(__name__)
Ormkit(flask_app, sync_sessions)
Ormkit(flask_app, sessions)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


@flask_app.get("/users/<int:user_id>")
def get_user_flask(user_id: int) -> dict[str, int | None]:
    assert_type(uow(), UnitOfWork)
    user = uow().repository(UserRepository).by_id(user_id)
    return {"id": None if user is None else user.id}
