"""ormkit: a typed session layer for SQLAlchemy 2.x.

Units of work with explicit flush points and foreign-key-ordered flushes, repositories that use
the identity map, and session defaults that fit sync and async code.
"""

from __future__ import annotations

from importlib.metadata import version as _distribution_version
from typing import TYPE_CHECKING

from ormkit._engine import create_async_engine, create_engine
from ormkit._repository import AsyncRepository, Page, Repository, SynchronizeSession
from ormkit._session import create_async_session_factory, create_session_factory
from ormkit._uow import AsyncUnitOfWork, UnitOfWork
from ormkit.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    MultipleResultsError,
    NotFoundError,
    OrmkitError,
    TransactionError,
)

__all__ = [
    "AsyncRepository",
    "AsyncUnitOfWork",
    "ConfigurationError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "MultipleResultsError",
    "NotFoundError",
    "OrmkitError",
    "Page",
    "Repository",
    "SynchronizeSession",
    "TransactionError",
    "UnitOfWork",
    "create_async_engine",
    "create_async_session_factory",
    "create_engine",
    "create_session_factory",
]


if TYPE_CHECKING:
    __version__: str
else:

    def __getattr__(name: str) -> str:
        # The version comes from the installed distribution's metadata, so it is written in one
        # place (pyproject.toml) and is read only when asked for. Hidden from type checkers,
        # which would otherwise accept any misspelt name imported from ormkit.
        if name == "__version__":
            return _distribution_version("ormkit")
        msg = f"module 'ormkit' has no attribute {name!r}"
        raise AttributeError(msg)
