"""VMDK descriptor files: a text file naming the extent files that hold the disk.

What VMware ESXi keeps (createType "vmfs": "disk.vmdk" beside "disk-flat.vmdk") and what
Workstation splits a disk into (twoGbMaxExtentSparse, twoGbMaxExtentFlat). Each extent
line of the descriptor, "RW <sectors> <type> "<file>" [<offset>]", adds an extent: FLAT
and VMFS ones are raw bytes of their file from a sector offset on, SPARSE ones hosted
sparse extents (vmdk.VmdkImage). Lines are read as QEMU's vmdk driver reads them (its
sscanf format, the lines it skips and the ones it refuses); extent names are relative to
the descriptor's directory. Opened read-only: qimg reads, converts, compares, maps and
checks such images, their parent images too (chain.py opens the one parentFileNameHint
names); it neither writes nor creates them.
"""

from __future__ import annotations

import bisect
import errno

from .blockdev import RAW_EXTENT_BATCH, BlockDevice, Extent
from .errors import (
    CorruptImageError,
    InvalidArgumentError,
    Qcow2IOError,
    UnsupportedFeatureError,
)
from .hostfile import HostFile, open_host_file
from .sizes import BDRV_MAX_LENGTH
from .vmdk import (
    DESCRIPTOR_FILE_LIMIT,
    DESCRIPTOR_OFFSET,
    DESCRIPTOR_SIZE,
    MAX_GD_ENTRIES,
    SECTOR,
    VmdkImage,
    descriptor_cid,
    parent_file_name,
)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator

# createType values QEMU 7.2 opens from a descriptor file
DESCRIPTOR_FILE_TYPES = (
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
)
EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")
SESPARSE_CONST_HEADER_MAGIC = 0xCAFEBABE  # (a little-endian 64-bit field)
_WHITESPACE = " \t\n\v\f\r"  # (what a space in a scanf format skips)
_INT64_MAX = (1 << 63) - 1


def descriptor_text(file: HostFile, offset: int) -> str:
    """The descriptor at `offset` of `file`: at most QEMU's 1 MiB, up to a NUL."""
    return file.pread(DESCRIPTOR_FILE_LIMIT, offset).split(b"\0", 1)[0].decode("latin-1")


def create_type_of(text: str) -> str:
    """The descriptor's createType, as QEMU's vmdk_parse_description finds it (the first
    "createType" anywhere, the value after its '="', at most 127 characters)."""
    start = text.find("createType")
    if start >= 0:
        start += len("createType") + 2
        end = text.find('"', start)
        if start < len(text) and end >= 0 and end - start < 128:
            return text[start:end]
    raise CorruptImageError("invalid VMDK image descriptor")


def _scan_extent_line(text: str, pos: int) -> tuple:
    """QEMU's sscanf(line, "%10s %" SCNd64 " %10s \\"%511[^\\n\\r\\"]\\" %" SCNd64): the
    number of conversions made, then access, sectors, type, file name and offset (None
    where not converted). Like sscanf, a space skips any white space, newlines too."""
    values: list = [None] * 5
    end = len(text)

    def skip(at: int) -> int:
        while at < end and text[at] in _WHITESPACE:
            at += 1
        return at

    def word(at: int) -> tuple[str, int]:
        at = skip(at)
        start = at
        while at < end and at - start < 10 and text[at] not in _WHITESPACE:
            at += 1
        return text[start:at], at

    def number(at: int) -> tuple[int | None, int]:
        at = skip(at)
        start = at
        if at < end and text[at] in "+-":
            at += 1
        digits = at
        while at < end and text[at].isdigit() and text[at].isascii():
            at += 1
        if at == digits:
            return None, start
        value = int(text[start:at])
        return max(-_INT64_MAX - 1, min(_INT64_MAX, value)), at  # (strtoll clamps)

    values[0], pos = word(pos)
    if not values[0]:
        return (0, *values)
    values[1], pos = number(pos)
    if values[1] is None:
        return (1, *values)
    values[2], pos = word(pos)
    if not values[2]:
        return (2, *values)
    pos = skip(pos)
    if pos >= end or text[pos] != '"':
        return (3, *values)
    start = pos = pos + 1
    while pos < end and pos - start < 511 and text[pos] not in '\n\r"':
        pos += 1
    if pos == start:
        return (3, *values)
    values[3] = text[start:pos]
    if pos >= end or text[pos] != '"':
        return (4, *values)
    values[4], pos = number(pos + 1)
    return (5 if values[4] is not None else 4, *values)


def parse_extent_lines(text: str) -> Iterator[tuple[str, int, str, int]]:
    """(type, sectors, file name, offset in sectors: FLAT and VMFS only) of each extent
    line QEMU takes, in order; a line it refuses raises its "Invalid extent line" when it
    is reached (QEMU opens each extent as it reads its line)."""
    pos = 0
    while pos < len(text):
        newline = text.find("\n", pos)
        next_pos = len(text) if newline < 0 else newline + 1
        matches, access, sectors, kind, name, offset = _scan_extent_line(text, pos)
        line = text[pos : newline if newline >= 0 else len(text)]
        pos = next_pos
        if matches < 4 or access != "RW":
            continue
        if kind == "FLAT":
            if matches != 5 or offset < 0:
                raise InvalidArgumentError(f"Invalid extent line: {line}")
        elif kind == "VMFS":
            if matches != 4:
                raise InvalidArgumentError(f"Invalid extent line: {line}")
            offset = 0
        elif matches != 4:
            raise InvalidArgumentError(f"Invalid extent line: {line}")
        if sectors <= 0 or kind not in EXTENT_TYPES:
            continue
        yield kind, sectors, name, offset if offset is not None else 0


