"""Mapped classes shared by the tests."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import DateTime, ForeignKey, Numeric, String, UniqueConstraint
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str | None] = mapped_column(String(200), default=None)

    @hybrid_property
    def display_name(self) -> str:  # a hybrid another attribute stands behind, for updates
        return self.name

    @display_name.inplace.update_expression
    @classmethod
    def _display_name_update(cls, value: Any) -> list[tuple[Any, Any]]:
        return [(cls.name, value)]


# Three tables linked only by foreign keys, no relationship(): SQLAlchemy does not order them.
class Parent(Base):
    __tablename__ = "parent"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), default="")


class Child(Base):
    __tablename__ = "child"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))


class GrandChild(Base):
    __tablename__ = "grandchild"

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("child.id"))


class Membership(Base):
    """A composite primary key, in column order (tenant_id, user_id)."""

    __tablename__ = "membership"

    tenant_id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(20), default="member")


# Ordering that SQLAlchemy already knows (relationship) or keeps for itself (self-reference,
# cycles) must keep working in ormkit's sessions.
class Author(Base):
    __tablename__ = "author"

    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "book"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


class Employee(Base):
    __tablename__ = "employee"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "employee",
    }


class Engineer(Employee):
    __tablename__ = "engineer"

    id: Mapped[int] = mapped_column(ForeignKey("employee.id"), primary_key=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "engineer"}


class Manager(Employee):
    """Single-table inheritance under Employee: a sibling of Engineer."""

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "manager"}


class Ticket(Base):
    """Linked by FK to a joined-inheritance subclass's table, without relationship()."""

    __tablename__ = "ticket"

    id: Mapped[int] = mapped_column(primary_key=True)
    engineer_id: Mapped[int] = mapped_column(ForeignKey("engineer.id"))


class Node(Base):
    __tablename__ = "node"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("node.id"), default=None)
    parent: Mapped[Node | None] = relationship(remote_side=[id])


class Left(Base):
    """Left and Right reference each other: an FK cycle, broken with use_alter."""

    __tablename__ = "left_side"

    id: Mapped[int] = mapped_column(primary_key=True)
    right_id: Mapped[int | None] = mapped_column(
        ForeignKey("right_side.id", use_alter=True, name="fk_left_right"), default=None
    )


class Right(Base):
    __tablename__ = "right_side"

    id: Mapped[int] = mapped_column(primary_key=True)
    left_id: Mapped[int | None] = mapped_column(ForeignKey("left_side.id"), default=None)


class Product(Base):
    """Upserts: a surrogate key, a natural unique key (sku), a composite unique constraint."""

    __tablename__ = "product"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(40), unique=True)
    stock: Mapped[int] = mapped_column(default=0)
    name: Mapped[str] = mapped_column(String(100), default="")
    region: Mapped[str] = mapped_column(String(10), default="eu")
    code: Mapped[str | None] = mapped_column(String(20), default=None)
    # onupdate: an ON CONFLICT update skips it in SQLAlchemy; ormkit's upsert sets it.
    touched: Mapped[bool] = mapped_column(default=False, onupdate=True)
    __table_args__ = (UniqueConstraint("region", "code", name="uq_product_region_code"),)


class Event(Base):
    """Pages: sort columns of every kind a cursor carries, a nullable one, a UUID key."""

    __tablename__ = "event"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    seq: Mapped[int]
    name: Mapped[str] = mapped_column(String(40))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    amount: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    tag: Mapped[str | None] = mapped_column(String(20), default=None)
