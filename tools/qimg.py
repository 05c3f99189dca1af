"""qimg: a drop-in replacement for `qemu-img` 7.2, built on qcow2lib.

The entry point only (installed as the top-level module `qimg`, console script
`qimg = "qimg:main"`); the CLI itself is the package qcow2lib.cli.
"""

import sys

from qcow2lib.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
