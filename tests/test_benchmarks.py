"""The benchmarks must keep running: a smoke run with tiny sizes (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).parent.parent / "benchmarks" / "run.py"


def test_benchmarks_run_in_smoke_mode_and_report_statement_counts() -> None:
    result = subprocess.run(
        [sys.executable, str(RUN), "--smoke"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    # The statement counts are facts, not timings: they hold at any size.
    assert "| ormkit Repository.by_id | " in result.stdout
    by_id_row = next(
        r for r in result.stdout.splitlines() if r.startswith("| ormkit Repository.by_id |")
    )
    assert by_id_row.endswith("| 0 |")  # identity-map hits: no SQL
    by_ids_row = next(
        r for r in result.stdout.splitlines() if r.startswith("| ormkit Repository.by_ids |")
    )
    assert by_ids_row.endswith("| 1 |")  # the misses: one query
