"""VMDK images: hosted sparse extents (monolithicSparse) and streamOptimized ones
(descriptor files naming extent files: vmdk_descriptor.py, which open_vmdk hands them to).

A sparse extent is one file: a 512-byte header ("KDMV", little-endian fields), an
embedded text descriptor, a grain directory (GD) of 32-bit sector offsets of grain
tables (GT), each GT holding the 32-bit sector offsets of its grains (0: unallocated,
1: a zeroed grain when the header's zeroed-grain flag is set). A redundant copy of the
GD and GTs follows the descriptor. streamOptimized extents compress every grain with
deflate (zlib framing): the GT entry points at a grain marker (guest sector number,
compressed length, data). An extent whose header says the GD is at the end keeps the
real header in a footer before the end-of-stream marker.

Test setups (QEMU's iotest 055) create streamOptimized targets, let QEMU write
compressed grains into them, and compare them with the source: qimg creates the
subformats monolithicSparse and streamOptimized with QEMU's layout, and reads both.
Opened for writing (convert -O vmdk), new grains are appended to the file as QEMU
appends them: a whole grain each in a sparse extent, a grain marker and the compressed
grain (whole grains only) in a streamOptimized one; both copies of the grain table
entry are then written, and the first write gives the image a new CID.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
import sys
import threading
import zlib
from array import array

from .blockdev import BlockDevice, Extent
from .errors import (
    CorruptImageError,
    InvalidArgumentError,
    Qcow2IOError,
    UnsupportedFeatureError,
    UntrustedImageError,
)
from .hostfile import create_host_file, open_host_file

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from .vmdk_descriptor import VmdkDescriptorImage

SECTOR = 512
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
# version, flags, capacity, grain size, descriptor offset and size (sectors), GTEs per GT,
# redundant GD offset, GD offset, overhead (sectors), unclean shutdown, four
# newline-detection characters, compression algorithm: all after the 4-byte magic.
HEADER = struct.Struct("<IIQQQQIQQQB4sH")
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = (1 << 64) - 1
GTE_ZEROED = 1
NL_CHECK_BYTES = b"\n \r\n"
MARKER = struct.Struct("<QII")  # value (sector or sector count), size, type
MARKER_EOS, MARKER_FOOTER = 0, 3
GRAIN_MARKER = struct.Struct("<QI")  # guest sector, compressed size
DESCRIPTOR_OFFSET = 0x200  # where QEMU reads a hosted sparse extent's descriptor
DESCRIPTOR_SIZE = 20 * SECTOR
DESCRIPTOR_FILE_LIMIT = (1 << 20) - 1  # QEMU reads at most this much of a descriptor file
MAX_GRAIN_SECTORS = 0x200000  # QEMU: more than 1 GiB a grain is a corrupt header
MAX_GTES_PER_GT = 512
MAX_GD_ENTRIES = 32 * 1024 * 1024
L2_CACHE_TABLES = 64
# Values of QEMU's create options (enumerations of its BlockdevCreateOptionsVmdk).
SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")


def _le32_table(data: bytes) -> array:
    table = array("I", data)
    if sys.byteorder == "big":
        table.byteswap()
    return table


def _pack_le32(values) -> bytes:
    table = array("I", values)
    if sys.byteorder == "big":
        table.byteswap()
    return table.tobytes()


PROBE_SIZE = 2048  # what QEMU's format probe reads of a file


def is_vmdk(first_bytes: bytes) -> bool:
    """Whether a file's first PROBE_SIZE bytes are a VMDK's, as QEMU's probe judges: a
    sparse extent's magic, or a descriptor whose first line that is not a comment or
    blank (spaces only) is "version=1", 2 or 3."""
    if first_bytes[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
        return True
    pos, end = 0, len(first_bytes)
    while pos < end:
        if first_bytes[pos : pos + 1] == b"#":
            newline = first_bytes.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
            continue
        if first_bytes[pos : pos + 1] == b" ":
            while pos < end and first_bytes[pos : pos + 1] == b" ":
                pos += 1
            if first_bytes[pos : pos + 1] == b"\r":
                pos += 1
            if pos == end or first_bytes[pos : pos + 1] != b"\n":
                return False
            pos += 1
            continue
        line = first_bytes[pos : pos + 11]
        return any(
            line.startswith(b"version=%d%s" % (n, eol))
            for n in (1, 2, 3)
            for eol in (b"\n", b"\r\n")
        )
    return False


def parent_file_name(text: str) -> str | None:
    """The parent image a descriptor names (parentFileNameHint="..."), as QEMU's
    vmdk_parent_open finds it: the first occurrence anywhere, the value after its '="'."""
    start = text.find("parentFileNameHint")
    if start < 0:
        return None
    start += len("parentFileNameHint") + 2
    end = text.find('"', start)
    if end < 0 or end - start > 4095:  # (QEMU: EINVAL, with no message of its own)
        raise InvalidArgumentError("Invalid argument")
    return text[start:end]


def descriptor_cid(text: str, key: str) -> int:
    """CID or parentCID: hex digits after the first `key=` (QEMU's sscanf of %x)."""
    start = text.find(key)
    if start < 0:
        raise InvalidArgumentError(f"The VMDK descriptor has no {key} (Invalid argument)")
    digits = text[start + len(key) + 1 :].lstrip(" \t\n")
    if digits[:2].lower() == "0x":
        digits = digits[2:]
    count = 0
    while count < len(digits) and digits[count] in "0123456789abcdefABCDEF":
        count += 1
    if not count:
        raise InvalidArgumentError(f"The VMDK descriptor's {key} is not a hex number")
    return int(digits[:count], 16) & 0xFFFFFFFF


class DescriptorFile(Exception):
    """VmdkImage met a descriptor file (at `offset`), not a sparse extent: open_vmdk
    opens it as a VmdkDescriptorImage."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


def open_vmdk(
    path: str,
    mode: str = "r",
    force_share: bool = False,
    backing_of: str | None = None,
    locking: bool = True,
    untrusted: bool = False,
) -> VmdkImage | VmdkDescriptorImage:
    """A VMDK image: a sparse extent holding its own descriptor (VmdkImage), or a
    descriptor file naming its extent files (vmdk_descriptor, read-only). An untrusted
    image (chain.open_image) may not be a descriptor file: its extent names could point
    at any host file."""
    try:
        image: VmdkImage | VmdkDescriptorImage = VmdkImage(
            path, mode, force_share, backing_of, locking
        )
    except DescriptorFile as found:
        from .vmdk_descriptor import VmdkDescriptorImage

        if untrusted:
            raise UntrustedImageError(
                f"Untrusted image '{path}' is a VMDK descriptor file, whose extent files "
                f"may be any host files"
            ) from None

        image = VmdkDescriptorImage(path, force_share, backing_of, locking, found.offset)
    if mode != "r" and isinstance(image, VmdkImage) and image.backing_filename is not None:
        image.close()
        raise UnsupportedFeatureError(
            "qimg opens VMDK images with a parent image (parentFileNameHint) read-only"
        )
    if mode != "r" and not isinstance(image, VmdkImage):  # (opened first: QEMU's refusals
        image.close()  # of a bad descriptor come first)
        raise UnsupportedFeatureError(
            "qimg opens VMDK descriptor files (and their extent files) read-only"
        )
    return image


class VmdkImage(BlockDevice):
    """A hosted sparse or streamOptimized VMDK extent (no parent image)."""

    format = "vmdk"

    def __init__(
        self,
        path: str,
        mode: str = "r",
        force_share: bool = False,
        backing_of: str | None = None,
        locking: bool = True,
        extent_of: str | None = None,
        gd_budget: int = MAX_GD_ENTRIES,
    ):
        """`extent_of`: the descriptor file naming this file as one of its extents (the
        file's own descriptor is then not read, and a descriptor file is refused), and
        `gd_budget` the grain directory entries the image's other extents leave it (their
        memory is bounded in all, not extent by extent)."""
        if mode not in ("r", "r+"):
            raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.filename = path
        self.read_only = mode == "r"
        self.extent_of = extent_of
        self.gd_budget = gd_budget
        self.backing_filename: str | None = None  # the parent image the descriptor names
        self.backing_format = "vmdk"
        self.backing_base = 0  # the guest offset of this extent in the image it is part of
        self.parent_cid = 0xFFFFFFFF
        self._parent_checked = False
        self.file = open_host_file(
            path,
            writable=not self.read_only,
            role="VMDK extent file" if extent_of else "backing file" if backing_of else None,
            named_by=extent_of or backing_of,
        )
        try:
            if locking:
                self.file.lock_for_use(force_share)
            self._open()
        except BaseException:
            self.file.close()
            raise
        self._lock = threading.Lock()
        self._tables: dict[int, array] = {}  # GT sector -> entries, a bounded cache
        self._last_grain: tuple[int, bytes] | None = None  # (sector, decompressed grain)
        self._write_lock = threading.Lock()  # writes allocate at the end: one at a time
        self._cid_updated = False
        self._unflushed = False

    # --- opening ------------------------------------------------------------------------

    def _open(self) -> None:
        file_size = self.file.size()
        if file_size < 4:
            raise CorruptImageError("File is too small, not a valid image")
        magic = self.file.pread(4, 0)
        if magic == VMDK3_MAGIC:
            raise UnsupportedFeatureError("qimg does not open VMDK3 (COWD) sparse extents")
        if magic != VMDK4_MAGIC:  # a descriptor file, as QEMU takes any other file
            if self.extent_of is not None:
                raise CorruptImageError("Image not in VMDK format")
            raise DescriptorFile(0)
        header = HEADER.unpack(self.file.pread(HEADER.size, 4).ljust(HEADER.size, b"\0"))
        (version, flags, capacity, grain_sectors, desc_offset) = header[:5]
        if capacity == 0 and desc_offset and self.extent_of is None:
            raise DescriptorFile(desc_offset * SECTOR)
        if header[8] == GD_AT_END:
            header = self._footer_header(file_size)
            (version, flags, capacity, grain_sectors, desc_offset) = header[:5]
        gtes_per_gt, rgd_offset, gd_offset, overhead = header[6:10]
        compression = header[12]
        self.compressed = compression == COMPRESSION_DEFLATE
        if version > 3:
            raise UnsupportedFeatureError(f"Unsupported VMDK version {version}")
        if gtes_per_gt > MAX_GTES_PER_GT:
            raise CorruptImageError("L2 table size too big")
        l1_entry_sectors = gtes_per_gt * grain_sectors
        if l1_entry_sectors == 0:
            raise CorruptImageError("L1 entry size is invalid")
        gd_entries = -(-capacity // l1_entry_sectors)
        if -(-file_size // SECTOR) < overhead:
            raise CorruptImageError(f"File truncated, expecting at least {overhead * SECTOR} bytes")
        if grain_sectors > MAX_GRAIN_SECTORS:
            raise CorruptImageError("Invalid granularity, image may be corrupt")
        if gd_entries > MAX_GD_ENTRIES:
            raise CorruptImageError("L1 size too big")
        if gd_entries > self.gd_budget:
            raise CorruptImageError(
                f"The grain directories of the image's sparse extents would hold more than "
                f"{MAX_GD_ENTRIES} entries in all (what one extent may hold)"
            )
        if gd_offset * SECTOR + gd_entries * 4 > file_size:
            raise CorruptImageError(
                f"Grain directory at offset {gd_offset * SECTOR} ({gd_entries} entries) "
                f"lies past the end of the file ({file_size} bytes)"
            )
        self.version = version
        self.has_marker = bool(flags & FLAG_MARKER)
        self.zero_grains = bool(flags & FLAG_ZERO_GRAIN)
        self.grain_size = grain_sectors * SECTOR
        self.gtes_per_gt = gtes_per_gt
        self.size = capacity * SECTOR
        self.grain_directory = _le32_table(self.file.pread(gd_entries * 4, gd_offset * SECTOR))
        self.cluster_size = self.grain_size
        self.redundant_directory = None
        if flags & FLAG_RGD and not self.read_only:
            if rgd_offset * SECTOR + gd_entries * 4 > file_size:
                raise CorruptImageError(
                    f"Redundant grain directory at offset {rgd_offset * SECTOR} lies past "
                    f"the end of the file ({file_size} bytes)"
                )
            self.redundant_directory = _le32_table(
                self.file.pread(gd_entries * 4, rgd_offset * SECTOR)
            )
        if version == 3 and not self.read_only and not self.compressed:
            raise UnsupportedFeatureError("VMDK version 3 must be read only")
        # where the next grain goes: the end of the file, rounded up to a grain at first
        file_sectors = -(-file_size // SECTOR)
        self._next_sector = -(-file_sectors // grain_sectors) * grain_sectors
        self.create_type = "streamOptimized" if self.compressed else "monolithicSparse"
        if self.extent_of is not None:
            return  # (its descriptor is the descriptor file's)
        descriptor = self.file.pread(DESCRIPTOR_SIZE, DESCRIPTOR_OFFSET).split(b"\0", 1)[0]
        text = descriptor.decode("latin-1")
        self.backing_filename = parent_file_name(text)
        self.cid = descriptor_cid(text, "CID")
        self.parent_cid = descriptor_cid(text, "parentCID")

    def _footer_header(self, file_size: int) -> tuple:
        """The header kept in the footer (footer marker, header, end-of-stream marker)."""
        start = -(-file_size // SECTOR) * SECTOR - 3 * SECTOR
        footer = self.file.pread(3 * SECTOR, start) if start >= 0 else b""
        if len(footer) < 3 * SECTOR:
            raise CorruptImageError("Invalid footer")
        _, footer_size, footer_type = MARKER.unpack_from(footer, 0)
        eos_value, eos_size, eos_type = MARKER.unpack_from(footer, 2 * SECTOR)
        if (
            footer[SECTOR : SECTOR + 4] != VMDK4_MAGIC
            or (footer_size, footer_type) != (0, MARKER_FOOTER)
            or (eos_value, eos_size, eos_type) != (0, 0, MARKER_EOS)
        ):
            raise CorruptImageError("Invalid footer")
        return HEADER.unpack_from(footer, SECTOR + 4)

    # --- grain lookup -------------------------------------------------------------------

    def _grain_table(self, gd_index: int) -> array | None:
        """The grain table of one GD entry (None when unallocated); loaded on first use."""
        gt_sector = self.grain_directory[gd_index]
        if not gt_sector:
            return None
        with self._lock:
            table = self._tables.get(gt_sector)
            if table is None:
                offset, length = gt_sector * SECTOR, self.gtes_per_gt * 4
                data = self.file.pread(length, offset)
                if len(data) < length:
                    raise CorruptImageError(
                        f"Grain table at offset {offset} (grain directory entry {gd_index}) "
                        f"lies past the end of the file"
                    )
                if len(self._tables) >= L2_CACHE_TABLES:
                    self._tables.pop(next(iter(self._tables)))
                table = self._tables[gt_sector] = _le32_table(data)
            return table

    def _grain_entry(self, grain_index: int) -> int:
        """The GT entry of a grain: 0 unallocated, GTE_ZEROED, else a sector offset."""
        table = self._grain_table(grain_index // self.gtes_per_gt)
        return 0 if table is None else table[grain_index % self.gtes_per_gt]

    def _is_zeroed(self, entry: int) -> bool:
        return self.zero_grains and entry == GTE_ZEROED

    # --- reading ------------------------------------------------------------------------

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        done = 0
        while done < len(view):
            guest = offset + done
            grain_index, in_grain = divmod(guest, self.grain_size)
            length = min(len(view) - done, self.grain_size - in_grain)
            target = view[done : done + length]
            entry = self._grain_entry(grain_index)
            if not entry and self.backing is not None:
                self._read_parent(guest, target)
            elif not entry or self._is_zeroed(entry):
                target[:] = bytes(length)
            elif self.compressed:
                grain = self._decompressed_grain(entry, grain_index)
                if in_grain + length > len(grain):
                    raise CorruptImageError(
                        f"Compressed grain {grain_index} holds {len(grain)} bytes, "
                        f"fewer than the {in_grain + length} read from it"
                    )
                target[:] = grain[in_grain : in_grain + length]
            else:
                self._read_grain(entry, grain_index, in_grain, target)
            done += length
        return len(view)

    def _check_parent(self) -> None:
        """QEMU's vmdk_is_cid_valid, before the first read from the parent: its CID must be
        the parentCID this image records (else the parent changed since)."""
        if self._parent_checked:
            return
        cid = getattr(self.backing, "cid", None)
        if cid != self.parent_cid:
            error = Qcow2IOError(
                errno.EINVAL,
                f"Invalid argument: the parent image's CID ({cid if cid is None else hex(cid)}) "
                f"is not the parentCID {self.parent_cid:#x} '{self.extent_of or self.filename}' "
                f"records",
                self.filename,
            )
            error.qemu_message = "Invalid argument"  # (QEMU says no more)
            raise error
        self._parent_checked = True

    def _read_parent(self, guest: int, target: memoryview) -> None:
        """Unallocated bytes: the parent's at the same guest offset (zeros past its end)."""
        assert self.backing is not None
        self._check_parent()
        offset = self.backing_base + guest
        inside = max(0, min(len(target), self.backing.size - offset))
        if inside:
            self.backing.readinto(offset, target[:inside])
        target[inside:] = bytes(len(target) - inside)

    def _unallocated(self, pos: int, length: int) -> list[Extent]:
        """What an unallocated range reports: the parent's extents one level deeper (past
        its end, or without one, a range reading as zeros)."""
        backing = self.backing
        base = self.backing_base
        inside = 0 if backing is None else max(0, min(length, backing.size - base - pos))
        extents = []
        if backing is not None and inside:
            for batch in backing.extent_batches(base + pos, inside):
                extents += [
                    ext._replace(offset=ext.offset - base, depth=ext.depth + 1) for ext in batch
                ]
        if inside < length:
            extents.append(Extent(pos + inside, length - inside, False, True, 0, None, False))
        return extents

    def _read_grain(self, sector: int, grain_index: int, in_grain: int, target) -> None:
        """Uncompressed grain bytes; what lies past the end of the file reads as zeros."""
        host = sector * SECTOR
        if host >= self.file.size():
            raise CorruptImageError(
                f"Grain {grain_index} at offset {host} lies past the end of the file"
            )
        data = self.file.pread(len(target), host + in_grain)
        target[: len(data)] = data
        target[len(data) :] = bytes(len(target) - len(data))

    def _decompressed_grain(self, sector: int, grain_index: int) -> bytes:
        """A compressed grain inflated (the last one is kept: reads come in pieces)."""
        last = self._last_grain
        if last is not None and last[0] == sector:
            return last[1]
        host = sector * SECTOR
        if self.has_marker:
            head = self.file.pread(GRAIN_MARKER.size, host)
            if len(head) < GRAIN_MARKER.size:
                raise CorruptImageError(
                    f"Grain marker of grain {grain_index} at offset {host} lies past the "
                    f"end of the file"
                )
            _, data_length = GRAIN_MARKER.unpack(head)
            data_offset = host + GRAIN_MARKER.size
        else:
            data_length, data_offset = self.grain_size, host
        if not data_length or data_length > 2 * self.grain_size:
            raise CorruptImageError(
                f"Compressed grain {grain_index} at offset {host} has an invalid "
                f"length ({data_length} bytes)"
            )
        data = self.file.pread(data_length, data_offset)
        inflater = zlib.decompressobj()
        try:
            plain = inflater.decompress(data, self.grain_size)
        except zlib.error as exc:
            raise CorruptImageError(
                f"Compressed grain {grain_index} at offset {host} does not inflate: {exc}"
            ) from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise CorruptImageError(
                f"Compressed grain {grain_index} at offset {host} does not inflate to at "
                f"most one grain ({self.grain_size} bytes)"
            )
        self._last_grain = (sector, plain)
        return plain

    # --- block status -------------------------------------------------------------------

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """One batch per grain table: unallocated grains read as zeros and are not
        present (or are the parent's, one level deeper), zeroed grains are present
        zeros, uncompressed grains name their host offset (compressed ones have none), as
        QEMU's block status of a VMDK."""
        end = offset + length
        table_span = self.grain_size * self.gtes_per_gt
        pos = offset
        while pos < end:
            gd_index = pos // table_span
            table_end = min(end, (gd_index + 1) * table_span)
            table = self._grain_table(gd_index)
            if table is None:
                yield self._unallocated(pos, table_end - pos)
                pos = table_end
                continue
            batch: list[Extent] = []
            unallocated = -1  # where the run of unallocated grains being passed began
            while pos < table_end:
                grain_index, in_grain = divmod(pos, self.grain_size)
                run = min(table_end, (grain_index + 1) * self.grain_size) - pos
                entry = table[grain_index % self.gtes_per_gt]
                if not entry:
                    unallocated = pos if unallocated < 0 else unallocated
                    pos += run
                    continue
                if unallocated >= 0:
                    batch += self._unallocated(unallocated, pos - unallocated)
                    unallocated = -1
                if self._is_zeroed(entry):
                    batch.append(Extent(pos, run, False, True, 0, None, True))
                elif self.compressed:
                    batch.append(Extent(pos, run, True, False, 0, None, True))
                else:
                    batch.append(Extent(pos, run, True, False, 0, entry * SECTOR + in_grain))
                pos += run
            if unallocated >= 0:
                batch += self._unallocated(unallocated, pos - unallocated)
            yield batch

    # --- what qemu-img check looks at --------------------------------------------------

    def first_grain_past_eof(self) -> int | None:
        """The guest sector of the first grain whose host offset lies at or past the end
        of the file (QEMU's whole VMDK check), or None."""
        file_size = self.file.size()
        grain_sectors = self.grain_size // SECTOR
        for gd_index in range(len(self.grain_directory)):
            table = self._grain_table(gd_index)
            if table is None:
                continue
            first_grain = gd_index * self.gtes_per_gt
            for index, entry in enumerate(table):
                grain_index = first_grain + index
                if grain_index * self.grain_size >= self.size:
                    break
                if entry and not self._is_zeroed(entry) and entry * SECTOR >= file_size:
                    return grain_index * grain_sectors
        return None

    # --- what qemu-img info shows -------------------------------------------------------

    def specific_info(self) -> dict:
        """The "format-specific" data of `qemu-img info` (type vmdk)."""
        extent: dict = {}
        if self.compressed:
            extent["compressed"] = True
        extent.update(
            {
                "virtual-size": self.size,
                "filename": self.filename,
                "cluster-size": self.grain_size,
                "format": "",
            }
        )
        return {
            "cid": self.cid,
            "parent-cid": self.parent_cid,
            "create-type": self.create_type,
            "extents": [extent],
        }

    # --- the rest of BlockDevice: read-only -----------------------------------------------

    # --- writing ----------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        """Write guest bytes; a streamOptimized image takes whole grains only (and the
        last, shorter one), each written once, compressed."""
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        with self._write_lock:
            self._unflushed = True
            pos = 0
            while pos < len(view):
                grain_index, in_grain = divmod(offset + pos, self.grain_size)
                length = min(len(view) - pos, self.grain_size - in_grain)
                piece = view[pos : pos + length]
                if self.compressed:
                    self._write_compressed_grain(grain_index, in_grain, piece)
                else:
                    self._write_plain(grain_index, in_grain, piece)
                pos += length
                self._new_cid_once()

    def write_compressed(self, offset: int, data) -> None:
        """convert's compressed writes: whole grains of a streamOptimized image."""
        if not self.compressed:
            raise UnsupportedFeatureError("Compression not supported for this file format")
        self.write(offset, data)

    def _write_plain(self, grain_index: int, in_grain: int, piece) -> None:
        entry = self._grain_entry(grain_index)
        if entry and not self._is_zeroed(entry):
            self.file.pwrite(piece, entry * SECTOR + in_grain)
            return
        grain = bytearray(self.grain_size)  # a new grain: zeros around the data
        grain[in_grain : in_grain + len(piece)] = piece
        sector = self._next_sector
        self.file.pwrite(grain, sector * SECTOR)
        self._next_sector += self.grain_size // SECTOR
        self._set_entry(grain_index, sector)

    def _write_compressed_grain(self, grain_index: int, in_grain: int, piece) -> None:
        guest = grain_index * self.grain_size + in_grain
        if in_grain or (len(piece) < self.grain_size and guest + len(piece) != self.size):
            raise InvalidArgumentError(
                f"A streamOptimized VMDK image takes whole compressed grains: write of "
                f"{len(piece)} bytes at offset {guest} refused"
            )
        entry = self._grain_entry(grain_index)
        if entry and not self._is_zeroed(entry):
            raise Qcow2IOError(
                errno.EIO, "Could not write to allocated cluster for streamOptimized"
            )
        if not self.has_marker:
            raise InvalidArgumentError("Compressed grains need grain markers (header flags)")
        packed = zlib.compress(bytes(piece))
        record = GRAIN_MARKER.pack(guest // SECTOR, len(packed)) + packed
        record += bytes(-len(record) % SECTOR)
        sector = self._next_sector
        self.file.pwrite(record, sector * SECTOR)
        self._next_sector += len(record) // SECTOR
        self._set_entry(grain_index, sector)

    def _set_entry(self, grain_index: int, value: int) -> None:
        """Point a grain's entry in the grain table and in its redundant copy at `value`."""
        gd_index, gt_index = divmod(grain_index, self.gtes_per_gt)
        table = self._grain_table(gd_index)
        if table is None:
            raise UnsupportedFeatureError(
                f"Grain directory entry {gd_index} has no grain table to allocate grain "
                f"{grain_index} in"
            )
        entry = _pack_le32([value])
        self.file.pwrite(entry, self.grain_directory[gd_index] * SECTOR + gt_index * 4)
        if self.redundant_directory is not None and self.redundant_directory[gd_index]:
            self.file.pwrite(entry, self.redundant_directory[gd_index] * SECTOR + gt_index * 4)
        with self._lock:
            table[gt_index] = value
            self._last_grain = None

    def _new_cid_once(self) -> None:
        """The first write after opening gives the image a new content ID, as QEMU's."""
        if self._cid_updated:
            return
        self._cid_updated = True
        region = self.file.pread(DESCRIPTOR_SIZE, DESCRIPTOR_OFFSET)
        text = region.split(b"\0", 1)[0]
        start = text.find(b"CID=")
        if start < 0:
            return
        end = start + 4
        while end < len(text) and text[end : end + 1] in b"0123456789abcdefABCDEF":
            end += 1
        self.cid = secrets.randbits(32)
        text = text[: start + 4] + b"%x" % self.cid + text[end:]
        self.file.pwrite(text.ljust(DESCRIPTOR_SIZE, b"\0")[:DESCRIPTOR_SIZE], DESCRIPTOR_OFFSET)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Whole grains become zeroed grains where the image has them; anything else is
        written as zeros (QEMU's fallback)."""
        self.check_request(offset, length, write=True)
        end = offset + length
        pos = offset
        while pos < end:
            grain_index, in_grain = divmod(pos, self.grain_size)
            run = min(end, (grain_index + 1) * self.grain_size) - pos
            if self.zero_grains and not in_grain and run == self.grain_size:
                with self._write_lock:
                    self._unflushed = True
                    if not self._is_zeroed(self._grain_entry(grain_index)):
                        self._set_entry(grain_index, GTE_ZEROED)
                    self._new_cid_once()
            else:
                self.write(pos, bytes(run))
            pos += run

    def discard(self, offset: int, length: int) -> None:
        """QEMU's VMDK driver ignores discards: so does this one."""
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        self.check_request(0, 0)
        if not self.read_only:
            self.file.flush()
            self._unflushed = False

    def close(self) -> None:
        if not self._closed:
            try:
                if not self.read_only and self._unflushed:
                    self.file.flush()
            finally:
                self._closed = True
                self.file.close()
                if self.backing is not None and self.extent_of is None:  # (else the image's)
                    self.backing.close()


def create_vmdk(
    path: str,
    size: int,
    subformat: str = "monolithicSparse",
    adapter_type: str = "ide",
    hwversion: str | None = None,
    toolsversion: str | None = None,
    compat6: bool = False,
    zeroed_grain: bool = False,
) -> None:
    """Create an empty hosted sparse VMDK image (subformat monolithicSparse or
    streamOptimized) with QEMU's layout: header, descriptor at sector 1 (20 sectors),
    redundant GD and its GTs, GD and its GTs, grains from the next 64 KiB boundary.
    `size` is rounded up to whole sectors. Errors name the option and value."""
    if subformat not in SUBFORMATS or adapter_type not in ADAPTER_TYPES:
        bad = subformat if subformat not in SUBFORMATS else adapter_type
        raise InvalidArgumentError(f"invalid parameter value: {bad}")
    if compat6:
        if hwversion is not None:
            raise InvalidArgumentError("compat6 cannot be enabled with hwversion set")
        hwversion = "6"
    if subformat not in ("monolithicSparse", "streamOptimized"):
        raise UnsupportedFeatureError(
            f"qimg creates VMDK images of subformat monolithicSparse or streamOptimized, "
            f"not {subformat}"
        )
    if size < 0:
        raise InvalidArgumentError(f"Image size must be a non-negative number (size {size})")
    sectors = -(-size // SECTOR)
    compress = subformat == "streamOptimized"
    grain_sectors, gtes_per_gt = 128, SECTOR
    grains = -(-sectors // grain_sectors)
    gt_sectors = gtes_per_gt * 4 // SECTOR
    gt_count = -(-grains // gtes_per_gt)
    gd_sectors = -(-gt_count * 4 // SECTOR)
    if gt_count > MAX_GD_ENTRIES:
        raise InvalidArgumentError(f"Image size {size} is too large for a VMDK extent")
    rgd_offset = 1 + 20
    gd_offset = rgd_offset + gd_sectors + gt_sectors * gt_count
    overhead = -(-(gd_offset + gd_sectors + gt_sectors * gt_count) // grain_sectors)
    overhead *= grain_sectors
    flags = FLAG_RGD | FLAG_NL_DETECT
    flags |= (FLAG_COMPRESS | FLAG_MARKER) if compress else 0
    flags |= FLAG_ZERO_GRAIN if zeroed_grain else 0
    version = 3 if compress else 2 if zeroed_grain else 1
    header = VMDK4_MAGIC + HEADER.pack(
        version,
        flags,
        sectors,
        grain_sectors,
        1,
        20,
        gtes_per_gt,
        rgd_offset,
        gd_offset,
        overhead,
        0,
        NL_CHECK_BYTES,
        COMPRESSION_DEFLATE if compress else 0,
    )
    heads = 16 if adapter_type == "ide" else 255
    descriptor = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={secrets.randbits(32):x}\n"
        "parentCID=ffffffff\n"
        f'createType="{subformat}"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} SPARSE "{os.path.basename(path)}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hwversion or "4"}"\n'
        f'ddb.geometry.cylinders = "{sectors * SECTOR // (63 * heads * SECTOR)}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.toolsVersion = "{toolsversion or "2147483647"}"\n'
    ).encode("utf-8", "surrogateescape")
    if len(descriptor) > DESCRIPTOR_SIZE:
        raise InvalidArgumentError(
            f"The VMDK descriptor ({len(descriptor)} bytes) does not fit its "
            f"{DESCRIPTOR_SIZE} bytes (toolsversion or hwversion too long)"
        )
    file = create_host_file(path)
    try:
        file.pwrite(header, 0)
        file.truncate(overhead * SECTOR)
        for directory, first_table in (
            (rgd_offset, rgd_offset + gd_sectors),
            (gd_offset, gd_offset + gd_sectors),
        ):
            entries = range(first_table, first_table + gt_count * gt_sectors, gt_sectors)
            file.pwrite(_pack_le32(entries), directory * SECTOR)
        file.pwrite(descriptor, DESCRIPTOR_OFFSET)
        file.flush()
    finally:
        file.close()
