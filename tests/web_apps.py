"""A sync FastAPI app on `ormkit.fastapi` (a `sessionmaker`, sync endpoints in the thread pool).

The twin of the async example app's core routes, over the same tables. No
`from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
the dependencies they name are local to `create_sync_fastapi_app`.
"""

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import URL

import ormkit
from examples.fastapi_app import Author, AuthorIn, AuthorOut, Base, Book, BookIn, BookOut
from ormkit import NotFoundError, Repository, UnitOfWork
from ormkit.fastapi import repository, unit_of_work


class SyncAuthorRepository(Repository[Author, int]):
    pass


class SyncBookRepository(Repository[Book, int]):
    pass


def create_sync_fastapi_app(database_url: str | URL, *, threads: int | None = None) -> FastAPI:
    """The app; `threads` sets the size of the thread pool the sync endpoints run in.

    SQLite has one write lock, held from a request's first flushed write until its commit after
    the endpoint returned, and FastAPI validates a sync endpoint's response in that same pool
    (40 threads by default). With more concurrent writers than threads, the waiting writers
    take every thread while the one holding the lock waits for one (docs/integrations.md).
    """
    engine = ormkit.create_engine(database_url)
    Base.metadata.create_all(engine)
    sessions = ormkit.create_session_factory(engine)
    request_uow = Depends(unit_of_work(sessions))
    request_authors = Depends(repository(SyncAuthorRepository, sessions))
    request_books = Depends(repository(SyncBookRepository, sessions))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncGenerator[None, None]:
        if threads is not None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = sessions
    app.state.imports = []

    @app.post("/authors", status_code=201)
    def create_author(
        body: AuthorIn,
        uow: Annotated[UnitOfWork, request_uow],
        authors: Annotated[SyncAuthorRepository, request_authors],
    ) -> AuthorOut:
        author = authors.add(Author(name=body.name))
        uow.flush()
        # Read before the endpoint returns: a sync unit of work expires its objects at commit.
        return AuthorOut(id=author.id, name=author.name)

    @app.get("/authors/{author_id}")
    def get_author(
        author_id: int, authors: Annotated[SyncAuthorRepository, request_authors]
    ) -> AuthorOut:
        try:
            author = authors.by_id_or_raise(author_id)
        except NotFoundError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error
        return AuthorOut(id=author.id, name=author.name)

    @app.post("/authors/{author_id}/books", status_code=201)
    def add_book(
        author_id: int,
        body: BookIn,
        uow: Annotated[UnitOfWork, request_uow],
        books: Annotated[SyncBookRepository, request_books],
    ) -> BookOut:
        book = books.add(Book(author_id=author_id, title=body.title))
        uow.flush()
        if books.count(Book.author_id == author_id, Book.title == body.title) > 1:
            raise HTTPException(status_code=409, detail="that author has a book of that title")
        return BookOut(id=book.id, author_id=book.author_id, title=book.title)

    @app.post("/import", status_code=201)
    def import_catalog(
        body: dict[str, list[dict[str, Any]]], uow: Annotated[UnitOfWork, request_uow]
    ) -> dict[str, int]:
        authors, books = body.get("authors", []), body.get("books", [])
        uow.add_all([Author(**a) for a in authors])
        uow.add_all([Book(**b) for b in books])
        counts = {"authors": len(authors), "books": len(books)}
        uow.on_commit(lambda: app.state.imports.append(counts))
        return counts

    return app
