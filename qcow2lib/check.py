"""Consistency check and repair with QEMU's verdicts (`qemu-img check [-r leaks|all]`).

The checker does what QEMU 7.2 does, in the same order, and reports the same problem
lines, counts and exit codes:

* it reads the snapshot table tolerantly (broken entries are counted, not raised),
* it builds an in-memory refcount table (IMRT) from every reference the metadata
  makes (header, L1/L2 tables of the active image and of every snapshot, data and
  compressed clusters, snapshot table, refcount table and blocks, encryption header,
  bitmaps), checking each L1/L2 entry on the way (reserved bits, alignment, references
  past the end of the file, extended L2 bitmaps),
* it compares the IMRT with the refcounts on disk: too high is a leak, too low a
  corruption, a referenced cluster with refcount 0 (or a broken refcount block) asks for
  the whole refcount structure to be rebuilt,
* it checks the COPIED flags of active L1 and L2 entries against the refcounts.

Repair "leaks" lowers leaked refcounts; repair "all" also raises refcounts that are too
low, rewrites COPIED flags, zeroes misaligned preallocated zero clusters, rebuilds the
refcount structure where it is broken (QEMU's algorithm and allocation order, so the
repaired file is laid out as qemu-img would lay it out) and rewrites an incomplete
snapshot table. As qemu-img does, a check that repaired something runs again without
repairing and reports that second run with the first run's fixed counts.

Everything is read from the file directly and tolerantly: a bad entry is counted and
reported, never raised. Only an unreadable file raises.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from array import array
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, islice
from operator import or_
from typing import Callable, Iterator

from . import structs as S
from .cache import decode_be64, encode_be64
from .errors import CorruptImageError, Qcow2Error, ReadOnlyError
from .header import Header
from .refcount import RefcountBlock

FIX_LEAKS = 1
FIX_ERRORS = 2
_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

# Cluster types (qcow2_get_cluster_type).
_UNALLOCATED, _ZERO_PLAIN, _ZERO_ALLOC, _NORMAL, _COMPRESSED = range(5)

# Metadata kinds of the pre-write overlap check (QCOW2_OL_*), with QEMU's names.
_OL_MAIN_HEADER, _OL_ACTIVE_L1, _OL_ACTIVE_L2, _OL_REFCOUNT_TABLE, _OL_REFCOUNT_BLOCK, \
    _OL_SNAPSHOT_TABLE, _OL_INACTIVE_L1, _OL_INACTIVE_L2, _OL_BITMAP_DIRECTORY = \
    (1 << i for i in range(9))
_OL_NAMES = {_OL_MAIN_HEADER: "qcow2_header", _OL_ACTIVE_L1: "active L1 table",
             _OL_ACTIVE_L2: "active L2 table", _OL_REFCOUNT_TABLE: "refcount table",
             _OL_REFCOUNT_BLOCK: "refcount block", _OL_SNAPSHOT_TABLE: "snapshot table",
             _OL_INACTIVE_L1: "inactive L1 table", _OL_INACTIVE_L2: "inactive L2 table",
             _OL_BITMAP_DIRECTORY: "bitmap directory"}

_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
_L2_BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32
_MAX_L1_ENTRIES = S.MAX_L1_BYTES // 8
_MAX_SNAPSHOTS_SIZE = 1024 * S.MAX_SNAPSHOTS
_SNAPSHOT_EXTRA_SIZE = 24  # vm_state_size_large, disk_size, icount
_INT_MAX = 0x7FFFFFFF
_INT64_MAX = (1 << 63) - 1
_BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
_BME_TABLE_ENTRY_FLAG_ALL_ONES = 1


def _hash_order(keys: list[str]) -> list[str]:
    """The order QEMU's QDict (512 buckets, tdb hash, newest first) prints keys in."""
    def bucket(name: str) -> int:
        value = (0x238F13AF * len(name)) & 0xFFFFFFFF
        for i, ch in enumerate(name.encode()):
            value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512
    return sorted(keys, key=lambda k: (bucket(k), -keys.index(k)))


