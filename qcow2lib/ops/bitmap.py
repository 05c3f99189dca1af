"""`qemu-img bitmap`: add, remove, clear, enable, disable and merge persistent bitmaps.

Each operation writes the changed bitmaps (their bits in new clusters, a new table) and a
whole new bitmap directory beside the old ones, makes them durable, then switches the
header's bitmaps extension to them in one header write and frees what only the old state
used. A crash before the switch leaves the old bitmaps (and leaked clusters), after it
the new ones. Errors carry QEMU's messages (without its "Operation ... failed: " prefix).
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import replace

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

MAX_NAME_BYTES = 1023
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_BITMAP_BYTES = 256 << 20  # the bits of one bitmap held in memory by clear and merge


class BitmapOperationError(InvalidArgumentError):
    """A bitmap operation refused, with QEMU's message."""


def _holding_the_image(operation):
    """Run under the image lock: a write marks bitmaps under it too, so none is marked in
    a tracker the operation is about to replace."""

    @functools.wraps(operation)
    def run(image, *args, **kwargs):
        with image._lock:
            return operation(image, *args, **kwargs)

    return run


def default_granularity(image) -> int:
    """QEMU's default: the cluster size, kept between 4 KiB and 64 KiB."""
    return min(65536, max(4096, image.cluster_size))


@_holding_the_image
def add_bitmap(image, name: str, granularity: int | None = None, enabled: bool = True) -> None:
    """A new, empty persistent bitmap."""
    if not name:
        raise BitmapOperationError("Bitmap name cannot be empty")
    if granularity is not None and (granularity < 512 or granularity & (granularity - 1)):
        raise BitmapOperationError("Granularity must be power of 2 and at least 512")
    entries = _start(image)
    if any(entry.name == name for entry in entries):
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
    if len(entries) >= S.MAX_BITMAPS:
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
    _commit(image, entries + [new], {name: bytearray(_byte_count(image, new))}, [])


@_holding_the_image
def remove_bitmap(image, name: str) -> None:
    entries = _start(image)
    entry = _find(entries, name)
    _commit(image, [e for e in entries if e is not entry], {}, [entry])


@_holding_the_image
def clear_bitmap(image, name: str) -> None:
    entries = _start(image)
    entry = _usable(_find(entries, name))
    _commit(image, entries, {name: bytearray(_byte_count(image, entry))}, [entry])


@_holding_the_image
def set_bitmap_enabled(image, name: str, enabled: bool) -> None:
    entries = _start(image)
    entry = _usable(_find(entries, name))
    flags = entry.flags | FLAG_AUTO if enabled else entry.flags & ~FLAG_AUTO
    _commit(image, [replace(e, flags=flags) if e is entry else e for e in entries], {}, [])


@_holding_the_image
def merge_bitmap(image, name: str, source_image, source_name: str) -> None:
    """Set in bitmap `name` every bit set in `source_name` of `source_image` (the same
    image, or another of the same virtual size; granularities may differ)."""
    entries = _start(image)
    target = _find(entries, name)
    if source_image is image:
        source = _find(entries, source_name)
    else:
        source = _find(_current_entries(source_image), source_name)
    _usable(target)
    _usable(source)
    if source_image.size != image.size:
        raise BitmapOperationError(
            f"Bitmaps are of different sizes (destination size is {image.size}, source size "
            f"is {source_image.size}) and can't be merged"
        )
    bits = read_bits(image, target)
    _merge_into(
        bits,
        target.granularity_bits,
        read_bits(source_image, source),
        source.granularity_bits,
        image.size,
    )
    _commit(image, entries, {name: bits}, [target])


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


def _usable(entry: BitmapEntry) -> BitmapEntry:
    if entry.flags & FLAG_IN_USE:
        raise BitmapOperationError(f"Bitmap '{entry.name}' is inconsistent and cannot be used")
    return entry


def _pack_entry(entry: BitmapEntry) -> bytes:
    name = entry.name.encode()
    out = (
        S.BitmapDirectoryEntry.build(
            dict(
                bitmap_table_offset=entry.table_offset,
                bitmap_table_size=entry.table_size,
                flags=entry.flags,
                type=entry.type,
                granularity_bits=entry.granularity_bits,
                name_size=len(name),
                extra_data_size=len(entry.extra_data),
            )
        )
        + entry.extra_data
        + name
    )
    return out + bytes(-len(out) % 8)


def _commit(
    image, entries: list[BitmapEntry], new_bits: dict[str, bytearray], replaced: list[BitmapEntry]
) -> None:
    """Switch the image to the bitmaps `entries`, those named in `new_bits` with those
    bits; the clusters of `replaced` (and of the old directory) are freed afterwards."""
    cs = image.cluster_size
    with image._lock:
        final = []
        for entry in entries:
            bits = new_bits.get(entry.name)
            if bits is not None:  # all-zero clusters of bits need none
                table = [
                    image.write_new_clusters(bits[start : start + cs], pad=True)
                    if bits[start : start + cs].strip(b"\0")
                    else 0
                    for start in range(0, len(bits), cs)
                ]
                entry = replace(
                    entry,
                    table_size=len(table),
                    table_offset=image.write_new_clusters(struct.pack(f">{len(table)}Q", *table)),
                )
            final.append(entry)
        old = (
            bitmaps_extension(image.header)
            if image.header.autoclear_features & S.AUTOCLEAR_BITMAPS
            else None
        )
        image.header.extensions = [e for e in image.header.extensions if e.type != S.EXT_BITMAPS]
        if final:
            directory = b"".join(_pack_entry(entry) for entry in final)
            directory_offset = image.write_new_clusters(directory)
            image.header.extensions.append(
                Extension(
                    S.EXT_BITMAPS,
                    S.BitmapsExtension.build(
                        dict(
                            nb_bitmaps=len(final),
                            reserved=0,
                            bitmap_directory_size=len(directory),
                            bitmap_directory_offset=directory_offset,
                        )
                    ),
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
        image._bitmap_entries = read_directory(image.file, image.header, cs) if final else []
        image.bitmaps = [entry.info() for entry in image._bitmap_entries]
        image._bitmaps_live = False
        try:
            tracker = BitmapTracker(image, image._bitmap_entries)
            image._bitmap_tracker = tracker if tracker.tracked else None
        except Untrackable:
            image._bitmap_tracker = None
            image._bitmaps_live = bool(final)


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
