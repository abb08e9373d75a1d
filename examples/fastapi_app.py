"""A FastAPI app on ormkit: an AsyncUnitOfWork per request, a repository per resource.

    pip install fastapi uvicorn "ormkit[aiosqlite]"
    uvicorn examples.fastapi_app:app

The request's unit of work commits when the endpoint returns and *before the response is sent*,
so a client never gets a 2xx for work that was not stored: a failed commit is an error response
(500, or the app's own exception handler), an exception (`HTTPException` too) rolls back, and
`on_commit` callbacks have run when the client gets its answer. A `NotFoundError` from
`by_id_or_raise` becomes a 404.

Why a route class and not a dependency with `yield`: FastAPI 0.118 and later run a `yield`
dependency's exit code *after* the response is sent (0.106 to 0.117 ran it before), and
`Depends(..., scope="function")`, which exits before, only exists from 0.121. A route class
works the same on every version: see docs/integrations.md.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import AsyncRepository, AsyncUnitOfWork, NotFoundError

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Coroutine

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


class UnitOfWorkRoute(APIRoute):
    """A route whose unit of work ends when the endpoint returns, before the response is sent.

    The handler holds an exit stack around FastAPI's own handler (dependencies, endpoint,
    serialization); `unit_of_work` enters the request's unit of work on it. Leaving the stack
    commits, or rolls back if anything raised, and the response is returned only after that.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_in_unit_of_work(request: Request) -> Response:
            async with AsyncExitStack() as stack:
                request.state.unit_of_work_stack = stack
                return await handle(request)

        return handle_in_unit_of_work


async def unit_of_work(request: Request) -> AsyncUnitOfWork:
    """The request's unit of work (one per request), ended by `UnitOfWorkRoute`."""
    stack: AsyncExitStack | None = getattr(request.state, "unit_of_work_stack", None)
    if stack is None:
        raise RuntimeError(
            "unit_of_work needs a UnitOfWorkRoute: set `app.router.route_class = "
            "UnitOfWorkRoute` (or `APIRouter(route_class=UnitOfWorkRoute)`) before the routes"
        )
    return await stack.enter_async_context(AsyncUnitOfWork(request.app.state.sessions))


UoW = Annotated[AsyncUnitOfWork, Depends(unit_of_work)]


def create_app(database_url: str | URL = "sqlite+aiosqlite://") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None, None]:
        # Made inside the app's event loop: async drivers tie connections to one loop.
        engine = ormkit.create_async_engine(database_url)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        app.state.sessions = ormkit.create_async_session_factory(engine)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.router.route_class = UnitOfWorkRoute  # before the routes: each one is made with it
    app.state.imports = []  # what /import committed, appended by its on_commit callback

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
        books = uow.repository(BookRepository)
        book = books.add(Book(author_id=author_id, title=body.title))
        await uow.flush()
        if await books.count(Book.author_id == author_id, Book.title == body.title) > 1:
            # Raised after the flush: the unit of work rolls the INSERT back.
            raise HTTPException(status_code=409, detail="that author has a book of that title")
        return BookOut(id=book.id, author_id=book.author_id, title=book.title)

    @app.get("/authors/{author_id}/books")
    async def list_books(author_id: int, uow: UoW) -> list[BookOut]:
        await uow.repository(AuthorRepository).by_id_or_raise(author_id)
        books = await uow.repository(BookRepository).by_author(author_id)
        return [BookOut(id=b.id, author_id=b.author_id, title=b.title) for b in books]

    # response_model=None: FastAPI 0.110 takes `-> None` for a body model, and a 204 has none.
    @app.delete("/books/{book_id}", status_code=204, response_model=None)
    async def delete_book(book_id: int, uow: UoW) -> None:
        books = uow.repository(BookRepository)
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
