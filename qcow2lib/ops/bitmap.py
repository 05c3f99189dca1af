"""`qemu-img bitmap`: add, remove, clear, enable, disable and merge persistent bitmaps.

The operations of one run form a `BitmapSession`, stored as QEMU stores bitmaps when it
closes an image, so the file ends up laid out as qemu-img lays it out: every consistent
bitmap written anew (its bits in new clusters, a new table) and a whole new bitmap
directory, beside the old ones, made durable, then the header's bitmaps extension switched
to them in one header write and what only the old state used freed. A crash before the
switch leaves the old bitmaps (and leaked clusters), after it the new ones. Errors carry
QEMU's messages (without its "Operation ... failed: " prefix).
"""

from __future__ import annotations

import struct

from .. import structs as S
from ..bitmaps import (
    FLAG_AUTO,
    FLAG_IN_USE,
    BitmapEntry,
    BitmapTracker,
    Untrackable,
    bitmaps_extension,
    read_directory,
    read_table,
    set_bits,
)
from ..errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError
from ..header import Extension
from ..records import record, replace

MAX_NAME_BYTES = 1023
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_BITMAP_BYTES = 256 << 20  # the bits of one bitmap held in memory by clear and merge


class BitmapOperationError(InvalidArgumentError):
    """A bitmap operation refused, with QEMU's message."""


def default_granularity(image) -> int:
    """QEMU's default: the cluster size, kept between 4 KiB and 64 KiB."""
    return min(65536, max(4096, image.cluster_size))


@record
class _Bitmap:
    """A bitmap as a session will store it."""

    entry: BitmapEntry  # its directory entry as the session has changed it
    on_disk: BitmapEntry | None  # the entry in the directory on disk, None for a new bitmap
    bits: bytearray | None = None  # new content; None: what its table on disk holds
    empty: bool = False  # new content: all bits clear (a new or cleared bitmap)

    @property
    def inconsistent(self) -> bool:
        """In use on disk when the session began: kept as it is, never stored again."""
        return bool(self.entry.flags & FLAG_IN_USE)