class _FlatExtent:
    """`sectors` sectors of a host file from byte `start` on (bytes past its end read as
    zeros, as QEMU's file driver reads them)."""

    def __init__(self, file: HostFile, kind: str, sectors: int, start: int):
        self.file = file
        self.filename = file.path
        self.kind = kind
        self.size = sectors * SECTOR
        self.start = start

    def readinto(self, offset: int, view: memoryview) -> None:
        position = self.start + offset  # (no file reaches 2**63: past that, nothing to read)
        data = self.file.pread(len(view), position) if position + len(view) <= _INT64_MAX else b""
        view[: len(data)] = data
        view[len(data) :] = bytes(len(view) - len(data))

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """Data with its host offset; the file's holes (and what lies past its end) as
        data reading as zeros, as QEMU's block status of a flat extent recursing into its
        file reports them."""
        pos, end = self.start + offset, self.start + offset + length
        file_end = self.file.size()  # (no file reaches 2**63: asked past its end, none is)
        batch: list[Extent] = []
        while pos < end:
            if len(batch) >= RAW_EXTENT_BATCH:  # (memory bounded however many runs)
                yield batch
                batch = []
            is_data, run_end = self.file.data_run(pos, end) if pos < file_end else (False, end)
            batch.append(Extent(pos - self.start, run_end - pos, True, not is_data, 0, pos, True))
            pos = run_end
        yield batch

    def first_grain_past_eof(self) -> int | None:
        """QEMU's check of a flat extent: its one "cluster" is the whole extent, at its
        start offset, which must lie inside the file."""
        return 0 if self.start >= self.file.size() else None

    def info(self) -> dict:
        return {"virtual-size": self.size, "filename": self.filename, "format": self.kind}

    def close(self) -> None:
        self.file.close()


class _SparseExtent:
    """A hosted sparse extent file named by a descriptor."""

    def __init__(self, image: VmdkImage, kind: str):
        self.image = image
        self.filename = image.filename
        self.kind = kind
        self.size = image.size
        self.file = image.file

    def readinto(self, offset: int, view: memoryview) -> None:
        self.image.readinto(offset, view)

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        return self.image.extent_batches(offset, length)

    def first_grain_past_eof(self) -> int | None:
        return self.image.first_grain_past_eof()

    def info(self) -> dict:
        info: dict = {"compressed": True} if self.image.compressed else {}
        info.update(
            {
                "virtual-size": self.size,
                "filename": self.filename,
                "cluster-size": self.image.grain_size,
                "format": self.kind,
            }
        )
        return info

    def close(self) -> None:
        self.image.close()


