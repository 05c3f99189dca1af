"""The one interface every consumer speaks: `BlockDevice`.

Raw files, qcow2 images and whole backing chains implement it; convert, the CLI, the
FUSE mount and the network exports know nothing else. It is deliberately small (size,
read, write, write_zeroes, discard, flush, extents), like an nbdkit plugin, and every
method may be called from several threads at once.
"""

from __future__ import annotations

import errno
import io
from _operator import itemgetter, not_  # (operator.py itself: 0.2 ms more of every start)

from .errors import (
    InvalidArgumentError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from .structs import QCOW_MAGIC
from .hostfile import HostFile, open_host_file


RAW_EXTENT_BATCH = 4096  # SEEK_DATA/SEEK_HOLE pairs per batch of a raw file's extents


TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import NamedTuple

    class Extent(NamedTuple):
        """A run of guest bytes with one allocation state (qemu-img map's fields)."""

        offset: int
        length: int
        is_data: bool
        is_zero: bool
        depth: int
        host_offset: int | None = None
        present: bool = True

else:  # the same tuple without typing's NamedTuple or collections' namedtuple (their imports
    # cost start-up time); keep both field lists in step: mypy checks the one above, the
    # code runs this one. (_tuplegetter is the field descriptor namedtuple itself uses.)
    from _collections import _tuplegetter

    class Extent(tuple):
        """A run of guest bytes with one allocation state (qemu-img map's fields)."""

        __slots__ = ()
        _fields = ("offset", "length", "is_data", "is_zero", "depth", "host_offset", "present")

        def __new__(cls, offset, length, is_data, is_zero, depth, host_offset=None, present=True):
            return tuple.__new__(
                cls, (offset, length, is_data, is_zero, depth, host_offset, present)
            )

        def __getnewargs__(self):
            return tuple(self)

        def _replace(self, **changes) -> Extent:
            replaced = tuple.__new__(Extent, map(changes.pop, self._fields, self))
            if changes:
                raise ValueError(f"Got unexpected field names: {list(changes)!r}")
            return replaced

        def __repr__(self) -> str:
            fields = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self))
            return f"Extent({fields})"

        offset = _tuplegetter(0, "guest offset")
        length = _tuplegetter(1, "bytes")
        is_data = _tuplegetter(2, "read from a file (this layer's or a backing one's)")
        is_zero = _tuplegetter(3, "reads as zeros")
        depth = _tuplegetter(4, "layer answering: 0 this one, 1 its backing file, ...")
        host_offset = _tuplegetter(5, "where the bytes are in the file (None: nowhere)")
        present = _tuplegetter(6, "some layer of the chain answers (False: past them all)")


