"""The tables every scenario uses, their repositories, and the data set-up between scenarios."""

from __future__ import annotations

from dataclasses import dataclass

from advanced_alchemy.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository
from sqlalchemy import Connection, ForeignKey, Index, String, delete, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import ormkit


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Child(Base):  # a ForeignKey and no relationship(): the case ormkit orders
    __tablename__ = "child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))
    name: Mapped[str] = mapped_column(String(50))


class Item(Base):  # bulk updates and deletes, and the tiny transactions
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]
    name: Mapped[str] = mapped_column(String(50))


class Product(Base):  # upserted by its unique sku (scenario 10)
    __tablename__ = "product"
    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(20), unique=True)
    price: Mapped[int]
    stock: Mapped[int]


class Entry(Base):  # paged through (scenario 11)
    __tablename__ = "entry"
    # The index keyset pagination by category wants: the order's columns, the key last.
    __table_args__ = (Index("ix_entry_category_id", "category", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[int]  # not unique: the primary key orders the rows of one category
    title: Mapped[str] = mapped_column(String(50))


class ParentRepository(ormkit.Repository[Parent, int]):
    pass


class AsyncParentRepository(ormkit.AsyncRepository[Parent, int]):
    pass


class ItemRepository(ormkit.Repository[Item, int]):
    pass


class AsyncItemRepository(ormkit.AsyncRepository[Item, int]):
    pass


class ProductRepository(ormkit.Repository[Product, int]):
    pass


class AsyncProductRepository(ormkit.AsyncRepository[Product, int]):
    pass


class EntryRepository(ormkit.Repository[Entry, int]):
    pass


class AsyncEntryRepository(ormkit.AsyncRepository[Entry, int]):
    pass


class AAParentRepository(SQLAlchemySyncRepository[Parent]):
    model_type = Parent


class AAAsyncParentRepository(SQLAlchemyAsyncRepository[Parent]):
    model_type = Parent


class AAChildRepository(SQLAlchemySyncRepository[Child]):
    model_type = Child


class AAAsyncChildRepository(SQLAlchemyAsyncRepository[Child]):
    model_type = Child


class AAItemRepository(SQLAlchemySyncRepository[Item]):
    model_type = Item


class AAAsyncItemRepository(SQLAlchemyAsyncRepository[Item]):
    model_type = Item


class AAProductRepository(SQLAlchemySyncRepository[Product]):
    model_type = Product


class AAAsyncProductRepository(SQLAlchemyAsyncRepository[Product]):
    model_type = Product


class AAEntryRepository(SQLAlchemySyncRepository[Entry]):
    model_type = Entry


class AAAsyncEntryRepository(SQLAlchemyAsyncRepository[Entry]):
    model_type = Entry


@dataclass(frozen=True)
class Data:
    """What the tables hold when a scenario starts: parents 0..n-1, items 0..n-1."""

    parents: int = 0
    items: int = 0

    def load(self, connection: Connection) -> None:
        """Replace the tables' rows (on a connection from `engine.connect()`) and commit."""
        if connection.dialect.name == "postgresql":
            # DELETE would leave dead rows behind, and every later FK check of a parent's
            # DELETE scans them: TRUNCATE starts each round from really empty tables.
            connection.exec_driver_sql("TRUNCATE child, parent, item")
        else:
            for table in (Child, Parent, Item):
                connection.execute(delete(table))
        if self.parents:
            rows = [{"id": n, "name": f"p{n}"} for n in range(self.parents)]
            connection.execute(insert(Parent), rows)
        if self.items:
            rows = [{"id": n, "value": n, "name": f"i{n}"} for n in range(self.items)]
            connection.execute(insert(Item), rows)
        connection.commit()
        if connection.dialect.name == "postgresql":
            # Fresh statistics, so every variant's queries get the plans the data calls for.
            connection.exec_driver_sql("ANALYZE")
            connection.commit()


def sku(n: int) -> str:
    return f"sku-{n:07d}"


def load_products(connection: Connection, count: int) -> None:
    """Products with skus 0..count-1 (price n, stock 0), keys 1..count; commit.

    The keys come from the database, as they do for the rows upsert_many inserts: PostgreSQL's
    sequence restarts with the table, and SQLite gives an emptied table's rows 1, 2, ...
    """
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("TRUNCATE product RESTART IDENTITY")
    else:
        connection.execute(delete(Product))
    rows = [{"sku": sku(n), "price": n, "stock": 0} for n in range(count)]
    connection.execute(insert(Product), rows)
    connection.commit()
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("ANALYZE product")
        connection.commit()


def load_entries(connection: Connection, count: int, categories: int) -> None:
    """Entries 0..count-1, spread over `categories` categories out of key order; commit."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("TRUNCATE entry")
    else:
        connection.execute(delete(Entry))
    # 7919 is prime: consecutive keys land in scattered categories, each category as full.
    rows = [{"id": n, "category": (n * 7919) % categories, "title": f"e{n}"} for n in range(count)]
    connection.execute(insert(Entry), rows)
    connection.commit()
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("ANALYZE entry")
        connection.commit()
