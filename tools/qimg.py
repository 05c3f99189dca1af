"""qimg: a drop-in replacement for `qemu-img` 7.2, built on qcow2lib.

The entry point as a module (`python tools/qimg.py`, or `python -m qimg` with tools/ on
the path, as the tests run it in-process); the installed `qimg` command is its twin
tools/qimg. The CLI itself is the package qcow2lib.cli.
"""

import sys

from qcow2lib.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
