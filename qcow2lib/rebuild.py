"""Counting every reference the metadata makes, and rebuilding refcounts from them.

`count_references` walks the header, L1 tables (active and snapshots), L2 tables, data
and compressed clusters, the snapshot table, the encryption header and the persistent
bitmaps. Opening a dirty lazy-refcounts image rebuilds the refcount structure from it;
check and repair use the same walk.

Snapshots often share L1 tables and L2 tables (thousands of snapshots of one disk share
almost everything). The walk therefore counts first how many paths reach each L1 table
and each L2 table, then reads each table once and counts what it points at that many
times: time and memory follow the distinct tables, not the number of snapshots.
"""

from __future__ import annotations

import struct
from array import array
from collections import Counter
from collections.abc import Iterator
from itertools import compress

from . import structs as S
from .bitmaps import bitmaps_extension, read_directory
from .cache import decode_be64, encode_be64
from .errors import CorruptImageError, InvalidArgumentError, Qcow2IOError
from .refcount import RefcountBlock
from .runs import RunFinder, host_runs
from .snapshot_table import l2_table_offset, read_snapshot_table


_CHUNK_BITS = 12
_CHUNK_SIZE = 1 << _CHUNK_BITS
_CHUNK_MASK = _CHUNK_SIZE - 1
_UNSIGNED_MAX = (1 << 32) - 1
_RUN_FINDER = RunFinder()  # (keeps the integers it compares with, made once per table size)


class ReferencePastEnd(CorruptImageError):
    """Metadata references host bytes past the end of the image file."""

    def __init__(self, offset: int, length: int):
        super().__init__(
            f"Metadata references offset 0x{offset:x} (length {length}) "
            f"past the end of the image file"
        )
        self.offset = offset


