"""A FastAPI app on ormkit: an AsyncUnitOfWork per request, a repository per resource.

    pip install "ormkit[fastapi,aiosqlite]" uvicorn
    uvicorn examples.fastapi_app:app

`ormkit.fastapi.unit_of_work` gives each request one unit of work, which commits when the
endpoint returns and *before the response is sent*: a client never gets a 2xx for work that was
not stored. A failed commit is an error response (500, or the app's own exception handler), an
exception (`HTTPException` too) rolls back, and `on_commit` callbacks have run when the client
gets its answer. A `NotFoundError` from `by_id_or_raise` becomes a 404.
"""

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import URL, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork, NotFoundError
from ormkit.fastapi import repository, unit_of_work


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Checked at COMMIT, so an import may list a book before its author.
    author_id: Mapped[int] = mapped_column(
        ForeignKey("author.id", deferrable=True, initially="DEFERRED")
    )
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


class CatalogIn(BaseModel):
    """Rows exported from another system, ids included."""

    authors: list[AuthorOut] = []  # pydantic copies a default: not shared between requests
    books: list[BookOut] = []


# The factory, and the dependencies over it, are declared once, like the app's models; the
# engine opens no connection until a request, inside the event loop that serves the app (async
# drivers tie connections to one loop). `create_app` binds it to the database it is given.
sessions = ormkit.create_async_session_factory("sqlite+aiosqlite://")
# One unit of work per request, committed before the response is sent; the repositories are over
# that same unit of work.
UoW = Annotated[AsyncUnitOfWork, Depends(unit_of_work(sessions))]
Authors = Annotated[AuthorRepository, Depends(repository(AuthorRepository, sessions))]
Books = Annotated[BookRepository, Depends(repository(BookRepository, sessions))]


def create_app(database_url: str | URL = "sqlite+aiosqlite://") -> FastAPI:
    engine = ormkit.create_async_engine(database_url)
    sessions.configure(bind=engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncGenerator[None, None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = sessions
    app.state.imports = []  # what /import committed, appended by its on_commit callback

    @app.exception_handler(NotFoundError)
    async def not_found(_request: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(error)})

    @app.post("/authors", status_code=201)
    async def create_author(body: AuthorIn, authors: Authors, uow: UoW) -> AuthorOut:
        author = authors.add(Author(name=body.name))
        await uow.flush()  # explicit flush point: the id is known before the response
        return AuthorOut(id=author.id, name=author.name)

    @app.get("/authors/{author_id}")
    async def get_author(author_id: int, authors: Authors) -> AuthorOut:
        author = await authors.by_id_or_raise(author_id)
        return AuthorOut(id=author.id, name=author.name)

    @app.post("/authors/{author_id}/books", status_code=201)
    async def add_book(
        author_id: int, body: BookIn, authors: Authors, books: Books, uow: UoW
    ) -> BookOut:
        await authors.by_id_or_raise(author_id)  # 404 if missing
        book = books.add(Book(author_id=author_id, title=body.title))
        await uow.flush()
        if await books.count(Book.author_id == author_id, Book.title == body.title) > 1:
            # Raised after the flush: the unit of work rolls the INSERT back.
            raise HTTPException(status_code=409, detail="that author has a book of that title")
        return BookOut(id=book.id, author_id=book.author_id, title=book.title)

    @app.get("/authors/{author_id}/books")
    async def list_books(author_id: int, authors: Authors, books: Books) -> list[BookOut]:
        await authors.by_id_or_raise(author_id)
        return [
            BookOut(id=b.id, author_id=b.author_id, title=b.title)
            for b in await books.by_author(author_id)
        ]

    # response_model=None: FastAPI 0.110 takes `-> None` for a body model, and a 204 has none.
    @app.delete("/books/{book_id}", status_code=204, response_model=None)
    async def delete_book(book_id: int, books: Books) -> None:
        await books.delete(await books.by_id_or_raise(book_id))

    @app.post("/import", status_code=201)
    async def import_catalog(body: CatalogIn, uow: UoW) -> dict[str, int]:
        # The ids are given, so nothing needs a flush: the rows are written at commit, after
        # the endpoint returned, and that is where a taken id or an unknown author fails.
        uow.add_all([Author(id=a.id, name=a.name) for a in body.authors])
        uow.add_all([Book(id=b.id, author_id=b.author_id, title=b.title) for b in body.books])
        counts = {"authors": len(body.authors), "books": len(body.books)}
        uow.on_commit(lambda: app.state.imports.append(counts))  # only once it is stored
        return counts

    return app


app = create_app()
