"""Comparing the counted references with the refcounts on disk (QEMU's compare_refcounts:
leaks, corruptions, the repair of both) and checking the COPIED flags of the active L1 and
L2 entries against the refcounts (check_oflag_copied)."""

from __future__ import annotations

import errno
import os
from array import array
from itertools import compress

from .. import structs as S
from ..cache import decode_be64, encode_be64
from ..runs import consecutive_runs
from .report import FIX_ERRORS, FIX_LEAKS, _Abort
from .target import (
    _CHUNK_BITS,
    _NORMAL,
    _OL_ACTIVE_L1,
    _OL_ACTIVE_L2,
    _ZERO_ALLOC,
    _CheckState,
    _RefcountReadError,
)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

_MAX_REMEMBERED_REFCOUNTS = 1 << 16  # refcounts check_oflag_copied keeps at hand
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


class _Compare(_CheckState):
    """compare_refcounts and check_oflag_copied (a mixin of _Check)."""

    # what the walk provides (see _Walk)
    _plain_runs: Callable[[bytes, int, int], list[tuple[int, int, bytes]] | None]
    _known_plain_runs: Callable[[int, int], list[tuple[int, int, bytes]] | None]
    _l2_unusual_bits: Callable[[], int]

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
                    self.out.append(f"Can't get refcount for cluster {i}: {os.strerror(errno.EIO)}")
                    res.check_errors += 1
                continue
            mine = self.imrt.values(lo, hi)
            theirs = disk[: hi - lo] if disk is not None else [0] * (hi - lo)
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
                    self.out.append(
                        f"{word} cluster {i} refcount={refcount1} reference={refcount2}"
                    )
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
        blocks = {
            i
            for i in compress(range(min(count, len(t.reftable))), t.reftable)
            if t.reftable[i] & S.REFT_OFFSET_MASK
        }
        for chunk in self.imrt.chunks:
            first = (chunk << _CHUNK_BITS) >> t.rb_bits
            last = (((chunk + 1) << _CHUNK_BITS) - 1) >> t.rb_bits
            blocks.update(range(first, min(last + 1, count)))
        return sorted(blocks)

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
        # QEMU writes and syncs each repaired L1 entry; the entries are independent of
        # each other, and the overlap check keeps them out of every L2 table and refcount
        # block read here, so they are written in runs at the end (a hostile L1 table can
        # have tens of thousands to repair).
        repaired_l1: list[int] = []
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
                out.append(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} "
                    f"l1_entry={l1_entry:x} refcount={refcount}"
                )
                if repair:
                    l1[i] = (
                        l1_entry | S.OFLAG_COPIED if refcount == 1 else l1_entry & ~S.OFLAG_COPIED
                    )
                    if t.overlap_check(_OL_ACTIVE_L1, t.hdr.l1_table_offset + 8 * i, 8):
                        res.check_errors += 1
                        self._write_l1_entries(repaired_l1)
                        raise _Abort(errno.EIO)
                    repaired_l1.append(i)
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
            if (
                self._check_l2_copied(l2_offset, repair, word, refcount_of)
                and quiet
                and t.writes == writes
            ):
                tables[l2_offset] = (out[mark:], res.corruptions - corruptions)
        self._write_l1_entries(repaired_l1)
        t.flush()

    def _write_l1_entries(self, indices: list[int]) -> None:
        """Write these entries of the in-memory active L1 table (ascending) to the file,
        each run of neighbours in one write."""
        t = self.t
        for first, count, _ in consecutive_runs(indices):
            t.pwrite(encode_be64(t.l1[first : first + count]), t.hdr.l1_table_offset + 8 * first)

    def _check_l2_copied(
        self, l2_offset: int, repair: bool, word: str, refcount_of: Callable[[int], int]
    ) -> bool:
        """The data cluster part of check_oflag_copied for one L2 table; False if a refcount
        could not be read."""
        t = self.t
        if l2_offset >= t.file_size():
            return True  # (a table past the end of the file reads as zeros: nothing in it)
        res = self.res
        words = t.words
        fast = words == 1 and not t.has_data_file and t.order >= 3 and t.cache_clean()
        if fast:  # (the walk just found the table's runs: no need to read it again)
            runs = self._known_plain_runs(self._l2_unusual_bits(), l2_offset)
            if runs is not None and self._copied_runs_ok(runs):
                return True  # (every COPIED flag as it should be: nothing to report)
        data = t.pread(t.cs, l2_offset)
        if data == t.zero_cluster:
            return True
        complete = True
        dirty = 0
        if fast:
            runs = self._plain_runs(data, self._l2_unusual_bits(), l2_offset)
            if runs is not None and self._copied_runs_ok(runs):
                return True
        table = decode_be64(data)
        for j in compress(range(t.l2_entries), table[::words]):
            entry = table[j * words]
            if (entry & S.OFLAG_COMPRESSED or not entry & S.L2E_OFFSET_MASK) and t.cluster_type(
                entry
            ) not in (_NORMAL, _ZERO_ALLOC):
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
                self.out.append(
                    f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                )
                if repair:
                    table[j * words] = (
                        entry | S.OFLAG_COPIED if refcount == 1 else entry & ~S.OFLAG_COPIED
                    )
                    dirty += 1
        if dirty:
            if t.overlap_check(_OL_ACTIVE_L2, l2_offset, t.cs):
                self.out.append(
                    f"ERROR: Could not write L2 table; metadata overlap check "
                    f"failed: {os.strerror(errno.EIO)}"
                )
                res.check_errors += 1
                raise _Abort(errno.EIO)
            t.pwrite(encode_be64(table), l2_offset)
            res.corruptions -= dirty
            res.corruptions_fixed += dirty
        return complete

    def _copied_runs_ok(self, runs: list[tuple[int, int, bytes]]) -> bool:
        """Whether the L2 entries of each run of data clusters (first host offset, count,
        the entries' top bytes) have COPIED exactly where the refcount is 1, checked a
        refcount block at a time (each run all with COPIED, or all without); False when
        that is not so or not sure, and the entry-by-entry check must run. A fragmented
        table's runs mostly share one refcount block: it is looked up once for them (in
        the same order of use, so the block cache evicts as it would run by run)."""
        t = self.t
        cluster_bits, rb_bits, rb_mask = t.cluster_bits, t.rb_bits, t.rb_size - 1
        index = -1  # the refcount block whose values are at hand
        values: array | bytearray = bytearray()
        one: array | bytearray = bytearray()
        for first, count, flags in runs:
            if flags.count(flags[0]) != count:
                return False
            copied = flags[0] == 0x80
            cluster = first >> cluster_bits
            stop = cluster + count
            while cluster < stop:
                if cluster >> rb_bits != index:
                    index = cluster >> rb_bits
                    if index >= len(t.reftable):
                        return False
                    block_offset = t.reftable[index] & S.REFT_OFFSET_MASK
                    if not block_offset or block_offset & (t.cs - 1):
                        return False  # (refcount 0, or a corruption the slow path reports)
                    block = t.refblock(index)
                    if block is None:
                        return False  # (not loaded: the slow path reads and reports it)
                    values = block.values
                    one = (
                        array(values.typecode, [1])
                        if isinstance(values, array)
                        else bytearray(b"\1")
                    )
                low = cluster & rb_mask
                high = min(rb_mask + 1, low + stop - cluster)
                if copied:
                    if values[low:high] != one * (high - low):
                        return False
                elif 1 in values[low:high]:
                    return False
                cluster += high - low
        return True
