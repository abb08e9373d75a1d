"""Alembic's env.py for an application on ormkit with an async driver.

The counterpart of Alembic's `async` template (`alembic init -t async migrations`): the engine
is `ormkit.create_async_engine`, so migrations get the application's defaults, and Alembic's
synchronous migration functions run on its connection through `run_sync`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from alembic import context

import ormkit

if TYPE_CHECKING:
    from sqlalchemy import Connection

config = context.config
target_metadata = config.attributes.get("target_metadata")  # see examples/migrations/env.py


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: write the SQL out, connect to nothing."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("set sqlalchemy.url in alembic.ini (or on the Config)")
    engine = ormkit.create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run the migrations in an event loop of their own."""
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
