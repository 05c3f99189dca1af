"""Crash-safe in-place changes of refcounts and COPIED flags, through a shadow state.

QEMU's snapshot operations change refcount blocks, L2 tables and the active L1 table in
place, and qimg lays images out as QEMU does. But no order of in-place writes keeps
counts and COPIED flags consistent at every moment: an active entry with COPIED whose
cluster is counted twice, or one without it counted once, is an error to `qemu-img check`.

So the new state F (prepared in the image's caches, nothing written yet) reaches the disk
in two switches of the header, each one sector:
1. Copies of what F changes on the active path go past the end of the file: the active
   L2 tables F changes, the active L1 table (pointing at those copies), the refcount
   blocks F changes or whose counts the copies change, and a refcount table. Counted as
   they are used there, they form the shadow state T: F, with the changed active tables
   read from their copies. The header switches to T.
2. F is written in place: clusters T does not use on its active path (the originals, and
   L2 tables only snapshots reach, whose entries change in their flags alone, which
   nothing reads in an inactive table). The header switches back, and the copies are cut
   off the end of the file.
A crash leaves the old state, T or F. Changes that leave the active tables as they are
(counts, and flags of tables only snapshots reach) are written in place directly: the
callers order them so that counts only drop to what the references on disk already are,
or rise above them (leaked clusters, allowed).
"""

from __future__ import annotations

from array import array

from . import structs as S
from .cache import encode_be64
from .errors import InvalidArgumentError
from .overlap import INACTIVE_L1
from .refcount import RefcountBlock
from .runs import consecutive_runs, nonzero_positions


def commit_in_place(
    image,
    active_l1: array,
    inactive_l1s: list[tuple[int, array]],
    freed: list[int],
    header_fields: dict[str, int] | None = None,
) -> None:
    """Write the state prepared in the caches (dirty refcount blocks and L2 tables) with the
    active L1 table `active_l1` (same size and place as now) and the inactive L1 tables
    `inactive_l1s` ((offset, entries), changed in flags only); `freed`: the clusters whose
    count dropped to zero (their tables are not written, their space is given back).
    `header_fields`: header fields the new state sets besides (a new snapshot table, its
    bytes already written to clusters the caches count): the last header write, once
    the state is durable, sets them too (one sector), saving a commit of their own.

    On failure the image works on from the state the header on disk names: the old one
    (the caches forget the change), or the shadow state."""
    m = image.map
    refs = image.refcounts
    bits = image.cluster_bits
    for cluster in freed:
        m.l2_cache.drop(cluster << bits)
    changed_l1 = (
        [] if active_l1 == m.l1 else [i for i, entry in enumerate(active_l1) if entry != m.l1[i]]
    )
    active_dirty = {entry & S.L1E_OFFSET_MASK for entry in active_l1}
    active_dirty.intersection_update(m.l2_cache.dirty)
    old_l1, file_end = m.l1, image.file.size()
    m.l1 = active_l1  # (a new array: the overlap map is built again from it)
    m.l1_dirty.update(changed_l1)
    shadow: _Shadow | None = None
    on_disk = "old"
    try:
        image._guard_metadata_writes()
        for offset, table in inactive_l1s:
            image.guard_write(offset, len(table) * 8, INACTIVE_L1)
        if changed_l1 or active_dirty:
            shadow = _write_shadow(image, sorted(active_dirty))
            _write_header(image, shadow.l1_offset, shadow.table_offset, shadow.table_clusters)
            on_disk = "shadow"
            image._sync(image.file)
        refs.write_blocks()
        if shadow is not None:  # (the changed active tables: as encoded for their copies)
            for offset in sorted(shadow.encoded):
                image.file.pwrite(shadow.encoded.pop(offset), offset)
        m.write_dirty_l2()
        m.write_dirty_l1()
        for offset, table in inactive_l1s:
            image.file.pwrite(encode_be64(table), offset)
        image._sync(image.file)
        if shadow is not None or header_fields:
            _write_header(
                image, m.l1_table_offset, refs.table_offset, refs.table_clusters, header_fields
            )
            on_disk = "new"
            image._sync(image.file)
            if shadow is not None:
                image.file.truncate(shadow.file_end)
    except BaseException:
        if on_disk == "old":
            _forget(image, old_l1, file_end)
        elif on_disk == "shadow" and shadow is not None:
            _adopt(image, shadow)
        raise
    if freed:
        refs.free_hint = min(refs.free_hint, min(freed))
    for first, count, _ in consecutive_runs(sorted(set(freed))):  # (a run at a time, as QEMU)
        image.file.punch_hole(first << bits, count << bits)