class BitmapSession:
    """The bitmaps of an image, changed as one `qemu-img bitmap` run changes them and
    stored as QEMU stores them when it closes the image (so the file's layout is QEMU's).

    Changes are made in memory, except removing a bitmap the directory on disk holds: that
    writes a directory without it at once and frees its clusters. store() (on leaving the
    `with` block, whether or not an operation failed, as QEMU stores on close) writes every
    consistent bitmap anew in directory order, bitmaps added in the session last: its data
    clusters then its table, then a new directory, switched to in one header write; the old
    directory and tables are freed after it. Inconsistent bitmaps (in use on disk) are kept
    as they are. The image's lock is held for the whole session: writes wait.
    """

    def __init__(self, image):
        if image.format != "qcow2":
            raise UnsupportedFeatureError("Persistent bitmaps need a qcow2 image")
        self.image = image
        self._entered = False

    def __enter__(self) -> "BitmapSession":
        self.image._lock.acquire()
        try:
            self.bitmaps = [_Bitmap(entry, entry) for entry in _start(self.image)]
        except BaseException:
            self.image._lock.release()
            raise
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.store()
        finally:
            self._entered = False
            self.image._lock.release()

    def _find(self, name: str) -> _Bitmap:
        for bitmap in self.bitmaps:
            if bitmap.entry.name == name:
                return bitmap
        raise BitmapOperationError(f"Dirty bitmap '{name}' not found")

    def _usable(self, name: str) -> _Bitmap:
        bitmap = self._find(name)
        if bitmap.inconsistent:
            raise BitmapOperationError(
                f"Bitmap '{bitmap.entry.name}' is inconsistent and cannot be used"
            )
        return bitmap

    def add(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """A new, empty persistent bitmap."""
        image = self.image
        if not name:
            raise BitmapOperationError("Bitmap name cannot be empty")
        if granularity is not None and (granularity < 512 or granularity & (granularity - 1)):
            raise BitmapOperationError("Granularity must be power of 2 and at least 512")
        if any(bitmap.entry.name == name for bitmap in self.bitmaps):
            raise BitmapOperationError(f"Bitmap already exists: {name}")
        granularity = granularity or default_granularity(image)
        bits = granularity.bit_length() - 1
        prefix = f"Can't make bitmap '{name}' persistent in '{image.filename}': "
        if image.header.version < 3:
            raise BitmapOperationError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        if bits > MAX_GRANULARITY_BITS:
            raise BitmapOperationError(
                prefix + f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
            )
        if -(-_bit_count(image.size, bits) // 8) > 1 << 29:  # (QEMU's BME_MAX_PHYS_SIZE)
            raise BitmapOperationError(
                prefix + "Too much space will be occupied by the bitmap. Use larger granularity"
            )
        if len(name.encode()) > MAX_NAME_BYTES:
            raise BitmapOperationError(
                prefix + f"Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
            )
        if len(self.bitmaps) >= S.MAX_BITMAPS:
            raise BitmapOperationError(
                prefix + "Maximum number of persistent bitmaps is already reached"
            )
        new = BitmapEntry(
            name=name,
            flags=FLAG_AUTO if enabled else 0,
            type=1,
            granularity_bits=bits,
            table_offset=0,
            table_size=0,
            entry_offset=0,
        )
        self.bitmaps.append(_Bitmap(new, None, empty=True))

    def remove(self, name: str) -> None:
        bitmap = self._find(name)
        self.bitmaps.remove(bitmap)
        if bitmap.on_disk is not None:
            on_disk = [b.on_disk for b in self.bitmaps if b.on_disk is not None]
            _switch_directory(self.image, on_disk, [bitmap.on_disk])

    def clear(self, name: str) -> None:
        bitmap = self._usable(name)
        bitmap.bits, bitmap.empty = None, True

    def set_enabled(self, name: str, enabled: bool) -> None:
        bitmap = self._usable(name)
        flags = bitmap.entry.flags
        bitmap.entry = replace(
            bitmap.entry, flags=flags | FLAG_AUTO if enabled else flags & ~FLAG_AUTO
        )

    def merge(self, name: str, source_image, source_name: str) -> None:
        """Set in bitmap `name` every bit set in `source_name` of `source_image` (the same
        image, or another of the same virtual size; granularities may differ)."""
        image = self.image
        target = self._find(name)
        if source_image is image:
            source = self._find(source_name)
        else:
            entry = _find(_current_entries(source_image), source_name)
            source = _Bitmap(entry, entry)
        self._usable(name)
        if source.inconsistent:
            raise BitmapOperationError(f"Bitmap '{source_name}' is inconsistent and cannot be used")
        if source_image.size != image.size:
            raise BitmapOperationError(
                f"Bitmaps are of different sizes (destination size is {image.size}, source size "
                f"is {source_image.size}) and can't be merged"
            )
        if source_image is image:
            source_bits = self.current_bits(source)
        else:
            source_bits = read_bits(source_image, source.entry)
        bits = self.current_bits(target)
        _merge_into(
            bits,
            target.entry.granularity_bits,
            source_bits,
            source.entry.granularity_bits,
            image.size,
        )
        target.bits, target.empty = bits, False

    def current_bits(self, bitmap: _Bitmap) -> bytearray:
        """A copy of the bitmap's bits as the session has them."""
        if bitmap.bits is not None:
            return bytearray(bitmap.bits)
        if bitmap.empty:
            size = _byte_count(self.image, bitmap.entry)
            if size > MAX_BITMAP_BYTES:
                raise UnsupportedFeatureError(
                    f"Bitmap '{bitmap.entry.name}' is too big ({size} bytes; "
                    f"granularity {1 << bitmap.entry.granularity_bits})"
                )
            return bytearray(size)
        return read_bits(self.image, bitmap.entry)

    def store(self) -> None:
        """Write every consistent bitmap anew (see the class docstring); nothing when
        there is none, as QEMU."""
        if not self._entered or all(bitmap.inconsistent for bitmap in self.bitmaps):
            return
        image = self.image
        final, replaced = [], []
        for bitmap in self.bitmaps:
            if bitmap.inconsistent:
                final.append(bitmap.entry)
                continue
            table = [
                image.write_new_clusters(chunk, pad=True) if chunk.strip(b"\0") else 0
                for chunk in self._clusters(bitmap)
            ]
            final.append(
                replace(
                    bitmap.entry,
                    table_size=len(table),
                    table_offset=image.write_new_clusters(struct.pack(f">{len(table)}Q", *table)),
                )
            )
            if bitmap.on_disk is not None and bitmap.on_disk.table_size:
                replaced.append(bitmap.on_disk)
        _switch_directory(image, final, replaced)
        self.bitmaps = [_Bitmap(entry, entry) for entry in _current_entries(image)]

    def _clusters(self, bitmap: _Bitmap):
        """The bitmap's content cluster by cluster (the last one short), read from its
        old table one cluster at a time when the session has not changed it."""
        image = self.image
        cs = image.cluster_size
        size = _byte_count(image, bitmap.entry)
        table = None
        if bitmap.bits is None and not bitmap.empty:
            table = read_table(image, bitmap.entry)
        spare = size * 8 - _bit_count(image.size, bitmap.entry.granularity_bits)
        for index, start in enumerate(range(0, size, cs)):
            length = min(cs, size - start)
            if bitmap.bits is not None:
                chunk = bytearray(bitmap.bits[start : start + length])
            elif table is None:
                chunk = bytearray(length)
            else:
                host = table[index] & S.BITMAP_TABLE_OFFSET_MASK
                if host:
                    chunk = bytearray(image.file.pread(length, host))
                else:
                    chunk = bytearray(b"\xff" * length if table[index] & 1 else length)
            if spare and start + length == size:
                chunk[-1] &= 0xFF >> spare  # bits past the end of the disk stay clear
            yield chunk


def _one_operation(operation):
    """A module-level operation: one session around one change, under the image lock.
    (functools.wraps by hand: functools and what it imports cost a bitmap command's start.)"""

    def run(image, *args, **kwargs):
        with BitmapSession(image) as session:
            operation(session, *args, **kwargs)

    run.__name__, run.__qualname__ = operation.__name__, operation.__qualname__
    run.__doc__, run.__module__ = operation.__doc__, operation.__module__
    run.__wrapped__ = operation  # type: ignore[attr-defined]
    return run


@_one_operation
def add_bitmap(
    session: BitmapSession, name: str, granularity: int | None = None, enabled: bool = True
) -> None:
    """A new, empty persistent bitmap."""
    session.add(name, granularity, enabled)


@_one_operation
def remove_bitmap(session: BitmapSession, name: str) -> None:
    session.remove(name)


@_one_operation
def clear_bitmap(session: BitmapSession, name: str) -> None:
    session.clear(name)


@_one_operation
def set_bitmap_enabled(session: BitmapSession, name: str, enabled: bool) -> None:
    session.set_enabled(name, enabled)


@_one_operation
def merge_bitmap(session: BitmapSession, name: str, source_image, source_name: str) -> None:
    """Set in bitmap `name` every bit set in `source_name` of `source_image`."""
    session.merge(name, source_image, source_name)


# --- reading -------------------------------------------------------------------------------


def _bit_count(disk_size: int, granularity_bits: int) -> int:
    return -(-disk_size >> granularity_bits)


def _byte_count(image, entry: BitmapEntry) -> int:
    return -(-_bit_count(image.size, entry.granularity_bits) // 8)


def read_bits(image, entry: BitmapEntry) -> bytearray:
    """A bitmap's bits, bit i covering guest bytes [i << granularity_bits, ...)."""
    size = _byte_count(image, entry)
    if size > MAX_BITMAP_BYTES:
        raise UnsupportedFeatureError(
            f"Bitmap '{entry.name}' is too big ({size} bytes; "
            f"granularity {1 << entry.granularity_bits})"
        )
    cs = image.cluster_size
    table = read_table(image, entry)
    out = bytearray(size)
    for index, value in enumerate(table):
        start = index * cs
        length = min(cs, size - start)
        host = value & S.BITMAP_TABLE_OFFSET_MASK
        if host:
            out[start : start + length] = image.file.pread(length, host)
        elif value & 1:
            out[start : start + length] = b"\xff" * length
    spare = size * 8 - _bit_count(image.size, entry.granularity_bits)
    if spare:
        out[-1] &= 0xFF >> spare  # bits past the end of the disk stay clear
    return out


def _set_ranges(bits: bytearray, granularity_bits: int, disk_size: int):
    """(guest offset, length) runs covering every set bit (runs of 0xff bytes at once)."""
    import re  # (here: only a merge across granularities needs it; re costs 3 ms to load)

    for match in re.finditer(rb"\xff+|[^\x00\xff]", bits):
        start, end = match.span()
        if bits[start] == 0xFF:
            runs = [(start * 8, end * 8)]
        else:
            runs = [(start * 8 + k, start * 8 + k + 1) for k in range(8) if bits[start] >> k & 1]
        for first, stop in runs:
            offset = first << granularity_bits
            yield offset, min(disk_size, stop << granularity_bits) - offset


def _merge_into(
    bits: bytearray,
    granularity_bits: int,
    source: bytearray,
    source_granularity_bits: int,
    disk_size: int,
) -> None:
    if granularity_bits == source_granularity_bits:
        merged = int.from_bytes(bits, "little") | int.from_bytes(source, "little")
        bits[:] = merged.to_bytes(len(bits), "little")
        return
    for offset, length in _set_ranges(source, source_granularity_bits, disk_size):
        set_bits(bits, offset >> granularity_bits, (offset + length - 1) >> granularity_bits)


# --- committing ----------------------------------------------------------------------------


def _current_entries(image) -> list[BitmapEntry]:
    if image.format != "qcow2" or not image.header.autoclear_features & S.AUTOCLEAR_BITMAPS:
        return []  # stale bitmaps count as none (QEMU drops them)
    return read_directory(image.file, image.header, image.cluster_size)


def _start(image) -> list[BitmapEntry]:
    """Write back what the image has pending (bitmaps included) and read the directory."""
    if image.format != "qcow2":
        raise UnsupportedFeatureError("Persistent bitmaps need a qcow2 image")
    with image._lock:
        image.flush()
        tracker = image._bitmap_tracker
        if tracker is not None:
            tracker.close()  # all it tracked is stored: its bitmaps are consistent again
        return _current_entries(image)


def _find(entries: list[BitmapEntry], name: str) -> BitmapEntry:
    for entry in entries:
        if entry.name == name:
            return entry
    raise BitmapOperationError(f"Dirty bitmap '{name}' not found")


def _pack_entry(entry: BitmapEntry) -> bytes:
    name = entry.name.encode()
    out = (
        S.BITMAP_DIRECTORY_ENTRY_FORMAT.pack(
            entry.table_offset,
            entry.table_size,
            entry.flags,
            entry.type,
            entry.granularity_bits,
            len(name),
            len(entry.extra_data),
        )
        + entry.extra_data
        + name
    )
    return out + bytes(-len(out) % 8)


def _switch_directory(image, entries: list[BitmapEntry], replaced: list[BitmapEntry]) -> None:
    """Point the header at a new directory of `entries` (their tables written already),
    then free the old directory and the clusters of `replaced`."""
    cs = image.cluster_size
    old = (
        bitmaps_extension(image.header)
        if image.header.autoclear_features & S.AUTOCLEAR_BITMAPS
        else None
    )
    image.header.extensions = [e for e in image.header.extensions if e.type != S.EXT_BITMAPS]
    if entries:
        directory = b"".join(_pack_entry(entry) for entry in entries)
        directory_offset = image.write_new_clusters(directory)
        image.header.extensions.append(
            Extension(
                S.EXT_BITMAPS,
                S.BITMAPS_EXTENSION_FORMAT.pack(len(entries), 0, len(directory), directory_offset),
            )
        )
        image.header.autoclear_features |= S.AUTOCLEAR_BITMAPS
    else:
        image.header.autoclear_features &= ~S.AUTOCLEAR_BITMAPS
    image._write_back_all()  # the new clusters' refcounts and content, durable
    image._write_header()  # the switch
    image._sync(image.file)
    if old is not None:
        _free(image, old.bitmap_directory_offset, old.bitmap_directory_size)
    for entry in replaced:
        _free_bitmap(image, entry)
    image._write_back_all()
    image._bitmap_entries = read_directory(image.file, image.header, cs) if entries else []
    image.bitmaps = [entry.info() for entry in image._bitmap_entries]
    image._bitmaps_live = False
    try:
        tracker = BitmapTracker(image, image._bitmap_entries)
        image._bitmap_tracker = tracker if tracker.tracked else None
    except Untrackable:
        image._bitmap_tracker = None
        image._bitmaps_live = bool(entries)


def _free(image, offset: int, length: int) -> None:
    first = offset >> image.cluster_bits
    image.refcounts.free(first, ((offset + length - 1) >> image.cluster_bits) - first + 1)


def _free_bitmap(image, entry: BitmapEntry) -> None:
    """The table and data clusters of a bitmap no directory points at any more."""
    try:
        table = read_table(image, entry)
    except CorruptImageError:
        return  # nothing trustworthy to free: leaked at worst
    for value in table:
        if value & S.BITMAP_TABLE_OFFSET_MASK:
            _free(image, value & S.BITMAP_TABLE_OFFSET_MASK, image.cluster_size)
    _free(image, entry.table_offset, entry.table_size * 8)
