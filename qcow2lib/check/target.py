"""The image as the check sees it: its file, header values, the refcount table and QEMU's
refcount block cache (_Target), the in-memory refcount table (_RefcountArray), and the
pre-write overlap check."""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right

from .. import structs as S
from ..cache import decode_be64
from ..errors import Qcow2Error
from ..header import Header
from ..records import record
from ..refcount import RefcountBlock
from ..sizes import c_hex
from .report import _Result

# Cluster types (qcow2_get_cluster_type).
_UNALLOCATED, _ZERO_PLAIN, _ZERO_ALLOC, _NORMAL, _COMPRESSED = range(5)

# Metadata kinds of the pre-write overlap check (QCOW2_OL_*), with QEMU's names.
(
    _OL_MAIN_HEADER,
    _OL_ACTIVE_L1,
    _OL_ACTIVE_L2,
    _OL_REFCOUNT_TABLE,
    _OL_REFCOUNT_BLOCK,
    _OL_SNAPSHOT_TABLE,
    _OL_INACTIVE_L1,
    _OL_INACTIVE_L2,
    _OL_BITMAP_DIRECTORY,
) = (1 << i for i in range(9))
_OL_NAMES = {
    _OL_MAIN_HEADER: "qcow2_header",
    _OL_ACTIVE_L1: "active L1 table",
    _OL_ACTIVE_L2: "active L2 table",
    _OL_REFCOUNT_TABLE: "refcount table",
    _OL_REFCOUNT_BLOCK: "refcount block",
    _OL_SNAPSHOT_TABLE: "snapshot table",
    _OL_INACTIVE_L1: "inactive L1 table",
    _OL_INACTIVE_L2: "inactive L2 table",
    _OL_BITMAP_DIRECTORY: "bitmap directory",
}

_MAX_SNAPSHOTS_SIZE = 1024 * S.MAX_SNAPSHOTS
_SNAPSHOT_EXTRA_SIZE = 24  # vm_state_size_large, disk_size, icount
_INT_MAX = 0x7FFFFFFF
_INT64_MAX = (1 << 63) - 1


@record
class _Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: bytes
    name: bytes
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    extra_data_size: int
    disk_size: int
    icount: int
    unknown_extra: bytes = b""


class _RefcountReadError(Exception):
    pass


_REFCOUNT_CACHE_ENTRIES = 4  # QEMU's default refcount cache: MIN_REFCOUNT_CACHE_SIZE clusters


class _CacheSlot:
    __slots__ = ("offset", "block", "dirty", "lru")

    def __init__(self):
        self.offset = 0
        self.block = None
        self.dirty = False
        self.lru = 0


_CHUNK_BITS = 10  # clusters per chunk of the in-memory refcount table: 1024
_CHUNK_MASK = (1 << _CHUNK_BITS) - 1


class _RefcountArray:
    """QEMU's in-memory refcount table (IMRT): a reference count per host cluster.

    QEMU grows one array up to the highest cluster counted. A repair that meets a
    refcount block terabytes past the end of the file grows the file (and the array) to
    reach it; bit-packed, QEMU's array stays a few MB, one Python integer per cluster
    would not. So the counts live in chunks of 1024 clusters, allocated on first use and
    as narrow as the image's refcount width: memory follows the clusters really counted
    and scans skip the ranges never touched. Absent clusters count 0.
    """

    def __init__(self, refcount_order: int):
        self.typecode = "BBBBHIQ"[refcount_order]
        self._zeros = bytes(array(self.typecode).itemsize << _CHUNK_BITS)
        self.chunks: dict[int, array] = {}

    def chunk(self, index: int) -> array:
        """The chunk holding clusters [index << _CHUNK_BITS, ...), created zeroed if new."""
        chunk = self.chunks.get(index)
        if chunk is None:
            chunk = self.chunks[index] = array(self.typecode, self._zeros)
        return chunk

    def get(self, cluster: int) -> int:
        chunk = self.chunks.get(cluster >> _CHUNK_BITS)
        return chunk[cluster & _CHUNK_MASK] if chunk is not None else 0

    def set(self, cluster: int, value: int) -> None:
        self.chunk(cluster >> _CHUNK_BITS)[cluster & _CHUNK_MASK] = value

    def add(self, cluster: int, count: int) -> None:
        self.chunk(cluster >> _CHUNK_BITS)[cluster & _CHUNK_MASK] += count

    def values(self, start: int, end: int) -> list[int]:
        """The counts of clusters [start, end)."""
        out: list[int] = []
        while start < end:
            stop = min(end, (start | _CHUNK_MASK) + 1)
            chunk = self.chunks.get(start >> _CHUNK_BITS)
            if chunk is None:
                out += [0] * (stop - start)
            else:
                out += chunk[start & _CHUNK_MASK : ((stop - 1) & _CHUNK_MASK) + 1].tolist()
            start = stop
        return out

    def next_used(self, cluster: int, end: int) -> int:
        """The first cluster in [cluster, end) with a non-zero count, or end."""
        chunks = self.chunks
        while cluster < end:
            index = cluster >> _CHUNK_BITS
            stop = min(end, (index + 1) << _CHUNK_BITS)
            chunk = chunks.get(index)
            if chunk is not None:
                first, last = cluster & _CHUNK_MASK, ((stop - 1) & _CHUNK_MASK) + 1
                if any(chunk[first:last]):
                    for position in range(first, last):
                        if chunk[position]:
                            return (index << _CHUNK_BITS) + position
            cluster = stop
        return end

    def max_value(self) -> int:
        return max((max(chunk) for chunk in self.chunks.values()), default=0)

    def clear(self) -> None:
        self.chunks.clear()


