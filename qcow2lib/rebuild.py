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
from .bitmaps import bitmaps_extension, read_directory
from .cache import decode_be64, encode_be64
from .errors import CorruptImageError, InvalidArgumentError
from .refcount import RefcountBlock
from .snapshots import l2_table_offset, read_snapshot_table


_CHUNK_BITS = 16
_CHUNK_MASK = (1 << _CHUNK_BITS) - 1


class ClusterCounts:
    """References per host cluster, as the metadata implies them.

    Counts live in chunks of 64K clusters allocated on first use: a damaged or repaired
    image may be a sparse file terabytes long, and only what is referenced costs memory."""

    def __init__(self, cluster_bits: int, file_clusters: int):
        self.cluster_bits = cluster_bits
        self.file_clusters = file_clusters  # references at or past this are corruption
        self.chunks: dict[int, array] = {}

    def _past_end(self, offset: int, length: int) -> CorruptImageError:
        return CorruptImageError(f"Metadata references offset 0x{offset:x} (length {length}) "
                                 f"past the end of the image file")

    def add_range(self, offset: int, length: int) -> None:
        """One reference to every cluster that bytes [offset, offset + length) touch."""
        if length <= 0:
            return
        bits = self.cluster_bits
        cluster, last = offset >> bits, (offset + length - 1) >> bits
        if last >= self.file_clusters:
            raise self._past_end(offset, length)
        chunks = self.chunks
        while cluster <= last:
            chunk = chunks.get(cluster >> _CHUNK_BITS)
            if chunk is None:
                chunk = chunks[cluster >> _CHUNK_BITS] = array("I", bytes(4 << _CHUNK_BITS))
            chunk[cluster & _CHUNK_MASK] += 1
            cluster += 1

    def get(self, cluster: int) -> int:
        chunk = self.chunks.get(cluster >> _CHUNK_BITS)
        return chunk[cluster & _CHUNK_MASK] if chunk is not None else 0

    def items(self):
        """(cluster, count) for every referenced cluster, in order."""
        for index in sorted(self.chunks):
            base = index << _CHUNK_BITS
            for offset, count in enumerate(self.chunks[index]):
                if count:
                    yield base + offset, count

    def block_counts(self, first: int, length: int):
        """(cluster, count) for the referenced clusters in [first, first + length)."""
        end = first + length
        for index in range(first >> _CHUNK_BITS, ((end - 1) >> _CHUNK_BITS) + 1):
            chunk = self.chunks.get(index)
            if chunk is None:
                continue
            base = index << _CHUNK_BITS
            for offset in range(max(first - base, 0), min(end - base, 1 << _CHUNK_BITS)):
                if chunk[offset]:
                    yield base + offset, chunk[offset]

    def end(self) -> int:
        """One past the last referenced cluster."""
        for index in sorted(self.chunks, reverse=True):
            chunk = self.chunks[index]
            for offset in range(len(chunk) - 1, -1, -1):
                if chunk[offset]:
                    return (index << _CHUNK_BITS) + offset + 1
        return 0

    def unreferenced_runs(self, start: int, end: int):
        """(first, length) of the runs of unreferenced clusters in [start, end)."""
        position = start
        for cluster, _ in self.items():
            if cluster >= end:
                break
            if cluster > position:
                yield position, cluster - position
            position = max(position, cluster + 1)
        if position < end:
            yield position, end - position


