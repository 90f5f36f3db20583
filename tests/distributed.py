"""Moved to ``engine.runtime.spawn`` (bench/ uses it too); this name stays for tests written against it."""
from engine.runtime.spawn import run_distributed  # noqa: F401
