"""`Qcow2Image`: the header, cluster map, refcounts and codecs tied into a BlockDevice.

Concurrency: one lock (`_lock`) guards metadata. A request takes it to translate its
range into host runs (and to allocate), then does its data I/O without it, so reads of
allocated data and writes into allocated clusters from many threads run in parallel.
A small read inside one cluster whose bytes are in the page cache is the exception: it
copies them before dropping the lock, keeping the GIL when other threads run (cheaper
than handing the lock and the GIL on); one that would wait for the disk drops the lock
first. The lock is an ImageLock, whose waiters retry before they block, so that threads
making short requests do not fall into a convoy behind the GIL.
Guest clusters being allocated are marked in flight; a second writer of the same
cluster waits for the first to publish its L2 entry.

Durability: data goes straight to the file; metadata is written back by `flush`, in the
order refcount increments, L2 tables, L1 entries, refcount decrements, with a barrier
(fdatasync) between each phase that wrote something.
"""

from __future__ import annotations

import errno
from _thread import RLock
from _operator import not_
from itertools import compress, groupby, repeat

from . import structs as S
from .blockdev import RAW_EXTENT_BATCH, BlockDevice, Extent, scatter, split_views
from .imagelock import ImageLock
from .errors import (
    BadSecretError,
    CorruptImageError,
    CorruptionIOError,
    InvalidArgumentError,
    Qcow2Error,
    Qcow2IOError,
    SignaledCorruptionError,
    UnsupportedFeatureError,
    UntrustedImageError,
    corruption_notice,
    emit_notice,
    preallocation_failure,
)
from .header import Header
from .hostfile import HostFile, fill_zeros, open_host_file, preallocate
from .overlap import (
    ACTIVE_L1,
    ACTIVE_L2,
    BITMAP_DIRECTORY,
    BITMAP_TABLE,
    HEADER,
    INACTIVE_L1,
    REFCOUNT_BLOCK,
    REFCOUNT_TABLE,
    SNAPSHOT_TABLE,
    OverlapMap,
    overlap_message,
)
from .segment import BACKING, COMPRESSED, DATA, ZERO
from .sizes import c_hex

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from array import array
    from collections.abc import Iterable, Iterator
    from threading import Condition
    from typing import TypeAlias

    from .mapping import ClusterMap
    from .refcount import Refcounts
    from .segment import Segment

    from .bitmaps import BitmapEntry, BitmapTracker
    from .containers import DataFileTarget
    from .blkdebug import BlkdebugFile
    from .crypto import SectorCrypto
    from .hostfile import DeviceFile
    from .quorum import QuorumFile

    # what an image's bytes live in: a host file, a test node's file, or a device (an NBD
    # export, a data file given as a null-co, qcow2 or nbd node)
    ContainerFile: TypeAlias = HostFile | BlkdebugFile | QuorumFile | DeviceFile

_ZEROS = bytes(1 << 20)
_ZEROS_VIEW = memoryview(_ZEROS)
# read() of a hole returns zero bytes of the length asked: bytes are immutable, so the
# block made for the last length (up to _ZERO_BLOCK_MAX) is handed out again rather than
# allocated and cleared on every call of a reader going through holes piece by piece.
_ZERO_BLOCK_MAX = 4 << 20
_zero_block = [_ZEROS]


def _zero_bytes(length: int) -> bytes:
    block = _zero_block[0]
    if len(block) == length:
        return block
    block = bytes(length)
    if length <= _ZERO_BLOCK_MAX:
        _zero_block[0] = block
    return block


# Reads up to this size try the page cache under the image lock (HostFile.readinto_cached):
# copying a cached page is quicker than handing the lock and the GIL to another thread.
_CACHED_READ_MAX = 64 << 10


# _new_tuple(Extent, values): an Extent from a 7-tuple, without Extent.__new__'s frame
_new_tuple = tuple.__new__


def _data_and_hole_extents(segments: list) -> list[Extent] | None:
    """The extents of a window of segments that are all data or holes without a host
    offset, at C speed, a column at a time (a fragmented image's window holds tens of
    thousands); None for any other window."""
    guest_offsets, lengths, kinds, host_offsets, _, _ = zip(*segments)
    holes = kinds.count(BACKING)
    if kinds.count(DATA) + holes != len(kinds):
        return None
    is_data = list(map(DATA.__eq__, kinds))
    is_zero = list(map(not_, is_data))  # (the holes)
    if holes and list(compress(host_offsets, is_zero)).count(None) != holes:
        return None  # (a hole with a host offset: the preallocated zeros of a data file)
    return list(
        map(
            _new_tuple,
            repeat(Extent),
            zip(
                guest_offsets,
                lengths,
                is_data,
                is_zero,
                repeat(0),
                host_offsets,
                is_data,
            ),
        )
    )


def _write_run(target, buffers: list, host: int, length: int) -> None:
    """Write byte buffers (`length` bytes in all) back to back at `host`: a host file is
    told their total (one pwritev, which may keep the GIL; see HostFile.pwritev)."""
    if type(target) is HostFile:
        target.pwritev(buffers, host, length)
    else:
        target.pwritev(buffers, host)


class _BackingCursor:
    """One forward walk over a backing file's extents, for one walk over the layer above:
    each range that layer leaves unallocated (asked in increasing order) is cut from the
    batches as they come, where a walk of its own for each range classified the same
    tables again and again (a layer of 4096 small extents over its backing file: 5 times
    qemu-img's map). A range before the last one asked starts the walk again there. An
    error of the walk reaches the range that needs the extents past it, as it would
    reach that range's own walk."""

    __slots__ = ("device", "batches", "batch", "index", "position")

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.position = device.size  # (nothing walked yet: the first range starts it)
        self.batches: Iterator[list[Extent]] = iter(())
        self.batch: list[Extent] = []
        self.index = 0

    def take(self, start: int, end: int) -> tuple[list[Extent], Qcow2Error | None]:
        """The backing file's extents of [start, end) (inside its size), one level deeper,
        and the error that stopped the walk before their end, if one did (the extents
        before it are still reported, as a walk of the range would yield them first)."""
        if start < self.position:
            self.batches = self.device.extent_batches(start, self.device.size - start)
            self.batch, self.index = [], 0
        self.position = end
        out: list[Extent] = []
        add = out.append
        while True:
            batch, index = self.batch, self.index
            while index < len(batch):
                ext_start, ext_length, is_data, is_zero, depth, host, present = batch[index]
                ext_end = ext_start + ext_length
                if ext_end > start:
                    first = max(ext_start, start)
                    if host is not None:
                        host += first - ext_start
                    last = min(ext_end, end)
                    add(Extent(first, last - first, is_data, is_zero, depth + 1, host, present))
                    if ext_end >= end:
                        self.index = index if ext_end > end else index + 1
                        return out, None
                index += 1
            self.batch, self.index = [], 0
            try:
                following = next(self.batches, None)
            except Qcow2Error as exc:
                self.position = self.device.size  # (a later range walks again)
                return out, exc
            if following is None:  # (the walk ended: the range lay past what it gave)
                return out, None
            self.batch = following


# L2 entries (subclusters count 32 each) classified per extents window: bounds the memory
# and latency of one step of map/convert/compare whatever the image holds.
EXTENT_WINDOW_CLUSTERS = 1 << 15


class _ClusterWrite:
    """One guest cluster whose L2 entry a write changes; or, where a write fills
    unallocated clusters of one L2 table, the run of them (`count` > 1: contiguous hosts,
    the fill range measured from the first cluster's start, no bitmap, nothing freed)."""

    __slots__ = (
        "cluster_index",
        "count",
        "host",
        "new_host",
        "fill_start",
        "fill_end",
        "entry",
        "bitmap",
        "free_clusters",
    )

    def __init__(self, cluster_index: int, count: int = 1):
        self.cluster_index = cluster_index
        self.count = count
        self.host = 0  # host offset of the cluster the data goes to
        self.new_host = False  # host must be allocated
        self.fill_start = 0  # byte range inside the cluster that is written (data + COW fill)
        self.fill_end = 0
        self.entry = 0  # new L2 entry (host filled in once known)
        self.bitmap = 0
        self.free_clusters: list[tuple[int, int]] = []  # host clusters to release afterwards


