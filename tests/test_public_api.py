"""The public names: what application code imports from `ormkit` and `ormkit.testing`.

DESIGN.md's names are a contract: a name it lists that is not exported is a break for the
code written against it. The lists stay sorted (as httpx pins its own), and every listed name
is importable.
"""

from __future__ import annotations

import importlib

import pytest

import ormkit
import ormkit.testing

# Names DESIGN.md gives `ormkit` and `ormkit.testing` that exist so far.
ORMKIT = {
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
}
TESTING = {
    "QueryLog",
    "assert_max_queries",
    "assert_queries",
    "count_queries",
    "rolled_back",
}


@pytest.mark.parametrize(("module", "names"), [(ormkit, ORMKIT), (ormkit.testing, TESTING)])
def test_the_contract_names_are_exported_sorted_and_importable(module, names) -> None:
    exported = list(module.__all__)
    assert exported == sorted(exported)
    assert names <= set(exported), f"not exported: {sorted(names - set(exported))}"
    for name in exported:
        assert getattr(module, name) is not None


def test_the_pytest_plugin_defines_its_fixtures() -> None:
    plugin = importlib.import_module("ormkit.pytest")
    assert set(plugin.__all__) == {
        "ormkit_max_queries",
        "ormkit_queries",
        "ormkit_rolled_back",
        "ormkit_session_factory",
    }