class _Target:
    """The image being checked: its file, header values and QEMU's in-memory state."""

    def __init__(
        self, file, header: Header, filename: str, writable: bool, out: list[str], prog: str
    ):
        self.file = file
        self.hdr = header
        self.filename = filename
        self.writable = writable
        self.out = out
        self.prog = prog
        self.cluster_bits = header.cluster_bits
        self.cs = 1 << header.cluster_bits
        self.zero_cluster = bytes(self.cs)
        self.extended = header.extended_l2
        self.words = 2 if self.extended else 1
        self.l2_entries = header.l2_entries
        self.order = header.refcount_order
        self.refcount_max = (1 << (1 << self.order)) - 1
        self.rb_bits = self.cluster_bits + 3 - self.order
        self.rb_size = 1 << self.rb_bits
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.has_data_file = bool(header.incompatible_features & S.INCOMPAT_DATA_FILE)
        self.signaled_corruption = False
        self.marked_corrupt = False
        self.dead = False
        self.keep_dirty = False  # leave the dirty bit alone (the engine manages it)
        self._size: int | None = None
        # QEMU's in-memory tables, read when the image was opened.
        self.l1 = (
            decode_be64(self.pread(header.l1_size * 8, header.l1_table_offset))
            if header.l1_size
            else array("Q")
        )
        self.writes = 0  # bumped by every change to the file: what was read may be stale
        self._synced_writes = 0  # `writes` at the last flush
        self._l2_starts: list[int] | None = None
        self.load_reftable(header.refcount_table_offset, header.refcount_table_clusters)
        self.snapshots: list[_Snapshot] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.nb_snapshots = 0

    # file access ---------------------------------------------------------------------
    def file_size(self) -> int:
        if self._size is None:
            self._size = self.file.size()
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0:
            return b""
        if offset >= self.file_size():  # (tables past the end read as zeros)
            return bytes(length)
        return self.file.pread(length, offset)

    def pwrite(self, data, offset: int) -> None:
        self.file.pwrite(data, offset)
        self._size = None
        self.writes += 1

    def truncate(self, length: int) -> None:
        self.file.truncate(length)
        self._size = None
        self.writes += 1

    def flush(self) -> None:
        """fdatasync what the check wrote since its last flush; a check that wrote
        nothing (every read-only check) syncs nothing."""
        if self.writes == self._synced_writes:
            return
        self.file.flush()
        self._synced_writes = self.writes

    def discard(self, cluster: int) -> None:
        """A cluster whose refcount a repair dropped to 0 is discarded, as QEMU does."""
        try:
            self.file.punch_hole(cluster << self.cluster_bits, self.cs)
        except Qcow2Error:
            pass  # discarding is optional
        self.writes += 1

    # refcounts on disk ---------------------------------------------------------------
    def load_reftable(self, offset: int, clusters: int) -> None:
        """Read the refcount table; the refcount block cache starts empty."""
        self.set_reftable(
            offset, decode_be64(self.pread(clusters * self.cs, offset)) if clusters else array("Q")
        )
        self.cache = [_CacheSlot() for _ in range(_REFCOUNT_CACHE_ENTRIES)]
        self.lru_counter = 0

    def set_reftable(self, offset: int, table: array) -> None:
        self.reftable_offset = offset
        self.reftable = table
        self._refblock_starts: list[int] | None = None

    def _cache_get(self, offset: int) -> "_CacheSlot":
        """QEMU's refcount block cache: a few blocks, least recently used one replaced
        (and written back first if dirty)."""
        slots = self.cache
        n = len(slots)
        start = (offset // self.cs * 4) % n
        victim = None
        for k in range(n):
            slot = slots[(start + k) % n]
            if slot.offset == offset:
                return slot
            if victim is None or slot.lru < victim.lru:
                victim = slot
        assert victim is not None  # (the cache has slots)
        if not self._flush_slot(victim):
            raise _RefcountReadError()
        victim.offset = 0
        victim.block = RefcountBlock(self.order, self.pread(self.cs, offset))
        victim.offset = offset
        victim.dirty = False
        return victim

    def _put(self, slot: "_CacheSlot") -> None:
        self.lru_counter += 1
        slot.lru = self.lru_counter

    def _flush_slot(self, slot: "_CacheSlot") -> bool:
        if not slot.dirty or not slot.offset:
            return True
        if self.overlap_check(_OL_REFCOUNT_BLOCK, slot.offset, self.cs):
            return False
        self.pwrite(slot.block.to_bytes(), slot.offset)
        slot.dirty = False
        return True

    def cache_clean(self) -> bool:
        return not any(slot.dirty for slot in self.cache)

    def flush_if_alive(self) -> None:
        """bdrv_flush of the image: nothing once a fatal corruption dropped the driver."""
        if not self.dead:
            self.flush_cache()

    def flush_cache(self) -> bool:
        """Write every dirty cached refcount block back (qcow2_cache_flush)."""
        ok = True
        wrote = False
        for slot in self.cache:
            wrote = wrote or slot.dirty
            ok = self._flush_slot(slot) and ok
        if ok and wrote:
            self.flush()
        return ok

    def _slot_for(self, index: int) -> "_CacheSlot | None":
        """The cached refcount block for table index `index` (None: all refcounts 0)."""
        if index >= len(self.reftable):
            return None
        offset = self.reftable[index] & S.REFT_OFFSET_MASK
        if not offset:
            return None
        if offset & (self.cs - 1):
            self.signal_corruption(
                f"Refblock offset {c_hex(offset)} unaligned (reftable index: {c_hex(index)})"
            )
            raise _RefcountReadError()
        slot = self._cache_get(offset)
        self._put(slot)
        return slot

    def refblock(self, index: int) -> RefcountBlock | None:
        slot = self._slot_for(index)
        return slot.block if slot is not None else None

    def block_values(self, index: int) -> list[int] | None:
        block = self.refblock(index)
        if block is None:
            return None
        if isinstance(block.values, array):  # (order >= 3)
            return block.values.tolist()
        bits = 1 << self.order
        mask = (1 << bits) - 1
        per_byte = 8 // bits
        return [(byte >> (k * bits)) & mask for byte in block.values for k in range(per_byte)]

    def get_refcount(self, cluster: int) -> int:
        block = self.refblock(cluster >> self.rb_bits)
        return block.get(cluster & (self.rb_size - 1)) if block is not None else 0

    def set_refcount(self, cluster: int, value: int) -> bool:
        """Set a refcount whose refcount block exists (in the cache); False if that failed."""
        try:
            slot = self._slot_for(cluster >> self.rb_bits)
        except _RefcountReadError:
            return False
        if slot is None:
            return False
        slot.block.set(cluster & (self.rb_size - 1), value)
        slot.dirty = True
        return True

    # corruption signalling and the pre-write overlap check -----------------------------
    def signal_corruption(self, message: str, fatal: bool = True) -> None:
        """qcow2_signal_corruption: a fatal one marks the image corrupt and unusable."""
        fatal = fatal and self.writable
        if self.signaled_corruption and (not fatal or self.marked_corrupt):
            return
        if fatal:
            self.out.append(
                f"qcow2: Marking image as corrupt: {message}; further corruption "
                f"events will be suppressed"
            )
            self.marked_corrupt = True
            self.dead = True  # QEMU drops the driver: cached refcount updates are lost
            if self.hdr.version >= 3:
                self.hdr.incompatible_features |= S.INCOMPAT_CORRUPT
                self.write_header_features()
        else:
            self.out.append(
                f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                f"events will be suppressed"
            )
        self.signaled_corruption = True

    def overlap_check(self, ign: int, offset: int, size: int) -> bool:
        """QEMU's pre-write overlap check (default "cached" checks); True: refused."""
        kind = self._overlap(ign, offset, size)
        if not kind:
            return False
        self.signal_corruption(
            f"Preventing invalid write on metadata (overlaps with {_OL_NAMES[kind]})"
        )
        return True

    def _overlap(self, ign: int, offset: int, size: int) -> int:
        if not size:
            return 0
        cs = self.cs
        chk = ~ign
        if chk & _OL_MAIN_HEADER and offset < cs:
            return _OL_MAIN_HEADER
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)

        def hit(start: int, length: int) -> bool:
            return length > 0 and offset < start + length and start < offset + size

        hdr = self.hdr
        if chk & _OL_ACTIVE_L1 and hdr.l1_size and hit(hdr.l1_table_offset, hdr.l1_size * 8):
            return _OL_ACTIVE_L1
        if (
            chk & _OL_REFCOUNT_TABLE
            and self.reftable
            and hit(self.reftable_offset, len(self.reftable) * 8)
        ):
            return _OL_REFCOUNT_TABLE
        if (
            chk & _OL_SNAPSHOT_TABLE
            and self.snapshots_size
            and hit(self.snapshots_offset, self.snapshots_size)
        ):
            return _OL_SNAPSHOT_TABLE
        if chk & _OL_INACTIVE_L1:
            for sn in self.snapshots:
                if sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8):
                    return _OL_INACTIVE_L1
        if chk & _OL_ACTIVE_L2:
            if self._l2_starts is None:  # (repairs only touch the L1 entries' flags)
                self._l2_starts = _sorted_offsets(self.l1, S.L1E_OFFSET_MASK)
            if _any_cluster_within(self._l2_starts, cs, offset, size):
                return _OL_ACTIVE_L2
        if chk & _OL_REFCOUNT_BLOCK:
            if self._refblock_starts is None:
                self._refblock_starts = _sorted_offsets(self.reftable, S.REFT_OFFSET_MASK)
            if _any_cluster_within(self._refblock_starts, cs, offset, size):
                return _OL_REFCOUNT_BLOCK
        if chk & _OL_BITMAP_DIRECTORY and hdr.autoclear_features & S.AUTOCLEAR_BITMAPS:
            from ..bitmaps import bitmaps_extension  # (here: most images have no bitmaps)

            info = bitmaps_extension(hdr)
            if info and hit(info.bitmap_directory_offset, info.bitmap_directory_size):
                return _OL_BITMAP_DIRECTORY
        return 0

    # type of an L2 entry -----------------------------------------------------------------
    def cluster_type(self, entry: int) -> int:
        if entry & S.OFLAG_COMPRESSED:
            return _COMPRESSED
        if entry & S.OFLAG_ZERO and not self.extended:
            return _ZERO_ALLOC if entry & S.L2E_OFFSET_MASK else _ZERO_PLAIN
        if not entry & S.L2E_OFFSET_MASK:
            if self.has_data_file and entry & S.OFLAG_COPIED:
                return _NORMAL
            return _UNALLOCATED
        return _NORMAL

    def write_header_features(self) -> None:
        self.pwrite(struct.pack(">Q", self.hdr.incompatible_features), 72)
        self.flush()


def _sorted_offsets(table: array, mask: int) -> list[int]:
    """The non-zero offsets of a table's entries, sorted (for the overlap check)."""
    return sorted({entry & mask for entry in filter(None, table)} - {0})


def _any_cluster_within(starts: list[int], cs: int, offset: int, size: int) -> bool:
    """Whether a cluster starting at one of `starts` (sorted) overlaps [offset, offset+size).

    QEMU tests every L1 entry (refcount table entry) in turn; with millions of entries
    and a test per write that is too slow here."""
    index = bisect_right(starts, offset - cs)
    return index < len(starts) and starts[index] < offset + size


class _CheckState:
    """What the parts of one check run (_Walk, _Compare, _Repair, mixed into _Check) share;
    _Check.__init__ sets it."""

    t: _Target
    fix: int
    out: list[str]
    res: _Result
    imrt: _RefcountArray
    nb_clusters: int
    rebuild: bool
