"""What a brand-new connection sees: how the reliability tests prove what was committed.

A pooled connection is no witness after a fault: one left inside a transaction sees its own
uncommitted rows. These helpers read through a connection opened for the read and closed after
it, with the sync driver of the same backend, so async tests can use them too.
"""

from __future__ import annotations

import sqlalchemy
from sqlalchemy import URL, text
from sqlalchemy.pool import NullPool

_SYNC_DRIVERS = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg"}


def fresh_committed_ids(url: URL, table: str) -> list[int]:
    """The ids in `table` that a new connection to the database at `url` sees, in order."""
    engine = sqlalchemy.create_engine(
        url.set(drivername=_SYNC_DRIVERS[url.get_backend_name()]), poolclass=NullPool
    )
    try:
        with engine.connect() as connection:
            return list(connection.scalars(text(f"SELECT id FROM {table} ORDER BY id")))
    finally:
        engine.dispose()
