"""The one interface every consumer speaks: `BlockDevice`.

Raw files, qcow2 images and whole backing chains implement it; convert, the CLI, the
FUSE mount and the network exports know nothing else. It is deliberately small (size,
read, write, write_zeroes, discard, flush, extents), like an nbdkit plugin, and every
method may be called from several threads at once.
"""
from __future__ import annotations

import errno
import io
from typing import NamedTuple

from .errors import InvalidArgumentError, Qcow2IOError, ReadOnlyError
from .structs import QCOW_MAGIC
from .hostfile import open_host_file


class Extent(NamedTuple):
    """A run of guest bytes with one allocation state (qemu-img map's fields)."""
    offset: int
    length: int
    is_data: bool
    is_zero: bool
    depth: int
    host_offset: int | None = None
    present: bool = True


class BlockDevice:
    """Base of every device: range checks, the context manager and the file adapter."""

    format = "raw"
    filename = ""
    read_only = True
    backing: "BlockDevice | None" = None
    size = 0

    # -- to implement --
    def readinto(self, offset: int, buffer) -> int:
        raise NotImplementedError

    def write(self, offset: int, data) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def can_zero_fast(self, offset: int, length: int, may_unmap: bool = False) -> bool:
        """Whether write_zeroes of this range would be clearly faster than writing zeros
        (metadata or hole punching only). False when unsure; NBD's FAST_ZERO asks this."""
        return False

    def flush(self) -> None:
        raise NotImplementedError

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- shared --
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def check_request(self, offset: int, length: int, write: bool = False) -> None:
        if write and self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"request offset {offset} length {length} lies outside the image "
                f"(size {self.size})")

    def as_file(self) -> "BlockFile":
        return BlockFile(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbours that say the same thing (and whose host offsets continue)."""
    merged: list[Extent] = []
    for ext in extents:
        if ext.length == 0:
            continue
        if merged:
            last = merged[-1]
            same = (last.is_data == ext.is_data and last.is_zero == ext.is_zero
                    and last.depth == ext.depth and last.present == ext.present
                    and last.offset + last.length == ext.offset)
            contiguous = (last.host_offset is None and ext.host_offset is None) or (
                last.host_offset is not None and ext.host_offset is not None
                and last.host_offset + last.length == ext.host_offset)
            if same and contiguous:
                merged[-1] = last._replace(length=last.length + ext.length)
                continue
        merged.append(ext)
    return merged


class RawDevice(BlockDevice):
    """A raw image file: guest offset == file offset."""

    format = "raw"

    def __init__(self, path: str, mode: str = "r", force_share: bool = False,
                 probed: bool = False):
        self.filename = path
        self.probed = probed  # the format was guessed: sector 0 must not turn into another
        self.read_only = mode != "r+"
        self.file = open_host_file(path, writable=not self.read_only)
        try:
            self.file.lock_for_use(force_share)
        except BaseException:
            self.file.close()
            raise
        self.size = self.file.size()

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        self.file.readinto(view, offset)
        return len(view)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        if self.probed and offset < 4 and len(view):
            self._refuse_format_change(offset, view)
        self.file.pwrite(view, offset)

    def _refuse_format_change(self, offset: int, view: memoryview) -> None:
        """As QEMU: a guest of a probed raw image may not write a header that would make
        the next open probe it as another format (and so read the host's files)."""
        head = bytearray(self.file.pread(4, 0))
        end = min(4, offset + len(view))
        head[offset:end] = view[:end - offset]
        if bytes(head) == QCOW_MAGIC.to_bytes(4, "big"):
            raise Qcow2IOError(errno.EPERM, f"Operation not permitted: writing a qcow2 header "
                                            f"into '{self.filename}', a raw image whose format "
                                            f"was probed", self.filename)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        if may_unmap and self.file.punch_hole(offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.file.pwrite(memoryview(chunk)[:n], offset)
            offset += n

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        self.file.punch_hole(offset, length)

    def can_zero_fast(self, offset: int, length: int, may_unmap: bool = False) -> bool:
        """Only a hole punch is fast; without may_unmap zeros are written."""
        return may_unmap and not self.read_only

    def flush(self) -> None:
        if not self.read_only:
            self.file.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Data and holes as the filesystem reports them (SEEK_DATA / SEEK_HOLE)."""
        end = self.size if length is None else offset + length
        self.check_request(offset, end - offset)
        result: list[Extent] = []
        pos = offset
        while pos < end:
            is_data, run_end = self.file.data_run(pos, end)
            result.append(Extent(pos, run_end - pos, is_data, not is_data, 0, pos, True))
            pos = run_end
        return merge_extents(result)

    def resize(self, size: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")
        self.file.truncate(size)
        self.size = size

    def close(self) -> None:
        self.file.close()


class BlockFile(io.RawIOBase):
    """A seekable file object over a BlockDevice, for code that wants a stream."""

    def __init__(self, device: BlockDevice):
        self.device = device
        self.position = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self.device.read_only

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.device.size}[whence]
        if base + offset < 0:
            raise InvalidArgumentError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.device.size - self.position))
        if n:
            self.device.readinto(self.position, view[:n])
            self.position += n
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.position + len(view) > self.device.size:
            raise InvalidArgumentError(
                f"write of {len(view)} bytes at {self.position} would pass the end of the device "
                f"({self.device.size} bytes)")
        self.device.write(self.position, view)
        self.position += len(view)
        return len(view)

    def flush(self) -> None:
        if not self.device.read_only and not self.closed:
            self.device.flush()
