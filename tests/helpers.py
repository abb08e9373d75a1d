"""Small helpers the behaviour tests share: reading back what was committed."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from tests.models import Child, GrandChild, Parent

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.orm import DeclarativeBase


class ConflictError(Exception):
    """An error `UnitOfWork.run` retries, as it retries a serialization failure (40001)."""

    sqlstate = "40001"


def committed_ids(engine: Engine, model: type[DeclarativeBase]) -> list[int]:
    """The ids of `model` that another connection sees: what was really committed."""
    with engine.connect() as connection:
        return list(connection.scalars(select(model.id).order_by(model.id)))  # type: ignore[attr-defined]


async def committed_ids_async(engine: AsyncEngine, model: type[DeclarativeBase]) -> list[int]:
    async with engine.connect() as connection:
        return list(await connection.scalars(select(model.id).order_by(model.id)))  # type: ignore[attr-defined]


async def count_rows_async(engine: AsyncEngine, model: type[DeclarativeBase]) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(model)) or 0)


def three_generations(n: int = 40, seed: int = 3) -> list[Parent | Child | GrandChild]:
    """`n` rows of each of three FK-linked tables, shuffled so children often come first."""
    rng = random.Random(seed)
    rows: list[Parent | Child | GrandChild] = [Parent(id=i) for i in range(1, n + 1)]
    rows += [Child(id=i, parent_id=rng.randint(1, n)) for i in range(1, n + 1)]
    rows += [GrandChild(id=i, child_id=rng.randint(1, n)) for i in range(1, n + 1)]
    rng.shuffle(rows)
    return rows
