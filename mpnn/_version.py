"""mpnn's version, in one place: pyproject.toml reads it (setuptools dynamic version), mpnn.__version__ re-exports
it, and anything below the top-level package (checkpoints, run records, built-in plugins) imports it from here
without importing all of mpnn. Imports nothing."""

__version__ = "0.1.0"