class VmdkDescriptorImage(BlockDevice):
    """A VMDK image whose descriptor names its extent files (read-only)."""

    format = "vmdk"

    def __init__(
        self,
        path: str,
        force_share: bool = False,
        backing_of: str | None = None,
        locking: bool = True,
        descriptor_offset: int = 0,
    ):
        """`descriptor_offset`: where the descriptor lies in the file (a sparse extent
        header with no capacity carries one further in)."""
        self.filename = path
        self.read_only = True
        self._parent: BlockDevice | None = None
        self._ends: list[int] = []  # guest offset where each extent ends
        self.file = open_host_file(
            path, role="backing file" if backing_of else None, named_by=backing_of
        )
        self.parts: list[_FlatExtent | _SparseExtent] = []
        try:
            if locking:
                self.file.lock_for_use(force_share)
            self._open(descriptor_offset, force_share, locking)
        except BaseException:
            for extent in self.parts:
                extent.close()
            self.file.close()
            raise
        for extent in self.parts:
            self._ends.append((self._ends[-1] if self._ends else 0) + extent.size)
        self.size = self._ends[-1] if self._ends else 0
        if self.size > BDRV_MAX_LENGTH:  # (QEMU's block layer, once the driver opened)
            self.close()
            raise Qcow2IOError(
                errno.EFBIG, "Could not refresh total sector count: File too large", path
            )
        first = self.parts[0] if self.parts else None
        same = all(_same_kind(first, extent) for extent in self.parts)
        # qemu-img info's cluster size: that of sparse extents all alike
        self.grain_size = (
            first.image.grain_size if isinstance(first, _SparseExtent) and same else None
        )

    def _open(self, descriptor_offset: int, force_share: bool, locking: bool) -> None:
        text = descriptor_text(self.file, descriptor_offset)
        create_type = create_type_of(text)
        if create_type not in DESCRIPTOR_FILE_TYPES:
            raise UnsupportedFeatureError(f"Unsupported image type '{create_type}'")
        self.create_type = create_type
        directory = self.filename[: self.filename.rfind("/") + 1]  # (QEMU's bdrv_dirname)
        directory_entries = 0  # in the sparse extents' grain directories, all loaded
        for kind, sectors, name, offset in parse_extent_lines(text):
            path = name if name.startswith("/") else directory + name
            if kind in ("FLAT", "VMFS"):
                file = open_host_file(path, role="VMDK extent file", named_by=self.filename)
                self.parts.append(_FlatExtent(file, kind, sectors, offset * SECTOR))
                if locking:
                    file.lock_for_use(force_share)
            elif kind == "SESPARSE":  # (QEMU's first refusal of another file, then qimg's)
                file = open_host_file(path, role="VMDK extent file", named_by=self.filename)
                try:
                    magic = int.from_bytes(file.pread(8, 0).ljust(8, b"\0"), "little")
                finally:
                    file.close()
                if magic != SESPARSE_CONST_HEADER_MAGIC:
                    raise CorruptImageError(f"Bad const header magic: 0x{magic:016x}")
                raise UnsupportedFeatureError(
                    f"qimg does not open seSparse VMDK extents ('{path}')"
                )
            else:
                budget = MAX_GD_ENTRIES - directory_entries
                image = VmdkImage(path, "r", force_share, None, locking, self.filename, budget)
                self.parts.append(_SparseExtent(image, kind))
                directory_entries += len(image.grain_directory)
        # (the CID and a parent come from where QEMU reads them: the start of a descriptor
        # file, the usual place in a sparse extent carrying one)
        head = self.file.pread(DESCRIPTOR_SIZE, descriptor_offset and DESCRIPTOR_OFFSET)
        cid_text = head.split(b"\0", 1)[0].decode("latin-1")
        self.backing_filename = parent_file_name(cid_text)
        self.backing_format = "vmdk"
        self.cid = descriptor_cid(cid_text, "CID")
        self.parent_cid = descriptor_cid(cid_text, "parentCID")

    @property  # type: ignore[override]
    def backing(self) -> BlockDevice | None:
        return self._parent

    @backing.setter
    def backing(self, parent: BlockDevice | None) -> None:
        """The parent image: the sparse extents read their unallocated grains from it
        (flat extents have none), each at its own guest offset."""
        self._parent = parent
        for start, part in zip([0, *self._ends], self.parts):
            if isinstance(part, _SparseExtent):
                part.image.parent_cid = self.parent_cid
                part.image.backing, part.image.backing_base = parent, start

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(extent index, offset in it, length, offset in the request) of each piece of a
        request, extent by extent."""
        done = 0
        index = bisect.bisect_right(self._ends, offset)
        while done < length:
            start = self._ends[index - 1] if index else 0
            in_extent = offset + done - start
            piece = min(length - done, self._ends[index] - (offset + done))
            yield index, in_extent, piece, done
            done += piece
            index += 1

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        for index, in_extent, piece, done in self._pieces(offset, len(view)):
            self.parts[index].readinto(in_extent, view[done : done + piece])
        return len(view)

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        for index, in_extent, piece, done in self._pieces(offset, length):
            shift = offset + done - in_extent  # (the extent's guest offset)
            for batch in self.parts[index].extent_batches(in_extent, piece):
                yield [ext._replace(offset=ext.offset + shift) for ext in batch]

    def host_filename(self, offset: int) -> str:
        """The file holding the guest byte at `offset` (qemu-img map's File column)."""
        return self.parts[
            min(bisect.bisect_right(self._ends, offset), len(self._ends) - 1)
        ].filename

    def first_grain_past_eof(self) -> int | None:
        """QEMU's check: the guest sector of the first grain (a flat extent is one) whose
        host offset lies at or past the end of its file, or None."""
        start = 0
        for extent in self.parts:
            sector = extent.first_grain_past_eof()
            if sector is not None:
                return start // SECTOR + sector
            start += extent.size
        return None

    def allocated_bytes(self) -> int:
        """What the descriptor and extent files take on the disk (qemu-img's disk size)."""
        return self.file.allocated_bytes() + sum(
            extent.file.allocated_bytes() for extent in self.parts
        )

    def specific_info(self) -> dict:
        """The "format-specific" data of `qemu-img info` (type vmdk)."""
        return {
            "cid": self.cid,
            "parent-cid": self.parent_cid,
            "create-type": self.create_type,
            "extents": [extent.info() for extent in self.parts],
        }

    def write(self, offset: int, data) -> None:
        self.check_request(offset, len(memoryview(data)), write=True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        self.check_request(0, 0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for extent in self.parts:
                extent.close()
            self.file.close()
            if self.backing is not None:
                self.backing.close()


def _same_kind(first, extent) -> bool:
    """QEMU's vmdk_extents_type_eq: both flat, or sparse alike (grain, compression)."""
    if isinstance(first, _FlatExtent) or isinstance(extent, _FlatExtent):
        return isinstance(first, _FlatExtent) and isinstance(extent, _FlatExtent)
    return (first.image.grain_size, first.image.compressed) == (
        extent.image.grain_size,
        extent.image.compressed,
    )