class ClusterCounts:
    """References per host cluster (or, signed, a change of them).

    Counts live in chunks of 4096 clusters allocated on first use: a damaged or repaired
    image may be a sparse file terabytes long, and only what is referenced costs memory.
    Unsigned counts are 32-bit; more references than that to one cluster are refused."""

    def __init__(self, cluster_bits: int, file_clusters: int, signed: bool = False):
        self.cluster_bits = cluster_bits
        self.file_clusters = file_clusters  # references at or past this are corruption
        self._typecode = "q" if signed else "I"
        self.chunks: dict[int, array] = {}

    def _past_end(self, offset: int, length: int) -> CorruptImageError:
        return ReferencePastEnd(offset, length)

    def _chunk(self, index: int) -> array:
        chunk = self.chunks.get(index)
        if chunk is None:
            chunk = self.chunks[index] = array(
                self._typecode, bytes(array(self._typecode).itemsize << _CHUNK_BITS)
            )
        return chunk

    def add(self, cluster: int, times: int = 1) -> None:
        """`times` more references to one cluster (no bounds check: new clusters)."""
        chunk = self._chunk(cluster >> _CHUNK_BITS)
        try:
            chunk[cluster & _CHUNK_MASK] += times
        except OverflowError:
            raise CorruptImageError(
                f"Cluster {cluster} (offset 0x{cluster << self.cluster_bits:x}) is referenced "
                f"more than {_UNSIGNED_MAX} times"
            ) from None

    def add_range(self, offset: int, length: int, times: int = 1) -> None:
        """`times` references to every cluster that bytes [offset, offset + length) touch."""
        if length <= 0 or not times:
            return
        bits = self.cluster_bits
        cluster, last = offset >> bits, (offset + length - 1) >> bits
        if last >= self.file_clusters:
            raise self._past_end(offset, length)
        while cluster <= last:
            self.add(cluster, times)
            cluster += 1

    def add_clusters(self, cluster: int, count: int, times: int) -> None:
        """`times` more references to each of clusters [cluster, cluster + count), a chunk
        at a time (add_range's checks are the caller's)."""
        end = cluster + count
        while cluster < end:
            chunk = self._chunk(cluster >> _CHUNK_BITS)
            low = cluster & _CHUNK_MASK
            high = min(_CHUNK_SIZE, low + end - cluster)
            try:
                chunk[low:high] = array(
                    self._typecode, [value + times for value in chunk[low:high]]
                )
            except OverflowError:  # (add names the first cluster that cannot count more)
                for one in range(cluster, cluster + high - low):
                    self.add(one, times)
            cluster += high - low

    def get(self, cluster: int) -> int:
        chunk = self.chunks.get(cluster >> _CHUNK_BITS)
        return chunk[cluster & _CHUNK_MASK] if chunk is not None else 0

    def get_many(self, clusters: list[int]) -> list[int]:
        """get() of many clusters at once."""
        chunks = self.chunks
        counts = [0] * len(clusters)
        for position, cluster in enumerate(clusters):
            chunk = chunks.get(cluster >> _CHUNK_BITS)
            if chunk is not None:
                counts[position] = chunk[cluster & _CHUNK_MASK]
        return counts

    chunk_size = _CHUNK_SIZE

    def items(self, skip: set[int] | frozenset[int] = frozenset()):
        """(cluster, count) for every cluster with a non-zero count, in order (the chunks
        of clusters [index * chunk_size, ...) with their index in `skip` left out)."""
        for index in sorted(self.chunks.keys() - skip):
            base = index << _CHUNK_BITS
            chunk = self.chunks[index]
            for offset in compress(range(_CHUNK_SIZE), chunk):
                yield base + offset, chunk[offset]

    def block_counts(self, first: int, length: int):
        """(cluster, count) for the clusters with a non-zero count in [first, first + length)."""
        for start, counts in self.chunk_slices(first, length):
            for offset in compress(range(len(counts)), counts):
                yield start + offset, counts[offset]

    def chunk_slices(self, first: int, length: int) -> Iterator[tuple[int, array]]:
        """(first cluster, counts) of the stored stretches of [first, first + length), in
        order; clusters in no stretch have a count of 0."""
        end = first + length
        for index in range(first >> _CHUNK_BITS, ((end - 1) >> _CHUNK_BITS) + 1):
            chunk = self.chunks.get(index)
            if chunk is None:
                continue
            base = index << _CHUNK_BITS
            start, stop = max(first - base, 0), min(end - base, _CHUNK_SIZE)
            yield base + start, chunk[start:stop]

    def nonzero_blocks(self, block_entries: int) -> set[int]:
        """Indices of the refcount blocks (of `block_entries` clusters each) whose range
        holds a non-zero count."""
        size = block_entries
        groups: set[int] = set()
        for index, chunk in self.chunks.items():
            base = index << _CHUNK_BITS
            if size >= _CHUNK_SIZE and size % _CHUNK_SIZE == 0:
                if any(chunk):
                    groups.add(base // size)
                continue
            for offset in compress(range(_CHUNK_SIZE), chunk):
                groups.add((base + offset) // size)
        return groups

    def end(self) -> int:
        """One past the last referenced cluster."""
        for index in sorted(self.chunks, reverse=True):
            chunk = self.chunks[index]
            for offset in range(len(chunk) - 1, -1, -1):
                if chunk[offset]:
                    return (index << _CHUNK_BITS) + offset + 1
        return 0


def current_refcounts(image) -> ClusterCounts:
    """The refcounts as they stand, less the refcount structure's own clusters: what
    QEMU carries over to a structure of another width (it copies, it does not recount,
    so a wrong count stays wrong for check to find)."""
    refs = image.refcounts
    cs = image.cluster_size
    counts = ClusterCounts(image.cluster_bits, -(-image.file.size() // cs))
    structure = set(range(refs.table_offset // cs, refs.table_offset // cs + refs.table_clusters))
    structure.update((e & S.REFT_OFFSET_MASK) // cs for e in refs.table if e & S.REFT_OFFSET_MASK)
    entries = refs.block_entries
    for block_index, block in refs.allocated_blocks():
        values = block.values if block.order >= 3 else [block.get(i) for i in range(entries)]
        base = block_index * entries
        for index in compress(range(entries), values):
            if base + index not in structure:
                counts.add(base + index, values[index])
    return counts


def count_references(image, refcount_structure: bool = True) -> ClusterCounts:
    """References from all metadata; `refcount_structure` adds the refcount table and blocks."""
    hdr = image.header
    cs = image.cluster_size
    bits = image.cluster_bits
    file_size = image.file.size()
    file_clusters = -(-file_size // cs)
    refs = ClusterCounts(bits, file_clusters)
    refs.add_range(0, cs)
    if refcount_structure:
        refs.add_range(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        for entry in image.refcounts.table:
            if entry & S.REFT_OFFSET_MASK:
                refs.add_range(entry & S.REFT_OFFSET_MASK, cs)
    l2_paths = ClusterCounts(bits, file_clusters)
    refs.add_range(hdr.l1_table_offset, len(image.map.l1) * 8)
    count_l1_entries(l2_paths, image.map.l1, cs)
    if hdr.nb_snapshots:
        snapshots, table_bytes = read_snapshot_table(
            image.file, hdr.snapshots_offset, hdr.nb_snapshots, file_size
        )
        refs.add_range(hdr.snapshots_offset, table_bytes)
        # Snapshots sharing one L1 table: read it once, count it as often as it is used.
        l1_uses = Counter((snap.l1_table_offset, snap.l1_size) for snap in snapshots)
        del snapshots
        for (l1_offset, l1_size), uses in l1_uses.items():
            if l1_size:
                refs.add_range(l1_offset, l1_size * 8, uses)
                count_l1_entries(
                    l2_paths, decode_be64(image.file.pread(l1_size * 8, l1_offset)), cs, uses
                )
    count_l2_tables(image, refs, l2_paths)
    if hdr.crypto_offset:
        refs.add_range(hdr.crypto_offset, hdr.crypto_length)
    _count_bitmaps(image, refs)
    return refs


def count_l1_entries(l2_paths: ClusterCounts, l1, cluster_size: int, times: int = 1) -> None:
    """Add `times` to the path count of the L2 table each entry of `l1` points at."""
    bits = l2_paths.cluster_bits
    for index in compress(range(len(l1)), l1):
        l2_offset = l2_table_offset(l1[index], index, cluster_size)
        if l2_offset:
            l2_paths.add(l2_offset >> bits, times)


def count_l2_tables(image, refs: ClusterCounts, l2_paths: ClusterCounts) -> None:
    """Every L1 -> L2 and L1 -> L2 -> cluster path holds one reference (as qemu-img check
    counts): each L2 table reached n times is read once and counted n times."""
    bits = image.cluster_bits
    for cluster, times in l2_paths.items():
        refs.add_range(cluster << bits, image.cluster_size, times)
        _count_l2(image, refs, image.map.l2_cache.get(cluster << bits), times)


def _count_l2(image, refs: ClusterCounts, table, times: int = 1) -> None:
    step = image.map.entry_words
    has_data_file = image.has_data_file
    cluster_size = image.cluster_size
    if not has_data_file:
        runs = host_runs(table[::step], image.cluster_bits, _RUN_FINDER)
        if runs is not None and all(
            first + count <= refs.file_clusters for first, count in runs
        ):  # (else add_range reports the first cluster past the end)
            for first, count in runs:
                refs.add_clusters(first, count, times)
            return
    for i in compress(range(0, len(table), step), table[::step]):
        entry = table[i]
        if entry & S.OFLAG_COMPRESSED:
            host = entry & image.map.compressed_offset_mask
            sectors = ((entry >> image.map.csize_shift) & image.map.csize_mask) + 1
            refs.add_range(host & ~511, sectors * 512, times)
            continue
        host = entry & S.L2E_OFFSET_MASK
        if host and not has_data_file:
            refs.add_range(host, cluster_size, times)


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


def rebuild_refcounts(
    image, refs: ClusterCounts | None = None, steps: dict[str, str] | None = None
) -> None:
    """Write a new refcount structure holding `refs` (by default the references the
    metadata makes), then point the header at it.

    The new table and blocks go past everything in use, so the old structure stays valid
    until the header switches over; the old clusters are then simply unreferenced.
    `steps`: how a failed write is worded at each step ("refblock", "reftable", "flush",
    "header": the text put before the errno's), as the caller's QEMU counterpart words it.
    """
    if refs is None:
        refs = count_references(image, refcount_structure=False)
    table_offset, table_clusters, end = write_refcount_structure(image, refs, steps)
    step = "flush"
    try:
        image.file.flush()
        image.header.refcount_table_offset = table_offset
        image.header.refcount_table_clusters = table_clusters
        step = "header"
        image._write_header_fields()
        step = "flush"
        image.file.flush()
    except Qcow2IOError as exc:
        raise _worded(exc, steps, step) from None
    image._host_size = max(image._host_size, end)
    image.use_refcount_table(table_offset, table_clusters, end)


def write_refcount_structure(
    image, refs: ClusterCounts, steps: dict[str, str] | None = None
) -> tuple[int, int, int]:
    """Write a refcount table and blocks holding `refs` (plus their own clusters) past the
    end of the file, unreferenced until a header points at them (`steps`: as for
    rebuild_refcounts).

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
                f"refcount_bits {1 << order} can count"
            )
        used_blocks.add(cluster // block_entries)
    # The new table and blocks go at `start`; blocks exist only where refcounts are not
    # all zero (a sparse file may reach far beyond what it uses).
    start = max(refs.end(), -(-image.file.size() // cs))
    table_clusters = blocks = 1
    while True:
        total = start + table_clusters + blocks
        block_indices = used_blocks.union(
            range(start // block_entries, (total - 1) // block_entries + 1)
        )
        need_table = -(-(max(block_indices) + 1) * 8 // cs)
        if need_table * cs > S.MAX_REFTABLE_BYTES:
            raise InvalidArgumentError(
                f"Refcount table would need {max(block_indices) + 1} entries, more than the "
                f"format's limit of {S.MAX_REFTABLE_BYTES // 8} (image file of "
                f"{image.file.size()} bytes too large for its cluster size {cs})"
            )
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
        try:
            image.file.pwrite(block.to_bytes(), host_cluster * cs)
        except Qcow2IOError as exc:
            raise _worded(exc, steps, "refblock") from None
    step = "reftable"
    try:
        image.file.pwrite(encode_be64(table), start * cs)
    except Qcow2IOError as exc:
        raise _worded(exc, steps, step) from None
    return start * cs, table_clusters, total * cs


def _worded(exc: Qcow2IOError, steps: dict[str, str] | None, step: str) -> Qcow2IOError:
    """A failed write of the new refcount structure, worded for `step` (rebuild_refcounts)."""
    return exc if steps is None else exc.in_context(steps[step])
