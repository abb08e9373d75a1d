"""The twins stay twins: same public names and signatures; the async one awaits where the
sync one does I/O."""

from __future__ import annotations

import inspect

import pytest

from ormkit import AsyncRepository, AsyncUnitOfWork, Repository, UnitOfWork

# Methods that do no I/O and so are plain functions in both twins.
NO_IO = {"add", "add_all", "on_commit", "repository", "session"}


def _public(cls: type) -> dict[str, object]:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize(
    ("sync", "async_"), [(Repository, AsyncRepository), (UnitOfWork, AsyncUnitOfWork)]
)
def test_twins_have_the_same_public_names_and_signatures(sync: type, async_: type) -> None:
    sync_members, async_members = _public(sync), _public(async_)
    assert sorted(sync_members) == sorted(async_members)
    for name, member in sync_members.items():
        twin = async_members[name]
        if callable(member) and not isinstance(member, type):
            sync_signature = inspect.signature(member)
            async_signature = inspect.signature(twin)  # type: ignore[arg-type]
            assert list(sync_signature.parameters) == list(async_signature.parameters), name
            for parameter, twin_parameter in zip(
                sync_signature.parameters.values(), async_signature.parameters.values(), strict=True
            ):
                assert parameter.kind == twin_parameter.kind, (name, parameter.name)
                assert parameter.default == twin_parameter.default, (name, parameter.name)


def test_async_twins_await_where_the_sync_ones_do_io() -> None:
    for cls in (AsyncRepository, AsyncUnitOfWork):
        for name, member in _public(cls).items():
            if name in NO_IO or not callable(member) or isinstance(member, type):
                continue
            if name == "savepoint":
                assert inspect.isasyncgenfunction(member.__wrapped__)  # type: ignore[attr-defined]
            else:
                assert inspect.iscoroutinefunction(member), f"{cls.__name__}.{name}"
    for name in NO_IO - {"session"}:
        member = getattr(AsyncRepository, name, None) or getattr(AsyncUnitOfWork, name)
        assert not inspect.iscoroutinefunction(member), name
