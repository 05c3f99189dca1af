"""Persistent dirty bitmaps: read from the bitmap directory, and kept up to date on writes.

An enabled bitmap ("auto" flag) records which granules of the guest disk changed, for
incremental backups. While an image is open for writing, `BitmapTracker` sets a bit for
every granule a write, zero write or discard touches, keeps the bitmap clusters it
changed in memory, and stores them when the image's metadata is written back. As in
QEMU, the bitmaps it tracks carry the IN_USE flag on disk from the first change until
the image is closed cleanly, so a crash leaves them marked inconsistent rather than
silently missing changes. Disabled bitmaps are left as they are.

When a bitmap cannot be kept (a flag or type this code does not know, a table it cannot
trust) the image clears the bitmaps' autoclear bit at the first change instead, as the
format asks of a writer that does not maintain them; QEMU then ignores them.
"""

from __future__ import annotations

import struct
from array import array

from . import structs as S
from .errors import CorruptImageError
from .overlap import BITMAP_DIRECTORY, BITMAP_TABLE
from .records import field, record

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
_KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
_TYPE_DIRTY_TRACKING = 1
_FLAGS_FIELD = 12  # offset of `flags` inside a directory entry
_ALL_ONES = 1  # a bitmap table entry without a cluster whose bits all read as set


@record
class BitmapEntry:
    """One bitmap directory entry, with where it lies in the file."""

    name: str
    flags: int
    type: int
    granularity_bits: int
    table_offset: int
    table_size: int
    entry_offset: int  # host offset of the directory entry
    extra_data: bytes = b""

    def info(self) -> dict:
        """As qemu-img info lists it."""
        flags = [
            flag for bit, flag in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if self.flags & bit
        ]
        return {"name": self.name, "granularity": 1 << self.granularity_bits, "flags": flags}


@record
class BitmapsExtension:
    """The bitmaps header extension's fields (S.BITMAPS_EXTENSION_FIELDS)."""

    nb_bitmaps: int
    reserved: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@record
class DirectoryEntryHead:
    """The fixed part of a bitmap directory entry (S.BITMAP_DIRECTORY_ENTRY_FIELDS)."""

    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name_size: int
    extra_data_size: int


def parse_entry_head(directory: bytes, pos: int) -> DirectoryEntryHead:
    """The fixed part of the directory entry at `pos` (24 bytes there, checked by the
    caller)."""
    return DirectoryEntryHead(*S.BITMAP_DIRECTORY_ENTRY_FORMAT.unpack_from(directory, pos))


def bitmaps_extension(header) -> BitmapsExtension | None:
    """The parsed bitmaps header extension, or None."""
    for ext in header.extensions:
        if ext.type == S.EXT_BITMAPS and len(ext.data) >= S.BITMAPS_EXTENSION_FORMAT.size:
            return BitmapsExtension(*S.BITMAPS_EXTENSION_FORMAT.unpack_from(ext.data))
    return None


def check_qemu_constraints(entries: list[BitmapEntry]) -> None:
    """Raise CorruptImageError for the first entry QEMU's open refuses: flags beyond
    in-use and auto, a type other than dirty tracking, a granularity outside 512 B - 2 GiB,
    a name over 1023 bytes or a table over 2^27 entries. (This engine keeps such bitmaps
    and invalidates them on the first write; a drop-in for QEMU's tools refuses them.)"""
    for entry in entries:
        problems = []
        if entry.flags & ~(FLAG_IN_USE | FLAG_AUTO):
            problems.append(f"flags 0x{entry.flags:x}")
        if entry.type != _TYPE_DIRTY_TRACKING:
            problems.append(f"type {entry.type}")
        if not 9 <= entry.granularity_bits <= 31:
            problems.append(f"granularity_bits {entry.granularity_bits}")
        if len(entry.name.encode()) > 1023:
            problems.append(f"name of {len(entry.name.encode())} bytes")
        if entry.table_size > 0x8000000:
            problems.append(f"bitmap_table_size {entry.table_size}")
        if problems:
            raise CorruptImageError(
                f"Bitmap '{entry.name}' directory entry is unusable ({', '.join(problems)})",
                qemu_message=f"Bitmap '{entry.name}' doesn't satisfy the constraints",
            )


