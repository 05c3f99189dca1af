"""Internal snapshots: the snapshot table, and creating, applying, deleting and reading them.

Each snapshot owns an L1 table. Refcounts count paths, as QEMU does: every L1 table that
reaches an L2 table holds one reference on it, and every time an L2 table is reached it
holds one reference on each cluster it points at. Sharing a tree with a snapshot therefore
adds one to every cluster the tree reaches, and an entry of the active tree carries the
COPIED flag exactly when its cluster's refcount is 1 (then it may be written in place).

Crash safety: create, apply and delete change refcounts and COPIED flags together, and
no order of in-place writes keeps those two consistent at every moment. So each operation
builds its new state beside the old one, in clusters the old state leaves free: copies of
the active L2 tables whose COPIED flags change, the L1 tables and snapshot table that
change, copies of the refcount blocks whose counts change and a new refcount table; then
one sector write of the header switches L1 table, refcount table, snapshot table (and
size) at once. A crash leaves the old state or the new one. The clusters only the old
state used are free in the new refcounts: the file is cut after its last cluster in use,
and the next operation reuses them. Freed clusters are given back to the filesystem,
except those of metadata this operation replaced with copies: the next operation's
copies go there (first fit), and punching them one by one (an L2 table each, scattered
over the file) would cost more than the operation itself.

Cost: an operation reads the L1 tables it changes (the active one, and the snapshot it
creates, applies or deletes) and the L2 tables whose number of paths changes, never the
other snapshots' tables; the snapshot table is parsed once per table the header points at.
"""

from __future__ import annotations

import errno
import time
from array import array
from collections.abc import Callable, Iterator
from itertools import compress
from operator import add

