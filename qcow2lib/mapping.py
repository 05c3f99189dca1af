"""Guest offsets to host runs: the L1 table, L2 tables and the meaning of their entries.

`lookup` turns a guest range into a short list of `Segment`s (contiguous host runs,
zero runs, runs the backing file answers, compressed clusters), walking each L2 table
once per request. Entries are validated as they are read: an entry that points outside
the file, is misaligned or has reserved bits set raises CorruptImageError.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from itertools import chain, compress, repeat
from operator import sub

from . import structs as S
from .cache import TableCache, decode_be64, encode_be64
from .errors import CorruptImageError, InvalidArgumentError, SignaledCorruptionError
from .runs import (
    NativeRunLength,
    allowed_bytes,
    is_64k_cluster_run,
    column_flags,
    lane_ones,
    lane_ramp,
    lanes,
    nonzero_positions,
    one_positions,
    used_entry_runs,
)
from .segment import BACKING, COMPRESSED, DATA, ZERO, Segment, new_segments
from .sizes import c_hex

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence

_new_tuple = tuple.__new__  # (a Segment from its 6 values, without Segment.__new__'s frame)


class ClusterMap:
    """The active L1 table and the L2 tables under it."""

    def __init__(self, file, header, data_file_size, cache_bytes: int = 32 << 20):
        self.file = file
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        self.version = header.version
        self.entry_words = 2 if self.extended else 1
        self.l2_entries = header.l2_entries
        # guest offset >> l1_shift: its L1 index (l2_entries is a power of two)
        self.l1_shift = self.cluster_bits + self.l2_entries.bit_length() - 1
        self.subcluster_size = (
            self.cluster_size // S.SUBCLUSTERS if self.extended else self.cluster_size
        )
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.compressed_offset_mask = (1 << self.csize_shift) - 1
        self.has_data_file = bool(header.incompatible_features & S.INCOMPAT_DATA_FILE)
        self.data_file_size = data_file_size  # callable: size of the file data clusters live in
        self.l1_table_offset = header.l1_table_offset
        self.l1 = (
            decode_be64(file.pread(header.l1_size * 8, header.l1_table_offset))
            if header.l1_size
            else array("Q")
        )
        self.l1_dirty: set[int] = set()
        self.l2_cache = TableCache(self._load_l2, max(16, cache_bytes // self.cluster_size))
        # (key, entries, segments, guest offset of the table, length of its last segment)
        # of the last whole table classified
        self._last_table: tuple | None = None
        # The image file's size as this lookup found it (None: not asked yet). A lookup runs
        # under the image's lock, so nothing grows the file during one; asking once spares
        # an fstat per compressed cluster.
        self._lookup_file_size: int | None = None
        # Set during a block-status lookup (lookup_window(status=True)): a data cluster past
        # the end of the file is reported, not refused, as QEMU's map reports it.
        self._status_lookup = False
        # Fixed metadata no table entry may point into: header, L1 table, refcount table.
        self.metadata = [
            (0, self.cluster_size, "the image header"),
            (header.l1_table_offset, header.l1_table_offset + header.l1_size * 8, "the L1 table"),
            (
                header.refcount_table_offset,
                header.refcount_table_offset + header.refcount_table_clusters * self.cluster_size,
                "the refcount table",
            ),
        ]

    def set_refcount_table(self, offset: int, clusters: int) -> None:
        self.metadata[2] = (offset, offset + clusters * self.cluster_size, "the refcount table")

    def check_no_overlap(self, offset: int, length: int, what: str) -> None:
        """CorruptImageError if [offset, offset+length) overlaps fixed metadata."""
        for start, end, name in self.metadata:
            if offset < end and start < offset + length:
                raise CorruptImageError(f"{what} at offset 0x{offset:x} overlaps {name}")

    # --- L1 / L2 access -----------------------------------------------------------------

    def l2_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for l1_index (0 if unallocated), validated."""
        entry = self.l1[l1_index]
        offset = entry & S.L1E_OFFSET_MASK
        if entry & S.L1E_RESERVED_MASK:
            raise CorruptImageError(f"L1 entry {l1_index} has reserved bits set (0x{entry:016x})")
        if offset % self.cluster_size:
            raise SignaledCorruptionError(
                f"L2 table offset {c_hex(offset)} unaligned (L1 index: {c_hex(l1_index)})"
            )
        return offset

    def _load_l2(self, offset: int) -> array:
        return decode_be64(self._read_l2(offset))

    def _read_l2(self, offset: int) -> bytes:
        """The bytes of the L2 table at `offset`, its place checked first."""
        if offset == 0 or offset + self.cluster_size > self.file.size():
            raise CorruptImageError(
                f"L2 table offset 0x{offset:x} lies outside the image file "
                f"({self.file.size()} bytes)"
            )
        self.check_no_overlap(offset, self.cluster_size, "L2 table")
        blkdebug = getattr(self.file, "blkdebug", None)
        if blkdebug is not None:  # (a blkdebug node beneath: its rules may fail the read)
            blkdebug.event("l2_load")
        return self.file.pread(self.cluster_size, offset)

    def l2_table(self, l1_index: int) -> array | None:
        offset = self.l2_offset(l1_index)
        return self.l2_cache.get(offset) if offset else None

    def _classify_raw_runs(self, segments: list[Segment], raw: bytes, base: int) -> bool:
        """_classify_plain_range's case of whole runs for a whole standard table of 64 KiB
        clusters as read (big-endian entries), from guest cluster `base`, in a block-status
        walk (where data past the end of the file is no error): True (its segments added)
        when the table is one run of plain data clusters one after the other, or a sparse
        table of at most _RAW_RUNS_MAX runs of non-zero entries, all plain data clusters,
        none lying in the metadata QEMU checks. Only those runs' bytes are looked at (a
        sparse table of a large disk holds a few of its 8192 entries; decoding it whole is
        most of its cost). False (nothing done) for any other table."""
        entries = self.l2_entries
        if (
            self.cluster_bits != 16
            or self.extended
            or self.has_data_file
            or entries < _PLAIN_MIN_ENTRIES
        ):
            return False
        used = used_entry_runs(raw, _RAW_RUNS_MAX)
        if used is None:  # (a denser table: classified here only if it is one run)
            used = [(0, entries)]
        unusual = _plain_unusual_bits(self.cluster_bits)
        spans = self._metadata_spans()
        metadata_end = max((end for _, end in spans), default=0)
        runs = []  # (first entry, end entry, host offset) of each run of clusters
        for first, end in used:
            count = end - first
            if count == entries:  # (a full table: told one run from its bytes, at C speed)
                # (its top bytes are not compared as a run: each is checked for flags)
                [(_, top_values)] = allowed_bytes(unusual & ~_BELOW_TOP_BYTE)
                tops = raw[0::8]
                if tops.translate(None, top_values) or not is_64k_cluster_run(
                    raw, entries, tops, "big"
                ):
                    return False
                pieces = [(0, count, int.from_bytes(raw[:8], "big"))]
            else:  # the entries of a sparse table's run, split where a cluster run breaks
                words = struct.unpack_from(f">{count}Q", raw, 8 * first)
                head, tail = words[0], words[-1]
                if tail - head == (count - 1) << 16 and words == tuple(
                    range(head, tail + 1, 1 << 16)
                ):
                    pieces = [(0, count, head)]
                else:
                    cuts = [k for k in range(1, count) if words[k] - words[k - 1] != 1 << 16]
                    pieces = [
                        (low, high, words[low]) for low, high in zip([0, *cuts], [*cuts, count])
                    ]
            for low, high, word in pieces:
                # Every entry of a piece is the first plus a cluster each: its first and last
                # words hold all the flag and reserved bits any of them holds.
                last = word + ((high - low - 1) << 16)
                if (word | last) & unusual or not word & S.L2E_OFFSET_MASK:
                    return False
                host = word & S.L2E_OFFSET_MASK
                # (a run past all of the metadata, as usual, needs no closer look)
                if host < metadata_end and self._run_overlaps_metadata(
                    host, last & S.L2E_OFFSET_MASK, spans
                ):
                    return False
                runs.append((first + low, first + high, host))
        # The segments: a hole before each run that does not start where the one before
        # ended, and after the last; a run that does joins the one before when their
        # clusters follow each other (entries apart in their COPIED flag only).
        start = base << 16
        guest = start
        for first, end, host in runs:
            run_start = start + (first << 16)
            run_length = (end - first) << 16
            if run_start > guest:
                _append(segments, guest, run_start - guest, BACKING, None)
                segments.append(_new_tuple(Segment, (run_start, run_length, DATA, host, 0, 0)))
            else:
                _append(segments, run_start, run_length, DATA, host)
            guest = run_start + run_length
        table_end = start + (entries << 16)
        if guest < table_end:
            _append(segments, guest, table_end - guest, BACKING, None)
        return True

    def write_dirty_l2(self) -> bool:
        return self.l2_cache.write_back(
            lambda offset, table: self.file.pwrite(encode_be64(table), offset)
        )

    def write_dirty_l1(self) -> bool:
        if not self.l1_dirty:
            return False
        # Write whole 512-byte sectors that hold dirty entries, so each write is atomic.
        per_sector = 64
        for sector in sorted({i // per_sector for i in self.l1_dirty}):
            start = sector * per_sector
            chunk = self.l1[start : start + per_sector]
            self.file.pwrite(encode_be64(chunk), self.l1_table_offset + start * 8)
            self.l1_dirty.difference_update(range(start, start + per_sector))
        return True

    # --- classification -----------------------------------------------------------------

    def has_host(self, entry: int) -> bool:
        """Whether an uncompressed entry maps a host cluster.

        Offset 0 normally means unallocated, but is a valid offset in an external data
        file, whose clusters are never shared: there the COPIED flag marks allocation.
        """
        if entry & S.OFLAG_COMPRESSED:
            return False
        return bool(entry & S.L2E_OFFSET_MASK) or (
            self.has_data_file and bool(entry & S.OFLAG_COPIED)
        )

    def validate_entry(
        self, entry: int, bitmap: int, cluster_index: int, overlap: bool = True
    ) -> None:
        """CorruptImageError for an uncompressed entry the format does not allow.

        overlap=False leaves out the test against the header, L1 and refcount tables: a
        writer runs the image's full overlap check on what it writes instead."""
        if entry & S.OFLAG_COMPRESSED:
            return
        reserved = 0x3F000000000001FF if self.extended else S.L2E_STD_RESERVED_MASK
        if entry & reserved:
            raise CorruptImageError(
                f"L2 entry 0x{entry:016x} for guest cluster {cluster_index} has reserved bits set"
            )
        if entry & S.OFLAG_ZERO and not self.extended and self.version < 3:
            raise CorruptImageError(
                f"L2 entry 0x{entry:016x} for guest cluster {cluster_index} has the zero flag, "
                f"which is reserved in a version 2 image"
            )
        if self.extended:
            alloc = bitmap & 0xFFFFFFFF
            if alloc & (bitmap >> 32):
                raise CorruptImageError(
                    f"Extended L2 bitmap 0x{bitmap:016x} of guest cluster {cluster_index} marks "
                    f"subclusters both allocated and zero"
                )
            if alloc and not self.has_host(entry):
                raise CorruptImageError(
                    f"Extended L2 entry of guest cluster {cluster_index} has allocated "
                    f"subclusters (bitmap 0x{bitmap:016x}) but no host offset"
                )
            if not alloc:
                return
        elif entry & S.OFLAG_ZERO or not self.has_host(entry):
            return
        self._check_host(entry & S.L2E_OFFSET_MASK, entry, cluster_index, overlap)

    def _check_host(self, host: int, entry: int, cluster_index: int, overlap: bool) -> None:
        if host % self.cluster_size:
            l2_index = cluster_index % self.l2_entries
            l2_offset = self.l1[cluster_index // self.l2_entries] & S.L1E_OFFSET_MASK
            raise SignaledCorruptionError(
                f"Cluster allocation offset {c_hex(host)} unaligned (L2 offset: "
                f"{c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
            )
        if self.has_data_file:
            return
        if host >= self.data_file_size() and not self._status_lookup:
            raise CorruptImageError(
                f"Data cluster offset 0x{host:x} (guest cluster {cluster_index}) lies past the "
                f"end of the image file"
            )
        if overlap:
            self.check_no_overlap(
                host, self.cluster_size, f"Data cluster of guest cluster {cluster_index}"
            )

    def read_host(self, guest_offset: int, length: int) -> int | None:
        """The small read's shortcut past `lookup`, for a range inside one cluster of a
        standard L2 table: the host offset of its bytes when the cluster is a plain data
        cluster (validated as `lookup` validates it), -1 when the cluster is unallocated
        (no L2 table, or entry 0: a BACKING segment), None for anything else (zero,
        compressed or flagged entries, extended L2, ranges over two clusters: ask lookup)."""
        bits = self.cluster_bits
        cluster_index = guest_offset >> bits
        if self.extended or (guest_offset + length - 1) >> bits != cluster_index:
            return None
        l1_index, l2_index = divmod(cluster_index, self.l2_entries)
        if l1_index >= len(self.l1) or not self.l1[l1_index]:
            return -1
        table = self.l2_table(l1_index)
        if table is None:
            return -1
        entry = table[l2_index]
        if not entry:
            return -1
        host = entry & S.L2E_OFFSET_MASK
        if not host or entry & ~(S.OFLAG_COPIED | S.L2E_OFFSET_MASK):
            return None
        self.validate_entry(entry, 0, cluster_index)
        return host + (guest_offset & (self.cluster_size - 1))

    def _in_one_table(self, guest_offset: int, length: int) -> tuple[int, int, int, int] | None:
        """(first cluster, cluster count, l1_index, l2_index) of a non-empty range whose
        clusters all have standard entries in one L2 table; None for any other range."""
        bits = self.cluster_bits
        first = guest_offset >> bits
        count = ((guest_offset + length - 1) >> bits) - first + 1
        l1_index, l2_index = divmod(first, self.l2_entries)
        if (
            self.extended
            or length <= 0
            or l2_index + count > self.l2_entries
            or l1_index >= len(self.l1)
        ):
            return None
        return first, count, l1_index, l2_index

    def data_run(self, guest_offset: int, length: int, overlap: bool = True) -> int | None:
        """The host offset of [guest_offset, +length) when the range lies in one run of
        plain data clusters of one standard L2 table (entries stepping by one cluster,
        no flag but COPIED, all with the first's COPIED bit), validated as `lookup`
        validates them (overlap=False: without the metadata overlap test, for a writer
        that guards what it writes); None for anything else (ask lookup). The large
        request's shortcut, as read_host is the small one's: no segment list."""
        span = self._in_one_table(guest_offset, length)
        if span is None or not self.l1[span[2]]:
            return None
        first, count, l1_index, l2_index = span
        table = self.l2_table(l1_index)
        if table is None:
            return None
        entry = table[l2_index]
        host = entry & S.L2E_OFFSET_MASK
        if entry & ~(S.OFLAG_COPIED | S.L2E_OFFSET_MASK) or not (
            host or self.has_data_file and entry & S.OFLAG_COPIED
        ):
            return None
        step = self.cluster_size
        if count == 1:
            self.validate_entry(entry, 0, first, overlap)
            return host + (guest_offset & (step - 1))
        if table[l2_index + 1] != entry + step or (
            count > 2 and _run_length(table, l2_index, count, 1, entry, 0, step) < count
        ):
            return None
        # The entries differ only in their offsets, all aligned alike and below the last
        # one: the last entry and the run's host range stand for them all.
        try:
            self.validate_entry(entry + (count - 1) * step, 0, first + count - 1, False)
            if overlap and not self.has_data_file:
                self.check_no_overlap(host, count * step, "Data cluster")
        except CorruptImageError:  # the error names the first bad cluster
            for k in range(count):
                self.validate_entry(entry + k * step, 0, first + k, overlap)
        return host + (guest_offset & (step - 1))

    def unallocated_run(self, guest_offset: int, length: int) -> bool:
        """Whether every cluster of [guest_offset, +length) is unallocated in a standard
        map (no L2 table, or entries of 0): what `lookup` would give as one BACKING
        segment, found by one slice comparison (data_run's companion for holes). False
        for anything else, extended L2 and ranges over two tables included."""
        span = self._in_one_table(guest_offset, length)
        if span is None:
            return False
        _, count, l1_index, l2_index = span
        if not self.l1[l1_index]:
            return True
        table = self.l2_table(l1_index)
        if table is None:
            return True
        if table[l2_index] or table[l2_index + count - 1]:
            return False
        return count <= 2 or not table[l2_index : l2_index + count].tobytes().strip(b"\0")

    def lookup(self, guest_offset: int, length: int) -> list[Segment]:
        """Split a guest range into segments, merging neighbours of the same kind."""
        segments, _, error = self.lookup_window(guest_offset, length)
        if error is not None:
            raise error
        return segments

    def lookup_window(
        self,
        guest_offset: int,
        length: int,
        max_clusters: int | None = None,
        status: bool = False,
    ) -> tuple[list[Segment], int, CorruptImageError | None]:
        """(segments, end, error): the segments of [guest_offset, end), where `end` stops
        early once `max_clusters` entries of allocated L2 tables have been classified (a
        bound on the work and on the number of segments; unallocated L2 tables cost
        nothing). A corrupt entry ends the walk: `error` is set and `segments` hold what
        lies before it, as QEMU reports the good part of a range before failing.

        status=True asks for block status only (map, extents), which reads no data: a
        data cluster lying past the end of the image file is then no error (an image
        truncated under a running VM, as QEMU reports it); a read of it still is."""
        self._status_lookup = status
        try:
            return self._lookup_window(guest_offset, length, max_clusters)
        finally:
            self._status_lookup = False

    def _lookup_window(
        self, guest_offset: int, length: int, max_clusters: int | None
    ) -> tuple[list[Segment], int, CorruptImageError | None]:
        segments: list[Segment] = []
        end = guest_offset + length
        bits = self.cluster_bits
        l2_entries = self.l2_entries
        l1_size = len(self.l1)
        budget = max_clusters
        pos = guest_offset
        self._lookup_file_size = None
        try:
            while pos < end:
                l1_index = (pos >> bits) // l2_entries
                base = l1_index * l2_entries  # cluster index of the table's first entry
                table_end = min(end, (base + l2_entries) << bits)
                if l1_index >= l1_size:
                    table = None
                elif (
                    self._status_lookup
                    and pos == base << bits
                    and table_end == (base + l2_entries) << bits
                    and (budget is None or budget >= l2_entries)
                ):
                    # A block-status walk over a whole table: from the cache when there,
                    # else read without being kept (a walk over a whole image would fill
                    # the cache with tables it does not ask for again, each in fresh
                    # memory). One of a single run of plain data clusters, as a disk
                    # written in order has, or a sparse one of a few runs, is classified
                    # from its bytes (decoding them is most of what classifying it costs).
                    offset = self.l2_offset(l1_index)
                    table = self.l2_cache.peek(offset) if offset else None
                    if offset and table is None:
                        raw = self._read_l2(offset)
                        if self._classify_raw_runs(segments, raw, base):
                            if budget is not None:
                                budget -= l2_entries
                            pos = table_end
                            continue
                        table = decode_be64(raw)
                else:
                    offset = self.l2_offset(l1_index)
                    if offset and budget is not None and budget <= 0:
                        break  # (the window is full: the table is the next one's, read there)
                    table = self.l2_cache.get(offset) if offset else None
                if table is None:
                    _append(segments, pos, table_end - pos, BACKING, None)
                    pos = table_end
                    continue
                if budget is not None:
                    if budget <= 0:
                        break
                    first = (pos >> bits) - base
                    if ((table_end - 1) >> bits) - base + 1 - first > budget:
                        table_end = (base + first + budget) << bits
                    budget -= ((table_end - 1) >> bits) - base + 1 - first
                if pos == base << bits and table_end == (base + l2_entries) << bits:
                    self._classify_whole_table(segments, table, l1_index, base)
                elif self.extended:
                    self._classify_extended_range(segments, table, base, pos, table_end)
                else:
                    self._classify_standard_range(segments, table, base, pos, table_end)
                pos = table_end
        except CorruptImageError as exc:
            return segments, pos, exc
        return segments, pos, None

    def _classify_whole_table(
        self, segments: list[Segment], table: array, l1_index: int, base: int
    ) -> None:
        """Segments of a whole L2 table. The last table classified is remembered (with a
        copy of its entries and what validation depended on): a table that many L1 entries
        share, the way a hostile image multiplies its extents, is classified once and
        then only replayed at each guest offset (a whole table always has a segment)."""
        key = (
            self.l2_offset(l1_index),
            self.data_file_size(),
            tuple(self.metadata),
            self._status_lookup,
        )
        remembered = self._last_table
        shift = base << self.cluster_bits
        if remembered is not None and remembered[0] == key and remembered[1] == table:
            _, _, earlier, earlier_shift = remembered
            delta = shift - earlier_shift
            own = [
                _new_tuple(
                    Segment,
                    (
                        seg.guest_offset + delta,
                        seg.length,
                        seg.kind,
                        seg.host_offset,
                        seg.compressed_size,
                        seg.cluster_offset + delta,
                    ),
                )
                for seg in earlier
            ]
        else:
            own = []
            table_end = shift + (self.l2_entries << self.cluster_bits)
            if self.extended:
                self._classify_extended_range(own, table, base, shift, table_end)
            else:
                self._classify_standard_range(own, table, base, shift, table_end)
            # (the segments themselves are kept, not copies: they never change)
            self._last_table = (key, array("Q", table), own, shift)
        if own and own[0].kind != COMPRESSED:
            first = own[0]
            _append(segments, first.guest_offset, first.length, first.kind, first.host_offset)
            segments += own[1:]
        else:
            segments += own

    def _classify_standard_range(self, segments, table, base: int, pos: int, end: int) -> None:
        """Segments of [pos, end) inside one standard L2 table whose first entry maps
        cluster `base`. Runs of entries that merge anyway (equal hostless entries, or
        entries whose host offsets step by one cluster) are found with whole-slice array
        comparisons, so a long run costs a few C-level compares, not a Python step each."""
        bits = self.cluster_bits
        cluster_size = self.cluster_size
        # validate_entry's checks of an entry without a data cluster, done inline (the
        # common case of an alternating table); entries with one go through it.
        reserved = S.L2E_STD_RESERVED_MASK | (S.OFLAG_ZERO if self.version < 3 else 0)
        data_file_copied = S.OFLAG_COPIED if self.has_data_file else 0
        index = (pos >> bits) - base
        stop = ((end - 1) >> bits) - base + 1
        if (
            stop - index >= _PLAIN_MIN_ENTRIES
            and _NATIVE_LITTLE
            and not self.has_data_file
            and self._classify_plain_range(segments, table, base + index, stop - index, pos, end)
        ):
            return
        first = index
        used: list[int] | None = None  # the non-zero entries from `first`, once a hole needs them
        while index < stop:
            entry = table[index]
            cluster_index = base + index
            cluster_start = cluster_index << bits
            start = max(pos, cluster_start)
            if not entry:  # a hole runs to the next entry in use (found without a loop)
                if used is None:  # (of the entries asked for only: a small read asks few)
                    used = nonzero_positions(table[first:stop])  # (relative to `first`)
                after = bisect_right(used, index - first)
                count = (first + used[after] if after < len(used) else stop) - index
                run_end = min((cluster_index + count) << bits, end)
                _append(segments, start, run_end - start, BACKING, None)
                index += count
                continue
            if entry & S.OFLAG_COMPRESSED:
                self._append_compressed(
                    segments, entry, cluster_index, start, min(end, cluster_start + cluster_size)
                )
                index += 1
                continue
            host = entry & S.L2E_OFFSET_MASK
            is_zero = entry & S.OFLAG_ZERO
            hosted = bool(host) if is_zero else bool(host or entry & data_file_copied)
            if entry & reserved or (hosted and not is_zero):
                self.validate_entry(entry, 0, cluster_index)
            step = cluster_size if hosted else 0
            count = 1
            if index + 1 < stop and table[index + 1] == entry + step:
                count = _run_length(table, index, stop - index, 1, entry, 0, step)
                self.validate_run(entry, 0, step, count, cluster_index)
            run_end = (cluster_index + count) << bits
            if run_end > end:
                run_end = end
            if is_zero:
                kind, run_host = ZERO, host + start - cluster_start if host else None
            elif hosted:
                kind, run_host = DATA, host + start - cluster_start
            else:
                kind, run_host = BACKING, None
            # _append, inlined: this loop runs once per entry of an alternating table.
            if segments:
                last = segments[-1]
                if (
                    last.kind is kind
                    and last.guest_offset + last.length == start
                    and (
                        (run_host is None and last.host_offset is None)
                        or (
                            run_host is not None
                            and last.host_offset is not None
                            and last.host_offset + last.length == run_host
                        )
                    )
                ):
                    segments[-1] = last.longer(run_end - start)
                    index += count
                    continue
            segments.append(_new_tuple(Segment, (start, run_end - start, kind, run_host, 0, 0)))
            index += count

    def _classify_plain_range(
        self, segments, table: array, first_cluster: int, entries: int, pos: int, end: int
    ) -> bool:
        """_classify_standard_range for `entries` entries from guest cluster
        `first_cluster` that are all zero or plain data clusters (no flag but COPIED). Zero
        entries are taken out first (at C speed); the rest are validated, and split where
        either their table positions or their host offsets stop following each other, with
        whole-range byte and integer operations; then one step per run. False (nothing
        done) for any other range: the entry loop then classifies it, and names the first
        bad entry if there is one."""
        first_index = first_cluster % self.l2_entries
        window = table if entries == len(table) else table[first_index : first_index + entries]
        raw = window.tobytes()
        positions: Sequence[int] | None = None
        if _ZERO_STRETCH in raw:  # (a sparse table: its zero entries taken out first)
            positions = nonzero_positions(window, raw)
            if not positions:
                _append(segments, pos, end - pos, BACKING, None)
                return True
            raw = array("Q", map(window.__getitem__, positions)).tobytes()
        unusual = _plain_unusual_bits(self.cluster_bits)
        tops = raw[7::8]  # (the entries' top bytes: flags checked, and the run test's)
        if positions is None:
            run = self._one_run(raw, entries, tops)
            if run is not None:  # (a full range of one run, as one written in order is)
                # Bits 0-55 of every entry follow the first's: its own, and the top byte of
                # each, tell whether all are plain.
                if int.from_bytes(raw[:8], "little") & unusual & _BELOW_TOP_BYTE:
                    return False
                [(_, top_values)] = allowed_bytes(unusual & ~_BELOW_TOP_BYTE)  # (byte 7's)
                if tops.translate(None, top_values):
                    return False
                first_host, last_host = run
                if not self._status_lookup and last_host >= self.data_file_size():
                    return False
                if self._run_overlaps_metadata(first_host, last_host):
                    return False
                self._add_runs(segments, first_cluster, range(entries), [], [first_host], pos, end)
                return True
        for column, allowed in allowed_bytes(unusual):
            if (tops if column == 7 else raw[column::8]).translate(None, allowed):
                return False  # (an entry with a flag, reserved bits or a misaligned offset)
        # 1 where the entry has a host offset (in the bytes that can hold its bits: those
        # below the cluster size are zero in a plain entry)
        hosted = column_flags(raw, range(self.cluster_bits // 8, 7))
        hosted_count = hosted.count(1)
        if hosted_count < len(hosted):  # (an entry without one must not have COPIED)
            copied = column_flags(raw, range(7, 8))  # (COPIED: the only top bit left)
            if int.from_bytes(copied, "little") & ~int.from_bytes(hosted, "little"):
                return False
        if positions is not None:
            count = len(positions)
            packed = bytearray(raw)
        else:
            count = hosted_count
            if not count:
                _append(segments, pos, end - pos, BACKING, None)
                return True
            if count == entries:
                positions = range(entries)
                packed = bytearray(raw)
            else:
                positions = one_positions(hosted)
                packed = bytearray(array("Q", map(window.__getitem__, positions)).tobytes())
        packed[7::8] = bytes(count)  # (the host offsets: COPIED cleared)
        values = int.from_bytes(packed, "little")
        if not self._status_lookup:
            # An offset at or past the file's end sets the top bit of its lane once the
            # distance from the end to 2**63 is added (offsets stay below 2**56).
            beyond = values + lanes((1 << 63) - self.data_file_size(), count)
            if beyond & lanes(1 << 63, count):
                return False
        if self._overlaps_metadata(values, count):
            return False
        # Used entry i + 1 continues entry i when its host offset is one cluster more and
        # (with zero entries taken out) its position one more: the XOR of each, shifted by
        # one entry, with itself plus that is zero exactly there.
        differ = (values >> 64) ^ (values + lanes(self.cluster_size, count))
        if count < entries:
            places = int.from_bytes(array("Q", positions).tobytes(), "little")
            differ |= (places >> 64) ^ (places + lane_ones(count))
        breaks = one_positions(column_flags(differ.to_bytes(8 * count, "little"))[:-1], 1)
        offsets = array("Q", packed)
        hosts = [offsets[first] for first in (0, *breaks)]
        self._add_runs(segments, first_cluster, positions, breaks, hosts, pos, end)
        return True

    def _add_runs(
        self,
        segments: list[Segment],
        first_cluster: int,
        positions: Sequence[int],
        breaks: list[int],
        hosts: list[int],
        pos: int,
        end: int,
    ) -> None:
        """_classify_plain_range's segments for [pos, end): the used entries at
        `positions` (from guest cluster `first_cluster`) form runs that start at index 0
        and at each of `breaks`, at host offsets `hosts`; holes between them."""
        bits = self.cluster_bits
        count = len(positions)
        firsts = [0, *breaks]
        starts = [(first_cluster + positions[first]) << bits for first in firsts]
        ends = [(first_cluster + positions[after - 1] + 1) << bits for after in (*breaks, count)]
        if starts[0] < pos:  # (the range starts inside the run's first cluster)
            hosts[0] += pos - starts[0]
            starts[0] = pos
        ends[-1] = min(ends[-1], end)
        if pos < starts[0]:  # the hole before the first run
            _append(segments, pos, starts[0] - pos, BACKING, None)
            segments.append(Segment(starts[0], ends[0] - starts[0], DATA, hosts[0]))
        else:
            _append(segments, pos, ends[0] - pos, DATA, hosts[0])
        # The other runs, each after the hole between it and the one before, if any: made
        # a column at a time (a fragmented table has thousands of runs).
        later_starts = starts[1:]
        runs = list(
            new_segments(later_starts, map(sub, ends[1:], later_starts), repeat(DATA), hosts[1:])
        )
        gaps = list(map(sub, later_starts, ends))  # (the hole before each of them)
        holed = len(gaps) - gaps.count(0)
        if holed:
            holes = list(
                new_segments(
                    compress(ends, gaps), compress(gaps, gaps), repeat(BACKING), repeat(None)
                )
            )
            if holed == len(gaps):  # (every run apart from the one before: alternating)
                pieces: list = [None] * (2 * len(runs))
                pieces[0::2], pieces[1::2] = holes, runs
                segments += pieces
            else:
                before: list = [None] * len(runs)
                for index, hole in zip(compress(range(len(gaps)), gaps), holes):
                    before[index] = hole
                segments += filter(None, chain.from_iterable(zip(before, runs)))
        else:
            segments += runs
        if ends[-1] < end:
            segments.append(Segment(ends[-1], end - ends[-1], BACKING))

    def _one_run(self, raw: bytes, entries: int, tops: bytes) -> tuple[int, int] | None:
        """(first, last host offset, COPIED left out) when bits 0-55 of the `entries`
        entries `raw` (native words; `tops`: their top bytes) name consecutive clusters, in
        order: their ends are one run apart, then one comparison of the whole range with
        that run (of bytes for 64 KiB clusters, of integers otherwise); None otherwise."""
        first = int.from_bytes(raw[:8], "little") & ~S.OFLAG_COPIED
        last = int.from_bytes(raw[-8:], "little") & ~S.OFLAG_COPIED
        step = self.cluster_size
        if not first or last - first != (entries - 1) * step:
            return None
        if step == 1 << 16:
            one_run = is_64k_cluster_run(raw, entries, tops)
            if one_run is not None:
                return (first, last) if one_run else None
        packed = bytearray(raw)
        packed[7::8] = bytes(entries)  # (COPIED cleared)
        expected = first * lane_ones(entries) + lane_ramp(entries, step)
        return (first, last) if int.from_bytes(packed, "little") == expected else None

    def _metadata_spans(self) -> list[tuple[int, int]]:
        """[start, end) of the header, L1 table and refcount table as host clusters can
        overlap them: each start rounded down to its cluster (the header's cluster left
        out: offset 0 is no host offset), empty spans dropped."""
        cluster_size = self.cluster_size
        spans = (
            (max(start - start % cluster_size, cluster_size), end)
            for start, end, _ in self.metadata
        )
        return [(start, end) for start, end in spans if start < end]

    def _run_overlaps_metadata(
        self, first: int, last: int, spans: list[tuple[int, int]] | None = None
    ) -> bool:
        """_overlaps_metadata for the host clusters first, first + a cluster, ... last
        (`spans`: _metadata_spans(), when the caller has them for many runs)."""
        if spans is None:
            spans = self._metadata_spans()
        return any(max(first, start) <= last for start, end in spans if first < end)

    def _overlaps_metadata(self, values: int, count: int) -> bool:
        """Whether any of the host offsets (one an entry in the `count` 64-bit lanes of
        `values`) lies in the header, L1 table or refcount table, every lane
        at once: an offset at or past a bound sets its lane's top bit once the distance
        from the bound to 2**63 is added (offsets stay below 2**56), so the offsets in
        [start, end) are those that set it for start and not for end. When every offset
        lies past all of them (the usual table), one such test says so."""
        spans = self._metadata_spans()
        if not spans:
            return False
        top = lanes(1 << 63, count)
        bias = 1 << 63
        if (values + lanes(bias - max(end for _, end in spans), count)) & top == top:
            return False
        for start, end in spans:
            at_start = values + lanes(bias - start, count)
            if at_start & ~(values + lanes(bias - end, count)) & top:
                return True
        return False

    def validate_run(
        self, entry: int, bitmap: int, step: int, count: int, cluster_index: int
    ) -> None:
        """Validate `count` entries (entry + k*step, bitmap) of consecutive clusters from
        `cluster_index`, whose first entry is already valid: checking the last entry and
        the whole host range is equivalent, and on failure the entries are checked one by
        one so the error names the first bad cluster."""
        if not step or count < 2:
            return
        last = entry + (count - 1) * step
        try:
            self.validate_entry(last, bitmap, cluster_index + count - 1)
            maps_host = (bitmap & 0xFFFFFFFF) if self.extended else not entry & S.OFLAG_ZERO
            if maps_host and not self.has_data_file:
                self.check_no_overlap(
                    entry & S.L2E_OFFSET_MASK,
                    count * self.cluster_size,
                    f"Data cluster of guest cluster {cluster_index}",
                )
        except CorruptImageError:
            # The range check is coarser (an empty metadata range inside the run counts):
            # the verdict is that of the entries one by one.
            for k in range(1, count):  # validate_entry checks each host cluster too
                self.validate_entry(entry + k * step, bitmap, cluster_index + k)

    def _append_compressed(
        self, segments, entry: int, cluster_index: int, pos: int, chunk_end: int
    ) -> None:
        host = entry & self.compressed_offset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        size = sectors * 512 - (host & 511)
        if self._lookup_file_size is None:
            self._lookup_file_size = self.file.size()
        if host + size > self._lookup_file_size + 512 or host < self.cluster_size:
            raise CorruptImageError(
                f"Compressed cluster at 0x{host:x} ({size} bytes, guest cluster {cluster_index}) "
                f"lies outside the image file"
            )
        segments.append(
            Segment(
                pos, chunk_end - pos, COMPRESSED, host, size, cluster_index << self.cluster_bits
            )
        )

    def _classify_extended_range(self, segments, table, base: int, pos: int, end: int) -> None:
        """As _classify_standard_range for extended entries: runs of clusters with one
        uniform bitmap (all allocated, all zero, all unallocated) are found by slice
        comparison; clusters with mixed subclusters are split one by one."""
        bits = self.cluster_bits
        cluster_size = self.cluster_size
        index = (pos >> bits) - base
        stop = ((end - 1) >> bits) - base + 1
        while index < stop:
            entry = table[2 * index]
            bitmap = table[2 * index + 1]
            cluster_index = base + index
            cluster_start = cluster_index << bits
            chunk_end = min(end, cluster_start + cluster_size)
            start = max(pos, cluster_start)
            if entry & S.OFLAG_COMPRESSED or bitmap not in _UNIFORM_BITMAPS:
                self._classify_extended(segments, table, index, cluster_index, start, chunk_end)
                index += 1
                continue
            self.validate_entry(entry, bitmap, cluster_index)
            host = entry & S.L2E_OFFSET_MASK
            step = cluster_size if host or (bitmap and self.has_host(entry)) else 0
            count = 1
            if (
                index + 1 < stop
                and table[2 * index + 2] == entry + step
                and table[2 * index + 3] == bitmap
            ):
                count = _run_length(table, index, stop - index, 2, entry, bitmap, step)
                self.validate_run(entry, bitmap, step, count, cluster_index)
            run_end = min(end, (cluster_index + count) << bits)
            if bitmap == _ALL_ALLOCATED:
                _append(segments, start, run_end - start, DATA, host + start - cluster_start)
            elif bitmap == _ALL_ZERO:
                _append(
                    segments,
                    start,
                    run_end - start,
                    ZERO,
                    host + start - cluster_start if host else None,
                )
            else:
                _append(
                    segments,
                    start,
                    run_end - start,
                    BACKING,
                    host + start - cluster_start if host else None,
                )
            index += count

    def _classify_extended(
        self, segments, table, l2_index: int, cluster_index: int, pos: int, chunk_end: int
    ) -> None:
        entry = table[2 * l2_index]
        bitmap = table[2 * l2_index + 1]
        if entry & S.OFLAG_COMPRESSED:
            self._append_compressed(segments, entry, cluster_index, pos, chunk_end)
            return
        self.validate_entry(entry, bitmap, cluster_index)
        alloc = bitmap & 0xFFFFFFFF
        zero = bitmap >> 32
        host = entry & S.L2E_OFFSET_MASK
        cluster_start = cluster_index << self.cluster_bits
        sub = self.subcluster_size
        while pos < chunk_end:
            index = (pos - cluster_start) // sub
            sub_end = min(chunk_end, cluster_start + (index + 1) * sub)
            if alloc >> index & 1:
                _append(segments, pos, sub_end - pos, DATA, host + pos - cluster_start)
            elif zero >> index & 1:  # a zero subcluster keeps its cluster's host, as in QEMU
                _append(
                    segments, pos, sub_end - pos, ZERO, host + pos - cluster_start if host else None
                )
            else:  # unallocated, though the cluster may have a host (map reports it)
                _append(
                    segments,
                    pos,
                    sub_end - pos,
                    BACKING,
                    host + pos - cluster_start if host else None,
                )
            pos = sub_end

    # --- entries for writers ------------------------------------------------------------

    def get_entry(self, cluster_index: int) -> tuple[int, int]:
        """(entry, bitmap) of a guest cluster; (0, 0) where no L2 table exists."""
        l1_index, l2_index = divmod(cluster_index, self.l2_entries)
        table = self.l2_table(l1_index) if l1_index < len(self.l1) else None
        if table is None:
            return 0, 0
        if self.extended:
            return table[2 * l2_index], table[2 * l2_index + 1]
        return table[l2_index], 0

    def set_run(self, cluster_index: int, count: int, entry: int, step: int) -> None:
        """Store the standard entries entry, entry + step, ... of `count` clusters of one
        L2 table from cluster_index, in one slice (the table must be writable)."""
        l1_index, l2_index = divmod(cluster_index, self.l2_entries)
        if self.extended or l2_index + count > self.l2_entries:
            raise InvalidArgumentError(
                f"set_run of {count} entries from cluster {cluster_index}: not within one "
                f"standard L2 table"
            )
        offset = self.l2_offset(l1_index)
        table = self.l2_cache.get(offset)
        last = entry + (count - 1) * step
        if (
            _NATIVE_LITTLE and step > 0 and last < 1 << 64
        ):  # the entries as one integer, lane by lane
            entries = entry * lane_ones(count) + lane_ramp(count, step)
            run = array("Q", entries.to_bytes(8 * count, "little"))
        else:
            run = array("Q", range(entry, last + 1, step))
        table[l2_index : l2_index + count] = run
        self.l2_cache.mark_dirty(offset)

    def set_entry(self, cluster_index: int, entry: int, bitmap: int = 0) -> None:
        """Store an entry; the L2 table must already be writable (see Qcow2Image)."""
        l1_index, l2_index = divmod(cluster_index, self.l2_entries)
        offset = self.l2_offset(l1_index)
        table = self.l2_cache.get(offset)
        if self.extended:
            table[2 * l2_index] = entry
            table[2 * l2_index + 1] = bitmap
        else:
            table[l2_index] = entry
        self.l2_cache.mark_dirty(offset)


_NATIVE_LITTLE = sys.byteorder == "little"
_PLAIN_MIN_ENTRIES = 16  # shorter ranges (a small request's) take the entry loop
# A sparse table's runs are looked at one by one up to this many; past it (or with entries in
# over half of its stretches, see runs._busy_stretches) the table is decoded and classified a
# column at a time, which costs less than a few Python steps per run from about 40 runs (a
# table of 30 runs: 207 us looked at run by run, 250 decoded).
_RAW_RUNS_MAX = 40
_ZERO_STRETCH = bytes(8 * 64)  # 64 zero entries (or fewer, unaligned): a sparse table


def _plain_unusual_bits(cluster_bits: int) -> int:
    """The bits a plain data cluster's standard L2 entry never sets (every flag but
    COPIED, reserved bits, offset bits below the cluster size)."""
    return (
        S.L2E_STD_RESERVED_MASK
        | S.OFLAG_COMPRESSED
        | S.OFLAG_ZERO
        | ((1 << cluster_bits) - 1) & S.L2E_OFFSET_MASK
    )


_BELOW_TOP_BYTE = (1 << 56) - 1


_native_run_length = NativeRunLength()
_ALL_ALLOCATED = 0x00000000FFFFFFFF
_ALL_ZERO = 0xFFFFFFFF00000000
_UNIFORM_BITMAPS = (_ALL_ALLOCATED, _ALL_ZERO, 0)


def _expected_entries(words: int, entry: int, bitmap: int, step: int, count: int) -> array:
    """`count` table entries (entry + k*step, and the bitmap word when words == 2)."""
    entries = (
        array("Q", range(entry, entry + count * step, step))
        if step
        else array("Q", (entry,)) * count
    )
    if words == 1:
        return entries
    pairs = array("Q", (bitmap,)) * (2 * count)
    pairs[0::2] = entries
    return pairs


def _run_length(
    table: array, index: int, limit: int, words: int, entry: int, bitmap: int, step: int
) -> int:
    """How many entries from `index` (at most `limit`, at least the 2 already seen) follow
    the pattern (entry + k*step, bitmap): for one word per entry, whole slices compared
    as integers (qcow2lib.runs); otherwise a galloping search over slice comparisons, each
    one a C-level compare of the table against the expected entries."""
    if words == 1 and step and _NATIVE_LITTLE:  # (equal entries: memcmp is faster)
        return _native_run_length(table, index, limit, entry, step)
    good, probe, bad = 2, 4, None
    while good < limit:
        count = min(probe, limit)
        if table[index * words : (index + count) * words] == _expected_entries(
            words, entry, bitmap, step, count
        ):
            good, probe = count, probe * 2
        else:
            bad = count
            break
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if table[index * words : (index + middle) * words] == _expected_entries(
            words, entry, bitmap, step, middle
        ):
            good = middle
        else:
            bad = middle
    return good


def _append(segments: list[Segment], pos: int, length: int, kind: str, host: int | None) -> None:
    """Add a run, extending the previous one when it continues it (same kind, contiguous host)."""
    if segments:
        last = segments[-1]
        if last.kind == kind and last.kind != COMPRESSED and last.guest_offset + last.length == pos:
            if host is None and last.host_offset is None:
                segments[-1] = last.longer(length)
                return
            if (
                host is not None
                and last.host_offset is not None
                and last.host_offset + last.length == host
            ):
                segments[-1] = last.longer(length)
                return
    segments.append(_new_tuple(Segment, (pos, length, kind, host, 0, 0)))
