"""The reference walk (QEMU's calculate_refcounts): the snapshot table read tolerantly,
then every reference the metadata makes counted into the in-memory refcount table (IMRT):
header, active and snapshot L1/L2 tables, data and compressed clusters, snapshot table,
refcount table and blocks, encryption header, bitmaps; each L1/L2 entry checked on the way."""

from __future__ import annotations

import errno
import os
import struct
from array import array
from bisect import bisect_right
from itertools import chain, compress, islice, repeat
from operator import add, itemgetter, mul, or_

from .. import structs as S
from ..records import record
from ..cache import decode_be64
from ..runs import (
    RunFinder,
    differing_entries,
    nonzero_entries,
    nonzero_positions,
    runs_of_used,
)
from ..sizes import c_hex
from .report import FIX_ERRORS, _Abort, _Result
from .target import (
    _CHUNK_BITS,
    _CHUNK_MASK,
    _COMPRESSED,
    _INT64_MAX,
    _INT_MAX,
    _NORMAL,
    _MAX_SNAPSHOTS_SIZE,
    _SNAPSHOT_EXTRA_SIZE,
    _UNALLOCATED,
    _ZERO_ALLOC,
    _CheckState,
    _Snapshot,
)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterable, Iterator
    from typing import TypeVar

    _K = TypeVar("_K", bound=Hashable)

    def _count_elements(counts: dict[_K, int], items: Iterable[_K]) -> None: ...

else:  # (Counter's own counting loop, in C, without importing collections at start-up)
    from _collections import _count_elements


def _counts(items: Iterable[_K]) -> dict[_K, int]:
    """How often each item occurs (collections.Counter's counts, as a plain dict)."""
    counts: dict[_K, int] = {}
    _count_elements(counts, items)
    return counts


_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
_first_of, _count_of = itemgetter(0), itemgetter(1)  # (of a run: first offset, count, tops)
_first_and_count = itemgetter(0, 1)
# A snapshot's L2 table whose bytes differ from those of the table at the same place of the
# L1 table walked before in at most this many entries has its runs found from that one's;
# the tables kept for that, one per place, take at most this many bytes.
_NEAR_ENTRIES = 64
_NEAR_BYTES = 16 << 20
_NEAR_SCAN = 4096  # runs looked through one by one for the clusters cut out, at most
_BE64 = struct.Struct(">Q")
_BELOW_TOP_BYTE = (1 << 56) - 1
_MAX_REMEMBERED_RUNS = 1 << 16  # runs of L2 tables kept between the walk and compare
_MAX_L1_ENTRIES = S.MAX_L1_BYTES // 8
_BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
_BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

# A repair growing the file past this many clusters fails with ENOMEM, as QEMU's does when
# its in-memory refcount array (GiBs by then) cannot be allocated.
_MAX_IMRT_CLUSTERS = 1 << 29


