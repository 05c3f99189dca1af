"""`qemu-img convert`: copy one or more images (concatenated) into a target device.

It is a pipeline, not a loop over bytes:

1. The plan comes from the sources' extent maps (metadata only). Runs are classified as
   qemu-img does it (data / zero / left to the target's backing file) and cut into work
   items: data runs into buffers of at most 2 MiB, zero runs whole, exactly the way
   qemu-img's convert_iteration_sectors() walks them (including the trimming of runs
   to the source's cluster alignment and, for compressed output, whole clusters).
2. Worker threads (qemu-img -m, capped by the CPU count: more only contend for the
   GIL) take *batches* of consecutive items from the planner: up to four 2 MiB items,
   or for compressed output a buffer's worth of clusters (read with one request per
   run of neighbouring clusters). Each worker owns its batch's buffers, so memory stays
   bounded. A worker reads its batch and works out what it can before its turn: the
   zero runs of each buffer (while the data is still in the CPU's caches) and, for
   compressed output, the compressed clusters (Qcow2Image.compress_cluster; zlib and
   zstd release the GIL, so workers compress in parallel).
3. Unless out_of_order (qemu-img -W), writes reach the target in guest order, so a new
   qcow2 target is laid out as qemu-img lays it out, compressed clusters included. A
   worker waits for its turn once per batch and is woken by the worker before it
   alone (a gate of its own, not a broadcast to every worker).
4. Zero runs are never read. Within data buffers, runs of zero sectors of at least
   `sparse_size` bytes are detected (qemu-img -S; QEMU's is_allocated_sectors_min with
   its alignment rules) and become zero writes. A zero write is skipped wherever the
   target already reads as zeros according to its own extent map (a new image, or
   target_is_zero; an existing target, -n, is not trusted, as in qemu-img), otherwise it
   is `write_zeroes(may_unmap=True)`.
5. Raw to raw data runs go through os.copy_file_range when copy_range is set (copied
   verbatim, as qemu-img -C does: no zero detection inside them).

With `target_backing` (qemu-img -B) only what differs from the backing file is
written: where the source's own backing file *is* that file, the runs the source's top
layer leaves unallocated stay unallocated (as qemu-img does, without reading them);
elsewhere source data is compared with the backing file's content cluster by cluster
and equal clusters are left unallocated. The result, read over its backing file, always
equals the source.
"""

from __future__ import annotations

import bisect
import errno
import os
import threading
from array import array

from .blockdev import BlockDevice, Extent, RawDevice, iter_merged
from .hostfile import io_buffer
from .errors import (
    CorruptImageError,
    InvalidArgumentError,
    Qcow2Error,
    Qcow2IOError,
    UnsupportedFeatureError,
)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from .throttle import ThrottleGroup

SECTOR = 512
_DIRECT_MAX_DEPTH = 64  # layers of a chain whose data items are read directly
IO_BUF_SIZE = 2 << 20
MAX_BUF_SECTORS = 32768
MAX_COROUTINES = 16
# Buffered work items (of up to 2 MiB each) a worker takes at once: it waits for its
# turn to write once a batch, and the batch should still lie in the CPU's caches when
# its writes copy it (4 MiB: 1 GiB raw -> qcow2 in 252-260 ms of CPU; 8 MiB: 264-275)
BATCH_ITEMS = 2
BATCH_MAX_ITEMS = 256  # and at most this many items in all (zero and backing runs too)
BDRV_REQUEST_MAX_SECTORS = ((1 << 31) - 1) // SECTOR  # INT_MAX bytes, in whole sectors

BLK_DATA, BLK_ZERO, BLK_BACKING_FILE = "data", "zero", "backing"
_STATUSES = (BLK_DATA, BLK_ZERO, BLK_BACKING_FILE)  # (a kept plan's items hold the index)
PLAN_MAX_ITEMS = 1 << 16  # items of the counting pass kept for the copy (1.1 MiB at most)

_Z512 = bytes(SECTOR)
_ZEROS = bytes(MAX_BUF_SECTORS * SECTOR)
_ZEROS_VIEW = memoryview(_ZEROS)


class ConvertError(Qcow2IOError):
    """A read or write failed during convert; the message is qemu-img's
    ("error while reading at byte N: ..."), the original error is the __cause__."""


# --- zero detection (QEMU's is_allocated_sectors / is_allocated_sectors_min) -------------


def _zero_range(buf, start: int, end: int) -> bool:
    return buf.startswith(_ZEROS_VIEW[: end - start], start)


