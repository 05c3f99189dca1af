"""Refcount table and blocks of every width (1 to 64 bits), and the cluster allocator.

Increments take effect in the cache at once and reach the disk in the image's first
flush phase, before any pointer to the cluster. Decrements are queued (`free`) and
applied only after the tables that dropped the pointer are on disk, so a crash can leak
a cluster but never leave one referenced with a refcount of zero. A freed cluster is not
reused before its decrement is applied.
"""

from __future__ import annotations

import sys
from array import array

from .cache import TableCache, decode_be64, encode_be64
from .errors import CorruptImageError, InvalidArgumentError, Qcow2IOError
from .overlap import REFCOUNT_BLOCK, REFCOUNT_TABLE, OverlapMap
from .runs import nonzero_positions
from .structs import MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, REFT_RESERVED_MASK

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator

_NATIVE_LITTLE = sys.byteorder == "little"
_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
_NONZERO_FIELDS: dict[int, bytes] = {}  # refcount order -> _nonzero_fields(order)


def _nonzero_fields(order: int) -> bytes:
    """For refcounts narrower than a byte (order 0-2): byte value -> how many of its fields
    are not zero. Built on first use, not at import (qimg's every start would pay)."""
    table = _NONZERO_FIELDS.get(order)
    if table is None:
        width_mask = (1 << (1 << order)) - 1
        table = _NONZERO_FIELDS[order] = bytes(
            sum(1 for shift in range(0, 8, 1 << order) if value >> shift & width_mask)
            for value in range(256)
        )
    return table


