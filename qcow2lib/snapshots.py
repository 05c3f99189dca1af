"""Internal snapshots: the snapshot table, and creating, applying, deleting and reading them.

Each snapshot owns an L1 table. Refcounts count paths, as QEMU does: every L1 table that
reaches an L2 table holds one reference on it, and every time an L2 table is reached it
holds one reference on each cluster it points at. Sharing a tree with a snapshot therefore
adds one to every cluster the tree reaches, and an entry of the active tree carries the
COPIED flag exactly when its cluster's refcount is 1 (then it may be written in place).

Create, apply and delete follow QEMU's steps, so an image comes out byte for byte as
qemu-img leaves it (QEMU's own tests poke snapshot tables and L2 tables at the offsets
its layout gives them): the snapshot's copy of the L1 table, QEMU's refcount passes over
the trees (qcow2_update_snapshot_refcount: each count changed, each COPIED flag set
exactly where the count is then 1), and the snapshot table written anew (new clusters,
one header write, the old table freed). A failure between steps leaves what QEMU's
does: leaked clusters only. The passes change counts and flags together in place, which
no order of writes keeps consistent at every moment; they are prepared in the caches
and reach the disk through a shadow state (shadow.py), so a crash leaves the old state
or the new one.

Cost: a pass reads the L1 table it walks and the L2 tables it reaches; the other
snapshots' tables are never read; a pass is committed span by span of L1 entries (see
_spans), so what it holds in memory stays bounded; within an L2 table the entries that
name aligned host clusters are counted and flagged a run of clusters at a time (_Layout),
and the passes of one step share each table's layout; applying a snapshot leaves the
L2 tables both trees share out of the two passes that would only add a reference and take
it back (see _reverting); the snapshot table is parsed once per table the header points
at.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from array import array
from itertools import compress, repeat
from operator import itemgetter, not_, or_, rshift

from . import structs as S
from .blockdev import BlockDevice, Extent
from .cache import decode_be64, encode_be64, keep_freed_memory
from .errors import (
    CorruptImageError,
    SignaledCorruptionError,
    emit_notice,
    InvalidArgumentError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from .hostfile import HostFile
from .refcount import RefcountBlock
from .runs import (
    allowed_bytes,
    column_flags,
    consecutive_runs,
    is_64k_cluster_run,
    lanes,
    nonzero_positions,
    one_positions,
)
from .shadow import commit_in_place, room_needed, shadow_bytes
from .sizes import c_hex
from .snapshot_table import (
    cached_table,
    list_snapshots,
    require_qcow2 as _require_qcow2,
    ICOUNT_DISABLED,
    Snapshot,
    pack_snapshot_table,
)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Container, Iterable, Iterator, Sequence

MAX_NAME_BYTES = 255  # QEMU keeps names in a 256-byte buffer


def _read_table(image) -> tuple[list[Snapshot], int]:
    """A copy of the snapshot list (callers may change it) and the table's size."""
    snapshots, table_bytes = cached_table(image)
    return list(snapshots), table_bytes


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
    """QEMU's rule: one more than the largest ID read as a number (strtoul: leading
    space, a plus sign, then the digits up to the first other character). Parsed by
    hand: `re` costs a snapshot's creation 3 ms of start-up."""
    highest = 0
    for snap in snapshots:
        text = snap.id.lstrip()
        text = text[1:] if text.startswith("+") else text
        digits = 0
        while digits < len(text) and text[digits].isdecimal():
            digits += 1
        if digits:
            highest = max(highest, int(text[:digits]))
    return str(highest + 1)


# --- helpers over the engine ----------------------------------------------------------------


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
        image._lock.acquire()
        try:
            while image._io_active:
                image._wait()
            _flush_all(image)
        except BaseException:
            image._lock.release()
            raise

    def __exit__(self, *exc_info) -> None:
        image = self.image
        image._last_decompressed = None  # host clusters may have been freed and reused
        image._prealloc_detected = None
        image._lock.release()


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