def _same_run(buf, first: int, count: int, is_zero: bool) -> int:
    """How many sectors from `first` (at most count) share `is_zero` with each other."""
    stop = first + count
    if is_zero:
        sector = first
        step = 64
        while sector < stop:
            block_end = min(stop, sector + step)
            if _zero_range(buf, sector * SECTOR, block_end * SECTOR):
                sector = block_end
                continue
            while sector < block_end and buf.startswith(_Z512, sector * SECTOR):
                sector += 1
            return sector - first
        return count
    # Non-zero run: find the next aligned all-zero sector.
    pos = first * SECTOR
    limit = stop * SECTOR
    while True:
        hit = buf.find(_Z512, pos, limit)
        if hit < 0:
            return count
        sector = -(-hit // SECTOR)
        if sector >= stop:
            return count
        if buf.startswith(_Z512, sector * SECTOR):
            return sector - first  # >= 1: sector `first` itself holds data
        pos = (sector + 1) * SECTOR


def is_allocated_sectors(
    buf, first: int, n: int, sector_num: int, alignment: int
) -> tuple[bool, int]:
    """(has data, run length in sectors) for the sectors of buf from `first` (QEMU's
    is_allocated_sectors: run ends are moved to `alignment` where that avoids RMW)."""
    if n <= 0:
        return False, 0
    is_zero = buf.startswith(_Z512, first * SECTOR)
    i = _same_run(buf, first, n, is_zero)
    if i == n:
        return not is_zero, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not is_zero, i


def is_allocated_sectors_min(
    buf, first: int, n: int, min_sparse: int, sector_num: int, alignment: int
) -> tuple[bool, int]:
    """Like is_allocated_sectors, but a data run swallows zero runs shorter than
    `min_sparse` sectors (qemu-img convert -S)."""
    if n < min_sparse:
        min_sparse = n
    ret, pnum = is_allocated_sectors(buf, first, n, sector_num, alignment)
    if not ret:
        return ret, pnum
    num_used = num_checked = pnum
    pos = first + pnum
    n -= pnum
    sector_num += pnum
    while n > 0:
        ret, pnum = is_allocated_sectors(buf, pos, n, sector_num, alignment)
        pos += pnum
        n -= pnum
        sector_num += pnum
        num_checked += pnum
        if ret:
            num_used = num_checked
        elif pnum >= min_sparse:
            break
    return True, num_used


def sparse_runs(
    buf, n: int, min_sparse: int, sector_num: int, alignment: int
) -> list[tuple[bool, int]]:
    """(has data, sectors) of each run of the first n sectors of buf (a bytearray or bytes),
    as is_allocated_sectors_min called again and again from sector 0 cuts them.

    Those calls cut only at multiples of `alignment` (a power of two) once they reach one,
    and there a block of `alignment` sectors counts as data unless all of it is zero. So
    the first call runs sector by sector only if the buffer starts off that grid; the rest
    is found from one flag per block (_zero_block_flags): no Python step per sector or
    per data block.
    """
    runs: list[tuple[bool, int]] = []
    pos = 0
    if sector_num % alignment and n:
        runs.append(is_allocated_sectors_min(buf, 0, n, min_sparse, sector_num, alignment))
        pos = runs[0][1]
    if pos >= n:
        return runs
    block = alignment * SECTOR
    flags = _zero_block_flags(buf, pos * SECTOR, n * SECTOR, block)
    blocks = len(flags)

    def sectors(index: int) -> int:  # buffer sector where block `index` starts
        return min(pos + index * alignment, n)

    index = 0
    while index < blocks:
        start = sectors(index)
        if not flags[index]:  # a zero run: every block up to the next data block
            end = _find(flags, 1, index, blocks)
            runs.append((False, sectors(end) - start))
            index = end
            continue
        # Data, swallowing each zero run shorter than min_sparse that more data follows.
        least = min(min_sparse, n - start)
        end = _find(flags, 0, index, blocks)
        while end < blocks:
            zero_end = _find(flags, 1, end, blocks)
            if zero_end == blocks or sectors(zero_end) - sectors(end) >= least:
                break
            end = _find(flags, 0, zero_end, blocks)
        runs.append((True, sectors(end) - start))
        index = end
    return runs


def _find(flags: bytearray, value: int, start: int, stop: int) -> int:
    """Index of the first `value` in flags from `start`, or `stop`."""
    found = flags.find(value, start)
    return stop if found < 0 else found


_NONZERO_TO_ONE = bytes([0] + [1] * 255)


def _zero_block_flags(buf, start: int, stop: int, block: int) -> bytearray:
    """One flag per block of `block` bytes of buf[start:stop] (the last block may be
    short): 0 where the block is all zero bytes, 1 elsewhere.

    A block is a candidate only if its first, middle and last bytes are zero (three
    strided copies, OR-ed as integers): that rules out nearly every data block, text
    and file tails padded with zeros included. Candidates are confirmed a run at a time.
    """
    # (a bytearray's strided slice is a plain byte loop; a memoryview's copies item by item)
    source = buf if type(buf) is bytearray or type(buf) is bytes else memoryview(buf)
    full = (stop - start) // block
    full_end = start + full * block
    mixed = 0
    for within in (0, block // 2, block - 1):
        mixed |= int.from_bytes(source[start + within : full_end : block], "little")
    flags = bytearray(mixed.to_bytes(full, "little").translate(_NONZERO_TO_ONE))
    if full_end < stop:
        flags.append(0 if _zero_range(buf, full_end, stop) else 1)
    count = len(flags)
    first = flags.find(0)
    while first >= 0:
        end = _find(flags, 1, first, count)
        if not _zero_range(buf, start + first * block, min(stop, start + end * block)):
            for index in range(first, end):
                block_start = start + index * block
                if not _zero_range(buf, block_start, min(stop, block_start + block)):
                    flags[index] = 1
        first = flags.find(0, end)
    return flags


# --- interval sets ------------------------------------------------------------------------


class _Intervals:
    """Sorted, merged [start, end) ranges."""

    def __init__(self, ranges=()) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if end <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [r[0] for r in merged]
        self.ends = [r[1] for r in merged]

    def _first(self, pos: int) -> int:
        i = bisect.bisect_right(self.starts, pos) - 1
        return max(i, 0)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of [start, end) not covered."""
        out = []
        pos = start
        i = self._first(start)
        while pos < end and i < len(self.starts):
            s, e = self.starts[i], self.ends[i]
            if e <= pos:
                i += 1
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def overlaps(self, start: int, end: int) -> bool:
        return self.gaps(start, end) != [(start, end)]


# --- the sources --------------------------------------------------------------------------


class _Part:
    """One source: its extents are streamed (queries only move forward; `rewind` starts
    the walk again), so a source with millions of extents costs one window of memory."""

    __slots__ = (
        "device",
        "start",
        "sectors",
        "alignment",
        "extents",
        "current",
        "pending",
        "failure",
    )

    def __init__(self, device: BlockDevice, start: int):
        self.device = device
        self.start = start  # first sector of this source in the concatenation
        self.sectors = -(-device.size // SECTOR)
        cluster = getattr(device, "cluster_size", 0) if device.format == "qcow2" else 0
        self.alignment = max(1, cluster // SECTOR)
        self.rewind()

    def rewind(self) -> None:
        size = self.device.size
        self.device.check_request(0, size)
        batches = self.device.extent_batches(0, size) if size else iter(())
        self.extents = iter_merged(batches, pending_on_error=True)
        self.current: Extent | None = None
        self.pending: Extent | None = None  # read past a joined run, not yet current
        self.failure: Qcow2Error | None = None  # met reading past one, for the next query

    def _pull(self) -> Extent | None:
        ext, self.pending = self.pending, None
        if ext is None and self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        return ext if ext is not None else next(self.extents, None)

    def status_at(self, offset: int):
        """The extent holding byte `offset`."""
        ext = self.current
        while ext is None or ext.offset + ext.length <= offset:
            ext = self._pull()
            if ext is None:
                return None
        self.current = ext
        return ext if ext.offset <= offset else None

    def join_following(self, ext: Extent, end: int, joins: Callable[[Extent], bool]) -> int:
        """Where the run that starts with `ext` (the current extent) ends, the extents that
        follow it up to byte `end` and that `joins` accepts taken in: they become one
        current extent, so that a later query anywhere in the run finds it. The first
        extent refused is kept for the next query."""
        run_end = ext.offset + ext.length
        while run_end < end:
            try:
                following = self._pull()
            except Qcow2Error as exc:  # for the query past the run (qemu-img's next one)
                self.failure = exc
                break
            if following is None:
                break
            if following.offset != run_end or not joins(following):
                self.pending = following
                break
            run_end += following.length
        if run_end != ext.offset + ext.length:
            self.current = ext._replace(length=run_end - ext.offset, host_offset=None)
        return run_end


def _same_file(a: BlockDevice | None, b: BlockDevice | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return os.path.samefile(a.filename, b.filename)
    except OSError:
        return False


# --- the converter ------------------------------------------------------------------------


class _Converter:
    def __init__(
        self,
        sources,
        target,
        compress,
        sparse_size,
        target_is_zero,
        target_backing,
        parallel,
        out_of_order,
        progress,
        copy_range,
        buffer_size,
        salvage=None,
        existing_target=False,
        write_limit: ThrottleGroup | None = None,
    ) -> None:
        self.target = target
        self.write_limit = write_limit
        self.salvage = salvage  # the callback of convert(salvage=...), or None
        self.compressed = compress
        self.min_sparse = sparse_size // SECTOR
        self.target_backing = target_backing
        # -m counts QEMU's coroutines; more threads than CPUs only contend for the GIL
        # (I/O and codecs release it): two per CPU keep every CPU compressing, and for
        # ordered copies, whose writes go one at a time anyway, one per CPU (at least
        # two, so that one reads while another writes).
        cpus = os.cpu_count() or 1
        self.parallel = min(parallel, 2 * cpus if compress or out_of_order else max(2, cpus))
        self.in_order = not out_of_order
        self.progress = progress
        self.parts: list[_Part] = []
        start = 0
        for device in sources:
            part = _Part(device, start)
            self.parts.append(part)
            start += part.sectors
        self.total_sectors = start
        self.buf_sectors = max(1, buffer_size // SECTOR)
        self.alignment = max(_pow2floor(self.min_sparse), 1)
        self.cluster_sectors = 0
        if compress:
            self.cluster_sectors = target.cluster_size // SECTOR
            self.buf_sectors = self.cluster_sectors
        self.same_backing = (
            target_backing is not None
            and len(sources) == 1
            and _same_file(sources[0].backing, target_backing)
        )
        self.copy_range = (
            bool(copy_range)
            and not compress
            and target_backing is None
            and isinstance(target, RawDevice)
            and all(isinstance(s, RawDevice) for s in sources)
        )
        self.direct_files = self._direct_files(sources)
        self.status_ext: Extent | None = None  # the data extent of the current status run
        self.diff_granule = getattr(target, "cluster_size", 65536) or 65536
        self._target_maps(target_is_zero)
        if existing_target and not target_is_zero:
            self.known_zero = _Intervals()
        # planner state (convert_iteration_sectors)
        self.sector_next_status = 0
        self.status = BLK_DATA
        self.sector_num = 0
        self.plan: tuple[array, array, bytearray, array, bytearray] | None = None  # _count_work
        self.plan_index = 0
        self.lock = threading.Lock()
        self.turn_lock = threading.Lock()
        self.turn_gates: dict[int, threading.Lock] = {}  # sector -> the gate its writer waits at
        self.split_compression = (
            compress and hasattr(target, "compress_cluster") and hasattr(target, "store_compressed")
        )
        # Items per batch: ordered copies take several (compressed ones a buffer's worth
        # of clusters); salvaging, copy offloading, -W and compressed output that cannot
        # be ordered take one item at a time.
        if self.salvage is not None or self.copy_range or not self.in_order:
            self.batch_items = 1
        elif compress:
            self.batch_items = max(1, IO_BUF_SIZE // SECTOR // self.cluster_sectors)
            if not self.split_compression:
                self.batch_items = 1
        else:
            self.batch_items = BATCH_ITEMS
        self.wr_offs = 0
        self.error: BaseException | None = None
        self.error_sector = -1  # the guest sector of the failed work item; -1 when unknown
        self.done = 0
        self.total_bytes = 0
        self.plan_warnings: list = []  # salvage: block status failures of the next item

    # -- what the target already holds --

    def _target_maps(self, target_is_zero: bool) -> None:
        """Where the target reads zeros now (zero writes skipped there) and where its
        own top layer is allocated (never left to the backing file)."""
        target = self.target
        size = target.size
        if target_is_zero:
            self.known_zero = _Intervals([(0, size)])
            self.own = _Intervals()
            return
        zero, own = [], []
        backing_open = getattr(target, "backing", None) is not None
        named_backing = bool(getattr(target, "backing_filename", None))
        for ext in target.iter_extents(0, size):
            end = ext.offset + ext.length
            if ext.depth == 0 and ext.present:
                own.append((ext.offset, end))
            if ext.depth == 0 and not ext.present and named_backing and not backing_open:
                # Unallocated over a backing file the target was opened without.
                tb = self.target_backing
                if tb is None:
                    continue
                if ext.offset >= tb.size:
                    zero.append((ext.offset, end))
                    continue
                inside = min(end, tb.size)
                for bext in tb.iter_extents(ext.offset, inside - ext.offset):
                    if bext.is_zero:
                        zero.append((bext.offset, bext.offset + bext.length))
                if inside < end:
                    zero.append((inside, end))
                continue
            if ext.is_zero:
                zero.append((ext.offset, end))
        self.known_zero = _Intervals(zero)
        self.own = _Intervals(own)

    def _direct_files(self, sources) -> list:
        """For one source whose chain is plain qcow2 images opened read-only (the usual
        convert): depth -> the file that layer's extents' host offsets point into (None
        from the first layer that is not so). Data items are then read there directly,
        not through every layer above the one holding them (a read through a 3-deep chain
        asked each layer above for its mapping in turn)."""
        files: list = []
        if len(sources) != 1 or self.salvage is not None or self.copy_range:
            return files
        layer = sources[0]
        while layer is not None and len(files) < _DIRECT_MAX_DEPTH:
            plain = getattr(layer, "plain_data_file", None)
            data_file = plain() if plain is not None else None
            if data_file is None:
                break
            files.append(data_file)
            layer = layer.backing
        return files

    def _direct_source(self, sector_num: int, n: int) -> tuple[int, int] | None:
        """(depth, host offset) where a data item can be read directly, or None."""
        ext = self.status_ext
        if ext is None or ext[5] is None or ext[4] >= len(self.direct_files):
            return None
        offset = sector_num * SECTOR
        end = offset + n * SECTOR
        if offset < ext[0] or end > ext[0] + ext[1] or end > self.parts[0].device.size:
            return None  # (a compressed copy's item may reach past it, to a whole cluster)
        return ext[4], ext[5] + offset - ext[0]

    # -- planning --

    def _select_part(self, sector_num: int) -> _Part:
        for part in self.parts:
            if sector_num - part.start < part.sectors:
                return part
        raise AssertionError("sector past the sources")

    def _classify(self, part: _Part, offset: int, count: int) -> tuple[str, int]:
        """Block status of a source at byte offset: (status, bytes in that state)."""
        if self.salvage is not None:
            return self._classify_salvaging(part, offset, count)
        try:
            ext = part.status_at(offset)
        except Qcow2IOError as exc:
            raise ConvertError(
                exc.errno,
                f"error while reading block status at offset {offset}: {exc.errno_text()}",
            ) from exc
        status, run = self._classify_extent(ext, offset, count)
        self.status_ext = ext if status == BLK_DATA and self.direct_files else None
        if status == BLK_ZERO and ext is not None and run < count and self.min_sparse:
            # zero clusters beside unallocated ones (or other zero extents that differ
            # only in what convert does not use): one zero run, not an item per extent
            # (-S 0 writes zeros as data, an item at a time as in qemu-img's progress)
            end = part.join_following(ext, offset + count, self._reads_as_zero)
            run = min(end, offset + count) - offset
        return status, run

    def _reads_as_zero(self, ext: Extent) -> bool:
        return self._classify_extent(ext, ext.offset, ext.length)[0] == BLK_ZERO

    def _classify_salvaging(self, part: _Part, offset: int, count: int) -> tuple[str, int]:
        """As qemu-img --salvage: the status of [offset, offset+count) asked of the source
        itself; where that fails, of a quarter of the range, down to one sector, which
        is then taken as data (with a warning) and read."""
        sectors = -(-count // SECTOR)
        while True:
            length = min(sectors * SECTOR, part.device.size - offset)
            try:
                ext = next(part.device.iter_extents(offset, length), None) if length > 0 else None
                return self._classify_extent(ext, offset, min(count, sectors * SECTOR))
            except (Qcow2IOError, CorruptImageError) as exc:
                if sectors > 1:
                    sectors = -(-sectors // 4)
                    continue
                self.plan_warnings.append(("block status", offset, exc))
                return BLK_DATA, SECTOR

    def _classify_extent(self, ext, offset: int, count: int) -> tuple[str, int]:
        if ext is None:  # a raw file's partial last sector: zeros
            return BLK_ZERO, count
        run = min(count, ext.offset + ext.length - offset)
        if self.same_backing and (ext.depth > 0 or not ext.present):
            return BLK_BACKING_FILE, run
        if ext.is_zero:
            return BLK_ZERO, run
        return BLK_DATA, run

    def _iteration_sectors(self, sector_num: int) -> int:
        part = self._select_part(sector_num)
        n = min(self.total_sectors - sector_num, BDRV_REQUEST_MAX_SECTORS)
        if self.sector_next_status <= sector_num:
            offset = (sector_num - part.start) * SECTOR
            # Block status is clamped to the source's length (whole sectors, as QEMU).
            count = min(n * SECTOR, part.sectors * SECTOR - offset)
            status, count = self._classify(part, offset, count)
            n = -(-count // SECTOR)
            tail = (sector_num - part.start + n) % part.alignment
            if n > tail:
                n -= tail
            self.status = status
            self.sector_next_status = sector_num + n
        n = min(n, self.sector_next_status - sector_num)
        if self.status == BLK_DATA:
            n = min(n, self.buf_sectors)
        if self.compressed:
            if n < self.cluster_sectors:
                n = min(self.cluster_sectors, self.total_sectors - sector_num)
                self.status = BLK_DATA
            else:
                n -= n % self.cluster_sectors
        return n

    def _next_item(self):
        """Under self.lock: the next (sector, count, status, warnings), or None at the end."""
        plan = self.plan
        if plan is not None:  # (the items the counting pass kept)
            index = self.plan_index
            if self.error is not None or index >= len(plan[0]):
                return None
            self.plan_index = index + 1
            host = plan[3][index]
            direct = (plan[4][index], host) if host >= 0 else None
            return plan[0][index], plan[1][index], _STATUSES[plan[2][index]], (), direct
        if self.error is not None or self.sector_num >= self.total_sectors:
            return None
        n = self._iteration_sectors(self.sector_num)
        sector_num, status = self.sector_num, self.status
        if not self.min_sparse and status == BLK_ZERO:
            n = min(n, self.buf_sectors)
        self.sector_num += n
        warnings, self.plan_warnings = self.plan_warnings, []
        direct = self._direct_source(sector_num, n) if status == BLK_DATA else None
        return sector_num, n, status, warnings, direct

    def _count_work(self) -> int:
        """First pass over the plan (as qemu-img makes it, before copying anything): bytes
        that will be copied (for progress). Its items are kept, up to PLAN_MAX_ITEMS
        (three machine words and a byte each), so that the workers take them from there
        rather than walk the sources' extents again; a longer plan, or one made while
        salvaging (whose block status is asked again while copying), is made again."""
        total = 0
        starts, counts, statuses = array("q"), array("q"), bytearray()
        hosts, depths = array("q"), bytearray()  # (where an item is read directly; -1: not)
        keep = self.salvage is None
        while True:
            item = self._next_item()
            if item is None:
                break
            sector_num, n, status, warnings, direct = item
            if status == BLK_DATA or (not self.min_sparse and status == BLK_ZERO):
                total += n * SECTOR
            self._report(warnings)
            if keep:
                starts.append(sector_num)
                counts.append(n)
                statuses.append(_STATUSES.index(status))
                hosts.append(-1 if direct is None else direct[1])
                depths.append(0 if direct is None else direct[0])
                keep = len(starts) < PLAN_MAX_ITEMS
        if keep:
            self.plan = (starts, counts, statuses, hosts, depths)
            self.plan_index = 0
            return total
        for part in self.parts:
            part.rewind()
        self.sector_num = 0
        self.sector_next_status = 0
        self.status = BLK_DATA
        self.status_ext = None
        return total

    # -- I/O --

    def _report(self, warnings: list) -> None:
        for what, offset, exc in warnings:
            self.salvage(what, offset, exc)

    @staticmethod
    def _read_salvaging(device, offset: int, view: memoryview, warnings: list) -> None:
        """As qemu-img --salvage: a failed read is retried sector by sector; a sector that
        cannot be read becomes zeros (and a warning)."""
        try:
            device.readinto(offset, view)
            return
        except (Qcow2IOError, CorruptImageError):
            pass
        for start in range(0, len(view), SECTOR):
            piece = view[start : start + SECTOR]
            try:
                device.readinto(offset + start, piece)
            except (Qcow2IOError, CorruptImageError) as exc:
                warnings.append(("read", offset + start, exc))
                piece[:] = _ZEROS_VIEW[: len(piece)]

    def _read(
        self, sector_num: int, n: int, view: memoryview, warnings: list | None = None
    ) -> None:
        pos = 0
        while pos < n:
            part = self._select_part(sector_num + pos)
            first = sector_num + pos - part.start
            count = min(n - pos, part.sectors - first)
            offset = first * SECTOR
            chunk = view[pos * SECTOR : (pos + count) * SECTOR]
            inside = max(0, min(len(chunk), part.device.size - offset))
            if inside and warnings is not None:
                self._read_salvaging(part.device, offset, chunk[:inside], warnings)
            elif inside:
                part.device.readinto(offset, chunk[:inside])
            if inside < len(chunk):
                chunk[inside:] = _ZEROS_VIEW[: len(chunk) - inside]
            pos += count

    def _copy_range(self, sector_num: int, n: int) -> bool:
        """Raw to raw with copy_file_range; False if the kernel will not do it."""
        pos = 0
        target_fd = self.target.file.fd
        self.target.file.unflushed = True  # (written around the HostFile)
        while pos < n:
            part = self._select_part(sector_num + pos)
            first = sector_num + pos - part.start
            count = min(n - pos, part.sectors - first)
            src = first * SECTOR
            dst = (sector_num + pos) * SECTOR
            length = count * SECTOR
            device = part.device
            assert isinstance(device, RawDevice)  # (copy_range is set for raw sources only)
            inside = max(0, min(length, device.size - src))
            src_file = device.file_offset + src  # (where the windows of the files lie)
            dst_file = self.target.file_offset + dst
            done = 0
            while done < inside:
                try:
                    copied = os.copy_file_range(
                        device.file.fd, target_fd, inside - done, src_file + done, dst_file + done
                    )
                except OSError:
                    return False
                if copied == 0:
                    return False
                done += copied
            if inside < length:
                self._target_write(dst + inside, _ZEROS_VIEW[: length - inside])
            pos += count
        return True

    def _throttle(self, length: int) -> None:
        """Before writing `length` bytes to the target: wait as the rate limit asks."""
        if self.write_limit is not None:
            self.write_limit.intercept(length, True)

    def _target_write(self, offset: int, data) -> None:
        self._throttle(len(data))
        self.target.write(offset, data)

    def _zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) of the target read zeros, where it does not yet."""
        end = min(offset + length, self.target.size)
        for start, stop in self.known_zero.gaps(offset, end):
            self._throttle(stop - start)
            self.target.write_zeroes(start, stop - start, may_unmap=True)

    def _write(self, offset: int, data: memoryview, backing_buf) -> None:
        """Write data, leaving out clusters equal to the target's backing file."""
        if backing_buf is None:
            self._target_write(offset, data)
            return
        granule = self.diff_granule
        end = offset + len(data)
        pos = offset
        run_start = None
        while pos < end:
            piece_end = min(end, (pos // granule + 1) * granule)
            a, b = pos - offset, piece_end - offset
            differs = (
                self.own.overlaps(pos, piece_end)
                or data[a:b].tobytes() != backing_buf[a:b].tobytes()
            )
            if differs and run_start is None:
                run_start = pos
            elif not differs and run_start is not None:
                self._target_write(run_start, data[run_start - offset : pos - offset])
                run_start = None
            pos = piece_end
        if run_start is not None:
            self._target_write(run_start, data[run_start - offset : end - offset])

    def _read_backing(self, offset: int, length: int, buf: bytearray) -> memoryview:
        view = memoryview(buf)[:length]
        tb = self.target_backing
        inside = max(0, min(length, tb.size - offset))
        if inside:
            tb.readinto(offset, view[:inside])
        if inside < length:
            view[inside:] = _ZEROS_VIEW[: length - inside]
        return view

    def _prepare_compressed(self, sector_num: int, n: int, buf: bytearray, backing_buf):
        """What a compressed item writes, worked out before its turn (compression
        included, where the target can compress apart from storing): ("zero", offset,
        length), ("skip",), or ("store", offset, data, packed or None, compressed)."""
        view = memoryview(buf)
        offset = sector_num * SECTOR
        length = n * SECTOR
        if self.min_sparse and _zero_range(buf, 0, length):
            return ("zero", offset, length)
        if backing_buf is not None:
            backing_buf = self._read_backing(offset, length, backing_buf)
            if (
                not self.own.overlaps(offset, offset + length)
                and view[:length].tobytes() == backing_buf[:length].tobytes()
            ):
                return ("skip",)
        cs = self.cluster_sectors * SECTOR
        if length < cs and offset + length < self.target.size:
            pad = min(cs, self.target.size - offset)
            view[length:pad] = self.target.read(offset + length, pad - length)
            length = pad
        data = view[:length]
        if self.split_compression:
            return ("store", offset, data, self.target.compress_cluster(offset, data), True)
        return ("store", offset, data, None, False)

    def _store(self, action) -> None:
        """The writing half of a compressed item, in its turn."""
        if action[0] == "zero":
            self._zero(action[1], action[2])
        elif action[0] == "store":
            _, offset, data, packed, compressed = action
            self._throttle(len(data))
            if compressed:
                self.target.store_compressed(offset, data, packed)
            else:
                self.target.write_compressed(offset, data)

    def _write_data(self, sector_num: int, n: int, buf: bytearray, backing_buf, runs=None) -> None:
        """convert_co_write for a data buffer: sparse detection (unless `runs` gives its
        result already), then writes and zeroes."""
        if self.compressed:
            self._store(self._prepare_compressed(sector_num, n, buf, backing_buf))
            return
        view = memoryview(buf)
        offset = sector_num * SECTOR
        if backing_buf is not None:
            backing_buf = self._read_backing(offset, n * SECTOR, backing_buf)
        if not self.min_sparse:
            runs = [(True, n)]
        elif runs is None:
            runs = sparse_runs(buf, n, self.min_sparse, sector_num, self.alignment)
        pos = 0
        for allocated, count in runs:
            start = offset + pos * SECTOR
            if allocated:
                bb = (
                    None
                    if backing_buf is None
                    else backing_buf[pos * SECTOR : (pos + count) * SECTOR]
                )
                self._write(start, view[pos * SECTOR : (pos + count) * SECTOR], bb)
            else:
                self._zero(start, count * SECTOR)
            pos += count

    # -- workers --

    def _wait_turn(self, sector_num: int) -> bool:
        """Block until every item before `sector_num` is written (False: the job failed).
        Each waiter has a gate of its own, opened only by the write it waits for."""
        with self.turn_lock:
            if self.wr_offs == sector_num or self.error is not None:
                return self.error is None
            gate = threading.Lock()
            gate.acquire()
            self.turn_gates[sector_num] = gate
        gate.acquire()
        return self.error is None

    def _done_turn(self, sector_num: int, n: int) -> None:
        with self.turn_lock:
            self.wr_offs = sector_num + n
            gate = self.turn_gates.pop(self.wr_offs, None)
        if gate is not None:
            gate.release()

    def _fail(self, exc: BaseException, sector_num: int = -1) -> None:
        """Stop the job with `exc`. Of several failing I/O requests in flight the lowest in
        guest order is reported, as qemu-img's in-order writers would hit it first."""
        with self.turn_lock:
            if self.error is None or (0 <= sector_num < self.error_sector):
                self.error, self.error_sector = exc, sector_num
            gates = list(self.turn_gates.values())
            self.turn_gates.clear()
        for gate in gates:
            gate.release()

    def _buffers(self, state: dict, slot: int) -> bytearray:
        """The worker's buffer for the slot-th item of its batch."""
        buffers = state.setdefault("bufs", [])
        while len(buffers) <= slot:
            buffers.append(io_buffer(self.buf_sectors * SECTOR))
        if self.target_backing is not None and not self.same_backing and "backing" not in state:
            state["backing"] = io_buffer(self.buf_sectors * SECTOR)
        return buffers[slot]

    def _next_batch(self) -> list:
        """Under self.lock: the next items, consecutive in guest order (empty at the end).
        Ordered writes take a batch of up to `batch_items` items that need a buffer, so
        that a worker waits for its turn once per batch rather than once per 2 MiB."""
        batch: list = []
        buffered = 0
        while buffered < self.batch_items and len(batch) < BATCH_MAX_ITEMS:
            item = self._next_item()
            if item is None:
                break
            batch.append(item)
            if item[2] == BLK_DATA or (not self.min_sparse and item[2] == BLK_ZERO):
                buffered += 1
        return batch

    def _read_item(self, item, slot: int, state: dict) -> bool:
        """The reading half of an item (before its turn); False: written already
        (copy_file_range) or the job was stopped."""
        sector_num, n, status, warnings, direct = item
        if status != BLK_DATA:
            return True
        if self.copy_range:
            return True
        buf = self._buffers(state, slot)
        if direct is not None:
            self.direct_files[direct[0]].readinto(memoryview(buf)[: n * SECTOR], direct[1])
            return True
        salvage_warnings = warnings if self.salvage is not None else None
        self._read(sector_num, n, memoryview(buf)[: n * SECTOR], salvage_warnings)
        return True

    def _prepare_item(self, item, slot: int, state: dict):
        """What can be worked out for an item before its turn, while its data is still in
        the CPU's caches: its zero runs, or for compressed output what it will write,
        compressed (None: nothing)."""
        sector_num, n, status, _, _ = item
        if self.copy_range:
            return None
        if not self.compressed:
            if status != BLK_DATA or not self.min_sparse:
                return None
            buf = self._buffers(state, slot)
            return ("runs", sparse_runs(buf, n, self.min_sparse, sector_num, self.alignment))
        if not self.split_compression:
            return None
        if status == BLK_DATA:
            buf = self._buffers(state, slot)
        elif status == BLK_ZERO and not self.min_sparse:  # -S 0: zeros are written as data
            buf = self._buffers(state, slot)
            memoryview(buf)[: n * SECTOR] = _ZEROS_VIEW[: n * SECTOR]
        else:
            return None
        return self._prepare_compressed(sector_num, n, buf, state.get("backing"))

    def _read_grouped(self, batch: list, slots: list, state: dict) -> set:
        """Compressed output: each run of neighbouring data items of the batch (a cluster
        each) read with one request, not one per cluster. The indexes of the items read;
        a run whose read fails is left to the item-by-item reads, which name the item."""
        done: set[int] = set()
        if not self.split_compression or self.salvage is not None:
            return done
        index = 0
        while index < len(batch):
            end = index
            while (
                end < len(batch)
                and batch[end][2] == BLK_DATA
                and (end == index or batch[end][0] == batch[end - 1][0] + batch[end - 1][1])
            ):
                end += 1
            if end - index < 2:
                index = max(end, index + 1)
                continue
            first = batch[index][0]
            sectors = batch[end - 1][0] + batch[end - 1][1] - first
            scratch = state.get("scratch")
            if scratch is None or len(scratch) < sectors * SECTOR:
                scratch = state["scratch"] = io_buffer(self.batch_items * self.buf_sectors * SECTOR)
            view = memoryview(scratch)
            try:
                self._read(first, sectors, view[: sectors * SECTOR])
            except Qcow2IOError:
                index = end
                continue
            for member in range(index, end):
                sector_num, n = batch[member][0], batch[member][1]
                start = (sector_num - first) * SECTOR
                buf = self._buffers(state, slots[member])
                buf[: n * SECTOR] = view[start : start + n * SECTOR]
                done.add(member)
            index = end
        return done

    def _write_item(self, item, slot: int, state: dict, prepared=None) -> None:
        """The writing half of an item, in its turn."""
        sector_num, n, status, warnings, _ = item
        if warnings and self.salvage is not None:
            self._report(warnings)
        if prepared is not None and prepared[0] == "runs":
            self._write_data(
                sector_num, n, self._buffers(state, slot), state.get("backing"), prepared[1]
            )
            return
        if prepared is not None:
            self._store(prepared)
            return
        if status == BLK_DATA:
            if self.copy_range:
                if self._copy_range(sector_num, n):
                    return
                self.copy_range = False  # not on this file system: read and write instead
                state["phase"] = "reading"
                self._read_item(item, slot, state)
                state["phase"] = "writing"
            self._write_data(sector_num, n, self._buffers(state, slot), state.get("backing"))
        elif status == BLK_ZERO:
            if not self.min_sparse:  # -S 0: zeros are written as data
                buf = self._buffers(state, slot)
                memoryview(buf)[: n * SECTOR] = _ZEROS_VIEW[: n * SECTOR]
                self._write_data(sector_num, n, buf, state.get("backing"))
            else:
                self._zero(sector_num * SECTOR, n * SECTOR)

    def _process(self, batch: list, ordered: bool, state: dict) -> bool:
        """One batch: all reads, then (ordered: in its turn) all writes, item by item.
        False when the job was stopped by another thread's error."""
        slots = []
        slot = 0
        for item in batch:
            slots.append(slot)
            if item[2] == BLK_DATA or (not self.min_sparse and item[2] == BLK_ZERO):
                slot += 1
        prepared = [None] * len(batch)
        if ordered and self.copy_range:
            # copy_file_range is the whole copy: it runs in the turn
            if not self._wait_turn(batch[0][0]):
                return False
        else:
            grouped = self._read_grouped(batch, slots, state)
            for index, (item, slot) in enumerate(zip(batch, slots)):
                state["phase"], state["item"] = "reading", item[0]
                if index not in grouped:
                    self._read_item(item, slot, state)
                state["phase"] = "writing"  # (compressing is part of the write, as in QEMU)
                prepared[index] = self._prepare_item(item, slot, state)
            if ordered and not self._wait_turn(batch[0][0]):
                return False
        for item, slot, action in zip(batch, slots, prepared):
            state["phase"], state["item"] = "writing", item[0]
            self._write_item(item, slot, state, action)
            if self.progress is not None:
                self._report_progress(item)
        return True

    def _report_progress(self, item) -> None:
        """After an item that copied data (or zeros written as data, -S 0)."""
        _, n, status, _, _ = item
        if status == BLK_DATA or (not self.min_sparse and status == BLK_ZERO):
            with self.lock:
                self.done += n * SECTOR
                done = self.done
            self.progress(min(done, self.total_bytes), self.total_bytes)

    def _worker(self) -> None:
        state: dict = {}
        # Compressed output is ordered where the target compresses apart from storing
        # (each worker compresses its batch, then stores it in its turn); otherwise the
        # writing thread compresses and writes are not held back. Salvaging, everything
        # is ordered, so that the warnings come in guest order.
        ordered = (
            self.in_order and (not self.compressed or self.split_compression)
        ) or self.salvage is not None
        while True:
            with self.lock:
                batch = self._next_batch()
            if not batch:
                return
            first, last = batch[0], batch[-1]
            try:
                if not self._process(batch, ordered, state):
                    return
            except Qcow2IOError as exc:
                sector_num = state.get("item", first[0])
                err = ConvertError(
                    exc.errno,
                    f"error while {state.get('phase', 'reading')} at "
                    f"byte {sector_num * SECTOR}: {exc.errno_text()}",
                    exc.filename,
                )
                err.__cause__ = exc
                self._fail(err, sector_num)
                return
            except UnsupportedFeatureError as exc:
                # what the target cannot store (compressed clusters in an image with an
                # external data file): QEMU's ENOTSUP from the write
                sector_num = state.get("item", first[0])
                err = ConvertError(
                    errno.ENOTSUP,
                    f"error while {state.get('phase', 'reading')} "
                    f"at byte {sector_num * SECTOR}: "
                    f"{os.strerror(errno.ENOTSUP)}",
                )
                err.__cause__ = exc
                self._fail(err, sector_num)
                return
            except BaseException as exc:
                self._fail(exc)
                return
            finally:
                if ordered:
                    self._done_turn(first[0], last[0] + last[1] - first[0])

    def run(self) -> None:
        self.total_bytes = self._count_work()
        if self.progress is not None:
            self.progress(0, self.total_bytes)
        threads = [
            threading.Thread(target=self._worker, name=f"qcow2-convert-{i}", daemon=True)
            for i in range(self.parallel)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.error is not None:
            raise self.error
        if self.compressed and hasattr(self.target, "align_file_end"):
            self.target.align_file_end()  # as qemu-img ends a compressed copy
        self.target.flush()
        if self.progress is not None:
            self.progress(self.total_bytes, self.total_bytes)


def _pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


def convert(
    sources,
    target: BlockDevice,
    *,
    compress: bool = False,
    sparse_size: int = 4096,
    target_is_zero: bool = False,
    target_backing: BlockDevice | None = None,
    parallel: int = 8,
    out_of_order: bool = False,
    progress=None,
    copy_range: bool = True,
    buffer_size: int = IO_BUF_SIZE,
    salvage=None,
    existing_target: bool = False,
    rate_limit: int = 0,
    clock=None,
    sleep=None,
) -> None:
    """Copy the guest content of `sources` (one device, or several concatenated) into
    `target`, which must be at least as large. See the module docstring.

    compress: write compressed clusters (qcow2 targets; -c). sparse_size: smallest run of
    zero bytes in data that is not written (-S; 0 writes everything, zeros included).
    target_is_zero: the target is known to read zeros (--target-is-zero). target_backing:
    the target's backing file (-B). parallel: worker threads (-m). out_of_order: allow
    writes out of guest order (-W). progress(done_bytes, total_bytes), called from the
    worker threads (so it must be thread-safe). copy_range: raw to
    raw data via copy_file_range (-C: verbatim, no zero detection; pass False to get
    qemu-img's default sparse raw output). salvage(what, offset, error), when given,
    turns source errors into calls of it, as qemu-img --salvage into warnings: what is
    "block status" (the range is then read as data) or "read" (the sector, at byte
    offset, is written as zeros); the calls come in guest order, in the planning pass
    that counts the work (block status) and again while copying. existing_target: the
    target was not created for this copy (-n): as qemu-img does, what it reads now is not
    trusted to be zero, so the source's zero runs are written as zeroes there too (unless
    target_is_zero). rate_limit: bytes per second written to the target (-r; 0: no
    limit), as qemu-img limits them: a throttle group with that bps-write limit on the
    target (throttle.py; copy offloading passes it by, as in QEMU); clock and sleep
    replace the group's time.monotonic_ns and time.sleep (tests).
    """
    if isinstance(sources, BlockDevice):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise InvalidArgumentError("Must specify image file name")
    if sparse_size < 0 or sparse_size % SECTOR or sparse_size // SECTOR > MAX_BUF_SECTORS:
        raise InvalidArgumentError(
            f"Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            f"{SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to disable sparse detection "
            f"(fully allocates output)."
        )
    if not 1 <= parallel <= MAX_COROUTINES:
        raise InvalidArgumentError(
            f"Invalid number of coroutines. Allowed number of "
            f"coroutines is between 1 and {MAX_COROUTINES}"
        )
    if target_is_zero and target_backing is not None:
        raise InvalidArgumentError(
            "Cannot use --target-is-zero when the destination image has a backing file"
        )
    if len(sources) > 1 and target_backing is not None:
        raise InvalidArgumentError(
            "Having a backing file for the target makes no sense when "
            "concatenating multiple input images"
        )
    if compress and (
        target.format not in ("qcow2", "vmdk") or not hasattr(target, "write_compressed")
    ):
        raise InvalidArgumentError("Compression not supported for this file format")
    if target.read_only:
        from .errors import ReadOnlyError

        raise ReadOnlyError(f"'{target.filename}' is opened read-only")
    total = sum(-(-s.size // SECTOR) for s in sources)
    if -(-target.size // SECTOR) < total:
        raise InvalidArgumentError("output file is smaller than input file")
    buffer_size = min(max(buffer_size, SECTOR), MAX_BUF_SECTORS * SECTOR)
    _Converter(
        sources,
        target,
        compress,
        sparse_size,
        target_is_zero,
        target_backing,
        parallel,
        out_of_order,
        progress,
        copy_range and salvage is None,
        buffer_size,
        salvage,
        existing_target,
        _write_limit(rate_limit, clock, sleep),
    ).run()


def _write_limit(rate_limit: int, clock, sleep) -> ThrottleGroup | None:
    if rate_limit < 0:
        raise InvalidArgumentError(f"rate limit {rate_limit} is negative")
    if not rate_limit:
        return None
    from .throttle import ThrottleGroup

    timing = {"clock": clock, "sleep": sleep}
    return ThrottleGroup.write_rate(rate_limit, **{k: v for k, v in timing.items() if v})


__all__ = [
    "convert",
    "ConvertError",
    "is_allocated_sectors",
    "is_allocated_sectors_min",
    "sparse_runs",
]