class Qcow2Image(BlockDevice):
    format = "qcow2"

    def __init__(
        self,
        path: str,
        mode: str = "r",
        data_file: DataFileTarget | None = None,
        force_share: bool = False,
        passphrase: str | bytes | None = None,
        open_data_file: bool = True,
        backing_of: str | None = None,
        untrusted: bool = False,
        file: ContainerFile | None = None,
        locking: bool = True,
    ):
        """data_file: the external data file the user gives instead of the one the image
        names (a file name or a node's options, containers.py). backing_of: the image
        naming this one as its backing file, if any. untrusted: an external data file the
        image names (not `data_file`) is refused. `file` is
        the container when it is not a host file (an NBD export); it is closed with the
        image. locking=False (QEMU's file.locking=off): the image's file is not locked."""
        if mode not in ("r", "r+"):
            raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.filename = path
        self.read_only = mode == "r"
        self.file: ContainerFile = (
            file
            if file is not None
            else open_host_file(
                path,
                writable=not self.read_only,
                role="backing file" if backing_of else None,
                named_by=backing_of,
            )
        )
        # the external data file, when there is one (blkdebug above it when options say so)
        self.data_host: HostFile | BlkdebugFile | DeviceFile | None = None
        # blkdebug (blkdebug.py): the rules told of the engine's events; None without it
        self.blkdebug = getattr(self.file, "blkdebug", None)
        self.force_share = force_share
        try:
            if locking:
                self.file.lock_for_use(force_share)
            self._open(data_file, passphrase, open_data_file, untrusted)
        except BaseException:
            self._close_files()
            raise

    # --- opening ------------------------------------------------------------------------

    def _open(
        self,
        data_file: DataFileTarget | None,
        passphrase,
        open_data_file: bool,
        untrusted: bool,
    ) -> None:
        file_size = self.file.size()
        self.header = hdr = Header.parse(self._read_header_bytes, file_size)
        self.dirty = bool(hdr.incompatible_features & S.INCOMPAT_DIRTY)
        self.repair_messages: list[str] = []  # what repairing a dirty image reported
        self.corrupt = bool(hdr.incompatible_features & S.INCOMPAT_CORRUPT)
        if self.corrupt and not self.read_only:
            raise CorruptImageError(
                f"qcow2: Image is corrupt; cannot be opened read/write ('{self.filename}' has "
                f"the corrupt bit set in incompatible_features)"
            )
        self.size = hdr.size
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.compat = "1.1" if hdr.version >= 3 else "0.10"
        self.refcount_bits = 1 << hdr.refcount_order
        self.lazy_refcounts = bool(hdr.compatible_features & S.COMPAT_LAZY_REFCOUNTS)
        self.extended_l2 = hdr.extended_l2
        self.compression_type = S.COMPRESSION_TYPES[hdr.compression_type]
        self.encrypted = hdr.crypt_method != 0
        self.backing_filename = hdr.backing_file
        self.backing_format = hdr.backing_format
        self.data_file = hdr.data_file  # its name as stored in the header
        self.data_file_raw = bool(hdr.autoclear_features & S.AUTOCLEAR_DATA_FILE_RAW)
        self.bitmaps: list[dict] = []  # persistent bitmaps: name, granularity, flags
        self._bitmap_entries: list[BitmapEntry] = []
        # Open for writing with valid bitmaps: a tracker keeps them up to date, or, for
        # bitmaps it cannot keep, _bitmaps_live has them invalidated at the first change.
        self._bitmap_tracker: BitmapTracker | None = None
        self._bitmaps_live = False
        self.backing: BlockDevice | None = None
        # options gave no backing node ("backing": null): the header's backing file is
        # not used, and unallocated clusters read as zeros (chain.py)
        self.backing_dropped = False
        self.has_data_file = has_data_file = bool(hdr.incompatible_features & S.INCOMPAT_DATA_FILE)
        if has_data_file:
            name = data_file or hdr.data_file
            if not name:
                raise CorruptImageError(
                    "'data-file' is required for this image (the external "
                    "data file bit is set but no data file name is stored)"
                )
            # As QEMU does, a relative name is taken from the working directory.
            if not open_data_file and not self.read_only:
                raise InvalidArgumentError("an image opened for writing needs its data file")
            if open_data_file and untrusted and not data_file:
                raise UntrustedImageError(
                    f"Untrusted image '{self.filename}' names the external data file '{name}': "
                    f"an untrusted image may not have one (its guest data would be read from "
                    f"and written to that host file)"
                )
            if open_data_file:
                from .containers import open_data_file as open_data_file_node

                self.data_host = open_data_file_node(
                    name,
                    writable=not self.read_only,
                    force_share=self.force_share,
                    named_by=None if data_file else self.filename,
                )
        elif hdr.data_file:
            raise CorruptImageError(
                "'data-file' can only be set for images with an external "
                "data file (data file name present, incompatible bit clear)"
            )
        elif data_file is not None and open_data_file:  # (QEMU opens it first)
            from .containers import open_data_file as open_data_file_node

            open_data_file_node(data_file, not self.read_only, self.force_share).close()
            raise InvalidArgumentError(
                "'data-file' can only be set for images with an external data file"
            )
        self._host_size = file_size
        self._lock = ImageLock()
        self._tables_lock = RLock()  # (see __getattr__)
        self._corruption_signaled = False  # (QEMU reports the first event only)
        self._cond: Condition | None = None  # made by the first _wait
        self._inflight: set[int] = set()
        self._io_active = 0
        # Opened read-only, no thread here can free or move a cluster: a read may use what
        # it looked up after dropping the lock without counting itself in flight
        self._layout_fixed = self.read_only
        self._closed = False
        self._last_decompressed: tuple[int, bytes] | None = None
        self._prealloc_detected: bool | None = None
        self._flush_failure: Qcow2IOError | None = None
        # Opened for writing, then stopped by corruption: metadata of the writes
        # acknowledged until then is still written back (flush, close).
        self._stopped_by_corruption = False
        self._compressed_tail = 0  # next free byte after the last compressed cluster written
        # Where metadata lies, for the pre-write overlap check: built at the first check
        # for the active L1 table `_overlaps_for`; a new L1 table, refcount structure or
        # header (set to None) has it rebuilt.
        self.overlaps = OverlapMap(self.cluster_bits)
        self._overlaps_for: array | None = None
        # self.map and self.refcounts: made at their first use (__getattr__); with blkdebug
        # beneath at open, as QEMU loads them (its rules may fail the reftable_load event)
        if self.blkdebug is not None:
            self.load_tables()
        self._load_bitmap_directory()
        self.crypto = None
        if self.encrypted and passphrase is not None:
            from .crypto import open_crypto  # loaded for encrypted images only (start-up time)

            self.crypto = open_crypto(
                hdr.crypt_method,
                self._read_header_bytes,
                hdr.crypto_offset,
                hdr.crypto_length,
                passphrase,
                cluster_size=self.cluster_size,
            )
        if not self.read_only:
            self._open_for_writing()

    def _load_bitmap_directory(self) -> None:
        """Persistent bitmaps (listed by info). Without the autoclear bit they are stale,
        and QEMU ignores them (stale_bitmaps: its open warns, a writer drops them)."""
        self.stale_bitmaps = not self.header.autoclear_features & S.AUTOCLEAR_BITMAPS and any(
            ext.type == S.EXT_BITMAPS for ext in self.header.extensions
        )
        if self.header.autoclear_features & S.AUTOCLEAR_BITMAPS:
            from .bitmaps import read_directory  # (images with bitmaps only: start-up time)

            self._bitmap_entries = read_directory(self.file, self.header, self.cluster_size)
            self.bitmaps = [entry.info() for entry in self._bitmap_entries]

    # The cluster map (L1 table, L2 cache) and the refcount structure are made at their
    # first use, not at open: info, snapshot -l and the like need neither, reads and map
    # need no refcounts, and the modules (arrays, run finding) and tables cost about 2 ms
    # of every start. QEMU reads both tables at open but validates neither's entries
    # there, so what an entry says is judged, as before, where it is used (a refcount
    # table entry with reserved bits fails a write, not a read).
    map: ClusterMap
    refcounts: Refcounts

    def __getattr__(self, name: str):
        if "_tables_lock" in self.__dict__:  # (the header is read: the open got that far)
            if name == "map":
                self._load_map()
                return self.__dict__["map"]
            if name == "refcounts":
                self.load_tables()
                return self.__dict__["refcounts"]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def _load_map(self) -> None:
        """Make the cluster map (reading the L1 table) if not made yet. Two threads' first
        uses make one; the lock is one of its own, which nothing else holds, so a first
        read never waits for the image's lock."""
        with self._tables_lock:
            if "map" not in self.__dict__:
                from .mapping import ClusterMap

                self.map = ClusterMap(self.file, self.header, self._data_size)

    def load_tables(self) -> None:
        """Make the cluster map and the refcounts (reading the L1 and refcount tables)
        where not made yet."""
        with self._tables_lock:
            self._load_map()
            if "refcounts" not in self.__dict__:
                hdr = self.header
                self.use_refcount_table(
                    hdr.refcount_table_offset, hdr.refcount_table_clusters, self._host_size
                )

    def _nothing_to_write_back(self) -> bool:
        """No refcounts made (every allocation and free makes them) and no map, or one
        with nothing changed: no metadata waits to be written."""
        if "refcounts" in self.__dict__:
            return False
        cluster_map = self.__dict__.get("map")
        return cluster_map is None or not (cluster_map.l2_cache.dirty or cluster_map.l1_dirty)

    def use_refcount_table(self, offset: int, clusters: int, file_size: int) -> None:
        """(Re)load the refcount structure from a table at offset."""
        from .refcount import Refcounts

        self.refcounts = Refcounts(
            self.file, self.cluster_bits, self.header.refcount_order, offset, clusters, file_size
        )
        self.refcounts.check_no_overlap = self.map.check_no_overlap
        self.refcounts.check_allocation = self._check_allocation
        self.refcounts.overlaps = self.overlaps
        self._overlaps_for = None
        self.map.set_refcount_table(offset, clusters)

    def _read_header_bytes(self, offset: int, length: int) -> bytes:
        return self.file.pread(length, offset)

    def _data_size(self) -> int:
        return self.data_host.size() if self.data_host else self._host_size

    def _open_for_writing(self) -> None:
        hdr = self.header
        changed = False  # (True: the whole header cluster is rewritten, as QEMU updates it)
        if hdr.autoclear_features & ~S.AUTOCLEAR_KNOWN:
            hdr.autoclear_features &= S.AUTOCLEAR_KNOWN  # features we would not keep up to date
            changed = True
        if self.stale_bitmaps:  # (as QEMU's writer: the extension no longer means anything)
            hdr.extensions = [ext for ext in hdr.extensions if ext.type != S.EXT_BITMAPS]
            changed = True
        if hdr.autoclear_features & S.AUTOCLEAR_BITMAPS:
            from .bitmaps import BitmapTracker, Untrackable

            try:
                tracker = BitmapTracker(self, self._bitmap_entries)
                self._bitmap_tracker = tracker if tracker.tracked else None
            except Untrackable:
                self._bitmaps_live = True
        if self.dirty:
            from .check import repair_dirty_image

            # QEMU's own repair, for its layout and its messages (the CLI prints them)
            self.repair_messages = repair_dirty_image(self)
            hdr.incompatible_features &= ~S.INCOMPAT_DIRTY
            self.dirty = False
            changed = True
        if self.lazy_refcounts:
            hdr.incompatible_features |= S.INCOMPAT_DIRTY
        if changed:
            self._write_header()
        elif self.lazy_refcounts:  # (the fields alone, as QEMU marks an image dirty)
            self._write_header_fields()
        if changed or self.lazy_refcounts:
            self._sync(self.file)

    def check_request(self, offset: int, length: int, write: bool = False) -> None:
        super().check_request(offset, length, write)
        if write:
            if "refcounts" not in self.__dict__:  # (made before the write counts itself in
                self.load_tables()  # flight: a table refused fails it before it begins)
            if self._bitmap_tracker is not None:
                with self._lock:
                    if self._bitmap_tracker is not None:
                        self._bitmap_tracker.mark(offset, length)
            elif self._bitmaps_live:
                self.invalidate_bitmaps()

    def invalidate_bitmaps(self) -> None:
        """Before a change persistent bitmaps cannot record (a snapshot applied, a resize,
        or any change to bitmaps the tracker cannot keep): clear their autoclear bit first,
        durably, as the format asks of such a writer (QEMU then ignores them)."""
        with self._lock:
            if not (self._bitmaps_live or self._bitmap_tracker):
                return
            self.header.autoclear_features &= ~S.AUTOCLEAR_BITMAPS
            self._write_header_fields()
            self._sync(self.file)
            self._bitmaps_live = False
            self._bitmap_tracker = None
            self.bitmaps = []

    def write_new_clusters(self, data: bytes, pad: bool = False) -> int:
        """Write `data` into newly allocated clusters and return their offset; nothing
        points at them until the caller's commit (a header or table write after the next
        write-back has made their refcounts durable). As QEMU, only the bytes of a table
        are written (a file ending with it ends where it does); pad=True zero-fills the
        last cluster (bitmap data, which QEMU writes in whole clusters)."""
        cs = self.cluster_size
        clusters = max(1, -(-len(data) // cs))
        offset = self.refcounts.allocate(clusters) << self.cluster_bits
        self.guard_write(offset, clusters * cs)
        written = bytes(data) + bytes(clusters * cs - len(data)) if pad else bytes(data)
        self.file.pwrite(written, offset)
        self._host_size = max(self._host_size, offset + len(written))
        return offset

    def _write_header(self) -> None:
        """Rewrite the header cluster (header, extensions, backing name), zeros after them
        to its end as QEMU writes it: nothing of an old extension or backing name stays."""
        data = self.header.pack()
        self._overlaps_for = None  # it may point at other structures now
        self.file.pwrite(data + bytes(max(0, self.cluster_size - len(data))), 0)

    def _write_header_fields(self) -> None:
        """Rewrite only the fixed header fields: one sector, so the write is atomic."""
        self._overlaps_for = None
        self.file.pwrite(self.header.pack_fields(), 0)

    # --- the pre-write overlap check ----------------------------------------------------
    # Header writes are not checked (as in QEMU): marking the image corrupt is one of them.

    def guard_write(self, host_offset: int, length: int, writing: int = 0) -> None:
        """Before writing host bytes [host_offset, host_offset + length) of the image file:
        refuse (EIO, image marked corrupt) if they touch metadata other than the kind of
        structure being written (`writing`, an overlap kind, 0 for guest data or a new
        structure)."""
        if self._overlaps_for is not self.map.l1:
            self._build_overlaps()
        kind = self.overlaps.find(host_offset, length, writing)
        if kind:
            self._refuse_overlap(kind)

    def _check_allocation(self, first_cluster: int, count: int) -> None:
        """The allocator's candidate clusters are free by their refcounts; refuse them if
        metadata lies there all the same (its refcount is wrong: the image is corrupt)."""
        self.guard_write(first_cluster << self.cluster_bits, count << self.cluster_bits)

    def _refuse_overlap(self, kind: int) -> None:
        error = Qcow2IOError(errno.EIO, corruption_notice(overlap_message(kind)), self.filename)
        self._signal_corruption(error)
        raise error

    def _build_overlaps(self) -> None:
        """Record every structure the overlap check covers, from the current state (the
        snapshot and bitmap modules loaded only for an image that has them)."""
        overlaps = self.overlaps
        overlaps.clear()
        cs = self.cluster_size
        hdr = self.header
        overlaps.add(HEADER, 0, cs)
        l1 = self.map.l1
        overlaps.add(ACTIVE_L1, self.map.l1_table_offset, len(l1) * 8)
        for entry in filter(None, l1):
            if entry & S.L1E_OFFSET_MASK:
                overlaps.add(ACTIVE_L2, entry & S.L1E_OFFSET_MASK, cs)
        refs = self.refcounts
        overlaps.add(REFCOUNT_TABLE, refs.table_offset, refs.table_clusters * cs)
        for entry in filter(None, refs.table):
            if entry & S.REFT_OFFSET_MASK:
                overlaps.add(REFCOUNT_BLOCK, entry & S.REFT_OFFSET_MASK, cs)
        if hdr.nb_snapshots:
            from .snapshot_table import cached_table

            try:
                snapshots, table_bytes = cached_table(self)
            except CorruptImageError:  # unreadable: at least its fixed-size entry headers
                snapshots, table_bytes = [], hdr.nb_snapshots * S.SNAPSHOT_ENTRY_HEADER_SIZE
            overlaps.add(SNAPSHOT_TABLE, hdr.snapshots_offset, table_bytes)
            for snap in snapshots:
                overlaps.add(INACTIVE_L1, snap.l1_table_offset, snap.l1_size * 8)
        info = None
        if hdr.autoclear_features & S.AUTOCLEAR_BITMAPS:
            from .bitmaps import bitmaps_extension, read_directory

            info = bitmaps_extension(hdr)
        if info is not None:
            overlaps.add(BITMAP_DIRECTORY, info.bitmap_directory_offset, info.bitmap_directory_size)
            try:
                entries = read_directory(self.file, hdr, cs)
            except CorruptImageError:
                entries = []
            for entry in entries:
                overlaps.add(BITMAP_TABLE, entry.table_offset, entry.table_size * 8)
        self._overlaps_for = l1

    # --- helpers ------------------------------------------------------------------------

    def _data_file(self) -> HostFile | None:
        """The plain host file holding the guest's clusters as they are stored (no
        encryption, no blkdebug, the external data file open if there is one): the fast
        read paths read it directly. None: reads take the general path."""
        target = self.data_host or self.file
        if (
            type(target) is not HostFile
            or self.encrypted
            or self.blkdebug is not None
            or (self.has_data_file and self.data_host is None)
        ):
            return None
        return target

    def plain_data_file(self) -> HostFile | None:
        """For a reader that takes host offsets from this image's extents: the file they
        point into, where reading them gives what reading the image does (as
        _data_file), while the image is open read-only (no cluster can be freed or
        moved meanwhile). None: read through the image."""
        return self._data_file() if self._layout_fixed else None

    def _data_target(self) -> ContainerFile:
        if self.has_data_file and self.data_host is None:
            raise InvalidArgumentError(
                f"'{self.filename}' was opened without its external data file"
            )
        return self.data_host or self.file

    def _guest_clusters(self, offset: int, length: int) -> range:
        return range(offset >> self.cluster_bits, (offset + length - 1 >> self.cluster_bits) + 1)

    def _begin_io(self, clusters: range | None = None) -> None:
        """Under the lock: wait until none of `clusters` is being allocated, then count us in."""
        if clusters is not None:
            while any(c in self._inflight for c in clusters) if self._inflight else False:
                self._wait()
        self._io_active += 1

    def _wait(self) -> None:
        """Under the lock: sleep until another thread calls _notify_all. The condition
        variable is made by the first wait (threading is imported only where a thread
        waits on an image, not by every qimg run: start-up time); until then, _notify_all
        has nobody to wake."""
        if self._cond is None:
            import threading

            self._cond = threading.Condition(self._lock)  # type: ignore[arg-type]
        self._cond.wait()

    def _notify_all(self) -> None:
        """Under the lock: wake every thread in _wait."""
        if self._cond is not None:
            self._cond.notify_all()

    def _end_io(self) -> None:
        with self._lock:
            self._io_active -= 1
            if not self._io_active:  # (only waits for no I/O at all end here)
                self._notify_all()

    # --- reading ------------------------------------------------------------------------

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer) if type(buffer) is bytearray else memoryview(buffer).cast("B")
        length = len(view)
        BlockDevice.check_request(self, offset, length)  # (what this class adds is for writes)
        if not length:
            return 0
        if self.encrypted:
            self._require_crypto()
        try:
            if length <= _CACHED_READ_MAX:
                if self._read_small(self.map, offset, view):
                    return length
            elif self._under_zero_l1(self.map, offset, length):
                fill_zeros(view)
                return length
            self.read_mapped(self.map, offset, view)
        except SignaledCorruptionError as exc:
            raise self._met_corruption(exc) from None
        return length

    def readv(self, offset: int, views: list[memoryview], length: int | None = None) -> int:
        """As BlockDevice.readv: each run of data clusters is one preadv straight into the
        views; zeros, backing, compressed and encrypted data go through a buffer."""
        data_file = self._data_file()
        if data_file is None or type(self).readinto is not Qcow2Image.readinto:
            return super().readv(offset, views, length)  # (the latter: reads done another way)
        total = sum(map(len, views)) if length is None else length
        self.check_request(offset, total)
        if not total:
            return 0
        try:
            return self._readv(data_file, offset, views, total)
        except SignaledCorruptionError as exc:
            raise self._met_corruption(exc) from None

    def _readv(self, data_file, offset: int, views: list[memoryview], total: int) -> int:
        with self._lock:
            host = self.map.data_run(offset, total)
            if host is not None:  # the common case: no segment list
                self._io_active += 1  # (as _begin_io)
            else:
                segments = self.map.lookup(offset, total)
                zeros = self._reads_as_zeros(segments)
                if not zeros:  # (as read_mapped)
                    self._begin_io()
        if host is not None:
            try:
                data_file.preadv(views, host, total)
            finally:
                self._end_io()
            return total
        if zeros:
            for view in views:
                fill_zeros(view)
            return total
        try:
            if len(segments) == 1 and segments[0].kind == DATA:  # one host run: one preadv
                assert segments[0].host_offset is not None  # (a data segment always has one)
                data_file.preadv(views, segments[0].host_offset)
                return total
            rest = views
            for seg in segments:
                parts, rest = split_views(rest, seg.length)
                if seg.kind == DATA:
                    assert seg.host_offset is not None  # (a data segment always has one)
                    data_file.preadv(parts, seg.host_offset)
                elif seg.kind == ZERO:
                    for part in parts:
                        fill_zeros(part)
                else:
                    buffer = memoryview(bytearray(seg.length))
                    self._read_segments([seg], buffer, seg.guest_offset)
                    scatter(buffer, parts)
        finally:
            self._end_io()
        return total

    def read(self, offset: int, length: int) -> bytes:
        """As BlockDevice.read, without a zero-filled buffer and a final copy: a range that
        reads as zeros is freshly allocated zero bytes (pages the system provides lazily),
        one host run is the bytes of one pread, anything else the join of its pieces."""
        self.check_request(offset, length)
        if not length:
            return b""
        if self.encrypted:  # decrypted in place in a buffer anyway
            return super().read(offset, length)
        try:
            return self._read_bytes(offset, length)
        except SignaledCorruptionError as exc:
            raise self._met_corruption(exc) from None

    def _read_bytes(self, offset: int, length: int) -> bytes:
        data_file = self._data_file()
        with self._lock:
            # (one run of data clusters, as read_mapped finds it: no segment list)
            host = self.map.data_run(offset, length) if data_file is not None else None
            if host is None:
                segments = self.map.lookup(offset, length)
                if self._reads_as_zeros(segments):  # no host I/O, so nothing to count in
                    return _zero_bytes(length)
            self._begin_io()
        try:
            if host is not None:
                assert data_file is not None  # (data_run was asked only with one)
                return data_file.pread(length, host)
            if len(segments) == 1 and segments[0].kind == DATA:
                host_offset = segments[0].host_offset
                assert host_offset is not None  # (a data segment always has one)
                if self.blkdebug is not None:
                    self.blkdebug.event("read_aio")
                return self._data_target().pread(length, host_offset)
            return b"".join(self._segment_pieces(segments))
        finally:
            self._end_io()

    def host_pieces(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        self.check_request(offset, length)
        data_file = self._data_file()
        if (
            not self.read_only
            or data_file is None
            or type(self).readinto is not Qcow2Image.readinto  # reads done another way
        ):
            return None
        with self._lock:
            segments = self.map.lookup(offset, length)
        backing = self.backing
        pieces: list[tuple[int, int, int]] = []
        for seg in segments:
            if seg.kind == DATA:
                assert seg.host_offset is not None  # (a data segment always has one)
                pieces.append((data_file.fd, seg.host_offset, seg.length))
            elif (
                seg.kind == BACKING
                and backing is not None
                and (seg.guest_offset + seg.length <= backing.size)
            ):
                below = backing.host_pieces(seg.guest_offset, seg.length)
                if below is None:
                    return None
                pieces += below
            else:
                return None
        return pieces

    def _reads_as_zeros(self, segments: list[Segment]) -> bool:
        """Whether metadata alone says the segments read as zeros (no data cluster,
        nothing from a backing file)."""
        backing_size = self.backing.size if self.backing is not None else 0
        return all(
            seg.kind == ZERO or seg.kind == BACKING and seg.guest_offset >= backing_size
            for seg in segments
        )

    def _segment_pieces(self, segments: list[Segment]) -> list[bytes]:
        """The bytes of each segment, in order (as _read_segments, for read())."""
        pieces: list[bytes] = []
        compressed = []
        data_file = self._data_target()
        for seg in segments:
            if seg.kind == DATA:
                assert seg.host_offset is not None  # (a data segment always has one)
                pieces.append(data_file.pread(seg.length, seg.host_offset))
            elif seg.kind == ZERO:
                pieces.append(bytes(seg.length))
            elif seg.kind == BACKING:
                pieces.append(self._backing_bytes(seg.guest_offset, seg.length))
            else:
                compressed.append((len(pieces), seg))
                pieces.append(b"")
        plains: Iterable[bytes]
        if len(compressed) > 1:
            from . import codecs  # (here and below: images with compressed clusters only)

            plains = codecs.pool().map(lambda item: self._cluster_plain(item[1]), compressed)
        else:
            plains = [self._cluster_plain(seg) for _, seg in compressed]
        for (index, seg), plain in zip(compressed, plains):
            start = seg.guest_offset - seg.cluster_offset
            pieces[index] = plain[start : start + seg.length]
        return pieces

    def _backing_bytes(self, guest_offset: int, length: int) -> bytes:
        backing = self.backing
        available = 0
        if backing is not None:
            available = max(0, min(length, backing.size - guest_offset))
        if backing is None or not available:
            return bytes(length)
        data = backing.read(guest_offset, available)
        return data if available == length else data + bytes(length - available)

    def read_mapped(self, cluster_map: ClusterMap, offset: int, view: memoryview) -> None:
        """Read guest data through `cluster_map` (the active L1 table, or a snapshot's)."""
        if (
            cluster_map is not self.map  # (readinto asked _read_small already)
            and len(view) <= _CACHED_READ_MAX
            and self._read_small(cluster_map, offset, view)
        ):
            return
        length = len(view)
        data_file = self._data_file()
        host = None
        segments: list[Segment] | None = None
        with self._lock:
            # The large read's shortcuts past `lookup` (no segment list): one run of data
            # clusters, read with one syscall, or a range this layer leaves unallocated,
            # read from the backing file (zeros past its end). A read through a backing
            # chain takes one of them at every layer for each extent of the chain.
            if data_file is not None:
                host = cluster_map.data_run(offset, length)
            if host is not None:
                zeros = False
            elif cluster_map.unallocated_run(offset, length):
                backing = self.backing
                zeros = backing is None or offset >= backing.size
            else:
                segments = cluster_map.lookup(offset, length)
                zeros = self._reads_as_zeros(segments)
            if not zeros:  # (reads of holes touch no host cluster that a writer could free)
                self._begin_io()
        if zeros:
            fill_zeros(view)
            return
        try:
            if host is not None:
                assert data_file is not None  # (data_run was asked only with one)
                data_file.readinto(view, host)
            elif segments is None:
                self._read_backing(offset, view)
            else:
                self._read_segments(segments, view, offset)
        finally:
            self._end_io()

    def _under_zero_l1(self, cluster_map: ClusterMap, offset: int, length: int) -> bool:
        """Whether the range lies under one L1 entry of zero (no L2 table) and past any
        backing file: then it reads as zeros, without the lock (see _read_small)."""
        l1 = cluster_map.l1
        l1_index = offset >> cluster_map.l1_shift
        return (
            l1_index < len(l1)
            and not l1[l1_index]
            and (offset + length - 1) >> cluster_map.l1_shift == l1_index
            and (self.backing is None or offset >= self.backing.size)
        )

    def _read_small(self, cluster_map: ClusterMap, offset: int, view: memoryview) -> bool:
        """The small read inside one cluster, as cheap as it gets: a hole is zero-filled
        after one lock round trip, and data in the page cache is read while the lock is
        held (one lock round trip, nothing counted; with other threads running, by a
        read that keeps the GIL, so that no other thread can queue on the lock while it
        lasts). Data that is not cached is read after the lock is dropped, counted in
        flight as usual (no writer frees the cluster meanwhile), so that reads waiting
        for the disk overlap; a read-only image's is read uncounted (nothing can free
        the cluster). False: not such a read.
        A range under an L1 entry of zero (no L2 table) needs no lock: it reads as a hole
        at the instant of that one entry's load, which a writer changes in one store."""
        if self._under_zero_l1(cluster_map, offset, len(view)):
            view[:] = _ZEROS_VIEW[: len(view)]
            return True
        with self._lock:
            host = cluster_map.read_host(offset, len(view))
            if host is None:
                return False
            if host < 0:  # unallocated: the backing file's bytes, zeros past its end
                backing = self.backing
                if backing is not None and offset < backing.size:
                    return False
            else:
                target = self._data_file()
                if target is None:
                    return False
                if target.readinto_cached(view, host):
                    return True
                counted = not self._layout_fixed
                if counted:
                    self._io_active += 1  # (as _begin_io: readers wait for no allocation)
        if host < 0:
            view[:] = _ZEROS_VIEW[: len(view)]  # (_CACHED_READ_MAX is below its size)
            return True
        assert target is not None  # (a data cluster found its file above)
        if not counted:
            target.readinto(view, host)
            return True
        try:
            target.readinto(view, host)
        finally:
            self._end_io()
        return True

    def _require_crypto(self) -> SectorCrypto:
        """The cipher of an (encrypted) image; refused when opened without the passphrase."""
        if self.crypto is None:
            raise BadSecretError(
                f"'{self.filename}' is encrypted: its data cannot be read or written without "
                f"the passphrase (encrypt.key-secret)"
            )
        return self.crypto

    def _read_segments(self, segments: list[Segment], view: memoryview, base: int) -> None:
        compressed = []
        data_file = self._data_target()
        for seg in segments:
            part = view[seg.guest_offset - base : seg.guest_offset - base + seg.length]
            if seg.kind == DATA:
                assert seg.host_offset is not None  # (a data segment always has one)
                if self.encrypted:
                    self._read_encrypted(part, seg.host_offset, seg.guest_offset)
                else:
                    if self.blkdebug is not None:
                        self.blkdebug.event("read_aio")
                    data_file.readinto(part, seg.host_offset)
            elif seg.kind == ZERO:
                fill_zeros(part)
            elif seg.kind == BACKING:
                self._read_backing(seg.guest_offset, part)
            else:
                compressed.append((seg, part))
        if len(compressed) > 1:
            from . import codecs

            results = codecs.pool().map(lambda item: self._cluster_plain(item[0]), compressed)
            for (seg, part), plain in zip(compressed, results):
                start = seg.guest_offset - seg.cluster_offset
                part[:] = plain[start : start + seg.length]
        elif compressed:
            seg, part = compressed[0]
            plain = self._cluster_plain(seg)
            start = seg.guest_offset - seg.cluster_offset
            part[:] = plain[start : start + seg.length]

    def _read_encrypted(self, part: memoryview, host: int, guest: int) -> None:
        """Read whole sectors around the range and decrypt them (IVs are per sector)."""
        crypto = self._require_crypto()
        start = host & ~511
        end = (host + len(part) + 511) & ~511
        buf = bytearray(end - start)
        self._data_target().readinto(memoryview(buf), start)
        crypto.decrypt(crypto.sector_number(start, guest - (host - start)), buf)
        part[:] = memoryview(buf)[host - start : host - start + len(part)]

    def _read_backing(self, guest_offset: int, part: memoryview) -> None:
        backing = self.backing
        available = 0
        if backing is not None:
            available = max(0, min(len(part), backing.size - guest_offset))
            if available:
                backing.readinto(guest_offset, part[:available])
        if available < len(part):
            fill_zeros(part[available:])

    def _cluster_plain(self, seg: Segment) -> bytes:
        """Decompressed content of a compressed cluster (the last one is remembered)."""
        last = self._last_decompressed
        if last is not None and last[0] == seg.host_offset:
            return last[1]
        assert seg.host_offset is not None  # (a compressed segment always has one)
        from . import codecs

        raw = self.file.pread(seg.compressed_size, seg.host_offset)
        plain = codecs.decompress(
            self.compression_type,
            raw,
            self.cluster_size,
            f" at host offset 0x{seg.host_offset:x} (guest offset 0x{seg.cluster_offset:x})",
        )
        self._last_decompressed = (seg.host_offset, plain)
        return plain

    # --- extents ------------------------------------------------------------------------

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        try:
            yield from self.mapped_extent_batches(self.map, offset, length, active=True)
        except SignaledCorruptionError as exc:
            raise self._met_corruption(exc) from None

    def mapped_extent_batches(
        self, cluster_map: ClusterMap, offset: int, length: int, active: bool
    ) -> Iterator[list[Extent]]:
        """Extents of [offset, offset+length) through `cluster_map`, one window of at most
        EXTENT_WINDOW_CLUSTERS L2 entries at a time (the backing file's answers in its
        own windows), so work and memory follow the window, not the image. active=False
        (a snapshot's map) reports neither preallocated holes nor encrypted data apart."""
        holes_are_zero = active and self._metadata_preallocated()
        hide_host = active and self.encrypted
        no_backing = self.backing is None
        own_zero_host = active and no_backing and not self.encrypted
        window = EXTENT_WINDOW_CLUSTERS // (S.SUBCLUSTERS if self.extended_l2 else 1)
        # Nothing below, data not split by host holes nor hidden: a data segment is a data
        # extent, a segment without a host offset a zero one, whatever the rest is.
        simple = no_backing and not holes_are_zero and not hide_host
        below: list[_BackingCursor] = []  # (made by the first range left to the backing file)
        pos, end = offset, offset + length
        while pos < end:
            with self._lock:
                segments, stop, error = cluster_map.lookup_window(
                    pos, end - pos, window, status=True
                )
            if simple:  # (the usual window: made a column at a time)
                batch = _data_and_hole_extents(segments) if segments else []
                if batch is not None:
                    if batch:
                        yield batch
                    if error is not None:
                        raise error
                    pos = stop
                    continue
            batch = []
            add = batch.append
            for seg in segments:
                kind = seg.kind
                if (
                    kind is BACKING
                    and no_backing
                    and (seg.host_offset is None or not own_zero_host)
                ):
                    # reads as zeros, nothing below (the most common segment: first)
                    add(
                        _new_tuple(
                            Extent, (seg.guest_offset, seg.length, False, True, 0, None, False)
                        )
                    )
                elif kind is ZERO:
                    add(
                        _new_tuple(
                            Extent,
                            (seg.guest_offset, seg.length, False, True, 0, seg.host_offset, True),
                        )
                    )
                elif kind is DATA:
                    if holes_are_zero and not hide_host:
                        for ext in self._data_extents_by_holes(seg):
                            add(ext)
                            if len(batch) >= RAW_EXTENT_BATCH:  # a fragmented host file
                                yield batch
                                batch = []
                                add = batch.append
                    else:
                        add(
                            _new_tuple(
                                Extent,
                                (
                                    seg.guest_offset,
                                    seg.length,
                                    True,
                                    False,
                                    0,
                                    None if hide_host else seg.host_offset,
                                    True,
                                ),
                            )
                        )
                elif kind is COMPRESSED:
                    add(Extent(seg.guest_offset, seg.length, True, False, 0, None))
                elif seg.host_offset is not None and own_zero_host:
                    add(
                        Extent(seg.guest_offset, seg.length, False, True, 0, seg.host_offset, False)
                    )
                else:  # (the backing file's answer joins the batch: small ones are many)
                    try:
                        for piece in self._backing_extent_batches(
                            seg.guest_offset, seg.length, below
                        ):
                            batch += piece
                            if len(batch) >= RAW_EXTENT_BATCH:
                                yield batch
                                batch = []
                                add = batch.append
                    except Qcow2Error:
                        if batch:  # (what was found before the error is reported)
                            yield batch
                        raise
            if batch:
                yield batch
            if error is not None:
                raise error
            pos = stop

    def _metadata_preallocated(self) -> bool:
        """Whether many mapped clusters have no blocks on disk (QEMU's heuristic).

        Then, as in qemu-img map, data clusters that are holes in the host file report zero.
        """
        if self._prealloc_detected is None:
            with self._lock:
                real_clusters = self.file.allocated_bytes() // self.cluster_size
                threshold = max(real_clusters * 10 // 9, real_clusters + 2)
                end_cluster = -(-self.file.size() // self.cluster_size)
                try:
                    refcounts = self.refcounts
                except CorruptImageError:  # (a table refused for writes: reads and map go
                    self._prealloc_detected = False  # on, as QEMU's, which masks the bits)
                    return False
                count = refcounts.count_in_use(end_cluster, threshold)
                self._prealloc_detected = count >= threshold
        return self._prealloc_detected

    def _data_extents_by_holes(self, seg: Segment) -> Iterator[Extent]:
        """A data run split where its host range has holes (those read as zeros)."""
        host = self._data_target()
        host_offset = seg.host_offset
        assert host_offset is not None  # (a data segment always has one)
        pos, end = host_offset, host_offset + seg.length
        while pos < end:
            is_data, run_end = host.data_run(pos, end)
            yield Extent(
                seg.guest_offset + pos - host_offset, run_end - pos, True, not is_data, 0, pos
            )
            pos = run_end

    def _backing_extent_batches(
        self, offset: int, length: int, below: list[_BackingCursor]
    ) -> Iterator[list[Extent]]:
        """What the backing file says of a range this layer leaves unallocated (one level
        deeper); past its end, or without one, the range reads as zeros. `below`: the
        walk's cursor over a backing file nothing writes (made on first use), which
        answers the walk's ranges, asked in order, from one walk of its tables."""
        backing = self.backing
        inside = 0 if backing is None else max(0, min(length, backing.size - offset))
        if backing is not None and inside:
            if getattr(backing, "_layout_fixed", False):
                if not below:
                    below.append(_BackingCursor(backing))
                extents, error = below[0].take(offset, offset + inside)
                yield extents
                if error is not None:
                    raise error
            else:
                for batch in backing.extent_batches(offset, inside):
                    yield [
                        Extent(
                            ext.offset,
                            ext.length,
                            ext.is_data,
                            ext.is_zero,
                            ext.depth + 1,
                            ext.host_offset,
                            ext.present,
                        )
                        for ext in batch
                    ]
        if inside < length:
            yield [Extent(offset + inside, length - inside, False, True, 0, None, False)]

    # --- writing ------------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        if view:
            self._write_checked(offset, view, in_place=True)

    def writev(self, offset: int, views: list[memoryview], length: int | None = None) -> int:
        """As BlockDevice.writev: a range of clusters this image owns in one host run is
        written straight from the views (one pwritev, no joined copy); anything else
        joins them and takes write's path."""
        total = sum(map(len, views)) if length is None else length
        self.check_request(offset, total, write=True)
        if not total:
            return 0
        if self.encrypted or not self._write_in_place(offset, views, total):
            # the general path, which need not try in place again
            joined = views[0] if len(views) == 1 else memoryview(b"".join(views))
            self._write_checked(offset, joined, in_place=False)
        return total

    def _write_checked(self, offset: int, view: memoryview, in_place: bool) -> None:
        """A checked, non-empty write; in_place=False: _write_in_place was asked already."""
        if self.encrypted:  # ciphers work on whole sectors: read, merge, rewrite the edges
            self._require_crypto()
            start, end = offset & ~511, min(self.size, (offset + len(view) + 511) & ~511)
            if (start, end) != (offset, offset + len(view)):
                merged = bytearray(self.read(start, end - start))
                merged[offset - start : offset - start + len(view)] = view
                offset, view = start, memoryview(merged)
        elif (
            in_place
            and (offset + len(view) - 1) >> self.cluster_bits != offset >> self.cluster_bits
            and self._write_in_place(offset, [view], len(view))
        ):  # (a write inside one cluster is decided below, in one lock round trip)
            return
        if in_place and not self.encrypted:
            with self._lock:  # the common small write into a cluster this image owns
                host = self._in_place_host(offset, len(view))
                if host >= 0:
                    self._io_active += 1  # (as _begin_io: the cluster is not being allocated)
            if host >= 0:
                try:
                    if self.blkdebug is not None:
                        self.blkdebug.event("write_aio")
                    self._data_target().pwrite(view, host)
                finally:
                    self._end_io()
                return
        # A write that allocates takes the image lock to plan and to publish, and writes
        # in between. With other threads running, its syscalls there (the new clusters'
        # fallocate, a small cached write) keep the GIL (HostFile.allocate, HostFile's
        # held writes), so that a thread rarely finds the lock held: letting the GIL go
        # at each of them made the threads queue on the lock, or on a lock around the
        # whole write, handing the GIL over at every write (8 threads of 4 KiB writes to
        # new clusters: 1.4-1.8 s either way, 1.0-1.3 s keeping it).
        self._write_planned(offset, view)
        self._maybe_write_back()

    def _write_planned(self, offset: int, view: memoryview) -> None:
        """Plan under the lock (new clusters, copy-on-write fills), write the data outside
        it, then publish the new entries (or give the clusters back if the write failed)."""
        clusters = self._guest_clusters(offset, len(view))
        with self._lock:
            self._begin_io(clusters)
            unused_from = self.refcounts.end_cluster  # (clusters past it read zeros)
            try:
                direct, changes = self._plan_write(offset, len(view))
            except SignaledCorruptionError as exc:
                self._io_active -= 1
                raise self._met_corruption(exc) from None
            except CorruptImageError as exc:
                self._io_active -= 1
                self._signal_corruption(exc)
                raise
            except BaseException:
                self._io_active -= 1
                raise
            zeroed = self._skip_zero_fill(changes, offset, len(view), unused_from)
            for change in changes:
                self._inflight.update(
                    range(change.cluster_index, change.cluster_index + change.count)
                )
        ok = False
        file_end = 0  # where the image file now ends at least
        try:
            for change, fill_start, fill_end in zeroed:
                try:  # (the file then ends where QEMU's would, past the cluster)
                    self.file.allocate(change.host, change.count * self.cluster_size)
                    file_end = max(file_end, change.host + change.count * self.cluster_size)
                except Qcow2IOError:  # not on this file system: write the zeros after all
                    change.fill_start, change.fill_end = fill_start, fill_end
            file_end = max(file_end, self._write_data(offset, view, direct, changes))
            ok = True
        finally:
            with self._lock:
                try:
                    if ok:  # (the file's new end is known before any entry points past it)
                        self._host_size = max(self._host_size, file_end)
                        self._commit(changes)
                    else:
                        self._abandon(changes)
                finally:
                    for change in changes:
                        self._inflight.difference_update(
                            range(change.cluster_index, change.cluster_index + change.count)
                        )
                    self._io_active -= 1
                    self._notify_all()

    def _skip_zero_fill(
        self, changes: list[_ClusterWrite], offset: int, length: int, unused_from: int
    ) -> list[tuple[_ClusterWrite, int, int]]:
        """Under the lock, after planning: a new cluster at or past `unused_from` (the
        refcounts' end of everything used, taken before planning) holds zeros: nothing
        was ever written there, and only this write uses it now. Where the guest sees
        zeros around the data, no zeros need writing: the cluster's fill shrinks to the
        data itself, so a 4 KiB write writes 4 KiB, not a whole cluster. Returns those
        changes with their planned fills; the caller allocates each cluster in the file
        as zeros (fallocate), as QEMU zeroes a new cluster without writing it, and puts
        the fill back where it cannot."""
        zeroed: list[tuple[_ClusterWrite, int, int]] = []
        if not changes or self.file is not self._data_target() or type(self.file) is not HostFile:
            return zeroed  # (an external data file's clusters are not the refcounts')
        if self.encrypted or self.blkdebug is not None:  # (zeros must be encrypted)
            return zeroed
        end = offset + length
        bits = self.cluster_bits
        backing_size = self.backing.size if self.backing is not None else 0
        for change in changes:
            if not change.new_host or change.host >> bits < unused_from:
                continue
            cluster_start = change.cluster_index << bits
            fill_start = cluster_start + change.fill_start
            fill_end = cluster_start + change.fill_end
            data_start, data_end = max(offset, fill_start), min(end, fill_end)
            if not (fill_start < data_start or data_end < fill_end):
                continue
            fill_length = min(fill_end, self.size) - fill_start
            if (  # an unallocated standard entry (the common case) shows the backing file
                self._backing_reads_zeros(fill_start, fill_length, backing_size)
                if not self.extended_l2 and self.map.get_entry(change.cluster_index)[0] == 0
                else self._reads_as_zeros(self.map.lookup(fill_start, fill_length))
            ):
                zeroed.append((change, change.fill_start, change.fill_end))
                change.fill_start = data_start - cluster_start
                change.fill_end = data_end - cluster_start
        return zeroed

    def _backing_reads_zeros(self, offset: int, length: int, backing_size: int) -> bool:
        """Whether the backing file reads zeros over [offset, +length) (past its end it
        does), told by its block status alone, as QEMU's is_zero_cow asks: a first small
        write where the backing file has a hole (a rebase, an overlay over a sparse
        image) then writes its data, not a cluster of zeros."""
        inside = min(length, backing_size - offset)
        backing = self.backing
        if inside <= 0 or backing is None:
            return True
        try:
            return all(ext.is_zero for ext in backing.iter_extents(offset, inside))
        except Qcow2Error:  # (no answer: the zeros are written, as they always were)
            return False

    def _write_in_place(self, offset: int, buffers: list, length: int) -> bool:
        """Fast path for writes into clusters this image owns: the byte views `buffers`
        (`length` bytes in all) land in one host run of standard, COPIED data clusters,
        none being allocated, so no metadata changes and nothing is copied. False: take
        the general path."""
        if self.extended_l2:
            return False
        with self._lock:
            if self._inflight and not self._inflight.isdisjoint(
                self._guest_clusters(offset, length)
            ):
                return False
            try:
                host = self.map.data_run(offset, length, overlap=False)
            except SignaledCorruptionError:
                return False  # (the general path meets it too, and words it as QEMU)
            except CorruptImageError as exc:
                self._signal_corruption(exc)
                raise
            if host is None or not self.map.get_entry(offset >> self.cluster_bits)[0] & (
                S.OFLAG_COPIED
            ):  # (not COPIED: a snapshot shares the clusters, which are copied first)
                return False
            if not self.has_data_file:
                self.guard_write(host, length)  # (the whole run at once, as QEMU checks it)
            self._io_active += 1
        try:
            if self.blkdebug is not None:
                self.blkdebug.event("write_aio")
            target = self._data_target()
            _write_run(target, buffers, host, length)
            if target is self.file and host + length > self._host_size:
                with self._lock:
                    self._host_size = max(self._host_size, host + length)
        finally:
            self._end_io()
        return True

    def _in_place_host(self, offset: int, length: int) -> int:
        """Under the lock, for the common small write: inside one cluster this image owns
        (standard L2 entry, COPIED, not zero, not being allocated), the host offset the
        bytes go to, checked against the metadata. -1: take the general path."""
        cluster_index = offset >> self.cluster_bits
        if (
            (offset + length - 1) >> self.cluster_bits != cluster_index
            or self.extended_l2
            or cluster_index in self._inflight
        ):
            return -1
        entry, _ = self.map.get_entry(cluster_index)
        if (
            entry & (S.OFLAG_COMPRESSED | S.OFLAG_ZERO)
            or not entry & S.OFLAG_COPIED
            or not self.map.has_host(entry)
        ):  # COPIED at offset 0 is unallocated
            return -1
        try:
            self._check_copied_host(entry, offset)
            self.map.validate_entry(entry, 0, cluster_index, overlap=False)
        except SignaledCorruptionError as exc:
            raise self._met_corruption(exc) from None
        except CorruptImageError as exc:
            self._signal_corruption(exc)
            raise
        host = (entry & S.L2E_OFFSET_MASK) + (offset & (self.cluster_size - 1))
        if not self.has_data_file:
            self.guard_write(host, length)
        return host

    def _plan_write(self, offset: int, length: int):
        """Under the lock: direct host runs, and the clusters whose entries must change."""
        direct: list[tuple[int, int, int]] = []  # (guest offset, length, host offset)
        changes: list[_ClusterWrite] = []
        has_data_file = self.has_data_file
        clusters = self._guest_clusters(offset, length)
        if self.extended_l2:
            for cluster_index in clusters:
                self._plan_cluster(cluster_index, offset, length, direct, changes)
        else:
            for first, count, unallocated in self._standard_shares(clusters):
                if unallocated:  # one change for the run: nothing to read, validate or free
                    change = _ClusterWrite(first, count)
                    change.fill_end = count * self.cluster_size
                    change.entry = S.OFLAG_COPIED
                    change.new_host = True
                    changes.append(change)
                else:
                    self._plan_cluster(first, offset, length, direct, changes)
        if not has_data_file:  # before allocating: a refused request allocates nothing
            for _, run_length, host in direct:
                self.guard_write(host, run_length)
        # One L2 table's share at a time: its table (if new) before its data clusters,
        # so a write across a table boundary is laid out as QEMU lays it out.
        start = 0
        while start < len(changes):
            l1_index = changes[start].cluster_index // self.map.l2_entries
            end = start + 1
            while (
                end < len(changes) and changes[end].cluster_index // self.map.l2_entries == l1_index
            ):
                end += 1
            self._writable_l2(l1_index)
            self._assign_hosts(changes[start:end])
            start = end
        if not has_data_file:  # one check per run of host-contiguous fills
            run_start = run_end = -1
            for change in changes:
                if change.new_host:  # (the allocator checked its whole cluster)
                    continue
                start = change.host + change.fill_start
                if start != run_end:
                    if run_end > run_start:
                        self.guard_write(run_start, run_end - run_start)
                    run_start = start
                run_end = change.host + change.fill_end
            if run_end > run_start:
                self.guard_write(run_start, run_end - run_start)
        return direct, changes

    def _plan_cluster(
        self, cluster_index: int, offset: int, length: int, direct: list, changes: list
    ) -> None:
        """_plan_write's step for one cluster with an entry (or of an extended L2 table)."""
        cs = self.cluster_size
        bits = self.cluster_bits
        end = offset + length
        sub = self.map.subcluster_size
        has_data_file = self.has_data_file
        cluster_start = cluster_index << bits
        ws = max(offset, cluster_start) - cluster_start
        we = min(end, cluster_start + cs) - cluster_start
        entry, bitmap = self.map.get_entry(cluster_index)
        host = entry & S.L2E_OFFSET_MASK
        self._check_copied_host(entry, cluster_start + ws)
        self.map.validate_entry(entry, bitmap, cluster_index, overlap=False)
        compressed = bool(entry & S.OFLAG_COMPRESSED)
        mapped = self.map.has_host(entry)
        copied = mapped and (bool(entry & S.OFLAG_COPIED) or has_data_file)
        change = _ClusterWrite(cluster_index)
        if not self.extended_l2:
            if copied and not entry & S.OFLAG_ZERO:
                direct.append((cluster_start + ws, we - ws, host + ws))
                return
            change.fill_start, change.fill_end = 0, cs
            change.entry = S.OFLAG_COPIED
            if copied:  # preallocated zero cluster: reuse it
                change.host = host
            else:
                change.new_host = True
                change.free_clusters = self._clusters_of(entry)
        else:
            alloc = bitmap & 0xFFFFFFFF
            first_sub, last_sub = ws // sub, (we - 1) // sub
            touched = ((1 << (last_sub + 1)) - 1) & ~((1 << first_sub) - 1)
            if copied:
                if touched & ~alloc == 0:
                    direct.append((cluster_start + ws, we - ws, host + ws))
                    return
                change.host = host
                change.fill_start, change.fill_end = first_sub * sub, (last_sub + 1) * sub
                new_alloc = alloc | touched
                change.bitmap = new_alloc | ((bitmap >> 32) & ~new_alloc) << 32
            elif mapped or compressed:  # shared or compressed: copy the whole cluster
                change.new_host = True
                change.fill_start, change.fill_end = 0, cs
                change.bitmap = S.L2_BITMAP_ALL_ALLOC
                change.free_clusters = self._clusters_of(entry)
            else:
                change.new_host = True
                change.fill_start, change.fill_end = first_sub * sub, (last_sub + 1) * sub
                change.bitmap = touched | ((bitmap >> 32) & ~touched) << 32
            change.entry = S.OFLAG_COPIED
        changes.append(change)

    def _standard_shares(self, clusters: range) -> Iterator[tuple[int, int, bool]]:
        """(first cluster, count, unallocated) pieces of `clusters`, in order, within one
        L2 table each: runs of zero standard entries (unallocated, no flags), found at C
        speed, and single clusters that have an entry."""
        entries = self.map.l2_entries
        first = clusters.start
        while first < clusters.stop:
            l1_index = first // entries
            stop = min(clusters.stop, (l1_index + 1) * entries)
            # (past the L1 table: _writable_l2 reports it)
            table = self.map.l2_table(l1_index) if l1_index < len(self.map.l1) else None
            if table is None:
                yield first, stop - first, True
            elif stop - first == 1:  # (a write inside one cluster: its entry alone)
                yield first, 1, not table[first - l1_index * entries]
            else:
                from .runs import nonzero_positions  # (loaded with the map already)

                low = first - l1_index * entries
                run_start = first
                for position in nonzero_positions(table[low : low + stop - first]):
                    cluster_index = first + position
                    if cluster_index > run_start:
                        yield run_start, cluster_index - run_start, True
                    yield cluster_index, 1, False
                    run_start = cluster_index + 1
                if stop > run_start:
                    yield run_start, stop - run_start, True
            first = stop

    def _clusters_of(self, entry: int) -> list[tuple[int, int]]:
        """Host cluster runs an L2 entry holds a reference on (for freeing)."""
        if entry & S.OFLAG_COMPRESSED:
            host = entry & self.map.compressed_offset_mask
            sectors = ((entry >> self.map.csize_shift) & self.map.csize_mask) + 1
            first = (host & ~511) >> self.cluster_bits
            last = ((host & ~511) + sectors * 512 - 1) >> self.cluster_bits
            return [(first, last - first + 1)]
        host = entry & S.L2E_OFFSET_MASK
        if host and not self.has_data_file:
            return [(host >> self.cluster_bits, 1)]
        return []

    def _assign_hosts(self, changes: list[_ClusterWrite]) -> None:
        """Give new clusters host offsets, contiguous for neighbouring guest clusters."""
        if self.has_data_file:
            for change in changes:
                if change.new_host:  # external data files map guest offset == host offset
                    change.host = change.cluster_index << self.cluster_bits
            return
        index = 0
        while index < len(changes):
            if not changes[index].new_host:
                index += 1
                continue
            run_end = index + 1
            clusters = changes[index].count
            while (
                run_end < len(changes)
                and changes[run_end].new_host
                and changes[run_end].cluster_index
                == changes[run_end - 1].cluster_index + changes[run_end - 1].count
            ):
                clusters += changes[run_end].count
                run_end += 1
            first = self.refcounts.allocate(clusters)
            for change in changes[index:run_end]:
                change.host = first << self.cluster_bits
                first += change.count
            index = run_end

    def _writable_l2(self, l1_index: int) -> None:
        if l1_index >= len(self.map.l1):
            raise CorruptImageError(
                f"guest offset beyond the L1 table (L1 index {l1_index}, "
                f"l1_size {len(self.map.l1)})"
            )
        entry = self.map.l1[l1_index]
        offset = self.map.l2_offset(l1_index)
        if offset and entry & S.OFLAG_COPIED:
            return
        words = self.map.l2_entries * self.map.entry_words
        if offset:
            # Shared with a snapshot: copy it. Refcounts count L1 -> L2 -> cluster paths, so
            # the clusters it points at keep their counts; only the table changes hands.
            table = self.map.l2_cache.get(offset).__copy__()
        else:
            from .cache import decode_be64  # (a new L2 table: not the hot path)

            table = decode_be64(bytes(words * 8))
        new_cluster = self.refcounts.allocate(1)
        new_offset = new_cluster << self.cluster_bits
        if offset:
            self.refcounts.free(offset >> self.cluster_bits)
            self.overlaps.remove(ACTIVE_L2, offset, self.cluster_size)  # a snapshot's alone now
        self.map.l2_cache.put(new_offset, table)
        self.map.l1[l1_index] = new_offset | S.OFLAG_COPIED
        self.map.l1_dirty.add(l1_index)
        self.overlaps.add(ACTIVE_L2, new_offset, self.cluster_size)

    def _write_data(self, offset: int, view: memoryview, direct, changes) -> int:
        """Outside the lock: write the data and the copy-on-write fill, in host-contiguous
        runs. Returns the end of the bytes written into the image file (0: none)."""
        runs: list[list] = []  # [host offset, end offset, buffers]

        crypto = self.crypto

        def add(host: int, buffer, guest: int) -> None:
            if crypto is not None:
                buffer = bytearray(buffer)
                crypto.encrypt(crypto.sector_number(host, guest), buffer)
            if runs and runs[-1][1] == host:
                runs[-1][1] += len(buffer)
                runs[-1][2].append(buffer)
            else:
                runs.append([host, host + len(buffer), [buffer]])

        for guest, length, host in direct:
            add(host, view[guest - offset : guest - offset + length], guest)
        end = offset + len(view)
        for change in changes:
            cluster_start = change.cluster_index << self.cluster_bits
            fill_start = cluster_start + change.fill_start
            fill_end = cluster_start + change.fill_end
            data_start = max(offset, fill_start)
            data_end = min(end, fill_end)
            host = change.host + change.fill_start
            if fill_start < data_start:
                add(host, self._old_content(fill_start, data_start - fill_start), fill_start)
            add(
                host + data_start - fill_start,
                view[data_start - offset : data_end - offset],
                data_start,
            )
            if data_end < fill_end:
                add(
                    host + data_end - fill_start,
                    self._old_content(data_end, fill_end - data_end),
                    data_end,
                )
        target = self._data_target()
        file_end = 0
        for host, run_end, buffers in sorted(runs, key=lambda r: r[0]):
            if self.blkdebug is not None:
                self.blkdebug.event("write_aio")
            _write_run(target, buffers, host, run_end - host)
            file_end = max(file_end, run_end)
        return file_end if target is self.file else 0

    def _old_content(self, guest_offset: int, length: int) -> bytes | bytearray:
        """What the guest sees now (the mapping the write will replace is still in place)."""
        limit = min(length, self.size - guest_offset)
        if limit <= 0:
            return bytes(length)
        with self._lock:
            segments = self.map.lookup(guest_offset, limit)
        if self._reads_as_zeros(segments):  # the common case: a cluster's first write
            return bytes(length)
        buf = bytearray(length)
        self._read_segments(segments, memoryview(buf)[:limit], guest_offset)
        return buf

    def _commit(self, changes: list[_ClusterWrite]) -> None:
        """Under the lock: publish the new entries and release what they replace."""
        for change in changes:
            if change.count > 1:
                self.map.set_run(
                    change.cluster_index,
                    change.count,
                    change.host | change.entry,
                    self.cluster_size,
                )
                continue
            self.map.set_entry(change.cluster_index, change.host | change.entry, change.bitmap)
            for first, count in change.free_clusters:
                self.refcounts.free(first, count)

    def _abandon(self, changes: list[_ClusterWrite]) -> None:
        """A write failed: give back the clusters it allocated (nothing points at them)."""
        if self.has_data_file:
            return
        for change in changes:
            if change.new_host and change.host:
                self.refcounts.update(change.host >> self.cluster_bits, change.count, -1)

    # --- compressed writes --------------------------------------------------------------

    def write_compressed(self, offset: int, data) -> None:
        """Store one whole cluster compressed (the image's last cluster may be partial).

        Data that does not shrink is stored as a normal cluster. Compression runs before
        the lock is taken, so callers on several threads compress in parallel.
        """
        self.store_compressed(offset, data, self.compress_cluster(offset, data))

    def compress_cluster(self, offset: int, data) -> bytes | None:
        """The first half of write_compressed: the checks and the compression, without
        the lock, so that a caller can compress clusters in parallel and store them in
        order (as qemu-img convert does). None: the data does not shrink."""
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        cs = self.cluster_size
        if offset % cs or (len(view) != cs and offset + len(view) != self.size) or not view:
            raise InvalidArgumentError(
                f"compressed writes take whole clusters: offset {offset} length {len(view)} "
                f"(cluster size {cs})"
            )
        if self.has_data_file:
            raise UnsupportedFeatureError("Compression is not supported with an external data file")
        if self.encrypted:
            raise UnsupportedFeatureError("Compression is not supported with encryption")
        from . import codecs

        plain = view if len(view) == cs else bytes(view) + bytes(cs - len(view))
        packed = codecs.compress(self.compression_type, plain)
        return packed if len(packed) < cs else None

    def store_compressed(self, offset: int, data, packed: bytes | None) -> None:
        """The second half of write_compressed: `packed` is what compress_cluster gave
        for this offset and data; None stores the data as a normal cluster (as QEMU
        does where compressing saves no space)."""
        if packed is None:
            self.write(offset, data)
            return
        self.check_request(offset, len(data), write=True)
        if offset % self.cluster_size or len(packed) >= self.cluster_size:
            raise InvalidArgumentError(
                f"a compressed cluster at offset {offset} of {len(packed)} bytes "
                f"(cluster size {self.cluster_size})"
            )
        cluster_index = offset >> self.cluster_bits
        with self._lock:
            self._begin_io(range(cluster_index, cluster_index + 1))
            try:
                entry, _ = self.map.get_entry(cluster_index)
                self._writable_l2(cluster_index // self.map.l2_entries)
                host = self._allocate_bytes(len(packed))
                self.guard_write(host, len(packed))
            except BaseException:
                self._io_active -= 1
                raise
            self._inflight.add(cluster_index)
        ok = False
        try:
            self.file.pwrite(packed, host)
            ok = True
        finally:
            with self._lock:
                try:
                    if ok:
                        self._host_size = max(self._host_size, host + len(packed))
                        sectors = ((host + len(packed) - 1) >> 9) - (host >> 9)
                        new_entry = S.OFLAG_COMPRESSED | host | sectors << self.map.csize_shift
                        self.map.set_entry(cluster_index, new_entry, 0)
                        for first, count in self._clusters_of(entry):
                            self.refcounts.free(first, count)
                    else:
                        self._compressed_tail = 0  # its cluster may be freed and reused
                        for first, count in self._clusters_of(
                            S.OFLAG_COMPRESSED
                            | host
                            | ((host + len(packed) - 1 >> 9) - (host >> 9)) << self.map.csize_shift
                        ):
                            self.refcounts.update(first, count, -1)
                finally:
                    self._inflight.discard(cluster_index)
                    self._io_active -= 1
                    self._notify_all()
        self._maybe_write_back()

    def align_file_end(self) -> None:
        """Extend the file to a whole number of 512-byte sectors, as QEMU does when a
        compressed copy ends (compressed clusters pack bytes, leaving it anywhere), so
        sector-based readers of the file see all of it."""
        with self._lock:
            size = self.file.size()
            if size % 512:
                self.file.truncate(size + 512 - size % 512)

    def _allocate_bytes(self, size: int) -> int:
        """Room for `size` compressed bytes, packed after the previous compressed cluster.

        Each host cluster the bytes touch gains one reference, as QEMU counts them; a
        cluster whose refcount is at the most its width holds (1-bit refcounts: one
        reference) takes no more, and the bytes start a new cluster, as in QEMU.
        """
        cs = self.cluster_size
        tail = self._compressed_tail
        if (
            tail
            and tail % cs
            and 0 < self.refcounts.get(tail >> self.cluster_bits) < self.refcounts.max_refcount
        ):
            room = cs - tail % cs
            if size <= room:
                self.refcounts.update(tail >> self.cluster_bits, 1, +1)
                self._compressed_tail = tail + size
                return tail
            extra = -(-(size - room) // cs)
            next_cluster = (tail >> self.cluster_bits) + 1
            if self.refcounts.allocate_at(next_cluster, extra):
                self.refcounts.update(tail >> self.cluster_bits, 1, +1)
                self._compressed_tail = tail + size
                return tail
        first = self.refcounts.allocate(-(-size // cs))
        host = first << self.cluster_bits
        self._compressed_tail = host + size
        return host

    # --- zeroing and discarding ---------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        if not length:
            return
        self._zero_or_discard(offset, length, may_unmap, discard=False)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        if not length:
            return
        self._zero_or_discard(offset, length, True, discard=True)

    def can_zero_fast(self, offset: int, length: int, may_unmap: bool = False) -> bool:
        """Zeroing changes only L2 entries when the partial clusters at either end already
        read as zeros, and whole clusters can take a zero flag (v3) or become holes (v2
        without a backing file; over one, v2 zeroing writes zero bytes, as QEMU's does). A
        raw external data file is zeroed too."""
        self.check_request(offset, length)
        if self.read_only or self.data_file_raw:
            return False
        cs = self.cluster_size
        end = offset + length
        first_full = min(-(-offset // cs) * cs, end)
        last_full = max(end // cs * cs, first_full)
        if end == self.size:
            last_full = end  # the image's last, partial cluster counts as whole
        with self._lock:
            for start, stop in ((offset, first_full), (last_full, end)):
                if start < stop and not self._reads_zero(start, stop - start):
                    return False
            if (
                first_full < last_full
                and self.header.version < 3
                and not self.extended_l2
                and self._has_backing()
            ):
                return False
        return True

    def _zero_or_discard(self, offset: int, length: int, may_unmap: bool, discard: bool) -> None:
        cs = self.cluster_size
        end = offset + length
        granule = self.map.subcluster_size
        physical: list[tuple[int, int]] = []  # ranges that must be written with zeros
        released: list[tuple[int, int]] = []  # data file ranges no entry maps any more
        first_full = -(-offset // cs) * cs
        last_full = end // cs * cs
        if self.size - end < cs and end == self.size:
            last_full = -(-end // cs) * cs  # the image's last, partial cluster counts as whole
        with self._lock:
            self._begin_io(self._guest_clusters(offset, length))
            try:
                if not discard:
                    physical += self._zero_partial(offset, min(end, first_full), granule)
                    if last_full >= first_full and last_full < end:
                        physical += self._zero_partial(max(last_full, offset), end, granule)
                if first_full < last_full:
                    physical += self._unmap_clusters(
                        first_full >> self.cluster_bits,
                        last_full >> self.cluster_bits,
                        may_unmap,
                        discard,
                        released,
                    )
            finally:
                self._io_active -= 1
                self._notify_all()
        if self.data_file_raw:  # the raw data file must stay a faithful image of the guest
            if not discard:
                self._zero_raw_data(offset, end)
            elif first_full < last_full:
                self._zero_raw_data(first_full, min(last_full, self.size))
        else:  # as QEMU passes the discard on: the data file's space goes back too
            for host, size in released:
                self._data_target().punch_hole(host, size)
        for start, stop in physical:
            pos = start
            while pos < stop:
                n = min(len(_ZEROS), stop - pos)
                self.write(pos, _ZEROS[:n])
                pos += n
        self._maybe_write_back()

    def _zero_raw_data(self, start: int, stop: int) -> None:
        target = self._data_target()
        if target.punch_hole(start, stop - start):
            return
        for pos in range(start, stop, len(_ZEROS)):
            target.pwrite(memoryview(_ZEROS)[: min(len(_ZEROS), stop - pos)], pos)

    def _zero_partial(self, start: int, stop: int, granule: int) -> list[tuple[int, int]]:
        """Zero part of one cluster: set zero bits for whole subclusters where possible."""
        if start >= stop:
            return []
        if not self.extended_l2:
            return [] if self._reads_zero(start, stop - start) else [(start, stop)]
        cluster_index = start >> self.cluster_bits
        cluster_start = cluster_index << self.cluster_bits
        entry, bitmap = self.map.get_entry(cluster_index)
        self._validate_for_write(entry, bitmap, cluster_index)
        mapped = self.map.has_host(entry)
        usable = not entry & S.OFLAG_COMPRESSED and (
            not mapped or entry & S.OFLAG_COPIED or self.has_data_file
        )
        sub_first = -(-(start - cluster_start) // granule)
        sub_end = (stop - cluster_start) // granule
        if not usable or sub_first >= sub_end:
            return [] if self._reads_zero(start, stop - start) else [(start, stop)]
        mask = ((1 << sub_end) - 1) & ~((1 << sub_first) - 1)
        alloc = (bitmap & 0xFFFFFFFF) & ~mask
        zero = (bitmap >> 32) | mask
        self._writable_l2(cluster_index // self.map.l2_entries)
        self.map.set_entry(
            cluster_index, entry if alloc or mapped else 0, alloc | (zero & ~alloc) << 32
        )
        ranges = []
        head_end = cluster_start + sub_first * granule
        tail_start = cluster_start + sub_end * granule
        for a, b in ((start, min(stop, head_end)), (max(start, tail_start), stop)):
            if a < b and not self._reads_zero(a, b - a):
                ranges.append((a, b))
        return ranges

    def _reads_zero(self, offset: int, length: int) -> bool:
        """Cheap test from metadata alone: the range is a hole or a zero run everywhere."""
        for seg in self.map.lookup(offset, length):
            if seg.kind == ZERO:
                continue
            if seg.kind == BACKING and self._backing_reads_zero(seg.guest_offset, seg.length):
                continue
            return False
        return True

    def _has_backing(self) -> bool:
        """Whether unallocated clusters show a backing node: one is open (the header's or
        one options gave), or the header names one the image was opened without."""
        return self.backing is not None or (
            bool(self.backing_filename) and not self.backing_dropped
        )

    def _backing_reads_zero(self, offset: int, length: int) -> bool:
        if self.backing is None:  # none, or opened without it (its content is unknown)
            return not self._has_backing()
        if offset >= self.backing.size:
            return True
        return all(
            ext.is_zero and not ext.is_data
            for ext in self.backing.extents(offset, min(length, self.backing.size - offset))
        )

    def _unmap_clusters(
        self,
        first: int,
        stop: int,
        may_unmap: bool,
        discard: bool,
        released: list[tuple[int, int]],
    ) -> list[tuple[int, int]]:
        """Whole clusters [first, stop): zero flags, or unallocated, as the format allows.
        Ranges of an external data file that no entry maps any more go to `released`."""
        physical: list[tuple[int, int]] = []
        v3 = self.header.version >= 3
        for cluster_index in range(first, stop):
            entry, bitmap = self.map.get_entry(cluster_index)
            self._validate_for_write(entry, bitmap, cluster_index)
            mapped = self.map.has_host(entry)
            owned = self._clusters_of(entry)
            if entry == 0 and bitmap == 0 and not self._has_backing() and (discard or not v3):
                continue  # a hole with nothing behind it (v3 zeroing still sets the flag, as QEMU)
            if self.extended_l2:
                keep = mapped and not may_unmap and (entry & S.OFLAG_COPIED or self.has_data_file)
                new_entry = entry if keep else 0
                new_bitmap = S.L2_BITMAP_ALL_ZERO
            elif discard:
                if not v3:
                    new_entry = 0
                else:
                    new_entry = S.OFLAG_ZERO
                new_bitmap = 0
            elif v3:
                keep = mapped and not may_unmap and (entry & S.OFLAG_COPIED or self.has_data_file)
                new_entry = (
                    entry & (S.L2E_OFFSET_MASK | S.OFLAG_COPIED) if keep else 0
                ) | S.OFLAG_ZERO
                new_bitmap = 0
            else:  # v2 has no zero flag: only a hole with nothing behind it reads as zeros
                if self._has_backing():  # (QEMU writes zeros whatever the backing holds)
                    start = cluster_index << self.cluster_bits
                    physical.append((start, min(start + self.cluster_size, self.size)))
                    continue
                new_entry, new_bitmap = 0, 0
            if (new_entry, new_bitmap) == (entry, bitmap):
                continue
            self._writable_l2(cluster_index // self.map.l2_entries)
            self.map.set_entry(cluster_index, new_entry, new_bitmap)
            if not self.map.has_host(new_entry):
                for c, count in owned:
                    self.refcounts.free(c, count)
                if mapped and self.has_data_file:
                    host = entry & S.L2E_OFFSET_MASK
                    if released and sum(released[-1]) == host:
                        released[-1] = (released[-1][0], released[-1][1] + self.cluster_size)
                    else:
                        released.append((host, self.cluster_size))
        return physical

    # --- durability ---------------------------------------------------------------------

    def _maybe_write_back(self) -> None:
        """Keep dirty metadata bounded: write it back once the caches fill up with it."""
        limit = self.map.l2_cache.max_entries // 2
        if (
            len(self.map.l2_cache.dirty) > limit
            or len(self.refcounts.blocks.dirty) > self.refcounts.blocks.max_entries // 2
        ):
            with self._lock:
                self._write_back()

    def flush(self) -> None:
        if self._closed or (self.read_only and not self._stopped_by_corruption):
            return
        with self._lock:
            self._write_back()
        if self._flush_failure is not None:
            raise self._flush_failure

    def _sync(self, target: ContainerFile) -> None:
        """fdatasync a file. After one failed, the kernel may have dropped writes it no
        longer reports: every later flush fails too, as QEMU does, so nothing is claimed
        durable that may not be."""
        if self._flush_failure is not None:
            raise self._flush_failure
        try:
            target.flush()
        except Qcow2IOError as exc:
            self._flush_failure = exc
            raise

    def _write_back_all(self) -> None:
        """Write back everything, including decrements a first pass had to leave queued."""
        self._write_back()
        if "refcounts" in self.__dict__ and self.refcounts.pending_frees:
            self._write_back()

    def _write_back(self) -> None:
        """Write dirty metadata in crash-safe order (see the module docstring)."""
        if self._nothing_to_write_back():
            return
        refs = self.refcounts
        bitmaps = self._bitmap_tracker
        bitmap_failure = None
        if bitmaps is not None and bitmaps.pending:
            try:
                bitmaps.allocate()  # their refcounts go to disk with the others, below
            except Qcow2IOError as exc:
                # (an allocation refused as metadata) the bitmaps stay in use, stale, but
                # the tables of acknowledged writes are still written back before it fails
                bitmap_failure = exc
                bitmaps = None
        else:
            bitmaps = None
        if self.data_host is not None:
            self._sync(self.data_host)
        self._guard_metadata_writes()
        refs.write_blocks()
        if refs.table_dirty:
            self._sync(self.file)  # blocks before the table that points at them
            refs.write_table()
            if refs.table_moved:
                self._sync(self.file)
                self.header.refcount_table_offset = refs.table_offset
                self.header.refcount_table_clusters = refs.table_clusters
                self._write_header_fields()
                refs.table_moved = False
                self.map.set_refcount_table(refs.table_offset, refs.table_clusters)
        self._sync(self.file)  # data and refcounts before the L2 entries that use them
        if self.map.write_dirty_l2():
            self._sync(self.file)
        if self.map.write_dirty_l1():
            self._sync(self.file)
        if bitmaps is not None:
            bitmaps.store()
        if refs.pending_frees and self._io_active == 0:
            for first, count in refs.pending_frees:
                for c in range(first, first + count):
                    self.map.l2_cache.drop(c << self.cluster_bits)
            released = refs.apply_frees()
            self._last_decompressed = None
            self._compressed_tail = 0
            self._guard_metadata_writes()
            refs.write_blocks()
            self._sync(self.file)
            for first, count in released:
                self.file.punch_hole(first << self.cluster_bits, count << self.cluster_bits)
        if bitmap_failure is not None:
            raise bitmap_failure

    def _guard_metadata_writes(self) -> None:
        """Before a write-back: every dirty table goes where its own kind of structure lies
        and nowhere else (a table over another kind of metadata is refused)."""
        cs = self.cluster_size
        refs = self.refcounts
        for offset in refs.blocks.dirty:
            self.guard_write(offset, cs, REFCOUNT_BLOCK)
        if refs.table_dirty:
            self.guard_write(refs.table_offset, refs.table_clusters * cs, REFCOUNT_TABLE)
        for offset in self.map.l2_cache.dirty:
            self.guard_write(offset, cs, ACTIVE_L2)
        if self.map.l1_dirty:
            self.guard_write(self.map.l1_table_offset, len(self.map.l1) * 8, ACTIVE_L1)

    def _validate_for_write(self, entry: int, bitmap: int, cluster_index: int) -> None:
        """Refuse to change (or free what is behind) an entry that is itself invalid."""
        try:
            self.map.validate_entry(entry, bitmap, cluster_index)
            if entry & S.OFLAG_COMPRESSED:
                self.map.lookup(cluster_index << self.cluster_bits, 1)  # checks the extent
        except CorruptImageError as exc:
            self._signal_corruption(exc)
            raise

    def _check_copied_host(self, entry: int, guest_offset: int) -> None:
        """A write into a cluster it owns (COPIED) whose host offset is unaligned: QEMU's
        words for it (a write into a shared one copies it first, and its read of the
        cluster is what fails)."""
        host = entry & S.L2E_OFFSET_MASK
        if host % self.cluster_size and entry & S.OFLAG_COPIED and not entry & S.OFLAG_COMPRESSED:
            kind = "Preallocated zero" if entry & S.OFLAG_ZERO else "Data"
            raise SignaledCorruptionError(
                f"{kind} cluster offset {c_hex(host)} unaligned (guest offset: "
                f"{c_hex(guest_offset)})"
            )

    def _met_corruption(self, exc: SignaledCorruptionError) -> CorruptionIOError:
        """A request met broken metadata: as in QEMU, an image open
        for writing is marked corrupt, one open read-only is only reported so, the line
        QEMU prints goes out (once: later ones are suppressed, as QEMU's say) and the
        request fails with EIO."""
        fatal = not self.read_only
        notice = corruption_notice(str(exc), fatal)
        if not self._corruption_signaled or (fatal and not self.corrupt):
            self._corruption_signaled = True
            emit_notice(notice)
        if fatal:
            with self._lock:
                self._signal_corruption(exc)
        error = CorruptionIOError(errno.EIO, str(exc), self.filename)
        error.notice = notice
        return error

    def _signal_corruption(self, exc: Qcow2Error) -> None:
        """Metadata a write depends on is broken: mark the image corrupt and stop writing,
        as QEMU does, so nothing more is damaged before a repair. Writes acknowledged
        before are not lost: flush and close still write their metadata back (or fail)."""
        if self.read_only or self.corrupt:
            return
        self.corrupt = True
        self.header.incompatible_features |= S.INCOMPAT_CORRUPT
        try:
            self._write_header_fields()
            self._sync(self.file)
        finally:
            self.read_only = True
            self._stopped_by_corruption = True

    def check(self, repair: str | None = None):
        """qemu-img check on this image (repair None, "leaks" or "all"): a CheckReport."""
        from .check import check_image

        return check_image(self, repair)

    # --- preallocation -----------------------------------------------------------------

    def preallocate(self, mode: str) -> None:
        """Map every guest cluster to a host cluster (metadata), reserved (falloc) or written
        (full)."""
        self.preallocate_range(0, self.size, mode)

    # --- closing ------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only or self._stopped_by_corruption:
                with self._lock:
                    while self._io_active:
                        self._wait()
                    try:
                        self._write_back_all()
                    except Qcow2IOError as exc:  # (as QEMU's close names the cache)
                        cache = "refcount block" if self.refcounts.blocks.dirty else "L2 table"
                        raise exc.in_context(f"Failed to flush the {cache} cache") from exc
                    if self._bitmap_tracker is not None:
                        self._bitmap_tracker.close()
                    if self.lazy_refcounts:  # (as QEMU marks it clean: the whole header)
                        self.header.incompatible_features &= ~S.INCOMPAT_DIRTY
                        self._write_header()
                        self._sync(self.file)
        finally:
            self._closed = True
            if self.backing is not None:
                self.backing.close()
            self._close_files()

    def _close_files(self) -> None:
        self.file.close()
        if self.data_host is not None:
            self.data_host.close()

    # --- resize (ops) -------------------------------------------------------------------
    # Size changes and whole-range cluster release, used by qcow2lib.ops.resize (qemu-img
    # resize) and qcow2lib.ops.commit (emptying the top image). Callers hold the image
    # exclusively (no other I/O in flight).

    def _resize_quiesce(self) -> None:
        """Under self._lock: wait for in-flight I/O, then put all metadata on disk."""
        while self._io_active:
            self._wait()
        self._write_back_all()

    def resize_grow_l1(self, new_l1_size: int) -> None:
        """Give the active L1 table `new_l1_size` entries (no-op if it has them).

        The new table goes into newly allocated clusters and is made durable, the header's
        l1_size and l1_table_offset switch with one sector write, then the old table is freed.
        """
        from array import array

        from .cache import encode_be64

        with self._lock:
            old_size = len(self.map.l1)
            if new_l1_size <= old_size:
                return
            if new_l1_size * 8 > S.MAX_L1_BYTES:  # (as QEMU words it)
                raise InvalidArgumentError("Failed to grow the L1 table: File too large")
            self._resize_quiesce()
            cs = self.cluster_size
            clusters = -(-new_l1_size * 8 // cs)
            first = self.refcounts.allocate(clusters)
            new_offset = first << self.cluster_bits
            self._write_back()  # the new table's refcounts before the header
            table = array("Q", self.map.l1)
            table.extend([0] * (new_l1_size - old_size))
            self.guard_write(new_offset, clusters * cs)
            self.file.pwrite(encode_be64(table), new_offset)  # its bytes only, as QEMU
            self._host_size = max(self._host_size, new_offset + new_l1_size * 8)
            self._sync(self.file)
            old_offset = self.header.l1_table_offset
            self.header.l1_size = new_l1_size
            self.header.l1_table_offset = new_offset
            self._write_header_fields()
            self._sync(self.file)
            self.map.l1 = table
            self.map.l1_dirty.clear()
            self.map.l1_table_offset = new_offset
            self.map.metadata[1] = (new_offset, new_offset + new_l1_size * 8, "the L1 table")
            if old_size and old_offset:
                self.refcounts.free(old_offset >> self.cluster_bits, -(-old_size * 8 // cs))
            self._write_back()

    def _resize_release_l2(self, l1_index: int) -> None:
        """Unhook a whole L2 table from the active L1 and drop the references its path
        holds (the table and every cluster it points at)."""
        offset = self.map.l2_offset(l1_index)
        if not offset:
            return
        table = self.map.l2_cache.get(offset)
        step = self.map.entry_words
        for i in range(0, len(table), step):
            if table[i]:
                for first, count in self._clusters_of(table[i]):
                    self.refcounts.free(first, count)
        self.map.l1[l1_index] = 0
        self.map.l1_dirty.add(l1_index)
        self.overlaps.remove(ACTIVE_L2, offset, self.cluster_size)
        self.refcounts.free(offset >> self.cluster_bits)

    def resize_drop_clusters(
        self, first_cluster: int, stop_cluster: int | None = None, shrink: bool = False
    ) -> None:
        """Make guest clusters [first, stop) unallocated (QEMU's full discard): their
        entries become 0 and their host clusters are released. L2 tables lying wholly in
        the range are released too. Metadata reaches the disk before the frees apply.
        shrink: an L1 entry the range cuts in part gets an (empty) L2 table if it has
        none, as QEMU's shrink gives it one (its discard looks the table up to write)."""
        l2e = self.map.l2_entries
        with self._lock:
            while self._io_active:
                self._wait()
            if stop_cluster is None:
                stop_cluster = len(self.map.l1) * l2e
            stop_cluster = min(stop_cluster, len(self.map.l1) * l2e)
            for l1_index in range(first_cluster // l2e, -(-stop_cluster // l2e)):
                lo = max(first_cluster, l1_index * l2e)
                hi = min(stop_cluster, (l1_index + 1) * l2e)
                whole = lo == l1_index * l2e and hi == (l1_index + 1) * l2e
                if not self.map.l2_offset(l1_index) and (whole or not shrink or lo >= hi):
                    continue
                if whole:
                    self._resize_release_l2(l1_index)
                    self._maybe_write_back()
                    continue
                self._writable_l2(l1_index)
                for cluster_index in range(lo, hi):
                    entry, bitmap = self.map.get_entry(cluster_index)
                    if not entry and not bitmap:
                        continue
                    owned = self._clusters_of(entry)
                    self.map.set_entry(cluster_index, 0, 0)
                    for first, count in owned:
                        self.refcounts.free(first, count)
                self._maybe_write_back()
            self._resize_quiesce()
            self._last_decompressed = None

    def resize_set_size(self, new_size: int) -> None:
        """Write the new virtual size into the header (one sector write, made durable)."""
        with self._lock:
            self._resize_quiesce()
            self.header.size = new_size
            self._write_header_fields()
            self._sync(self.file)
            self.size = new_size

    def resize_shrink_reftable(self) -> None:
        """Drop the refcount blocks that count nothing any more (after a shrink freed the
        clusters they described), as QEMU's qcow2_shrink_reftable does before cutting the
        file: one pass finds them (a block's count of itself does not count), the table
        without them reaches the disk, then each loses its reference in the block that
        counts it (a crash in between only leaks them). Broken entries fail the way
        QEMU's do: the image is marked corrupt and the resize fails with EIO."""
        from array import array

        from .cache import encode_be64
        from .runs import nonzero_positions

        refs = self.refcounts
        with self._lock:
            self._resize_quiesce()
            try:
                unused = [
                    block_index
                    for block_index in nonzero_positions(refs.table)
                    if refs.table[block_index] & S.REFT_OFFSET_MASK
                    and self._counts_nothing(block_index)
                ]
                if not unused:
                    return
                kept = array("Q", refs.table)
                for block_index in unused:
                    kept[block_index] = 0
                self.file.pwrite(encode_be64(kept), refs.table_offset)
                self._sync(self.file)
                for block_index in unused:
                    self._release_refcount_block(refs._block_offset(block_index))
                    refs.table[block_index] = 0
            except SignaledCorruptionError as exc:
                raise self._met_corruption(exc).in_context(
                    "Failed to discard unused refblocks"
                ) from None
            self._overlaps_for = None
            self._write_back_all()

    def _counts_nothing(self, block_index: int) -> bool:
        """Whether a refcount block counts no cluster but itself (read as QEMU reads it:
        past the end of the file, zeros)."""
        from .refcount import RefcountBlock

        refs = self.refcounts
        offset = refs.table[block_index] & S.REFT_OFFSET_MASK
        if offset % self.cluster_size:
            raise SignaledCorruptionError(
                f"Cannot get entry from refcount block cache: Offset {c_hex(offset)} is unaligned"
            )
        block = refs.blocks.peek(offset)
        raw = block.to_bytes() if block is not None else self.file.pread(self.cluster_size, offset)
        counts = RefcountBlock(refs.order, raw.ljust(self.cluster_size, b"\0"))
        own_cluster = offset >> self.cluster_bits
        if own_cluster // refs.block_entries == block_index:
            counts.set(own_cluster % refs.block_entries, 0)
        return not any(counts.to_bytes())

    def _release_refcount_block(self, offset: int) -> None:
        """QEMU's qcow2_discard_refcount_block: the block's own count, wherever it is kept,
        goes to zero and its cluster to the filesystem."""
        refs = self.refcounts
        cluster = offset >> self.cluster_bits
        covering_index = cluster // refs.block_entries
        covering = refs._block_offset(covering_index) if covering_index < len(refs.table) else 0
        if not covering:
            raise SignaledCorruptionError(
                f"Refblock at {c_hex(offset)} is not covered by the refcount structures"
            )
        block = refs.blocks.get(covering)
        index = cluster % refs.block_entries
        if block.get(index) != 1:
            raise SignaledCorruptionError(
                f"Invalid refcount: refblock offset {c_hex(covering)}, reftable index "
                f"{covering_index}, block offset {c_hex(offset)}, refcount "
                f"{c_hex(block.get(index))}"
            )
        block.set(index, 0)
        refs.blocks.mark_dirty(covering)
        refs.blocks.drop(offset)  # (a block counting itself goes unwritten)
        refs.free_hint = min(refs.free_hint, cluster)
        self.file.punch_hole(offset, self.cluster_size)

    def resize_truncate_file(self) -> None:
        """Cut the image file after its last cluster with a non-zero refcount."""
        with self._lock:
            self._resize_quiesce()
            cs = self.cluster_size
            file_size = self.file.size()
            last = -(-file_size // cs) - 1
            while last >= 0 and self.refcounts.get(last) == 0:
                last -= 1
            if last < 0:
                raise CorruptImageError("There are no references in the refcount table.")
            end = (last + 1) * cs
            if end < file_size:
                self.file.truncate(end)
                self._host_size = end
                self.refcounts.end_cluster = min(self.refcounts.end_cluster, last + 1)
                self.refcounts.file_size_hint = end
                self.refcounts.free_hint = min(self.refcounts.free_hint, last + 1)
                self._compressed_tail = 0

    def preallocate_range(
        self,
        start: int,
        end: int,
        mode: str,
        cow_head: bool = False,
        allocate: bool = False,
        copy_head: bool = False,
    ) -> None:
        """Map the guest clusters of [start, end) that have no host cluster yet to new
        host clusters after the end of the file: "metadata" (sparse), "falloc" (reserved)
        or "full" (zeros written).

        With cow_head, a cluster holding `start` in its middle gets a new host cluster
        too, whatever it had: its bytes before `start` are copied, the rest reads zeros
        (as QEMU's falloc/full growth does). With `allocate`, the new clusters' subclusters
        (extended L2) are all marked allocated, so the guest reads what the host clusters
        hold (zeros past the copied head) rather than a backing file: growing an image
        makes new space, which no backing file may show through. With copy_head, a
        cluster holding `start` in its middle that gets a host cluster here gets its bytes
        before `start` copied too (standard L2 entries only: with subclusters the new
        cluster's unallocated ones still show them), as QEMU's metadata growth does."""
        try:
            self._preallocate_range(start, end, mode, cow_head, allocate, copy_head)
        except Qcow2IOError as exc:  # as QEMU reports the step that failed
            if mode == "metadata":
                raise exc.in_context("Allocating clusters failed") from None
            # (preallocate() words its data's failure so already; a metadata write that
            # fails is worded the same, as the file's growth in QEMU would have met it)
            failure = preallocation_failure(exc, mode)
            if self.has_data_file:  # (QEMU preallocates the data file itself)
                raise failure from None
            raise failure.prefixed("Failed to resize underlying file") from None

    def _unhosted_runs(self, first_index: int, stop_index: int) -> list[tuple[int, int]]:
        """(first, count) of each run of guest clusters of [first_index, stop_index) without
        a host cluster (nor compressed data), each within one L2 table, in order; a table
        with no entry in use, or none at all, costs one count."""
        m = self.map
        per_table, step = m.l2_entries, m.entry_words
        found: list[tuple[int, int]] = []
        for l1_index in range(first_index // per_table, (stop_index - 1) // per_table + 1):
            base = l1_index * per_table
            low, high = max(first_index, base), min(stop_index, base + per_table)
            table = m.l2_table(l1_index) if l1_index < len(m.l1) else None
            entries = (
                table[(low - base) * step : (high - base) * step : step]
                if table is not None
                else None
            )
            if entries is None or entries.count(0) == len(entries):
                found.append((low, high - low))
                continue
            from .runs import consecutive_runs  # (here: `info` loads no array machinery)

            has_host = m.has_host
            unhosted = [
                low + k
                for k, entry in enumerate(entries)
                if not has_host(entry) and not entry & S.OFLAG_COMPRESSED
            ]
            found += ((first, count) for first, count, _ in consecutive_runs(unhosted))
        return found

    def _preallocate_range(
        self, start: int, end: int, mode: str, cow_head: bool, allocate: bool, copy_head: bool
    ) -> None:
        cs = self.cluster_size
        bits = self.cluster_bits
        with self._lock:
            while self._io_active:
                self._wait()
            first_index, stop_index = start >> bits, -(-end // cs)
            copy_head = copy_head and not self.extended_l2
            head_index = first_index if (cow_head or copy_head) and start % cs else None
            todo = self._unhosted_runs(first_index, stop_index)
            if head_index is not None and todo and todo[0][0] == head_index:
                # (the head cluster alone: its bytes are copied, entry by entry)
                count = todo[0][1]
                todo[:1] = [(head_index, 1)] + ([(head_index + 1, count - 1)] if count > 1 else [])
            elif cow_head and head_index is not None:
                todo.insert(0, (head_index, 1))
            else:
                head_index = None  # (copy_head: the cluster keeps the host cluster it has)
            if not todo:
                return
            head = None
            if head_index is not None:
                head_start = head_index << bits
                head = self._old_content(head_start, start - head_start)
            # As QEMU lays it out: each L2 table, then the data clusters it maps.
            target = self._data_target() if self.has_data_file else self.file
            mapped: list[tuple[int, int, int]] = []  # (first guest cluster, count, host offset)
            extents: list[tuple[int, int]] = []  # (host offset, length) to preallocate
            per_table = self.map.l2_entries
            for l1_index, grouped in groupby(todo, key=lambda run: run[0] // per_table):
                table_runs = list(grouped)
                self._writable_l2(l1_index)
                if self.has_data_file:  # guest offset == host offset
                    for first, count in table_runs:
                        mapped.append((first, count, first << bits))
                        extents.append((first << bits, count << bits))
                else:  # past the end of the file, where clusters read zeros
                    total = sum(count for _, count in table_runs)
                    host = self.refcounts.allocate(total, at_end=True) << bits
                    extents.append((host, total << bits))
                    for first, count in table_runs:
                        mapped.append((first, count, host))
                        host += count << bits
            for host, length in extents:
                if target is self.file:
                    self.guard_write(host, length)
                preallocate(target, host, length, mode)  # ("metadata": nothing to do)
            last_end = max(host + length for host, length in extents)
            if target.size() < last_end:
                target.truncate(last_end)
            if head is not None:
                target.pwrite(head, mapped[0][2])
            if target is self.file:
                self._host_size = max(self._host_size, last_end)
            self._prealloc_detected = None
            for first, count, host in mapped:
                if first == head_index or self.extended_l2:
                    for index in range(first, first + count):
                        # With subclusters, preallocation maps the cluster but leaves its
                        # bitmap as it was (QEMU's prealloc link): unallocated subclusters
                        # keep showing the backing file, or zeros without one.
                        old_entry, bitmap = self.map.get_entry(index)
                        if allocate and self.extended_l2:
                            bitmap = S.L2_BITMAP_ALL_ALLOC
                        self.map.set_entry(
                            index, (host + ((index - first) << bits)) | S.OFLAG_COPIED, bitmap
                        )
                        for old_first, old_count in self._clusters_of(old_entry):
                            self.refcounts.free(old_first, old_count)
                else:  # (no host cluster before: nothing to free)
                    self.map.set_run(first, count, host | S.OFLAG_COPIED, cs)
                self._maybe_write_back()
            self._write_back()