class _Counts:
    """Refcount changes made in the image's cached refcount blocks, as QEMU's
    update_refcount makes them, for one operation to commit (shadow.commit_in_place);
    `freed` collects the clusters whose count drops to zero."""

    def __init__(self, image, remember_layouts: bool = False) -> None:
        self.image = image
        self.refs = image.refcounts
        self.shift = self.refs.block_entries.bit_length() - 1
        self.mask = self.refs.block_entries - 1
        self.freed: list[int] = []
        self._index = -1
        self._block: RefcountBlock | None = None
        # L2 table offset -> its _Layout, kept for the other passes of one step (a span's
        # tables: bounded as the step's memory is)
        self.layouts: dict[int, _Layout] | None = {} if remember_layouts else None

    def _load(self, block_index: int, cluster: int, addend: int) -> RefcountBlock | None:
        refs = self.refs
        offset = refs._block_offset(block_index)
        if not offset:
            if addend > 0:  # QEMU adds a refcount block there and asks for a retry
                raise Qcow2IOError(
                    _refcount_growth_errno(self.image, cluster << self.image.cluster_bits),
                    f"Cluster {cluster} has no refcount block to count it",
                )
            return None
        block = refs.blocks.get(offset)
        if addend:
            refs.blocks.mark_dirty(offset)
            self._index, self._block = block_index, block
        return block

    def add_runs(self, runs: list[tuple[int, int]], addend: int) -> list[int]:
        """add() of each cluster of each (first cluster, count) run, each run within one
        refcount block, returning the new counts: a slice of a block at a time where the
        counts are whole bytes and none of them overflows or drops to zero; the rest one
        by one, in order, as add() does."""
        counts: list[int] = []
        shift = self.shift
        for cluster, length in runs:
            if not self._add_slice(cluster >> shift, cluster, length, addend, counts):
                counts.extend(self.add(c, addend) for c in range(cluster, cluster + length))
        return counts

    def _add_slice(
        self, block_index: int, cluster: int, length: int, addend: int, counts: list[int]
    ) -> bool:
        """Add `addend` to the counts of the clusters [cluster, +length) of one refcount
        block at once, appending the new counts; False (nothing changed) where add() must
        take them one by one (no block, sub-byte counts, an overflow, a count below 1)."""
        if block_index == self._index:
            block = self._block
        else:
            block = self._load(block_index, cluster, addend)
        if block is None:
            return False
        first = cluster & self.mask
        if not addend:
            if not isinstance(block.values, array):  # (sub-byte counts packed in bytes)
                return False
            counts.extend(block.values[first : first + length])
            return True
        after = block.add_to_slice(first, first + length, addend, self.refs.max_refcount)
        if after is None:  # (sub-byte counts, or a count out of range: add() reports it)
            return False
        if addend < 0 and 0 in after:
            self.freed.extend(compress(range(cluster, cluster + length), map(not_, after)))
        counts.extend(after)
        return True

    def add(self, cluster: int, addend: int) -> int:
        """Add `addend` (-1, 0 or 1) to a cluster's count; returns the new count."""
        block_index = cluster >> self.shift
        block = self._block if block_index == self._index else None
        if block is None:
            block = self._load(block_index, cluster, addend)
        index = cluster & self.mask
        before = block.get(index) if block is not None else 0
        if not addend:
            return before
        after = before + addend
        if after < 0:
            raise CorruptImageError(
                f"Refcount of cluster {cluster} (offset 0x{cluster << self.image.cluster_bits:x}) "
                f"would drop below zero"
            )
        if after > self.refs.max_refcount:
            raise InvalidArgumentError(
                f"Refcount of cluster {cluster} would overflow: {after} references exceed the "
                f"maximum {self.refs.max_refcount} of refcount_bits={self.image.refcount_bits}"
            )
        assert block is not None  # (a missing block was refused above)
        block.set(index, after)
        if not after:
            self.freed.append(cluster)
        return after


if TYPE_CHECKING:
    # A commit's passes over the caches: the new active L1 table and the inactive L1
    # tables to write (see _in_place).
    Step = Callable[[_Counts], tuple[array, list[tuple[int, array]]]]