def room_needed(image, active_l1s: list[array], span: int, extra_clusters: int = 0) -> int:
    """Bytes a snapshot operation may write past the end of the file at most, in one
    commit whose active L1 table is one of `active_l1s`, cut into spans of `span`
    entries: a copy of every L2 table a span names, the L1 table, every refcount block in
    use, one more for the copies, a refcount table one cluster larger; and
    `extra_clusters` the operation allocates besides (an L1 copy, a snapshot table)."""
    refs = image.refcounts
    cs = image.cluster_size
    tables = max(
        (
            len(table[first : first + span]) - table[first : first + span].count(0)
            for table in active_l1s
            for first in range(0, len(table), span)
        ),
        default=0,
    )
    l1_clusters = max((-(-len(table) * 8 // cs) for table in active_l1s), default=0)
    blocks = len(refs.table) - refs.table.count(0) + 1
    return (tables + l1_clusters + blocks + refs.table_clusters + 1 + extra_clusters) * cs


def shadow_bytes(image, active_l1: array) -> int:
    """At most how many bytes commit_in_place writes past the end of the file for the
    state prepared in the caches with the active L1 table `active_l1`: none where the
    active tables stay as they are (everything is then written in place); else the
    copies of the changed active L2 tables and of the L1 table, the refcount blocks
    that count what changes or what the copies move, and a refcount table."""
    m = image.map
    refs = image.refcounts
    bits, cs = image.cluster_bits, image.cluster_size
    dirty_l2 = {entry & S.L1E_OFFSET_MASK for entry in active_l1}
    dirty_l2.intersection_update(m.l2_cache.dirty)
    if active_l1 == m.l1 and not dirty_l2:
        return 0
    l1_clusters = -(-len(active_l1) * 8 // cs)
    entries = refs.block_entries
    moved = [offset >> bits for offset in dirty_l2]  # (T counts these differently)
    moved += range(m.l1_table_offset >> bits, (m.l1_table_offset >> bits) + l1_clusters)
    moved += range(refs.table_offset >> bits, (refs.table_offset >> bits) + refs.table_clusters)
    blocks = _dirty_blocks(refs).union(cluster // entries for cluster in moved)
    blocks.update(  # (and those counting their old places, released in T)
        (refs._block_offset(index) >> bits) // entries for index in list(blocks)
    )
    copies = len(dirty_l2) + l1_clusters + len(blocks) + refs.table_clusters + 1
    copies += copies // entries + 2  # (the blocks counting the copies themselves)
    return copies * cs


def _dirty_blocks(refs) -> set[int]:
    """The indices of the refcount blocks changed in the cache."""
    block_of = {refs.table[i] & S.REFT_OFFSET_MASK: i for i in nonzero_positions(refs.table)}
    return {block_of[offset] for offset in refs.blocks.dirty if offset in block_of}


class _Shadow:
    """Where the shadow state lies: its L1 table (entries and offset), its refcount
    table, and where the file ended before it; and the changed active L2 tables as
    written there (offset -> bytes), to be written in place the same way."""

    def __init__(
        self,
        file_end: int,
        l1: array,
        l1_offset: int,
        table_offset: int,
        clusters: int,
        encoded: dict[int, bytes],
    ):
        self.file_end = file_end
        self.l1 = l1
        self.l1_offset = l1_offset
        self.table_offset = table_offset
        self.table_clusters = clusters
        self.encoded = encoded


def _write_header(
    image,
    l1_offset: int,
    reftable_offset: int,
    reftable_clusters: int,
    fields: dict[str, int] | None = None,
) -> None:
    """Point the header at an L1 table and a refcount table, and set `fields`, with one
    sector write (the in-memory header keeps the old fields if the write fails)."""
    hdr = image.header
    changes = {
        "l1_table_offset": l1_offset,
        "refcount_table_offset": reftable_offset,
        "refcount_table_clusters": reftable_clusters,
        **(fields or {}),
    }
    old = {name: getattr(hdr, name) for name in changes}
    for name, value in changes.items():
        setattr(hdr, name, value)
    try:
        image._write_header_fields()
    except BaseException:
        for name, value in old.items():
            setattr(hdr, name, value)
        raise


def _forget(image, old_l1: array, file_end: int) -> None:
    """The header still names the old state: drop the change from memory (the tables are
    read again from the disk) and, best effort, the shadow copies from the file."""
    m = image.map
    m.l1 = old_l1
    m.l1_dirty.clear()
    m.l2_cache.clear()
    image.refcounts.blocks.clear()
    image._overlaps_for = None
    try:
        if image.file.size() > file_end:
            image.file.truncate(file_end)
    except Exception:  # (the failure being reported matters more; this is only space)
        pass


def _adopt(image, shadow: _Shadow) -> None:
    """The header names the shadow state: work on from it. If even that cannot be read,
    the image takes no more writes (nothing is written through a view not on disk)."""
    m = image.map
    m.l2_cache.clear()
    m.l1 = shadow.l1
    m.l1_dirty.clear()
    m.l1_table_offset = shadow.l1_offset
    m.metadata[1] = (shadow.l1_offset, shadow.l1_offset + len(shadow.l1) * 8, "the L1 table")
    image._overlaps_for = None
    try:
        image._host_size = max(image._host_size, image.file.size())
        image.use_refcount_table(shadow.table_offset, shadow.table_clusters, image._host_size)
    except Exception:
        image.read_only = True


def _write_shadow(image, dirty_l2: list[int]) -> _Shadow:
    """Write the shadow state T past the end of the file, durably."""
    m = image.map
    active_l1 = m.l1
    refs = image.refcounts
    bits, cs = image.cluster_bits, image.cluster_size
    end = image.file.size()
    next_cluster = -(-max(end, refs.end_cluster << bits) >> bits)
    adjust: dict[int, int] = {}  # cluster -> T's count less F's

    def take(count: int) -> int:
        nonlocal next_cluster
        first = next_cluster
        next_cluster += count
        for cluster in range(first, first + count):
            adjust[cluster] = adjust.get(cluster, 0) + 1
        return first

    def release(offset: int, length: int) -> None:
        """One reference less in T on the clusters of [offset, +length), where F counts
        them at all (a damaged image may not: then T does not either)."""
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            if refs.get(cluster) + adjust.get(cluster, 0) > 0:
                adjust[cluster] = adjust.get(cluster, 0) - 1

    # The changed active L2 tables, copied; the L1 table points at the copies.
    uses = dict.fromkeys(dirty_l2, 0)  # L2 table -> active L1 entries pointing at it
    for entry in active_l1:
        offset = entry & S.L1E_OFFSET_MASK
        if offset in uses:
            uses[offset] += 1
    copies = {}
    # Each table is encoded once, for its copy and its write in place; the cache lets go
    # of it meanwhile (read again when next used), so its memory serves the next one.
    encoded: dict[int, bytes] = {}
    for offset in dirty_l2:
        copies[offset] = take(1) << bits
        release(offset, cs)
        adjust[offset >> bits] -= uses[offset] - 1
        adjust[copies[offset] >> bits] += uses[offset] - 1
        encoded[offset] = encode_be64(m.l2_cache.get(offset))
        m.l2_cache.drop(offset)
        image.file.pwrite(encoded[offset], copies[offset])
    shadow_l1 = array("Q", active_l1)
    for index in nonzero_positions(active_l1):
        offset = active_l1[index] & S.L1E_OFFSET_MASK
        if offset in copies:
            copied = S.OFLAG_COPIED if uses[offset] == 1 else 0
            shadow_l1[index] = copies[offset] | copied
    l1_offset = m.l1_table_offset
    if len(shadow_l1):
        l1_offset = take(-(-len(shadow_l1) * 8 // cs)) << bits
        release(m.l1_table_offset, len(shadow_l1) * 8)
        image.file.pwrite(encode_be64(shadow_l1), l1_offset)
    # The refcount blocks whose counts differ from the disk's, and a table for them.
    release(refs.table_offset, refs.table_clusters * cs)
    entries = refs.block_entries
    dirty_blocks = _dirty_blocks(refs)
    block_copies: dict[int, int] = {}
    table_first, table_clusters = -1, 0
    while True:
        wanted = dirty_blocks.union(cluster // entries for cluster in adjust)
        missing = sorted(wanted - block_copies.keys())
        needed = max(len(refs.table), max(wanted) + 1)
        if needed * 8 > S.MAX_REFTABLE_BYTES:
            raise InvalidArgumentError(
                f"Refcount table would need {needed} entries, more than the format's limit "
                f"of {S.MAX_REFTABLE_BYTES // 8}"
            )
        fits = table_first >= 0 and needed * 8 <= table_clusters * cs
        if not missing and fits:
            break
        for block_index in missing:
            block_copies[block_index] = take(1)
            old = refs._block_offset(block_index)
            if old:
                release(old, cs)
        if not fits:
            if table_first >= 0:  # too small now: a larger one
                for cluster in range(table_first, table_first + table_clusters):
                    adjust[cluster] -= 1
            table_clusters = max(refs.table_clusters, -(-needed * 8 // cs))
            table_first = take(table_clusters)
    changes: dict[int, list[int]] = {}
    for cluster, change in adjust.items():
        if change:
            changes.setdefault(cluster // entries, []).append(cluster)
    table = array("Q", refs.table)
    table.extend([0] * (table_clusters * cs // 8 - len(table)))
    for block_index, cluster in sorted(block_copies.items()):
        old = refs.block(block_index)
        block = RefcountBlock(refs.order, old.to_bytes() if old is not None else bytes(cs))
        base = block_index * entries
        for counted in changes.get(block_index, ()):
            count = block.get(counted - base) + adjust[counted]
            block.set(counted - base, min(max(count, 0), refs.max_refcount))  # (damaged)
        image.file.pwrite(block.to_bytes(), cluster << bits)
        table[block_index] = cluster << bits
    image.file.pwrite(encode_be64(table), table_first << bits)
    image._sync(image.file)
    return _Shadow(end, shadow_l1, l1_offset, table_first << bits, table_clusters, encoded)
