"""QEMU's null-co and null-aio drivers: a device of a given size with no storage behind it.

Writes succeed and are dropped, reads give zeros. With read_zeroes the device also says
so when asked for its allocation (every range present and reading as zeros); without
it, as QEMU's driver, it claims nothing (no range present, none known to be zeros), so a
convert from it treats the whole device as unallocated. Scripts and tests use it as a
source of any size that costs nothing to read.
"""

from __future__ import annotations

from collections.abc import Iterator

from .blockdev import BlockDevice, Extent
from .errors import InvalidArgumentError

NULL_DRIVERS = ("null-co", "null-aio")
DEFAULT_SIZE = 1 << 30  # QEMU's default for the size option
SECTOR = 512


class NullDevice(BlockDevice):
    """A null-co (or null-aio) device of `size` bytes (rounded up to whole sectors, as
    QEMU counts a device's length)."""

    read_only = False

    def __init__(self, size: int = DEFAULT_SIZE, read_zeroes: bool = False, driver="null-co"):
        if driver not in NULL_DRIVERS:
            raise InvalidArgumentError(f"Unknown null driver '{driver}'")
        if size < 0:
            raise InvalidArgumentError(f"null device size {size} is negative")
        self.format = driver
        self.filename = f"{driver}://"
        self.size = -(-size // SECTOR) * SECTOR
        self.read_zeroes = read_zeroes
        self._closed = False

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        view[:] = bytes(len(view))
        return len(view)

    def write(self, offset: int, data) -> None:
        self.check_request(offset, len(memoryview(data).cast("B")), write=True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        return None

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        if self.read_zeroes:
            yield [Extent(offset, length, False, True, 0, offset, True)]
        else:
            yield [Extent(offset, length, False, False, 0, None, False)]

    def close(self) -> None:
        self._closed = True