def _cluster_runs(clusters: list[int], shift: int) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive clusters of `clusters`, in their order,
    cut where a refcount block (2**shift clusters) ends."""
    return _cut_at_blocks(
        ((cluster, length) for cluster, length, _ in consecutive_runs(clusters)), shift
    )


def _cut_at_blocks(runs: Iterable[tuple[int, int]], shift: int) -> list[tuple[int, int]]:
    """The (first cluster, count) runs, each cut where a refcount block (2**shift
    clusters) ends."""
    cut = []
    for cluster, length in runs:
        end = cluster + length
        while cluster < end:
            take = min(end - cluster, (((cluster >> shift) + 1) << shift) - cluster)
            cut.append((cluster, take))
            cluster += take
    return cut


class _Layout:
    """What a pass needs of one L2 table, found once per step (a step's passes change
    flags only, never which entries are in use or where they point). Its non-zero
    entries are split in two: `odd` (compressed, unaligned, or without a host cluster:
    counted entry by entry) and the rest, which name aligned host clusters: for these
    the runs their clusters form and the runs of their positions (start, stop, index of
    the first value), so that their counts and flags change a run at a time."""

    __slots__ = ("odd", "odd_clusters", "values_of", "host_runs", "position_runs")

    def __init__(self, image, table: array, positions: Sequence[int], shift: int) -> None:
        step = image.map.entry_words
        self.odd: list[int] = []
        self.odd_clusters: list[tuple[int, int]] = []  # (first, count): clusters they name
        host_runs = None
        if step == 1 and _NATIVE_LITTLE:  # (the usual table: every used entry plain)
            host_runs = _plain_host_runs(image, table, positions, shift)
        entries = len(table) // step
        values_of = _getter(positions, step, entries)
        if host_runs is None:
            values = values_of(table)
            offsets = list(map(S.L2E_OFFSET_MASK.__and__, values))
            irregular = S.OFLAG_COMPRESSED | (S.L2E_OFFSET_MASK & (image.cluster_size - 1))
            if 0 in offsets or any(map(irregular.__and__, values)):
                regular = [bool(o) and not v & irregular for o, v in zip(offsets, values)]
                self.odd = [p for p, keep in zip(positions, regular) if not keep]
                self.odd_clusters = _odd_clusters(
                    image, [v for v, keep in zip(values, regular) if not keep]
                )
                positions = list(compress(positions, regular))
                offsets = list(compress(offsets, regular))
                values_of = _getter(positions, step, entries)
            host_runs = _cluster_runs(list(map(rshift, offsets, repeat(image.cluster_bits))), shift)
        self.values_of = values_of
        self.host_runs = host_runs
        self.position_runs = (
            [(0, len(positions), 0)]
            if len(positions) == entries  # (a full table: positions are all)
            else [
                (start, start + length, first)
                for start, length, first in consecutive_runs(positions)
            ]
        )


_NATIVE_LITTLE = sys.byteorder == "little"
_ZERO_WORD = bytes(8)  # (8 zero bytes nowhere in a table's bytes: no entry is zero)
_NO_LOW_OFFSET_BIT = bytes(value & 0xFE for value in range(256))  # (byte 1: bit 8 is not)


def _plain_host_runs(
    image, table: array, positions: Sequence[int], shift: int
) -> list[tuple[int, int]] | None:
    """_Layout's host runs, found with whole-table byte and integer operations, when every
    entry at `positions` (of a standard table, native little-endian words) names an
    aligned host cluster and is not compressed: the runs of consecutive host clusters in
    table order, cut where a refcount block (2**shift clusters) ends. None otherwise (the
    entry by entry layout then sorts the entries out)."""
    count = len(positions)
    if not count:
        return None
    if count == len(table):
        raw = table.tobytes()
    else:
        raw = array("Q", map(table.__getitem__, positions)).tobytes()
    bits = image.cluster_bits
    irregular = S.OFLAG_COMPRESSED | (S.L2E_OFFSET_MASK & ((1 << bits) - 1))
    tops = raw[7::8]  # (the top bytes: checked below, and passed to the run test)
    for column, allowed in allowed_bytes(irregular):
        if (tops if column == 7 else raw[column::8]).translate(None, allowed):
            return None  # (compressed, or an offset below the cluster size)
    if bits == 16 and is_64k_cluster_run(raw, count, tops):  # (one run, often all)
        first = (int.from_bytes(raw[:8], "little") & S.L2E_OFFSET_MASK) >> bits
        if first:
            return _cut_at_blocks([(first, count)], shift)
    offsets = bytearray(raw)  # the offsets alone: bits 9 to 55
    offsets[0::8] = bytes(count)
    offsets[1::8] = offsets[1::8].translate(_NO_LOW_OFFSET_BIT)
    offsets[7::8] = bytes(count)
    if 0 in column_flags(bytes(offsets), range(1, 7)):
        return None  # (an entry without a host cluster)
    # Entry i + 1 continues entry i's run where its offset is one cluster more: the XOR of
    # the offsets shifted down one entry with the offsets plus a cluster is zero there.
    values = int.from_bytes(offsets, "little")
    differ = (values >> 64) ^ (values + lanes(1 << bits, count))
    breaks = one_positions(column_flags(differ.to_bytes(8 * count, "little"))[:-1], 1)
    words = array("Q", offsets)
    starts, stops = [0, *breaks], [*breaks, count]
    return _cut_at_blocks(
        ((words[start] >> bits, stop - start) for start, stop in zip(starts, stops)), shift
    )


def _odd_clusters(image, values: list[int]) -> list[tuple[int, int]]:
    """(first cluster, count) of the host clusters odd entries name: a compressed
    cluster's sectors, or the cluster an unaligned offset lies in."""
    named = []
    for value in values:
        if value & S.OFLAG_COMPRESSED:
            clusters = _compressed_clusters(image, value)
            named.append((clusters.start, len(clusters)))
        elif value & S.L2E_OFFSET_MASK:
            named.append(((value & S.L2E_OFFSET_MASK) >> image.cluster_bits, 1))
    return named


def _compressed_clusters(image, value: int) -> range:
    """The host clusters a compressed entry's sectors lie in."""
    m = image.map
    host = (value & m.compressed_offset_mask) & ~511
    sectors = ((value >> m.csize_shift) & m.csize_mask) + 1
    return range(host >> image.cluster_bits, ((host + sectors * 512 - 1) >> image.cluster_bits) + 1)


_NOT_COPIED = ((1 << 64) - 1) & ~S.OFLAG_COPIED
# COPIED is the top bit of an entry's top byte, which a native array keeps last (little
# endian) or first: each byte value with that bit set, or cleared
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
_WITH_COPIED = bytes(value | 0x80 for value in range(256))
_WITHOUT_COPIED = bytes(value & 0x7F for value in range(256))


def _set_copied(
    table: array, position_runs: list[tuple[int, int, int]], step: int, copied: bool
) -> bool:
    """Give the entries of `position_runs` (of a table of `step` words an entry) COPIED, or
    take it from them, a run of entries at a time through their top bytes; returns
    whether any entry changed."""
    stride = 8 * step
    flagged = _WITH_COPIED if copied else _WITHOUT_COPIED
    changed = False
    with memoryview(table) as words, words.cast("B") as raw:
        for start, stop, _ in position_runs:
            tops = slice(stride * start + _TOP_BYTE, stride * stop, stride)
            before = raw[tops].tobytes()
            after = before.translate(flagged)
            if after != before:
                raw[tops] = after
                changed = True
    return changed


def _getter(
    positions: Sequence[int], step: int, entries: int
) -> Callable[[array], tuple[int, ...]]:
    """A function giving the entries at `positions` of a table of `entries` entries of
    `step` words each (their first words), as a tuple, at C speed. A full table's getter keeps
    no positions (a layout is kept for each table a step reaches: 8192 positions are
    320 KiB of integers)."""
    if len(positions) == entries:
        return tuple if step == 1 else lambda table: tuple(table[::step])
    indices = positions if step == 1 else [position * step for position in positions]
    if len(indices) > 1:
        return itemgetter(*indices)
    if indices:
        index = indices[0]
        return lambda table: (table[index],)
    return lambda table: ()


