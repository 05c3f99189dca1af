"""Counting every reference the metadata makes, and rebuilding refcounts from them.

`count_references` walks the header, L1 tables (active and snapshots), L2 tables, data
and compressed clusters, the snapshot table, the encryption header and the persistent
bitmaps. Opening a dirty lazy-refcounts image rebuilds the refcount structure from it;
check and repair use the same walk.
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from . import structs as S
from .cache import decode_be64, encode_be64
from .errors import CorruptImageError
from .refcount import RefcountBlock
from .snapshots import read_snapshot_table


class References:
    """Reference counts per host cluster, as the metadata implies them."""

    def __init__(self, cluster_bits: int, file_clusters: int):
        self.cluster_bits = cluster_bits
        self.counts = array("Q", bytes(8 * max(file_clusters, 1)))

    def add_range(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if last >= len(self.counts):
            raise CorruptImageError(
                f"Metadata references offset 0x{offset:x} (length {length}) past the end of the "
                f"image file")
        for cluster in range(first, last + 1):
            self.counts[cluster] += 1


def count_references(image, refcount_structure: bool = True,
                     trees: "Trees | None" = None) -> References:
    """References from all metadata; `refcount_structure` adds the refcount table and blocks.

    `trees` counts a state the header does not point at yet (a snapshot operation's new
    L1 tables and snapshot table) instead of the current one."""
    hdr = image.header
    cs = image.cluster_size
    file_size = image.file.size()
    refs = References(image.cluster_bits, -(-file_size // cs))
    refs.add_range(0, cs)
    if refcount_structure:
        refs.add_range(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        for entry in image.refcounts.table:
            if entry & S.REFT_OFFSET_MASK:
                refs.add_range(entry & S.REFT_OFFSET_MASK, cs)
    if trees is None:
        trees = current_trees(image)
    refs.add_range(trees.snapshot_table_offset, trees.snapshot_table_bytes)
    for l1_offset, l1 in trees.l1_tables:
        refs.add_range(l1_offset, len(l1) * 8)
        for entry in l1:
            l2_offset = entry & S.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refs.add_range(l2_offset, cs)  # every L1 -> L2 -> cluster path holds a reference
            _count_l2(image, refs, image.map.l2_cache.get(l2_offset))
    if hdr.crypto_offset:
        refs.add_range(hdr.crypto_offset, hdr.crypto_length)
    _count_bitmaps(image, refs)
    return refs


@dataclass
class Trees:
    """Every L1 table (the active one first) and the snapshot table of one image state."""
    l1_tables: list[tuple[int, array]]  # (host offset, entries)
    snapshot_table_offset: int = 0
    snapshot_table_bytes: int = 0


def current_trees(image) -> Trees:
    """The L1 tables and snapshot table the header points at now."""
    hdr = image.header
    trees = Trees([(hdr.l1_table_offset, image.map.l1)])
    if hdr.nb_snapshots:
        snapshots, table_bytes = read_snapshot_table(image.file, hdr.snapshots_offset,
                                                     hdr.nb_snapshots, image.cluster_size,
                                                     image.file.size())
        trees.snapshot_table_offset, trees.snapshot_table_bytes = hdr.snapshots_offset, \
            table_bytes
        for snap in snapshots:
            trees.l1_tables.append((snap.l1_table_offset, decode_be64(
                image.file.pread(snap.l1_size * 8, snap.l1_table_offset))))
    return trees


def _count_l2(image, refs: References, table) -> None:
    step = image.map.entry_words
    has_data_file = image.has_data_file
    for i in range(0, len(table), step):
        entry = table[i]
        if not entry:
            continue
        if entry & S.OFLAG_COMPRESSED:
            host = entry & image.map.compressed_offset_mask
            sectors = ((entry >> image.map.csize_shift) & image.map.csize_mask) + 1
            refs.add_range(host & ~511, sectors * 512)
            continue
        host = entry & S.L2E_OFFSET_MASK
        if host and not has_data_file:
            refs.add_range(host, image.cluster_size)


def _count_bitmaps(image, refs: References) -> None:
    for ext in image.header.extensions:
        if ext.type != S.EXT_BITMAPS or len(ext.data) < S.BitmapsExtension.sizeof():
            continue
        info = S.BitmapsExtension.parse(ext.data)
        if info.bitmap_directory_size > S.MAX_L1_BYTES:
            raise CorruptImageError(
                f"Bitmap directory too large (bitmap_directory_size {info.bitmap_directory_size})")
        refs.add_range(info.bitmap_directory_offset, info.bitmap_directory_size)
        directory = image.file.pread(info.bitmap_directory_size, info.bitmap_directory_offset)
        pos = 0
        while pos + S.BITMAP_DIRECTORY_ENTRY_SIZE <= len(directory):
            entry = S.BitmapDirectoryEntry.parse(directory[pos:pos + S.BITMAP_DIRECTORY_ENTRY_SIZE])
            refs.add_range(entry.bitmap_table_offset, entry.bitmap_table_size * 8)
            table = image.file.pread(entry.bitmap_table_size * 8, entry.bitmap_table_offset)
            for (value,) in struct.iter_unpack(">Q", table):
                if value & S.BITMAP_TABLE_OFFSET_MASK:
                    refs.add_range(value & S.BITMAP_TABLE_OFFSET_MASK, image.cluster_size)
            pos += S.BITMAP_DIRECTORY_ENTRY_SIZE + entry.extra_data_size + entry.name_size
            pos += -pos % 8


def rebuild_refcounts(image) -> None:
    """Write a new refcount structure matching the metadata, then point the header at it.

    The new table and blocks go past everything in use, so the old structure stays valid
    until the header switches over; the old clusters are then simply unreferenced.
    """
    table_offset, table_clusters, end = write_refcount_structure(
        image, count_references(image, refcount_structure=False))
    image.file.flush()
    image.header.refcount_table_offset = table_offset
    image.header.refcount_table_clusters = table_clusters
    image._write_header_fields()
    image.file.flush()
    image._host_size = max(image._host_size, end)
    image.use_refcount_table(table_offset, table_clusters, end)


def write_refcount_structure(image, refs: References) -> tuple[int, int, int]:
    """Write a refcount table and blocks holding `refs` (plus their own clusters) past the
    end of the file, unreferenced until a header points at them.

    Returns (table offset, table clusters, end of the file after them)."""
    cs = image.cluster_size
    order = image.header.refcount_order
    max_refcount = (1 << (1 << order)) - 1
    counts = refs.counts
    used_end = len(counts)
    while used_end and not counts[used_end - 1]:
        used_end -= 1
    for cluster in range(used_end):
        if counts[cluster] > max_refcount:
            raise CorruptImageError(
                f"Cluster {cluster} is referenced {counts[cluster]} times, more than "
                f"refcount_bits {1 << order} can count")
    block_entries = cs * 8 >> order
    start = max(used_end, -(-image.file.size() // cs))
    table_clusters = blocks = 1
    while True:
        total = start + table_clusters + blocks
        need_blocks = -(-total // block_entries)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = need_blocks, need_table
    first_block = start + table_clusters
    table = array("Q", [(first_block + i) * cs for i in range(blocks)])
    table.extend([0] * (table_clusters * cs // 8 - blocks))
    for i in range(blocks):
        block = RefcountBlock(order, bytes(cs))
        base = i * block_entries
        for j in range(min(block_entries, used_end - base)):
            if counts[base + j]:
                block.set(j, counts[base + j])
        for cluster in range(max(start, base), min(total, base + block_entries)):
            block.set(cluster - base, 1)  # the new table and blocks themselves
        image.file.pwrite(block.to_bytes(), (first_block + i) * cs)
    image.file.pwrite(encode_be64(table), start * cs)
    return start * cs, table_clusters, total * cs
