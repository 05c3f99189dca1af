"""The repairs that rewrite metadata: a misaligned preallocated zero cluster made a plain
zero cluster, the refcount structure rebuilt from the counted references (QEMU's
rebuild_refcount_structure, same allocation order), and the snapshot table rewritten
(qcow2_check_fix_snapshot_table)."""

from __future__ import annotations

import errno
import os
import struct
from array import array

from .. import structs as S
from ..cache import encode_be64
from ..refcount import RefcountBlock
from .report import FIX_ERRORS, _Abort, _Result
from .target import (
    _OL_ACTIVE_L2,
    _OL_INACTIVE_L2,
    _REFCOUNT_CACHE_ENTRIES,
    _MAX_SNAPSHOTS_SIZE,
    _SNAPSHOT_EXTRA_SIZE,
    _CacheSlot,
    _CheckState,
    _RefcountReadError,
)

_L2_BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32


class _RebuildError(Exception):
    def __init__(self, message: str, err: int):
        super().__init__(message)
        self.message = message
        self.errno = err


class _Repair(_CheckState):
    """The repairs (a mixin of _Check)."""

    # --- the snapshot table (qcow2_check_fix_snapshot_table) --------------------------
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
            size = (
                -(-size // 8) * 8
                + 40
                + max(_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size)
                + len(sn.id_str)
                + len(sn.name)
            )
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
            data += struct.pack(
                ">QIHHIIQII",
                sn.l1_table_offset,
                sn.l1_size,
                len(sn.id_str),
                len(sn.name),
                sn.date_sec,
                sn.date_nsec,
                sn.vm_clock_nsec,
                vm32,
                max(_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size),
            )
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

    # --- a misaligned preallocated zero cluster (fix_l2_entry_by_zero) ----------------
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
        t.pwrite(encode_be64(table[index * words : (index + 1) * words]), entry_offset)
        t.flush()
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

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
        if isinstance(block.values, array):  # (order >= 3)
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