def _count_entries(
    image, table: array, l2_offset: int, positions: list[int], addend: int, counts: _Counts
) -> bool:
    """_refcount_pass's work on a table's odd entries (see _Layout), entry by entry: a
    compressed cluster's count changes, an unaligned offset is a corruption, and neither
    these nor entries without a host cluster keep COPIED; returns whether the table
    changed."""
    step = image.map.entry_words
    copied, compressed, mask = S.OFLAG_COPIED, S.OFLAG_COMPRESSED, S.L2E_OFFSET_MASK
    dirty = False
    for l2_index in positions:
        value = table[l2_index * step]
        plain = value & ~copied
        if plain & compressed:
            if addend:
                for cluster in _compressed_clusters(image, plain):
                    counts.add(cluster, addend)
        elif plain & mask:  # (an odd entry with a host offset: an unaligned one)
            raise SignaledCorruptionError(
                f"Cluster allocation offset {c_hex(plain & mask)} unaligned (L2 "
                f"offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
            )
        if plain != value:
            table[l2_index * step] = plain
            dirty = True
    return dirty


def _refcount_pass(
    image,
    l1: array,
    addend: int,
    counts: _Counts,
    span: range | None = None,
    skip: Container[int] = (),
) -> bool:
    """QEMU's qcow2_update_snapshot_refcount in the caches: add `addend` to the count of
    every cluster the tree of `l1` (entries with flags; those of `span` only, if given,
    less the L1 indices in `skip`) reaches, and give each entry of the tree COPIED
    exactly where its cluster's count is then 1 (compressed clusters never). `l1` is
    changed in place; returns whether it changed."""
    m = image.map
    bits, cs = image.cluster_bits, image.cluster_size
    step = m.entry_words
    copied, not_copied = S.OFLAG_COPIED, _NOT_COPIED
    copied_if_one = {1: copied}
    layouts = counts.layouts
    changed = False
    first = span.start if span is not None else 0
    stop = span.stop if span is not None else len(l1)
    for l1_index in nonzero_positions(l1[first:stop]):
        l1_index += first
        if l1_index in skip:
            continue
        entry = l1[l1_index]
        l2_offset = entry & S.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset % cs:
            raise SignaledCorruptionError(
                f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(l1_index)})"
            )
        table = m.l2_cache.get(l2_offset)
        layout = layouts.get(l2_offset) if layouts is not None else None
        if layout is None:
            entries = table[::step] if step > 1 else table
            raw = entries.tobytes()
            # (a full table's positions as a range: a list of 8192 integers is 320 KiB
            # made and freed per table, fresh memory each time)
            positions: Sequence[int] = range(len(entries))
            if _ZERO_WORD in raw:
                positions = nonzero_positions(entries, raw)
            layout = _Layout(image, table, positions, counts.shift)
            if layouts is not None:
                layouts[l2_offset] = layout
        dirty = bool(layout.odd) and _count_entries(
            image, table, l2_offset, layout.odd, addend, counts
        )
        if layout.host_runs:  # (the rest: counted and flagged a run at a time)
            new_counts = counts.add_runs(layout.host_runs, addend)
            if new_counts.count(new_counts[0]) == len(new_counts):  # (one count: one flag)
                if _set_copied(table, layout.position_runs, step, new_counts[0] == 1):
                    dirty = True
            else:
                values = layout.values_of(table)
                new_values = array(
                    "Q",
                    map(
                        or_,
                        map(not_copied.__and__, values),
                        map(copied_if_one.get, new_counts, repeat(0)),
                    ),
                )
                if values != tuple(new_values):
                    dirty = True
                    for run_start, run_stop, value_index in layout.position_runs:
                        table[run_start * step : run_stop * step : step] = new_values[
                            value_index : value_index + run_stop - run_start
                        ]
        if dirty:
            m.l2_cache.mark_dirty(l2_offset)
        new_entry = l2_offset | (copied if counts.add(l2_offset >> bits, addend) == 1 else 0)
        if new_entry != entry:
            l1[l1_index] = new_entry
            changed = True
    return changed


SPAN_L1_ENTRIES = 1024  # L1 entries a pass prepares in memory at a time (their L2 tables)


def _spans(l1_entries: int) -> list[range]:
    """A pass over a tree, cut into spans of L1 entries committed one by one: what one
    commit holds in memory stays bounded (a span's L2 tables), and each state between
    spans is sound (counts only raised above the references, or lowered to them)."""
    return [
        range(first, min(first + SPAN_L1_ENTRIES, l1_entries))
        for first in range(0, l1_entries, SPAN_L1_ENTRIES)
    ] or [range(0)]


class _NoShortcut(Exception):
    """A step's shortcut cannot vouch for reaching QEMU's state: take the long way."""


def _in_place(
    image,
    step: Step,
    shortcut: Step | None = None,
    new_table: list[Snapshot] | None = None,
) -> None:
    """Run `step` (QEMU's passes over the caches; returns the new active L1 table and the
    inactive L1 tables to write) and commit what it changed; on failure nothing of it is
    written and the caches forget it. `shortcut`, tried first, reaches the same state
    with less work where it can tell it does; where it cannot (or meets an error, which
    `step` then meets in QEMU's order and reports as QEMU does), `step` runs instead.
    `new_table`: the snapshot table the new state has (written to new clusters before the
    step, named by the commit's last header write)."""
    keep_freed_memory()
    placed = _place_table(image, new_table)
    if shortcut is not None:
        counts = _Counts(image, remember_layouts=True)
        try:
            active, inactive = shortcut(counts)
        except BaseException as exc:
            _forget_step(image, placed)
            if not isinstance(exc, (_NoShortcut, Qcow2Error)):
                raise
            placed = _place_table(image, new_table, placed)
        else:
            _commit(image, active, inactive, counts.freed, placed)
            return
    counts = _Counts(image, remember_layouts=True)
    try:
        active, inactive = step(counts)
    except BaseException as exc:
        _forget_step(image, placed)
        if isinstance(exc, SignaledCorruptionError):
            raise image._met_corruption(exc) from None
        raise
    _commit(image, active, inactive, counts.freed, placed)