class BlockDevice:
    """A guest disk: a fixed number of bytes, addressed by guest offset.

    Every method may be called from several threads at once; data I/O of one device runs
    in parallel, metadata updates are serialized inside. Offsets and lengths are in bytes
    and need no alignment. A request that reaches past `size` raises InvalidArgumentError,
    a write to a read-only device ReadOnlyError, a failed host I/O Qcow2IOError (an
    OSError with its errno), broken metadata CorruptImageError; after close() every
    request raises Qcow2IOError (EBADF) saying the device is closed.
    """

    format = "raw"  # the format's name, as qemu-img names it ("raw", "qcow2", "nbd")
    filename = ""  # the name it was opened by
    read_only = True
    backing: "BlockDevice | None" = None  # the next layer of the chain, if any
    size = 0  # virtual size in bytes
    _closed = False  # set by close(); every later request is refused

    # -- to implement --
    def readinto(self, offset: int, buffer) -> int:
        """Fill `buffer` (any writable buffer) with the bytes at `offset`; returns its
        length. Unallocated ranges read as the backing file's bytes or as zeros."""
        raise NotImplementedError

    def write(self, offset: int, data) -> None:
        """Write `data` (bytes or any buffer) at `offset`. Acknowledged, not yet durable:
        call flush() for that."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeros, cheaply where the format can (zero flags, holes);
        may_unmap lets it release the host space too."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """Tell the device the range is no longer needed; what it reads afterwards is
        unspecified (zeros or the backing file's bytes)."""
        raise NotImplementedError

    def can_zero_fast(self, offset: int, length: int, may_unmap: bool = False) -> bool:
        """Whether write_zeroes of this range would be clearly faster than writing zeros
        (metadata or hole punching only). False when unsure; NBD's FAST_ZERO asks this."""
        return False

    def flush(self) -> None:
        """Make every acknowledged write durable (metadata written back in crash-safe
        order, then fdatasync). A failed flush keeps failing: nothing is claimed durable
        that may not be."""
        raise NotImplementedError

    def host_pieces(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """The range as (fd, file_offset, length) pieces of host files holding exactly its
        bytes, in order, for a consumer that moves them without reading them (os.sendfile);
        a piece reaching past its file's end reads as zeros there, as readinto does. Only a
        read-only device answers, since its clusters cannot move while the consumer works;
        None when it does not, or when some part is not plain bytes of a host file (zeros,
        compressed or encrypted data, a file that intercepts I/O, a subclass that reads
        its own way): then use readinto."""
        return None

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """The range (default: to the end) as runs of one allocation state each, in
        order and merged, with qemu-img map's fields, as a list: for bounded ranges
        (iter_extents streams a whole image)."""
        return list(self.iter_extents(offset, length))

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """The extents of an already checked range, in order, as lists of bounded size
        (neighbours across two lists may still merge). A device implements this, or
        only `extents` if a whole range's list is always small."""
        if type(self).extents is BlockDevice.extents:
            raise NotImplementedError
        yield self.extents(offset, length)

    def close(self) -> None:
        """Flush (when writable), release the image's locks and close its files; a
        second close() does nothing."""
        raise NotImplementedError

    # -- shared --
    def iter_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The merged extents of [offset, offset+length) (to the end by default), produced
        as they are found: memory stays bounded however many extents the image has."""
        if length is None:
            length = self.size - offset
        self.check_request(offset, length)
        return iter_merged(self.extent_batches(offset, length)) if length else iter(())

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset`, as new bytes (readinto() fills your own buffer)."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readv(self, offset: int, views: list[memoryview], length: int | None = None) -> int:
        """Fill byte views (memoryviews of format "B", such as a guest's scattered pages)
        back to back with the bytes at `offset`, as preadv does; returns their total length
        (`length`: that total, when the caller knows it, is not counted again). Devices
        whose data lies in host files read straight into the views; this default reads
        into one buffer and copies it out."""
        total = sum(map(len, views)) if length is None else length
        buffer = memoryview(bytearray(total))
        self.readinto(offset, buffer)
        scatter(buffer, views)
        return total

    def writev(self, offset: int, views: list[memoryview], length: int | None = None) -> int:
        """Write byte views (memoryviews of format "B", such as a guest's scattered pages)
        back to back at `offset`, as pwritev does; returns their total length (`length`
        as for readv). Devices whose data lies in host files write straight from the
        views; this default joins them into one buffer for write()."""
        if len(views) == 1:
            self.write(offset, views[0])
            return len(views[0])
        joined = b"".join(views)
        self.write(offset, joined)
        return len(joined)

    def check_request(self, offset: int, length: int, write: bool = False) -> None:
        """Refuse a request to a closed device, outside the device, or a write to a
        read-only one."""
        if self._closed:
            raise Qcow2IOError(errno.EBADF, f"'{self.filename}' is closed", self.filename)
        if write and self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"request offset {offset} length {length} lies outside the image (size {self.size})"
            )

    def as_file(self) -> "BlockFile":
        """A seekable io.RawIOBase over the device, for code that wants a stream."""
        return BlockFile(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_merged(
    batches: Iterable[Iterable[Extent]], pending_on_error: bool = False
) -> Iterator[Extent]:
    """The extents of the batches, neighbours that say the same thing (same state, host
    offsets continuing or both absent) joined, zero-length ones dropped. When the batches
    fail, the extent held back for joining is dropped (qemu-img map prints no entry it
    had not finished), or with pending_on_error produced first (convert: only a query
    past the last good extent fails, as in qemu-img)."""
    for batch in merged_batches(batches, pending_on_error):
        yield from batch


def merged_batches(
    batches: Iterable[Iterable[Extent]], pending_on_error: bool = False
) -> Iterator[list[Extent]]:
    """iter_merged a list at a time (none empty; the extent held back for joining comes
    at the head of a later list). A batch in which every extent is data where the one
    before is not, or the other way round, and none is empty (a fragmented image's
    shape: data, hole, data...) has nothing to join inside: it is taken whole, at C
    speed, and only its first extent may join the one held back."""
    last = None
    try:
        for batch in batches:
            if (
                type(batch) is list
                and len(batch) > 1
                and 0 not in map(_length_of, batch)
                and _alternating(bytes(map(not_, map(_is_data_of, batch))))
            ):
                if last is None:
                    out = batch[:-1]
                else:
                    joined = _joined(last, batch[0])
                    out = [last, *batch[:-1]] if joined is None else [joined, *batch[1:-1]]
                last = batch[-1]
                if out:
                    yield out
                continue
            out = []
            for ext in batch:
                if not ext[1]:
                    continue
                if last is not None:
                    joined = _joined(last, ext)
                    if joined is not None:
                        last = joined
                        continue
                    out.append(last)
                last = ext
            if out:
                yield out
    except Qcow2Error:
        if pending_on_error and last is not None:
            yield [last]
        raise
    if last is not None:
        yield [last]


_length_of = itemgetter(1)
_is_data_of = itemgetter(2)


def _alternating(flags: bytes) -> bool:
    """Whether no two neighbours of a string of 0/1 bytes are the same."""
    return b"\0\0" not in flags and b"\1\1" not in flags


def _joined(last: Extent, ext: Extent) -> Extent | None:
    """`last` and `ext` as one extent, if ext continues last saying the same thing."""
    if (
        last[0] + last[1] == ext[0]
        and last[2] == ext[2]
        and last[3] == ext[3]
        and last[4] == ext[4]
        and last[6] == ext[6]
    ):
        host, last_host = ext[5], last[5]
        if (
            host is None
            and last_host is None
            or (host is not None and last_host is not None and last_host + last[1] == host)
        ):
            return Extent(last[0], last[1] + ext[1], last[2], last[3], last[4], last_host, last[6])
    return None


class FilterDevice(BlockDevice):
    """A filter node above `child` (blkdebug, throttle): the child's content and size, each
    request first passed to `intercept(kind, offset, length)`, which may wait or raise.
    The kinds are "read", "write", "write-zeroes", "discard", "flush" and "block-status"."""

    def __init__(self, child: BlockDevice, filename: str):
        self.child = child
        self.filename = filename
        self.read_only = child.read_only
        self.size = child.size

    def intercept(self, kind: str, offset: int, length: int) -> None:
        raise NotImplementedError

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        self.intercept("read", offset, len(view))
        return self.child.readinto(offset, view)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        self.intercept("write", offset, len(view))
        self.child.write(offset, view)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        self.intercept("write-zeroes", offset, length)
        self.child.write_zeroes(offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        self.intercept("discard", offset, length)
        self.child.discard(offset, length)

    def flush(self) -> None:
        self.intercept("flush", 0, 0)
        self.child.flush()

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """The child's extents, after the query of the whole range is intercepted."""
        self.intercept("block-status", offset, length)
        yield from self.child.extent_batches(offset, length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.child.close()


class RawDevice(BlockDevice):
    """A raw image file: guest offset == file offset, or, with QEMU's raw options offset
    and size, a window of the file: guest offset 0 at file offset `file_offset`.

    Durability as for qcow2 images: close() flushes what was written since the last
    flush, and once an fdatasync has failed every later flush and close fails too (the
    kernel may have dropped the pages it could not write)."""

    format = "raw"

    def __init__(
        self,
        path: str,
        mode: str = "r",
        force_share: bool = False,
        probed: bool = False,
        backing_of: str | None = None,
        file=None,
        locking: bool = True,
        offset: int = 0,
        size: int | None = None,
    ):
        """`file`: the HostFile to use instead of opening `path` (a blkdebug layer).
        locking=False: QEMU's file.locking=off, no lock taken or tested. `offset` and
        `size`: the window (QEMU's raw options; size None: to the end of the file)."""
        self.filename = path
        self.probed = probed  # the format was guessed: sector 0 must not turn into another
        self.read_only = mode != "r+"
        self.file = file or open_host_file(
            path,
            writable=not self.read_only,
            role="backing file" if backing_of else None,
            named_by=backing_of,
        )
        try:
            if locking:
                self.file.lock_for_use(force_share)
            self.size = _window_size(self.file.size(), offset, size)
        except BaseException:
            self.file.close()
            raise
        self.file_offset = offset
        self.fixed_size = size is not None  # (QEMU then refuses to resize it)
        # blkdebug (blkdebug.py): told of each data request, as QEMU's raw driver does
        self.blkdebug = getattr(self.file, "blkdebug", None)
        self._unflushed = False  # written since the last flush
        self._flush_failure: Qcow2IOError | None = None
        self._closed = False

    def check_request(self, offset: int, length: int, write: bool = False) -> None:
        super().check_request(offset, length, write)
        if write:
            self._unflushed = True

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        if self.blkdebug is not None:
            self.blkdebug.event("read_aio")
        self.file.readinto(view, self.file_offset + offset)
        return len(view)

    def host_pieces(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        self.check_request(offset, length)
        if (
            not self.read_only
            or self.blkdebug is not None
            or type(self.file) is not HostFile
            or type(self).readinto is not RawDevice.readinto  # reads done another way
        ):
            return None
        return [(self.file.fd, self.file_offset + offset, length)] if length else []

    def readv(self, offset: int, views: list[memoryview], length: int | None = None) -> int:
        if (
            self.blkdebug is not None
            or type(self.file) is not HostFile
            or type(self).readinto is not RawDevice.readinto  # reads done another way
        ):
            return super().readv(offset, views, length)
        total = sum(map(len, views)) if length is None else length
        self.check_request(offset, total)
        self.file.preadv(views, self.file_offset + offset, total)
        return total

    def read(self, offset: int, length: int) -> bytes:
        """As BlockDevice.read, as the bytes of one pread."""
        self.check_request(offset, length)
        if self.blkdebug is not None:
            self.blkdebug.event("read_aio")
        return self.file.pread(length, self.file_offset + offset)

    def writev(self, offset: int, views: list[memoryview], length: int | None = None) -> int:
        if (
            self.blkdebug is not None
            or type(self.file) is not HostFile
            or type(self).write is not RawDevice.write  # writes done another way
            or self.probed
            and offset < 4
        ):
            return super().writev(offset, views, length)
        total = sum(map(len, views)) if length is None else length
        self.check_request(offset, total, write=True)
        self.file.pwritev(views, self.file_offset + offset, total)
        return total

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        if self.probed and offset < 4 and len(view):
            self._refuse_format_change(offset, view)
        if self.blkdebug is not None:
            self.blkdebug.event("write_aio")
        self.file.pwrite(view, self.file_offset + offset)

    def _refuse_format_change(self, offset: int, view: memoryview) -> None:
        """As QEMU: a guest of a probed raw image may not write a header that would make
        the next open probe it as another format (and so read the host's files)."""
        head = bytearray(self.file.pread(4, self.file_offset))
        end = min(4, offset + len(view))
        head[offset:end] = view[: end - offset]
        if bytes(head) == QCOW_MAGIC.to_bytes(4, "big"):
            raise Qcow2IOError(
                errno.EPERM,
                f"Operation not permitted: writing a qcow2 header "
                f"into '{self.filename}', a raw image whose format "
                f"was probed",
                self.filename,
            )

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        offset += self.file_offset
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
        self.file.punch_hole(self.file_offset + offset, length)

    def can_zero_fast(self, offset: int, length: int, may_unmap: bool = False) -> bool:
        """Only a hole punch is fast; without may_unmap zeros are written."""
        return may_unmap and not self.read_only

    def flush(self) -> None:
        if self.read_only or self._closed:
            return
        if self._flush_failure is not None:
            raise self._flush_failure
        try:
            self.file.flush()
        except Qcow2IOError as exc:
            self._flush_failure = exc
            raise
        self._unflushed = False

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """Data and holes as the filesystem reports them (SEEK_DATA / SEEK_HOLE)."""
        base = self.file_offset
        end = base + offset + length
        batch: list[Extent] = []
        pos = base + offset  # (a file offset)
        while pos < end:
            if len(batch) >= RAW_EXTENT_BATCH:
                yield batch
                batch = []
            is_data, run_end = self.file.data_run(pos, end)
            batch.append(Extent(pos - base, run_end - pos, is_data, not is_data, 0, pos, True))
            pos = run_end
        if batch:
            yield batch

    def resize(self, size: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")
        if self.fixed_size:
            raise UnsupportedFeatureError("Cannot resize fixed-size raw disks")
        self._unflushed = True
        self.file.truncate(self.file_offset + size)
        self.size = size

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._unflushed or self._flush_failure is not None:
                self.flush()
        finally:
            self._closed = True
            self.file.close()


def _window_size(file_size: int, offset: int, size: int | None) -> int:
    """The size of the window at `offset` of `size` bytes (None: to the end) of a file of
    `file_size` bytes, checked as QEMU's raw driver checks it."""
    if offset > file_size:
        raise InvalidArgumentError(
            f"Offset ({offset}) cannot be greater than size of the containing file ({file_size})"
        )
    if size is None:
        return file_size - offset
    if file_size - offset < size:
        raise InvalidArgumentError(  # (QEMU's message has the two spaces)
            f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to "
            f"the  actual size of the containing file ({file_size})"
        )
    if size % 512:
        raise InvalidArgumentError("Specified size is not multiple of 512")
    return size


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
                f"({self.device.size} bytes)"
            )
        self.device.write(self.position, view)
        self.position += len(view)
        return len(view)

    def flush(self) -> None:
        if not self.device.read_only and not self.closed:
            self.device.flush()


def split_views(views: list[memoryview], length: int) -> tuple[list[memoryview], list[memoryview]]:
    """The byte views holding the first `length` bytes, and those holding the rest (a view
    that straddles the cut is sliced in two)."""
    for index, view in enumerate(views):
        if length < len(view):
            if not length:
                return views[:index], views[index:]
            return views[:index] + [view[:length]], [view[length:]] + views[index + 1 :]
        length -= len(view)
    return views, []


def scatter(buffer: memoryview, views: list[memoryview]) -> None:
    """Copy the start of `buffer` into the byte views, in order."""
    done = 0
    for view in views:
        view[:] = buffer[done : done + len(view)]
        done += len(view)
