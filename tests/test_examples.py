"""The README's first command runs examples/quickstart.py: it must run and tell the truth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_runs_and_reports_the_query_counts() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert "sync:  reading it cost 1 query (expired on commit, re-selected)" in lines
    assert "async: reading it cost 0 queries (kept loaded, no lazy load)" in lines
    assert result.stderr == ""
