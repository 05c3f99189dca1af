"""Fixture directories built once per test run and shared by pytest-xdist's workers.

A module-scoped fixture runs once in every worker that runs a test of the module, so with
two workers its images are made twice. Some cost seconds of CPU (QEMU calibrates PBKDF2
for half a second or more on each LUKS create, and checks of images with thousands of
snapshots take seconds), so the fixtures that only read what they build make it here,
once: the first worker builds under a lock, the others wait and use the same directory.
conftest.py removes these directories when the run ends.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

PREFIX = "shared-"


def run_root(tmp_path_factory) -> Path:
    """The directory of this run that all its workers see (a worker's own base is inside)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory `name`, filled by `build(directory)` in the first worker that asks.
    A build that fails leaves nothing behind, so the next worker that asks tries again."""
    root = run_root(tmp_path_factory)
    directory = root / f"{PREFIX}{name}"
    with open(root / f"{PREFIX}{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = directory / ".built"
        if not built.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            try:
                build(directory)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            built.touch()
    return directory


def remove_all(root: Path) -> None:
    """Remove the shared directories (and their locks) of a finished run."""
    for path in root.glob(f"{PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
