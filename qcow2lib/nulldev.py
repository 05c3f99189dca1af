"""QEMU's null block drivers ("null-co://", "null-aio://") as a BlockDevice.

Test setups name them as a backing file that holds nothing (iotest 155 creates
`qemu-img create -b null-co:// -F raw`): qemu-img must open them to check the backing
file and take its size. The device is 1 GiB, as QEMU's default; writes are dropped and
reads give zeros (QEMU leaves the buffer untouched by default; zeros are the defined
choice). Its extents say what QEMU's block status says: neither data nor zeros.
"""

from __future__ import annotations

from collections.abc import Iterator

from .blockdev import BlockDevice, Extent
from .errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError

NULL_PROTOCOLS = ("null-co", "null-aio")
NULL_DEVICE_SIZE = 1 << 30  # QEMU's default "size" option of the null drivers


def null_protocol(name: str) -> str | None:
    """The null driver a name selects ("null-co" for "null-co://"), else None."""
    protocol = name.split(":", 1)[0]
    return protocol if ":" in name and protocol in NULL_PROTOCOLS else None


class NullDevice(BlockDevice):
    """A device of NULL_DEVICE_SIZE bytes that stores nothing."""

    def __init__(self, name: str, mode: str = "r", fmt: str | None = None):
        protocol = null_protocol(name)
        if protocol is None:
            raise InvalidArgumentError(f"'{name}' names no null driver")
        if name != f"{protocol}://":
            raise InvalidArgumentError(
                f"The only allowed filename for this driver is '{protocol}://'"
            )
        if fmt == "qcow2":
            raise CorruptImageError("Image is not in qcow2 format")
        if fmt not in (None, "raw", protocol):
            raise UnsupportedFeatureError(f"Unknown driver '{fmt}'")
        self.filename = name
        self.format = fmt or "raw"
        self.read_only = mode != "r+"
        self.size = NULL_DEVICE_SIZE

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
        self.check_request(0, 0)

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        yield [Extent(offset, length, False, False, 0, None, False)]

    def close(self) -> None:
        self._closed = True
