"""Sizes for the reliability tests: bounded in the default run, heavy under `nox -s stress`.

`nox -s stress` sets `ORMKIT_STRESS=1`; the same tests then run with the larger sizes.
"""

from __future__ import annotations

import os

STRESS = os.environ.get("ORMKIT_STRESS") == "1"


def scale(default: int, stress: int) -> int:
    """`stress` under `nox -s stress`, else `default`."""
    return stress if STRESS else default