_JSON_FIELDS = ["filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
                "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                "fragmented-clusters", "compressed-clusters"]
_JSON_ORDER = _hash_order(_JSON_FIELDS)
_OPTIONAL_FIELDS = set(_JSON_FIELDS) - {"filename", "format", "check-errors"}


@dataclass
class CheckReport:
    """What `qemu-img check` reports.

    `messages` are the lines QEMU prints to stderr while checking (and repairing), in
    order; `error` is qemu-img's final error line without its program prefix ("Check
    failed: ..." or "Could not open ...") or None; `repaired` says that the check fixed
    something and was run again (the counts are then those of the second run, with the
    fixed counts of the first).
    """
    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    repaired: bool = False
    error: str | None = None
    failed: bool = False       # the check did not complete: no summary is printed
    not_supported: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 not completed, 2 corrupt, 3 leaks only, 63 unsupported."""
        if self.not_supported:
            return 63
        if self.failed or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json_dict(self) -> dict:
        """`qemu-img check --output=json`, keys in qemu-img's order (optional ones only if non-zero)."""
        values = {"filename": self.filename, "format": self.format,
                  "check-errors": self.check_errors, "image-end-offset": self.image_end_offset,
                  "corruptions": self.corruptions, "leaks": self.leaks,
                  "corruptions-fixed": self.corruptions_fixed, "leaks-fixed": self.leaks_fixed,
                  "total-clusters": self.total_clusters,
                  "allocated-clusters": self.allocated_clusters,
                  "fragmented-clusters": self.fragmented_clusters,
                  "compressed-clusters": self.compressed_clusters}
        return {k: values[k] for k in _JSON_ORDER if k not in _OPTIONAL_FIELDS or values[k]}


def format_check_json(report: CheckReport) -> str:
    """stdout of `qemu-img check --output=json` (empty when the check did not complete)."""
    if report.failed or report.not_supported:
        return ""
    return json.dumps(report.to_json_dict(), indent=4) + "\n"


def format_check_human(report: CheckReport, filename: str | None = None) -> str:
    """stdout of `qemu-img check` (human output)."""
    del filename  # qemu-img's human summary does not name the file
    out = []
    if report.repaired:
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {report.leaks_fixed} leaked clusters\n"
                   f"    {report.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...\n")
    if report.failed or report.not_supported:
        return "".join(out)
    if not (report.corruptions or report.leaks or report.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if report.corruptions:
            out.append(f"\n{report.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if report.leaks:
            out.append(f"\n{report.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if report.check_errors:
            out.append(f"\n{report.check_errors} internal errors have occurred during the "
                       "check.\n")
    if report.total_clusters and report.allocated_clusters:
        out.append(f"{report.allocated_clusters}/{report.total_clusters} = "
                   f"{report.allocated_clusters * 100.0 / report.total_clusters:.2f}% allocated, "
                   f"{report.fragmented_clusters * 100.0 / report.allocated_clusters:.2f}% "
                   f"fragmented, "
                   f"{report.compressed_clusters * 100.0 / report.allocated_clusters:.2f}% "
                   f"compressed clusters\n")
    if report.image_end_offset:
        out.append(f"Image end offset: {report.image_end_offset}\n")
    return "".join(out)


def format_check_stderr(report: CheckReport, prog: str = "qemu-img") -> str:
    """stderr of `qemu-img check`: the problem lines, then the final error if any."""
    lines = list(report.messages)
    if report.error:
        lines.append(f"{prog}: {report.error}")
    return "".join(line + "\n" for line in lines)


# --- internals ----------------------------------------------------------------------------


def _hash_x(value: int) -> str:
    """C's %#x: no prefix for zero."""
    return f"{value:#x}" if value else "0"


class _Abort(Exception):
    """A check step failed with -errno (the check does not complete)."""

    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


class _Result:
    """BdrvCheckResult."""

    __slots__ = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
                 "image_end_offset", "total_clusters", "allocated_clusters",
                 "fragmented_clusters", "compressed_clusters")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def copy(self) -> "_Result":
        other = _Result()
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def add(self, src: "_Result", allocation_info: bool) -> None:
        self.corruptions += src.corruptions
        self.leaks += src.leaks
        self.check_errors += src.check_errors
        self.corruptions_fixed += src.corruptions_fixed
        self.leaks_fixed += src.leaks_fixed
        if allocation_info:
            for name in ("image_end_offset", "total_clusters", "allocated_clusters",
                         "fragmented_clusters", "compressed_clusters"):
                setattr(self, name, getattr(src, name))


@dataclass
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


# A repair growing the file past this many clusters fails with ENOMEM, as QEMU's does when
# its in-memory refcount array (GiBs by then) cannot be allocated.
_MAX_IMRT_CLUSTERS = 1 << 29
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
                out += chunk[start & _CHUNK_MASK:((stop - 1) & _CHUNK_MASK) + 1].tolist()
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

    def __init__(self, file, header: Header, filename: str, writable: bool, out: list[str],
                 prog: str):
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
        self.l1 = decode_be64(self.pread(header.l1_size * 8, header.l1_table_offset)) \
            if header.l1_size else array("Q")
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
        self.set_reftable(offset, decode_be64(self.pread(clusters * self.cs, offset))
                          if clusters else array("Q"))
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
            self.signal_corruption(f"Refblock offset {_hash_x(offset)} unaligned (reftable "
                                   f"index: {_hash_x(index)})")
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
        if self.order >= 3:
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
            self.out.append(f"qcow2: Marking image as corrupt: {message}; further corruption "
                            f"events will be suppressed")
            self.marked_corrupt = True
            self.dead = True  # QEMU drops the driver: cached refcount updates are lost
            if self.hdr.version >= 3:
                self.hdr.incompatible_features |= S.INCOMPAT_CORRUPT
                self.write_header_features()
        else:
            self.out.append(f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                            f"events will be suppressed")
        self.signaled_corruption = True

    def overlap_check(self, ign: int, offset: int, size: int) -> bool:
        """QEMU's pre-write overlap check (default "cached" checks); True: refused."""
        kind = self._overlap(ign, offset, size)
        if not kind:
            return False
        self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                               f"{_OL_NAMES[kind]})")
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
        if chk & _OL_REFCOUNT_TABLE and self.reftable and hit(self.reftable_offset,
                                                               len(self.reftable) * 8):
            return _OL_REFCOUNT_TABLE
        if chk & _OL_SNAPSHOT_TABLE and self.snapshots_size and hit(self.snapshots_offset,
                                                                    self.snapshots_size):
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
            info = _bitmaps_extension(hdr)
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


def _used_entries(table: array, words: int) -> Iterator[int]:
    """Indices of the L2 entries that are not all zeros (entry and extended bitmap): a
    table past the end of the file, or a mostly empty one, is then skipped at C speed."""
    if words == 1:
        return compress(range(len(table)), table)
    return compress(range(len(table) // 2), map(or_, table[::2], table[1::2]))


def _sorted_offsets(table: array, mask: int) -> list[int]:
    """The non-zero offsets of a table's entries, sorted (for the overlap check)."""
    return sorted({entry & mask for entry in filter(None, table)} - {0})


def _any_cluster_within(starts: list[int], cs: int, offset: int, size: int) -> bool:
    """Whether a cluster starting at one of `starts` (sorted) overlaps [offset, offset+size).

    QEMU tests every L1 entry (refcount table entry) in turn; with millions of entries
    and a test per write that is too slow here."""
    index = bisect_right(starts, offset - cs)
    return index < len(starts) and starts[index] < offset + size


def _bitmaps_extension(hdr: Header):
    for ext in hdr.extensions:
        if ext.type == S.EXT_BITMAPS and len(ext.data) >= S.BitmapsExtension.sizeof():
            return S.BitmapsExtension.parse(ext.data)
    return None


@dataclass
class _Replay:
    """What checking one L1 entry did, to do it again for the same entry without re-reading
    its L2 table: the lines printed, the change of each counter, and the clusters counted.

    An L1 table may point at the same L2 table thousands of times (at itself, or into a
    data cluster repeating one entry), which QEMU re-reads each time in C."""
    messages: list[str]
    counters: list[tuple[str, int]]
    increments: list[tuple[int, int]]  # (cluster, times counted)
    depth: int                         # the most times one cluster was counted
    pending: int = 0                   # repeats whose increments are not in the IMRT yet


_MAX_COUNTED_L1_ENTRIES = 1 << 16  # L1 entries looked at for repeats, per L1 table
_MAX_REMEMBERED_REFCOUNTS = 1 << 16  # refcounts check_oflag_copied keeps at hand
_MIN_DEFER_HEADROOM = 1024  # refcounts this far below the maximum allow deferred increments


class _Check:
    """One run of qcow2_co_check_locked with one repair mode."""

    def __init__(self, t: _Target, fix: int):
        self.t = t
        self.fix = fix
        self.out = t.out
        self.res = _Result()
        self.imrt = _RefcountArray(t.order)
        self.nb_clusters = 0
        self.rebuild = False
        # Repeated L1 entries (see _Replay): the clusters counted while recording one, and
        # the repeats whose increments are deferred. `spent` bounds what the deferred
        # increments (and those made since) add to any cluster, `bound` the largest count
        # before them: while bound + spent stays within the refcount maximum no increment
        # can overflow, so applying them late changes nothing QEMU would print.
        self._recorded: list[int] | None = None
        self._overflowed = False
        self._pending: list[_Replay] = []
        self._spent = 0
        self._bound = 0
        self._deferring = True
        # Snapshots sharing one L1 table (see calculate): every inc() counts `_times` paths.
        self._times = 1
        self._overflows = 0
        # The non-zero entries of the L1 table checked last: (offset, size), t.writes
        # when read, entries, those repeated.
        self._l1_entries: tuple | None = None

    # --- the IMRT ---------------------------------------------------------------------
    def inc(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt."""
        if size <= 0:
            return
        t = self.t
        if offset + size - t.file_size() >= t.cs:
            self.out.append(f"ERROR: counting reference for region exceeding the end of the "
                            f"file by one cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        limit = t.refcount_max
        times = self._times
        if self._pending:
            self._spent += times
            if self._bound + self._spent > limit:
                self._apply_pending()
        first = offset >> t.cluster_bits
        last = (offset + size - 1) >> t.cluster_bits
        if last >= self.nb_clusters:
            self.nb_clusters = last + 1
        if self._recorded is not None:
            self._recorded.extend(range(first, last + 1))
        if first == last:  # the usual case: one cluster
            chunk = self.imrt.chunk(first >> _CHUNK_BITS)
            value = chunk[first & _CHUNK_MASK]
            if value + times <= limit:
                chunk[first & _CHUNK_MASK] = value + times
                return
        cluster = first
        while cluster <= last:
            chunk = self.imrt.chunk(cluster >> _CHUNK_BITS)
            base = cluster & ~_CHUNK_MASK
            stop = min(last + 1, base + _CHUNK_MASK + 1)
            for position in range(cluster - base, stop - base):
                value = chunk[position]
                if value + times > limit:
                    self.out.append(f"ERROR: overflow cluster offset="
                                    f"{(base + position) << t.cluster_bits:#x}")
                    self.out.append("Use qemu-img amend to increase the refcount entry width "
                                    "or qemu-img convert to create a clean copy if the image "
                                    "cannot be opened for writing")
                    self.res.corruptions += 1
                    self._overflowed = True
                    self._overflows += 1
                    continue
                chunk[position] = value + times
            cluster = stop

    def _record(self, entry: int, frag: bool, active: bool) -> _Replay | None:
        """Check an L1 entry, noting what it did; None if that cannot simply be repeated
        (it overflowed a refcount, wrote or signalled a corruption)."""
        t = self.t
        res = self.res
        mark = len(self.out)
        before = [getattr(res, name) for name in _Result.__slots__]
        writes, signaled = t.writes, t.signaled_corruption
        self._recorded, self._overflowed = [], False
        try:
            self._check_l1_entry(entry, frag, active)
        finally:
            clusters, self._recorded = self._recorded, None
        if self._overflowed or t.writes != writes or t.signaled_corruption != signaled:
            return None
        counters = [(name, getattr(res, name) - value)
                    for name, value in zip(_Result.__slots__, before)
                    if getattr(res, name) != value]
        counts = Counter(clusters)
        return _Replay(self.out[mark:], counters, list(counts.items()),
                       max(counts.values(), default=0))

    def _repeat(self, replay: _Replay) -> bool:
        """Do a recorded L1 entry's check again; False if its increments might overflow a
        refcount (then the entry is really checked, so the overflow lines come in order)."""
        if not self._defer(replay):
            if not self._apply(replay.increments):
                return False
            self._add_counters(replay.counters, 1)
        self.out.extend(replay.messages)
        return True

    def _add_counters(self, counters: list[tuple[str, int]], times: int) -> None:
        res = self.res
        for name, delta in counters:
            setattr(res, name, getattr(res, name) + delta * times)

    def _defer(self, replay: _Replay) -> bool:
        """Leave a repeat's increments (and counters) for later if no refcount can overflow
        meanwhile."""
        if not self._deferring:
            return False
        limit = self.t.refcount_max
        depth = replay.depth * self._times
        if self._pending and self._bound + self._spent + depth > limit:
            self._apply_pending()
        if not self._pending:
            self._bound = self.imrt.max_value()
            if self._bound + depth + _MIN_DEFER_HEADROOM > limit:
                self._deferring = False  # (counts only grow: stays so for this table)
                return False
        if not replay.pending:
            self._pending.append(replay)
        replay.pending += 1
        self._spent += depth
        return True

    def _apply_pending(self) -> None:
        chunk = self.imrt.chunk
        for replay in self._pending:
            times, replay.pending = replay.pending, 0
            paths = times * self._times
            for cluster, count in replay.increments:
                chunk(cluster >> _CHUNK_BITS)[cluster & _CHUNK_MASK] += count * paths
            self._add_counters(replay.counters, times)
        self._pending.clear()
        self._spent = 0

    def _apply(self, increments: list[tuple[int, int]]) -> bool:
        """Count clusters at once, unless one of them would overflow (then nothing)."""
        imrt = self.imrt
        limit = self.t.refcount_max
        times = self._times
        if any(imrt.get(cluster) + count * times > limit for cluster, count in increments):
            return False
        for cluster, count in increments:
            imrt.add(cluster, count * times)
        return True

    # --- the snapshot table (qcow2_check_read_snapshot_table) ---------------------------
    def read_snapshot_table(self, res: _Result) -> None:
        t = self.t
        nb_snapshots, snapshots_offset = struct.unpack(">IQ", t.pread(12, 60))
        repair = bool(self.fix & FIX_ERRORS)
        reduced = 0
        dropped = 0
        if nb_snapshots > S.MAX_SNAPSHOTS and repair:
            self.out.append(f"Discarding {nb_snapshots - S.MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb_snapshots - S.MAX_SNAPSHOTS
            nb_snapshots = S.MAX_SNAPSHOTS
        t.snapshots, t.snapshots_offset, t.nb_snapshots, t.snapshots_size = [], 0, 0, 0
        error = None
        if nb_snapshots > S.MAX_SNAPSHOTS:
            error, err = "snapshot table too large", errno.EFBIG
        elif _INT64_MAX - nb_snapshots * 40 < snapshots_offset or snapshots_offset & (t.cs - 1):
            error, err = "snapshot table offset invalid", errno.EINVAL
        if error:
            res.check_errors += 1
            self.out.append(f"{t.prog}: ERROR {error}")
            if nb_snapshots > S.MAX_SNAPSHOTS:
                self.out.append(f"You can force-remove all {nb_snapshots - S.MAX_SNAPSHOTS} "
                                f"overhanging snapshots with qemu-img check -r all")
            raise _Abort(err)
        snapshots: list[_Snapshot] = []
        offset = snapshots_offset
        table_length = 0
        failure = None
        for i in range(nb_snapshots):
            pre_offset = offset
            table_length = -(-table_length // 8) * 8
            offset = -(-offset // 8) * 8
            (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock,
             vm_state, extra_size) = struct.unpack(">QIHHIIQII", t.pread(40, offset))
            offset += 40
            truncate_extra = False
            if extra_size > S.MAX_SNAPSHOT_EXTRA_DATA:
                if not repair:
                    failure = (errno.EFBIG, f"Too much extra metadata in snapshot table entry {i}",
                               "You can force-remove this extra metadata with qemu-img check "
                               "-r all")
                    break
                self.out.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                                f"({extra_size} > {S.MAX_SNAPSHOT_EXTRA_DATA})")
                dropped += 1
                truncate_extra = True
            known = min(_SNAPSHOT_EXTRA_SIZE, extra_size)
            extra = t.pread(known, offset).ljust(_SNAPSHOT_EXTRA_SIZE, b"\0")
            offset += known
            vm_large, disk_size, icount = struct.unpack(">QQQ", extra)
            if extra_size >= 8:
                vm_state = vm_large
            if extra_size < 16:
                disk_size = t.hdr.size // 512 * 512
            if extra_size < 24:
                icount = (1 << 64) - 1
            unknown = b""
            if extra_size > _SNAPSHOT_EXTRA_SIZE:
                extra_end = offset + extra_size - _SNAPSHOT_EXTRA_SIZE
                if truncate_extra:
                    extra_size = S.MAX_SNAPSHOT_EXTRA_DATA
                unknown = t.pread(extra_size - _SNAPSHOT_EXTRA_SIZE, offset)
                offset = extra_end
            id_str = t.pread(id_size, offset).split(b"\0", 1)[0]
            offset += id_size
            name = t.pread(name_size, offset).split(b"\0", 1)[0]
            offset += name_size
            table_length += 40 + extra_size + id_size + name_size
            if table_length > _MAX_SNAPSHOTS_SIZE or offset - snapshots_offset > _INT_MAX:
                if not repair:
                    failure = (errno.EFBIG, "Snapshot table is too big",
                               f"You can force-remove all {nb_snapshots - i} overhanging "
                               f"snapshots with qemu-img check -r all")
                    break
                self.out.append(f"Discarding {nb_snapshots - i} overhanging snapshots (snapshot "
                                f"table is too big)")
                reduced += nb_snapshots - i
                offset = pre_offset
                break
            snapshots.append(_Snapshot(l1_offset, l1_size, id_str, name, vm_state, date_sec,
                                       date_nsec, vm_clock, extra_size, disk_size, icount,
                                       unknown))
        if failure:
            res.check_errors += 1
            err, message, hint = failure
            self.out.append(f"{t.prog}: ERROR failed to read the snapshot table: {message}")
            self.out.append(hint)
            raise _Abort(err)
        t.snapshots = snapshots
        t.nb_snapshots = len(snapshots)
        t.snapshots_offset = snapshots_offset
        t.snapshots_size = offset - snapshots_offset
        res.corruptions += reduced + dropped
        if reduced:
            t.pwrite(struct.pack(">I", t.nb_snapshots), 60)
            t.flush()
            t.hdr.nb_snapshots = t.nb_snapshots
            res.corruptions_fixed += reduced
            res.corruptions -= reduced
        if t.hdr.version >= 3:
            for i, sn in enumerate(snapshots):
                if sn.extra_data_size < 16:
                    res.corruptions += 1
                    self.out.append(f"{'Repairing' if repair else 'ERROR'} snapshot table entry "
                                    f"{i} is incomplete")

    def fix_snapshot_table(self, res: _Result) -> None:
        """qcow2_check_fix_snapshot_table: rewrite the table when it had to be repaired."""
        if not (res.corruptions and self.fix & FIX_ERRORS):
            return
        try:
            self._write_snapshots()
        except _Abort as exc:
            res.check_errors += 1
            self.out.append(f"ERROR failed to update snapshot table: {os.strerror(exc.errno)}")
            raise
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def _write_snapshots(self) -> None:
        t = self.t
        size = 0
        for sn in t.snapshots:
            size = -(-size // 8) * 8 + 40 + max(_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size) \
                + len(sn.id_str) + len(sn.name)
            if size > _MAX_SNAPSHOTS_SIZE:
                raise _Abort(errno.EFBIG)
        first = self._alloc_clusters(-(-size // t.cs))
        new_offset = first << t.cluster_bits
        t.flush_if_alive()
        if t.overlap_check(0, new_offset, size):
            raise _Abort(errno.EIO)
        data = bytearray()
        for sn in t.snapshots:
            data += bytes(-len(data) % 8)
            vm32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
            data += struct.pack(">QIHHIIQII", sn.l1_table_offset, sn.l1_size, len(sn.id_str),
                                len(sn.name), sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm32,
                                max(_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size))
            data += struct.pack(">QQQ", sn.vm_state_size, sn.disk_size, sn.icount)
            if sn.extra_data_size > _SNAPSHOT_EXTRA_SIZE:
                data += sn.unknown_extra
            data += sn.id_str + sn.name
        t.pwrite(bytes(data), new_offset)
        t.flush_if_alive()
        t.pwrite(struct.pack(">IQ", t.nb_snapshots, new_offset), 60)
        t.flush()
        old_offset, old_size = t.snapshots_offset, t.snapshots_size
        t.hdr.nb_snapshots, t.hdr.snapshots_offset = t.nb_snapshots, new_offset
        t.snapshots_offset, t.snapshots_size = new_offset, size
        if old_size > 0:
            self._free_clusters(old_offset, old_size)

    def _free_clusters(self, offset: int, size: int) -> None:
        """qcow2_free_clusters: all or nothing; a failure is only reported."""
        t = self.t
        clusters = range(offset >> t.cluster_bits, ((offset + size - 1) >> t.cluster_bits) + 1)
        try:
            values = [t.get_refcount(c) for c in clusters]
        except _RefcountReadError:
            values = [0]
        if 0 in values or any(t.refblock(c >> t.rb_bits) is None for c in clusters):
            self.out.append(f"qcow2_free_clusters failed: {os.strerror(errno.EINVAL)}")
            return
        for cluster, value in zip(clusters, values):
            if t.set_refcount(cluster, value - 1) and value == 1:
                t.discard(cluster)

    def _alloc_clusters(self, count: int) -> int:
        """qcow2_alloc_clusters: first fit on the refcounts on disk, refcount set to 1."""
        t = self.t
        start = 0
        cluster = 0
        while cluster - start < count:
            if t.get_refcount(cluster):
                start = cluster + 1
            cluster += 1
        for c in range(start, start + count):
            # A cluster no refcount block covers yet would need a new block (and maybe a
            # larger refcount table) first: not done here.
            if not t.set_refcount(c, 1):
                raise _Abort(errno.ENOSPC)
        return start

    # --- L1 / L2 tables ---------------------------------------------------------------
    def check_l1(self, l1_offset: int, l1_size: int, frag: bool, active: bool) -> None:
        """check_refcounts_l1."""
        if not l1_size:
            return
        t = self.t
        self.inc(l1_offset, l1_size * 8)
        key = (l1_offset, l1_size)
        cached = self._l1_entries
        if cached is not None and cached[:2] == (key, t.writes):
            entries, repeated = cached[2], cached[3]
        else:  # (snapshots sharing an L1 table check it one after the other: read it once)
            self._l1_entries = None
            entries = array("Q", filter(None, decode_be64(t.pread(l1_size * 8, l1_offset))))
            counts = Counter(islice(entries, _MAX_COUNTED_L1_ENTRIES))
            repeated = {entry for entry, count in counts.items() if count > 1}
            self._l1_entries = (key, t.writes, entries, repeated)
        replays: dict[int, _Replay] = {}
        writes = t.writes
        self._deferring = True
        try:
            for entry in entries:
                if t.writes != writes:  # a repair wrote: what was recorded may not hold
                    replays.clear()
                    writes = t.writes
                replay = replays.get(entry)
                if replay is not None and self._repeat(replay):
                    continue
                if replay is None and entry in repeated:
                    replay = self._record(entry, frag, active)
                    if replay is not None:
                        replays[entry] = replay
                else:
                    self._check_l1_entry(entry, frag, active)
        finally:
            self._apply_pending()

    def _check_l1_entry(self, entry: int, frag: bool, active: bool) -> None:
        t = self.t
        cs = t.cs
        if entry & S.L1E_RESERVED_MASK:
            self.out.append(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            self.res.corruptions += 1
        l2_offset = entry & S.L1E_OFFSET_MASK
        self.inc(l2_offset, cs)
        if l2_offset & (cs - 1):
            self.out.append(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                            f"L1 entry corrupted")
            self.res.corruptions += 1
        self.check_l2(l2_offset, frag, active)

    def check_l2(self, l2_offset: int, frag: bool, active: bool) -> None:
        """check_refcounts_l2."""
        t = self.t
        res = self.res
        cs = t.cs
        words = t.words
        data = t.pread(cs, l2_offset)
        if data == t.zero_cluster:  # (a table past the end of the file, say)
            return
        table = decode_be64(data)
        next_contiguous = 0
        fix_errors = bool(self.fix & FIX_ERRORS)
        # Entries with none of these bits are aligned data clusters without any problem.
        unusual = S.OFLAG_COMPRESSED | S.L2E_STD_RESERVED_MASK | (cs - 1) & S.L2E_OFFSET_MASK \
            | (0 if t.extended else S.OFLAG_ZERO)
        count_data = not t.has_data_file
        for i in _used_entries(table, words):
            entry = table[i * words]
            bitmap = table[i * words + 1] if words == 2 else 0
            offset = entry & S.L2E_OFFSET_MASK
            if offset and not entry & unusual and not (bitmap >> 32) & bitmap:
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if count_data:
                    self.inc(offset, cs)
                continue
            kind = t.cluster_type(entry)
            if kind != _COMPRESSED and entry & S.L2E_STD_RESERVED_MASK:
                self.out.append(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if kind == _COMPRESSED:
                if entry & S.OFLAG_COPIED:
                    self.out.append(f"ERROR: coffset={entry & t.cluster_offset_mask:#x}: copied "
                                    f"flag must never be set for compressed clusters")
                    entry &= ~S.OFLAG_COPIED
                    res.corruptions += 1
                if t.has_data_file:
                    self.out.append(f"ERROR compressed cluster {i} with data file, "
                                    f"entry={entry:#x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.out.append(f"ERROR compressed cluster {i} with non-zero subcluster "
                                    f"allocation bitmap, entry={entry:#x}")
                    res.corruptions += 1
                    continue
                coffset = entry & t.cluster_offset_mask
                sectors = ((entry >> t.csize_shift) & t.csize_mask) + 1
                self.inc(coffset, sectors * 512 - (coffset & 511))
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif kind in (_NORMAL, _ZERO_ALLOC):
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.out.append(f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                                    f"subcluster allocation bitmap")
                if offset & (cs - 1):
                    res.corruptions += 1
                    if t.extended:
                        contains_data = bool(bitmap & _L2_BITMAP_ALL_ALLOC)
                    else:
                        contains_data = not entry & S.OFLAG_ZERO
                    if not contains_data:
                        self.out.append(f"{'Repairing' if fix_errors else 'ERROR'} "
                                        f"offset={offset:x}: Preallocated cluster is not properly "
                                        f"aligned; L2 entry corrupted.")
                        if fix_errors:
                            if self._fix_l2_entry_by_zero(l2_offset, table, i, active):
                                continue
                    else:
                        self.out.append(f"ERROR offset={offset:x}: Data cluster is not properly "
                                        f"aligned; L2 entry corrupted.")
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if count_data:
                    self.inc(offset, cs)
            elif kind == _UNALLOCATED:
                if bitmap & _L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.out.append("ERROR: Unallocated cluster has non-zero subcluster "
                                    "allocation map")

    def _fix_l2_entry_by_zero(self, l2_offset: int, table, index: int, active: bool) -> bool:
        """Make a misaligned preallocated zero cluster a plain zero cluster; True if fixed."""
        t = self.t
        words = t.words
        if t.extended:
            bitmap = table[index * 2 + 1]
            bitmap = (bitmap | (bitmap << 32)) & _L2_BITMAP_ALL_ZEROES
            table[index * 2 + 1] = bitmap
            table[index * 2] = 0
        else:
            table[index] = S.OFLAG_ZERO
        entry_offset = l2_offset + index * words * 8
        if t.overlap_check(_OL_ACTIVE_L2 if active else _OL_INACTIVE_L2, entry_offset, words * 8):
            self.out.append("ERROR: Overlap check failed")
            self.res.check_errors += 1
            raise _Abort(errno.EIO)
        t.pwrite(encode_be64(table[index * words:(index + 1) * words]), entry_offset)
        t.flush()
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    # --- calculate_refcounts ------------------------------------------------------------
    def calculate(self, fix: int) -> None:
        """calculate_refcounts. Snapshots sharing an L1 table have it walked once and
        counted as often as it is used (see _check_snapshots); should a refcount overflow
        with counts so reordered, the walk is done again snapshot by snapshot, so the
        overflow lines come where QEMU prints them."""
        t = self.t
        start = (len(self.out), self.res.copy(), self.nb_clusters, t.writes)
        shared = not fix & FIX_ERRORS and not self.imrt.chunks  # (repairs write: no reordering)
        self._overflows = 0
        if self._calculate(fix, shared) and self._overflows and t.writes == start[3]:
            del self.out[start[0]:]
            self.res, self.nb_clusters = start[1], start[2]
            self.imrt.clear()
            self._calculate(fix, False)

    def _calculate(self, fix: int, shared: bool) -> bool:
        """Returns whether L1 tables shared by snapshots were counted at once."""
        t = self.t
        hdr = t.hdr
        saved_fix, self.fix = self.fix, fix
        try:
            self.inc(0, t.cs)
            self.check_l1(hdr.l1_table_offset, hdr.l1_size, True, True)
            if t.has_data_file and t.nb_snapshots:
                self.out.append(f"ERROR {t.nb_snapshots} snapshots in image with data file")
                self.res.corruptions += 1
            counted_at_once = self._check_snapshots(shared)
            self.inc(t.snapshots_offset, t.snapshots_size)
            self.inc(t.reftable_offset, len(t.reftable) * 8)
            if hdr.crypto_length:
                self.inc(hdr.crypto_offset, hdr.crypto_length)
            self._count_bitmaps()
            self.check_refblocks()
        finally:
            self.fix = saved_fix
        return counted_at_once

    def _check_snapshots(self, shared: bool) -> bool:
        """The snapshots' L1 tables, in table order. With `shared`, an L1 table (offset and
        size) used by several snapshots is walked once: its lines and counters are repeated
        for each later user, and its increments are added for all of them at the end (a
        thousand snapshots of one disk cost one walk, not a thousand; nothing is written
        meanwhile, so every walk would see the same). Returns whether that happened."""
        t = self.t
        keys = [None if sn.l1_table_offset & (t.cs - 1) or sn.l1_size > _MAX_L1_ENTRIES
                else (sn.l1_table_offset, sn.l1_size) for sn in t.snapshots]
        uses = Counter(filter(None, keys)) if shared else Counter()
        recorded: dict[tuple[int, int], tuple[int, list[str], list[tuple[str, int]]]] = {}
        repeats: Counter = Counter()
        for sn, key in zip(t.snapshots, keys):
            if key is None:
                self._report_bad_snapshot(sn)
                continue
            replay = recorded.get(key)
            if replay is not None and replay[0] == t.writes:
                self.out.extend(replay[1])
                self._add_counters(replay[2], 1)
                repeats[key] += 1
                continue
            if uses[key] < 2:
                self.check_l1(*key, False, False)
                continue
            mark = len(self.out)
            before = [getattr(self.res, name) for name in _Result.__slots__]
            state = (t.writes, t.signaled_corruption, self._overflows)
            self.check_l1(*key, False, False)
            if (t.writes, t.signaled_corruption, self._overflows) == state:
                recorded[key] = (t.writes, self.out[mark:], [
                    (name, getattr(self.res, name) - value)
                    for name, value in zip(_Result.__slots__, before)
                    if getattr(self.res, name) != value])
        out, res = self.out, self.res
        try:
            self.out, self.res = [], _Result()  # (lines and counters repeated above)
            for key, times in repeats.items():
                self._times = times
                self.check_l1(*key, False, False)
        finally:
            self.out, self.res, self._times = out, res, 1
        return bool(repeats)

    def _report_bad_snapshot(self, sn: _Snapshot) -> None:
        """A snapshot table entry whose L1 table cannot be walked."""
        t = self.t
        sid = sn.id_str.decode("utf-8", "replace")
        sname = sn.name.decode("utf-8", "replace")
        if sn.l1_table_offset & (t.cs - 1):
            self.out.append(f"ERROR snapshot {sid} ({sname}) l1_offset="
                            f"{_hash_x(sn.l1_table_offset)}: L1 table is not cluster "
                            f"aligned; snapshot table entry corrupted")
        else:
            self.out.append(f"ERROR snapshot {sid} ({sname}) l1_size="
                            f"{_hash_x(sn.l1_size)}: L1 table is too large; snapshot "
                            f"table entry corrupted")
        self.res.corruptions += 1

    def _count_bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts (bitmaps count only with the autoclear bit set)."""
        t = self.t
        if not t.hdr.autoclear_features & S.AUTOCLEAR_BITMAPS:
            return
        info = _bitmaps_extension(t.hdr)
        if info is None or info.nb_bitmaps == 0:
            return
        self.inc(info.bitmap_directory_offset, info.bitmap_directory_size)
        entries = self._bitmap_directory(info)
        if entries is None:
            self.res.corruptions += 1
            raise _Abort(errno.EINVAL)
        for entry in entries:
            self.inc(entry.bitmap_table_offset, entry.bitmap_table_size * 8)
            table = decode_be64(t.pread(entry.bitmap_table_size * 8, entry.bitmap_table_offset))
            for value in table:
                offset = value & S.BITMAP_TABLE_OFFSET_MASK
                if (value & _BME_TABLE_ENTRY_RESERVED_MASK
                        or offset and (value & _BME_TABLE_ENTRY_FLAG_ALL_ONES or offset % t.cs)):
                    # bitmap_table_load refuses the whole table
                    self.res.corruptions += 1
                    raise _Abort(errno.EINVAL)
            for value in table:
                offset = value & S.BITMAP_TABLE_OFFSET_MASK
                if offset:
                    self.inc(offset, t.cs)

    def _bitmap_directory(self, info):
        """bitmap_list_load: the directory entries, or None where QEMU refuses the list."""
        t = self.t
        size = info.bitmap_directory_size
        if size == 0 or size > 1024 * 65535:
            return None
        directory = t.pread(size, info.bitmap_directory_offset)
        entries = []
        pos = 0
        while pos < size:
            if pos + S.BITMAP_DIRECTORY_ENTRY_SIZE > size or len(entries) >= info.nb_bitmaps:
                return None
            entry = S.BitmapDirectoryEntry.parse(directory[pos:pos + S.BITMAP_DIRECTORY_ENTRY_SIZE])
            step = S.BITMAP_DIRECTORY_ENTRY_SIZE + entry.extra_data_size + entry.name_size
            step += -step % 8
            if pos + step > size or entry.extra_data_size:
                return None
            phys = entry.bitmap_table_size * t.cs
            if (entry.bitmap_table_size == 0 or entry.bitmap_table_offset == 0
                    or entry.bitmap_table_offset % t.cs or entry.bitmap_table_size > 0x8000000
                    or not 9 <= entry.granularity_bits <= 31 or entry.flags & 0xFFFFFFFC
                    or entry.name_size > 1023 or entry.type != 1 or phys > 0x20000000
                    or (not entry.flags & 1
                        and t.hdr.size > (phys * 8) << entry.granularity_bits)):
                return None
            entries.append(entry)
            pos += step
        if len(entries) != info.nb_bitmaps:
            return None
        return entries

    def check_refblocks(self) -> None:
        t = self.t
        res = self.res
        cs = t.cs
        for i, entry in enumerate(t.reftable):
            offset = entry & S.REFT_OFFSET_MASK
            cluster = offset >> t.cluster_bits
            if entry & S.REFT_RESERVED_MASK:
                self.out.append(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.out.append(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                                f"entry corrupted")
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                res.corruptions += 1
                fixing = bool(self.fix & FIX_ERRORS)
                self.out.append(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is "
                                f"outside image")
                if fixing:
                    try:
                        t.truncate(offset + cs)
                    except OSError as exc:
                        reason = os.strerror(exc.errno or errno.EIO)
                        self.rebuild = True
                        self.out.append(f"{t.prog}: Could not resize file: {reason}")
                        self.out.append(f"ERROR could not resize image: {reason}")
                        continue
                    new_clusters = -(-t.file_size() // cs)
                    if new_clusters > _MAX_IMRT_CLUSTERS:
                        res.check_errors += 1
                        raise _Abort(errno.ENOMEM)
                    self.nb_clusters = max(self.nb_clusters, new_clusters)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(offset, cs)
                continue
            if offset:
                self.inc(offset, cs)
                refcount = self.imrt.get(cluster)
                if refcount != 1:
                    self.out.append(f"ERROR refcount block {i} refcount={refcount}")
                    res.corruptions += 1
                    self.rebuild = True

    # --- compare_refcounts ------------------------------------------------------------
    def compare(self, fix: int) -> int:
        """Compare the IMRT with the refcounts on disk; returns the highest used cluster."""
        t = self.t
        res = self.res
        highest = 0
        nb = self.nb_clusters
        rb_size = t.rb_size
        for block_index in self._blocks_to_compare():
            lo = block_index * rb_size
            hi = min(nb, lo + rb_size)
            try:
                disk = t.block_values(block_index)
            except _RefcountReadError:
                for i in range(lo, hi):
                    self.out.append(f"Can't get refcount for cluster {i}: "
                                    f"{os.strerror(errno.EIO)}")
                    res.check_errors += 1
                continue
            mine = self.imrt.values(lo, hi)
            theirs = disk[:hi - lo] if disk is not None else [0] * (hi - lo)
            last = _last_used(mine, theirs)
            if last >= 0:
                highest = lo + last
            for start in range(0, hi - lo, _COMPARE_STEP):
                stop = start + _COMPARE_STEP
                if mine[start:stop] == theirs[start:stop]:
                    continue
                for j in range(start, min(stop, hi - lo)):
                    refcount1, refcount2 = theirs[j], mine[j]
                    if refcount1 == refcount2:
                        continue
                    i = lo + j
                    fixed = None
                    if refcount1 == 0:
                        self.rebuild = True
                    elif refcount1 > refcount2 and fix & FIX_LEAKS:
                        fixed = "leaks_fixed"
                    elif refcount1 < refcount2 and fix & FIX_ERRORS:
                        fixed = "corruptions_fixed"
                    word = "Repairing" if fixed else "ERROR" if refcount1 < refcount2 else "Leaked"
                    self.out.append(f"{word} cluster {i} refcount={refcount1} "
                                    f"reference={refcount2}")
                    if fixed and t.set_refcount(i, refcount2):
                        if not refcount2:
                            t.discard(i)
                        setattr(res, fixed, getattr(res, fixed) + 1)
                        continue
                    if refcount1 < refcount2:
                        res.corruptions += 1
                    else:
                        res.leaks += 1
        return highest

    def _blocks_to_compare(self) -> list[int]:
        """The refcount block indices below nb_clusters that have a refcount block on disk
        or counts in the IMRT: everywhere else both sides are 0 (QEMU walks every cluster;
        a file grown to reach a refcount block far past its end has billions)."""
        t = self.t
        count = -(-self.nb_clusters // t.rb_size)
        blocks = {i for i in compress(range(min(count, len(t.reftable))), t.reftable)
                  if t.reftable[i] & S.REFT_OFFSET_MASK}
        for chunk in self.imrt.chunks:
            first = (chunk << _CHUNK_BITS) >> t.rb_bits
            last = (((chunk + 1) << _CHUNK_BITS) - 1) >> t.rb_bits
            blocks.update(range(first, min(last + 1, count)))
        return sorted(blocks)

    # --- rebuild_refcount_structure -----------------------------------------------------
    def _alloc_imrt(self, count: int, first_free: list[int]) -> int:
        """alloc_clusters_imrt: first fit in the IMRT from first_free[0]; returns an offset."""
        imrt = self.imrt
        cluster = first_free[0]
        first_gap = True
        contiguous = 0
        while cluster < self.nb_clusters and contiguous < count:
            if not imrt.get(cluster):
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self.nb_clusters = cluster + count - contiguous
        cluster -= contiguous
        for i in range(count):
            imrt.set(cluster + i, 1)
        return cluster << self.t.cluster_bits

    def _encode_refblock(self, index: int) -> bytes:
        t = self.t
        values = self.imrt.values(index * t.rb_size, (index + 1) * t.rb_size)
        block = RefcountBlock(t.order, bytes(t.cs))
        if t.order >= 3:
            block.values = array(block.values.typecode, values)
        else:
            for j, value in enumerate(values):
                if value:
                    block.set(j, value)
        return block.to_bytes()

    def _write_refblocks(self, first: int, end: int, reftable: array) -> bool:
        """rebuild_refcounts_write_refblocks; returns whether the reftable grew."""
        t = self.t
        grown = False
        first_free = [0]
        cluster = first
        entries_per_cluster = t.cs // 8
        while True:
            cluster = self.imrt.next_used(cluster, end)
            if cluster >= end:
                return grown
            index = cluster >> t.rb_bits
            start = index << t.rb_bits
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                first_free[0] = max(first_free[0], start)
                block_offset = self._alloc_imrt(1, first_free)
                block_cluster = block_offset >> t.cluster_bits
                if block_cluster >= end:
                    end = block_cluster + 1
                if len(reftable) <= index:
                    new_len = -(-(index + 1) // entries_per_cluster) * entries_per_cluster
                    reftable.extend(array("Q", bytes(8 * (new_len - len(reftable)))))
                    grown = True
                reftable[index] = block_offset
            if t.overlap_check(0, block_offset, t.cs):
                raise _RebuildError("ERROR writing refblock", errno.EIO)
            t.pwrite(self._encode_refblock(index), block_offset)
            cluster = start + t.rb_size

    def rebuild_structure(self) -> None:
        t = self.t
        if t.flush_cache():  # qcow2_cache_empty
            t.cache = [_CacheSlot() for _ in range(_REFCOUNT_CACHE_ENTRIES)]
            t.lru_counter = 0
        reftable = array("Q")
        self._write_refblocks(0, self.nb_clusters, reftable)
        while True:
            clusters = -(-len(reftable) * 8 // t.cs)
            offset = self._alloc_imrt(clusters, [0])
            start = offset >> t.cluster_bits
            if not self._write_refblocks(start, start + clusters, reftable):
                break
        data = encode_be64(reftable)
        if t.overlap_check(0, offset, len(data)):
            raise _RebuildError("ERROR writing reftable", errno.EIO)
        t.pwrite(data, offset)
        t.pwrite(struct.pack(">QI", offset, clusters), 48)
        t.flush()
        t.hdr.refcount_table_offset = offset
        t.hdr.refcount_table_clusters = clusters
        t.set_reftable(offset, reftable)

    # --- check_oflag_copied -------------------------------------------------------------
    def check_oflag_copied(self) -> None:
        t = self.t
        res = self.res
        if self.fix & FIX_ERRORS:
            repair = True
        elif self.fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        # An L1 table may point at a few L2 tables thousands of times. Refcounts do not
        # change here, and what checking an L2 table printed holds until something is
        # written; both are remembered. Not asking the refcount cache is unnoticeable
        # once no cached block is dirty (an eviction would write it back).
        quiet = t.cache_clean()
        refcounts: dict[int, int] = {}

        def refcount_of(cluster: int) -> int:
            nonlocal quiet
            value = refcounts.get(cluster) if quiet else None
            if value is None:
                value = t.get_refcount(cluster)
                quiet = quiet or t.cache_clean()
                if len(refcounts) < _MAX_REMEMBERED_REFCOUNTS:
                    refcounts[cluster] = value
            return value

        tables: dict[int, tuple[list[str], int]] = {}
        writes = t.writes
        l1 = t.l1
        out = self.out
        for i in compress(range(len(l1)), l1):
            l1_entry = l1[i]
            l2_offset = l1_entry & S.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = refcount_of(l2_offset >> t.cluster_bits)
            except _RefcountReadError:
                continue
            if (refcount == 1) != bool(l1_entry & S.OFLAG_COPIED):
                res.corruptions += 1
                out.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} "
                           f"l1_entry={l1_entry:x} refcount={refcount}")
                if repair:
                    l1[i] = (l1_entry | S.OFLAG_COPIED if refcount == 1
                             else l1_entry & ~S.OFLAG_COPIED)
                    where = t.hdr.l1_table_offset + 8 * i
                    if t.overlap_check(_OL_ACTIVE_L1, where, 8):
                        res.check_errors += 1
                        raise _Abort(errno.EIO)
                    # QEMU syncs each entry; the entries are independent of each other
                    # and of the L2 writes here, so the flush at the end does for all.
                    t.pwrite(struct.pack(">Q", l1[i]), where)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if t.writes != writes:
                tables.clear()
                writes = t.writes
            known = tables.get(l2_offset) if quiet else None
            if known is not None:
                out.extend(known[0])
                res.corruptions += known[1]
                continue
            mark, corruptions = len(out), res.corruptions
            if (self._check_l2_copied(l2_offset, repair, word, refcount_of) and quiet
                    and t.writes == writes):
                tables[l2_offset] = (out[mark:], res.corruptions - corruptions)
        t.flush()

    def _check_l2_copied(self, l2_offset: int, repair: bool, word: str,
                         refcount_of: Callable[[int], int]) -> bool:
        """The data cluster part of check_oflag_copied for one L2 table; False if a refcount
        could not be read."""
        t = self.t
        res = self.res
        words = t.words
        data = t.pread(t.cs, l2_offset)
        if data == t.zero_cluster:
            return True
        complete = True
        table = decode_be64(data)
        dirty = 0
        for j in compress(range(t.l2_entries), table[::words]):
            entry = table[j * words]
            if (entry & S.OFLAG_COMPRESSED or not entry & S.L2E_OFFSET_MASK) \
                    and t.cluster_type(entry) not in (_NORMAL, _ZERO_ALLOC):
                continue
            if t.has_data_file:
                refcount = 1
            else:
                try:
                    refcount = refcount_of((entry & S.L2E_OFFSET_MASK) >> t.cluster_bits)
                except _RefcountReadError:
                    complete = False
                    continue
            if (refcount == 1) != bool(entry & S.OFLAG_COPIED):
                res.corruptions += 1
                self.out.append(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                f"refcount={refcount}")
                if repair:
                    table[j * words] = (entry | S.OFLAG_COPIED if refcount == 1
                                        else entry & ~S.OFLAG_COPIED)
                    dirty += 1
        if dirty:
            if t.overlap_check(_OL_ACTIVE_L2, l2_offset, t.cs):
                self.out.append(f"ERROR: Could not write L2 table; metadata overlap check "
                                f"failed: {os.strerror(errno.EIO)}")
                res.check_errors += 1
                raise _Abort(errno.EIO)
            t.pwrite(encode_be64(table), l2_offset)
            res.corruptions -= dirty
            res.corruptions_fixed += dirty
        return complete

    # --- qcow2_check_refcounts ----------------------------------------------------------
    def check_refcounts(self) -> _Result:
        t = self.t
        fix = self.fix
        self.nb_clusters = -(-t.file_size() // t.cs)
        if self.nb_clusters > _INT_MAX:
            self.res.check_errors += 1
            raise _Abort(errno.EFBIG)
        self.res.total_clusters = -(-(t.hdr.size // 512 * 512) // t.cs)
        self.calculate(fix)
        pre_compare = self.res.copy()
        highest = self.compare(0)
        if self.rebuild and fix & FIX_ERRORS:
            old = self.res.copy()
            fresh_leaks = 0
            self.out.append("Rebuilding refcount structure")
            try:
                self.rebuild_structure()
            except _RebuildError as exc:
                self.res.check_errors += 1
                self.out.append(f"{t.prog}: {exc.message}: {os.strerror(exc.errno)}")
                raise _Abort(exc.errno) from exc
            self.res.corruptions = 0
            self.res.leaks = 0
            self.rebuild = False
            self.imrt.clear()
            self.calculate(0)
            if fix & FIX_LEAKS:
                saved = self.res
                self.res = _Result()
                highest = self.compare(FIX_LEAKS)
                if self.rebuild:
                    self.out.append("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = self.res.leaks
                self.res = saved
            if self.res.corruptions < old.corruptions:
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions
            if self.res.leaks < old.leaks:
                self.res.leaks_fixed += old.leaks - self.res.leaks
            self.res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self.out.append("ERROR need to rebuild refcount structures")
                self.res.check_errors += 1
                raise _Abort(errno.EIO)
            if self.res.leaks or self.res.corruptions:
                self.res = pre_compare
                highest = self.compare(fix)
        self.check_oflag_copied()
        self.res.image_end_offset = (highest + 1) * t.cs
        return self.res


_COMPARE_STEP = 256  # clusters compared at once before looking at each


def _last_used(mine: list[int], theirs: list[int]) -> int:
    """The last index at which either list is non-zero, or -1."""
    for start in range((len(mine) - 1) // _COMPARE_STEP * _COMPARE_STEP, -1, -_COMPARE_STEP):
        stop = start + _COMPARE_STEP
        if any(mine[start:stop]) or any(theirs[start:stop]):
            for j in range(min(stop, len(mine)) - 1, start - 1, -1):
                if mine[j] or theirs[j]:
                    return j
    return -1


class _RebuildError(Exception):
    def __init__(self, message: str, err: int):
        super().__init__(message)
        self.message = message
        self.errno = err


def _co_check(t: _Target, fix: int) -> tuple[_Result, int]:
    """qcow2_co_check_locked: (result, 0) or (result, errno) when the check failed."""
    result = _Result()
    snapshot_res = _Result()
    check = _Check(t, fix)
    try:
        check.read_snapshot_table(snapshot_res)
    except _Abort as exc:
        result.add(snapshot_res, False)
        return result, exc.errno
    try:
        refcount_res = check.check_refcounts()
    except _Abort as exc:
        result.add(check.res, True)
        result.add(snapshot_res, False)
        return result, exc.errno
    result.add(refcount_res, True)
    try:
        check.fix_snapshot_table(snapshot_res)
    except _Abort as exc:
        result.add(snapshot_res, False)
        return result, exc.errno
    result.add(snapshot_res, False)
    if fix and not result.check_errors and not result.corruptions:
        features = t.hdr.incompatible_features
        if t.hdr.version >= 3:
            if features & S.INCOMPAT_DIRTY and not t.keep_dirty:
                t.flush_if_alive()
                features &= ~S.INCOMPAT_DIRTY
            features &= ~S.INCOMPAT_CORRUPT
            if features != t.hdr.incompatible_features:
                t.hdr.incompatible_features = features
                t.write_header_features()
    return result, 0


def _img_check(t: _Target, fix: int, report: CheckReport) -> CheckReport:
    """qemu-img's img_check around the driver's check, and the flush when it closes."""
    try:
        return _img_check_open(t, fix, report)
    finally:
        t.flush_if_alive()


def _img_check_open(t: _Target, fix: int, report: CheckReport) -> CheckReport:
    result, err = _co_check(t, fix)
    if not err and (result.corruptions_fixed or result.leaks_fixed):
        report.repaired = True
        leaks_fixed, corruptions_fixed = result.leaks_fixed, result.corruptions_fixed
        result, err = _co_check(t, 0)
        result.leaks_fixed, result.corruptions_fixed = leaks_fixed, corruptions_fixed
    if err:
        report.failed = True
        report.error = f"Check failed: {os.strerror(err)}"
        if report.repaired:
            report.leaks_fixed, report.corruptions_fixed = result.leaks_fixed, \
                result.corruptions_fixed
        return report
    for name in ("check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed",
                 "image_end_offset", "total_clusters", "allocated_clusters",
                 "fragmented_clusters", "compressed_clusters"):
        setattr(report, name, getattr(result, name))
    if report.check_errors:
        report.error = "Check failed"
    return report


# --- entry points ------------------------------------------------------------------------


def check_image(image, repair: str | None = None, prog: str = "qemu-img") -> CheckReport:
    """Check (and with repair="leaks"/"all" repair) an open Qcow2Image, as qemu-img check does.

    A repair needs the image opened read-write. The image's caches are written back first
    and reloaded afterwards, so it stays usable.
    """
    if repair not in _REPAIR_MODES:
        from .errors import InvalidArgumentError
        raise InvalidArgumentError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                                   f"{repair}")
    fix = _REPAIR_MODES[repair]
    report = CheckReport(filename=image.filename, format=getattr(image, "format", "qcow2"))
    if report.format != "qcow2":
        report.not_supported = True
        report.error = "This image format does not support checks"
        return report
    if fix and image.read_only:
        raise ReadOnlyError(f"repairing '{image.filename}' needs it opened read-write (mode 'r+')")
    with image._lock:
        if not image.read_only:
            image._write_back_all()
        t = _Target(image.file, image.header, image.filename, not image.read_only,
                    report.messages, prog)
        # The engine keeps the dirty bit set itself while a lazy-refcounts image is open.
        t.keep_dirty = bool(image.lazy_refcounts and not image.read_only)
        try:
            _img_check(t, fix, report)
        finally:
            if fix:
                _reload_engine_state(image)
    return report


def _reload_engine_state(image) -> None:
    """The repair wrote to the file behind the engine's back: reload what it caches."""
    hdr = image.header
    size = image.file.size()
    image._host_size = max(getattr(image, "_host_size", 0), size)
    image._last_decompressed = None
    image._prealloc_detected = None
    image._snapshot_table = None  # (a repair may rewrite it in place)
    image.corrupt = bool(hdr.incompatible_features & S.INCOMPAT_CORRUPT)
    image.map.l1 = decode_be64(image.file.pread(hdr.l1_size * 8, hdr.l1_table_offset)) \
        if hdr.l1_size else array("Q")
    image.map.l1_dirty.clear()
    image.map.l2_cache.clear()
    try:
        image.use_refcount_table(hdr.refcount_table_offset, hdr.refcount_table_clusters, size)
    except Qcow2Error:
        pass  # still broken (a check without "all" left it so): the engine will refuse writes


class _CheckModeHeader(Header):
    """The header as QEMU reads it for a check (BDRV_O_CHECK): tables are only checked
    for size and alignment (not against the file size), the snapshot table not at all,
    and a missing refcount table is allowed."""

    def _validate(self, file_size: int) -> None:
        saved = (self.nb_snapshots, self.refcount_table_clusters)
        self.nb_snapshots = 0
        if self.refcount_table_clusters == 0:
            self.refcount_table_clusters = 1
        try:
            super()._validate(file_size)
        finally:
            self.nb_snapshots, self.refcount_table_clusters = saved

    def _validate_table(self, name, field_name, offset, count_field, entries, entry_len,
                        max_bytes, file_size) -> None:
        if entries > max_bytes // entry_len:
            raise CorruptImageError(f"{name} too large ({count_field} {entries})")
        if _INT64_MAX - entries * entry_len < offset or offset % self.cluster_size:
            raise CorruptImageError(f"{name} offset invalid ({field_name} {offset})")


def check_path(filename: str, repair: str | None = None, fmt: str | None = None,
               force_share: bool = False, prog: str = "qemu-img") -> CheckReport:
    """`qemu-img check [-r leaks|all] [-f fmt] [-U] FILE`: open in check mode, check, report.

    Failing to open gives a report with `error` set and exit code 1, as qemu-img does.
    """
    from .hostfile import HostFile, open_host_file

    if repair not in _REPAIR_MODES:
        from .errors import InvalidArgumentError
        raise InvalidArgumentError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                                   f"{repair}")
    fix = _REPAIR_MODES[repair]
    report = CheckReport(filename=filename)
    if fmt is None:
        try:  # through HostFile, which refuses a FIFO instead of waiting for a writer
            probe = open_host_file(filename)
            try:
                magic = probe.pread(4, 0)
            finally:
                probe.close()
        except Qcow2Error as exc:
            report.failed = True
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            report.error = f"Could not open '{filename}': {reason}"
            return report
        fmt = "qcow2" if magic == S.QCOW_MAGIC.to_bytes(4, "big") else "raw"
    report.format = fmt
    if fmt != "qcow2":
        if fmt != "raw":
            report.failed = True
            report.error = f"Unknown driver '{fmt}'"
            return report
        report.not_supported = True
        report.error = "This image format does not support checks"
        return report
    try:
        file = HostFile(filename, writable=bool(fix))
    except Qcow2Error as exc:
        report.failed = True
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        report.error = f"Could not open '{filename}': {reason}"
        return report
    try:
        try:
            if hasattr(file, "lock_for_use"):
                file.lock_for_use(force_share)
            size = file.size()
            header = _CheckModeHeader.parse(lambda off, n: file.pread(n, off), size)
            _check_openable(filename, header)
        except Qcow2Error as exc:
            report.failed = True
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            report.error = f"Could not open '{filename}': {message}"
            return report
        t = _Target(file, header, filename, bool(fix), report.messages, prog)
        return _img_check(t, fix, report)
    finally:
        file.close()


def _check_openable(filename: str, header: Header) -> None:
    """What else makes QEMU's open fail: a missing external data file or backing file
    (and what qcow2lib refuses to open as one: a FIFO, socket or character device)."""
    from .errors import Qcow2IOError
    from .hostfile import refuse_special_file

    if header.incompatible_features & S.INCOMPAT_DATA_FILE:
        if not header.data_file:
            raise CorruptImageError("'data-file' is required for this image")
        # QEMU opens the name as the header has it: a relative one from the working directory.
        if not os.path.exists(header.data_file):
            raise Qcow2IOError(errno.ENOENT, f"Could not open '{header.data_file}': No such "
                                             f"file or directory")
        refuse_special_file(header.data_file, "external data file", filename)
    elif header.data_file:
        raise CorruptImageError("'data-file' can only be set for images with an external data "
                                "file")
    if header.backing_file:
        path = header.backing_file if os.path.isabs(header.backing_file) else \
            os.path.join(os.path.dirname(filename), header.backing_file)
        if not os.path.exists(path):
            raise Qcow2IOError(errno.ENOENT, f"Could not open backing file: Could not open "
                                             f"'{path}': No such file or directory")
        refuse_special_file(path, "backing file", filename)