def read_directory(file, header, cluster_size: int) -> list[BitmapEntry]:
    """The bitmap directory the header points at ([] without the extension)."""
    info = bitmaps_extension(header)
    if info is None:
        return []
    if not 0 < info.nb_bitmaps <= S.MAX_BITMAPS:
        raise CorruptImageError(
            f"bitmaps_ext: invalid number of bitmaps (nb_bitmaps {info.nb_bitmaps})"
        )
    if info.bitmap_directory_offset % cluster_size:
        raise CorruptImageError(
            f"bitmaps_ext: invalid bitmap directory offset (bitmap_directory_offset "
            f"{info.bitmap_directory_offset})"
        )
    if info.bitmap_directory_size > S.MAX_BITMAP_DIRECTORY_BYTES or (
        info.bitmap_directory_offset + info.bitmap_directory_size > file.size()
    ):
        raise CorruptImageError(
            f"Bitmap directory (bitmap_directory_offset {info.bitmap_directory_offset}, "
            f"bitmap_directory_size {info.bitmap_directory_size}) lies outside the file"
        )
    directory = file.pread(info.bitmap_directory_size, info.bitmap_directory_offset)
    entries = []
    pos = 0
    for _ in range(info.nb_bitmaps):
        if pos + S.BITMAP_DIRECTORY_ENTRY_SIZE > len(directory):
            raise CorruptImageError(f"Bitmap directory truncated (nb_bitmaps {info.nb_bitmaps})")
        raw = parse_entry_head(directory, pos)
        name_at = pos + S.BITMAP_DIRECTORY_ENTRY_SIZE + raw.extra_data_size
        entries.append(
            BitmapEntry(
                name=directory[name_at : name_at + raw.name_size].decode("utf-8", "replace"),
                flags=raw.flags,
                type=raw.type,
                granularity_bits=raw.granularity_bits,
                table_offset=raw.bitmap_table_offset,
                table_size=raw.bitmap_table_size,
                entry_offset=info.bitmap_directory_offset + pos,
                extra_data=directory[name_at - raw.extra_data_size : name_at],
            )
        )
        pos = name_at + raw.name_size
        pos += -pos % 8
    return entries


