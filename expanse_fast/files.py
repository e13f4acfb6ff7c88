"""Checking a folder early: create it and prove it writable before any long work starts."""
from __future__ import annotations

import os


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed and write (then remove) a probe file in it.

    Raises the ``OSError`` of the failing step; callers add what the folder is for.
    """
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".expanse-fast-write-test-{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)
    return path
