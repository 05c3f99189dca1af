"""QEMU's null-co and null-aio drivers: a device of a given size that stores nothing.

Writes are accepted and dropped; reads return zeros (QEMU leaves the buffer alone unless
read-zeroes is set; zeros are the one safe content to hand out). Useful as a sink or an
endless source in tests and benchmarks: null-co:// names one of 1 GiB.
"""

from __future__ import annotations

from .blockdev import BlockDevice, Extent
from .errors import InvalidArgumentError
from .hostfile import fill_zeros
from .records import record

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator

NULL_DRIVERS = ("null-co", "null-aio")
DEFAULT_SIZE = 1 << 30
SECTOR = 512
_BOOLS = {"on": True, "off": False}


@record
class NullTarget:
    """A null device to open: its driver, size and whether reads report zeros."""

    driver: str = "null-co"
    size: int = DEFAULT_SIZE
    read_zeroes: bool = False
    name: str = ""  # QEMU's name for it: "<driver>://" unless options shape its content


def is_null_name(name: str) -> bool:
    """null-co:// or null-aio:// (QEMU's only filenames for these drivers)."""
    return name.startswith(tuple(f"{driver}:" for driver in NULL_DRIVERS))


def parse_null_name(name: str) -> NullTarget:
    driver, _, rest = name.partition(":")
    if rest != "//":
        raise InvalidArgumentError(f"The only allowed filename for this driver is '{driver}://'")
    return NullTarget(driver)


def _qemu_name(driver: str, options: dict[str, str], source: str) -> str:
    """QEMU names a null device by its driver and the options that shape its content, as
    given (a json: name's numbers and booleans stay such); "<driver>://" without them."""
    from .chain import json_text_tree
    from .qobject import qemu_json_compact

    given: dict[str, object] = {"driver": driver}
    given.update((key, options[key]) for key in ("size", "read-zeroes") if key in options)
    if len(given) == 1:
        return f"{driver}://"
    if source.startswith("json:"):
        tree = json_text_tree(source)
        given.update((key, tree[key]) for key in given if key != "driver" and key in tree)
    return "json:" + qemu_json_compact(given)


def target_from_options(driver: str, options: dict[str, str], source: str = "") -> NullTarget:
    """size, read-zeroes and latency-ns (accepted: there is no I/O to delay). source: the
    name or options text the device was given by, for QEMU's name of it."""
    from .sizes import SIZE_SUFFIX_HINT
    from .sizes import parse_size

    target = NullTarget(driver)
    for key, value in options.items():
        if key == "size":
            try:
                target.size = parse_size(value)
            except (ValueError, InvalidArgumentError):
                raise InvalidArgumentError(
                    "Parameter 'size' expects a non-negative number below 2^64",
                    qemu_hint=SIZE_SUFFIX_HINT,
                ) from None
        elif key == "read-zeroes":
            if value not in _BOOLS:
                raise InvalidArgumentError("Parameter 'read-zeroes' expects 'on' or 'off'")
            target.read_zeroes = _BOOLS[value]
        elif key == "latency-ns":
            if not value.isdigit():
                raise InvalidArgumentError("Parameter 'latency-ns' expects a number")
        elif key != "filename" or value != f"{driver}://":
            raise InvalidArgumentError(
                f"Block protocol '{driver}' doesn't support the option '{key}'"
            )
    target.name = _qemu_name(driver, options, source)
    return target


class NullDevice(BlockDevice):
    """The device of a NullTarget."""

    def __init__(self, target: NullTarget, mode: str = "r"):
        self.format = target.driver
        self.filename = target.name or f"{target.driver}://"
        self.size = -(-target.size // SECTOR) * SECTOR  # QEMU counts whole sectors
        self.read_only = mode != "r+"
        self.read_zeroes = target.read_zeroes

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        fill_zeros(view)
        return len(view)

    def write(self, offset: int, data) -> None:
        self.check_request(offset, memoryview(data).nbytes, write=True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        pass

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """As QEMU's block status: never data (nothing is stored). With read-zeroes every
        range is present and reads as zeros; without, the driver claims nothing (not
        present, not known to be zeros), so convert treats the device as unallocated."""
        if self.read_zeroes:
            yield [Extent(offset, length, False, True, 0, offset, True)]
        else:
            yield [Extent(offset, length, False, False, 0, None, False)]

    def close(self) -> None:
        self._closed = True