def read_table(image, entry: BitmapEntry) -> array:
    """A bitmap's table, refused unless it fits the disk size and every entry is sound
    (0: all zeros, 1: all ones, else an aligned cluster inside the file)."""
    cs = image.cluster_size
    file_size = image.file.size()
    bits = -(-image.size >> entry.granularity_bits)
    data_bytes = -(-bits // 8)
    if (
        entry.table_size != -(-data_bytes // cs)
        or entry.table_offset % cs
        or entry.table_offset + entry.table_size * 8 > file_size
    ):
        raise CorruptImageError(
            f"Bitmap '{entry.name}' table is invalid (bitmap_table_offset "
            f"0x{entry.table_offset:x}, bitmap_table_size "
            f"{entry.table_size})"
        )
    table = array(
        "Q",
        struct.unpack(
            f">{entry.table_size}Q", image.file.pread(entry.table_size * 8, entry.table_offset)
        ),
    )
    for index, value in enumerate(table):
        host = value & S.BITMAP_TABLE_OFFSET_MASK
        if value & ~S.BITMAP_TABLE_OFFSET_MASK & ~_ALL_ONES or (
            host and (value & _ALL_ONES or host % cs or host + cs > file_size)
        ):
            raise CorruptImageError(
                f"Bitmap '{entry.name}' table entry {index} is invalid (0x{value:x})"
            )
    return table


class Untrackable(Exception):
    """A bitmap this code cannot keep up to date (the caller invalidates them all)."""


@record
class _Tracked:
    entry: BitmapEntry
    table: array  # bitmap table entries
    changed: dict[int, bytearray | bytes] = field(default_factory=dict)  # index -> bits


class BitmapTracker:
    """Sets the bits of every enabled bitmap for the guest ranges that change."""

    def __init__(self, image, entries: list[BitmapEntry]):
        self.image = image
        self.cluster_size = image.cluster_size
        self.bits_per_cluster = image.cluster_size * 8
        self.in_use_on_disk = False
        self.all_set = b"\xff" * image.cluster_size  # a changed cluster whose bits are all set
        self.tracked: list[_Tracked] = []
        for entry in entries:
            if (
                entry.flags & ~_KNOWN_FLAGS
                or entry.type != _TYPE_DIRTY_TRACKING
                or (entry.extra_data and not entry.flags & FLAG_EXTRA_DATA_COMPATIBLE)
            ):
                raise Untrackable(
                    f"bitmap '{entry.name}' flags 0x{entry.flags:x} type {entry.type}"
                )
            if entry.flags & FLAG_IN_USE or not entry.flags & FLAG_AUTO:
                continue  # inconsistent already, or disabled: writes do not change it
            if not 9 <= entry.granularity_bits <= 31:
                raise Untrackable(
                    f"bitmap '{entry.name}' granularity_bits {entry.granularity_bits}"
                )
            try:
                self.tracked.append(_Tracked(entry, read_table(image, entry)))
            except CorruptImageError as exc:
                raise Untrackable(str(exc)) from exc

    def mark(self, offset: int, length: int) -> None:
        """Before guest bytes [offset, offset + length) change (under the image lock)."""
        if not self.tracked or length <= 0:
            return
        if not self.in_use_on_disk:
            self._set_in_use(True)
        last_byte = offset + length - 1
        per_cluster = self.bits_per_cluster
        for bitmap in self.tracked:
            shift = bitmap.entry.granularity_bits
            first_bit, last_bit = offset >> shift, last_byte >> shift
            for index in range(first_bit // per_cluster, last_bit // per_cluster + 1):
                if bitmap.table[index] == _ALL_ONES:
                    continue
                base = index * per_cluster
                first = max(first_bit, base) - base
                last = min(last_bit, base + per_cluster - 1) - base
                bits = bitmap.changed.get(index)
                if bits is self.all_set:
                    continue
                if first == 0 and last == per_cluster - 1:
                    bitmap.changed[index] = self.all_set  # (no copy: a whole-disk discard
                    continue  # must not need the whole bitmap)
                if bits is None:
                    bits = bitmap.changed[index] = self._load(bitmap.table[index])
                assert isinstance(bits, bytearray)  # (the one bytes value is all_set)
                set_bits(bits, first, last)

    def _load(self, table_entry: int) -> bytearray:
        host = table_entry & S.BITMAP_TABLE_OFFSET_MASK
        return bytearray(
            self.image.file.pread(self.cluster_size, host) if host else bytes(self.cluster_size)
        )

    @property
    def pending(self) -> bool:
        return any(bitmap.changed for bitmap in self.tracked)

    def allocate(self) -> None:
        """Clusters for changed parts of bitmaps that had none (first step of a store: the
        image writes their refcounts back before `store` points a table at them)."""
        image = self.image
        for bitmap in self.tracked:
            for index in bitmap.changed:
                if not bitmap.table[index]:
                    first = image.refcounts.allocate(1)
                    host = first << image.cluster_bits
                    image._host_size = max(image._host_size, host + self.cluster_size)
                    bitmap.table[index] = host

    def store(self) -> None:
        """Write the changed bitmap clusters, then the tables that point at new ones (their
        refcounts are on disk already)."""
        image = self.image
        tables = []
        for bitmap in self.tracked:
            if not bitmap.changed:
                continue
            for index, bits in bitmap.changed.items():
                host = bitmap.table[index] & S.BITMAP_TABLE_OFFSET_MASK
                image.guard_write(host, len(bits))  # a table entry may point at metadata
                image.file.pwrite(bits, host)
            bitmap.changed.clear()
            tables.append(bitmap)
        if not tables:
            return
        image._sync(image.file)
        for bitmap in tables:
            image.guard_write(bitmap.entry.table_offset, len(bitmap.table) * 8, BITMAP_TABLE)
            image.file.pwrite(
                struct.pack(f">{len(bitmap.table)}Q", *bitmap.table), bitmap.entry.table_offset
            )
        image._sync(image.file)

    def _set_in_use(self, in_use: bool) -> None:
        image = self.image
        for bitmap in self.tracked:
            flags = bitmap.entry.flags | FLAG_IN_USE if in_use else bitmap.entry.flags
            image.guard_write(bitmap.entry.entry_offset + _FLAGS_FIELD, 4, BITMAP_DIRECTORY)
            image.file.pwrite(struct.pack(">I", flags), bitmap.entry.entry_offset + _FLAGS_FIELD)
        image._sync(image.file)
        self.in_use_on_disk = in_use

    def close(self) -> None:
        """After the last store: the bitmaps are consistent again."""
        if self.in_use_on_disk:
            self._set_in_use(False)


def set_bits(bits: bytearray, first: int, last: int) -> None:
    """Set bits first..last (inclusive) of a bitmap (or a cluster of one); bit 0 is byte
    0's lowest."""
    first_byte, last_byte = first >> 3, last >> 3
    low = (0xFF << (first & 7)) & 0xFF
    high = 0xFF >> (7 - (last & 7))
    if first_byte == last_byte:
        bits[first_byte] |= low & high
        return
    bits[first_byte] |= low
    bits[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
    bits[last_byte] |= high