class _PlacedTable:
    """A snapshot table written to new clusters, not yet named by the header, and the
    table it replaces (its clusters are freed once the new one is named). Its count stays
    in the caches for the commit that names it (a failed step forgets it: nothing leaks,
    as nothing would in QEMU, which writes the table last), unless counting it took a new
    refcount block: that changes the refcount table, which a commit keeps as it is, so
    then it is written back (durable) at once."""

    def __init__(self, image, snapshots: list[Snapshot]):
        hdr = image.header
        self.old_offset, self.old_bytes = hdr.snapshots_offset, cached_table(image)[1]
        self.snapshots = snapshots
        table = pack_snapshot_table(snapshots, image.size) if snapshots else b""
        self.length = len(table)
        self.file_end = image.file.size()
        self.offset = image.write_new_clusters(table) if table else 0
        self.durable = image.refcounts.table_dirty
        if self.durable:
            image._write_back()

    def forget(self, image) -> None:
        """The step failed and the caches forgot the table's count: where its bytes made
        the file longer, they go too: QEMU, which writes the table last, never wrote them
        (after iotest 112's refcount overflow the image is byte for byte qemu-img's)."""
        if self.durable or not self.length:
            return
        try:
            if image.file.size() > self.file_end:
                image.file.truncate(self.file_end)
        except Qcow2Error:  # (the failure being reported matters more; this is only space)
            pass

    def header_fields(self) -> dict[str, int]:
        return {"nb_snapshots": len(self.snapshots), "snapshots_offset": self.offset}

    def adopted(self, image) -> None:
        """The header names the new table: remember it and free the old one."""
        image._snapshot_table = (
            self.offset,
            len(self.snapshots),
            list(self.snapshots),
            self.length,
        )
        image._overlaps_for = None
        _free_clusters(image, self.old_offset, self.old_bytes)


def _place_table(
    image, snapshots: list[Snapshot] | None, earlier: _PlacedTable | None = None
) -> _PlacedTable | None:
    """The table placed for a step (`earlier`: placed before a step the caches forgot,
    placed again unless its count was durable already)."""
    if snapshots is None or (earlier is not None and earlier.durable):
        return earlier
    return _PlacedTable(image, snapshots)


def _commit(image, active, inactive, freed: list[int], placed: _PlacedTable | None) -> None:
    if placed is None:
        commit_in_place(image, active, inactive, freed)
    else:
        commit_in_place(image, active, inactive, freed, placed.header_fields())
        placed.adopted(image)


def _forget_step(image, placed: _PlacedTable | None = None) -> None:
    """Drop what a step prepared in the caches (they only ever hold one step's changes:
    each commit writes them all), and the snapshot table `placed` for it."""
    image.map.l2_cache.clear()
    image.refcounts.blocks.clear()
    if placed is not None:
        placed.forget(image)


def _free_clusters(image, offset: int, length: int) -> None:
    """QEMU's qcow2_free_clusters: one reference less on the clusters of [offset,
    +length), written back at once; a failure is only reported (the clusters leak)."""
    if image.blkdebug is not None:
        image.blkdebug.event("cluster_free")
    if not length:
        return
    bits = image.cluster_bits
    first = offset >> bits
    try:
        image.refcounts.free(first, ((offset + length - 1) >> bits) - first + 1)
        image._write_back()
    except Qcow2IOError as exc:
        image.refcounts.pending_frees.clear()
        image.refcounts.blocks.clear()
        emit_notice(f"qcow2_free_clusters failed: {exc.strerror}")


def _require_room(
    image,
    active_l1s: list[array],
    extra_clusters: int = 0,
    steps: Callable[[], Iterable[Step]] | None = None,
) -> None:
    """Refuse, before anything is written, an operation whose shadow states (shadow.py)
    the file system has no room for: it would fail half way otherwise (a deletion after
    the snapshot left the table, with what it held leaked). Only a host file's file
    system is asked (statvfs: the room of any user). The bound of shadow.room_needed
    comes first; where it does not fit, and the operation's `steps` are given, each is
    prepared and measured without being written: a file system too full for the bound
    (where a user deletes snapshots to make room) may still hold what they write."""
    file = image.file
    if not isinstance(file, HostFile) or file.is_device:
        return
    try:
        stats = os.fstatvfs(file.fd)
    except OSError:
        return
    room = stats.f_bavail * stats.f_frsize
    if room_needed(image, active_l1s, SPAN_L1_ENTRIES, extra_clusters) <= room:
        return
    if steps is not None and image.blkdebug is None:
        written = _most_written(image, steps())
        if written is not None and written + extra_clusters * image.cluster_size <= room:
            return
    raise Qcow2IOError(errno.ENOSPC, os.strerror(errno.ENOSPC), image.filename)


def _most_written(image, steps: Iterable[Step]) -> int | None:
    """The most bytes the commit of one of `steps` writes past the end of the file: each
    prepared in the caches, measured and forgotten (nothing is written); None if one
    meets an error (the operation then meets it, or the refusal stands)."""
    most = 0
    try:
        for step in steps:
            try:
                active, _ = step(_Counts(image, remember_layouts=True))
                most = max(most, shadow_bytes(image, active))
            finally:
                _forget_step(image)
    except Qcow2Error:
        return None
    return most


