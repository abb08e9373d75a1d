"""Every Python block in docs/ and README.md runs as a test (Sybil), so the docs cannot lie.

Blocks of one page share a namespace, in order. A block that must not run is preceded by
`<!-- skip: next -->`. `pytester` drives the pytest plugin's tests (tests/test_pytest_plugin.py).
"""

from __future__ import annotations

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

pytest_plugins = ["pytester"]

pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["docs/*.md", "README.md"],
).pytest()