def _used_entries(table: array, words: int) -> Iterator[int]:
    """Indices of the L2 entries that are not all zeros (entry and extended bitmap): a
    table past the end of the file, or a mostly empty one, is then skipped at C speed."""
    if words == 1:
        return iter(nonzero_positions(table))
    return compress(range(len(table) // 2), map(or_, table[::2], table[1::2]))


@record
class _Replay:
    """What checking one L1 entry did, to do it again for the same entry without re-reading
    its L2 table: the lines printed, the change of each counter, and the clusters counted.

    An L1 table may point at the same L2 table thousands of times (at itself, or into a
    data cluster repeating one entry), which QEMU re-reads each time in C."""

    messages: list[str]
    counters: list[tuple[str, int]]
    increments: list[tuple[int, int]]  # (cluster, times counted)
    depth: int  # the most times one cluster was counted
    pending: int = 0  # repeats whose increments are not in the IMRT yet


_MAX_COUNTED_L1_ENTRIES = 1 << 16  # L1 entries looked at for repeats, per L1 table
_MIN_DEFER_HEADROOM = 1024  # refcounts this far below the maximum allow deferred increments


def _drop_top_byte(packed: bytearray) -> None:
    """Clear COPIED, the only bit left in the top byte of plain L2 entries."""
    packed[0::8] = bytes(len(packed) // 8)


class _NearTable:
    """A plain L2 table as _Walk._near_copy_runs compares the next at its place with: its
    bytes, the unusual-bits mask it was found plain under, its runs, and how many runs the
    last table found whole there had."""

    __slots__ = ("data", "unusual", "runs", "whole_runs", "_by_first", "_firsts")

    def __init__(self, data: bytes, unusual: int, runs: list, whole_runs: int) -> None:
        self.data, self.unusual, self.runs, self.whole_runs = data, unusual, runs, whole_runs
        self._by_first: list[int] = []
        self._firsts: list[int] = []

    def run_holding(self, host: int, cs: int, lookups: int) -> int | None:
        """The index of a run holding the cluster at `host`, one of `lookups`: looked for
        run by run while that costs less than sorting the runs by their first cluster
        once, then through them so sorted."""
        runs = self.runs
        if not self._by_first and lookups * len(runs) > _NEAR_SCAN:
            self._by_first = sorted(range(len(runs)), key=lambda i: runs[i][0])
            self._firsts = [runs[i][0] for i in self._by_first]
        if not self._by_first:
            return next(
                (i for i, (first, count, _) in enumerate(runs) if 0 <= host - first < count * cs),
                None,
            )
        at = bisect_right(self._firsts, host) - 1  # (the last run to start at or before it)
        if at < 0 or host - self._firsts[at] >= runs[self._by_first[at]][1] * cs:
            return None
        return self._by_first[at]


class _Walk(_CheckState):
    """The reference walk and the IMRT it counts into (a mixin of _Check)."""

    # Its own state (see _Check.__init__), and the repair it calls (see _Repair).
    _recorded: list[int] | None
    _overflowed: bool
    _pending: list[_Replay]
    _spent: int
    _bound: int
    _deferring: bool
    _times: int
    _overflows: int
    _l1_entries: tuple | None
    # the plain-table fast path's memory (see _Check.__init__)
    _plain_mask: tuple[int | None, list[tuple[int, bytes]]]
    _plain_cache: dict[tuple, list | None]
    _plain_cached: int
    _run_finder: RunFinder
    _l1_slot: int | None
    _near_tables: dict[int, _NearTable]
    # snapshots' shared L2 tables counted at the end (see _defer_table)
    _sharing_tables: bool
    _table_uses: dict[int, int]
    _table_runs: dict[int, list]
    _table_runs_held: int
    _tables_deferred: int
    _fix_l2_entry_by_zero: Callable[[int, array, int, bool], bool]

    # --- the IMRT ---------------------------------------------------------------------
    def inc(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt."""
        if size <= 0:
            return
        t = self.t
        if offset + size - t.file_size() >= t.cs:
            self.out.append(
                f"ERROR: counting reference for region exceeding the end of the "
                f"file by one cluster or more: offset {offset:#x} size {size:#x}"
            )
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
                    self._report_overflow(base + position)
                    continue
                chunk[position] = value + times
            cluster = stop

    def _report_overflow(self, cluster: int) -> None:
        """A cluster counted once more than its refcount width can hold."""
        self.out.append(f"ERROR: overflow cluster offset={cluster << self.t.cluster_bits:#x}")
        self.out.append(
            "Use qemu-img amend to increase the refcount entry width "
            "or qemu-img convert to create a clean copy if the image "
            "cannot be opened for writing"
        )
        self.res.corruptions += 1
        self._overflowed = True
        self._overflows += 1

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
        counters = [
            (name, getattr(res, name) - value)
            for name, value in zip(_Result.__slots__, before)
            if getattr(res, name) != value
        ]
        counts = _counts(clusters)
        return _Replay(
            self.out[mark:], counters, list(counts.items()), max(counts.values(), default=0)
        )

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
                self.out.append(
                    f"You can force-remove all {nb_snapshots - S.MAX_SNAPSHOTS} "
                    f"overhanging snapshots with qemu-img check -r all"
                )
            raise _Abort(err)
        snapshots: list[_Snapshot] = []
        offset = snapshots_offset
        table_length = 0
        failure = None
        for i in range(nb_snapshots):
            pre_offset = offset
            table_length = -(-table_length // 8) * 8
            offset = -(-offset // 8) * 8
            (
                l1_offset,
                l1_size,
                id_size,
                name_size,
                date_sec,
                date_nsec,
                vm_clock,
                vm_state,
                extra_size,
            ) = struct.unpack(">QIHHIIQII", t.pread(40, offset))
            offset += 40
            truncate_extra = False
            if extra_size > S.MAX_SNAPSHOT_EXTRA_DATA:
                if not repair:
                    failure = (
                        errno.EFBIG,
                        f"Too much extra metadata in snapshot table entry {i}",
                        "You can force-remove this extra metadata with qemu-img check -r all",
                    )
                    break
                self.out.append(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra_size} > {S.MAX_SNAPSHOT_EXTRA_DATA})"
                )
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
                    failure = (
                        errno.EFBIG,
                        "Snapshot table is too big",
                        f"You can force-remove all {nb_snapshots - i} overhanging "
                        f"snapshots with qemu-img check -r all",
                    )
                    break
                self.out.append(
                    f"Discarding {nb_snapshots - i} overhanging snapshots (snapshot "
                    f"table is too big)"
                )
                reduced += nb_snapshots - i
                offset = pre_offset
                break
            snapshots.append(
                _Snapshot(
                    l1_offset,
                    l1_size,
                    id_str,
                    name,
                    vm_state,
                    date_sec,
                    date_nsec,
                    vm_clock,
                    extra_size,
                    disk_size,
                    icount,
                    unknown,
                )
            )
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
                    self.out.append(
                        f"{'Repairing' if repair else 'ERROR'} snapshot table entry "
                        f"{i} is incomplete"
                    )

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
            # (zero entries out before decoding: an entry is zero in either byte order)
            raw = array("Q", t.pread(l1_size * 8, l1_offset))
            entries = decode_be64(nonzero_entries(raw).tobytes())
            counts = _counts(islice(entries, _MAX_COUNTED_L1_ENTRIES))
            repeated = {entry for entry, count in counts.items() if count > 1}
            self._l1_entries = (key, t.writes, entries, repeated)
        replays: dict[int, _Replay] = {}
        writes = t.writes
        self._deferring = True
        try:
            for slot, entry in enumerate(entries):
                self._l1_slot = None if frag else slot
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
            self._l1_slot = None
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
            self.out.append(
                f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            )
            self.res.corruptions += 1
        self.check_l2(l2_offset, frag, active)

    def check_l2(self, l2_offset: int, frag: bool, active: bool) -> None:
        """check_refcounts_l2."""
        t = self.t
        res = self.res
        cs = t.cs
        words = t.words
        if l2_offset >= t.file_size():
            return  # (reads as zeros: nothing in it)
        data = t.pread(cs, l2_offset)
        if data == t.zero_cluster:
            return
        next_contiguous = 0
        fix_errors = bool(self.fix & FIX_ERRORS)
        unusual = self._l2_unusual_bits()
        count_data = not t.has_data_file
        if words == 1 and self._count_plain_l2(data, l2_offset, unusual, frag, count_data):
            return
        table = decode_be64(data)
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
                    self.out.append(
                        f"ERROR: coffset={entry & t.cluster_offset_mask:#x}: copied "
                        f"flag must never be set for compressed clusters"
                    )
                    entry &= ~S.OFLAG_COPIED
                    res.corruptions += 1
                if t.has_data_file:
                    self.out.append(
                        f"ERROR compressed cluster {i} with data file, entry={entry:#x}"
                    )
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.out.append(
                        f"ERROR compressed cluster {i} with non-zero subcluster "
                        f"allocation bitmap, entry={entry:#x}"
                    )
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
                    self.out.append(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                        f"subcluster allocation bitmap"
                    )
                if offset & (cs - 1):
                    res.corruptions += 1
                    if t.extended:
                        contains_data = bool(bitmap & _L2_BITMAP_ALL_ALLOC)
                    else:
                        contains_data = not entry & S.OFLAG_ZERO
                    if not contains_data:
                        self.out.append(
                            f"{'Repairing' if fix_errors else 'ERROR'} "
                            f"offset={offset:x}: Preallocated cluster is not properly "
                            f"aligned; L2 entry corrupted."
                        )
                        if fix_errors:
                            if self._fix_l2_entry_by_zero(l2_offset, table, i, active):
                                continue
                    else:
                        self.out.append(
                            f"ERROR offset={offset:x}: Data cluster is not properly "
                            f"aligned; L2 entry corrupted."
                        )
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
                    self.out.append(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                    )

    def _l2_unusual_bits(self) -> int:
        """The bits of a standard L2 entry that only compressed, zero, misaligned or
        corrupt entries have: entries with none of them are plain aligned data clusters."""
        t = self.t
        return (
            S.OFLAG_COMPRESSED
            | S.L2E_STD_RESERVED_MASK
            | (t.cs - 1) & S.L2E_OFFSET_MASK
            | (0 if t.extended else S.OFLAG_ZERO)
        )

    def _plain_runs(
        self, data: bytes, unusual: int, l2_offset: int
    ) -> list[tuple[int, int, bytes]] | None:
        """An L2 table (one word per entry) whose used entries are all plain aligned data
        clusters, as runs of contiguous host clusters in table order, unused entries
        skipped: (first host offset, clusters, the top byte of each entry: its COPIED
        flag). None for any other table. The walk and the COPIED check both ask for the
        active tables: the last answers are kept until the next write."""
        key = (l2_offset, self.t.writes, unusual)
        if key in self._plain_cache:
            return self._plain_cache[key]
        if self._plain_mask[0] != unusual:
            allowed_bytes = []  # per byte of an entry: the values without unusual bits
            for position in range(8):
                bits = (unusual >> (56 - 8 * position)) & 0xFF
                if bits:
                    allowed_bytes.append(
                        (position, bytes(value for value in range(256) if not value & bits))
                    )
            self._plain_mask = (unusual, allowed_bytes)
        slot = self._l1_slot
        if slot is not None:  # (a snapshot's table: most are near copies of one before)
            runs = self._near_copy_runs(data, unusual, slot)
            if runs is not None:
                return self._remember_plain(key, runs)
        used = nonzero_entries(array("Q", data)).tobytes()  # (zero in either byte order)
        for position, allowed in self._plain_mask[1]:
            if used[position::8].translate(None, allowed):
                return self._remember_plain(key, None)  # (an entry with bits to look at)
        runs = runs_of_used(self._run_finder, used, self.t.cs, _drop_top_byte)
        if sum(map(_count_of, runs)) * 8 != len(used):  # (entries of flags only left out)
            if sum(tops.count(0x80) for _, _, tops in runs) != used[0::8].count(0x80):
                return self._remember_plain(key, None)  # (COPIED on one without an offset)
        if slot is not None:
            self._remember_near(slot, data, unusual, runs)
        return self._remember_plain(key, runs)

    def _near_copy_runs(self, data: bytes, unusual: int, slot: int) -> list | None:
        """_plain_runs of a table from those of the plain table met last at the same place
        of an L1 table (`slot`: the index among its entries), when the two differ in at
        most _NEAR_ENTRIES entries, as a snapshot's table and the copy-on-write copy made
        of it do: the old entries' clusters cut out of the runs holding them, the new ones
        added as runs of their own. The runs then come in no particular order (only the
        active walk's fragmentation count asks for table order, and it finds its runs
        itself). None where that does not hold, or any changed entry is not plain."""
        near = self._near_tables.get(slot)
        if near is None or near.unusual != unusual or len(near.data) != len(data):
            return None
        base, base_runs = near.data, near.runs
        positions = differing_entries(base, data, _NEAR_ENTRIES)
        if positions is None:
            return None
        if not positions:
            return base_runs
        cs = self.t.cs
        cut_out = []  # the old entries' clusters
        added = []
        for index in positions:
            old, new = _BE64.unpack_from(base, 8 * index)[0], _BE64.unpack_from(data, 8 * index)[0]
            if new & unusual or (new & S.OFLAG_COPIED and not new & _BELOW_TOP_BYTE):
                return None  # (an entry to look at, or COPIED without an offset)
            if old & _BELOW_TOP_BYTE:
                cut_out.append(old & _BELOW_TOP_BYTE)
            if new & _BELOW_TOP_BYTE:
                added.append((new & _BELOW_TOP_BYTE, 1, bytes((new >> 56,))))
        cuts: dict[int, list[int]] = {}  # index of a base run -> the clusters cut out of it
        for host in cut_out:
            at = near.run_holding(host, cs, len(cut_out))
            if at is None:
                return None
            cuts.setdefault(at, []).append(host)
        runs = list(base_runs)
        for at in sorted(cuts, reverse=True):  # (from the last: the indices before hold)
            first, count, tops = base_runs[at]
            hosts = sorted(cuts[at])
            if len(set(hosts)) != len(hosts):
                return None  # (one cluster named twice: the whole-table way counts it)
            pieces = []  # those between the clusters cut out, by index in the run
            start = 0
            for stop in [(host - first) // cs for host in hosts] + [count]:
                if stop > start:
                    pieces.append((first + start * cs, stop - start, tops[start:stop]))
                start = stop + 1
            runs[at : at + 1] = pieces
        runs += added
        if len(runs) <= 2 * near.whole_runs + _NEAR_ENTRIES:  # (the next compared with this)
            self._near_tables[slot] = _NearTable(data, unusual, runs, near.whole_runs)
        else:  # (scattered enough: the next at this place is found whole)
            del self._near_tables[slot]
        return runs

    def _remember_near(self, slot: int, data: bytes, unusual: int, runs: list) -> None:
        """Keep a plain table found whole as the one _near_copy_runs compares the next at
        `slot` with (a table's bytes for each slot, up to _NEAR_BYTES in all). A table
        found from one takes its place, until its runs, cut and added to at each step, are
        twice as many as the whole table's and _NEAR_ENTRIES more."""
        if slot not in self._near_tables and len(self._near_tables) * len(data) >= _NEAR_BYTES:
            return
        self._near_tables[slot] = _NearTable(data, unusual, runs, len(runs))

    def _known_plain_runs(self, unusual: int, l2_offset: int) -> list | None:
        """_plain_runs of a table as last found, if it was plain and nothing was written
        since; None if that is not known."""
        return self._plain_cache.get((l2_offset, self.t.writes, unusual))

    def _remember_plain(self, key: tuple, runs: list | None) -> list | None:
        size = 1 + len(runs or ())
        if self._plain_cached + size > _MAX_REMEMBERED_RUNS:
            self._plain_cache.clear()
            self._plain_cached = 0
        if size <= _MAX_REMEMBERED_RUNS:
            self._plain_cache[key] = runs
            self._plain_cached += size
        return runs

    def _count_plain_l2(
        self, data: bytes, l2_offset: int, unusual: int, frag: bool, count_data: bool
    ) -> bool:
        """check_l2 for the usual table, whose used entries all point at aligned data
        clusters inside the file: the same counters and increments, counted run by run of
        contiguous clusters instead of entry by entry. False (nothing done) for any other
        table, which the entry-by-entry walk then checks."""
        t = self.t
        runs = self._plain_runs(data, unusual, l2_offset)
        if runs is None:
            return False
        if not runs:
            return True
        cluster_bits = t.cluster_bits
        times = self._times
        used = sum(map(_count_of, runs))  # (at C speed: a fragmented table has hundreds)
        last_offset = max(
            map(add, map(_first_of, runs), map(mul, map(_count_of, runs), repeat(t.cs)))
        )
        last_offset -= t.cs
        if count_data:
            if last_offset >= t.file_size():
                return False  # (inc reports clusters past the end one by one)
            if self._pending and self._bound + self._spent + used * times > t.refcount_max:
                return False  # (the deferred increments are applied on the way there)
        if frag:
            res = self.res
            res.allocated_clusters += used
            next_contiguous = runs[0][0]
            for first, count, _ in runs:
                if first != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = first + count * t.cs
        if not count_data:
            return True
        if self._sharing_tables and not frag and self._recorded is None:
            if last_offset >> cluster_bits >= self.nb_clusters:
                self.nb_clusters = (last_offset >> cluster_bits) + 1
            self._defer_table(l2_offset, runs, times)
            return True
        if self._pending:
            self._spent += used * times
        if last_offset >> cluster_bits >= self.nb_clusters:
            self.nb_clusters = (last_offset >> cluster_bits) + 1
        for first, count, _ in runs:
            cluster = first >> cluster_bits
            if self._recorded is not None:
                self._recorded.extend(range(cluster, cluster + count))
            self._add_run(cluster, cluster + count, times)
        return True

    def _defer_table(self, l2_offset: int, runs: list[tuple[int, int, bytes]], times: int) -> None:
        """Count a snapshot's plain L2 table later, with every other use of it: snapshots
        share most of their L2 tables, and copies of one table most of their runs, so the
        clusters of each distinct run are counted once, however many tables hold it."""
        held = self._table_runs.get(l2_offset)
        if held is not runs:
            if held is not None or self._table_runs_held + len(runs) > _MAX_REMEMBERED_RUNS:
                self._count_deferred_tables()
            self._table_runs[l2_offset] = runs
            self._table_runs_held += len(runs)
        self._table_uses[l2_offset] = self._table_uses.get(l2_offset, 0) + times
        self._tables_deferred += 1

    def _count_deferred_tables(self) -> None:
        """Count the clusters of the tables _defer_table put aside. Refcounts only add up,
        so the order changes no total; an overflow makes calculate walk again in QEMU's
        order (sharing off), which reports it where QEMU does."""
        if not self._table_uses:
            return
        self._apply_pending()  # (their bound did not include these increments)
        cluster_bits = self.t.cluster_bits
        tables_used: dict[int, list[int]] = {}  # uses -> the tables used that often
        for l2_offset, uses in self._table_uses.items():
            tables_used.setdefault(uses, []).append(l2_offset)
        uses_of_run: dict[tuple[int, int], int] = {}
        for uses, tables in tables_used.items():
            # the runs (first host offset, clusters) of all of them, counted at C speed
            found = _counts(
                chain.from_iterable(
                    map(_first_and_count, self._table_runs[table]) for table in tables
                )
            )
            for (first, count), tables_holding in found.items():
                key = (first >> cluster_bits, count)
                uses_of_run[key] = uses_of_run.get(key, 0) + tables_holding * uses
        self._table_uses.clear()
        self._table_runs.clear()
        self._table_runs_held = 0
        for (cluster, count), uses in uses_of_run.items():
            self._add_run(cluster, cluster + count, uses)

    def _add_run(self, cluster: int, stop: int, times: int) -> None:
        """Count clusters [cluster, stop) `times` more, reporting any that overflows."""
        limit = self.t.refcount_max
        typecode = self.imrt.typecode
        while cluster < stop:
            chunk = self.imrt.chunk(cluster >> _CHUNK_BITS)
            base = cluster & ~_CHUNK_MASK
            end = min(stop, base + _CHUNK_MASK + 1)
            low, high = cluster - base, end - base
            values = chunk[low:high]
            value = values[0]
            if values == array(typecode, [value]) * (high - low) and value + times <= limit:
                chunk[low:high] = array(typecode, [value + times]) * (high - low)
            elif max(values) + times <= limit:
                chunk[low:high] = array(typecode, [value + times for value in values])
            else:
                for position in range(low, high):
                    if chunk[position] + times > limit:
                        self._report_overflow(base + position)
                    else:
                        chunk[position] += times
            cluster = end

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
            del self.out[start[0] :]
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
        meanwhile, so every walk would see the same), and the plain L2 tables the snapshots
        share are counted once per distinct run (_defer_table). Returns whether either
        happened."""
        t = self.t
        keys = [
            None
            if sn.l1_table_offset & (t.cs - 1) or sn.l1_size > _MAX_L1_ENTRIES
            else (sn.l1_table_offset, sn.l1_size)
            for sn in t.snapshots
        ]
        uses = _counts(filter(None, keys)) if shared else {}
        self._sharing_tables, self._tables_deferred = shared, 0
        try:
            repeats = self._walk_snapshots(keys, uses)
        finally:
            self._sharing_tables = False
            self._count_deferred_tables()
        return bool(repeats) or self._tables_deferred > 0

    def _walk_snapshots(
        self, keys: list[tuple[int, int] | None], uses: dict[tuple[int, int], int]
    ) -> dict[tuple[int, int], int]:
        """_check_snapshots' walk; returns how often each L1 table walked once was reused."""
        t = self.t
        recorded: dict[tuple[int, int], tuple[int, list[str], list[tuple[str, int]]]] = {}
        repeats: dict[tuple[int, int], int] = {}
        for sn, key in zip(t.snapshots, keys):
            if key is None:
                self._report_bad_snapshot(sn)
                continue
            replay = recorded.get(key)
            if replay is not None and replay[0] == t.writes:
                self.out.extend(replay[1])
                self._add_counters(replay[2], 1)
                repeats[key] = repeats.get(key, 0) + 1
                continue
            if uses.get(key, 0) < 2:
                self.check_l1(*key, False, False)
                continue
            mark = len(self.out)
            before = [getattr(self.res, name) for name in _Result.__slots__]
            state = (t.writes, t.signaled_corruption, self._overflows)
            self.check_l1(*key, False, False)
            if (t.writes, t.signaled_corruption, self._overflows) == state:
                recorded[key] = (
                    t.writes,
                    self.out[mark:],
                    [
                        (name, getattr(self.res, name) - value)
                        for name, value in zip(_Result.__slots__, before)
                        if getattr(self.res, name) != value
                    ],
                )
        out, res = self.out, self.res
        try:
            self.out, self.res = [], _Result()  # (lines and counters repeated above)
            for key, times in repeats.items():
                self._times = times
                self.check_l1(*key, False, False)
        finally:
            self.out, self.res, self._times = out, res, 1
        return repeats

    def _report_bad_snapshot(self, sn: _Snapshot) -> None:
        """A snapshot table entry whose L1 table cannot be walked."""
        t = self.t
        sid = sn.id_str.decode("utf-8", "replace")
        sname = sn.name.decode("utf-8", "replace")
        if sn.l1_table_offset & (t.cs - 1):
            self.out.append(
                f"ERROR snapshot {sid} ({sname}) l1_offset="
                f"{c_hex(sn.l1_table_offset)}: L1 table is not cluster "
                f"aligned; snapshot table entry corrupted"
            )
        else:
            self.out.append(
                f"ERROR snapshot {sid} ({sname}) l1_size="
                f"{c_hex(sn.l1_size)}: L1 table is too large; snapshot "
                f"table entry corrupted"
            )
        self.res.corruptions += 1

    def _count_bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts (bitmaps count only with the autoclear bit set)."""
        t = self.t
        if not t.hdr.autoclear_features & S.AUTOCLEAR_BITMAPS:
            return
        from ..bitmaps import bitmaps_extension  # (here: most images have no bitmaps)

        info = bitmaps_extension(t.hdr)
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
                if (
                    value & _BME_TABLE_ENTRY_RESERVED_MASK
                    or offset
                    and (value & _BME_TABLE_ENTRY_FLAG_ALL_ONES or offset % t.cs)
                ):
                    # bitmap_table_load refuses the whole table
                    self.res.corruptions += 1
                    raise _Abort(errno.EINVAL)
            for value in table:
                offset = value & S.BITMAP_TABLE_OFFSET_MASK
                if offset:
                    self.inc(offset, t.cs)

    def _bitmap_directory(self, info):
        """bitmap_list_load: the directory entries, or None where QEMU refuses the list."""
        from ..bitmaps import parse_entry_head

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
            entry = parse_entry_head(directory, pos)
            step = S.BITMAP_DIRECTORY_ENTRY_SIZE + entry.extra_data_size + entry.name_size
            step += -step % 8
            if pos + step > size or entry.extra_data_size:
                return None
            phys = entry.bitmap_table_size * t.cs
            if (
                entry.bitmap_table_size == 0
                or entry.bitmap_table_offset == 0
                or entry.bitmap_table_offset % t.cs
                or entry.bitmap_table_size > 0x8000000
                or not 9 <= entry.granularity_bits <= 31
                or entry.flags & 0xFFFFFFFC
                or entry.name_size > 1023
                or entry.type != 1
                or phys > 0x20000000
                or (not entry.flags & 1 and t.hdr.size > (phys * 8) << entry.granularity_bits)
            ):
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
        reftable = t.reftable
        # A zero entry (no block) needs nothing: only the others are looked at, which
        # keeps a mostly empty table from costing a Python step per entry.
        for i in compress(range(len(reftable)), reftable):
            entry = reftable[i]
            offset = entry & S.REFT_OFFSET_MASK
            cluster = offset >> t.cluster_bits
            if entry & S.REFT_RESERVED_MASK:
                self.out.append(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.out.append(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table "
                    f"entry corrupted"
                )
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                res.corruptions += 1
                fixing = bool(self.fix & FIX_ERRORS)
                self.out.append(
                    f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image"
                )
                if fixing and offset > (1 << 63) - 1 - cs:
                    # a file that long cannot exist (QEMU refuses with EINVAL, silently)
                    self.rebuild = True
                    self.out.append(f"ERROR could not resize image: {os.strerror(errno.EINVAL)}")
                elif fixing:
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
