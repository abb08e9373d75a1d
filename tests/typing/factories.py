"""What users see in their editor; read by mypy and pyright, never executed."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import assert_type

import ormkit
from ormkit.testing import QueryLog, assert_queries, count_queries

engine = ormkit.create_engine("sqlite://")
assert_type(engine, Engine)
async_engine = ormkit.create_async_engine("sqlite+aiosqlite://", sqlite_wal=False)
assert_type(async_engine, AsyncEngine)

factory = ormkit.create_session_factory("sqlite://", expire_on_commit=False)
assert_type(factory, sessionmaker[Session])
assert_type(ormkit.create_session_factory(engine), sessionmaker[Session])
assert_type(factory(), Session)

async_factory = ormkit.create_async_session_factory(async_engine)
assert_type(async_factory, async_sessionmaker[AsyncSession])
assert_type(async_factory(), AsyncSession)

with count_queries(engine) as log:
    assert_type(log, QueryLog)
    assert_type(log.count, int)
    assert_type(log.statements, list[str])
with assert_queries(factory(), 0) as log:
    assert_type(log, QueryLog)
with count_queries(async_factory):
    pass

# Wrong binds are type errors as well as runtime errors.
ormkit.create_session_factory(async_engine)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
ormkit.create_async_session_factory(engine)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
count_queries("sqlite://")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

# A misspelt name is an error, not a str (ormkit's module __getattr__ serves __version__ only).
ormkit.craete_engine("sqlite://")  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]

assert_type(ormkit.__version__, str)

# Read replicas: a factory with them is the same sessionmaker; tokens are str or None.
replicated = ormkit.create_session_factory("sqlite:///p.db", replicas=["sqlite:///r.db"])
assert_type(replicated, sessionmaker[Session])
async_replicated = ormkit.create_async_session_factory(
    "sqlite+aiosqlite:///p.db", replicas=[async_engine], replica_wait=0.2
)
assert_type(async_replicated, async_sessionmaker[AsyncSession])
with ormkit.UnitOfWork(replicated) as writer:
    assert_type(writer.commit_token, str | None)
reader = ormkit.UnitOfWork(replicated, read_only=True, after=writer.commit_token)
ormkit.create_session_factory("sqlite:///p.db", replicas=[async_engine])  # type: ignore[list-item]  # pyright: ignore[reportArgumentType]
ormkit.UnitOfWork(replicated, after=42)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
