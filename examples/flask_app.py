"""A Flask app on ormkit (sync): a UnitOfWork per request, a repository per resource.

    pip install flask ormkit
    flask --app examples.flask_app run

Each view does its work in a unit of work: committed when the block ends, rolled back if it
raises. A `NotFoundError` from `by_id_or_raise` becomes a 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, request
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit
from ormkit import NotFoundError, Repository, UnitOfWork

if TYPE_CHECKING:
    from sqlalchemy import URL
    from sqlalchemy.orm import Session, sessionmaker


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


class AuthorRepository(Repository[Author, int]):
    pass


class BookRepository(Repository[Book, int]):
    def by_author(self, author_id: int) -> list[Book]:
        return self.find(Book.author_id == author_id, order_by=Book.id)


def sessions() -> sessionmaker[Session]:
    factory: sessionmaker[Session] = current_app.extensions["ormkit"]
    return factory


def create_app(database_url: str | URL = "sqlite://") -> Flask:
    app = Flask(__name__)
    engine = ormkit.create_engine(database_url)
    Base.metadata.create_all(engine)
    app.extensions["ormkit"] = ormkit.create_session_factory(engine)

    @app.errorhandler(NotFoundError)
    def not_found(error: NotFoundError) -> tuple[dict[str, str], int]:
        return {"detail": str(error)}, 404

    @app.post("/authors")
    def create_author() -> tuple[dict[str, Any], int]:
        with UnitOfWork(sessions()) as uow:
            author = uow.repository(AuthorRepository).add(Author(name=request.json["name"]))
            uow.flush()  # explicit flush point: the id is known inside the block
            # Read inside the block: a sync unit of work's objects expire at its commit.
            body = {"id": author.id, "name": author.name}
        return body, 201

    @app.get("/authors/<int:author_id>")
    def get_author(author_id: int) -> dict[str, Any]:
        with UnitOfWork(sessions()) as uow:
            author = uow.repository(AuthorRepository).by_id_or_raise(author_id)
            return {"id": author.id, "name": author.name}

    @app.post("/authors/<int:author_id>/books")
    def add_book(author_id: int) -> tuple[dict[str, Any], int]:
        with UnitOfWork(sessions()) as uow:
            uow.repository(AuthorRepository).by_id_or_raise(author_id)
            book = uow.repository(BookRepository).add(
                Book(author_id=author_id, title=request.json["title"])
            )
            uow.flush()
            body = {"id": book.id, "author_id": book.author_id, "title": book.title}
        return body, 201

    @app.get("/authors/<int:author_id>/books")
    def list_books(author_id: int) -> list[dict[str, Any]]:
        with UnitOfWork(sessions()) as uow:
            uow.repository(AuthorRepository).by_id_or_raise(author_id)
            books = uow.repository(BookRepository).by_author(author_id)
            return [{"id": b.id, "author_id": b.author_id, "title": b.title} for b in books]

    @app.delete("/books/<int:book_id>")
    def delete_book(book_id: int) -> tuple[str, int]:
        with UnitOfWork(sessions()) as uow:
            books = uow.repository(BookRepository)
            books.delete(books.by_id_or_raise(book_id))
        return "", 204

    return app
