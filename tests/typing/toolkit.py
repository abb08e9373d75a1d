"""What users see of ormkit.testing's isolation and counting helpers; read by the type checkers."""

from __future__ import annotations

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from typing_extensions import assert_type

import ormkit
from ormkit.testing import (
    AsyncRolledBack,
    QueryLog,
    RolledBack,
    assert_max_queries,
    rolled_back,
)


def sync_use() -> None:
    factory = ormkit.create_session_factory("sqlite://")
    assert_type(rolled_back(factory), RolledBack)
    with rolled_back(factory) as isolated:
        assert_type(isolated, RolledBack)
        assert_type(isolated.connection, Connection)
    with assert_max_queries(factory, 2) as log:
        assert_type(log, QueryLog)
    rolled_back("sqlite://")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]


async def async_use() -> None:
    factory = ormkit.create_async_session_factory("sqlite+aiosqlite://")
    assert_type(rolled_back(factory), AsyncRolledBack)
    async with rolled_back(factory) as isolated:
        assert_type(isolated, AsyncRolledBack)
        assert_type(isolated.connection, AsyncConnection)