def count_references(image, refcount_structure: bool = True,
                     trees: "Trees | None" = None) -> ClusterCounts:
    """References from all metadata; `refcount_structure` adds the refcount table and blocks.

    `trees` counts a state the header does not point at yet (a snapshot operation's new
    L1 tables and snapshot table) instead of the current one."""
    hdr = image.header
    cs = image.cluster_size
    file_size = image.file.size()
    refs = ClusterCounts(image.cluster_bits, -(-file_size // cs))
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
        count_tree(image, refs, l1)
    if hdr.crypto_offset:
        refs.add_range(hdr.crypto_offset, hdr.crypto_length)
    _count_bitmaps(image, refs)
    return refs


def count_tree(image, refs: ClusterCounts, l1) -> None:
    """Every L1 -> L2 and L1 -> L2 -> cluster path under the L1 table `l1` holds one
    reference (as qemu-img check counts)."""
    cluster_size = image.cluster_size
    for index, entry in enumerate(l1):
        l2_offset = l2_table_offset(entry, index, cluster_size)
        if l2_offset:
            refs.add_range(l2_offset, cluster_size)
            _count_l2(image, refs, image.map.l2_cache.get(l2_offset))


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


def _count_l2(image, refs: ClusterCounts, table) -> None:
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


def _count_bitmaps(image, refs: ClusterCounts) -> None:
    if not image.header.autoclear_features & S.AUTOCLEAR_BITMAPS:
        return  # without the autoclear bit the bitmaps are stale and own nothing (as QEMU)
    info = bitmaps_extension(image.header)
    if info is None:
        return
    refs.add_range(info.bitmap_directory_offset, info.bitmap_directory_size)
    for entry in read_directory(image.file, image.header, image.cluster_size):
        refs.add_range(entry.table_offset, entry.table_size * 8)  # (refused past the end)
        table = image.file.pread(entry.table_size * 8, entry.table_offset)
        for (value,) in struct.iter_unpack(">Q", table):
            if value & S.BITMAP_TABLE_OFFSET_MASK:
                refs.add_range(value & S.BITMAP_TABLE_OFFSET_MASK, image.cluster_size)


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


def write_refcount_structure(image, refs: ClusterCounts) -> tuple[int, int, int]:
    """Write a refcount table and blocks holding `refs` (plus their own clusters) past the
    end of the file, unreferenced until a header points at them.

    Returns (table offset, table clusters, end of the file after them)."""
    cs = image.cluster_size
    order = image.header.refcount_order
    max_refcount = (1 << (1 << order)) - 1
    block_entries = cs * 8 >> order
    used_blocks = set()
    for cluster, count in refs.items():
        if count > max_refcount:
            raise CorruptImageError(
                f"Cluster {cluster} is referenced {count} times, more than "
                f"refcount_bits {1 << order} can count")
        used_blocks.add(cluster // block_entries)
    # The new table and blocks go at `start`; blocks exist only where refcounts are not
    # all zero (a sparse file may reach far beyond what it uses).
    start = max(refs.end(), -(-image.file.size() // cs))
    table_clusters = blocks = 1
    while True:
        total = start + table_clusters + blocks
        block_indices = used_blocks.union(range(start // block_entries,
                                                (total - 1) // block_entries + 1))
        need_table = -(-(max(block_indices) + 1) * 8 // cs)
        if need_table * cs > S.MAX_REFTABLE_BYTES:
            raise InvalidArgumentError(
                f"Refcount table would need {max(block_indices) + 1} entries, more than the "
                f"format's limit of {S.MAX_REFTABLE_BYTES // 8} (image file of "
                f"{image.file.size()} bytes too large for its cluster size {cs})")
        if (len(block_indices), need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = len(block_indices), need_table
    first_block = start + table_clusters
    table = array("Q", bytes(table_clusters * cs))
    for position, index in enumerate(sorted(block_indices)):
        host_cluster = first_block + position
        table[index] = host_cluster * cs
        block = RefcountBlock(order, bytes(cs))
        base = index * block_entries
        for cluster, count in refs.block_counts(base, block_entries):
            block.set(cluster - base, count)
        for cluster in range(max(start, base), min(total, base + block_entries)):
            block.set(cluster - base, 1)  # the new table and blocks themselves
        image.file.pwrite(block.to_bytes(), host_cluster * cs)
    image.file.pwrite(encode_be64(table), start * cs)
    return start * cs, table_clusters, total * cs
