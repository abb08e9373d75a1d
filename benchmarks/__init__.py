"""ormkit's benchmarks: `python -m benchmarks.run` (or `nox -s bench`); see run.py."""
