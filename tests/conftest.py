"""Test setup: import the package from this checkout, whatever is installed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def pytest_sessionfinish(session):
    """Remove the directories tests/shared.py built for this run, once every worker is done
    (with xdist this runs last in the controller, which is not a worker)."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        import shared

        shared.remove_all(factory.getbasetemp())