from . import structs as S
from .blockdev import BlockDevice, Extent
from .cache import decode_be64, encode_be64
from .errors import (
    CorruptImageError,
    InvalidArgumentError,
    Qcow2IOError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from .rebuild import ClusterCounts, ReferencePastEnd, count_l1_entries, count_l2_tables
from .refcount import RefcountBlock
from .runs import nonzero_positions
from .snapshot_table import (
    ICOUNT_DISABLED,
    Snapshot,
    l2_table_offset,
    pack_snapshot_table,
    read_snapshot_table,
)

MAX_NAME_BYTES = 255  # QEMU keeps names in a 256-byte buffer


def cached_table(image) -> tuple[list[Snapshot], int]:
    """The parsed snapshot table and its size in bytes, parsed once for each table the
    header points at (65536 entries take a while; lookups must not parse it again)."""
    hdr = image.header
    key = (hdr.snapshots_offset, hdr.nb_snapshots)
    cached = getattr(image, "_snapshot_table", None)
    if cached is None or cached[:2] != key:
        snapshots, table_bytes = (
            read_snapshot_table(
                image.file,
                hdr.snapshots_offset,
                hdr.nb_snapshots,
                image.cluster_size,
                image.file.size(),
            )
            if hdr.nb_snapshots
            else ([], 0)
        )
        cached = image._snapshot_table = (*key, snapshots, table_bytes)
    return cached[2], cached[3]


def _read_table(image) -> tuple[list[Snapshot], int]:
    """A copy of the snapshot list (callers may change it) and the table's size."""
    snapshots, table_bytes = cached_table(image)
    return list(snapshots), table_bytes


def list_snapshots(image) -> list[Snapshot]:
    """The image's snapshots, in table order."""
    _require_qcow2(image)
    with image._lock:
        return _read_table(image)[0]


def _select(
    snapshots: list[Snapshot], name_or_id: str | None, id: str | None, name: str | None
) -> int:
    """Index of the snapshot QEMU would pick, or -1.

    name_or_id: an ID first, then a name (qcow2_snapshot_goto). id and/or name: both
    must match where both are given (qcow2_snapshot_delete, snapshot.id/snapshot.name).
    """
    if name_or_id is not None:
        if id is not None or name is not None:
            raise InvalidArgumentError("give either name_or_id or id/name, not both")
        for index, snap in enumerate(snapshots):
            if snap.id == name_or_id:
                return index
        id, name = None, name_or_id
    if id is None and name is None:
        raise InvalidArgumentError("no snapshot ID or name given")
    for index, snap in enumerate(snapshots):
        if (id is None or snap.id == id) and (name is None or snap.name == name):
            return index
    return -1


def find_snapshot(
    image, name_or_id: str | None = None, *, id: str | None = None, name: str | None = None
) -> Snapshot | None:
    """Look a snapshot up like QEMU: by ID first, then by name (or by id/name exactly)."""
    snapshots = list_snapshots(image)
    index = _select(snapshots, name_or_id, id, name)
    return snapshots[index] if index >= 0 else None


def _lookup(snapshots: list[Snapshot], name_or_id, id, name) -> int:
    index = _select(snapshots, name_or_id, id, name)
    if index < 0:
        what = name_or_id if name_or_id is not None else (name if id is None else id)
        raise InvalidArgumentError(
            f"Can't find the snapshot '{what}' (no snapshot has this ID or name)"
        )
    return index


def _new_id(snapshots: list[Snapshot]) -> str:
    """QEMU's rule: one more than the largest ID read as a number (strtoul)."""
    import re  # (here: listing and info need no re, and importing it costs start-up time)

    highest = 0
    for snap in snapshots:
        match = re.match(r"\s*\+?(\d+)", snap.id)
        if match:
            highest = max(highest, int(match.group(1)))
    return str(highest + 1)


# --- helpers over the engine ----------------------------------------------------------------


def _require_qcow2(image) -> None:
    if getattr(image, "format", None) != "qcow2" or not hasattr(image, "map"):
        raise InvalidArgumentError(
            f"internal snapshots need a qcow2 image ('{getattr(image, 'filename', image)}' is "
            f"{getattr(image, 'format', type(image).__name__)})"
        )


def _require_writable(image, what: str) -> None:
    _require_qcow2(image)
    if image.read_only:
        raise ReadOnlyError(f"cannot {what}: '{image.filename}' is opened read-only")
    if image._closed:
        raise InvalidArgumentError(f"cannot {what}: '{image.filename}' is closed")
    if image.header.incompatible_features & S.INCOMPAT_DATA_FILE:
        raise UnsupportedFeatureError(
            f"cannot {what}: internal snapshots are not supported with an external data file "
            f"('{image.header.data_file}')"
        )


class _Exclusive:
    """`with _Exclusive(image):` holds the image lock with no request in flight, metadata
    written back. (A class, not a contextlib generator: contextlib and the functools it
    imports would load with every image that has snapshots, and start-up time counts.)"""

    def __init__(self, image):
        self.image = image

    def __enter__(self) -> None:
        image = self.image
        image._planned_writes.acquire()  # (the lock order: VM state is written under both)
        image._lock.acquire()
        try:
            while image._io_active:
                image._wait()
            _flush_all(image)
        except BaseException:
            image._lock.release()
            image._planned_writes.release()
            raise

    def __exit__(self, *exc_info) -> None:
        image = self.image
        image._last_decompressed = None  # host clusters may have been freed and reused
        image._prealloc_detected = None
        image._lock.release()
        image._planned_writes.release()


def _flush_all(image) -> None:
    image._write_back_all()


def _l1_span(image) -> int:
    """Guest bytes one L1 entry covers."""
    return image.cluster_size * image.map.l2_entries


def _vm_state_index(image, disk_size: int) -> int:
    """First L1 index of the VM state area (QEMU's l1_vm_state_index)."""
    return -(-disk_size // _l1_span(image))


def vm_state_offset(image, disk_size: int | None = None) -> int:
    """Guest offset at which the VM state of an image of disk_size starts."""
    return _vm_state_index(image, image.size if disk_size is None else disk_size) * _l1_span(image)


def _flags_for(
    table: array, step: int, counts_of: Callable[[list[int]], list[int]], bits: int
) -> array | None:
    """A copy of an L2 table with COPIED set exactly on entries whose cluster count is 1
    (`counts_of`: the counts of a list of clusters), or None when it has those flags
    already."""
    entries = table[::step] if step > 1 else table
    positions = nonzero_positions(entries)
    values = [entries[position] for position in positions]
    mask, compressed = S.L2E_OFFSET_MASK, S.OFLAG_COMPRESSED
    hosts = [0 if value & compressed else (value & mask) >> bits for value in values]
    fixed = None
    for position, value, host, count in zip(positions, values, hosts, counts_of(hosts)):
        flag = S.OFLAG_COPIED if host and count == 1 else 0
        if value & S.OFLAG_COPIED != flag:
            if fixed is None:
                fixed = array("Q", table)
            fixed[position * step] = (value & ~S.OFLAG_COPIED) | flag
    return fixed


_CLEAR_TOP_BIT = bytes(range(128)) * 2  # bytes.translate table: each byte & 0x7F


def _without_copied(table: array, step: int) -> bytes | None:
    """An L2 table encoded for the disk with COPIED clear on every entry, or None when no
    entry has it. COPIED is the top bit of an entry's first big-endian byte, so the flags
    are cleared with one translate of every entry's first byte."""
    raw = bytearray(encode_be64(table))
    stride = 8 * step
    tops = raw[0::stride]
    cleared = tops.translate(_CLEAR_TOP_BIT)
    if cleared == tops:
        return None
    raw[0::stride] = cleared
    return bytes(raw)


def _note_freed(freed: list[tuple[int, int]], cluster: int) -> None:
    """Add a freed cluster to the runs of freed clusters (clusters come in order)."""
    if freed and sum(freed[-1]) == cluster:
        freed[-1] = (freed[-1][0], freed[-1][1] + 1)
    else:
        freed.append((cluster, 1))


class _NewState:
    """A snapshot operation's new state, built beside the current one.

    `delta` holds, per host cluster, how the new state's references differ from the
    current ones. New metadata goes into clusters the current state leaves free (refcount
    0) and the change does not touch, so the state on disk stays intact until the header
    switches. Only the refcount blocks whose counts change get new copies (and then a new
    refcount table pointing at them and at the unchanged blocks)."""

    def __init__(self, image) -> None:
        self.image = image
        self.refs = image.refcounts
        self.bits = image.cluster_bits
        self.cs = image.cluster_size
        self.file_size = image.file.size()
        self.delta = ClusterCounts(self.bits, -(-self.file_size >> self.bits), signed=True)
        self.search_from = 1  # first-fit search start (what lies before is taken)
        self.superseded: set[int] = set()  # clusters of metadata replaced by copies
        self.end = self.file_size  # the file's size once the new clusters are written
        # The refcount block get() read last (the current refcounts do not change until
        # the switch): asked cluster after cluster, most calls need no lookup.
        self._block_bits = self.refs.block_entries.bit_length() - 1
        self._block_index = -1
        self._block: RefcountBlock | None = None

    def get(self, cluster: int) -> int:
        """A cluster's refcount in the new state."""
        block_index = cluster >> self._block_bits
        if block_index != self._block_index:
            self._block = self.refs.block(block_index)
            self._block_index = block_index
        block = self._block
        count = block.get(cluster & (self.refs.block_entries - 1)) if block is not None else 0
        return count + self.delta.get(cluster)

    def counts_of(self, clusters: list[int]) -> list[int]:
        """get() of many clusters at once."""
        return list(map(add, self.refs.counts_of(clusters), self.delta.get_many(clusters)))

    def change_range(self, offset: int, length: int, times: int) -> None:
        bits = self.bits
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            self.delta.add(cluster, times)

    def supersede(self, offset: int, length: int) -> None:
        """The metadata at [offset, +length) is replaced by a new copy: one reference
        less on its clusters, which are not punched once free (see the module docstring)."""
        self.change_range(offset, length, -1)
        bits = self.bits
        self.superseded.update(range(offset >> bits, ((offset + length - 1) >> bits) + 1))

    def allocate(self, count: int) -> int:
        """First cluster of `count` contiguous clusters free now and untouched by the change."""
        candidate = self.search_from
        while True:
            start = self.refs._next_free_run(candidate, count)
            busy = [c for c in range(start, start + count) if self.delta.get(c)]
            if not busy:
                break
            candidate = busy[-1] + 1
        for cluster in range(start, start + count):
            self.delta.add(cluster, 1)
        if count == 1 or start == self.search_from:
            self.search_from = start + count
        return start

    def write_new(self, data: bytes) -> int:
        """Write `data` (padded to whole clusters) into newly allocated clusters."""
        cs = self.cs
        clusters = max(1, -(-len(data) // cs))
        offset = self.allocate(clusters) << self.bits
        self.image.guard_write(offset, clusters * cs)
        self.image.file.pwrite(bytes(data) + bytes(clusters * cs - len(data)), offset)
        self.end = max(self.end, offset + clusters * cs)
        return offset

    def check_counts(self) -> None:
        """Refuse, before anything is written, counts that would leave their range."""
        refs = self.refs
        limit = refs.max_refcount
        checked = self._chunks_within_range()
        for cluster, change in self.delta.items(skip=checked):
            count = refs.get(cluster) + change
            if count < 0:
                raise CorruptImageError(
                    f"Refcount of cluster {cluster} (offset 0x{cluster << self.bits:x}) would "
                    f"drop below zero"
                )
            if count > limit:
                raise InvalidArgumentError(
                    f"Refcount of cluster {cluster} (offset 0x{cluster << self.bits:x}) would "
                    f"overflow: {count} references exceed the maximum {limit} of "
                    f"refcount_bits={self.image.refcount_bits}"
                )

    def _chunks_within_range(self) -> set[int]:
        """The chunks of `delta` whose new counts are all within range, found with one
        sum per chunk at C speed (the rest are checked cluster by cluster)."""
        refs = self.refs
        chunk_size = self.delta.chunk_size
        if refs.order < 3 or refs.block_entries % chunk_size:
            return set()
        within = set()
        for index, chunk in self.delta.chunks.items():
            first = index * chunk_size
            try:
                block = refs.block(first // refs.block_entries)
            except CorruptImageError:
                continue  # (reported in cluster order by check_counts)
            if block is None:
                counts = list(chunk)
            else:
                low = first % refs.block_entries
                counts = list(map(add, block.values[low : low + chunk_size], chunk))
            if min(counts) >= 0 and max(counts) <= refs.max_refcount:
                within.add(index)
        return within

    def write_refcounts(self) -> tuple[int, int, list[tuple[int, int]]]:
        """New copies of the refcount blocks whose counts change and a new refcount table.

        Placing each copy changes counts too (the copy is used, the block it replaces is
        free), so blocks are placed until no further block changes. Returns the table's
        offset and clusters, and the runs of clusters the new state frees."""
        refs = self.refs
        bits, cs = self.bits, self.cs
        entries = refs.block_entries
        copies: dict[int, int] = {}  # block index -> cluster of its new copy
        self.supersede(refs.table_offset, refs.table_clusters * cs)
        table_first, table_clusters = None, refs.table_clusters
        while True:
            todo = sorted(self.delta.nonzero_blocks(entries) - copies.keys())
            for block_index in todo:
                copies[block_index] = self.allocate(1)
                old = refs._block_offset(block_index)
                if old:
                    self.supersede(old, cs)
            needed = max(len(refs.table), max(copies, default=0) + 1)
            if needed * 8 > S.MAX_REFTABLE_BYTES:
                raise InvalidArgumentError(
                    f"Refcount table would need {needed} entries, more than the format's "
                    f"limit of {S.MAX_REFTABLE_BYTES // 8}"
                )
            if table_first is not None and needed * 8 <= table_clusters * cs:
                if not todo:
                    break
                continue
            if table_first is not None:  # too small now: give it back, take a larger one
                for cluster in range(table_first, table_first + table_clusters):
                    self.delta.add(cluster, -1)
            table_clusters = max(table_clusters, -(-needed * 8 // cs))
            table_first = self.allocate(table_clusters)
        table = array("Q", refs.table)
        table.extend([0] * (table_clusters * cs // 8 - len(table)))
        freed: list[tuple[int, int]] = []
        for block_index, cluster in sorted(copies.items()):
            old = refs.block(block_index)
            block = RefcountBlock(refs.order, old.to_bytes() if old is not None else bytes(cs))
            base = block_index * entries
            if block.order >= 3:
                self._apply_delta_whole(block, base, entries, freed)
            else:
                self._apply_delta(block, self.delta.block_counts(base, entries), base, freed)
            self.image.guard_write(cluster << bits, cs)
            self.image.file.pwrite(block.to_bytes(), cluster << bits)
            self.end = max(self.end, (cluster + 1) << bits)
            table[block_index] = cluster << bits
        self.image.guard_write(table_first << bits, table_clusters * cs)
        self.image.file.pwrite(encode_be64(table), table_first << bits)
        self.end = max(self.end, (table_first + table_clusters) << bits)
        return table_first << bits, table_clusters, freed

    def _apply_delta(self, block: RefcountBlock, changes, base: int, freed: list) -> None:
        """Add the `changes` ((cluster, change) pairs, in order) to the block of clusters
        from `base`, noting in `freed` the runs of clusters they free."""
        limit = self.refs.max_refcount
        for counted, change in changes:
            before = block.get(counted - base)
            after = before + change
            if not 0 <= after <= limit:
                raise CorruptImageError(
                    f"Refcount of cluster {counted} (offset 0x{counted << self.bits:x}) would "
                    f"become {after}, outside 0..{limit}"
                )
            block.set(counted - base, after)
            if before and not after:
                _note_freed(freed, counted)

    def _apply_delta_whole(self, block: RefcountBlock, base: int, entries: int, freed: list):
        """_apply_delta for blocks of whole-byte counts, a chunk of `delta` at a time at C
        speed (a snapshot changes the count of every cluster its tree reaches); clusters
        are visited one by one only where counts drop to zero or leave their range."""
        values = block.values
        assert isinstance(values, array)
        limit = self.refs.max_refcount
        for first, change in self.delta.chunk_slices(base, entries):
            low = first - base
            high = low + len(change)
            after = list(map(add, values[low:high], change))
            if min(after) < 0 or max(after) > limit:
                nonzero = compress(range(first, first + len(change)), change)
                self._apply_delta(block, ((c, change[c - first]) for c in nonzero), base, freed)
                continue
            if min(change) < 0:  # clusters whose count drops to zero are freed
                dropped = (c for c in compress(range(len(change)), change) if not after[c])
                for index in dropped:
                    _note_freed(freed, first + index)
            values[low:high] = array(values.typecode, after)

    def undo(self) -> None:
        """Cut the file back (best effort) after a failure before the switch; clusters
        written inside the file were free and stay so."""
        try:
            if self.image.file.size() > self.file_size:
                self.image.file.truncate(self.file_size)
        except Exception:  # the failure being reported matters more; this is only space
            pass


def _paths_changed(image, state: _NewState, added: list[array], removed: list[array]) -> None:
    """Count into state.delta the L1 -> L2 (-> cluster) paths of the `added` L1 tables,
    less those of the `removed` ones; L2 tables reached as often before as after cancel
    out and are not read at all."""
    l2_paths = ClusterCounts(state.bits, state.delta.file_clusters, signed=True)
    for l1 in added:
        count_l1_entries(l2_paths, l1, state.cs, 1)
    for l1 in removed:
        count_l1_entries(l2_paths, l1, state.cs, -1)
    count_l2_tables(image, state.delta, l2_paths)


def _commit_state(
    image,
    active: array,
    *,
    snapshot_l1: array | None = None,
    new_snapshot: Snapshot | None = None,
    deleted: tuple[Snapshot, array] | None = None,
    snapshots: list[Snapshot] | None = None,
    size: int | None = None,
) -> None:
    """Switch the image, in one header write, to the active tree `active` (L2 table
    offsets without flags), plus the new snapshot `new_snapshot` with `snapshot_l1`, less
    the snapshot `deleted` (with its L1 table); `snapshots` is the new snapshot table
    (None: unchanged). The caller holds _Exclusive. See the module docstring."""
    m = image.map
    hdr = image.header
    bits = image.cluster_bits
    state = _NewState(image)
    added = [active] + ([snapshot_l1] if snapshot_l1 is not None else [])
    _paths_changed(image, state, added, [m.l1] + ([deleted[1]] if deleted else []))
    if deleted is not None and deleted[0].l1_size:
        state.change_range(deleted[0].l1_table_offset, deleted[0].l1_size * 8, -1)
    old_table = cached_table(image)
    if snapshots is not None and old_table[1]:
        state.supersede(hdr.snapshots_offset, old_table[1])
    state.check_counts()
    try:
        # 1. Active L2 tables whose COPIED flags are wrong for the new state get copies,
        #    which the new L1 tables point at instead (a new snapshot shares them).
        uses: dict[int, int] = {}  # L2 table offset -> entries of the new L1 tables on it
        for l1 in added:
            for offset in filter(None, l1):
                uses[offset] = uses.get(offset, 0) + 1
        # A new snapshot shares every L2 table of the active tree, so every cluster the
        # tree reaches is counted twice at least: no entry keeps COPIED.
        all_shared = new_snapshot is not None
        copies: dict[int, int] = {}
        for offset in dict.fromkeys(filter(None, active)):
            table = m.l2_cache.get(offset)
            if all_shared:
                encoded = _without_copied(table, m.entry_words)
            else:
                fixed = _flags_for(table, m.entry_words, state.counts_of, bits)
                encoded = None if fixed is None else encode_be64(fixed)
            if encoded is not None:
                copy_offset = state.write_new(encoded)
                copies[offset] = copy_offset
                state.delta.add(offset >> bits, 1 - uses[offset])
                state.supersede(offset, state.cs)
                state.delta.add(copy_offset >> bits, uses[offset] - 1)
        if copies:
            for l1 in added:
                for index in compress(range(len(l1)), l1):
                    l1[index] = copies.get(l1[index], l1[index])
        for index in compress(range(len(active)), active):
            if state.get(active[index] >> bits) == 1:
                active[index] |= S.OFLAG_COPIED
        # 2. The L1 tables and the snapshot table that changed.
        l1_offset = hdr.l1_table_offset
        if active != m.l1:
            if len(m.l1):
                state.supersede(hdr.l1_table_offset, len(m.l1) * 8)
            l1_offset = state.write_new(encode_be64(active)) if len(active) else 0
        if new_snapshot is not None:
            assert snapshot_l1 is not None  # (given with new_snapshot)
            new_snapshot.l1_size = len(snapshot_l1)
            new_snapshot.l1_table_offset = (
                state.write_new(encode_be64(snapshot_l1)) if len(snapshot_l1) else 0
            )
        disk_size = image.size if size is None else size
        table_offset, table_bytes = hdr.snapshots_offset, old_table[1]
        if snapshots is not None:
            table = pack_snapshot_table(snapshots, disk_size) if snapshots else b""
            table_offset = state.write_new(table) if table else 0
            table_bytes = len(table)
        # 3. New copies of the refcount blocks that change, and a refcount table.
        reftable_offset, reftable_clusters, freed = state.write_refcounts()
        image._sync(image.file)
        # 4. The commit point: one sector write of the header.
        fields = dict(
            size=disk_size,
            l1_size=len(active),
            l1_table_offset=l1_offset,
            nb_snapshots=len(snapshots) if snapshots is not None else hdr.nb_snapshots,
            snapshots_offset=table_offset,
            refcount_table_offset=reftable_offset,
            refcount_table_clusters=reftable_clusters,
        )
        old_fields = {key: getattr(hdr, key) for key in fields}
        for key, value in fields.items():
            setattr(hdr, key, value)
        try:
            image._write_header_fields()
        except BaseException:
            for key, value in old_fields.items():
                setattr(hdr, key, value)
            raise
    except BaseException:
        state.undo()  # the header does not point there
        raise
    # 5. Work from the new state, which the file shows from now on (even if the flush
    #    below fails), and give what only the old one used back to the filesystem.
    image._host_size = max(image._host_size, state.end)
    image.use_refcount_table(reftable_offset, reftable_clusters, max(state.end, state.file_size))
    _use_l1(image, active, l1_offset)
    image.size = disk_size
    m.l2_cache.clear()
    image._compressed_tail = 0
    if snapshots is not None:
        image._snapshot_table = (
            hdr.snapshots_offset,
            hdr.nb_snapshots,
            list(snapshots),
            table_bytes,
        )
    image._sync(image.file)
    for first, count in _runs_outside(freed, state.superseded):
        image.file.punch_hole(first << bits, count << bits)
    _trim_file(image, state)


def _runs_outside(runs: list[tuple[int, int]], kept: set[int]) -> Iterator[tuple[int, int]]:
    """The (first, count) runs of clusters less the clusters in `kept`."""
    for first, count in runs:
        start = first
        for cluster in sorted(kept.intersection(range(first, first + count))):
            if cluster > start:
                yield start, cluster - start
            start = cluster + 1
        if first + count > start:
            yield start, first + count - start


def _trim_file(image, state: _NewState) -> None:
    """Cut the file after its last cluster in use, so the metadata one operation frees at
    the end does not make the file grow from one operation to the next. Only clusters the
    operation freed or wrote are cut: a cluster that was free before may still hold data
    a damaged image points at."""
    refs = image.refcounts
    old_end = -(-state.file_size >> image.cluster_bits)
    end = -(-image.file.size() >> image.cluster_bits)
    while end > 1 and not refs.get(end - 1) and (end > old_end or state.delta.get(end - 1)):
        end -= 1
    if end << image.cluster_bits < image.file.size():
        image.file.truncate(end << image.cluster_bits)
        image._host_size = end << image.cluster_bits
        refs.end_cluster = min(refs.end_cluster, end)
        refs.file_size_hint = end << image.cluster_bits
        refs.free_hint = min(refs.free_hint, end)


def _switch_header(image, **fields) -> None:
    """Change header fields with one sector write, made durable (the commit point)."""
    hdr = image.header
    old = {key: getattr(hdr, key) for key in fields}
    for key, value in fields.items():
        setattr(hdr, key, value)
    try:
        image.file.flush()  # everything the new header points at is on disk first
        image._write_header_fields()
        image.file.flush()
    except BaseException:
        for key, value in old.items():
            setattr(hdr, key, value)
        raise


def _use_l1(image, l1: array, offset: int) -> None:
    """Point the in-memory map at a new active L1 table (after the header switch)."""
    m = image.map
    m.l1 = l1
    m.l1_dirty.clear()
    m.l1_table_offset = offset
    m.metadata[1] = (offset, offset + len(l1) * 8, "the L1 table")


def _read_l1(image, snap: Snapshot) -> array:
    if snap.l1_size * 8 > S.MAX_L1_BYTES:
        raise CorruptImageError(
            f"Snapshot '{snap.name}' L1 table too large (l1_size {snap.l1_size})"
        )
    if not snap.l1_size:
        return array("Q")
    if snap.l1_table_offset % image.cluster_size or (
        snap.l1_table_offset + snap.l1_size * 8 > image.file.size()
    ):
        raise CorruptImageError(
            f"Snapshot '{snap.name}' L1 table offset invalid (l1_table_offset "
            f"0x{snap.l1_table_offset:x}, l1_size {snap.l1_size})"
        )
    return decode_be64(image.file.pread(snap.l1_size * 8, snap.l1_table_offset))


def _plain_offsets(image, l1: array) -> array:
    """An L1 table's L2 table offsets without flags (malformed entries refused)."""
    offsets = array("Q", bytes(8 * len(l1)))
    for index in compress(range(len(l1)), l1):
        offsets[index] = l2_table_offset(l1[index], index, image.cluster_size)
    return offsets


def refresh_copied_flags(image) -> None:
    """Set COPIED in the active tree exactly where the refcount is 1 (QEMU's addend 0)."""
    m = image.map
    refs = image.refcounts
    bits = image.cluster_bits
    for index, entry in enumerate(m.l1):
        l2 = l2_table_offset(entry, index, image.cluster_size)
        if not l2:
            continue
        want = S.OFLAG_COPIED if refs.get(l2 >> bits) == 1 else 0
        if entry & S.OFLAG_COPIED != want:
            m.l1[index] = (entry & ~S.OFLAG_COPIED) | want
            m.l1_dirty.add(index)
        table = m.l2_cache.get(l2)
        fixed = _flags_for(table, m.entry_words, refs.counts_of, bits)
        if fixed is not None:
            table[:] = fixed
            m.l2_cache.mark_dirty(l2)


def _grow_l1(image, entries: int) -> None:
    """Move the active L1 table to new clusters with `entries` entries (crash-safe)."""
    if entries * 8 > S.MAX_L1_BYTES:
        raise InvalidArgumentError(
            f"L1 table would be too large (l1_size {entries}, limit {S.MAX_L1_BYTES // 8})"
        )
    m = image.map
    old_offset, old_size = m.l1_table_offset, len(m.l1)
    l1 = array("Q", m.l1)
    l1.extend([0] * (entries - len(l1)))
    offset = image.write_new_clusters(encode_be64(l1))
    image._write_back()
    _switch_header(image, l1_size=entries, l1_table_offset=offset)
    _use_l1(image, l1, offset)
    if old_size:
        first = old_offset >> image.cluster_bits
        image.refcounts.free(
            first, ((old_offset + old_size * 8 - 1) >> image.cluster_bits) - first + 1
        )
    image._write_back()


def _make_date(date) -> tuple[int, int]:
    if date is None:
        now = time.time_ns()
        return now // 1_000_000_000, now % 1_000_000_000
    if not isinstance(date, (tuple, int, float)):
        from datetime import datetime  # (only here: importing it costs every command)

        if isinstance(date, datetime):
            date = date.timestamp()
    if isinstance(date, tuple):
        sec, nsec = date
    else:
        sec = int(date // 1)
        nsec = int(round((date - sec) * 1e9))
        if nsec >= 1_000_000_000:
            sec, nsec = sec + 1, nsec - 1_000_000_000
    if not (0 <= sec <= 0xFFFFFFFF and 0 <= nsec < 1_000_000_000):
        raise InvalidArgumentError(
            f"snapshot date {date!r} out of range (date_sec must fit 32 bits)"
        )
    return int(sec), int(nsec)


# --- VM state -------------------------------------------------------------------------------


def write_vmstate(image, pos: int, data) -> None:
    """Write VM state bytes at `pos` of the active image's VM state area.

    The area starts at the first L1 entry past the virtual disk (as QEMU's savevm
    writes it); `create_snapshot(..., vm_state_size=n)` then takes it into the snapshot.
    """
    _require_writable(image, "write VM state")
    view = memoryview(data).cast("B")
    if pos < 0:
        raise InvalidArgumentError(f"VM state position {pos} is negative")
    if not view:
        return
    with _Exclusive(image):
        start = vm_state_offset(image) + pos
        end = start + len(view)
        needed = -(-end // _l1_span(image))
        if needed > len(image.map.l1):
            _grow_l1(image, needed)
        size = image.size
        image.size = end  # let the engine's write path reach past the disk, as QEMU does
        try:
            image.write(start, view)
        finally:
            image.size = size
        _flush_all(image)


def read_vmstate(image, name_or_id: str, pos: int = 0, length: int | None = None) -> bytes:
    """VM state bytes of a snapshot."""
    with SnapshotView(image, name_or_id) as view:
        return view.read_vmstate(pos, length)


# --- create / apply / delete ----------------------------------------------------------------


def create_snapshot(
    image,
    name: str,
    *,
    vm_state_size: int = 0,
    vm_clock_nsec: int = 0,
    date=None,
    icount: int | None = None,
    vm_state=None,
) -> Snapshot:
    """Take a snapshot of the active image; returns its entry.

    date: None (now), seconds since the epoch, a datetime or (sec, nsec). icount: None
    writes -1 (icount disabled). vm_state: bytes to store as the VM state first (else
    the first vm_state_size bytes already written with write_vmstate are taken).
    """
    _require_writable(image, "create a snapshot")
    encoded = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else None
    if encoded is None or b"\0" in encoded or len(encoded) > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"invalid snapshot name {name!r} (a string of at most "
            f"{MAX_NAME_BYTES} bytes without NUL)"
        )
    if not 0 <= vm_clock_nsec < 1 << 64:
        raise InvalidArgumentError(f"vm_clock_nsec {vm_clock_nsec} out of range")
    if icount is not None and not 0 <= icount < 1 << 64:
        icount &= (1 << 64) - 1  # -1 and friends, as QEMU's uint64 holds them
    date_sec, date_nsec = _make_date(date)
    if vm_state is not None:
        write_vmstate(image, 0, vm_state)
        vm_state_size = vm_state_size or len(vm_state)
    if not 0 <= vm_state_size < 1 << 64:
        raise InvalidArgumentError(f"vm_state_size {vm_state_size} out of range")
    with _Exclusive(image):
        snapshots, _ = _read_table(image)
        if len(snapshots) >= S.MAX_SNAPSHOTS:
            raise InvalidArgumentError(
                f"too many snapshots (nb_snapshots {len(snapshots)}, limit {S.MAX_SNAPSHOTS})"
            )
        active = image.map.l1
        vm_index = _vm_state_index(image, image.size)
        span = _l1_span(image)
        vm_end = vm_index + (-(-vm_state_size // span))
        if vm_state_size and vm_end > len(active):
            raise InvalidArgumentError(
                f"vm_state_size {vm_state_size} reaches past the image's L1 table (write the "
                f"VM state with write_vmstate first)"
            )
        snap = Snapshot(
            _new_id(snapshots),
            name,
            0,
            len(active),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            b"",
            image.size,
            ICOUNT_DISABLED if icount is None else icount,
        )
        # The snapshot takes the whole active L1 table, VM state area included (data
        # written there past vm_state_size survives a revert, as in QEMU); the VM state
        # itself goes to the snapshot alone: QEMU drops it from the active tree.
        snap_l1 = _plain_offsets(image, active)
        new_active = array("Q", snap_l1)
        new_active[vm_index:vm_end] = array("Q", bytes(8 * (vm_end - vm_index)))
        try:
            _commit_state(
                image,
                new_active,
                snapshot_l1=snap_l1,
                new_snapshot=snap,
                snapshots=snapshots + [snap],
            )
        except ReferencePastEnd as exc:
            raise Qcow2IOError(_refcount_growth_errno(image, exc.offset), str(exc)) from exc
        return snap


def _refcount_growth_errno(image, offset: int) -> int:
    """The errno QEMU's snapshot creation fails with when a cluster it must count lies
    past the end of the file: EFBIG where no refcount table (at most 8 Mi entries, grown
    with QEMU's 50% margin) could reach it, else EAGAIN (QEMU adds a refcount block for
    it and gives up asking for a retry). qcow2lib refuses before writing anything."""
    entries_per_block = image.cluster_size * 8 >> image.header.refcount_order
    blocks = (offset >> image.cluster_bits) // entries_per_block + 1
    if blocks + -(-blocks // 2) > S.MAX_REFTABLE_BYTES:
        return errno.EFBIG
    return errno.EAGAIN


def apply_snapshot(
    image, name_or_id: str | None = None, *, id: str | None = None, name: str | None = None
) -> Snapshot:
    """Revert the active image to a snapshot (the snapshot stays)."""
    _require_writable(image, "apply a snapshot")
    with _Exclusive(image):
        snapshots, _ = _read_table(image)
        index = _lookup(snapshots, name_or_id, id, name)
        snap = snapshots[index]
        disk_size = image.size if snap.disk_size is None else snap.disk_size
        if disk_size != image.size and image.header.version < 3:
            raise UnsupportedFeatureError(
                f"cannot apply snapshot '{snap.name}': its disk size {disk_size} differs from "
                f"the image's {image.size} and a version 2 image cannot be resized"
            )
        if disk_size % 512:
            raise CorruptImageError(
                f"Snapshot '{snap.name}' disk size {disk_size} is not a multiple of 512"
            )
        entries = max(snap.l1_size, _vm_state_index(image, disk_size))
        if entries * 8 > S.MAX_L1_BYTES:
            raise CorruptImageError(
                f"Snapshot '{snap.name}' disk size {disk_size} needs too large an L1 table"
            )
        new_active = _plain_offsets(image, _read_l1(image, snap))
        new_active.extend([0] * (entries - len(new_active)))
        image.invalidate_bitmaps()  # the guest's content changes
        _commit_state(image, new_active, size=disk_size)
        return snap


def delete_snapshot(
    image, name_or_id: str | None = None, *, id: str | None = None, name: str | None = None
) -> Snapshot:
    """Delete a snapshot; returns the entry it had."""
    _require_writable(image, "delete a snapshot")
    with _Exclusive(image):
        snapshots, _ = _read_table(image)
        index = _lookup(snapshots, name_or_id, id, name)
        snap = snapshots[index]
        deleted_l1 = _read_l1(image, snap)  # refused if invalid, as QEMU does
        _commit_state(
            image,
            _plain_offsets(image, image.map.l1),
            deleted=(snap, deleted_l1),
            snapshots=snapshots[:index] + snapshots[index + 1 :],
        )
        return snap


# --- reading a snapshot without applying it -------------------------------------------------


class SnapshotView(BlockDevice):
    """A snapshot's disk content as a read-only BlockDevice (the image is not changed).

    Reads go through the image's L2 cache, decompression and backing file. The view is
    valid while the snapshot exists; close() closes the image only if close_image.
    """

    format = "qcow2"

    def __init__(
        self,
        image,
        name_or_id: str | None = None,
        *,
        id: str | None = None,
        name: str | None = None,
        close_image: bool = False,
    ):
        from copy import copy  # (here: only views need it, and qimg starts often)

        _require_qcow2(image)
        self.image = image
        self.close_image = close_image
        with image._lock:
            snapshots, _ = _read_table(image)
            self.snapshot = snap = snapshots[_lookup(snapshots, name_or_id, id, name)]
            l1 = _read_l1(image, snap)
            self.map = copy(image.map)
            self.map.l1 = l1
            self.map.l1_dirty = set()
            self.map.l1_table_offset = snap.l1_table_offset
        self.size = image.size if snap.disk_size is None else snap.disk_size
        self.filename = image.filename
        self.read_only = True
        self.backing = image.backing
        self._closed = False

    def __getattr__(self, attr):
        # header, cluster_size, compat, refcount_bits, ... come from the image.
        if attr in ("image", "map", "snapshot"):
            raise AttributeError(attr)
        return getattr(self.image, attr)

    def _read(self, offset: int, view: memoryview) -> None:
        self.image.read_mapped(self.map, offset, view)

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        if view:
            self._read(offset, view)
        return len(view)

    def read_vmstate(self, pos: int = 0, length: int | None = None) -> bytes:
        """Bytes of the snapshot's saved VM state."""
        total = self.snapshot.vm_state_size
        if length is None:
            length = max(0, total - pos)
        if pos < 0 or length < 0 or pos + length > total:
            raise InvalidArgumentError(
                f"VM state request at {pos} length {length} lies outside "
                f"the VM state ({total} bytes)"
            )
        buf = bytearray(length)
        if length:
            self._read(vm_state_offset(self.image, self.size) + pos, memoryview(buf))
        return bytes(buf)

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        return self.image.mapped_extent_batches(self.map, offset, length, active=False)

    def write(self, offset: int, data) -> None:
        raise ReadOnlyError(f"snapshot '{self.snapshot.name}' of '{self.filename}' is read-only")

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.write(offset, b"")

    def discard(self, offset: int, length: int) -> None:
        self.write(offset, b"")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.close_image:
            self.image.close()