class RefcountBlock:
    """One refcount block, decoded. Sub-byte widths keep the packed bytes (LSB first)."""

    __slots__ = ("order", "values")

    def __init__(self, order: int, data: bytes):
        self.order = order
        self.values: array | bytearray
        if order >= 3:
            self.values = array(_TYPECODES[order])
            self.values.frombytes(data)
            if _NATIVE_LITTLE and order > 3:
                self.values.byteswap()
        else:
            self.values = bytearray(data)

    def get(self, index: int) -> int:
        if self.order >= 3:
            return self.values[index]
        bits = 1 << self.order
        per_byte = 8 >> self.order
        return (self.values[index // per_byte] >> ((index % per_byte) * bits)) & ((1 << bits) - 1)

    def set(self, index: int, value: int) -> None:
        if self.order >= 3:
            self.values[index] = value
            return
        bits = 1 << self.order
        per_byte = 8 >> self.order
        shift = (index % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        byte = index // per_byte
        self.values[byte] = (self.values[byte] & ~mask) | (value << shift)

    def add_to_slice(self, first: int, stop: int, delta: int, max_refcount: int) -> array | None:
        """Add delta to the counts [first, stop) at once and return the new counts; None
        (nothing done) for sub-byte counts, or where a count would leave 0..max_refcount
        (the caller then goes one by one, and names the first such cluster)."""
        values = self.values
        if not isinstance(values, array):
            return None
        before = values[first:stop]
        low, high = min(before), max(before)
        if low + delta < 0 or high + delta > max_refcount:
            return None
        if low == high:  # (one count for all: the new one made once)
            after = array(values.typecode, [low + delta]) * (stop - first)
        else:
            after = array(values.typecode, map(delta.__add__, before))
        values[first:stop] = after
        return after

    def zero_run(self, start: int, limit: int, want: int) -> tuple[int, int]:
        """(first index >= start with refcount 0, length of the zero run there, at most want)."""
        values = self.values
        if isinstance(values, array):  # (order >= 3)
            try:
                first = values.index(0, start, limit)
            except ValueError:
                return limit, 0
            width = 1 << (self.order - 3)
            raw = values[first : min(limit, first + want)].tobytes()
            zeros = len(raw) - len(raw.lstrip(b"\0"))
            return first, zeros // width
        index = start
        while index < limit and self.get(index):
            index += 1
        first = index
        stop = min(limit, first + want)
        while index < stop and not self.get(index):
            index += 1
        return first, index - first

    def count_nonzero(self, limit: int) -> int:
        """How many of the first `limit` refcounts are not zero (C-level counting)."""
        values = self.values
        if isinstance(values, array):  # (order >= 3)
            return limit - values[:limit].count(0) if limit else 0
        per_byte = 8 >> self.order
        whole, rest = divmod(limit, per_byte)
        count = sum(values[:whole].translate(_nonzero_fields(self.order)))
        for index in range(whole * per_byte, whole * per_byte + rest):
            count += self.get(index) != 0
        return count

    def to_bytes(self) -> bytes:
        values = self.values
        if isinstance(values, bytearray):  # (order < 3)
            return bytes(values)
        if self.order > 3 and _NATIVE_LITTLE:
            swapped = array(values.typecode, values)
            swapped.byteswap()
            return swapped.tobytes()
        return values.tobytes()


class Refcounts:
    """The refcount structure of one image file and the allocator built on it."""

    def __init__(
        self,
        file,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        file_size: int,
        cache_entries: int = 256,
    ):
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        self.block_entries = (self.cluster_size * 8) >> refcount_order
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        blkdebug = getattr(file, "blkdebug", None)
        try:
            if blkdebug is not None:  # (a blkdebug node beneath: its rules may fail the read)
                blkdebug.event("reftable_load")
            raw = file.pread(table_clusters * self.cluster_size, table_offset)
        except Qcow2IOError as exc:
            raise Qcow2IOError(
                exc.errno, f"Could not initialize refcount handling: {exc.strerror}"
            ) from None
        self.table: array = decode_be64(raw)
        # Only the nonzero entries (found without a Python step per entry): the table is
        # mostly empty, and walking all of it cost a good part of every open.
        for index in nonzero_positions(self.table):
            entry = self.table[index]
            if entry & REFT_RESERVED_MASK:
                raise CorruptImageError(
                    f"Refcount table entry {index} has reserved bits set (0x{entry:016x})"
                )
        self.blocks = TableCache(self._load_block, cache_entries)
        self.table_dirty = False
        self.table_moved = False
        self.old_tables: list[tuple[int, int]] = []
        self.pending_frees: list[tuple[int, int]] = []
        # Where the allocator's search starts: past the last allocation (gaps before it are
        # skipped), lowered by frees, as QEMU's free_cluster_index
        self.free_hint = 0
        self.end_cluster = (file_size + self.cluster_size - 1) >> cluster_bits
        self.file_size_hint = file_size
        self.check_no_overlap = lambda offset, length, what: None  # set by the image
        # Set by the image: refuses clusters that hold metadata whatever their refcount,
        # and the map of that metadata, which learns of new blocks and table moves.
        self.check_allocation = lambda first_cluster, count: None
        self.overlaps: OverlapMap | None = None

    # --- reading ------------------------------------------------------------------------

    def _block_offset(self, block_index: int) -> int:
        if block_index >= len(self.table):
            return 0
        offset = self.table[block_index] & REFT_OFFSET_MASK
        if offset and offset % self.cluster_size:
            raise CorruptImageError(
                f"Refcount block offset 0x{offset:x} (refcount table entry {block_index}) is not "
                f"aligned to the cluster size"
            )
        return offset

    def _load_block(self, offset: int) -> RefcountBlock:
        if offset + self.cluster_size > max(self.file.size(), self.file_size_hint):
            raise CorruptImageError(
                f"Refcount block offset 0x{offset:x} lies past the end of the image file"
            )
        self.check_no_overlap(offset, self.cluster_size, "Refcount block")
        return RefcountBlock(self.order, self.file.pread(self.cluster_size, offset))

    def block(self, block_index: int) -> RefcountBlock | None:
        offset = self._block_offset(block_index)
        return self.blocks.get(offset) if offset else None

    def allocated_blocks(self) -> Iterator[tuple[int, RefcountBlock]]:
        """(index, block) of every refcount block the table points at, in order."""
        for block_index in nonzero_positions(self.table):
            if self.table[block_index] & REFT_OFFSET_MASK:
                block = self.block(block_index)
                if block is not None:
                    yield block_index, block

    def get(self, cluster: int) -> int:
        block = self.block(cluster // self.block_entries)
        return block.get(cluster % self.block_entries) if block else 0

    def counts_of(self, clusters: list[int]) -> list[int]:
        """The refcounts of `clusters`, each block looked up once per run of clusters in it
        (an L2 table's clusters mostly lie in one or two)."""
        mask = self.block_entries - 1
        shift = mask.bit_length()
        counts = []
        current, lookup = -1, None
        for cluster in clusters:
            if cluster >> shift != current:
                current = cluster >> shift
                block = self.block(current)
                if block is None:
                    lookup = None
                else:
                    lookup = block.values.__getitem__ if block.order >= 3 else block.get
            counts.append(lookup(cluster & mask) if lookup is not None else 0)
        return counts

    def count_in_use(self, end_cluster: int, enough: int) -> int:
        """Clusters below `end_cluster` with a non-zero refcount, counted block by block
        (ranges without a block cost nothing, so a sparse file's size does not matter);
        stops once `enough` are found."""
        count = 0
        last_block = min(len(self.table), -(-end_cluster // self.block_entries))
        for block_index in range(last_block):
            if not self.table[block_index] & REFT_OFFSET_MASK:
                continue
            block = self.block(block_index)
            if block is None:
                continue
            first = block_index * self.block_entries
            count += block.count_nonzero(min(self.block_entries, end_cluster - first))
            if count >= enough:
                break
        return count

    # --- changing -----------------------------------------------------------------------

    def update(self, cluster: int, count: int, delta: int) -> None:
        """Add delta to the refcount of `count` clusters from `cluster`, at once (in cache)."""
        end = cluster + count
        while cluster < end:
            block_index = cluster // self.block_entries
            if delta < 0 and self._block_offset(block_index) == 0:
                raise CorruptImageError(
                    f"Refcount of cluster {cluster} (offset 0x{cluster << self.cluster_bits:x}) "
                    f"would drop below zero (no refcount block describes it)"
                )
            block = self._writable_block(block_index)
            offset = self._block_offset(block_index)
            stop = min(end, (block_index + 1) * self.block_entries)
            base = block_index * self.block_entries
            if block.add_to_slice(cluster - base, stop - base, delta, self.max_refcount) is None:
                self._add_one_by_one(block, base, cluster, stop, delta)
            self.blocks.mark_dirty(offset)
            cluster = stop
        if delta > 0:
            self.end_cluster = max(self.end_cluster, end)
        else:
            self.free_hint = min(self.free_hint, end - count)

    def _add_one_by_one(
        self, block: RefcountBlock, base: int, cluster: int, stop: int, delta: int
    ) -> None:
        for c in range(cluster, stop):
            value = block.get(c - base) + delta
            if value < 0:
                raise CorruptImageError(
                    f"Refcount of cluster {c} (offset 0x{c << self.cluster_bits:x}) would "
                    f"drop below zero"
                )
            if value > self.max_refcount:
                raise InvalidArgumentError(
                    f"Refcount of cluster {c} would overflow {1 << self.order}-bit refcounts "
                    f"(max {self.max_refcount})"
                )
            block.set(c - base, value)

    def free(self, cluster: int, count: int = 1) -> None:
        """Queue a decrement; applied by `apply_frees` once no pointer on disk needs it."""
        self.pending_frees.append((cluster, count))

    def apply_frees(self) -> list[tuple[int, int]]:
        """Apply queued decrements; returns the runs whose refcount reached zero."""
        released: list[tuple[int, int]] = []
        frees, self.pending_frees = self.pending_frees, []
        for cluster, count in frees:
            self.update(cluster, count, -1)
            for c in range(cluster, cluster + count):
                if self.get(c) == 0:
                    if released and released[-1][0] + released[-1][1] == c:
                        released[-1] = (released[-1][0], released[-1][1] + 1)
                    else:
                        released.append((c, 1))
        return released

    def _writable_block(self, block_index: int) -> RefcountBlock:
        offset = self._block_offset(block_index)
        if offset:
            return self.blocks.get(offset)
        if block_index >= len(self.table):
            self._grow_table(block_index + 1)
            offset = self._block_offset(block_index)
            if offset:
                return self.blocks.get(offset)
        # A range without a block has every refcount at zero, so the block may describe
        # itself from the range's first cluster.
        first = block_index * self.block_entries
        offset = first << self.cluster_bits
        self.check_allocation(first, 1)
        block = RefcountBlock(self.order, bytes(self.cluster_size))
        block.set(0, 1)
        self.blocks.put(offset, block)
        self._set_table_entry(block_index, offset)
        self.table_dirty = True
        self.end_cluster = max(self.end_cluster, first + 1)
        return block

    def _set_table_entry(self, block_index: int, offset: int) -> None:
        """Point the table at a new refcount block (the table had none for its range)."""
        self.table[block_index] = offset
        if self.overlaps is not None:
            self.overlaps.add(REFCOUNT_BLOCK, offset, self.cluster_size)

    def _grow_table(self, min_entries: int) -> None:
        """Move the table to the end of the image, larger, with the blocks that count it."""
        if min_entries * 8 > MAX_REFTABLE_BYTES:
            raise InvalidArgumentError(
                f"Refcount table would need {min_entries} entries, more than the format's "
                f"limit of {MAX_REFTABLE_BYTES // 8} (image too large for its cluster size)"
            )
        per_cluster = self.cluster_size // 8
        start = self.end_cluster
        entries = max(min_entries, len(self.table) * 2)
        new_blocks = 0
        while True:
            table_clusters = (entries + per_cluster - 1) // per_cluster
            while True:
                last = start + table_clusters + new_blocks - 1
                missing = [
                    r
                    for r in range(start // self.block_entries, last // self.block_entries + 1)
                    if self._block_offset(r) == 0
                ]
                if len(missing) == new_blocks:
                    break
                new_blocks = len(missing)
            if last // self.block_entries < entries:
                break
            entries = last // self.block_entries + 1
        self.check_allocation(start, table_clusters + new_blocks)
        new_table = array("Q", self.table)
        new_table.extend([0] * (table_clusters * per_cluster - len(new_table)))
        old = (self.table_offset >> self.cluster_bits, self.table_clusters)
        self.table = new_table
        for i, block_index in enumerate(missing):
            cluster = start + table_clusters + i
            self.blocks.put(
                cluster << self.cluster_bits, RefcountBlock(self.order, bytes(self.cluster_size))
            )
            self._set_table_entry(block_index, cluster << self.cluster_bits)
        if self.overlaps is not None:
            self.overlaps.move(
                REFCOUNT_TABLE,
                self.table_offset,
                self.table_clusters * self.cluster_size,
                start << self.cluster_bits,
                table_clusters * self.cluster_size,
            )
        self.table_offset = start << self.cluster_bits
        self.table_clusters = table_clusters
        self.table_dirty = self.table_moved = True
        self.end_cluster = start + table_clusters + new_blocks
        self.update(start, table_clusters + new_blocks, +1)
        self.free(*old)

    def allocate(self, count: int, at_end: bool = False) -> int:
        """Allocate `count` contiguous free clusters (refcount 1); returns the first index.

        Ranges the run reaches that have no refcount block yet get one, placed just
        after the run (where QEMU's allocator puts it), so a large run stays contiguous
        however small the blocks' ranges.
        at_end takes clusters past everything in use (they read zeros without a write).
        """
        if count <= 0:
            raise InvalidArgumentError(f"cannot allocate {count} clusters")
        if not at_end:
            start = self._allocate_at_cursor(count)
            if start >= 0:
                return start
        n = self.block_entries
        if not at_end:  # move the cursor past the clusters in use since it was last set
            self.free_hint = self._next_free_run(self.free_hint, 1)
        candidate, need = (self.end_cluster if at_end else self.free_hint), count
        while True:
            start = self._next_free_run(candidate, need)
            missing: list[int] = []
            while True:
                last_range = (start + len(missing) + count - 1) // n
                if last_range >= len(self.table):
                    break
                now_missing = [
                    r for r in range(start // n, last_range + 1) if self._block_offset(r) == 0
                ]
                if len(now_missing) == len(missing):
                    break
                missing = now_missing
            if last_range >= len(self.table):
                self._grow_table(last_range + 1)
                candidate, need = start, count
                continue
            if not self._is_free(start, len(missing) + count):
                candidate, need = start, len(missing) + count
                continue
            break
        # Refcounts claim these are free; refuse them if metadata lies there all the same.
        self.check_allocation(start, len(missing) + count)
        for i, block_index in enumerate(missing):
            offset = (start + count + i) << self.cluster_bits
            self.blocks.put(offset, RefcountBlock(self.order, bytes(self.cluster_size)))
            self._set_table_entry(block_index, offset)
            self.table_dirty = True
        self.update(start, len(missing) + count, +1)
        if not at_end:  # QEMU's free_cluster_index: past the run, gaps before it skipped
            self.free_hint = start + count + len(missing)
        return start

    def _allocate_at_cursor(self, count: int) -> int:
        """The allocator's common case, one block lookup instead of a search: the `count`
        clusters from the cursor are free and their refcount block exists (a run of new
        clusters at the end of a growing image). Returns the first cluster, -1 when that
        is not so (the caller searches)."""
        start = self.free_hint
        n = self.block_entries
        block_index, index = divmod(start, n)
        if index + count > n:
            return -1
        offset = self._block_offset(block_index)
        if not offset:
            return -1
        block = self.blocks.get(offset)
        first, length = block.zero_run(index, index + count, count)
        if first != index or length != count:
            return -1
        self.check_allocation(start, count)
        if block.order >= 3:
            block.values[index : index + count] = array(block.values.typecode, [1]) * count
        else:
            for i in range(index, index + count):
                block.set(i, 1)
        self.blocks.mark_dirty(offset)
        self.free_hint = start + count
        self.end_cluster = max(self.end_cluster, start + count)
        return start

    def allocate_at(self, cluster: int, count: int) -> bool:
        """Allocate exactly [cluster, cluster+count) if all of it is free; False otherwise."""
        if not self._is_free(cluster, count):
            return False
        self.check_allocation(cluster, count)
        for block_index in range(
            cluster // self.block_entries, (cluster + count - 1) // self.block_entries + 1
        ):
            self._writable_block(block_index)
        if not self._is_free(cluster, count):
            return False
        self.update(cluster, count, +1)
        return True

    def _is_free(self, cluster: int, count: int) -> bool:
        return self._next_free_run(cluster, count) == cluster

    def _next_free_run(self, cluster: int, count: int) -> int:
        """First cluster >= `cluster` that starts a run of `count` free clusters."""
        run_start, run_length = cluster, 0
        while run_length < count:
            block_index = cluster // self.block_entries
            base = block_index * self.block_entries
            limit = base + self.block_entries
            block = self.block(block_index)
            if block is None:  # a range without a block is all free
                run_length += limit - cluster
                cluster = limit
                continue
            first, length = block.zero_run(cluster - base, self.block_entries, count - run_length)
            first += base
            if first != cluster:  # `cluster` is in use: the run starts again at `first`
                run_start, run_length = first, 0
            run_length += length
            cluster = first + length
        return run_start

    # --- writing back -------------------------------------------------------------------

    def write_blocks(self) -> bool:
        """Write dirty blocks; returns whether anything was written."""
        return self.blocks.write_back(
            lambda offset, block: self.file.pwrite(block.to_bytes(), offset)
        )

    def write_table(self) -> None:
        data = encode_be64(self.table)
        self.file.pwrite(
            data.ljust(self.table_clusters * self.cluster_size, b"\0"), self.table_offset
        )
        self.table_dirty = False
