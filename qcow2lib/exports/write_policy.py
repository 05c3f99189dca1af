"""QEMU's `discard` and `detect-zeroes` drive options, as a view of a `BlockDevice`.

An export hands its clients this view instead of the device when the user asked for
qemu-nbd's --discard/--detect-zeroes behaviour:

- discard="ignore" (QEMU's default for an export): a client's discard succeeds without
  freeing anything and zero writes never unmap; "unmap" passes both on.
- detect_zeroes="on": a write whose data is all zeros becomes a zero write, so the image
  gets a zero cluster instead of allocated zeros; "unmap" also lets it free the space
  (only with discard="unmap", as QEMU insists).
"""

from __future__ import annotations

from ..blockdev import BlockDevice, Extent
from ..errors import InvalidArgumentError

DISCARD_MODES = {"ignore": False, "off": False, "unmap": True, "on": True}
DETECT_ZEROES_MODES = ("off", "on", "unmap")


class WritePolicyDevice(BlockDevice):
    """`device` with QEMU's discard and detect-zeroes options applied to writes.

    Reads, extents and flushes pass straight through; close() closes nothing (the owner
    closes `device`)."""

    def __init__(self, device: BlockDevice, *, discard: str = "ignore", detect_zeroes: str = "off"):
        if discard not in DISCARD_MODES:
            raise InvalidArgumentError(
                f"discard mode {discard!r} is not one of {', '.join(DISCARD_MODES)}"
            )
        if detect_zeroes not in DETECT_ZEROES_MODES:
            raise InvalidArgumentError(
                f"detect_zeroes mode {detect_zeroes!r} is not one of "
                f"{', '.join(DETECT_ZEROES_MODES)}"
            )
        self.unmap = DISCARD_MODES[discard]
        if detect_zeroes == "unmap" and not self.unmap:
            raise InvalidArgumentError("detect_zeroes 'unmap' needs discard 'unmap'")
        self.device = device
        self.detect_zeroes = detect_zeroes
        self.size = device.size
        self.read_only = device.read_only
        self.filename = device.filename
        self.format = device.format
        self.backing = device.backing

    def readinto(self, offset: int, buffer) -> int:
        return self.device.readinto(offset, buffer)

    def write(self, offset: int, data) -> None:
        if self.detect_zeroes != "off" and _all_zero(data):
            self.device.write_zeroes(
                offset, memoryview(data).nbytes, may_unmap=self.detect_zeroes == "unmap"
            )
        else:
            self.device.write(offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.device.write_zeroes(offset, length, may_unmap and self.unmap)

    def discard(self, offset: int, length: int) -> None:
        if self.unmap:
            self.device.discard(offset, length)
        else:
            self.check_request(offset, length, write=True)

    def can_zero_fast(self, offset: int, length: int, may_unmap: bool = False) -> bool:
        return self.device.can_zero_fast(offset, length, may_unmap and self.unmap)

    def flush(self) -> None:
        self.device.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return self.device.extents(offset, length)

    def close(self) -> None:
        pass


def _all_zero(data) -> bool:
    """Whether a write's data is all zeros; most writes fail at the first or last byte."""
    view = memoryview(data).cast("B")
    if not view.nbytes or view[0] or view[-1]:
        return False
    raw = data if isinstance(data, (bytes, bytearray)) else view.tobytes()
    return raw.count(0) == len(raw)
