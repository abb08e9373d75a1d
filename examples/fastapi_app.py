"""A FastAPI app on ormkit: an AsyncUnitOfWork per request, a repository per resource.

    pip install fastapi uvicorn "ormkit[aiosqlite]"
    uvicorn examples.fastapi_app:app

The unit of work is a dependency: the request's work commits when the endpoint returns, and
rolls back if it raises. A `NotFoundError` from `by_id_or_raise` becomes a 404.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork, NotFoundError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy import URL


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    title: Mapped[str] = mapped_column(String(200))


class AuthorRepository(AsyncRepository[Author, int]):
    pass


class BookRepository(AsyncRepository[Book, int]):
    async def by_author(self, author_id: int) -> list[Book]:
        return await self.find(Book.author_id == author_id, order_by=Book.id)


class AuthorIn(BaseModel):
    name: str


class AuthorOut(BaseModel):
    id: int
    name: str


class BookIn(BaseModel):
    title: str


class BookOut(BaseModel):
    id: int
    author_id: int
    title: str


async def unit_of_work(request: Request) -> AsyncIterator[AsyncUnitOfWork]:
    """One unit of work per request: committed after the endpoint, rolled back on error."""
    async with AsyncUnitOfWork(request.app.state.sessions) as uow:
        yield uow


UoW = Annotated[AsyncUnitOfWork, Depends(unit_of_work)]


def create_app(database_url: str | URL = "sqlite+aiosqlite://") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Made inside the app's event loop: async drivers tie connections to one loop.
        engine = ormkit.create_async_engine(database_url)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        app.state.sessions = ormkit.create_async_session_factory(engine)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(NotFoundError)
    async def not_found(_request: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(error)})

    @app.post("/authors", status_code=201)
    async def create_author(body: AuthorIn, uow: UoW) -> AuthorOut:
        author = uow.repository(AuthorRepository).add(Author(name=body.name))
        await uow.flush()  # explicit flush point: the id is known before the response
        return AuthorOut(id=author.id, name=author.name)

    @app.get("/authors/{author_id}")
    async def get_author(author_id: int, uow: UoW) -> AuthorOut:
        author = await uow.repository(AuthorRepository).by_id_or_raise(author_id)
        return AuthorOut(id=author.id, name=author.name)

    @app.post("/authors/{author_id}/books", status_code=201)
    async def add_book(author_id: int, body: BookIn, uow: UoW) -> BookOut:
        await uow.repository(AuthorRepository).by_id_or_raise(author_id)  # 404 if missing
        book = uow.repository(BookRepository).add(Book(author_id=author_id, title=body.title))
        await uow.flush()
        return BookOut(id=book.id, author_id=book.author_id, title=book.title)

    @app.get("/authors/{author_id}/books")
    async def list_books(author_id: int, uow: UoW) -> list[BookOut]:
        await uow.repository(AuthorRepository).by_id_or_raise(author_id)
        books = await uow.repository(BookRepository).by_author(author_id)
        return [BookOut(id=b.id, author_id=b.author_id, title=b.title) for b in books]

    @app.delete("/books/{book_id}", status_code=204)
    async def delete_book(book_id: int, uow: UoW) -> None:
        books = uow.repository(BookRepository)
        await books.delete(await books.by_id_or_raise(book_id))

    return app


app = create_app()