def _write_table(image, snapshots: list[Snapshot]) -> None:
    """QEMU's qcow2_write_snapshots: the table in new clusters, made durable, the header
    switched to it (one sector), then the old table freed."""
    hdr = image.header
    placed = _PlacedTable(image, snapshots)
    image._write_back()
    image._sync(image.file)
    old = (hdr.nb_snapshots, hdr.snapshots_offset)
    hdr.nb_snapshots, hdr.snapshots_offset = len(snapshots), placed.offset
    try:
        image._write_header_fields()
        image._sync(image.file)
    except BaseException:
        hdr.nb_snapshots, hdr.snapshots_offset = old
        raise
    placed.adopted(image)


class SnapshotL1Error(Qcow2IOError, CorruptImageError):
    """A snapshot's L1 table refused where it is used, as QEMU's qcow2_validate_table
    refuses it: its message and errno (the table itself is read without that check)."""


def _validate_l1(snap: Snapshot, cluster_size: int) -> None:
    if snap.l1_size * 8 > S.MAX_L1_BYTES:
        raise SnapshotL1Error(errno.EFBIG, "Snapshot L1 table too large")
    if (
        snap.l1_table_offset % cluster_size
        or snap.l1_table_offset > (1 << 63) - 1 - snap.l1_size * 8
    ):
        raise SnapshotL1Error(errno.EINVAL, "Snapshot L1 table offset invalid")


def read_l1(image, snap: Snapshot) -> array:
    """A snapshot's L1 table (entries with flags), validated as QEMU validates it; bytes
    past the end of the file read as zeros, as QEMU reads them."""
    _validate_l1(snap, image.cluster_size)
    if not snap.l1_size:
        return array("Q")
    raw = image.file.pread(snap.l1_size * 8, snap.l1_table_offset)
    return decode_be64(raw.ljust(snap.l1_size * 8, b"\0"))


