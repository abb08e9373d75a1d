"""A Flask app on ormkit (sync): a UnitOfWork per request, a repository per resource.

    pip install "ormkit[flask]"
    flask --app examples.flask_app:create_app run

`ormkit.flask.uow()` is the request's unit of work, opened on first use. It commits after the
view returns and *before the response is sent*: a client never gets a 2xx for work that was not
stored (a failed commit is a 500). An exception rolls it back, `abort()` included, and
`on_commit` callbacks have run when the client gets its answer. A `NotFoundError` from
`by_id_or_raise` becomes a 404. The response body is built in the view, before the commit
expires the objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, abort, request
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import NotFoundError, Repository
from ormkit.flask import Ormkit, uow

if TYPE_CHECKING:
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


class AuthorRepository(Repository[Author, int]):
    pass


class BookRepository(Repository[Book, int]):
    def by_author(self, author_id: int) -> list[Book]:
        return self.find(Book.author_id == author_id, order_by=Book.id)


def create_app(database_url: str | URL = "sqlite://") -> Flask:
    app = Flask(__name__)
    engine = ormkit.create_engine(database_url)
    Base.metadata.create_all(engine)
    Ormkit(app, ormkit.create_session_factory(engine))
    imports: list[dict[str, int]] = []  # what /import committed, appended by its on_commit
    app.config["imports"] = imports

    @app.errorhandler(NotFoundError)
    def not_found(error: NotFoundError) -> tuple[dict[str, str], int]:
        return {"detail": str(error)}, 404

    @app.post("/authors")
    def create_author() -> tuple[dict[str, Any], int]:
        author = uow().repository(AuthorRepository).add(Author(name=request.json["name"]))
        uow().flush()  # explicit flush point: the id is known before the response
        return {"id": author.id, "name": author.name}, 201

    @app.get("/authors/<int:author_id>")
    def get_author(author_id: int) -> dict[str, Any]:
        author = uow().repository(AuthorRepository).by_id_or_raise(author_id)
        return {"id": author.id, "name": author.name}

    @app.post("/authors/<int:author_id>/books")
    def add_book(author_id: int) -> tuple[dict[str, Any], int]:
        uow().repository(AuthorRepository).by_id_or_raise(author_id)  # 404 if missing
        books = uow().repository(BookRepository)
        title = request.json["title"]
        book = books.add(Book(author_id=author_id, title=title))
        uow().flush()
        if books.count(Book.author_id == author_id, Book.title == title) > 1:
            # Raised after the flush: the request's unit of work rolls the INSERT back.
            abort(409, description="that author has a book of that title")
        return {"id": book.id, "author_id": book.author_id, "title": book.title}, 201

    @app.get("/authors/<int:author_id>/books")
    def list_books(author_id: int) -> list[dict[str, Any]]:
        uow().repository(AuthorRepository).by_id_or_raise(author_id)
        books = uow().repository(BookRepository).by_author(author_id)
        return [{"id": b.id, "author_id": b.author_id, "title": b.title} for b in books]

    @app.delete("/books/<int:book_id>")
    def delete_book(book_id: int) -> tuple[str, int]:
        books = uow().repository(BookRepository)
        books.delete(books.by_id_or_raise(book_id))
        return "", 204

    @app.post("/import")
    def import_catalog() -> tuple[dict[str, int], int]:
        # The ids are given, so nothing needs a flush: the rows are written at commit, after
        # the view returned, and that is where a taken id or an unknown author fails (a 500).
        catalog = request.json
        authors, books = catalog.get("authors", []), catalog.get("books", [])
        uow().add_all([Author(id=a["id"], name=a["name"]) for a in authors])
        uow().add_all([Book(id=b["id"], author_id=b["author_id"], title=b["title"]) for b in books])
        counts = {"authors": len(authors), "books": len(books)}
        uow().on_commit(lambda: imports.append(counts))  # only once it is stored
        return counts, 201

    return app
