"""Moved to ``engine.spawn`` (bench/ uses it too); this name stays for tests written against it."""
from engine.spawn import run_distributed  # noqa: F401