def refresh_copied_flags(image) -> None:
    """Set COPIED in the active tree exactly where the refcount is 1 (QEMU's addend-0
    pass); the changes stay in the caches for the caller's write-back."""
    m = image.map
    l1 = array("Q", m.l1)
    _refcount_pass(image, l1, 0, _Counts(image))
    for index in nonzero_positions(l1):
        if l1[index] != m.l1[index]:
            m.l1[index] = l1[index]
            m.l1_dirty.add(index)


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
            image.resize_grow_l1(needed)
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
        table_clusters = -(-(cached_table(image)[1] + 2 * MAX_NAME_BYTES) // image.cluster_size)
        _require_room(image, [active], -(-len(active) * 8 // image.cluster_size) + table_clusters)
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
        # QEMU's order: the snapshot's copy of the L1 table (VM state area included), the
        # counts of the tree it shares, the snapshot table; then the VM state leaves the
        # active tree. A failure on the way leaves leaked clusters only (the copy, as
        # QEMU's). The table goes to the disk with the last commit, whose last header
        # write names it: two syncs fewer than a commit of its own.
        if len(active):
            snap.l1_table_offset = image.write_new_clusters(encode_be64(active))
            image._write_back()
        spans = _spans(len(active))
        for entries in spans:
            last = entries is spans[-1]
            _in_place(
                image, _sharing(image, entries), new_table=snapshots + [snap] if last else None
            )
        if vm_state_size:
            _drop_vm_state(image, vm_state_size)
        return snap


def _sharing(image, entries: range) -> Step:
    """Snapshot creation's pass over the L1 entries `entries` of the active tree."""

    def step(counts: _Counts) -> tuple[array, list[tuple[int, array]]]:
        shared = array("Q", image.map.l1)
        _refcount_pass(image, shared, 1, counts, entries)
        return shared, []

    return step


def _releasing(
    image,
    snap: Snapshot,
    deleted_l1: array,
    entries: range,
    last: bool,
    named_once: set[int] | None = None,
) -> Step:
    """Snapshot deletion's passes over the L1 entries `entries`: the deleted tree's
    counts drop, then the active tree's COPIED flags follow them (a cluster lies at one
    guest offset in every tree that reaches it, so the active entries whose counts change
    are those of the same L1 entries); the last span frees the deleted L1 table.

    With `named_once` (see _reverting), the shortcut: an L2 table both trees name at the
    same L1 index got its flags from the first pass already, from the counts the second
    would find, unless another table of the step (or the freed L1 table) names one of
    its clusters (_check_kept): the second pass leaves it out, and only its L1 entry
    follows its count."""

    def step(counts: _Counts) -> tuple[array, list[tuple[int, array]]]:
        _refcount_pass(image, deleted_l1, -1, counts, entries)
        bits = image.cluster_bits
        freed_l1: list[tuple[int, int]] = []
        if last:
            if image.blkdebug is not None:
                image.blkdebug.event("cluster_free")
            if snap.l1_size:
                first = snap.l1_table_offset >> bits
                stop = ((snap.l1_table_offset + snap.l1_size * 8 - 1) >> bits) + 1
                for cluster in range(first, stop):
                    counts.add(cluster, -1)
                freed_l1.append((first, stop - first))
        active = array("Q", image.map.l1)
        kept = {} if named_once is None else _kept(deleted_l1, active, entries, named_once)
        _refcount_pass(image, active, 0, counts, entries, kept)
        for index, l2_offset in kept.items():
            copied = S.OFLAG_COPIED if counts.add(l2_offset >> bits, 0) == 1 else 0
            active[index] = l2_offset | copied
        if kept:
            _check_kept(image, counts, set(kept.values()), freed_l1, counted=False)
        return active, []

    return step


def _drop_vm_state(image, vm_state_size: int) -> None:
    """Discard the VM state from the active tree (QEMU's qcow2_cluster_discard after a
    snapshot took it): it would only cost copy-on-write at the next snapshot."""
    start = vm_state_offset(image)
    length = -(-vm_state_size // image.cluster_size) * image.cluster_size
    size = image.size
    image.size = start + length  # (the engine's discard reaches past the disk, as QEMU's)
    try:
        image.discard(start, length)
    finally:
        image.size = size
    _flush_all(image)


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
        _validate_l1(snap, image.cluster_size)
        disk_size = image.size if snap.disk_size is None else snap.disk_size
        in_place = disk_size == image.size and snap.l1_size <= len(image.map.l1)
        _require_room(  # (steps measured only where no resize comes first)
            image,
            [image.map.l1, read_l1(image, snap)],
            steps=(lambda: _reverting_steps(image, snap)) if in_place else None,
        )
        if disk_size != image.size:
            if image.header.version < 3:
                raise UnsupportedFeatureError(
                    f"cannot apply snapshot '{snap.name}': its disk size {disk_size} differs "
                    f"from the image's {image.size} and a version 2 image cannot be resized"
                )
            if disk_size % 512:
                raise CorruptImageError(
                    f"Snapshot '{snap.name}' disk size {disk_size} is not a multiple of 512"
                )
            from .ops.resize import resize

            resize(image, disk_size, shrink=True)
        image.resize_grow_l1(snap.l1_size)
        snapshot_l1 = read_l1(image, snap)
        image.invalidate_bitmaps()  # the guest's content changes
        named_once = _named_once(snapshot_l1, image.map.l1)
        for entries in _spans(len(image.map.l1)):
            _in_place(
                image,
                _reverting(image, snap, snapshot_l1, entries),
                None
                if named_once is None
                else _reverting(image, snap, snapshot_l1, entries, named_once),
            )
        return snap


def _reverting_steps(image, snap: Snapshot) -> Iterator[Step]:
    """The application's steps on a copy of the snapshot's L1 table, for _require_room to
    measure before anything is written (the image's L1 table is as large as the
    snapshot's: no resize comes first)."""
    snapshot_l1 = read_l1(image, snap)
    for entries in _spans(len(image.map.l1)):
        yield _reverting(image, snap, snapshot_l1, entries)


def _reverting(
    image, snap: Snapshot, snapshot_l1: array, entries: range, named_once: set[int] | None = None
) -> Step:
    """Snapshot application's passes over the L1 entries `entries`, in QEMU's order: the
    snapshot's tree gains a reference, the old active tree loses one, the active L1
    entries take the snapshot's, and their COPIED flags follow the counts. (A crash
    between spans leaves part of the disk reverted: the revert had not completed.)

    With `named_once` (the L2 tables each L1 table names once), the shortcut: an L2
    table both trees name at the same L1 index (all of them, when nothing was written
    since the snapshot) gains a reference and loses it again, and so does every cluster
    it reaches; the first two passes leave such tables out, so that a revert costs what
    changed since the snapshot, plus the last pass. _check_kept refuses it where that
    could end anywhere else than QEMU's passes: a count that would overflow on the way
    or drop to zero, or a cluster of such a table that another table in the step names
    too (its count would be seen at other values on the way)."""

    def step(counts: _Counts) -> tuple[array, list[tuple[int, array]]]:
        old_active = image.map.l1
        kept = {} if named_once is None else _kept(snapshot_l1, old_active, entries, named_once)
        # (the shortcut works on a copy: if refused, the long way starts from the same L1)
        new_snapshot_l1 = array("Q", snapshot_l1) if kept else snapshot_l1
        changed = _refcount_pass(image, new_snapshot_l1, 1, counts, entries, kept)
        for index in kept:  # (what the first pass gives their entries: counts above 1)
            cleared = new_snapshot_l1[index] & ~S.OFLAG_COPIED
            changed = changed or cleared != new_snapshot_l1[index]
            new_snapshot_l1[index] = cleared
        _refcount_pass(image, array("Q", old_active), -1, counts, entries, kept)
        new_active = array("Q", old_active)
        for index in entries:
            new_active[index] = new_snapshot_l1[index] if index < len(new_snapshot_l1) else 0
        _refcount_pass(image, new_active, 0, counts, entries)
        if kept:
            _check_kept(image, counts, set(kept.values()))
            snapshot_l1[:] = new_snapshot_l1
        return new_active, [(snap.l1_table_offset, snapshot_l1)] if changed else []

    return step


# The most L2 tables an L1 table may name for the shortcuts of apply and delete (their
# offsets are held as a set: a 32 TiB image's worth in 64 KiB clusters, at most a few MiB).
SHORTCUT_MAX_TABLES = 1 << 16


def _named_once(*l1_tables: array) -> set[int] | None:
    """The L2 table offsets that none of the L1 tables names more than once; None (no
    shortcut) when one of them names more than SHORTCUT_MAX_TABLES."""
    seen: set[int] = set()
    repeated: set[int] = set()
    for l1 in l1_tables:
        offsets: list[int] = []
        for first in range(0, len(l1), SHORTCUT_MAX_TABLES):  # (a bounded piece at a time)
            piece = l1[first : first + SHORTCUT_MAX_TABLES]
            offsets.extend(piece[index] & S.L1E_OFFSET_MASK for index in nonzero_positions(piece))
            if len(offsets) > SHORTCUT_MAX_TABLES:
                return None
        offsets.sort()
        repeated.update(offset for offset, after in zip(offsets, offsets[1:]) if offset == after)
        seen.update(offsets)
    return seen - repeated


def _kept(snapshot_l1: array, active_l1: array, entries: range, named_once: set[int]) -> dict:
    """L1 index -> L2 table offset, for the indices of `entries` at which both L1 tables
    name the same table of `named_once`."""
    mask = S.L1E_OFFSET_MASK
    kept = {}
    stop = min(entries.stop, len(snapshot_l1))
    for index in nonzero_positions(snapshot_l1[entries.start : stop]):
        index += entries.start
        offset = snapshot_l1[index] & mask
        if offset == active_l1[index] & mask and offset in named_once:
            kept[index] = offset
    return kept


def _check_kept(
    image,
    counts: _Counts,
    kept_tables: set[int],
    other_runs: Sequence[tuple[int, int]] = (),
    counted: bool = True,
) -> None:
    """Refuse a shortcut (_NoShortcut) if another table the step reached, or a run of
    `other_runs` ((first, count) of clusters the step counted), names a cluster of a
    table it left out of a pass (or such a table names one twice). With `counted` (the
    tables' counts were left as they were), also unless the tables name only plain
    clusters, each counted at least once and below the maximum, as is each table."""
    bits = image.cluster_bits
    layouts = counts.layouts
    assert layouts is not None  # (_in_place's counts remember them)
    kept_runs: list[tuple[int, int]] = []
    others = list(other_runs)
    for l2_offset, layout in layouts.items():  # (every table the passes reached)
        others.append((l2_offset >> bits, 1))
        if l2_offset in kept_tables:
            if counted and layout.odd_clusters:
                raise _NoShortcut
            kept_runs.extend(layout.host_runs)
        else:
            others.extend(layout.host_runs)
            others.extend(layout.odd_clusters)
    if counted:
        limit = image.refcounts.max_refcount
        for l2_offset in kept_tables:
            found = counts.add_runs(layouts[l2_offset].host_runs, 0)
            found.append(counts.add(l2_offset >> bits, 0))
            if min(found) < 1 or max(found) >= limit:
                raise _NoShortcut
    if _any_overlap(kept_runs, others):
        raise _NoShortcut


def _any_overlap(kept: list[tuple[int, int]], other: list[tuple[int, int]]) -> bool:
    """Whether a (first, count) run of `kept` overlaps another of `kept` or one of
    `other` (runs of `other` may overlap each other)."""
    marked = sorted(
        [(first, first + count, True) for first, count in kept]
        + [(first, first + count, False) for first, count in other]
    )
    kept_end = other_end = 0
    for start, end, is_kept in marked:
        if start < kept_end or (is_kept and start < other_end):
            return True
        if is_kept:
            kept_end = max(kept_end, end)
        else:
            other_end = max(other_end, end)
    return False


def delete_snapshot(
    image, name_or_id: str | None = None, *, id: str | None = None, name: str | None = None
) -> Snapshot:
    """Delete a snapshot; returns the entry it had."""
    _require_writable(image, "delete a snapshot")
    with _Exclusive(image):
        snapshots, _ = _read_table(image)
        index = _lookup(snapshots, name_or_id, id, name)
        snap = snapshots[index]
        _validate_l1(snap, image.cluster_size)
        kept = snapshots[:index] + snapshots[index + 1 :]
        table_bytes = len(pack_snapshot_table(kept, image.size)) if kept else 0
        _require_room(
            image,
            [image.map.l1],
            -(-table_bytes // image.cluster_size),
            lambda: _deletion_steps(image, snap),
        )
        # QEMU's order: the snapshot leaves the table (its clusters leak until the next
        # step), then its tree loses a reference and its L1 table is freed, and the
        # active tree's COPIED flags follow the counts.
        _write_table(image, kept)

        try:
            deleted_l1 = read_l1(image, snap)
            # (no shortcut under blkdebug: a refused one would signal its events twice)
            named_once = None if image.blkdebug else _named_once(deleted_l1, image.map.l1)
            for entries, last in _deletion_spans(image, deleted_l1):
                _in_place(
                    image,
                    _releasing(image, snap, deleted_l1, entries, last),
                    None
                    if named_once is None
                    else _releasing(image, snap, deleted_l1, entries, last, named_once),
                )
        except Qcow2IOError as exc:
            raise exc.in_context("Failed to free the cluster and L1 table") from None
        return snap


def _deletion_spans(image, deleted_l1: array) -> list[tuple[range, bool]]:
    """The spans a deletion commits one by one (see _spans), each with whether it is the
    last."""
    spans = _spans(max(len(deleted_l1), len(image.map.l1)))
    return [(entries, entries is spans[-1]) for entries in spans]


def _deletion_steps(image, snap: Snapshot) -> Iterator[Step]:
    """The deletion's steps on a copy of the snapshot's L1 table (a step changes the
    table it passes over), for _require_room to measure before anything is written."""
    deleted_l1 = read_l1(image, snap)
    for entries, last in _deletion_spans(image, deleted_l1):
        yield _releasing(image, snap, deleted_l1, entries, last)


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
            l1 = read_l1(image, snap)
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
